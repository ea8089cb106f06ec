"""The CLIP stage: encoders, loss, saving, and weight compatibility with transformers' CLIPModel
and the original OpenAI implementation (its ``model.py`` read from the clip-anytorch wheel)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unclip
from test_tokenizer import CAPTIONS, import_reference
from unclip.clip import CLIP, CLIPConfig, clip_loss, clip_training_loss, load_clip
from unclip.clip.convert import to_openai_state_dict
from unclip.clip.model import MAX_LOGIT_SCALE
from unclip.hub import UnsafeWeightsError
from unclip.tokenizer import train_tokenizer


def tiny(vision_type: str = "vit", **kw) -> CLIPConfig:
    base = dict(
        embed_dim=16,
        context_length=12,
        vocab_size=50,
        text_width=32,
        text_layers=2,
        text_heads=4,
        vision_type=vision_type,
        image_size=32,
        patch_size=8,
        vision_width=32 if vision_type == "vit" else 16,
        vision_layers=2,
        vision_heads=4,
        resnet_layers=(1, 2, 1, 1),
    )
    base.update(kw)
    return CLIPConfig(**base)


def random_tokens(n: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of [random ids < eot, eot, padding 0s] with eot = vocab - 1 at random positions."""
    tokens = torch.randint(0, vocab - 2, (n, length), generator=gen)
    ends = torch.randint(1, length, (n,), generator=gen)
    for i, e in enumerate(ends.tolist()):
        tokens[i, e] = vocab - 1
        tokens[i, e + 1 :] = 0
    return tokens


def perturb_(model: nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """Add noise to every parameter and BatchNorm statistic, so no weight is left at an
    identity-like initial value (ones, zeros) that would hide a mapping error."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.mul_(1 + 0.5 * torch.rand(b.shape, generator=gen))


# ------------------------------------------------------------------ the model


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
def test_shapes_and_normalisation(vision_type):
    gen = torch.Generator().manual_seed(0)
    model = CLIP(tiny(vision_type)).eval()
    tokens = random_tokens(3, 12, 50, gen)
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    text, image = model.encode_text(tokens), model.encode_image(pixels)
    assert text.shape == image.shape == (3, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    raw = model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), image)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    sim = model.similarity(image, text)
    assert sim.shape == (3, 3) and sim.abs().max() <= 1 + 1e-5
    assert model.encode_text_tokens(tokens).shape == (3, 12, 32)
    with pytest.raises(ValueError, match="pixels"):
        model.encode_image(torch.zeros(1, 3, 16, 16))


def test_text_encoder_is_causal_and_pools_at_the_end_token():
    gen = torch.Generator().manual_seed(1)
    model = CLIP(tiny()).eval()
    tokens = random_tokens(4, 12, 50, gen)
    tokens[:, 6] = 49  # end token at position 6 in every row
    tokens[:, 7:] = 0
    states = model.encode_text_tokens(tokens)
    changed = tokens.clone()
    changed[:, 8:] = torch.randint(1, 48, (4, 4), generator=gen)  # edit after position 7
    states2 = model.encode_text_tokens(changed)
    torch.testing.assert_close(states[:, :8], states2[:, :8])  # earlier positions cannot see it
    assert not torch.allclose(states[:, 8:], states2[:, 8:])
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(changed))
    before = tokens.clone()
    before[:, 3] = (before[:, 3] + 1) % 48  # a change before the end token changes the feature
    assert not torch.allclose(model.encode_text(before), model.encode_text(tokens))


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        tiny(text_heads=5)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny("resnet", image_size=48)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(patch_size=7)


def test_preprocess_maps_minus_one_one_to_model_pixels():
    model = CLIP(tiny())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.preprocess(images), ((images + 1) / 2 - mean) / std)
    grey = torch.full((1, 3, 48, 80), 0.2)  # resized and centre-cropped; a flat image stays flat
    out = model.preprocess(grey)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, ((torch.full_like(out, 0.6) - mean) / std))


# ------------------------------------------------------------------ the loss


def test_loss_is_symmetric_and_matches_the_definition():
    gen = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    loss = clip_loss(img, txt, 10.0)
    logits = 10.0 * img @ txt.T
    i2t = -logits.log_softmax(dim=1).diag().mean()
    t2i = -logits.log_softmax(dim=0).diag().mean()
    torch.testing.assert_close(loss, (i2t + t2i) / 2)
    torch.testing.assert_close(clip_loss(txt, img, 10.0), loss)
    assert clip_loss(img, img, 100.0) < 0.01  # matched pairs, sharp temperature
    assert clip_loss(img, img, 100.0) < clip_loss(img, txt, 100.0)


def test_temperature_is_clamped_at_100_but_keeps_a_gradient():
    model = CLIP(tiny())
    assert math.isclose(model.logit_scale_value().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(8.0)  # e^8 ≈ 2981
    scale = model.logit_scale_value()
    assert math.isclose(scale.item(), 100.0, rel_tol=1e-5)
    scale.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.item() > 0
    model.clamp_logit_scale_()
    assert math.isclose(model.logit_scale.item(), MAX_LOGIT_SCALE, rel_tol=1e-6)


def test_training_loss_backpropagates_into_both_towers():
    gen = torch.Generator().manual_seed(3)
    model = CLIP(tiny("resnet")).train()
    batch = (torch.randn(4, 3, 32, 32, generator=gen), random_tokens(4, 12, 50, gen))
    loss, metrics = clip_training_loss(model, batch)
    loss.backward()
    assert set(metrics) == {"loss", "logit_scale", "acc"}
    assert model.token_embedding.weight.grad.abs().sum() > 0
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    img = torch.randn(8, 5, requires_grad=True)  # the global batch, the same on every rank
    txt = torch.randn(8, 5, requires_grad=True)
    shard = slice(4 * rank, 4 * rank + 4)
    li = F.normalize(img[shard], dim=-1)
    lt = F.normalize(txt[shard], dim=-1)
    loss = clip_loss(li, lt, 7.0)
    loss.backward()
    torch.save({"loss": loss.detach(), "gi": img.grad, "gt": txt.grad}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_loss_under_ddp_uses_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    img = torch.randn(8, 5, requires_grad=True)
    txt = torch.randn(8, 5, requires_grad=True)
    full = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), 7.0)
    full.backward()
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0["loss"], full.detach())
    torch.testing.assert_close(r1["loss"], full.detach())
    # each rank's gradient reaches its own shard only; summed they give the global gradient
    assert r0["gi"][4:].abs().max() == 0 and r1["gi"][:4].abs().max() == 0
    torch.testing.assert_close(r0["gi"] + r1["gi"], img.grad)
    torch.testing.assert_close(r0["gt"] + r1["gt"], txt.grad)


# ------------------------------------------------------------------ saving and classifying


def test_save_pretrained_from_pretrained_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(4)
    model = CLIP(tiny("resnet", activation="quick_gelu", eot_token_id=49)).eval()
    perturb_(model, gen)
    unclip.save_pretrained(model, tmp_path / "clip")
    doc = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert doc["type"] == "clip" and doc["config"]["resnet_layers"] == [1, 2, 1, 1]
    back = unclip.from_pretrained(tmp_path / "clip")
    assert isinstance(back, CLIP) and back.config == model.config
    loaded = load_clip(tmp_path / "clip")
    tokens, pixels = random_tokens(2, 12, 50, gen), torch.randn(2, 3, 32, 32, generator=gen)
    for m in (back, loaded):
        torch.testing.assert_close(m.encode_text(tokens), model.encode_text(tokens))
        torch.testing.assert_close(m.encode_image(pixels), model.encode_image(pixels))


def test_from_pretrained_needs_no_import_of_unclip_clip(tmp_path):
    unclip.save_pretrained(CLIP(tiny()), tmp_path / "clip")
    code = (
        "import sys, unclip; m = unclip.from_pretrained(sys.argv[1]); "
        "print(type(m).__module__, type(m).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "clip")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["unclip.clip.model", "CLIP"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS, vocab_size=600, context_length=12)


def test_classify_agrees_with_the_embeddings(tokenizer):
    gen = torch.Generator().manual_seed(5)
    model = CLIP(tiny(vocab_size=tokenizer.vocab_size)).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    labels = ["cat face", "rocket", "red heart", "pizza"]
    probs = model.classify(pixels, labels, tokenizer, template="{}, noto style")
    assert probs.shape == (3, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    text = model.encode_text(tokenizer([f"{x}, noto style" for x in labels]))
    expected = (model.logit_scale_value() * model.encode_image(pixels) @ text.T).softmax(dim=1)
    torch.testing.assert_close(probs, expected)
    other = model.classify(pixels, labels, tokenizer)  # the template changes the captions
    assert not torch.allclose(other, probs)
    with pytest.raises(ValueError, match="template"):
        model.classify(pixels, labels, tokenizer, template="no slot")


def test_classify_command(tmp_path, tokenizer, capsys):
    import argparse

    from PIL import Image

    from unclip.commands import clip as command

    pipeline = tmp_path / "pipe"
    unclip.save_pretrained(CLIP(tiny(vocab_size=tokenizer.vocab_size)), pipeline / "clip")
    tokenizer.save(pipeline / "tokenizer")
    image = tmp_path / "red.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 255)).save(image)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            *("classify", str(image), "--labels", "cat", "rocket", "heart"),
            *("--model", str(pipeline), "--top", "2", "--device", "cpu"),
        ]
    )
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    rows = [line.split("\t") for line in lines]
    assert all(r[0] == str(image) and r[1] in ("cat", "rocket", "heart") for r in rows)
    assert float(rows[0][2]) >= float(rows[1][2])
    args = parser.parse_args(["classify", "missing.png", "--labels", "a", "--model", str(pipeline)])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        args.func(args)
    unclip.save_pretrained(CLIP(tiny()), tmp_path / "lonely")  # a folder without a tokenizer
    args = parser.parse_args(["classify", str(image), "--labels", "a", "--model", str(tmp_path / "lonely")])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        args.func(args)


# ------------------------------------------------------------------ transformers' CLIPModel


@pytest.mark.parametrize(("act", "eos"), [("quick_gelu", 98), ("gelu", 2)])
def test_matches_transformers_clipmodel(tmp_path, act, eos):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    text = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=act,
        eos_token_id=eos,
        bos_token_id=97,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        hidden_act=act,
    )
    hf = CLIPModel(HFConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    perturb_(hf, gen)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_clip(tmp_path / "hf")
    assert ours.config.text_mlp_dim == 37 and ours.config.activation == act
    tokens = random_tokens(5, 16, 99, gen)  # end token 98: the largest id, so both rules agree
    pixels = torch.randn(5, 3, 16, 16, generator=gen)
    with torch.no_grad():
        want_text = hf.get_text_features(input_ids=tokens).pooler_output
        want_image = hf.get_image_features(pixel_values=pixels).pooler_output
        got_text = ours.encode_text(tokens, normalize=False)
        got_image = ours.encode_image(pixels, normalize=False)
    assert want_text.shape == (5, 24)
    torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_image, want_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours.encode_text(tokens), F.normalize(want_text, dim=-1), atol=1e-5, rtol=1e-5
    )
    assert math.isclose(ours.logit_scale.item(), hf.logit_scale.item(), rel_tol=1e-6)


# ------------------------------------------------------------------ original OpenAI weights


def openai_reference(vision_type: str, gen: torch.Generator) -> nn.Module:
    """A tiny model of OpenAI's own CLIP class (float32, perturbed weights)."""
    ref = import_reference("model")
    torch.manual_seed(0)
    model = ref.CLIP(
        embed_dim=32,
        image_resolution=64 if vision_type == "resnet" else 32,
        vision_layers=(1, 2, 1, 1) if vision_type == "resnet" else 2,
        vision_width=16 if vision_type == "resnet" else 128,
        vision_patch_size=8,
        context_length=10,
        vocab_size=60,
        transformer_width=128,
        transformer_heads=2,  # OpenAI's loader infers width / 64
        transformer_layers=2,
    ).eval()
    perturb_(model, gen, scale=0.05)
    return model


@pytest.mark.parametrize("vision_type", ["vit", "resnet"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loads_openai_state_dicts(tmp_path, vision_type, suffix):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    ref = openai_reference(vision_type, gen)
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"openai{suffix}"
    if suffix == ".pt":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as a DDP run saves it
    else:
        save_file(state, str(path))
    ours = load_clip(path)
    cfg = ours.config
    assert (cfg.vision_type, cfg.text_heads, cfg.context_length) == (vision_type, 2, 10)
    size = 64 if vision_type == "resnet" else 32
    assert cfg.image_size == size
    tokens = random_tokens(4, 10, 60, gen)
    pixels = torch.randn(4, 3, size, size, generator=gen)
    with torch.no_grad():
        want_text, want_image = ref.encode_text(tokens), ref.encode_image(pixels)
        torch.testing.assert_close(
            ours.encode_text(tokens, normalize=False), want_text, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            ours.encode_image(pixels, normalize=False), want_image, atol=1e-5, rtol=1e-5
        )
    # and back: our weights under OpenAI's names are the reference's tensors
    exported = to_openai_state_dict(ours)
    assert exported.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(exported[k], v), k


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_refuses_torchscript_archives(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UnsafeWeightsError, match="TorchScript"):
        load_clip(path)
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_clip(tmp_path / "nothing")


def test_refuses_foreign_folders_with_a_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        load_clip(tmp_path)
