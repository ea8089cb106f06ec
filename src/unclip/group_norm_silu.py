"""Group norm, scale-shift modulation and SiLU as one compiled kernel (float32, CPU).

``silu(group_norm(x) · (1 + scale) + shift)`` is how every ADM ResBlock and the UNet's
output head start their layers (:meth:`unclip.nn.GroupNorm32.silu`). Eager PyTorch runs it
as three kernels (group norm, ``addcmul``, SiLU) that each read and write the whole
activation; ``unclip/native/group_norm_silu.c`` reads it twice (statistics, then the
normalised, modulated and activated output) and writes it once, with statistics in double.
Its SiLU uses its own vectorised ``exp`` (relative error under 2e-7), and its statistics are
taken around each channel's first value (a large mean costs no precision), so results equal
PyTorch's to float32 rounding.

It runs where :func:`applies`: float32 channels-last input on the CPU, channel counts a
multiple of the kernel's vector width, no autograd to record, not being compiled (inductor
fuses the eager ops itself), and the kernel built (:mod:`unclip.native`); elsewhere callers
run the eager ops.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from unclip import native


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    lib = native.load("group_norm_silu")
    if lib is None:
        return None
    p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.group_norm_silu.argtypes = [
        i,
        p,
        p,
        i,
        long,
        i,
        i,
        p,
        p,
        p,
        long,
        p,
        long,
        ctypes.c_float,
        i,
    ]
    lib.group_norm_silu.restype = i
    return lib


def applies(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether :func:`group_norm_silu` can run on ``x`` [N, C, H, W] with these parameters
    (weight, bias, scale, shift; any may be None): see the module docstring."""
    if torch.compiler.is_compiling() or not native.readable(x) or _kernels() is None:
        return False
    return not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    )


def _channels(t: torch.Tensor | None, c: int, name: str) -> torch.Tensor | None:
    """weight or bias (or None) as the kernel reads it, a dense float32 [C]: ``t`` itself
    when it is one (no copy, no dispatched op), else a broadcast copy."""
    if t is None or (t.dtype == torch.float32 and t.shape == (c,) and t.stride() == (1,)):
        return t
    try:
        return t.detach().float().expand(c).contiguous()
    except RuntimeError:
        raise ValueError(
            f"group_norm_silu: {name} of shape {tuple(t.shape)} does not fit [{c}]"
        ) from None


def _rows(t: torch.Tensor | None, n: int, c: int, name: str) -> tuple[torch.Tensor | None, int]:
    """scale or shift ([N or 1, C, 1, 1], or None) as the kernel reads it: (a tensor whose
    row i starts i·stride floats in, channels dense, and that stride). A view with dense
    channels is read in place (the halves of ``emb_out.chunk(2, dim=1)``: no copy); a single
    row is read for every sample (stride 0)."""
    if t is None:
        return None, 0
    if t.ndim != 4 or t.shape[2:] != (1, 1):
        raise ValueError(f"group_norm_silu: {name} must be [N, C, 1, 1]; got {tuple(t.shape)}")
    if t.shape[1] != c or t.shape[0] not in (1, n):
        raise ValueError(
            f"group_norm_silu: {name} of shape {tuple(t.shape)} does not fit [{n}, {c}, 1, 1]"
        )
    if t.dtype != torch.float32 or t.stride(1) != 1:
        t = t.detach().float().contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def group_norm_silu(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """x [N, C, H, W] channels-last float32 -> ``silu(group_norm(x, groups, weight, bias, eps)
    · (1 + scale) + shift)`` (without the SiLU if ``silu`` is false), the same shape and
    layout. weight, bias: [C] or None; scale, shift: [N or 1, C, 1, 1] or None. No autograd;
    the caller checks :func:`applies` (what the kernel cannot read raises ValueError)."""
    lib = _kernels()
    assert lib is not None, "group_norm_silu called where the kernel is not loaded"
    native.require_readable(x, "group_norm_silu: x")
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    y = torch.empty_like(x, memory_format=torch.channels_last)
    wt, bs = _channels(weight, c, "weight"), _channels(bias, c, "bias")
    (sc, sc_stride), (sh, sh_stride) = _rows(scale, n, c, "scale"), _rows(shift, n, c, "shift")
    failed = lib.group_norm_silu(
        native.threads(), x.data_ptr(), y.data_ptr(), n, h * w, c, groups, native.ptr(wt), native.ptr(bs),
        native.ptr(sc), sc_stride, native.ptr(sh), sh_stride, float(eps), int(silu),
    )  # fmt: skip
    if failed:
        raise MemoryError("group_norm_silu: no memory for its statistics")
    return y
