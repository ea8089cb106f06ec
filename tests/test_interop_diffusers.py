"""A diffusers unCLIP folder (Karlo's layout) loads as an unclip pipeline and gives diffusers'
outputs: tiny random components saved with ``save_pretrained`` (tests/diffusers_tiny.py), the
same generator given to both, compared stage by stage; ``unclip convert`` both ways; bad
folders fail with one line naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers_tiny as tiny
import unclip
from unclip.cli import main
from unclip.config import ConfigError
from unclip.pipeline.images import prepare_image
from unclip.pipeline.runners import TextCondition, decode, upsample

ATOL = 1e-3
PROMPTS = ["a red square", "a horse in the snow"]
STEPS = {"prior": 5, "decoder": 5, "super_res": 4}  # few steps; still skipping timesteps


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(text-to-image folder, its diffusers pipeline, variation folder, its pipeline)."""
    root = tmp_path_factory.mktemp("karlo")
    t2i = tiny.unclip_pipeline(root / "t2i")
    var = tiny.variation_pipeline(root / "var")
    for pipe in (t2i, var):
        pipe.set_progress_bar_config(disable=True)
    return root / "t2i", t2i, root / "var", var


def _load(folder: Path):
    return unclip.load_pipeline(folder, device="cpu", dtype="float32")


def _capture(ref) -> dict[str, torch.Tensor]:
    """Record what diffusers' pipeline computes stage by stage: the last sample of each
    scheduler and the image embedding given to the text projection."""
    seen: dict[str, torch.Tensor] = {}
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        sch = getattr(ref, name, None)
        if sch is None:
            continue
        step = type(sch).step

        def record(*args, _step=step, _name=name, _sch=sch, **kwargs):
            out = _step(_sch, *args, **kwargs)
            seen[_name] = out.prev_sample.clone()
            return out

        sch.step = record
    ref.text_proj.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("z_i", kw["image_embeddings"].clone()), with_kwargs=True
    )
    return seen


def _settings(pipe):
    return pipe.sampling_settings(
        prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
        upsampler_steps=STEPS["super_res"],
    )  # fmt: skip


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    err = (ours - theirs).abs().max().item()
    assert err < ATOL, f"{what}: max |diff| {err:.2e}"


# ---------------------------------------------------------------------------------------------


def test_load_pipeline_draws_at_the_super_res_size(folders):
    t2i_dir, _, _, _ = folders
    pipe = _load(t2i_dir)
    assert (pipe.base_size, pipe.image_size) == (tiny.BASE, tiny.SUPER)
    st = pipe.config.sampling
    assert (st.prior.steps, st.prior.guidance, st.prior.candidates) == (25, 4.0, 1)
    assert (st.decoder.steps, st.decoder.guidance, st.upsampler.steps) == (25, 8.0, 7)
    assert {st.prior.sampler, st.decoder.sampler, st.upsampler.sampler} == {"karlo"}
    (image,) = pipe.text_to_image("a red square", seed=0, **_overrides())
    assert image.size == (tiny.SUPER, tiny.SUPER)
    assert pipe.upsamplers[0].last_step is not None  # super_res_last for the last step


def _overrides():
    return {"prior_steps": 3, "decoder_steps": 3, "upsampler_steps": 2}


def test_encode_text_equals_the_folders_clip_text_embedding(folders):
    t2i_dir, ref, _, _ = folders
    pipe = _load(t2i_dir)
    tok = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = ref.text_encoder(tok.input_ids)
    theirs = F.normalize(out.text_embeds, dim=-1)
    cos = (pipe.encode_text(PROMPTS) * theirs).sum(-1)
    assert bool((cos >= 0.9999).all()), cos
    text = TextCondition.cat([pipe._text(p) for p in PROMPTS])
    assert torch.equal(text.mask, tok.attention_mask.bool())
    _close(text.z_t, out.text_embeds, "z_t (raw, as the stages take it)")
    keep = text.mask[..., None]
    _close(text.tokens * keep, out.last_hidden_state * keep, "caption token states")


def test_text_to_image_equals_diffusers_stage_by_stage(folders):
    t2i_dir, ref, _, _ = folders
    seen = _capture(ref)
    theirs = ref(
        PROMPTS, generator=torch.Generator().manual_seed(7), output_type="np",
        prior_num_inference_steps=STEPS["prior"],
        decoder_num_inference_steps=STEPS["decoder"],
        super_res_num_inference_steps=STEPS["super_res"],
    ).images  # fmt: skip
    pipe = _load(t2i_dir)
    s, g = _settings(pipe), torch.Generator().manual_seed(7)
    ctx = pipe._ctx(None, g)
    text = TextCondition.cat([pipe._text(p) for p in PROMPTS])
    z_i = pipe._sample_prior(text, [0, 1], s, None, True, generator=g)
    _close(z_i, seen["z_i"], "prior z_i")
    x = decode(pipe.decoder, z_i, text, s.decoder, g, ctx)
    _close(x.clamp(-1, 1), seen["decoder_scheduler"].clamp(-1, 1), "decoder image")
    y = upsample(pipe.upsamplers, x, s.upsampler, [0, 1], ctx)
    _close(y, seen["super_res_scheduler"], "super-resolution image")
    # and text_to_image itself, given the same generator, delivers diffusers' PNG pixels
    images = pipe.text_to_image(
        PROMPTS, generator=torch.Generator().manual_seed(7),
        prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
        upsampler_steps=STEPS["super_res"],
    )  # fmt: skip
    assert np.abs(_pixels(images) - (theirs * 255).round()).max() <= 1


def test_variations_equal_diffusers_stage_by_stage(folders):
    _, _, var_dir, ref = folders
    seen = _capture(ref)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    assert image.size == (tiny.SUPER, tiny.CLIP_IMAGE)  # no resizing on either side
    theirs = ref(
        image, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
        decoder_num_inference_steps=STEPS["decoder"],
        super_res_num_inference_steps=STEPS["super_res"], output_type="np",
    ).images  # fmt: skip
    pipe = _load(var_dir)
    assert pipe.prior is None
    s, g = _settings(pipe), torch.Generator().manual_seed(3)
    ctx = pipe._ctx(None, g)
    z_i = pipe._clip_image(prepare_image(image, pipe.image_size))
    _close(z_i.expand(2, -1), seen["z_i"], "image embedding")
    x = decode(pipe.decoder, z_i.expand(2, -1), None, s.decoder, g, ctx)
    _close(x.clamp(-1, 1), seen["decoder_scheduler"].clamp(-1, 1), "decoder image")
    y = upsample(pipe.upsamplers, x, s.upsampler, [0, 1], ctx)
    _close(y, seen["super_res_scheduler"], "super-resolution image")
    images = pipe.variations(
        image, 2, generator=torch.Generator().manual_seed(3),
        decoder_steps=STEPS["decoder"], upsampler_steps=STEPS["super_res"],
    )  # fmt: skip
    assert np.abs(_pixels(images) - (theirs * 255).round()).max() <= 1


def test_every_capability_runs_on_a_converted_folder(folders):
    t2i_dir, _, var_dir, _ = folders
    var = _load(var_dir)
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8))
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (10, 10, 30, 30))
    few = {"decoder_steps": 4, "upsampler_steps": 2}
    outs = {
        "interpolate": var.interpolate(a, b, 3, seed=1, **few),
        "text_diff": var.text_diff(a, "a red square", "a blue square", 2, seed=1, **few),
        "inpaint": var.inpaint(a, mask, "a red square", seed=1, **few),
        "outpaint": var.outpaint(a, left=8, prompt="a red square", seed=1, **few),
        "rank": var.rank("a red square", [a, b], 1),
        "invert": var.variations(a, 1, invert=True, seed=1, **few),
        "negative": var.variations(a, 1, seed=1, negative_prompt="a blue square", **few),
        "mix": var.mix([a, "a red square"], seed=1, **few),
        "img2img": var.image_to_image(a, strength=0.5, seed=1, **few),
    }
    for name, images in outs.items():
        assert images and all(im.size[0] > 0 for im in images), name
    t2i = _load(t2i_dir)
    (edited,) = t2i.inpaint(a, mask, "a red square", seed=1, **_overrides())
    assert edited.size == (tiny.SUPER, tiny.SUPER)
    plain, avoided = (
        t2i.text_to_image("a red square", seed=2, negative_prompt=neg, **_overrides())[0]
        for neg in (None, "a blue square")
    )
    assert np.abs(_pixels([plain]) - _pixels([avoided])).max() > 0  # the negative is used
    with pytest.raises(ValueError, match="no image encoder"):  # the text-only layout
        t2i.variations(a, 1, seed=1)


def test_generate_cli_takes_the_diffusers_folder(folders, tmp_path, capsys):
    t2i_dir, _, _, _ = folders
    out = tmp_path / "out"
    argv = ["generate", "a red square", "--pipeline", str(t2i_dir), "--out", str(out),
            "--prior-steps", "2", "--decoder-steps", "2", "--upsampler-steps", "2",
            "--dtype", "float32", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    (png,) = out.glob("*.png")
    assert Image.open(png).size == (tiny.SUPER, tiny.SUPER)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = [f for f in path.iterdir() if f.suffix == ".safetensors"]
    return load_file(str(file))


@pytest.mark.parametrize("which", ["t2i", "var"])
def test_convert_round_trips_to_identical_outputs(folders, tmp_path, which):
    t2i_dir, _, var_dir, _ = folders
    src = t2i_dir if which == "t2i" else var_dir
    ours, back = tmp_path / "unclip", tmp_path / "diffusers"
    assert main(["convert", str(src), "--out", str(ours)]) == 0
    assert (ours / "pipeline.json").is_file() and not (ours / "model_index.json").exists()
    assert main(["convert", str(ours), "--to", "diffusers", "--out", str(back)]) == 0
    # the diffusers folder written back holds the same components with the same tensors
    index = json.loads((src / "model_index.json").read_text())
    again = json.loads((back / "model_index.json").read_text())
    assert {k: v[1] for k, v in again.items() if not k.startswith("_")} == {
        k: v[1].removesuffix("Pil") for k, v in index.items() if not k.startswith("_")
    }
    for name in (k for k, v in index.items() if not k.startswith("_")):
        if (src / name / "config.json").is_file():
            a, b = _state(src / name), _state(back / name)
            assert a.keys() == b.keys(), name
            assert all(torch.equal(a[k], b[k]) for k in a), name
    # the same generator draws the same images from the three folders
    run = {"generator": None, **({"prior_steps": 3} if which == "t2i" else {}),
           "decoder_steps": 3, "upsampler_steps": 2}  # fmt: skip
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    outputs = []
    for folder in (src, ours, back):
        pipe = _load(folder)
        run["generator"] = torch.Generator().manual_seed(5)
        draw = (
            pipe.text_to_image("a red square", **run)
            if which == "t2i"
            else pipe.variations(image, 1, **run)
        )
        outputs.append(_pixels(draw))
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2])
    # and diffusers itself runs the folder written back, as it runs the original
    theirs = []
    for folder in (src, back):
        ref = tiny.load_reference(folder)
        kw = {"decoder_num_inference_steps": 2, "super_res_num_inference_steps": 2}
        arg = "a red square" if which == "t2i" else image
        if which == "t2i":
            kw["prior_num_inference_steps"] = 2
        gen = torch.Generator().manual_seed(1)
        theirs.append(ref(arg, generator=gen, output_type="np", **kw).images)
    assert np.array_equal(theirs[0], theirs[1])


def test_convert_fp16_writes_half_the_bytes_and_loads(folders, tmp_path):
    t2i_dir, _, _, _ = folders
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["convert", str(t2i_dir), "--out", str(full)]) == 0
    assert main(["convert", str(t2i_dir), "--out", str(half), "--fp16"]) == 0
    for stage in ("prior", "decoder", "upsampler", "clip"):
        assert {v.dtype for v in _state(half / stage).values()} == {torch.float16}, stage
        size = (half / stage / "model.safetensors").stat().st_size
        assert size < 0.6 * (full / stage / "model.safetensors").stat().st_size
    (image,) = _load(half).text_to_image("a red square", seed=0, **_overrides())
    assert image.size == (tiny.SUPER, tiny.SUPER)


@pytest.mark.parametrize("which", ["t2i", "var"])
def test_converting_reads_each_json_file_once(folders, monkeypatch, which):
    from unclip.clip import convert
    from unclip.interop import diffusers_clip
    from unclip.pipeline.diffusers_folder import convert_diffusers_folder

    t2i_dir, _, var_dir, _ = folders
    reads: list[str] = []
    for module, name in ((diffusers_clip, "read_config_json"), (convert, "read_json")):
        real = getattr(module, name)

        def counting(path, *args, _real=real, **kwargs):
            reads.append(str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    convert_diffusers_folder(t2i_dir if which == "t2i" else var_dir)
    assert any(r.endswith("text_encoder/config.json") for r in reads)
    assert len(reads) == len(set(reads)), sorted(reads)


def test_unclips_own_pipeline_does_not_convert_to_diffusers(tmp_path, capsys):
    code = main(["convert", "emoji-small", "--to", "diffusers", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unit CLIP embeddings" in err


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _edit_weights(folder: Path, edit) -> None:
    """Rewrite the safetensors weights file in ``folder`` as ``edit(state)`` returns them."""
    from safetensors.torch import save_file

    (file,) = [f for f in folder.iterdir() if f.suffix == ".safetensors"]
    save_file(edit(_state(folder)), str(file))


BAD_FOLDERS = {
    "missing component folder": (
        lambda f: shutil.rmtree(f / "decoder"),
        r"decoder: the decoder folder is missing",
    ),
    "component left out of the index": (
        lambda f: _edit_json(f / "model_index.json", prior=[None, None]),
        r"model_index.json: component 'prior' is missing",
    ),
    "unknown pipeline class": (
        lambda f: _edit_json(f / "model_index.json", _class_name="KandinskyPipeline"),
        r"pipeline 'KandinskyPipeline' is not supported",
    ),
    "other scheduler": (
        lambda f: _edit_json(
            f / "prior_scheduler" / "scheduler_config.json", _class_name="DDPMScheduler"
        ),
        r"prior_scheduler/scheduler_config.json: scheduler 'DDPMScheduler' is not supported",
    ),
    "unknown scheduler option": (
        lambda f: _edit_json(f / "decoder_scheduler" / "scheduler_config.json", thresholding=True),
        r"decoder_scheduler/scheduler_config.json: unknown UnCLIPScheduler option 'thresholding'",
    ),
    "unsupported prediction": (
        lambda f: _edit_json(
            f / "super_res_scheduler" / "scheduler_config.json", prediction_type="v_prediction"
        ),
        r"super_res_scheduler/scheduler_config.json: prediction_type='v_prediction'",
    ),
    "unknown block type": (
        lambda f: _edit_json(
            f / "decoder" / "config.json",
            down_block_types=["ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"],
        ),
        r"decoder/config.json: down_block_types 'CrossAttnDownBlock2D' is not supported",
    ),
    "prior option": (
        lambda f: _edit_json(f / "prior" / "config.json", norm_in_type="layer"),
        r"prior/config.json: norm_in_type='layer' is not supported",
    ),
    "missing weights": (
        lambda f: (f / "prior" / "diffusion_pytorch_model.safetensors").unlink(),
        r"prior: no weights file",
    ),
    "prior tensor missing": (
        lambda f: _edit_weights(
            f / "prior", lambda sd: {k: v for k, v in sd.items() if k != "clip_std"}
        ),
        r"prior/config.json: weights do not match the config: missing 1 tensor\(s\), "
        r"e.g. 'clip_std'",
    ),
    "prior tensor of another size": (
        lambda f: _edit_weights(
            f / "prior", lambda sd: {**sd, "proj_to_clip_embeddings.bias": torch.zeros(3)}
        ),
        r"prior/config.json: tensor 'out.bias' has shape \(3,\), the config needs",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_fail_with_one_line_naming_the_problem(folders, tmp_path, capsys, case):
    t2i_dir, _, _, _ = folders
    folder = tmp_path / "bad"
    shutil.copytree(t2i_dir, folder)
    spoil, message = BAD_FOLDERS[case]
    spoil(folder)
    with pytest.raises(ConfigError, match=message) as info:
        _load(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    assert main(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unclip convert: error: ")


def test_serve_takes_the_diffusers_folder(folders):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from unclip.server import create_app

    t2i_dir, _, _, _ = folders
    app = create_app(str(t2i_dir), device="cpu", dtype="float32")
    body = {"prompt": "a red square", "seed": 1, "steps": 2, "prior_steps": 2,
            "upsampler_steps": 2, "response_format": "b64_json", "sampler": "karlo"}  # fmt: skip
    with TestClient(app) as client:
        r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == f"{tiny.SUPER}x{tiny.SUPER}"


def test_offload_keeps_only_the_running_stage_on_the_device(folders, monkeypatch):
    t2i_dir, _, _, _ = folders
    pipe = unclip.load_pipeline(t2i_dir, device="cpu", dtype="float32", offload=True)
    pipe.device = torch.device("cpu", 0)  # "the accelerator": a device the stages are not on
    stages = {"prior": pipe.prior, "decoder": pipe.decoder, "upsampler": pipe.upsamplers[0]}
    owner = {id(net): name for name, st in stages.items() for net in st.networks()}
    on: set[str] = set()  # the stages whose networks were last moved to the device
    moves: list[str] = []
    to = torch.nn.Module.to

    def recording(self, *args, **kwargs):
        if id(self) in owner and args and not kwargs:
            name, there = owner[id(self)], torch.device(args[0]) == pipe.device
            (on.add if there else on.discard)(name)
            moves.append(f"{name} {'in' if there else 'out'}")
        return to(self, *args, **kwargs)

    seen: list[tuple[str, frozenset[str]]] = []
    for name, st in stages.items():
        for net in st.networks():
            net.register_forward_pre_hook(lambda m, a, n=name: seen.append((n, frozenset(on))))
    monkeypatch.setattr(torch.nn.Module, "to", recording)
    pipe.text_to_image("a red square", seed=1, **_overrides())
    assert {n for n, _ in seen} == set(stages)
    assert all(now == {n} for n, now in seen), seen  # only the running stage's networks
    assert not on  # all back on the CPU
    first = ["prior in", "prior out", "decoder in", "decoder out", "upsampler in"]
    assert [m for i, m in enumerate(moves) if i == 0 or m != moves[i - 1]][:5] == first


def test_generate_offload_flag_loads_the_pipeline_offloaded(folders, tmp_path, monkeypatch):
    import unclip.pipeline as pipeline_module

    t2i_dir, _, _, _ = folders
    made = []
    load = pipeline_module.load_pipeline

    def loading(*args, **kwargs):
        made.append(load(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline_module, "load_pipeline", loading)
    argv = ["generate", "a red square", "--pipeline", str(t2i_dir), "--out", str(tmp_path),
            "--offload", "--device", "cpu", "--seed", "1", "--prior-steps", "3",
            "--decoder-steps", "3", "--upsampler-steps", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert len(made) == 1 and made[0].offload and list(tmp_path.glob("*.png"))
