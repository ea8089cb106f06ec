"""Sampling presets (issue #34): ``preset="fast"`` in the API, ``--fast`` on the command line
and the server's ``preset`` field give the decoder setting of
:data:`unclip.pipeline.config.SAMPLING_PRESETS`; explicit settings win over it, and an
unknown preset is refused naming it. On the tiny random pipeline (whose default is 2 decoder
steps, so the preset visibly changes them) and the shipped model's ``pipeline.json``."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import unclip
from server_helpers import LIMITS, assert_error, png
from unclip import cli
from unclip.pipeline import image_info
from unclip.pipeline.config import SAMPLING_PRESETS, PipelineConfig, SamplingConfig
from unclip.pipeline.settings import apply_overrides
from unclip.server import create_app
from unclip.server.schemas import ImageRequest

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = SAMPLING_PRESETS["fast"]
GEN = "/v1/images/generations"


def test_the_fast_preset_is_fewer_decoder_steps_than_the_shipped_default():
    shipped = Path(unclip.__file__).parent / "weights" / "emoji-small" / "pipeline.json"
    default = PipelineConfig.from_dict(json.loads(shipped.read_text())).sampling
    fast = apply_overrides(default, {"preset": "fast"})
    assert fast.decoder.steps < default.decoder.steps
    assert (fast.decoder.sampler, fast.decoder.steps) == (
        FAST["decoder_sampler"],
        FAST["decoder_steps"],
    )
    # what the preset does not name keeps the pipeline's default
    assert fast.prior == default.prior and fast.upsampler == default.upsampler
    assert fast.decoder.guidance == default.decoder.guidance


def test_explicit_settings_win_over_the_preset():
    base = SamplingConfig()
    s = apply_overrides(base, {"preset": "fast", "decoder_steps": 3})
    assert (s.decoder.sampler, s.decoder.steps) == (FAST["decoder_sampler"], 3)
    # ``sampler`` sets every stage's sampler, the preset's decoder sampler included
    s = apply_overrides(base, {"preset": "fast", "sampler": "ddpm"})
    assert (s.decoder.sampler, s.decoder.steps) == ("ddpm", FAST["decoder_steps"])
    assert s.prior.sampler == "ddpm"
    s = apply_overrides(base, {"preset": "fast", "decoder_sampler": "ddim"})
    assert s.decoder.sampler == "ddim"
    # None means "not given": the preset's value stays
    s = apply_overrides(base, {"preset": "fast", "decoder_steps": None, "sampler": None})
    assert (s.decoder.sampler, s.decoder.steps) == (FAST["decoder_sampler"], FAST["decoder_steps"])
    assert apply_overrides(base, {"preset": None}) == base


@pytest.mark.parametrize("preset", ["slow", "FAST", 1])
def test_an_unknown_preset_is_refused_naming_the_known_ones(preset):
    with pytest.raises(ValueError, match="unknown preset.*'fast'"):
        apply_overrides(SamplingConfig(), {"preset": preset})


def test_the_pipeline_records_the_presets_steps_and_draws_what_they_say(pipe):
    assert pipe.sampling_settings().decoder.steps != FAST["decoder_steps"]
    (img,) = pipe.text_to_image("a red square", seed=5, preset="fast")
    info = image_info(img)
    assert info.steps["decoder"] == FAST["decoder_steps"]
    assert info.sampler["decoder"] == FAST["decoder_sampler"]
    assert info.steps["prior"] == pipe.sampling_settings().prior.steps
    # the same picture as asking for the preset's settings one by one
    (same,) = pipe.text_to_image("a red square", seed=5, **FAST)
    assert np.array_equal(np.asarray(img), np.asarray(same))
    (mine,) = pipe.text_to_image("a red square", seed=5, preset="fast", decoder_steps=3)
    assert image_info(mine).steps["decoder"] == 3
    with pytest.raises(ValueError, match="unknown preset"):
        pipe.text_to_image("a red square", seed=5, preset="slow")


def run(args: list[str], capsys) -> tuple[int, dict, str]:
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else {}), err


@pytest.mark.parametrize(
    ("flags", "sampler", "steps"),
    [
        (["--fast"], FAST["decoder_sampler"], FAST["decoder_steps"]),
        (["--fast", "--decoder-steps", "3"], FAST["decoder_sampler"], 3),
        (["--fast", "--sampler", "ddpm"], "ddpm", FAST["decoder_steps"]),
        ([], "ddim", 2),  # the tiny pipeline's default
    ],
)
def test_generate_fast_and_the_flags_that_override_it(
    pipeline_dir, tmp_path, capsys, flags, sampler, steps
):
    args = ["generate", "a red square", "--pipeline", str(pipeline_dir), "--out",
            str(tmp_path), "--seed", "1", "--device", "cpu", "--no-progress", "--json"]  # fmt: skip
    rc, doc, err = run([*args, *flags], capsys)
    assert rc == 0, err
    (image,) = doc["images"]
    assert image["steps"]["decoder"] == steps
    assert image["sampler"]["decoder"] == sampler


@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("data") / "gallery.sqlite"
    with TestClient(create_app(pipe, limits=LIMITS, gallery_db=db, queue_size=4)) as c:
        yield c


def test_the_server_takes_preset_fast_and_refuses_an_unknown_one(client):
    body = {"prompt": "a red square", "seed": 2, "response_format": "b64_json"}
    meta = client.post(GEN, json={**body, "preset": "fast"}).json()["data"][0]["unclip"]
    assert meta["steps"]["decoder"] == FAST["decoder_steps"]
    assert meta["sampler"]["decoder"] == FAST["decoder_sampler"]
    meta = client.post(GEN, json={**body, "preset": "fast", "steps": 3}).json()["data"][0]
    assert meta["unclip"]["steps"]["decoder"] == 3  # the request's steps win
    meta = client.post(GEN, json=body).json()["data"][0]["unclip"]
    assert meta["steps"]["decoder"] == 2  # no preset: the pipeline's default
    assert_error(client.post(GEN, json={**body, "preset": "slow"}), 400, "preset")
    # a multipart route reads it too
    files = {"image": ("a.png", png(), "image/png")}
    r = client.post("/v1/images/variations", files=files, data={"preset": "fast"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["unclip"]["steps"]["decoder"] == FAST["decoder_steps"]
    r = client.post("/v1/images/variations", files=files, data={"preset": "turbo"})
    assert_error(r, 400, "preset")


def test_the_servers_preset_names_are_the_presets():
    annotation = ImageRequest.model_fields["preset"].annotation
    (literal,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    assert set(typing.get_args(literal)) == set(SAMPLING_PRESETS)
