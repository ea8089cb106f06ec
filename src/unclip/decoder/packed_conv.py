"""Convolutions whose weights are laid out for oneDNN once per sampling run (CPU, no autograd).

ATen's CPU convolution hands each call's weight to oneDNN in PyTorch's layout, and oneDNN
reorders it into its blocked layout every time; at the sizes of a small decoder that reorder
is up to half of a convolution's time (docs/benchmarks.md). Within
:func:`packed_convolutions` every ``nn.Conv2d`` of a module runs through
``torch.ops.mkldnn._convolution_pointwise`` with a weight reordered at its first call (for that
call's memory format, shape and compute dtype: float32, or bfloat16 under bf16 autocast where
oneDNN has bf16 kernels, cast as autocast would cast it) and kept until the context exits.
The same oneDNN convolution runs, so the outputs are those of ``F.conv2d`` to float rounding.
A float32 3×3 convolution that :func:`unclip.decoder.winograd.applies` to runs as Winograd
F(4×4, 3×3) instead, its kernels transformed once and kept for later runs while the weights
are unchanged (:mod:`unclip.kept`; 4× fewer multiplies; outputs equal to about 1e-5 of their
scale); output channels that are not a multiple of the vector width (a UNet's last layer)
get zero kernels beside them. A :class:`~unclip.decoder.blocks.Conv3x3` after a ×2 upsampling (its ``upsampled``) runs
the phase convolution of :mod:`unclip.decoder.upsample_conv` with its four phase kernels
made and packed once.

A call that cannot run packed (autograd recording, a device other than the CPU, a compute
dtype oneDNN does not pack) runs the module's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from unclip import native
from unclip.decoder import winograd
from unclip.decoder.upsample_conv import (
    interleave_phases,
    memory_format,
    phase_weights,
    upsample_conv3x3,
)
from unclip.kept import kept


def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """float32, and bfloat16 where oneDNN runs it (not on an AVX2-only CPU)."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


def packing_available(model: nn.Module) -> bool:
    """Whether :func:`packed_convolutions` packs ``model``'s convolutions: float32 weights on
    the CPU, oneDNN present, and ``model`` not compiled (dynamo traces its own convolutions)."""
    p = next(model.parameters(), None)
    return (
        p is not None
        and p.device.type == "cpu"
        and p.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and getattr(model, "_compiled_call_impl", None) is None
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` would compute in for input ``x`` on the CPU."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class _PackedForward:
    """The forward of one ``nn.Conv2d`` with its weight reordered for oneDNN once (lazily, per
    compute dtype and layout), and :meth:`upsampled`, the same for the phase kernels of a
    :class:`~unclip.decoder.blocks.Conv3x3` after a ×2 upsampling."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.dtypes = _packable_dtypes()
        self.packed: dict[object, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.winograd_shapes: dict[tuple, bool] = {}  # winograd.applies per input shape

    def _runs_packed(self, x: torch.Tensor) -> bool:
        return not (
            x.device.type != "cpu"
            or x.ndim != 4
            or _compute_dtype(x) not in self.dtypes
            or (torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad))
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if not self._runs_packed(x):
            return type(conv).forward(conv, x)
        if self._runs_winograd(x):
            return self._winograd(x)
        return self._onednn(x, "conv", conv.weight, conv.bias, conv.padding)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + conv(x)``: one Winograd pass that adds ``residual`` as it writes where
        Winograd runs, the output channels are a multiple of the vector width and
        ``residual`` is float32 channels-last of the output's shape, else the sum of the two."""
        if (
            self._runs_packed(x)
            and self._runs_winograd(x)
            and winograd.fits(self.conv.out_channels)
            and not (torch.is_grad_enabled() and residual.requires_grad)
            and native.readable(residual)
            and residual.shape == (x.shape[0], self.conv.out_channels, *x.shape[2:])
        ):
            return self._winograd(x, residual=residual)
        return residual + self(x)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(nearest2x(x))``: as Winograd reading x upsampled where it applies (float32),
        else by the phase convolution of :mod:`unclip.decoder.upsample_conv` with packed phase
        kernels."""
        conv = self.conv
        if not self._runs_packed(x):
            return upsample_conv3x3(x, conv.weight, conv.bias)
        if self._runs_winograd(x, upsample=True):
            return self._winograd(x, upsample=True)
        if "phases" not in self.packed:
            with torch.no_grad():
                self.packed["phases"] = phase_weights(conv.weight, conv.bias)
        weight, bias = self.packed["phases"]
        z = self._onednn(x, "phases", weight, bias, (1, 1))  # [N, 4·C', H+1, W+1]
        return interleave_phases(z, memory_format(x) == torch.channels_last)

    def _runs_winograd(self, x: torch.Tensor, upsample: bool = False) -> bool:
        if _compute_dtype(x) != torch.float32:
            return False
        key = (tuple(x.shape), x.stride(), upsample)
        if key not in self.winograd_shapes:
            self.winograd_shapes[key] = winograd.applies(x, self.conv, upsample, padded=True)
        return self.winograd_shapes[key]

    def _winograd(
        self, x: torch.Tensor, upsample: bool = False, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The conv of x (upsampled ×2, nearest, if ``upsample``; plus ``residual``) as
        Winograd F(4×4, 3×3) (:mod:`unclip.decoder.winograd`), its kernels transformed at the
        first call."""
        if "winograd" not in self.packed:
            conv = self.conv
            self.packed["winograd"] = kept(
                conv, "winograd", (conv.weight, conv.bias),
                lambda: winograd.prepare(conv.weight, conv.bias),
            )  # fmt: skip
        return winograd.winograd_conv(x, self.packed["winograd"], upsample, residual)

    def _onednn(
        self,
        x: torch.Tensor,
        route: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        padding: tuple[int, ...],
    ) -> torch.Tensor:
        """The oneDNN convolution of x by ``weight`` (reordered at the first call per route,
        compute dtype and layout) with the conv's stride, dilation and groups."""
        conv, dtype = self.conv, _compute_dtype(x)
        key = (route, dtype, memory_format(x))
        if key not in self.packed:
            w = weight.detach().to(dtype).contiguous(memory_format=key[2])
            w = torch.ops.mkldnn._reorder_convolution_weight(
                w, list(padding), list(conv.stride), list(conv.dilation), conv.groups,
                list(x.shape),
            )  # fmt: skip
            self.packed[key] = (w, None if bias is None else bias.detach().to(dtype))
        w, b = self.packed[key]
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), w, b, list(padding), list(conv.stride), list(conv.dilation),
            conv.groups, "none", [], "",
        )  # fmt: skip


def _packable(conv: nn.Module) -> bool:
    return (
        (type(conv) is nn.Conv2d or getattr(type(conv), "packable", False))
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and "forward" not in conv.__dict__
    )


@contextmanager
def packed_convolutions(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context ``model``'s ``nn.Conv2d`` layers run with weights reordered once
    for oneDNN (see the module docstring); a no-op where :func:`packing_available` is false.
    The weights must not change inside. Nested use keeps the outer context's packing."""
    convs = pack_convolutions(model)
    try:
        yield model
    finally:
        unpack_convolutions(convs)


def pack_convolutions(model: nn.Module) -> list[nn.Module]:
    """:func:`packed_convolutions`' entry: the convolutions it packed (none that already run
    packed), for :func:`unpack_convolutions`."""
    convs = [m for m in model.modules() if _packable(m)] if packing_available(model) else []
    for conv in convs:
        conv.forward = _PackedForward(conv)  # type: ignore[method-assign]
    return convs


def unpack_convolutions(convs: list[nn.Module]) -> None:
    """Give ``convs`` (from :func:`pack_convolutions`) their own forward back."""
    for conv in convs:
        conv.__dict__.pop("forward", None)


def packed_forward_count(model: nn.Module) -> int:
    """How many of ``model``'s convolutions currently run packed (for tests)."""
    return sum(isinstance(m.__dict__.get("forward"), _PackedForward) for m in model.modules())
