"""Winograd F(4×4, 3×3) convolution for float32 on the CPU, weights fixed (sampling).

Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks": a 4×4 output tile
of a 3×3 convolution is ``Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` for the 6×6 input patch d around it,
with interpolation points 0, ±1, ±2, ∞. Summed over input channels, the element-wise product
becomes 36 matrix products ``M[ξ] = V[ξ] · U[ξ]`` (V [T, C] the transformed input tiles,
U [C, K] the transformed kernels, ξ = 6i + j), which is 36 multiply-adds per tile and channel
pair where the direct convolution does 144: 4× fewer. The transforms Bᵀ·B and Aᵀ·A run in the
compiled kernels of ``unclip/native/winograd.c`` (threads shared with torch), the products in
``torch.bmm``. Against oneDNN's direct float32 convolution on AVX2 this takes 0.4–0.8× the time
at the decoder's layer sizes (``benchmarks/winograd_conv.py``).

Float32 results differ from the direct convolution's by rounding, about 1e-5 of the output's
scale (the transforms' coefficients are small integers and 1/4, 1/6, 1/12, 1/24).

A 2×2 kernel with padding 1 (the phase convolution of :mod:`unclip.decoder.upsample_conv`)
is the 3×3 kernel with a zero last row and column, output one row and column larger:
:func:`conv_output_size` and ``out_size`` cover it.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

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
#: map of a few images) the 36 products read more kernel than they compute, and the direct
#: convolution is faster (measured on AVX2, docs/benchmarks.md).
MAX_KERNEL_ELEMENTS_PER_TILE = 2048


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    lib = native.load("winograd")
    if lib is None:
        return None
    ptr, i = ctypes.c_void_p, ctypes.c_int
    lib.winograd_input.argtypes = [ptr, ptr, i, i, i, i, i, i]
    lib.winograd_output.argtypes = [ptr, ptr, ptr, i, i, i, i]
    lib.winograd_lanes.restype = i
    return lib


def available() -> bool:
    """Whether the compiled transforms could be built and loaded here (:mod:`unclip.native`)."""
    return _kernels() is not None


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """weight [K, C, 3, 3] or [K, C, 2, 2] -> U [36, C, K] float32, U[6a+b, c, k] =
    (G w[k, c] Gᵀ)[a, b] (computed in float64). A 2×2 kernel is padded to 3×3 at the
    bottom and right."""
    w = weight.detach().double()
    if w.shape[-2:] == (2, 2):
        w = F.pad(w, (0, 1, 0, 1))
    g = torch.tensor(_G, dtype=torch.float64, device=w.device)
    u = torch.einsum("ai,kcij,bj->abck", g, w, g)
    return u.reshape(36, w.shape[1], w.shape[0]).float().contiguous()


def conv_output_size(h: int, w: int, kernel: int) -> tuple[int, int]:
    """Output size of a padding-1 convolution of an h×w input by a 3×3 or 2×2 kernel."""
    return (h, w) if kernel == 3 else (h + 1, w + 1)


def applies(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`winograd_conv` can run ``conv`` on ``x`` (and the phase convolution of
    ``conv.upsampled``, whose channel counts are the same multiples): float32 channels-last
    x on the CPU, a 3×3 kernel with stride 1, padding 1, no dilation or groups, channel
    counts that are multiples of the kernels' vector width, and the compiled kernels
    loaded."""
    lib = _kernels()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 4:
        return False
    lanes = lib.winograd_lanes()
    n, c, h, w = x.shape
    tiles = n * ((h + 3) // 4) * ((w + 3) // 4)
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.in_channels % lanes == 0
        and conv.out_channels % lanes == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and c * conv.out_channels <= MAX_KERNEL_ELEMENTS_PER_TILE * tiles
    )


def winograd_conv(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """x [N, C, H, W] float32 channels-last, u [36, C, K] from :func:`kernel_transform`,
    bias [K] or None -> [N, K, Ho, Wo] channels-last, the padding-1 convolution (out_size
    (Ho, Wo), default (H, W)). No autograd; the caller checks :func:`applies`."""
    lib = _kernels()
    assert lib is not None, "winograd_conv called where the compiled kernels are not loaded"
    n, c, h, w = x.shape
    k = u.shape[2]
    ho, wo = out_size or (h, w)
    tiles = n * ((ho + 3) // 4) * ((wo + 3) // 4)
    v = torch.empty(36, tiles, c)
    lib.winograd_input(x.data_ptr(), v.data_ptr(), n, h, w, c, ho, wo)
    m = torch.bmm(v, u)  # [36, T, K]
    y = torch.empty(n, k, ho, wo, memory_format=torch.channels_last)
    b = None if bias is None else bias.detach().float().contiguous()
    lib.winograd_output(m.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                        n, ho, wo, k)  # fmt: skip
    return y
