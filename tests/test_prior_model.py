"""The diffusion prior network: shapes, causal and padding masks, null condition, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unclip.config import ConfigError
from unclip.hub import from_pretrained, save_pretrained
from unclip.prior import (
    DiffusionPriorTransformer,
    PriorConfig,
    scale_embedding,
    unscale_embedding,
)

D, TEXT_DIM, TEXT_LEN = 16, 12, 8


def tiny(**kw) -> PriorConfig:
    base = dict(clip_dim=D, text_dim=TEXT_DIM, text_len=TEXT_LEN, width=32, layers=2, heads=4)
    base.update(kw)
    return PriorConfig(**base)


def make(seed: int = 0, **kw) -> DiffusionPriorTransformer:
    torch.manual_seed(seed)
    return DiffusionPriorTransformer(tiny(**kw)).eval()


def hidden_states(model, x, t, zt, *caption):
    """Every token's final hidden state, [N, L + 4, W], no row dropped."""
    drop = torch.zeros(x.shape[0], dtype=torch.bool)
    return model.transformer(*model.embed(x, t, zt, drop, *caption))


def inputs(n: int = 3, length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    zt = torch.randn(n, D, generator=g)
    tokens = torch.randn(n, length, TEXT_DIM, generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 2:] = False
    return x, t, zt, tokens, mask


@pytest.mark.parametrize(
    "kw,use_tokens",
    [({}, True), ({}, False), ({"text_dim": 0}, False), ({"layers": 1, "heads": 1}, True)],
)
def test_shapes(kw, use_tokens):
    model = make(**kw)
    x, t, zt, tokens, mask = inputs()
    args = (tokens, mask) if use_tokens else ()
    assert model(x, t, zt, *args).shape == (3, D)
    length = {True: 6, False: 1 if model.config.text_dim else 0}[use_tokens]
    assert hidden_states(model, x, t, zt, *args).shape == (3, length + 4, 32)
    assert model(x, t[0], zt, *args).shape == (3, D)  # a scalar timestep is broadcast


@pytest.mark.parametrize(
    "kw,use_tokens", [({}, True), ({}, False), ({"text_dim": 0}, False), ({"layers": 3}, True)]
)
def test_caption_cache_gives_the_full_sequences_outputs(kw, use_tokens):
    model = make(**kw)
    x, t, zt, tokens, mask = inputs(n=4)
    text = {"text_tokens": tokens, "text_mask": mask} if use_tokens else {}
    drop = torch.tensor([False, True, False, True])
    cache = model.caption_cache(zt, **text, drop_text=drop)
    length = {True: 6, False: 1 if model.config.text_dim else 0}[use_tokens]
    assert cache["caption_kv"].shape == (4, model.config.layers, 2, length, 32)
    assert cache["caption_mask"].shape == (4, length)
    full = model(x, t, zt, **text, drop_text=drop)
    for step_t in (t, t.flip(0), t[0]):  # one cache serves every step
        assert torch.allclose(
            model(x, step_t, zt, drop_text=drop, **cache),
            model(x, step_t, zt, **text, drop_text=drop),
            atol=1e-5,
        )
    assert torch.allclose(model(x, t, zt, drop_text=drop, **cache), full, atol=1e-5)
    undropped = model.caption_cache(zt, **text)  # other drop rows: a different condition
    if model.config.text_dim:
        assert not torch.allclose(model(x, t, zt, **undropped), full, atol=1e-3)


def test_sampling_conditions_guide_as_the_full_caption_does():
    from unclip.diffusion import classifier_free_guidance

    model = make(seed=3)
    x, t, zt, tokens, mask = inputs()
    cond, uncond = model.sampling_conditions(zt, tokens, mask)
    assert set(cond) == {"text_emb", "drop_text", "caption_kv", "caption_mask"}
    assert not cond["drop_text"].any() and uncond["drop_text"].all()
    full = {"text_emb": zt, "text_tokens": tokens, "text_mask": mask}
    ones = torch.ones(3, dtype=torch.bool)
    ref = classifier_free_guidance(model, 3.0, {**full, "drop_text": ~ones},
                                   {**full, "drop_text": ones})  # fmt: skip
    cached = classifier_free_guidance(model, 3.0, cond, uncond)
    assert torch.allclose(cached(x, t), ref(x, t), atol=1e-5)
    no_text, _ = make(text_dim=0).sampling_conditions(zt)
    assert set(no_text) == {"text_emb", "drop_text"}


def test_caption_cache_misuse_raises():
    model = make()
    x, t, zt, tokens, mask = inputs()
    cache = model.caption_cache(zt, tokens, mask)
    with pytest.raises(ValueError, match="not both"):
        model(x, t, zt, tokens, mask, **cache)
    with pytest.raises(ValueError, match=r"caption_kv must be \[N, layers"):
        model(x[:2], t[:2], zt[:2], caption_kv=cache["caption_kv"], caption_mask=None)
    with pytest.raises(ValueError, match="eval"):
        model.train()(x, t, zt, **cache)


def test_bad_inputs_raise():
    model = make()
    x, t, zt, tokens, _ = inputs()
    with pytest.raises(ValueError):
        model(x[:, :5], t, zt)
    with pytest.raises(ValueError):
        model(x, t, zt, torch.randn(3, TEXT_LEN + 1, TEXT_DIM))
    with pytest.raises(ValueError):
        make(text_dim=0)(x, t, zt, tokens)


def test_config_round_trip_and_checks():
    cfg = tiny(image_embed_scale=2.5)
    assert PriorConfig.from_json(cfg.to_json()) == cfg
    assert cfg.embed_scale == 2.5 and tiny().embed_scale == pytest.approx(math.sqrt(D))
    with pytest.raises(ConfigError):
        PriorConfig.from_dict({"width": 30, "heads": 4})
    with pytest.raises(ConfigError):
        PriorConfig.from_dict({"text_drop_prob": 1.5})


def test_scale_and_unscale_embedding():
    z = torch.randn(5, D)
    s = scale_embedding(z, math.sqrt(D))
    assert torch.allclose(s.norm(dim=-1), torch.full((5,), math.sqrt(D)))
    assert s.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)  # unit variance per coordinate
    back = unscale_embedding(s * 1.3, math.sqrt(D))
    assert torch.allclose(back, torch.nn.functional.normalize(z, dim=-1), atol=1e-6)
    raw = unscale_embedding(s, math.sqrt(D), normalize=False)
    assert torch.allclose(raw.norm(dim=-1), torch.ones(5), atol=1e-6)


def test_causal_mask_on_hidden_states():
    model = make()
    x, t, zt, tokens, mask = inputs()
    h, key_mask = model.embed(x, t, zt, torch.zeros(3, dtype=torch.bool), tokens, mask)
    base = model.transformer(h, key_mask)
    seq = h.shape[1]
    for j in range(seq):
        h2 = h.clone()
        h2[:, j] += torch.randn(h.shape[0], h.shape[2])
        out = model.transformer(h2, key_mask)
        assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6), f"position {j} leaked backwards"
        assert not torch.allclose(out[:, j:], base[:, j:], atol=1e-4)
    # the same through the public inputs: the noised z_i (position L + 2) cannot affect the
    # caption tokens, z_t or the timestep token, but does reach the final query token
    full = hidden_states(model, x, t, zt, tokens, mask)
    moved = hidden_states(model, x + 1.0, t, zt, tokens, mask)
    length = tokens.shape[1]
    assert torch.allclose(moved[:, : length + 2], full[:, : length + 2], atol=1e-6)
    assert (moved[:, -1] - full[:, -1]).abs().amax(-1).min() > 1e-4
    # the timestep (position L + 1) never reaches the caption or z_t tokens
    later = hidden_states(model, x, (t + 17) % 1000, zt, tokens, mask)
    assert torch.allclose(later[:, : length + 1], full[:, : length + 1], atol=1e-6)


def test_padding_tokens_change_nothing():
    model = make()
    x, t, zt, tokens, mask = inputs()
    base = model(x, t, zt, tokens, mask)
    noisy = tokens.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 10
    assert torch.allclose(model(x, t, zt, noisy, mask), base, atol=1e-5)
    # a caption padded further gives the same result as the short one
    longer = torch.cat([tokens, torch.randn(3, 2, TEXT_DIM)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    assert torch.allclose(model(x, t, zt, longer, longer_mask), base, atol=1e-5)
    # while a real token does matter
    real = tokens.clone()
    real[:, 0] += 3.0
    assert (model(x, t, zt, real, mask) - base).abs().amax(-1).min() > 1e-4


def test_forced_drop_ignores_the_condition():
    model = make()
    x, t, zt, tokens, mask = inputs()
    drop = torch.ones(3, dtype=torch.bool)
    a = model(x, t, zt, tokens, mask, drop_text=drop)
    b = model(x, t, torch.randn(3, D), torch.randn(3, 5, TEXT_DIM), None, drop_text=drop)
    c = model(x, t, torch.randn(3, D), None, None, drop_text=drop)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    cond = model(x, t, zt, tokens, mask)
    assert (a - cond).abs().amax(-1).min() > 1e-4  # the null condition is a different condition
    # rows are independent: dropping row 1 changes only row 1
    part = model(x, t, zt, tokens, mask, drop_text=torch.tensor([False, True, False]))
    assert torch.allclose(part[[0, 2]], cond[[0, 2]], atol=1e-5)
    assert torch.allclose(part[1], a[1], atol=1e-5)


def test_training_drop_probability_uses_the_null_condition():
    model = make(text_drop_prob=1.0)
    x, t, zt, tokens, mask = inputs()
    forced = model(x, t, zt, tokens, mask, drop_text=torch.ones(3, dtype=torch.bool))
    model.train()  # dropout is 0, so train mode differs only by the random drop (always here)
    assert torch.allclose(model(x, t, zt, tokens, mask), forced, atol=1e-5)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = make(seed=3)
    x, t, zt, tokens, mask = inputs()
    save_pretrained(model, tmp_path / "prior")
    doc = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert doc["type"] == "diffusion_prior"
    loaded = from_pretrained(tmp_path / "prior")
    assert isinstance(loaded, DiffusionPriorTransformer) and loaded.config == model.config
    assert torch.equal(loaded(x, t, zt, tokens, mask), model(x, t, zt, tokens, mask))


def test_optimisation_reduces_loss_and_reaches_every_parameter():
    model = make(seed=4, text_drop_prob=0.0)
    model.train()
    x, t, zt, tokens, mask = inputs(n=4, length=5)
    target = torch.randn(4, D)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = (model(x, t, zt, tokens, mask) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    nulls = {id(p) for p in model.null_parameters()}
    for name, p in model.named_parameters():
        if id(p) in nulls:
            assert p.grad is None or torch.all(p.grad == 0), name
        elif name.startswith("pos_emb"):  # rows past the caption length are unused
            used = torch.cat([p.grad[:5], p.grad[TEXT_LEN:]])
            assert torch.all(used.abs().sum(-1) > 0), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # when the caption is dropped, the null parameters are what gets trained
    opt.zero_grad()
    model(x, t, zt, tokens, mask, drop_text=torch.ones(4, dtype=torch.bool)).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.null_parameters())
    assert model.text_proj.weight.grad is None or torch.all(model.text_proj.weight.grad == 0)


def test_checkpointing_gives_the_same_gradients():
    x, t, zt, tokens, mask = inputs()
    grads = []
    for flag in (False, True):
        model = make(seed=5, use_checkpoint=flag, text_drop_prob=0.0).train()
        model(x, t, zt, tokens, mask).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_bf16_autocast_forward():
    model = make(seed=6)
    x, t, zt, tokens, mask = inputs()
    ref = model(x, t, zt, tokens, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, zt, tokens, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).norm() < 0.1 * ref.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the pipeline samples with a cache
        cache = model.caption_cache(zt, tokens, mask)
        cached = model(x, t, zt, **cache)
    assert cache["caption_kv"].dtype == torch.bfloat16
    assert (cached.float() - ref).norm() < 0.1 * ref.norm()
