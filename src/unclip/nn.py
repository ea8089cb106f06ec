"""Layers shared by the diffusion prior and the decoder/upsampler UNets.

Timestep embedding, multi-head attention on :func:`torch.nn.functional.scaled_dot_product_attention`
(key padding masks, causal masks, extra context tokens), float32 group norm, zero init,
classifier-free-guidance condition dropout and optional activation checkpointing.

Of the rest of the package it imports only the compiled group-norm kernel
(:mod:`unclip.group_norm_silu`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unclip import group_norm_silu

M = TypeVar("M", bound=nn.Module)


def normal_parameter(*shape: int, std: float) -> nn.Parameter:
    """A parameter of ``shape`` drawn from N(0, std²). Drawn by ``nn.init.normal_`` into an
    empty tensor, so that a model built on the meta device only to read its shapes does no
    arithmetic on meta tensors (which would import torch's decompositions: seconds)."""
    return nn.Parameter(nn.init.normal_(torch.empty(shape), std=std))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. 2017 §3.5.

    t: [N] (int or float) -> [N, dim] float32, laid out as ``[cos(t·f_0..f_{h-1}),
    sin(t·f_0..f_{h-1})]`` with ``h = dim // 2`` and ``f_k = max_period^(-k/h)`` (the
    guided-diffusion layout); an odd ``dim`` gets a trailing zero column.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor [N], got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # [h]
    args = t.float()[:, None] * freqs[None]  # [N, h]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2h]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [N, dim]
    return emb


class TimestepEmbedder(nn.Module):
    """t: [N] -> [N, out_dim]: sinusoidal features of width ``freq_dim``, then Linear-SiLU-Linear."""

    def __init__(self, freq_dim: int, out_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, self.max_period))


def zero_module(module: M) -> M:
    """Set every parameter of ``module`` to zero and return it (for residual-branch outputs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (bf16/fp16 statistics are too
    coarse), returned in the input's dtype. x: [N, C, ...] -> same shape and memory format.

    bf16 input on the CPU goes to ATen's mixed-precision kernels, which read bf16 beside
    float32 weights and keep float32 statistics and arithmetic (the same numbers as casting to
    float32 first, without the two copies). The kernel is chosen by layout: contiguous input
    uses the bf16 kernel directly; channels-last input of 32×32 or more uses its own bf16
    kernel, smaller channels-last input is normed as NCHW and copied back to channels-last;
    channels-last input with autograd on, and any other dtype or device, takes the float32
    path. Timings per layout: docs/benchmarks.md.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modulate(x)

    def silu(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F.silu(self.modulate(x, scale, shift))``: one compiled kernel for float32
        channels-last input on the CPU without autograd (:mod:`unclip.group_norm_silu`,
        equal to float32 rounding), else the eager ops."""
        _both_or_neither(scale, shift)
        if group_norm_silu.applies(x, self.weight, self.bias, scale, shift):
            return group_norm_silu.group_norm_silu(
                x, self.num_groups, self.weight, self.bias, self.eps, scale, shift
            )
        return F.silu(self.modulate(x, scale, shift))

    def modulate(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``norm(x) * (1 + scale) + shift`` (ADM's scale-shift norm), one ``addcmul`` after
        the norm, in float32 on the float32 path (or the compiled kernel of
        :mod:`unclip.group_norm_silu` without its SiLU, where it applies). x: [N, C, H, W];
        scale, shift: [N, C, 1, 1] (both or neither) -> x's shape, dtype and memory format."""
        _both_or_neither(scale, shift)
        if group_norm_silu.applies(x, self.weight, self.bias, scale, shift):
            return group_norm_silu.group_norm_silu(
                x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, silu=False
            )
        layout = _bf16_group_norm_layout(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if layout == "direct":
                y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            elif layout == "via_nchw":
                y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
                # back to channels-last before the modulation: a broadcast [N, C, 1, 1]
                # addcmul on NCHW bf16 is 2-4× slower than on channels-last
                y = y.contiguous(memory_format=torch.channels_last)
            else:
                w, b = _float32(self.weight), _float32(self.bias)
                y = F.group_norm(x.float(), self.num_groups, w, b, self.eps)
            if scale is not None and shift is not None:
                y = torch.addcmul(shift.to(y.dtype), y, (1 + scale).to(y.dtype))
        return y.to(x.dtype)


def _both_or_neither(scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift come together (ADM's scale-shift norm)")


def _bf16_group_norm_layout(x: torch.Tensor) -> str | None:
    """Which bf16 kernel :class:`GroupNorm32` uses for ``x`` ("direct", "via_nchw"), or None
    for the float32 path (the measurements per layout: docs/benchmarks.md)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return None
    if x.is_contiguous():
        return "direct"
    if x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    return "direct" if x.shape[2] * x.shape[3] >= 1024 else "via_nchw"


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in float32 (no op, not even a dispatched one, when it already is)."""
    return t if t is None or t.dtype == torch.float32 else t.float()


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    """A :class:`GroupNorm32` over ``channels`` with ``gcd(groups, channels)`` groups (so small
    test models with, say, 16 or 48 channels still get a valid group count)."""
    return GroupNorm32(math.gcd(groups, channels), channels)


def attention_mask(
    n: int,
    lq: int,
    lk: int,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The boolean mask (True = may attend) for :func:`attention`, or None when all keys are visible.

    key_mask: [N, Lk] bool, True for real tokens, False for padding.
    causal: query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)`` (bottom-right aligned, so a
    prefix of ``Lk - Lq`` context keys is visible to every query).
    A query whose keys are all masked would produce NaNs; it falls back to the keys the causal
    rule allows (all keys when not causal). Its output is then meaningless but finite and, as
    its own key is masked, never read by another token.
    Returns: [N, 1, Lq, Lk] bool (broadcast over heads).
    """
    if key_mask is None and not causal:
        return None
    if lk < lq and causal:
        raise ValueError(f"a causal mask needs at least as many keys ({lk}) as queries ({lq})")
    if key_mask is not None:
        device = key_mask.device
        if key_mask.shape != (n, lk):
            raise ValueError(f"key_mask must be [N, Lk] = [{n}, {lk}], got {tuple(key_mask.shape)}")
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)  # [Lq, Lk]
    if causal:
        allowed = allowed.tril(lk - lq)
    mask = allowed[None].expand(n, lq, lk)  # [N, Lq, Lk]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, :]
        empty = ~mask.any(dim=-1, keepdim=True)  # [N, Lq, 1]
        mask = torch.where(empty, allowed[None], mask)
    return mask[:, None]  # [N, 1, Lq, Lk]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on packed heads.

    q: [N, Lq, C]; k, v: [N, Lk, C] with ``C`` divisible by ``num_heads``; key_mask: [N, Lk]
    bool (True = real token); ``causal`` as in :func:`attention_mask`. Returns [N, Lq, C].
    """
    n, lq, c = q.shape
    lk = k.shape[1]
    if c % num_heads:
        raise ValueError(f"width {c} is not divisible by num_heads={num_heads}")
    hd = c // num_heads
    q = q.reshape(n, lq, num_heads, hd).transpose(1, 2)  # [N, H, Lq, hd]
    k = k.reshape(n, lk, num_heads, hd).transpose(1, 2)  # [N, H, Lk, hd]
    v = v.reshape(n, lk, num_heads, hd).transpose(1, 2)  # [N, H, Lk, hd]
    if v.dtype != q.dtype:  # e.g. a float32 context under autocast
        k, v = k.to(q.dtype), v.to(q.dtype)
    if key_mask is None and causal and lq == lk:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    else:
        mask = attention_mask(n, lq, lk, key_mask=key_mask, causal=causal, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(n, lq, c)  # [N, Lq, C]


def self_attention(
    layer: nn.Module,
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Multi-head self-attention of x: [N, L, dim] after the keys and values ``past``
    ([N, Lp, dim] each; ``mask``: [N, Lp + L] bool; see :class:`Attention`), through the
    projections of ``layer``: its ``qkv`` (dim -> 3·dim), ``proj`` (dim -> dim), ``num_heads``
    and ``dropout`` (applied in training mode), as an :class:`Attention` has them, or a block
    that keeps them itself. Returns (out [N, L, dim], (keys, values) [N, Lp + L, dim] each:
    what ``past`` takes to continue the sequence)."""
    q, k, v = layer.qkv(x).chunk(3, dim=-1)  # 3 × [N, L, dim]
    if past is not None:
        k = torch.cat([past[0].to(k.dtype), k], dim=1)  # [N, Lp + L, dim]
        v = torch.cat([past[1].to(v.dtype), v], dim=1)
    dropout_p = layer.dropout if layer.training else 0.0
    out = attention(
        q, k, v, layer.num_heads, key_mask=mask, causal=causal, dropout_p=dropout_p
    )  # [N, L, dim]
    return layer.proj(out), (k, v)


class Attention(nn.Module):
    """Multi-head self-attention over ``x``, after optional keys and values of earlier tokens.

    x: [N, L, dim]; mask: [N, Lp + L] bool (True = real token) over the keys of ``past`` and
    of ``x``. Returns [N, L, dim].

    ``past``: (keys, values) [N, Lp, dim] each, prepended to the keys and values of ``x``, so
    every query sees them (a causal ``x`` too: the causal mask is aligned to the last key).
    They are either earlier tokens of the sequence, as :meth:`keys_values` gave them (a
    key/value cache), or context tokens, as :meth:`context_keys_values` gives them: as in
    GLIDE, context tokens (e.g. projected CLIP and caption features) are projected to extra
    keys/values in front of the sequence's own (a layer built with ``context_dim``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.context_kv = nn.Linear(context_dim, 2 * dim, bias=bias) if context_dim else None
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self_attention(self, x, mask=mask, causal=causal, past=past)[0]

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values of ``x`` [N, L, dim] (what ``past`` takes): 2 × [N, L, dim]."""
        _, k, v = self.qkv(x).chunk(3, dim=-1)
        return k, v

    def context_keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of context tokens [N, Lc, context_dim] (what ``past`` takes):
        2 × [N, Lc, dim]."""
        if self.context_kv is None:
            raise ValueError("this attention layer was built without context_dim")
        ck, cv = self.context_kv(context).chunk(2, dim=-1)
        return ck, cv


def condition_drop_mask(
    batch: int,
    prob: float,
    force: torch.Tensor | None = None,
    *,
    training: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which rows get the null condition (classifier-free guidance, DiT ``token_drop`` style).

    In training, each row is dropped with probability ``prob``; ``force`` ([N] bool, or None)
    drops the rows where it is True in any mode (how a sampler batches cond and uncond).
    Returns [N] bool.
    """
    if force is not None:
        force = torch.as_tensor(force, device=device).bool().reshape(-1)
        if force.shape[0] != batch:
            raise ValueError(
                f"a drop mask must have one entry per row ({batch}), got {force.shape[0]}"
            )
        drop = force.to(device)
    else:
        drop = torch.zeros(batch, dtype=torch.bool, device=device)
    if training and prob > 0:
        drop = drop | (torch.rand(batch, device=device) < prob)
    return drop


def apply_null(cond: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Rows of ``cond`` [N, ...] where ``drop`` [N] is True replaced by ``null`` (broadcast to
    ``cond.shape[1:]``). Returns [N, ...] in the promoted dtype."""
    shape = (drop.shape[0],) + (1,) * (cond.ndim - 1)
    return torch.where(drop.reshape(shape), null.to(cond.dtype), cond)


def maybe_checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """``fn(*args)``, recomputed in the backward pass (activation checkpointing) when ``enabled``
    and gradients are being recorded; keyword arguments are not supported (bind them first)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
