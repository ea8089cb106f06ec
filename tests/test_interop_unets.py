"""diffusers' unCLIP UNets (Karlo layout) converted to unclip's decoder and upsamplers compute
the same numbers (float32, 1e-4), and convert back to the same diffusers weights.

Tiny random diffusers modules from our own small configs: no hub."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unclip.config import ConfigError
from unclip.decoder import UNet, UNetConfig, Upsampler
from unclip.interop.diffusers_unets import (
    decoder_from_diffusers,
    decoder_to_diffusers,
    upsampler_from_diffusers,
    upsampler_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

ATOL = 1e-4
D, K, CROSS = 10, 2, 12  # CLIP width, extra context tokens, cross-attention width
NULL_LEN = 2  # the empty caption's real tokens (start, end)

DECODER = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 6,
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": [8, 16, 24],
    "layers_per_block": 1,
    "cross_attention_dim": CROSS,
    "attention_head_dim": 4,
    "resnet_time_scale_shift": "scale_shift",
    "class_embed_type": "identity",
    "norm_num_groups": 4,
}
TEXT_PROJ = {
    "clip_extra_context_tokens": K,
    "clip_embeddings_dim": D,
    "time_embed_dim": 32,
    "cross_attention_dim": CROSS,
}
SUPER_RES = {  # Karlo's: residual resampling, no attention, additive time embedding
    "sample_size": 16,
    "layers_per_block": 1,
    "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"],
    "up_block_types": ["ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
    "block_out_channels": [8, 16],
    "in_channels": 6,
    "out_channels": 3,
    "add_attention": False,
    "norm_num_groups": 4,
}
SUPER_RES_VARIANTS = {
    "karlo": {},
    "mid-attention": {"add_attention": True, "attention_head_dim": 8},  # diffusers' unCLIP tests
    "attn-blocks-scale-shift": {
        "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "add_attention": True,
        "attn_norm_num_groups": 4,
        "attention_head_dim": None,
        "resnet_time_scale_shift": "scale_shift",
        "out_channels": 6,
    },
    "conv-resampling": {
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "add_attention": True,
        "attention_head_dim": 4,
    },
}


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (diffusers starts some at zero, e.g. the null embedding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _decoder_pair(seed: int = 0):
    torch.manual_seed(seed)
    unet = _randomize(UNet2DConditionModel(**DECODER), seed)
    text_proj = _randomize(UnCLIPTextProjModel(**TEXT_PROJ), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    null = (torch.randn(NULL_LEN, D, generator=g), torch.randn(D, generator=g))
    model = decoder_from_diffusers(
        unet.state_dict(), dict(unet.config), text_proj.state_dict(), dict(text_proj.config),
        null_caption=null,
    )  # fmt: skip
    return unet, text_proj, null, model


@torch.no_grad()
def test_decoder_matches_diffusers_with_guidance_rows():
    """The decoder loop of diffusers' UnCLIPPipeline: text_proj with classifier-free
    guidance (the null image embedding and the empty caption first), then the UNet."""
    unet, text_proj, (null_tokens, null_zt), model = _decoder_pair()
    assert isinstance(model, UNet) and not model.training
    g = torch.Generator().manual_seed(5)
    n, length = 2, 6
    z_i, z_t = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    tokens = torch.randn(n, length, D, generator=g)
    mask = torch.arange(length)[None] < torch.tensor([[4], [6]])  # [n, L], padded captions
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.tensor([7, 731])

    # diffusers: uncond rows = the empty caption (its real tokens, then padding) and z_t("")
    junk = torch.randn(n, length - NULL_LEN, D, generator=g)
    un_tokens = torch.cat([null_tokens.expand(n, -1, -1), junk], dim=1)
    un_mask = torch.arange(length)[None].expand(n, -1) < NULL_LEN
    hidden, additive = text_proj(
        image_embeddings=z_i,
        prompt_embeds=torch.cat([null_zt.expand(n, -1), z_t]),
        text_encoder_hidden_states=torch.cat([un_tokens, tokens]),
        do_classifier_free_guidance=True,
    )
    decoder_mask = F.pad(torch.cat([un_mask, mask]), (K, 0), value=True)
    want = unet(
        torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=hidden,
        class_labels=additive, attention_mask=decoder_mask,
    ).sample  # fmt: skip

    # unclip: the same rows, the unconditional ones dropped to the model's own nulls
    drop = torch.tensor([True, True, False, False])
    got = model(
        torch.cat([x, x]), torch.cat([t, t]), image_emb=torch.cat([z_i, z_i]),
        text_tokens=torch.cat([tokens, tokens]), text_mask=torch.cat([mask, mask]),
        text_emb=torch.cat([z_t, z_t]), drop_image_emb=drop, drop_text=drop,
    )  # fmt: skip
    assert got.shape == want.shape == (2 * n, 6, 16, 16)
    assert want.abs().max() > 0.1  # a real signal, not a zero-initialised network
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    # the null caption given explicitly equals the dropped caption; no caption at all too
    explicit = model(
        x, t, image_emb=z_i, text_tokens=un_tokens, text_mask=un_mask,
        text_emb=null_zt.expand(n, -1), drop_image_emb=torch.ones(n, dtype=torch.bool),
    )  # fmt: skip
    torch.testing.assert_close(explicit, want[:n], atol=ATOL, rtol=0)
    no_caption = model(x, t, drop_image_emb=torch.ones(n, dtype=torch.bool))
    torch.testing.assert_close(no_caption, want[:n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", list(SUPER_RES_VARIANTS))
@torch.no_grad()
def test_super_res_matches_diffusers(variant):
    """super_res_first / super_res_last on [noisy image, antialiased bicubic upscale]."""
    config = {**SUPER_RES, **SUPER_RES_VARIANTS[variant]}
    torch.manual_seed(0)
    first = _randomize(UNet2DModel(**config), 1)
    last = _randomize(UNet2DModel(**{**config, "sample_size": None}), 2)
    up_first, up_last = upsampler_from_diffusers(
        first.state_dict(), dict(first.config), last.state_dict(), dict(last.config),
        low_res_size=8,
    )  # fmt: skip
    assert isinstance(up_first, Upsampler) and up_last.config.image_size == 16
    g = torch.Generator().manual_seed(3)
    low = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([999, 0])
    upscaled = F.interpolate(
        low, size=[16, 16], mode="bicubic", align_corners=False, antialias=True
    )
    for theirs, ours in ((first, up_first), (last, up_last)):
        want = theirs(torch.cat([x, upscaled], dim=1), t).sample
        got = ours(x, t, low_res=low)
        assert got.shape == want.shape == (2, config["out_channels"], 16, 16)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(up_first(x, t, low_res=low), up_last(x, t, low_res=low))


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


@torch.no_grad()
def test_decoder_round_trip():
    unet, text_proj, null, model = _decoder_pair(seed=3)
    out = decoder_to_diffusers(model)
    (unet_cfg, unet_state), (tp_cfg, tp_state) = out["decoder"], out["text_proj"]
    _assert_same_state(unet_state, unet.state_dict())
    _assert_same_state(tp_state, text_proj.state_dict())
    # diffusers builds the same modules from the written configs, and loads them strictly
    rebuilt = UNet2DConditionModel.from_config(unet_cfg)
    rebuilt.load_state_dict(unet_state, strict=True)
    UnCLIPTextProjModel.from_config(tp_cfg).load_state_dict(tp_state, strict=True)
    again = decoder_from_diffusers(unet_state, unet_cfg, tp_state, tp_cfg, null_caption=null)
    assert again.config == model.config
    _assert_same_state(again.state_dict(), model.state_dict())


@pytest.mark.parametrize("variant", ["karlo", "attn-blocks-scale-shift", "conv-resampling"])
@torch.no_grad()
def test_super_res_round_trip(variant):
    config = {**SUPER_RES, **SUPER_RES_VARIANTS[variant]}
    torch.manual_seed(0)
    first, last = (_randomize(UNet2DModel(**config), s) for s in (1, 2))
    ups = upsampler_from_diffusers(
        first.state_dict(), dict(first.config), last.state_dict(), dict(last.config),
        low_res_size=8,
    )  # fmt: skip
    out = upsampler_to_diffusers(*ups)
    for name, theirs in (("super_res_first", first), ("super_res_last", last)):
        cfg, state = out[name]
        _assert_same_state(state, theirs.state_dict())
        UNet2DModel.from_config(cfg).load_state_dict(state, strict=True)
    back = upsampler_from_diffusers(
        *out["super_res_first"][::-1], *out["super_res_last"][::-1], low_res_size=8
    )
    for a, b in zip(back, ups, strict=True):
        assert a.config == b.config
        _assert_same_state(a.state_dict(), b.state_dict())


def test_fp16_weights_load_without_a_float32_copy():
    unet, text_proj, null, _ = _decoder_pair()
    state = {k: v.half() for k, v in unet.state_dict().items()}
    model = decoder_from_diffusers(
        state, dict(unet.config), text_proj.state_dict(), dict(text_proj.config),
        null_caption=null, dtype=torch.float16,
    )  # fmt: skip
    assert {p.dtype for p in model.state_dict().values()} == {torch.float16}
    assert model.input_conv.weight.data_ptr() == state["conv_in.weight"].data_ptr()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {
                "down_block_types": [
                    "ResnetDownsampleBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                ]
            },
            "decoder/config.json: down_block_types 'CrossAttnDownBlock2D' is not supported (supported: ",
        ),
        ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "decoder/config.json: mid_block_type"),
        ({"cross_attention_norm": "group_norm"}, "decoder/config.json: cross_attention_norm"),
        ({"resnet_time_scale_shift": "spatial"}, "decoder/config.json: resnet_time_scale_shift"),
        ({"attention_head_dim": [4, 4, 8]}, "decoder/config.json: attention_head_dim"),
        ({"out_channels": 4}, "decoder/config.json: out_channels"),
        ({"class_embed_type": None}, "decoder/config.json: class_embed_type"),
        ({"norm_num_groups": 0}, "decoder/config.json: norm_num_groups 0 must divide"),
        ({"block_out_channels": [0, 16, 24]}, "decoder/config.json: block_out_channels [0,"),
    ],
)
def test_unsupported_decoder_options_name_the_file_and_field(change, message):
    text_proj = UnCLIPTextProjModel(**TEXT_PROJ)
    null = (torch.zeros(NULL_LEN, D), torch.zeros(D))
    with pytest.raises(ConfigError) as e:
        decoder_from_diffusers(
            {}, {**DECODER, **change}, text_proj.state_dict(), TEXT_PROJ, null_caption=null
        )
    assert str(e.value).startswith(message)


def test_bad_super_res_and_text_proj_name_their_files():
    bad = {**SUPER_RES, "down_block_types": ["DownBlock2D", "ResnetDownsampleBlock2D"]}
    with pytest.raises(ConfigError, match=r"^super_res_last/config.json: down_block_types"):
        upsampler_from_diffusers({}, SUPER_RES, {}, bad, low_res_size=8)
    with pytest.raises(ConfigError, match=r"^super_res_first/config.json: attn_norm_num_groups"):
        scale_shift = {**SUPER_RES, "add_attention": True, "resnet_time_scale_shift": "scale_shift"}
        upsampler_from_diffusers({}, scale_shift, {}, SUPER_RES, low_res_size=8)
    unet = UNet2DConditionModel(**DECODER)
    null = (torch.zeros(NULL_LEN, D), torch.zeros(D))
    with pytest.raises(ConfigError, match=r"^text_proj/config.json: cross_attention_dim"):
        decoder_from_diffusers(
            unet.state_dict(), DECODER, {}, {**TEXT_PROJ, "cross_attention_dim": 8},
            null_caption=null,
        )  # fmt: skip
    state = dict(unet.state_dict())
    del state["conv_in.bias"]
    with pytest.raises(ConfigError, match=r"^decoder/.*conv_in.bias"):
        decoder_from_diffusers(state, DECODER, {}, TEXT_PROJ, null_caption=null)


def test_unclip_native_models_say_what_diffusers_cannot_express():
    from unclip.decoder import UpsamplerConfig

    small = {"image_size": 16, "channel_mult": (1, 2), "num_head_channels": 8}
    native = UNet(UNetConfig(**small, model_channels=16, clip_dim=8, text_dim=8))
    with pytest.raises(ConfigError, match="context_norm 'text'.*null_caption_len > 0"):
        decoder_to_diffusers(native)
    up = Upsampler(UpsamplerConfig(**small, model_channels=8, low_res_size=8))
    with pytest.raises(ConfigError, match="bicubic_antialias.*augment 'none'"):
        upsampler_to_diffusers(up)


@torch.no_grad()
def test_text_emb_with_a_learned_null_is_dropped_with_the_caption():
    """The UNetConfig options off the diffusers path: z_t with a learned null embedding."""
    cfg = UNetConfig(
        image_size=8, model_channels=8, channel_mult=(1, 2), num_head_channels=8, clip_dim=6,
        text_dim=5, text_emb_dim=4, context_dim=12, context_norm="text",
    )  # fmt: skip
    torch.manual_seed(0)
    model = _randomize(UNet(cfg), 0)
    assert any(p is model.null_text_emb for p in model.null_parameters())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 900])
    z, tokens = torch.randn(2, 6, generator=g), torch.randn(2, 7, 5, generator=g)
    zt = torch.randn(2, 4, generator=g)
    cond = model(x, t, image_emb=z, text_tokens=tokens, text_emb=zt)
    assert not torch.allclose(cond, model(x, t, image_emb=z, text_tokens=tokens, text_emb=-zt))
    dropped = model(x, t, image_emb=z, text_tokens=tokens, text_emb=zt, drop_text=[True, True])
    torch.testing.assert_close(dropped, model(x, t, image_emb=z), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="text_emb must be"):
        model(x, t, text_emb=zt[:, :3])


def test_a_caption_shorter_than_the_null_caption_is_refused():
    *_, model = _decoder_pair()
    x, tokens = torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, D)
    with pytest.raises(ValueError, match="shorter than the null caption"):
        model(x, torch.tensor([1]), text_tokens=tokens, drop_text=torch.tensor([True]))
    with pytest.raises(ConfigError, match="null_caption_len > 0 needs a caption"):
        UNetConfig(text_dim=0, null_caption_len=2)
