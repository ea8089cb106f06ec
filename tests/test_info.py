"""``unclip info``: parameter counts and forward FLOPs of model configs (``eval.model_stats``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from unclip.clip.model import CLIP, CLIPConfig
from unclip.commands import info
from unclip.config import ConfigError
from unclip.decoder.unet import UNet, UNetConfig
from unclip.decoder.upsampler import Upsampler, UpsamplerConfig
from unclip.eval.model_stats import (
    count_parameters,
    format_count,
    forward_flops,
    load_models,
    model_stats,
    run_config_stage,
    stats_for_path,
)
from unclip.hub import save_pretrained
from unclip.pipeline.config import PipelineConfig, StagesConfig
from unclip.prior.model import DiffusionPriorTransformer, PriorConfig

REPO = Path(__file__).resolve().parent.parent

TINY_CLIP = CLIPConfig(
    embed_dim=16,
    context_length=12,
    vocab_size=100,
    text_width=32,
    text_layers=2,
    text_heads=2,
    image_size=16,
    patch_size=4,
    vision_width=24,
    vision_layers=3,
    vision_heads=2,
)
TINY_PRIOR = PriorConfig(clip_dim=16, text_dim=32, text_len=12, width=32, layers=2, heads=2)


def tiny_unet(channels: int = 16, **kw) -> UNetConfig:
    """A decoder UNet without attention (so its FLOPs are convolutions and linears only)."""
    base = dict(
        image_size=16,
        model_channels=channels,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        attention_mid=False,
        norm_groups=8,
        clip_dim=16,
        clip_tokens=0,
        text_dim=0,
    )
    base.update(kw)
    return UNetConfig(**base)


TINY_UPSAMPLER = UpsamplerConfig(
    image_size=16, low_res_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
    norm_groups=8,
)  # fmt: skip


def test_parameter_count_is_the_sum_of_numel_of_the_real_model():
    for config, cls in (
        (TINY_CLIP, CLIP),
        (TINY_PRIOR, DiffusionPriorTransformer),
        (tiny_unet(), UNet),
        (TINY_UPSAMPLER, Upsampler),
    ):
        model = cls(config)
        stats = model_stats(config)
        assert stats.params == sum(p.numel() for p in model.parameters()) == count_parameters(model)
        assert stats.type == config.type_name
        assert all(f > 0 for f in stats.flops.values())


def test_clip_flops_match_the_transformer_formula():
    """ViT: patch conv + per layer 2·T·(4W² + 2·W·M) + attention 2·2·T²·W, + the projection
    of the class token; the text side likewise over the full context."""
    c = TINY_CLIP
    stats = model_stats(c)

    def layers(tokens: int, width: int, depth: int) -> int:
        mlp = 4 * width
        per = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
        return depth * per

    grid = (c.image_size // c.patch_size) ** 2
    image = 2 * grid * 3 * c.patch_size**2 * c.vision_width
    image += layers(grid + 1, c.vision_width, c.vision_layers) + 2 * c.vision_width * c.embed_dim
    text = layers(c.context_length, c.text_width, c.text_layers) + 2 * c.text_width * c.embed_dim
    assert stats.flops == {"image": image, "caption": text}
    assert stats.inputs == {"pixels": [1, 3, 16, 16], "tokens": [1, 12]}
    assert stats.parts["image"] + stats.parts["caption"] + 1 == stats.params  # + logit scale


def test_prior_flops_match_the_transformer_formula():
    c = TINY_PRIOR
    w, d, s = c.width, c.clip_dim, c.text_len + 4  # caption tokens + z_t, t, x, query
    hidden = int(w * c.mlp_ratio)
    expected = 2 * c.text_len * c.text_dim * w + 2 * d * w * 2 + 2 * 2 * w * w  # inputs
    expected += c.layers * (2 * s * (4 * w * w + 2 * w * hidden) + 4 * s * s * w)
    expected += 2 * w * d  # output at the query token
    stats = model_stats(c)
    assert stats.flops == {"embedding": expected}
    no_text = model_stats(c.replace(text_dim=0))
    assert no_text.flops["embedding"] < expected


def test_unet_conv_flops_scale_with_the_square_of_the_width():
    """Doubling every channel count quadruples the convolutions' FLOPs (the input and output
    convolutions, with 3 channels on one side, only double: hence a little under 4)."""
    small = model_stats(tiny_unet(16)).gflops
    large = model_stats(tiny_unet(32)).gflops
    assert 3.6 < large / small <= 4.0
    # and it grows with the image area: 4× the pixels, 4× the FLOPs (the embeddings aside)
    big = model_stats(tiny_unet(16, image_size=32)).gflops
    assert 3.9 < big / small <= 4.0


def test_attention_flops_are_counted_on_the_cpu():
    """torch's counter has no formula for the CPU SDPA kernel; ours adds it."""
    q = torch.randn(1, 2, 10, 8)
    k = torch.randn(1, 2, 6, 8)
    flops = forward_flops(torch.nn.functional.scaled_dot_product_attention, q, k, k)
    assert flops == 2 * 2 * (2 * 10 * 6 * 8)  # Q·Kᵀ and weights·V, 2 FLOPs a MAC, 2 heads


def test_decoder_caption_tokens_and_conditions_add_flops():
    with_text = tiny_unet(16, text_dim=32, clip_tokens=4, attention_resolutions=(8,))
    short = model_stats(with_text, text_len=4)
    long = model_stats(with_text, text_len=40)
    assert long.gflops > short.gflops
    assert long.inputs["text_tokens"] == [1, 40, 32]
    assert long.inputs["image_emb"] == [1, 16]
    inpaint = model_stats(tiny_unet(16, inpaint=True))
    assert inpaint.inputs["inpaint_mask"] == [1, 1, 16, 16]
    assert inpaint.gflops > model_stats(tiny_unet(16)).gflops  # 4 more input channels
    up = model_stats(TINY_UPSAMPLER)
    assert up.inputs == {"x": [1, 3, 16, 16], "low_res": [1, 3, 8, 8]}


def _write_run_config(path: Path, model: dict, **extra) -> Path:
    doc = {"model": model, "train": {"steps": 10}, "data": {"path": "nowhere"}, **extra}
    path.write_text(json.dumps(doc))
    return path


def test_run_configs_are_told_apart(tmp_path):
    clip = _write_run_config(tmp_path / "a.json", TINY_CLIP.to_dict())
    prior = _write_run_config(
        tmp_path / "b.json", TINY_PRIOR.to_dict(), diffusion={"prediction": "x0"}
    )
    unet = {"image_size": 32, "model_channels": 32, "channel_mult": [1, 2]}
    decoder = _write_run_config(tmp_path / "c.json", unet, diffusion={"learn_sigma": True})
    upsampler = _write_run_config(tmp_path / "d.json", {**unet, "low_res_size": 16})
    named = _write_run_config(tmp_path / "upsampler-16.json", unet)
    got = {p.name: type(load_models(p)[0].config).__name__ for p in (clip, prior, decoder)}
    assert got == {"a.json": "CLIPConfig", "b.json": "PriorConfig", "c.json": "UNetConfig"}
    assert isinstance(load_models(upsampler)[0].config, UpsamplerConfig)
    assert isinstance(load_models(named)[0].config, UpsamplerConfig)  # by its file name
    assert type(load_models(named, stage="decoder")[0].config) is UNetConfig
    with pytest.raises(ConfigError, match="matches no stage"):
        run_config_stage({"model": {"no_such_key": 1}}, tmp_path / "x.json")
    with pytest.raises(ConfigError, match="cannot tell"):
        run_config_stage({"model": {}}, tmp_path / "x.json")


def test_decoder_caption_length_comes_from_the_clip_beside_it(tmp_path):
    """A run config's ``clip`` folder may not exist before CLIP is trained: the ``clip.json``
    run config in the same folder gives the context length instead."""
    unet = {"image_size": 32, "model_channels": 32, "channel_mult": [1, 2], "text_dim": 32}
    decoder = _write_run_config(tmp_path / "decoder.json", unet, clip="runs/not-yet/clip")
    assert load_models(decoder)[0].text_len == 77  # no CLIP anywhere: the default
    _write_run_config(tmp_path / "clip.json", TINY_CLIP.to_dict())
    assert load_models(decoder)[0].text_len == TINY_CLIP.context_length
    assert load_models(decoder, text_len=5)[0].text_len == 5
    assert model_stats(load_models(decoder)[0].config, text_len=12).inputs["text_tokens"] == [
        1, 12, 32,
    ]  # fmt: skip


def test_model_folder_and_pipeline_folder(tmp_path):
    pipe = tmp_path / "pipe"
    save_pretrained(CLIP(TINY_CLIP), pipe / "clip")
    save_pretrained(DiffusionPriorTransformer(TINY_PRIOR), pipe / "prior")
    save_pretrained(UNet(tiny_unet(16, text_dim=32)), pipe / "decoder")
    save_pretrained(Upsampler(TINY_UPSAMPLER), pipe / "up")
    PipelineConfig(stages=StagesConfig(upsamplers=["up"])).save(pipe / "pipeline.json")

    folder = stats_for_path(pipe / "decoder")
    assert [s.type for s in folder] == ["decoder_unet"]
    assert folder[0].inputs["text_tokens"] == [1, 77, 32]  # no CLIP in sight: the default
    stats = stats_for_path(pipe)
    assert [s.type for s in stats] == ["clip", "diffusion_prior", "decoder_unet", "upsampler_unet"]
    decoder = stats[2]
    assert decoder.inputs["text_tokens"] == [1, TINY_CLIP.context_length, 32]  # the CLIP's
    assert decoder.params == folder[0].params
    assert stats_for_path(pipe / "pipeline.json")[3].name.endswith("up")
    assert stats_for_path(pipe / "decoder" / "config.json")[0].params == decoder.params


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="unclip")
    info.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_command_prints_a_table_and_json(tmp_path, capsys):
    clip = _write_run_config(tmp_path / "clip.json", TINY_CLIP.to_dict())
    up = _write_run_config(tmp_path / "up.json", TINY_UPSAMPLER.to_dict())
    assert _run(["info", str(clip), str(up)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "type", "params", "GFLOPs", "per"]
    assert "clip" in lines[1] and "image" in lines[1] and "caption" in lines[2]
    assert "upsampler_unet" in lines[3]
    assert _run(["info", "--json", str(clip), str(up)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["type"] for d in doc] == ["clip", "upsampler_unet"]
    assert doc[0]["params"] == sum(p.numel() for p in CLIP(TINY_CLIP).parameters())
    assert doc[0]["flops"]["image"] > 0 and doc[0]["flops"]["caption"] > 0
    assert doc[1]["gflops"] == doc[1]["flops"]["image"] / 1e9


@pytest.mark.parametrize("name", ["clip.json", "clip-vit.json"])
def test_command_on_the_emoji_clip_configs(capsys, name):
    assert _run(["info", "--json", str(REPO / "configs" / "emoji-small" / name)]) == 0
    (stats,) = json.loads(capsys.readouterr().out)
    assert stats["type"] == "clip" and stats["inputs"]["pixels"] == [1, 3, 64, 64]
    assert 1e6 < stats["params"] < 1e8
    assert stats["flops"]["image"] > stats["flops"]["caption"] > 0


def test_format_count():
    assert format_count(999) == "999"
    assert format_count(2_610_433) == "2.61M"
    assert format_count(1_500) == "1.5K"
    assert format_count(3.5e9) == "3.5B"
