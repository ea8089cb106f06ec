"""Group norm, scale-shift modulation and SiLU as one compiled kernel (float32, CPU).

``silu(group_norm(x) · (1 + scale) + shift)`` is how every ADM ResBlock and the UNet's
output head start their layers (:meth:`unclip.nn.GroupNorm32.silu`). Eager PyTorch runs it
as three kernels (group norm, ``addcmul``, SiLU) that each read and write the whole
activation; ``unclip/native/group_norm_silu.c`` reads it twice (statistics, then the
normalised, modulated and activated output) and writes it once, with statistics in double.
Its SiLU uses its own vectorised ``exp`` (relative error under 2e-7), so results equal
PyTorch's to float32 rounding, about 1e-6.

It runs where :func:`applies`: float32 channels-last input on the CPU, channel counts a
multiple of the kernel's vector width, no autograd to record, and the kernel built
(:mod:`unclip.native`); elsewhere callers run the eager ops.
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
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.group_norm_silu.argtypes = [p, p, i, ctypes.c_long, i, i, p, p, p, p, ctypes.c_float, i]
    lib.group_norm_silu.restype = i
    lib.group_norm_silu_lanes.restype = i
    return lib


def applies(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether :func:`group_norm_silu` can run on ``x`` [N, C, H, W] with these parameters
    (weight, bias, scale, shift; any may be None): see the module docstring."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 4:
        return False
    lib = _kernels()
    if lib is None or x.shape[1] % lib.group_norm_silu_lanes() != 0:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def _per_channel(t: torch.Tensor | None, n: int, c: int) -> torch.Tensor | None:
    """[C] or [N, C, 1, 1] (or None) -> a contiguous float32 tensor the kernel reads."""
    if t is None:
        return None
    t = t.detach().float()
    return (t.reshape(c) if t.numel() == c else t.expand(n, c, 1, 1).reshape(n, c)).contiguous()


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
    layout. weight, bias: [C] or None; scale, shift: [N, C, 1, 1] or None. No autograd; the
    caller checks :func:`applies`."""
    lib = _kernels()
    assert lib is not None, "group_norm_silu called where the kernel is not loaded"
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    y = torch.empty_like(x, memory_format=torch.channels_last)
    args = [_per_channel(t, n, c) for t in (weight, bias, scale, shift)]
    ptrs = [None if t is None else t.data_ptr() for t in args]
    failed = lib.group_norm_silu(
        x.data_ptr(), y.data_ptr(), n, h * w, c, groups, *ptrs, float(eps), int(silu)
    )
    if failed:
        raise MemoryError("group_norm_silu: no memory for its statistics")
    return y
