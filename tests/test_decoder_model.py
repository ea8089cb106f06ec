"""The decoder and upsampler UNets: shapes, null conditions, inpainting widening, save/load,
gradient flow, bf16 autocast and the low-res conditioning augmentation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from unclip.config import ConfigError
from unclip.decoder import (
    UNet,
    UNetConfig,
    Upsampler,
    UpsamplerConfig,
    augment_low_res,
    bsr_degrade,
    gaussian_blur,
    make_low_res,
    widen_to_inpainting,
)
from unclip.decoder.blocks import AttentionBlock, ResBlock
from unclip.decoder.upsampler import gaussian_kernel1d
from unclip.hub import HubError, from_pretrained, load_weights_into, save_pretrained
from unclip.nn import Attention

CLIP_DIM, TEXT_DIM = 12, 10


def tiny(**kw) -> UNetConfig:
    base = dict(
        image_size=16,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=8,
        clip_dim=CLIP_DIM,
        text_dim=TEXT_DIM,
    )
    base.update(kw)
    return UNetConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers (output convs, attention projections) random weights,
    so an untrained model's output depends on every input (it is all zeros otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make(seed: int = 0, cls=UNet, config=None, **kw):
    torch.manual_seed(seed)
    return randomize(cls(config if config is not None else tiny(**kw)), seed).eval()


def inputs(n: int = 2, size: int = 16, length: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    z = F.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1)
    tokens = torch.randn(n, length, TEXT_DIM, generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, dict(image_emb=z, text_tokens=tokens, text_mask=mask)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every row of a and b differs."""
    return bool((a - b).flatten(1).abs().amax(-1).min() > 1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"learn_sigma": True},
        {"resblock_updown": False, "use_scale_shift_norm": False},
        {"resblock_updown": False, "conv_resample": False, "attention_resolutions": ()},
        {"channel_mult": (1, 1, 2), "num_res_blocks": 2, "num_head_channels": 0, "num_heads": 2},
        {"clip_dim": 0, "text_dim": 0, "attention_mid": False},
        {"text_dim": 0, "clip_tokens": 0},
        {"inpaint": True},
    ],
)
def test_shapes(kw):
    model = make(**kw)
    cfg = model.config
    x, t, cond = inputs()
    cond = {
        k: v
        for k, v in cond.items()
        if (k == "image_emb" and cfg.clip_dim) or (k.startswith("text") and cfg.text_dim)
    }
    out = model(x, t, **cond)
    assert out.shape == (2, cfg.output_channels, 16, 16)
    assert torch.isfinite(out).all()
    # non-square inputs, a scalar timestep, and no condition at all
    assert model(torch.randn(2, 3, 8, 12), t[0]).shape == (2, cfg.output_channels, 8, 12)


def test_learn_sigma_doubles_the_output_channels():
    assert tiny(learn_sigma=True).output_channels == 6 and tiny().output_channels == 3
    x, t, cond = inputs()
    assert make(learn_sigma=True)(x, t, **cond).shape == (2, 6, 16, 16)
    assert make(learn_sigma=False)(x, t, **cond).shape == (2, 3, 16, 16)


def test_input_checks():
    model = make()
    x, t, cond = inputs()
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 15, 16), t)
    with pytest.raises(ValueError):
        model(x, t, low_res=x)
    with pytest.raises(ValueError):
        model(x, t, inpaint_image=x)
    with pytest.raises(ValueError):
        make(clip_dim=0)(x, t, image_emb=cond["image_emb"])
    with pytest.raises(ValueError):
        make(text_dim=0)(x, t, text_tokens=cond["text_tokens"])
    with pytest.raises(ConfigError):
        UNetConfig.from_dict({"model_channels": 24, "num_head_channels": 32})
    with pytest.raises(ConfigError):
        UNetConfig.from_dict({"text_drop_prob": -0.1})


def test_every_condition_changes_the_output():
    model = make()
    x, t, cond = inputs()
    base = model(x, t, **cond)
    z2 = F.normalize(torch.randn(2, CLIP_DIM), dim=-1)
    assert differs(model(x, t, **{**cond, "image_emb": z2}), base)
    tokens2 = cond["text_tokens"].clone()
    tokens2[:, 0] += 3.0
    assert differs(model(x, t, **{**cond, "text_tokens": tokens2}), base)
    assert differs(model(x, (t + 100) % 1000, **cond), base)


def test_padding_tokens_change_nothing():
    model = make()
    x, t, cond = inputs()
    base = model(x, t, **cond)
    tokens = cond["text_tokens"].clone()
    tokens[0, 3:] = torch.randn(2, TEXT_DIM) * 10
    assert torch.allclose(model(x, t, **{**cond, "text_tokens": tokens}), base, atol=1e-5)


def test_forced_drops_ignore_the_condition():
    model = make()
    x, t, cond = inputs()
    both = torch.ones(2, dtype=torch.bool)
    z2 = F.normalize(torch.randn(2, CLIP_DIM), dim=-1)

    a = model(x, t, **cond, drop_image_emb=both)
    assert torch.allclose(
        a, model(x, t, **{**cond, "image_emb": z2}, drop_image_emb=both), atol=1e-5
    )
    assert torch.allclose(a, model(x, t, **{**cond, "image_emb": None}), atol=1e-5)
    assert differs(a, model(x, t, **cond))

    b = model(x, t, **cond, drop_text=both)
    other = dict(
        image_emb=cond["image_emb"], text_tokens=torch.randn(2, 7, TEXT_DIM), text_mask=None
    )
    assert torch.allclose(b, model(x, t, **other, drop_text=both), atol=1e-5)
    assert torch.allclose(b, model(x, t, image_emb=cond["image_emb"]), atol=1e-5)
    assert differs(b, model(x, t, **cond))

    # fully unconditional rows in a mixed batch (how classifier-free guidance batches them)
    row = torch.tensor([False, True])
    mixed = model(x, t, **cond, drop_image_emb=row, drop_text=row)
    uncond = model(x, t)
    full = model(x, t, **cond)
    assert torch.allclose(mixed[1], uncond[1], atol=1e-5)
    assert torch.allclose(mixed[0], full[0], atol=1e-5)


def test_training_drop_probabilities_use_the_null_conditions():
    model = make(image_emb_drop_prob=1.0, text_drop_prob=1.0)
    x, t, cond = inputs()
    uncond = model(x, t)
    model.train()  # dropout is 0: train mode differs only by the random (here certain) drops
    assert torch.allclose(model(x, t, **cond), uncond, atol=1e-5)


def test_widen_to_inpainting_starts_from_the_same_function():
    model = make(seed=2)
    x, t, cond = inputs()
    wide = widen_to_inpainting(model)
    assert wide.config.inpaint and wide.config.input_channels == 7
    assert not wide.training
    assert wide.input_conv.weight.shape[1] == 7
    image = torch.randn_like(x)
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    base = model(x, t, **cond)
    assert torch.allclose(
        wide(x, t, **cond, inpaint_image=image, inpaint_mask=mask), base, atol=1e-6
    )
    # the new inputs are wired in: once their weights move, they change the output
    with torch.no_grad():
        wide.input_conv.weight[:, 3:].normal_()
    assert differs(wide(x, t, **cond, inpaint_image=image, inpaint_mask=mask), base)
    # unknown pixels do not leak: only image * mask reaches the network
    other = torch.where(mask.bool(), image, torch.randn_like(image))
    assert torch.allclose(
        wide(x, t, **cond, inpaint_image=other, inpaint_mask=mask),
        wide(x, t, **cond, inpaint_image=image, inpaint_mask=mask),
        atol=1e-6,
    )
    with pytest.raises(ValueError):
        widen_to_inpainting(wide)


def test_a_deeper_middle_grown_from_a_trained_decoder_starts_as_the_same_function():
    small = make(seed=3)
    deep = UNet(tiny(mid_depth=3)).eval()
    added = load_weights_into(deep, small.state_dict(), "small", grow=True)
    assert added and all(k.startswith(("mid.3.", "mid.4.", "mid.5.", "mid.6.")) for k in added)
    x, t, kw = inputs()
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, **kw), small(x, t, **kw))
        randomize(deep, seed=5)  # only the added layers' zero weights change
        assert differs(deep(x, t, **kw), small(x, t, **kw))
    with pytest.raises(HubError, match="unexpected"):  # growing never drops trained weights
        load_weights_into(UNet(tiny()), deep.state_dict(), "deep", grow=True)
    with pytest.raises(HubError, match="missing"):  # and without grow, nothing may be new
        load_weights_into(deep, small.state_dict(), "small")
    with pytest.raises(ConfigError, match="mid_depth"):
        tiny(mid_depth=0)


@pytest.mark.parametrize("kind", ["decoder", "upsampler"])
def test_save_and_load_give_identical_outputs(tmp_path, kind):
    x, t, cond = inputs()
    if kind == "decoder":
        model, kwargs, type_name = make(seed=3), cond, "decoder_unet"
    else:
        cfg = UpsamplerConfig(
            image_size=16, low_res_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1
        )
        model, kwargs, type_name = (
            make(seed=3, cls=Upsampler, config=cfg),
            {"low_res": x[..., ::2, ::2]},
            "upsampler_unet",
        )
    save_pretrained(model, tmp_path / kind)
    assert json.loads((tmp_path / kind / "config.json").read_text())["type"] == type_name
    loaded = from_pretrained(tmp_path / kind)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.equal(loaded(x, t, **kwargs), model(x, t, **kwargs))


def test_optimisation_reduces_loss_and_reaches_every_parameter():
    torch.manual_seed(4)
    model = UNet(tiny(image_emb_drop_prob=0.0, text_drop_prob=0.0, dropout=0.1)).train()
    x, t, cond = inputs(n=2, size=8)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (model(x, t, **cond) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    # the zero-initialised output layers have moved, so gradients now reach every layer
    nulls = {id(p) for p in model.null_parameters()}
    assert len(nulls) == 2
    for name, p in model.named_parameters():
        if id(p) in nulls:
            assert p.grad is None or torch.all(p.grad == 0), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.zero_grad()
    both = torch.ones(2, dtype=torch.bool)
    model(x, t, **cond, drop_image_emb=both, drop_text=both).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.null_parameters())


def test_checkpointing_gives_the_same_gradients():
    x, t, cond = inputs(size=8)
    grads = []
    for flag in (False, True):
        model = make(seed=5, use_checkpoint=flag, image_emb_drop_prob=0.0, text_drop_prob=0.0)
        model.train()
        model(x, t, **cond).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5) for k in grads[0])


def test_bf16_autocast_and_channels_last():
    model = make(seed=6)
    x, t, cond = inputs()
    ref = model(x, t, **cond)
    model = model.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    assert torch.allclose(model(xc, t, **cond), ref, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xc, t, **cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).norm() < 0.1 * ref.norm()
    # the [N, E] embedding path stays in float32 under autocast, with float32 values
    model.eval()
    emb_ref = model.condition(x.shape[0], t, cond["image_emb"])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.condition(x.shape[0], t, cond["image_emb"])[0]
    assert emb.dtype == torch.float32 and torch.equal(emb, emb_ref)


def test_block_embeddings_and_frozen_weights():
    """Inside ``frozen_weights`` the ResBlock embedding projections are one matmul with
    weights stacked once, giving each block's own numbers and the same outputs (to float32
    rounding, and Winograd's); a
    weight change after the context shows at the next call (nothing stale is kept)."""
    model = make(seed=7)
    x, t, cond = inputs()
    emb = torch.randn(2, model.config.time_embed_dim)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    with torch.no_grad(), model.frozen_weights():
        stacked = model.block_embeddings(emb)  # one matmul with the stacked weights
    assert len(stacked) == len(blocks) > 2
    for block, e in zip(blocks, stacked, strict=True):  # module order is execution order
        torch.testing.assert_close(e, block.project(emb), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref = model(x, t, **cond)
        with model.frozen_weights() as same:
            assert same is model and model._stacked_emb_proj is not None
            inner = model._stacked_emb_proj
            with model.frozen_weights():  # nested: the outer tensors are kept
                assert model._stacked_emb_proj is inner
            # float32 convolutions may run as Winograd inside (unclip.decoder.winograd), whose
            # rounding is about 1e-5 of the output's scale
            torch.testing.assert_close(model(x, t, **cond), ref, atol=1e-4, rtol=1e-4)
        assert model._stacked_emb_proj is None
        blocks[0].emb_proj.weight.add_(0.5)
        with model.frozen_weights():
            changed = model(x, t, **cond)
        torch.testing.assert_close(model(x, t, **cond), changed, atol=1e-4, rtol=1e-4)
    assert differs(changed, ref)


def test_a_sampling_run_makes_the_step_free_conditioning_once(monkeypatch):
    """Inside ``frozen_weights`` (eval, no autograd) the conditioning that does not depend on
    the timestep (z_i/z_t projections, context tokens, each attention block's context keys
    and values) is made once while the same tensors come back; new or changed conditioning
    tensors are seen at the next call; outputs equal those of plain calls."""
    model = make(seed=3)
    x, t, cond = inputs()
    made = {"caption": 0, "context_kv": 0}
    caption, kv = model._caption, Attention.context_keys_values

    def counted_caption(*a, **k):
        made["caption"] += 1
        return caption(*a, **k)

    def counted_kv(self, context):
        made["context_kv"] += 1
        return kv(self, context)

    monkeypatch.setattr(model, "_caption", counted_caption)
    monkeypatch.setattr(Attention, "context_keys_values", counted_kv)
    blocks = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert blocks >= 2
    with torch.no_grad():
        want = [model(x, t - k, **cond) for k in range(3)]
        other = dict(cond, text_tokens=cond["text_tokens"].flip(0))
        want_other = model(x, t, **other)
        made.update(caption=0, context_kv=0)
        with model.frozen_weights():
            got = [model(x, t - k, **cond) for k in range(3)]  # three steps of one run
            assert made == {"caption": 1, "context_kv": blocks}
            got_other = model(x, t, **other)  # other tensors: made again
            assert made == {"caption": 2, "context_kv": 2 * blocks}
            other["image_emb"].mul_(-1.0)  # changed in place: made again
            got_changed = model(x, t, **other)
            assert made == {"caption": 3, "context_kv": 3 * blocks}
        want_changed = model(x, t, **other)
    for a, b in zip([*got, got_other, got_changed], [*want, want_other, want_changed], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert differs(got_changed, got_other)


def test_upsampler_config_and_conditioning():
    cfg = UpsamplerConfig(
        image_size=16, low_res_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1
    )
    assert cfg.type_name == "upsampler_unet" and cfg.input_channels == 6
    assert UpsamplerConfig.from_json(cfg.to_json()) == cfg
    model = make(seed=7, cls=Upsampler, config=cfg)
    # paper defaults: no attention, no caption, no CLIP embedding
    assert not any("attn" in name for name, _ in model.named_parameters())
    assert model.null_parameters() == []
    x, t, _ = inputs()
    low = torch.randn(2, 3, 8, 8)
    out = model(x, t, low_res=low)
    assert out.shape == (2, 3, 16, 16)
    assert differs(model(x, t, low_res=low + 0.5), out)
    with pytest.raises(ValueError):
        model(x, t)
    with pytest.raises(ConfigError):
        UpsamplerConfig.from_dict({"low_res_cond": False})
    with pytest.raises(TypeError):
        Upsampler(tiny())


def test_gaussian_blur():
    kernel = gaussian_kernel1d(3, 0.6)
    assert kernel.sum().item() == pytest.approx(1.0) and kernel[0] == kernel[2] < kernel[1]
    x = torch.rand(2, 3, 8, 8)
    y = gaussian_blur(x)  # the paper's kernel 3, sigma 0.6
    assert y.shape == x.shape
    k2 = torch.outer(kernel, kernel)
    interior = (x[0, 1, 2:5, 3:6] * k2).sum()
    assert y[0, 1, 3, 4].item() == pytest.approx(interior.item(), abs=1e-5)
    const = torch.full((1, 3, 6, 6), 0.3)
    assert torch.allclose(gaussian_blur(const, 5, 1.2), const, atol=1e-6)
    assert y.var() < x.var()  # smoothing removes variance
    sig = torch.tensor([0.6, 1.5])
    per = gaussian_blur(x, 5, sig)
    assert torch.allclose(per[0], gaussian_blur(x[:1], 5, 0.6)[0], atol=1e-6)
    assert torch.allclose(per[1], gaussian_blur(x[1:], 5, 1.5)[0], atol=1e-6)


def test_bsr_degrade_and_make_low_res():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    a = bsr_degrade(x, torch.Generator().manual_seed(0))
    b = bsr_degrade(x, torch.Generator().manual_seed(0))
    c = bsr_degrade(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and not torch.allclose(a, x, atol=1e-3)

    cfg = UpsamplerConfig(image_size=16, low_res_size=8)
    low = make_low_res(x, cfg)
    assert low.shape == (3, 3, 8, 8)
    plain = make_low_res(x, cfg.replace(augment="none"))
    assert torch.allclose(low, gaussian_blur(plain, 3, 0.6), atol=1e-6)
    assert torch.equal(augment_low_res(plain, cfg.replace(augment="none")), plain)
    crop = make_low_res(
        x[..., :8, :8], cfg.replace(augment="bsr"), torch.Generator().manual_seed(0)
    )
    assert crop.shape == (3, 3, 4, 4)  # quarter-size crops get a quarter-size condition


def test_threads_sampling_one_model_at_once_each_get_their_own_results():
    """Two threads in frozen_weights at once (a server's workers), with other conditioning:
    each gets what it gets alone; the context is undone only when the last one leaves."""
    import threading

    model = make(seed=5)
    x, t, cond = inputs()
    other = dict(cond, image_emb=-cond["image_emb"], text_tokens=cond["text_tokens"].flip(0))
    with torch.no_grad(), model.frozen_weights():
        want = [[model(x, t - k, **c) for k in range(4)] for c in (cond, other)]
    got: list[list[torch.Tensor]] = [[], []]
    start = threading.Barrier(2)

    def run(i: int, c: dict) -> None:
        with torch.no_grad(), model.frozen_weights():
            start.wait()
            for k in range(4):
                got[i].append(model(x, t - k, **c))
            start.wait()  # both still inside: neither has undone the other's context

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate((cond, other))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert model._frozen_users == 0 and model._stacked_emb_proj is None
    for a, b in zip(got, want, strict=True):
        assert len(a) == 4
        for g, w in zip(a, b, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert differs(want[0][0], want[1][0])


def test_the_frozen_context_lasts_until_its_last_user_leaves():
    """Contexts left in another order than entered (two threads' runs overlapping): the
    first to leave does not undo the context the other still runs in."""
    from unclip.decoder.packed_conv import packed_forward_count

    model = make(seed=5)
    first, second = model.frozen_weights(), model.frozen_weights()
    first.__enter__()
    packed = packed_forward_count(model)
    assert packed > 0
    second.__enter__()
    first.__exit__(None, None, None)
    assert packed_forward_count(model) == packed and model._stacked_emb_proj is not None
    second.__exit__(None, None, None)
    assert packed_forward_count(model) == 0 and model._stacked_emb_proj is None
