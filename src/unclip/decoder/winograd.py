"""Winograd F(4×4, 3×3) convolution for float32 on the CPU: sampling and training.

Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks": a 4×4 output tile
of a 3×3 convolution is ``Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` for the 6×6 input patch d around it,
with interpolation points 0, ±1, ±2, ∞. Summed over input channels, the element-wise product
becomes 36 matrix products ``M[ξ] = V[ξ] · U[ξ]`` (V [T, C] the transformed input tiles,
U [C, K] the transformed kernels, ξ = 6i + j), which is 36 multiply-adds per tile and channel
pair where the direct convolution does 144: 4× fewer. All of it runs in the compiled kernels
of ``unclip/native/winograd.c`` (threads shared with torch): :func:`winograd_conv` in one pass,
blocks of tiles transformed, multiplied and transformed back in a thread's cache; a training
step's forward in three (the input transform, ``torch.bmm``, the output transform), since its
backward needs V (timings against oneDNN's direct convolution: ``benchmarks/winograd_conv.py``).

A sampling run (:mod:`unclip.decoder.packed_conv`) transforms each kernel once and calls
:func:`winograd_conv`; a training step (:class:`~unclip.decoder.blocks.Conv3x3` where
:func:`trains`) calls :func:`winograd_conv_autograd`, whose gradients are Winograd too.
Float32 results differ from the direct convolution's by rounding, about 1e-5 of the output's
scale (the transforms' coefficients are small integers and 1/4, 1/6, 1/12, 1/24).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from unclip import native

#: G [6, 3]: the kernel transform U = G g Gᵀ
_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)


#: Winograd runs a layer only where its transformed kernels (36·C·K floats, 4× the 3×3
#: kernel) are small against the work they serve, C·K ≤ this × tiles: with few tiles (an 8×8
#: map of a few images) the 36 products read more kernel than they compute. A bound, not a
#: tuned value: halving or doubling it moves an emoji-small decoder call by under 1%.
MAX_KERNEL_ELEMENTS_PER_TILE = 2048


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    lib = native.load("winograd")
    if lib is None:
        return None
    ptr, i = ctypes.c_void_p, ctypes.c_int
    lib.winograd_input.argtypes = [i, ptr, ptr, i, i, i, i, i]
    lib.winograd_output.argtypes = [i, ptr, ptr, ptr, i, i, i, i]
    lib.winograd_output_grad.argtypes = [i, ptr, ptr, i, i, i, i]
    lib.winograd_conv.argtypes = [i, ptr, ptr, ptr, ptr, ptr, i, i, i, i, i, i]
    lib.winograd_conv.restype = i
    return lib


def available() -> bool:
    """Whether the compiled transforms could be built and loaded here (:mod:`unclip.native`)."""
    return _kernels() is not None


@functools.cache
def _g_kron_g() -> torch.Tensor:
    """G ⊗ G [36, 9] float32: (G ⊗ G)[6a+b, 3i+j] = G[a, i] G[b, j], so vec(G g Gᵀ) =
    (G ⊗ G) vec(g)."""
    g = torch.tensor(_G, dtype=torch.float32)
    return torch.kron(g, g)


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """weight [K, C, 3, 3] -> U [36, C, K] float32, U[6a+b, c, k] = (G w[k, c] Gᵀ)[a, b]: one
    float32 matrix product, (G ⊗ G) [36, 9] by the taps laid out [9, C·K], so U comes out in
    its own layout with no transposing copy."""
    k, c = weight.shape[:2]
    taps = weight.detach().float().permute(2, 3, 1, 0).reshape(9, c * k)  # [(i, j), (c, k)]
    return (_g_kron_g() @ taps).view(36, c, k)


@dataclass(frozen=True)
class Kernels:
    """A convolution's weights as :func:`winograd_conv` reads them (:func:`prepare`).

    ``panels`` [36, C·K'] float32: for each ξ, U[ξ] [C, K']'s columns in panels of
    :func:`panel_width` (the last may be half as wide), each panel stored [C, its width]
    after the previous, so the products read U once, in order. K' is ``out_channels``
    rounded up to a multiple of the vector width (zero kernels past it). ``bias``: [K']
    float32 (zeros past ``out_channels``) or None."""

    panels: torch.Tensor
    bias: torch.Tensor | None
    in_channels: int
    out_channels: int

    @property
    def padded_channels(self) -> int:
        """K': the output channels the kernels compute (``out_channels`` and the zero ones)."""
        return self.panels.shape[1] // self.in_channels


def panel_width() -> int:
    """Output channels per panel of :class:`Kernels`: two vectors, the columns the compiled
    products hold in registers (``winograd.c``)."""
    return 2 * native.lanes()


def prepare(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernels:
    """weight [K, C, 3, 3], bias [K] or None -> :class:`Kernels` (made once per sampling run
    and kept between runs: :mod:`unclip.decoder.packed_conv`); K need not be a multiple of the
    vector width (zero kernels pad it)."""
    k, c = weight.shape[:2]
    padded = -(-k // native.lanes()) * native.lanes()
    u = kernel_transform(weight)  # [36, C, K]
    b = None if bias is None else _bias(bias, k).detach()
    if padded != k:
        u = torch.cat([u, u.new_zeros(36, c, padded - k)], dim=2)
        b = None if b is None else torch.cat([b, b.new_zeros(padded - k)])
    p = panel_width()
    full = padded // p * p
    parts = [u[:, :, :full].reshape(36, c, full // p, p).transpose(1, 2).reshape(36, c * full)]
    if full < padded:
        parts.append(u[:, :, full:].reshape(36, c * (padded - full)))
    panels = torch.cat(parts, dim=1).contiguous()
    return Kernels(panels, None if b is None else b.contiguous(), c, k)


def trains(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv(x)`` records autograd and :func:`winograd_conv_autograd` can run it:
    :func:`applies` and not under autocast (its compute dtype is float32)."""
    return (
        torch.is_grad_enabled()
        and (x.requires_grad or conv.weight.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and applies(x, conv)
    )


def applies(
    x: torch.Tensor, conv: torch.nn.Conv2d, upsample: bool = False, padded: bool = False
) -> bool:
    """Whether :func:`winograd_conv` can run ``conv`` on ``x`` (upsampled ×2 first, nearest,
    if ``upsample``): x readable by the kernels (:func:`unclip.native.readable`), a 3×3
    kernel with stride 1, padding 1, no dilation or groups, output channels a multiple of the
    kernels' vector width (any count if ``padded``: :func:`prepare` pads them, training's
    :func:`winograd_conv_autograd` does not), enough tiles for the kernels' size
    (``MAX_KERNEL_ELEMENTS_PER_TILE``), not being compiled (dynamo traces its own
    convolutions), and the compiled kernels loaded."""
    if torch.compiler.is_compiling() or not native.readable(x) or _kernels() is None:
        return False
    n, c, h, w = x.shape
    tiles = n * ((h * (1 + upsample) + 3) // 4) * ((w * (1 + upsample) + 3) // 4)
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.weight.dtype == torch.float32
        and c == conv.in_channels
        and (padded or fits(conv.out_channels))
        and c * conv.out_channels <= MAX_KERNEL_ELEMENTS_PER_TILE * tiles
    )


def fits(channels: int) -> bool:
    """Whether the kernels take ``channels`` as they are: a multiple of the vector width."""
    return channels % native.lanes() == 0


def input_transform(x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
    """x [N, C, H, W] float32 channels-last -> V [36, T, C], the 6×6 input patch of each 4×4
    output tile as Bᵀ d B (T = N·⌈H'/4⌉·⌈W'/4⌉ tiles; zero padding 1), of x or, if
    ``upsample``, of x upsampled ×2 (nearest; H', W' = 2H, 2W), read from x as it is."""
    native.require_readable(x, "winograd: the input")
    n, c, h, w = x.shape
    up = int(upsample)
    v = torch.empty(36, n * (((h << up) + 3) // 4) * (((w << up) + 3) // 4), c)
    _loaded().winograd_input(native.threads(), x.data_ptr(), v.data_ptr(), n, h, w, c, up)
    return v


def winograd_conv(
    x: torch.Tensor,
    kernels: Kernels,
    upsample: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [N, C, H, W] float32 channels-last, ``kernels`` from :func:`prepare` (C -> K) ->
    [N, K, H, W] channels-last, the padding-1 convolution plus bias; with ``upsample``, of x
    upsampled ×2 (nearest) -> [N, K, 2H, 2W], the upsampled map never made; with
    ``residual`` (the output's shape, float32 channels-last; K a multiple of the vector
    width), ``residual`` added as each output tile is written (a residual block's sum
    without its own pass). No autograd; the caller checks :func:`applies` (what the kernels
    cannot read raises ValueError)."""
    native.require_readable(x, "winograd: the input")
    n, c, h, w = x.shape
    k, kp, up = kernels.out_channels, kernels.padded_channels, int(upsample)
    u, b = kernels.panels, kernels.bias
    if (
        kernels.in_channels != c
        or u.dtype != torch.float32
        or u.shape != (36, c * kp)
        or not u.is_contiguous()
        or not fits(kp)
        or not 0 <= kp - k < native.lanes()
        or (b is not None and (b.dtype != torch.float32 or b.shape != (kp,) or b.stride() != (1,)))
    ):
        raise ValueError(
            f"winograd: kernels must be float32 panels (prepare) for {c} input channels; got "
            f"{tuple(u.shape)} for {kernels.in_channels} -> {k}, bias "
            f"{None if b is None else tuple(b.shape)}"
        )
    y = torch.empty(n, kp, h << up, w << up, memory_format=torch.channels_last)
    if residual is not None:
        native.require_readable(residual, "winograd: the residual")
        if residual.shape != (n, k, h << up, w << up) or kp != k:
            raise ValueError(
                f"winograd: the residual must be {tuple(y.shape)}, with output channels a "
                f"multiple of {native.lanes()}; got {tuple(residual.shape)}"
            )
    if y.numel() == 0:
        return y[:, :k]
    if _loaded().winograd_conv(native.threads(), x.data_ptr(), u.data_ptr(), native.ptr(b),
                               native.ptr(residual), y.data_ptr(), n, h, w, c, kp, up):  # fmt: skip
        raise MemoryError("winograd: no memory for the kernels' scratch")
    return y if kp == k else y[:, :k].contiguous(memory_format=torch.channels_last)


def _bias(bias: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """bias as the kernels read it (dense float32 [K]: itself when it is one), checked to
    have k elements."""
    if bias is None or (
        bias.dtype == torch.float32 and bias.shape == (k,) and bias.stride() == (1,)
    ):
        return bias
    if bias.numel() != k:
        raise ValueError(f"winograd: bias must have {k} elements; got {tuple(bias.shape)}")
    return bias.detach().float().reshape(k).contiguous()


def _output(m: torch.Tensor, n: int, h: int, w: int, bias: torch.Tensor | None) -> torch.Tensor:
    """M [36, T, K] -> y [N, K, H, W] channels-last, Aᵀ M A per tile, plus bias."""
    k = m.shape[2]
    b = _bias(bias, k)
    y = torch.empty(n, k, h, w, memory_format=torch.channels_last)
    _loaded().winograd_output(
        native.threads(), m.data_ptr(), native.ptr(b), y.data_ptr(), n, h, w, k
    )
    return y


def _loaded() -> ctypes.CDLL:
    lib = _kernels()
    assert lib is not None, "Winograd called where the compiled kernels are not loaded"
    return lib


class _WinogradConv(torch.autograd.Function):
    """The padding-1 3×3 convolution, all as Winograd. Forward: M = V·U per tile element,
    y = Aᵀ M A. Input gradient: the convolution of the output gradient by the kernel flipped
    and transposed. Weight gradient: through the transforms, dM = A dy Aᵀ per tile,
    dU[ξ] = V[ξ]ᵀ dM[ξ] (one batched product over all tiles), dw = Gᵀ dU G. Bias gradient:
    the output gradient summed. Keeps V [36, T, C] for the backward (2.25× the input's
    size, against a pass over the input to make it again); first derivatives only."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        n, _, h, w = x.shape
        v = input_transform(x)
        ctx.save_for_backward(v, weight)
        ctx.size = (n, h, w)  # type: ignore[attr-defined]
        return _output(torch.bmm(v, kernel_transform(weight)), n, h, w, bias)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        v, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        n, h, w = ctx.size  # type: ignore[attr-defined]
        k, c = weight.shape[:2]
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).transpose(0, 1)  # [C, K, 3, 3]
            dx = winograd_conv(dy, prepare(flipped, None))
        if ctx.needs_input_grad[1]:
            dm = torch.empty(36, v.shape[1], k)
            _loaded().winograd_output_grad(native.threads(), dy.data_ptr(), dm.data_ptr(),
                                           n, h, w, k)  # fmt: skip
            du = torch.bmm(v.transpose(1, 2), dm)  # [36, C, K]
            g9 = _g_kron_g().t() @ du.view(36, c * k)  # [9, C·K]
            dw = torch.empty_like(weight).copy_(g9.view(3, 3, c, k).permute(3, 2, 0, 1))
        if ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db


def winograd_conv_autograd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [N, C, H, W] float32 channels-last, weight [K, C, 3, 3], bias [K] or None ->
    [N, K, H, W] channels-last, the padding-1 convolution with autograd (a training step),
    forward and gradients as Winograd (:class:`_WinogradConv`), kernels transformed at each
    call. The caller checks :func:`trains`."""
    return _WinogradConv.apply(x, weight, bias)
