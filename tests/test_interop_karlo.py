"""Karlo v1 alpha's real configs (``unclip.interop.karlo_configs``) are what diffusers and
transformers write for the sizes of diffusers' Karlo conversion, and unclip's converters take
them: every stage is mapped, built and given diffusers' weights on the meta device (no
weights, no memory), with diffusers' parameter counts and forward FLOPs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import diffusers_tiny as tiny
from unclip.clip.model import CLIP
from unclip.decoder import UNet, Upsampler
from unclip.decoder.blocks import Conv3x3
from unclip.eval.model_stats import count_parameters, forward_flops
from unclip.interop import karlo_configs as karlo
from unclip.interop.diffusers_clip import clip_from_diffusers_state
from unclip.interop.diffusers_prior import prior_from_diffusers
from unclip.interop.diffusers_unets import (
    decoder_from_diffusers,
    decoder_to_diffusers,
    upsampler_from_diffusers,
    upsampler_to_diffusers,
)
from unclip.pipeline.diffusers_folder import read_configs
from unclip.prior.model import DiffusionPriorTransformer

META = torch.device("meta")
NULL = 2  # the empty caption's tokens: start and end

# The facts of diffusers' Karlo conversion script, as constructor arguments (the configs in
# karlo_configs must be what these write)
DECODER_ARGS = {
    "sample_size": 64, "layers_per_block": 3,
    "down_block_types": ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    "up_block_types": ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "block_out_channels": (320, 640, 960, 1280),
    "in_channels": 3, "out_channels": 6, "cross_attention_dim": 1536,
    "class_embed_type": "identity", "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
}  # fmt: skip
SUPER_RES_ARGS = {
    "sample_size": 256, "layers_per_block": 3,
    "down_block_types": ("ResnetDownsampleBlock2D",) * 4,
    "up_block_types": ("ResnetUpsampleBlock2D",) * 4,
    "block_out_channels": (320, 640, 960, 1280), "in_channels": 6, "out_channels": 3,
    "add_attention": False,
}  # fmt: skip


def _written(obj) -> dict:
    """What ``save_pretrained`` writes for a diffusers model or scheduler."""
    return json.loads(obj.to_json_string())


def _hf_written(config, architecture: str) -> dict:
    """What transformers' ``save_pretrained`` writes for a model of ``config`` (less the
    version stamp)."""
    config.architectures = [architecture]
    doc = config.to_diff_dict()
    doc.pop("transformers_version", None)
    return doc


def test_karlo_configs_are_what_diffusers_and_transformers_write():
    with META:
        assert _written(PriorTransformer()) == karlo.PRIOR
        assert _written(UNet2DConditionModel(**DECODER_ARGS)) == karlo.DECODER
        text_proj = UnCLIPTextProjModel(time_embed_dim=320 * 4, cross_attention_dim=1536)
        assert _written(text_proj) == karlo.TEXT_PROJ
        assert _written(UNet2DModel(**SUPER_RES_ARGS)) == karlo.SUPER_RES
    prior = UnCLIPScheduler(
        variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0,
        num_train_timesteps=1000,
    )  # fmt: skip
    assert _written(prior) == karlo.PRIOR_SCHEDULER
    assert _written(UnCLIPScheduler(variance_type="learned_range")) == karlo.DECODER_SCHEDULER
    assert _written(UnCLIPScheduler(variance_type="fixed_small_log")) == karlo.SUPER_RES_SCHEDULER
    text = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        projection_dim=768, max_position_embeddings=77, vocab_size=49408,
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    assert _hf_written(text, "CLIPTextModelWithProjection") == karlo.TEXT_ENCODER
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    assert _hf_written(vision, "CLIPVisionModelWithProjection") == karlo.IMAGE_ENCODER
    processor = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}
    )
    assert json.loads(processor.to_json_string()) == karlo.FEATURE_EXTRACTOR


def test_karlo_model_indexes_are_what_diffusers_writes(tmp_path):
    """The two pipelines assembled from Karlo's components (meta device; a tiny tokenizer
    stands in for CLIP's, of the same class) write karlo_configs' model_index.json."""
    from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline
    from transformers import CLIPTokenizer

    tiny.write_tokenizer(tmp_path / "tokenizer")
    models = _diffusers_models()
    common = {
        "decoder": models["decoder"], "text_proj": models["text_proj"],
        "super_res_first": models["super_res"], "super_res_last": models["super_res"],
        "text_encoder": models["text_encoder"],
        "tokenizer": CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
        "decoder_scheduler": UnCLIPScheduler.from_config(karlo.DECODER_SCHEDULER),
        "super_res_scheduler": UnCLIPScheduler.from_config(karlo.SUPER_RES_SCHEDULER),
    }  # fmt: skip
    t2i = UnCLIPPipeline(
        prior=models["prior"], prior_scheduler=UnCLIPScheduler.from_config(karlo.PRIOR_SCHEDULER),
        **common,
    )  # fmt: skip
    assert _written(t2i) == karlo.MODEL_INDEX
    var = UnCLIPImageVariationPipeline(
        image_encoder=models["image_encoder"], feature_extractor=CLIPImageProcessor(), **common
    )
    written = _written(var)
    assert written.pop("feature_extractor")[1].startswith("CLIPImageProcessor")  # or ...Pil
    assert written == {
        k: v for k, v in karlo.VARIATION_MODEL_INDEX.items() if k != "feature_extractor"
    }


def _diffusers_models() -> dict[str, torch.nn.Module]:
    """diffusers' and transformers' Karlo modules built from karlo_configs on the meta device."""
    with META:
        return {
            "prior": PriorTransformer.from_config(karlo.PRIOR),
            "decoder": UNet2DConditionModel.from_config(karlo.DECODER),
            "text_proj": UnCLIPTextProjModel.from_config(karlo.TEXT_PROJ),
            "super_res": UNet2DModel.from_config(karlo.SUPER_RES),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**karlo.TEXT_ENCODER)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**karlo.IMAGE_ENCODER)),
        }


@pytest.mark.parametrize("variation", [False, True], ids=["text-to-image", "image-variation"])
def test_karlo_folder_maps_onto_unclip_with_diffusers_parameter_counts(tmp_path, variation):
    """The config mapping (no ConfigError) and module construction, on the meta device."""
    configs = read_configs(karlo.write_config_folder(tmp_path / "karlo", variation))
    theirs = {k: count_parameters(m) for k, m in _diffusers_models().items()}
    with META:
        clip = CLIP(configs.clip)
        decoder = UNet(configs.decoder)
        first, last = (Upsampler(c) for c in configs.super_res)
    assert next(decoder.parameters()).is_meta
    # logit_scale is unclip's own; the decoder holds the text projection
    towers = theirs["text_encoder"] + (theirs["image_encoder"] if variation else 0)
    assert count_parameters(clip) == towers + 1
    assert (clip.visual is not None) == variation
    assert count_parameters(decoder) == theirs["decoder"] + theirs["text_proj"]
    assert count_parameters(first) == count_parameters(last) == theirs["super_res"]
    # the published sizes (issue 32): decoder 900 M, each super-resolution UNet 700 M
    assert 0.85e9 < count_parameters(decoder) < 0.95e9
    assert 0.65e9 < count_parameters(first) < 0.75e9
    assert set(configs.diffusion) == (
        {"decoder", "upsampler"} | (set() if variation else {"prior"})
    )
    if variation:
        assert configs.prior is None
        return
    with META:
        prior = DiffusionPriorTransformer(configs.prior)
    # unclip keeps clip_mean/clip_std as buffers and the empty caption (z_t and its 2 tokens
    # projected) as the learned null condition
    d, width = karlo.PRIOR["embedding_dim"], 32 * 64
    assert count_parameters(prior) == theirs["prior"] - 2 * d + d + NULL * width
    assert 0.95e9 < count_parameters(prior) < 1.05e9
    assert configs.diffusion["prior"].prediction == "x0"
    assert configs.diffusion["prior"].clip_range == 5.0
    assert configs.diffusion["decoder"].learn_sigma and configs.decoder.learn_sigma


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert tuple(value.shape) == tuple(theirs[key].shape), key


def test_karlo_weights_convert_on_the_meta_device(tmp_path):
    """The weight converters take diffusers' tensors at Karlo's sizes (meta: shapes only)
    and write the same tensors and configs back."""
    configs = read_configs(karlo.write_config_folder(tmp_path / "karlo"))
    models = _diffusers_models()
    empty = (
        torch.empty(1, 768, device=META),
        torch.empty(1, 77, 768, device=META),
        torch.arange(77)[None] < NULL,  # the mask is read: a real tensor
    )
    prior = prior_from_diffusers(karlo.PRIOR, models["prior"].state_dict(), empty, "prior")
    assert prior.config == configs.prior
    decoder = decoder_from_diffusers(
        models["decoder"].state_dict(), karlo.DECODER, models["text_proj"].state_dict(),
        karlo.TEXT_PROJ, null_caption=(empty[1][0, :NULL], empty[0][0]),
    )  # fmt: skip
    assert decoder.config == configs.decoder
    sr = models["super_res"].state_dict()
    first, last = upsampler_from_diffusers(
        sr, karlo.SUPER_RES, sr, karlo.SUPER_RES, low_res_size=64
    )
    assert (first.config, last.config) == configs.super_res
    clip = clip_from_diffusers_state(
        configs.clip, models["text_encoder"].state_dict(), tmp_path / "karlo"
    )
    for model in (prior, decoder, first, clip):
        assert all(p.is_meta for n, p in model.named_parameters() if n != "logit_scale")

    back = decoder_to_diffusers(decoder)
    for name, want in (("decoder", karlo.DECODER), ("text_proj", karlo.TEXT_PROJ)):
        config, state = back[name]
        assert {k: v for k, v in config.items() if k in want} == {
            k: want[k] for k in config if k in want
        }
        _assert_same_tensors(state, models[name].state_dict())
    config, state = upsampler_to_diffusers(first, last)["super_res_last"]
    assert {k: v for k, v in config.items() if k in karlo.SUPER_RES} == {
        k: karlo.SUPER_RES[k] for k in config if k in karlo.SUPER_RES
    }
    _assert_same_tensors(state, sr)


@torch.no_grad()
@pytest.mark.parametrize("phases", [False, True])
def test_karlo_stages_count_diffusers_forward_flops(tmp_path, monkeypatch, phases):
    """unclip's stages at Karlo's sizes do diffusers' work: the same forward FLOPs (counted
    on fake tensors: shapes only), two rows as guidance runs them, when the convolutions
    after a ×2 upsampling run at the high resolution as diffusers runs them; fewer with
    their low-resolution phase form (unclip.decoder.upsample_conv), which unclip uses."""
    if not phases:
        monkeypatch.setattr(
            Conv3x3, "upsampled", lambda conv, x: conv(F.interpolate(x, scale_factor=2.0))
        )
    configs = read_configs(karlo.write_config_folder(tmp_path / "karlo"))
    n = 2
    with FakeTensorMode():
        ours = {
            "prior": DiffusionPriorTransformer(configs.prior).eval(),
            "decoder": UNet(configs.decoder).eval(),
            "super_res": Upsampler(configs.super_res[0]).eval(),
        }
        prior = PriorTransformer.from_config(karlo.PRIOR).eval()
        unet = UNet2DConditionModel.from_config(karlo.DECODER).eval()
        text_proj = UnCLIPTextProjModel.from_config(karlo.TEXT_PROJ).eval()
        super_res = UNet2DModel.from_config(karlo.SUPER_RES).eval()
        t = torch.full((n,), 500)
        z, zt, tokens = torch.randn(n, 768), torch.randn(n, 768), torch.randn(n, 77, 768)
        mask = torch.ones(n, 77, dtype=torch.bool)
        x64, x256 = torch.randn(n, 3, 64, 64), torch.randn(1, 3, 256, 256)

        def their_decoder():
            hidden, additive = text_proj(
                image_embeddings=z[: n // 2], prompt_embeds=zt, text_encoder_hidden_states=tokens,
                do_classifier_free_guidance=True,
            )  # fmt: skip
            return unet(
                x64, t, encoder_hidden_states=hidden, class_labels=additive,
                attention_mask=F.pad(mask, (4, 0), value=True),
            )  # fmt: skip

        pairs = {
            "prior": (
                lambda: ours["prior"](z, t, text_emb=zt, text_tokens=tokens, text_mask=mask),
                lambda: prior(
                    z, t, proj_embedding=zt, encoder_hidden_states=tokens, attention_mask=mask
                ),
            ),
            "decoder": (
                lambda: ours["decoder"](
                    x64, t, image_emb=z, text_tokens=tokens, text_mask=mask, text_emb=zt
                ),
                their_decoder,
            ),
            "super_res": (
                lambda: ours["super_res"](x256, t[:1], low_res=x64[:1]),
                lambda: super_res(torch.cat([x256, x256], dim=1), t[:1]),
            ),
        }
        flops = {k: (forward_flops(a), forward_flops(b)) for k, (a, b) in pairs.items()}
    for name, (got, want) in flops.items():
        if phases and name != "prior":
            assert 0.8 * want < got < want, name
        else:
            assert got == want > 0, name
    # a 64 px decoder call costs 0.6 TFLOPs a row; a 256 px super-resolution call ~8.5
    assert 0.5e12 < flops["decoder"][1] / n < 0.7e12
    assert 8e12 < flops["super_res"][1] < 9e12


def test_a_folder_is_checked_config_by_config_before_any_weights_are_read(tmp_path):
    """Karlo's folder without weights: a spoiled config names its file and field; unspoiled,
    loading gets past every config and stops at the first file it lacks."""
    import unclip
    from unclip.config import ConfigError

    folder = karlo.write_config_folder(tmp_path / "karlo")
    with pytest.raises(ConfigError, match=r"karlo/tokenizer/tokenizer_config.json: missing"):
        unclip.load_pipeline(folder, device="cpu", dtype="float32")
    path = folder / "super_res_last" / "config.json"
    path.write_text(json.dumps({**karlo.SUPER_RES, "mid_block_type": "UNetMidBlock2DCrossAttn"}))
    with pytest.raises(ConfigError, match=r"karlo/super_res_last/config.json: mid_block_type"):
        unclip.load_pipeline(folder, device="cpu", dtype="float32")
