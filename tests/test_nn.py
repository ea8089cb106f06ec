"""Shared layers: timestep embedding, masked attention, float32 group norm, condition dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unclip.nn import (
    Attention,
    GroupNorm32,
    TimestepEmbedder,
    apply_null,
    attention,
    attention_mask,
    condition_drop_mask,
    maybe_checkpoint,
    normalization,
    timestep_embedding,
    zero_module,
)


def naive_attention(q, k, v, heads, allowed):
    """Reference: softmax(q k^T / sqrt(d)) v per head with an explicit [N, Lq, Lk] bool mask."""
    n, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    q = q.reshape(n, lq, heads, d).permute(0, 2, 1, 3)
    k = k.reshape(n, lk, heads, d).permute(0, 2, 1, 3)
    v = v.reshape(n, lk, heads, d).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [N, H, Lq, Lk]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = scores.softmax(-1) @ v  # [N, H, Lq, d]
    return out.permute(0, 2, 1, 3).reshape(n, lq, c)


def test_timestep_embedding_values_and_shape():
    t = torch.tensor([0, 1, 250, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb[0, :8], torch.ones(8)) and torch.allclose(emb[0, 8:], torch.zeros(8))
    k = 3
    freq = math.exp(-math.log(10000.0) * k / 8)
    assert emb[2, k].item() == pytest.approx(math.cos(250 * freq), abs=1e-5)
    assert emb[2, 8 + k].item() == pytest.approx(math.sin(250 * freq), abs=1e-5)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)
    assert torch.allclose(odd[:, :6], timestep_embedding(t, 6))
    # every pair of distinct timesteps gets a distinct embedding
    assert torch.cdist(emb, emb).add(torch.eye(4)).min() > 1e-3
    with pytest.raises(ValueError):
        timestep_embedding(t[None], 16)


def test_timestep_embedder_shape():
    emb = TimestepEmbedder(8, 12)(torch.tensor([1, 2, 3]))
    assert emb.shape == (3, 12)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference_with_padding(causal):
    g = torch.Generator().manual_seed(0)
    n, length, c, heads = 2, 6, 8, 2
    q, k, v = (torch.randn(n, length, c, generator=g) for _ in range(3))
    key_mask = torch.ones(n, length, dtype=torch.bool)
    key_mask[0, 4:] = False
    key_mask[1, 1] = False
    out = attention(q, k, v, heads, key_mask=key_mask, causal=causal)
    allowed = key_mask[:, None, :].expand(n, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    # a query whose keys are all masked falls back to what the causal rule allows
    empty = ~allowed.any(-1, keepdim=True)
    rule = torch.ones(length, length, dtype=torch.bool)
    rule = rule.tril() if causal else rule
    allowed = torch.where(empty, rule[None], allowed)
    ref = naive_attention(q, k, v, heads, allowed)
    assert torch.allclose(out, ref, atol=1e-5)


def test_attention_causal_without_mask_uses_lower_triangle():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    ref = naive_attention(
        q, k, v, 4, torch.ones(5, 5, dtype=torch.bool).tril()[None].expand(2, 5, 5)
    )
    assert torch.allclose(attention(q, k, v, 4, causal=True), ref, atol=1e-5)


def test_attention_mask_fully_masked_rows_stay_finite():
    key_mask = torch.zeros(1, 4, dtype=torch.bool)
    key_mask[0, 3] = True
    mask = attention_mask(1, 4, 4, key_mask=key_mask, causal=True)
    assert mask.shape == (1, 1, 4, 4)
    # query 0 sees only masked keys, so it falls back to the causal rule (itself)
    assert mask[0, 0, 0].tolist() == [True, False, False, False]
    assert mask[0, 0, 3].tolist() == [False, False, False, True]
    q = torch.randn(1, 4, 8)
    assert torch.isfinite(attention(q, q, q, 2, key_mask=key_mask, causal=True)).all()
    assert attention_mask(2, 3, 3) is None
    with pytest.raises(ValueError):
        attention_mask(1, 4, 3, causal=True)


def test_attention_module_context_prefix_is_visible_and_masked():
    torch.manual_seed(0)
    layer = Attention(16, 4, context_dim=6).eval()
    x = torch.randn(2, 5, 16)
    ctx = torch.randn(2, 3, 6)
    cmask = torch.tensor([[True, True, False], [True, True, True]])
    mask = torch.cat([cmask, torch.ones(2, 5, dtype=torch.bool)], dim=1)  # [N, Lc + L]

    def run(x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return layer(x, mask=mask, causal=True, past=layer.context_keys_values(ctx))

    out = run(x, ctx)
    assert out.shape == (2, 5, 16)
    # a masked context token changes nothing; an unmasked one changes every query (a prefix)
    ctx2 = ctx.clone()
    ctx2[0, 2] += 5.0
    assert torch.allclose(run(x, ctx2), out, atol=1e-6)
    ctx3 = ctx.clone()
    ctx3[0, 0] += 5.0
    diff = (run(x, ctx3) - out)[0].abs().amax(-1)
    assert torch.all(diff > 1e-4)
    # causality over the sequence itself still holds with a context prefix
    x2 = x.clone()
    x2[:, 3] += 5.0
    out2 = run(x2, ctx)
    assert torch.allclose(out2[:, :3], out[:, :3], atol=1e-6)
    assert not torch.allclose(out2[:, 3:], out[:, 3:], atol=1e-4)
    with pytest.raises(ValueError, match="without context_dim"):
        Attention(16, 4).context_keys_values(ctx)


def random_group_norm() -> GroupNorm32:
    """GroupNorm32(4 groups, 16 channels) with seeded random weight and bias."""
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def test_group_norm32_computes_in_float32():
    norm = random_group_norm()
    x = (torch.randn(2, 16, 4, 4) * 50 + 100).to(memory_format=torch.channels_last)
    ref = norm(x)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.05)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16
    assert normalization(48).num_groups == 16 and normalization(64).num_groups == 32


def test_group_norm32_bf16_fast_path_gives_the_float32_numbers():
    """Contiguous bf16 input skips the float32 copies; outputs and gradients are unchanged."""
    norm = random_group_norm()
    x = (torch.randn(2, 16, 8, 8) * 3 + 1).bfloat16()
    grad = torch.randn(2, 16, 8, 8).bfloat16()
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):  # fast path, float32 path
        xi = x.clone(memory_format=fmt).requires_grad_()
        norm.zero_grad()
        y = norm(xi)
        y.backward(grad.contiguous(memory_format=fmt))
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
        outs.append((y.float(), xi.grad.float(), norm.weight.grad.clone()))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    # the same float32 statistics, summed by two kernels in their own order: the bf16 outputs
    # agree up to a rounding step (2^-7 relative) where a float32 value sits on a bf16 boundary
    torch.testing.assert_close(y0, y1, rtol=2**-7, atol=1e-6)
    assert float((y0 == y1).float().mean()) > 0.99
    torch.testing.assert_close(gx0, gx1, atol=0.02, rtol=0.02)
    torch.testing.assert_close(gw0, gw1, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_group_norm32_channels_last_bf16_kernels_give_the_float32_numbers(size):
    """Channels-last bf16 input without autograd takes ATen's bf16 kernels (its own from
    32×32, the NCHW one below): the float32 path's numbers, in channels-last; scale-shift
    modulation is ``norm(x) * (1 + scale) + shift``."""
    norm = random_group_norm()
    x = (torch.randn(2, 16, size, size) * 3 + 1).bfloat16().to(memory_format=torch.channels_last)
    ref = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    with torch.no_grad():
        y = norm(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref.bfloat16().float(), atol=0.02, rtol=0.01)
    scale, shift = torch.randn(2, 16, 1, 1), torch.randn(2, 16, 1, 1)
    with torch.no_grad():
        m = norm.modulate(x, scale, shift)
    assert m.dtype == torch.bfloat16 and m.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m.float(), ref * (1 + scale) + shift, atol=0.05, rtol=0.02)
    m32 = norm.modulate(x.float(), scale, shift)  # float32: the same formula, to rounding
    torch.testing.assert_close(m32, ref * (1 + scale) + shift, atol=1e-5, rtol=1e-5)


def test_zero_module():
    layer = zero_module(torch.nn.Linear(4, 3))
    assert all(torch.all(p == 0) for p in layer.parameters())


def test_condition_drop_mask():
    force = torch.tensor([True, False, False, True])
    assert condition_drop_mask(4, 0.5, force, training=False).tolist() == force.tolist()
    assert condition_drop_mask(4, 0.0, force, training=True).tolist() == force.tolist()
    assert condition_drop_mask(4, 1.0, None, training=True).all()
    assert not condition_drop_mask(4, 1.0, None, training=False).any()
    torch.manual_seed(0)
    frac = condition_drop_mask(2000, 0.3, None, training=True).float().mean().item()
    assert 0.25 < frac < 0.35
    with pytest.raises(ValueError):
        condition_drop_mask(3, 0.0, force, training=False)


def test_apply_null_replaces_only_dropped_rows():
    cond = torch.randn(3, 2, 4)
    null = torch.randn(2, 4)
    out = apply_null(cond, null, torch.tensor([False, True, False]))
    assert (
        torch.equal(out[1], null) and torch.equal(out[0], cond[0]) and torch.equal(out[2], cond[2])
    )


def test_maybe_checkpoint_same_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 4)
    grads = []
    for enabled in (False, True):
        layer.zero_grad()
        maybe_checkpoint(layer, x, enabled=enabled).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))
