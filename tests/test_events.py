"""The pipeline's plain-data outputs: progress events and typed image metadata."""

from __future__ import annotations

import dataclasses
import json

import pytest

from unclip.pipeline.events import ProgressEvent, image_fields, png_text


def test_progress_event_is_frozen_and_knows_its_last_step():
    ev = ProgressEvent("decoder", 3, 4, images=2)
    assert ev.last and not ProgressEvent("decoder", 2, 4).last
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.index = 0  # type: ignore[misc]


def test_image_fields_types_the_png_text_and_skips_non_strings():
    info = {
        "prompt": "a red square", "seed": "7", "steps": json.dumps({"decoder": 4}),
        "clip_score": "0.2500", "margins": "not json", "dpi": (72, 72), "model": "tiny",
    }  # fmt: skip
    assert png_text(info) == {k: v for k, v in info.items() if k != "dpi"}
    assert image_fields(info) == {
        "prompt": "a red square", "seed": 7, "steps": {"decoder": 4}, "clip_score": 0.25,
        "margins": "not json", "model": "tiny",
    }  # fmt: skip
    assert list(image_fields(info)) == list(png_text(info))  # the PNG's order


def test_the_pipeline_reports_events_with_the_images_each_step_draws(pipe):
    events: list[ProgressEvent] = []
    images = pipe.text_to_image(
        "a red square", n=2, seed=0, prior_steps=2, decoder_steps=3, upsampler_steps=1,
        progress=lambda stage, ev: events.append(ev),
    )  # fmt: skip
    assert all(isinstance(e, ProgressEvent) for e in events)
    by_stage = {e.stage: e for e in events}
    assert set(by_stage) == {"prior", "decoder", "upsampler"}
    assert by_stage["prior"].images == 1  # the prior's rows are candidates
    assert by_stage["decoder"].images == by_stage["upsampler"].images == 2  # one batch of two
    assert [e.index for e in events if e.stage == "decoder"] == [0, 1, 2]
    assert all(e.total == 3 for e in events if e.stage == "decoder")
    assert image_fields(images[0].info)["seed"] == 0
