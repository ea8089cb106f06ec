"""3×3 convolutions by Winograd's minimal filtering, F(4×4, 3×3) (Lavin & Gray 2016, "Fast
Algorithms for Convolutional Neural Networks"), for float32 on the CPU.

A 3×3 convolution with stride 1 gives each 4×4 block of outputs from the 6×6 input tile
around it as ``Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` (g the 3×3 filter, d the tile). Over all tiles
and channels the elementwise product ``⊙`` becomes 36 matrix products ``[T, C] @ [C, C']``
(T tiles of 4×4 outputs): 36 multiplications per 4×4 outputs and channel pair instead of the
direct convolution's 144, 4× fewer. The transforms ``Bᵀ d B`` and ``Aᵀ m A`` are sums with
small integer weights, done here as whole-tensor additions on strided views (one pass per
row of the transform, each axis in turn), so they cost memory traffic, not FLOPs.

Where it runs (:func:`winograd_applies`): CPU tensors computed in float32 (not under a
lower-precision autocast; bf16 loses too much in the transforms), the convolution 3×3 with
stride 1, padding 1, no dilation or groups, and large enough that the 4× fewer FLOPs pay for
the transforms (:data:`MIN_CHANNELS`, :data:`MIN_MACS`). Elsewhere (GPUs, bf16, small
layers) the convolution is ``F.conv2d``. :data:`ENABLED` switches it off for comparisons.

Numerics: outputs equal the direct convolution's to float32 rounding amplified by the
transforms (about 1e-5 relative; tested), well inside the bf16 rounding of the default
sampling precision. Autograd: :class:`WinogradConv3x3` gives the input gradient as the
Winograd convolution of the output gradient with the flipped, transposed filter, and the
filter gradient from the saved input transform and the output gradient's transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

#: Winograd convolutions are used at all (set to False to compare against ``F.conv2d``).
ENABLED = True
#: the smaller of a layer's input and output channel counts must be at least this...
MIN_CHANNELS = 48
#: ...and the direct convolution at least this many multiply-adds (N·H·W·C·C'·9): below
#: it the transforms' fixed cost (about 50 tensor operations) outweighs the saving
MIN_MACS = 30_000_000
#: tiles (4×4 outputs) transformed and multiplied at a time: a batch is cut into chunks of
#: whole images of about this many tiles, whose transformed tensors stay in cache
TILE_BLOCK = 256

# G: the filter transform of F(4×4, 3×3), interpolation points 0, ±1, ±2 and ∞.
_G = (
    (1 / 4, 0.0, 0.0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0.0, 0.0, 1.0),
)


def winograd_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`winograd_conv3x3` computes ``conv(x)``; see the module docstring."""
    if not (
        ENABLED
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.ndim == 4
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not torch.is_autocast_enabled("cpu")
    ):
        return False
    n, c, h, w = x.shape
    co = conv.out_channels
    return min(c, co) >= MIN_CHANNELS and n * h * w * c * co * 9 >= MIN_MACS


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C', C, 3, 3] -> U [36, C, C'], U[6a+b] = (G g Gᵀ)[a, b] per channel pair (computed in
    float64, returned in ``weight``'s dtype). Differentiable."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,ockl,bl->abco", g, weight.double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _weight_grad(du: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`winograd_weight`: dU [36, C, C'] -> dg [C', C, 3, 3]."""
    g = torch.tensor(_G, dtype=torch.float64, device=du.device)
    c, co = du.shape[1:]
    dg = torch.einsum("ak,abco,bl->ockl", g, du.double().view(6, 6, c, co), g)
    return dg.to(du.dtype)


def _coefficients(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a [k, 1, …, 1] tensor that broadcasts against ``like``'s dims."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * like.ndim)


def _input_rows(d: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """out[a] = Σ_u Bᵀ[a, u]·d[u]: d [6, …] (the six taps, any strides), out [6, …], scratch
    [2, …]; rows 1–2 and 3–4 share their terms."""
    t1 = torch.add(d[4], d[2], alpha=-4, out=scratch[0])  # d4 - 4 d2
    t2 = torch.add(d[3], d[1], alpha=-4, out=scratch[1])  # d3 - 4 d1
    torch.sub(t1, d[2], out=out[0]).add_(d[0], alpha=4)  # 4 d0 - 5 d2 + d4
    torch.add(d[5], d[3], alpha=-4, out=out[5]).sub_(t2)  # 4 d1 - 5 d3 + d5
    torch.add(t1, t2, out=out[1])  # -4 d1 - 4 d2 + d3 + d4
    torch.sub(t1, t2, out=out[2])  # 4 d1 - 4 d2 - d3 + d4
    t3 = torch.sub(d[4], d[2], out=scratch[0])
    t4 = torch.sub(d[3], d[1], out=scratch[1])
    torch.add(t3, t4, alpha=2, out=out[3])  # -2 d1 - d2 + 2 d3 + d4
    torch.add(t3, t4, alpha=-2, out=out[4])  # 2 d1 - d2 - 2 d3 + d4


def _output_rows(m: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """out[p] = Σ_a Aᵀ[p, a]·m[a]: m [6, …], out [4, …], scratch [4, …]."""
    s12 = torch.add(m[1], m[2], out=scratch[0])
    d12 = torch.sub(m[1], m[2], out=scratch[1])
    s34 = torch.add(m[3], m[4], out=scratch[2])
    d34 = torch.sub(m[3], m[4], out=scratch[3])
    torch.add(s12, s34, out=out[0]).add_(m[0])  # m0 + m1 + m2 + m3 + m4
    torch.add(d12, d34, alpha=2, out=out[1])  # m1 - m2 + 2 m3 - 2 m4
    torch.add(s12, s34, alpha=4, out=out[2])  # m1 + m2 + 4 m3 + 4 m4
    torch.add(d12, d34, alpha=8, out=out[3]).add_(m[5])  # m1 - m2 + 8 m3 - 8 m4 + m5


def _output_rows_adjoint(y: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """out[a] = Σ_p Aᵀ[p, a]·y[p] (the transpose of :func:`_output_rows`): y [4, …], out
    [6, …], scratch [2, 2, …]."""
    c14 = _coefficients((1.0, 4.0), y[0])
    torch.addcmul(y[0], c14, y[2], out=scratch[0])  # (y0 + y2, y0 + 4 y2)
    torch.addcmul(y[1], c14, y[3], out=scratch[1])  # (y1 + y3, y1 + 4 y3)
    pm = _coefficients((1.0, -1.0), y[0])
    torch.addcmul(scratch[0, 0], pm, scratch[1, 0], out=out[1:3])  # (1, ±1, 1, ±1)
    torch.addcmul(scratch[0, 1], pm * 2, scratch[1, 1], out=out[3:5])  # (1, ±2, 4, ±8)
    out[0].copy_(y[0])
    out[5].copy_(y[3])


def _taps(t: torch.Tensor, dim: int, tiles: int) -> torch.Tensor:
    """The six overlapping taps of ``tiles`` tiles along ``dim`` (stride 4) as one view with a
    new leading dim: [6, …, tiles (at dim), …], [u, …, i, …] = t[…, 4i + u, …]."""
    size, stride = list(t.shape), list(t.stride())
    step = stride[dim]
    size[dim], stride[dim] = tiles, 4 * step
    return t.as_strided([6, *size], [step, *stride], t.storage_offset())


def _tiles(h: int, w: int) -> tuple[int, int]:
    return (h + 3) // 4, (w + 3) // 4


class _Plan:
    """The buffers and views of one convolution shape, x [N, C, H, W] -> [N, C', H, W], laid
    in one flat ``arena`` (:meth:`size` elements): three regions reused from stage to stage
    (A: padded input, then V, then the half-transformed output; B: the half-transformed input,
    then M, then scratch; C: scratch), so the working set stays small and, with one arena
    shared by all shapes (:class:`Workspace`), warm in the CPU's cache."""

    def __init__(self, n: int, c: int, h: int, w: int, co: int, arena: torch.Tensor) -> None:
        th, tw = _tiles(h, w)
        hp, wp, t = 4 * th + 2, 4 * tw + 2, n * th * tw
        self.shape, self.tiles, self.arena = (n, co, h, w), (th, tw), arena
        a, b, _ = self.regions(n, c, h, w, co)

        def view(offset: int, *size: int) -> torch.Tensor:
            return arena[offset : offset + math.prod(size)].view(size)

        xp = view(0, n, hp, wp, c)  # the input with a zero border of at least 1
        self.interior = xp[:, 1 : h + 1, 1 : w + 1]  # [N, H, W, C]
        self.border = (xp[:, :1], xp[:, h + 1 :], xp[:, :, :1], xp[:, :, w + 1 :])
        rows = view(a, 6, n, th, wp, c)  # the H axis transformed
        self.rows = (_taps(xp, 1, th), rows, view(xp.numel(), 2, n, th, wp, c))
        v = view(0, 6, 6, n, th, tw, c)  # then the W axis
        self.cols = (_taps(rows, 3, tw), v.transpose(0, 1), view(a + b, 2, 6, n, th, tw, c))
        self.v = v.view(36, t, c)
        self.m = view(a, 36, t, co)
        m6 = self.m.view(6, 6, n, th, tw, co)
        self.bias_slot = m6[1, 1]  # Aᵀ e₁ = (1, 1, 1, 1): reaches all 16 outputs of a tile
        out_cols = view(0, 6, n, th, tw, 4, co)  # [a, …, q, C']: the W axis back
        self.out_cols = (m6.movedim(1, 0), out_cols.movedim(4, 0), view(a + b, 4, 6, n, th, tw, co))
        self.out_rows = (out_cols, view(a, 4, n, th, tw, 4, co))

    @staticmethod
    def regions(n: int, c: int, h: int, w: int, co: int) -> tuple[int, int, int]:
        """The sizes (elements) of regions A, B and C."""
        th, tw = _tiles(h, w)
        hp, wp, t = 4 * th + 2, 4 * tw + 2, n * th * tw
        a = max(n * hp * wp * c + 2 * n * th * wp * c, 36 * t * c, 24 * t * co)
        b = max(6 * n * th * wp * c, 36 * t * co, 16 * t * co)
        return a, b, max(12 * t * c, 24 * t * co)

    def input_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> V [36, T, C] (a view of the arena)."""
        for edge in self.border:
            edge.zero_()
        self.interior.copy_(x.permute(0, 2, 3, 1))
        _input_rows(*self.rows)
        _input_rows(*self.cols)
        return self.v

    def __call__(
        self, x: torch.Tensor, u: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """y [N, C', 4⌈H/4⌉, 4⌈W/4⌉] (channels-last, written) = the convolution of x by U."""
        torch.bmm(self.input_transform(x), u, out=self.m)
        if bias is not None:
            self.bias_slot.add_(bias)
        _output_rows(*self.out_cols)
        n, co, _, _ = self.shape
        th, tw = self.tiles
        rows = y.permute(0, 2, 3, 1).view(n, th, 4, tw, 4, co).movedim(2, 0)
        _output_rows(self.out_rows[0], rows, self.out_rows[1])


def _plan(n: int, c: int, h: int, w: int, co: int, dtype: torch.dtype) -> _Plan:
    """A plan in its own new arena."""
    return _Plan(n, c, h, w, co, torch.empty(sum(_Plan.regions(n, c, h, w, co)), dtype=dtype))


class Workspace:
    """The plans of the shapes seen so far, all in one arena that grows to the largest (for
    sampling, where the same shapes recur at every step). Not thread-safe: one per thread."""

    def __init__(self) -> None:
        self.arena = torch.empty(0)
        self.plans: dict[tuple[object, ...], _Plan] = {}

    def plan(self, n: int, c: int, h: int, w: int, co: int, dtype: torch.dtype) -> _Plan:
        key = (n, c, h, w, co, dtype)
        plan = self.plans.get(key)
        if plan is None or plan.arena is not self.arena:
            size = sum(_Plan.regions(n, c, h, w, co))
            if self.arena.numel() < size or self.arena.dtype != dtype:
                self.arena = torch.empty(size, dtype=dtype)
            plan = self.plans[key] = _Plan(n, c, h, w, co, self.arena)
        return plan


def output_transform_adjoint(dy: torch.Tensor) -> torch.Tensor:
    """The transpose of the output transform (without bias): dy [N, C', H, W] -> dM
    [36, T, C'], T = N·⌈H/4⌉·⌈W/4⌉."""
    n, co, h, w = dy.shape
    th, tw = _tiles(h, w)
    dyt = dy.new_zeros(n, th, 4, tw, 4, co)  # [N, tiles, p, tiles, q, C']
    dyt.view(n, 4 * th, 4 * tw, co)[:, :h, :w] = dy.permute(0, 2, 3, 1)
    cols = dy.new_empty(6, n, th, tw, 4, co)  # [a, …, q, C']
    _output_rows_adjoint(dyt.movedim(2, 0), cols, dy.new_empty(2, 2, n, th, tw, 4, co))
    dm = dy.new_empty(6, 6, n, th, tw, co)
    scratch = dy.new_empty(2, 2, 6, n, th, tw, co)
    _output_rows_adjoint(cols.movedim(4, 0), dm.transpose(0, 1), scratch)
    return dm.view(36, n * th * tw, co)


def _image_chunks(n: int, h: int, w: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the batch with about :data:`TILE_BLOCK` tiles each (at least one
    image), so that each chunk's transformed tensors stay in the CPU's cache."""
    th, tw = _tiles(h, w)
    step = max(1, TILE_BLOCK // (th * tw))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def winograd_conv3x3(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, g, bias, padding=1)`` for x [N, C, H, W] and U = winograd_weight(g)
    [36, C, C'] -> [N, C', H, W], channels-last. No autograd (see :class:`WinogradConv3x3`).
    ``workspace`` keeps the buffers for the next call."""
    n, c, h, w = x.shape
    co = u.shape[2]
    th, tw = _tiles(h, w)
    y = torch.empty(n, co, 4 * th, 4 * tw, dtype=x.dtype, memory_format=torch.channels_last)
    for i, j in _image_chunks(n, h, w):
        if workspace is None:
            plan = _plan(j - i, c, h, w, co, x.dtype)
        else:
            plan = workspace.plan(j - i, c, h, w, co, x.dtype)
        plan(x[i:j], u, y[i:j], bias)
    if (4 * th, 4 * tw) != (h, w):  # the tiles' outputs past the edge
        y = y[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return y


class WinogradConv3x3(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(4×4, 3×3), with its gradients.
    The output has ``x``'s memory format (channels-last or contiguous)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = winograd_conv3x3(x, winograd_weight(weight), bias)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # the gradient of a padding-1 3×3 conv is one too
            dx = winograd_conv3x3(dy, winograd_weight(weight.flip(2, 3).transpose(0, 1)))
            if not x.is_contiguous(memory_format=torch.channels_last):
                dx = dx.contiguous()
        if ctx.needs_input_grad[1]:  # dU = Σ over tiles of Vᵀ dM
            n, c, h, w = x.shape
            du = x.new_zeros(36, c, weight.shape[0])
            for i, j in _image_chunks(n, h, w):
                v = _plan(j - i, c, h, w, 1, x.dtype).input_transform(x[i:j])
                du.baddbmm_(v.transpose(1, 2), output_transform_adjoint(dy[i:j]))
            dw = _weight_grad(du)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db
