"""Nearest-neighbour ×2 upsampling followed by a 3×3 convolution, computed at low resolution.

``conv3x3(nearest2x(h))`` (padding 1) sees, at each output pixel, only a 2×2 neighbourhood of
distinct low-resolution pixels, so it equals one 2×2 convolution of ``h`` with four kernels
per output channel, one per output phase (p, q) ∈ {0, 1}², followed by an interleave of the
phases (sub-pixel convolution, Shi et al. 2016, "Real-Time Single Image and Video
Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network"):

    z = conv2d(h, W_phases, padding=1)              # [N, 4·C', H+1, W+1], channels (p, q, o)
    out[n, o, 2i+p, 2j+q] = z[n, (p, q, o), i+p, j+q]

Along each axis the phase-0 taps are (w0, w1+w2) and the phase-1 taps (w0+w1, w2), i.e.
``W_pq = R_p · w · R_qᵀ`` with ``R_0 = [[1,0,0],[0,1,1]]``, ``R_1 = [[1,1,0],[0,0,1]]``. The
convolution does 16 instead of 36 multiply-adds per low-resolution pixel and channel pair
(2.25× fewer, less the one-pixel border of z).

Autograd reaches ``h``, ``weight`` and ``bias``: the phase kernels are a small matrix product
of ``weight``, the convolution is ``F.conv2d``, and the interleave is a strided copy whose
backward is the opposite copy (:class:`_Interleave`; autograd's own backward of the strided
view of z is a slow scatter in channels-last). When the weights are fixed (a sampling run)
:func:`phase_weights` can be computed once and passed to :func:`phase_upsample_conv`, or the
2×2 convolution run by other means (a packed oneDNN convolution) and its output given to
:func:`interleave_phases`. Outputs keep the input's memory format (channels-last in,
channels-last out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

#: the taps of phase p (rows) as sums of the three taps of the 3×3 kernel (columns): R_p
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))
#: output phases (p, q) in the order of z's channel blocks
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _phase_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[16, 9]: M[(p, q, k, l), (a, b)] = R_p[k, a] · R_q[l, b]."""
    r = torch.tensor(_PHASE_TAPS, dtype=dtype, device=device)  # [p, k, a]
    return torch.einsum("pka,qlb->pqklab", r, r).reshape(16, 9)


def phase_weights(
    weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """3×3 kernel -> the four 2×2 phase kernels of :func:`phase_upsample_conv`.

    weight: [C', C, 3, 3], bias: [C'] or None -> (W_phases [4·C', C, 2, 2], whose output
    channel ``(2p + q)·C' + o`` holds ``R_p · weight[o] · R_qᵀ``, in channels-last layout;
    bias [4·C'] or None). Differentiable; computed in ``weight``'s dtype even under autocast
    (the convolution casts the result, as it would have cast ``weight``).
    """
    co, ci = weight.shape[:2]
    m = _phase_matrix(weight.dtype, weight.device)  # not cached: it may be a fake tensor
    with torch.autocast(weight.device.type, enabled=False):
        w = torch.matmul(m, weight.flatten(2).transpose(1, 2))  # [C', (p, q, k, l), C]
    # -> memory [(p, q), C', k, l, C]: W_phases in channels-last (copies runs of 4·C)
    w = w.view(co, 4, 2, 2, ci).transpose(0, 1).reshape(4 * co, 2, 2, ci).permute(0, 3, 1, 2)
    return w, None if bias is None else bias.repeat(4)


def _phase_view(z: torch.Tensor) -> torch.Tensor:
    """z [N, 4·C', H+1, W+1] -> its view [N, C', H, 2, W, 2] at [n, o, i, p, j, q] = z[n,
    (p, q, o), i+p, j+q], in any layout: the index i+p steps H once per i and H plus the
    block of phase p once per p."""
    n, c4, h1, w1 = z.shape
    co = c4 // 4
    sn, sc, sh, sw = z.stride()
    return z.as_strided(
        (n, co, h1 - 1, 2, w1 - 1, 2),
        (sn, sc, sh, sh + 2 * co * sc, sw, sw + co * sc),
    )


def _pixel_view(out: torch.Tensor) -> torch.Tensor:
    """out [N, C', 2H, 2W] -> its view [N, C', H, 2, W, 2] at [n, o, i, p, j, q] = out[n, o,
    2i+p, 2j+q], in any layout."""
    n, co, h2, w2 = out.shape
    sn, sc, sh, sw = out.stride()
    return out.as_strided((n, co, h2 // 2, 2, w2 // 2, 2), (sn, sc, 2 * sh, sh, 2 * sw, sw))


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out so (and not also contiguous), else contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _interleave(z: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """z [N, 4·C', H+1, W+1] -> [N, C', 2H, 2W] in ``fmt`` (module docstring)."""
    n, c4, h1, w1 = z.shape
    co, h, w = c4 // 4, h1 - 1, w1 - 1
    out = torch.empty((n, co, 2 * h, 2 * w), dtype=z.dtype, device=z.device, memory_format=fmt)
    if fmt == torch.channels_last:  # one copy, C' contiguous innermost
        _pixel_view(out).copy_(_phase_view(z))
    else:  # per phase, so that the innermost loop runs along W, not along the 2 phases q
        for k, (p, q) in enumerate(_PHASES):
            out[:, :, p::2, q::2].copy_(z[:, k * co : (k + 1) * co, p : p + h, q : q + w])
    return out


def _deinterleave(g: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """The adjoint of :func:`_interleave`: g [N, C', 2H, 2W] -> [N, 4·C', H+1, W+1] in
    ``fmt``, zero where no output reads z (row H of phase p = 0, row 0 of p = 1; columns
    alike)."""
    n, co, h2, w2 = g.shape
    h, w = h2 // 2, w2 // 2
    z = torch.empty((n, 4 * co, h + 1, w + 1), dtype=g.dtype, device=g.device, memory_format=fmt)
    if fmt == torch.channels_last:
        _phase_view(z).copy_(_pixel_view(g))
    else:
        for k, (p, q) in enumerate(_PHASES):
            z[:, k * co : (k + 1) * co, p : p + h, q : q + w].copy_(g[:, :, p::2, q::2])
    for k, (p, q) in enumerate(_PHASES):
        z[:, k * co : (k + 1) * co, (1 - p) * h].zero_()
        z[:, k * co : (k + 1) * co, :, (1 - q) * w].zero_()
    return z


class _Interleave(torch.autograd.Function):
    """:func:`_interleave` whose backward is :class:`_Deinterleave` (and vice versa, so
    higher derivatives work)."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        ctx.fmt = memory_format(z)
        return _interleave(z, fmt)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Deinterleave.apply(g, ctx.fmt), None


class _Deinterleave(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, g: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        ctx.fmt = memory_format(g)
        return _deinterleave(g, fmt)

    @staticmethod
    def backward(ctx: FunctionCtx, z: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Interleave.apply(z, ctx.fmt), None


def interleave_phases(z: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """z [N, 4·C', H+1, W+1] (the 2×2 phase convolution's output, channels (p, q, o)) ->
    [N, C', 2H, 2W] with out[n, o, 2i+p, 2j+q] = z[n, (p, q, o), i+p, j+q], channels-last
    or NCHW-contiguous. Differentiable."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _Interleave.apply(z, fmt)


def phase_upsample_conv(
    h: torch.Tensor, phase_weight: torch.Tensor, phase_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """h [N, C, H, W], phase kernels from :func:`phase_weights` ([4·C', C, 2, 2], [4·C'] or
    None) -> [N, C', 2H, 2W], ``conv3x3(nearest2x(h))`` in ``h``'s memory format. The
    kernels are used in ``h``'s memory format (copied if in the other one; phase_weights
    gives channels-last)."""
    fmt = memory_format(h)  # a channels-last weight would make oneDNN compute channels-last
    z = F.conv2d(h, phase_weight.contiguous(memory_format=fmt), phase_bias, padding=1)
    return interleave_phases(z, fmt == torch.channels_last)  # z: [N, 4·C', H+1, W+1]


def upsample_conv3x3(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """h [N, C, H, W], weight [C', C, 3, 3], bias [C'] or None -> [N, C', 2H, 2W]:
    ``F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), weight, bias, padding=1)``
    computed at low resolution (module docstring), in ``h``'s memory format."""
    return phase_upsample_conv(h, *phase_weights(weight, bias))
