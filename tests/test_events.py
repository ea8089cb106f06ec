"""The pipeline's plain-data outputs: progress events and typed image metadata."""

from __future__ import annotations

import dataclasses
import json

import pytest

from unclip.pipeline.events import (
    INFO_ATTRIBUTE,
    ImageInfo,
    ProgressEvent,
    attach_info,
    image_info,
)


def test_progress_event_is_frozen_and_knows_its_last_step():
    ev = ProgressEvent("decoder", 3, 4, images=2)
    assert ev.last and not ProgressEvent("decoder", 2, 4).last
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.index = 0  # type: ignore[misc]


def test_image_info_types_the_png_text_and_skips_non_strings():
    info = {
        "prompt": "a red square", "seed": "7", "steps": json.dumps({"decoder": 4}),
        "clip_score": "0.2500", "margins": "not json", "dpi": (72, 72), "model": "tiny",
    }  # fmt: skip
    typed = ImageInfo.from_png_text(info)
    assert typed.to_png_text() == {k: v for k, v in info.items() if k != "dpi"}
    assert typed.to_dict() == {
        "prompt": "a red square", "seed": 7, "steps": {"decoder": 4}, "clip_score": 0.25,
        "margins": "not json", "model": "tiny",
    }  # fmt: skip
    assert list(typed.to_dict()) == list(typed.to_png_text())  # the PNG's order
    assert typed.seed == 7 and typed.extra == {"margins": "not json"}


def test_image_info_writes_the_pipelines_png_text_and_reads_it_back():
    info = ImageInfo(
        method="interpolate", seed=3, model="tiny", steps={"decoder": 4}, guidance={"decoder": 8.0},
        sampler={"decoder": "ddim"}, frame=1, t=1 / 3, inverted="true", eta=0.5,
    )  # fmt: skip
    text = info.to_png_text()
    assert text == {
        "method": "interpolate", "seed": "3", "model": "tiny", "steps": '{"decoder": 4}',
        "guidance": '{"decoder": 8.0}', "sampler": '{"decoder": "ddim"}', "frame": "1",
        "t": "0.3333", "inverted": "true", "eta": "0.5",
    }  # fmt: skip
    assert info.t == 0.3333  # the value is what the PNG says
    assert ImageInfo.from_png_text(text) == info


def test_an_image_carries_its_info_until_its_text_is_changed():
    from PIL import Image

    img = attach_info(Image.new("RGB", (2, 2)), ImageInfo(method="variations", seed=4))
    assert img.info == {"method": "variations", "seed": "4"}
    assert image_info(img) is getattr(img, INFO_ATTRIBUTE)  # typed, not parsed again
    img.info["seed"] = "5"  # edited as text: read from the text
    assert image_info(img) == ImageInfo(method="variations", seed=5)
    assert image_info(img.copy()) == ImageInfo(method="variations", seed=5)  # a copy: parsed


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
    assert image_info(images[0]).seed == 0 and images[0].info["seed"] == "0"


def test_the_reproducibility_fields_round_trip_through_the_png_text():
    info = ImageInfo(
        method="mix", seed=2, model="tiny", weights_hash="0123456789ab",
        sampling={"prior_candidates": 2, "upsampler_strength": 0.5}, negative_prompt="a dog",
        inputs=[{"text": "a cat"}, {"image": "b.png"}, {"image": None}], weights=[0.5, 0.25, 0.25],
    )  # fmt: skip
    text = info.to_png_text()
    assert text["inputs"] == '[{"text": "a cat"}, {"image": "b.png"}, {"image": null}]'
    assert text["weights"] == "[0.5, 0.25, 0.25]" and text["weights_hash"] == "0123456789ab"
    assert ImageInfo.from_png_text(text) == info
    again = ImageInfo(method="image_to_image", strength=0.6, image="a.png", prompt="a cat")
    assert ImageInfo.from_png_text(again.to_png_text()) == again
    odd = ImageInfo.from_png_text({"weights": '{"a": 1}', "inputs": "not json", "strength": "x"})
    assert odd.weights is None and odd.inputs is None and odd.strength is None  # kept as text
    assert odd.extra == {"weights": '{"a": 1}', "inputs": "not json", "strength": "x"}
