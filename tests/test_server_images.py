"""The Images API as clients send it today and unclip's extensions of issue #33, in process on
the tiny pipeline: output formats and compression, ``background``, ``usage``, every item's
metadata (``unclip``), negative prompts, variations with a prompt or a strength
(image-to-image), the mix route, and streamed generations and edits with partial images
taken from the decoder's x₀ predictions. (The official ``openai`` client against a real
server: ``test_openai_client.py``.)"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from server_helpers import LIMITS, GatedPipeline, assert_error, box_mask, parse_sse, png, wait_for
from tiny_pipeline import CONTEXT, OUT
from unclip.pipeline.events import ImageInfo
from unclip.server import create_app
from unclip.server.uploads import image_text

pytestmark = pytest.mark.usefixtures("one_thread")

GEN, EDIT, VAR, MIX = (
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/images/mix",
)
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: CLIP image tokens of the tiny pipeline: (16 px / 8 px patches)² + the class token
IMAGE_TOKENS = (16 // 8) ** 2 + 1


@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("data") / "gallery.sqlite"
    with TestClient(create_app(pipe, limits=LIMITS, gallery_db=db, queue_size=4)) as c:
        yield c


def upload(color=(10, 200, 30), name: str = "a.png") -> tuple[str, bytes, str]:
    return (name, png(color=color), "image/png")


def file_bytes(item: dict[str, Any]) -> bytes:
    return base64.b64decode(item["b64_json"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def first_pixels(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return pixels(file_bytes(r.json()["data"][0]))


def multipart(fields: dict[str, str]) -> dict[str, tuple[None, str]]:
    """``fields`` as the text parts of a multipart body (``files=`` of the test client)."""
    return {key: (None, value) for key, value in fields.items()}


def tokens(pipe, text: str) -> int:
    return min(len(pipe.tokenizer.encode(text)) + 2, CONTEXT)


# ---------------------------------------------------------------------------------------------
# Output formats, compression, background


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_format_b64_url_and_gallery(client, fmt):
    body = {"prompt": "a red square", "seed": 1, "output_format": fmt}
    r = client.post(GEN, json={**body, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == fmt
    data = file_bytes(r.json()["data"][0])
    assert Image.open(io.BytesIO(data)).format == PIL_FORMAT[fmt]
    meta = image_text(data)
    assert meta["prompt"] == "a red square" and meta["seed"] == "1" and meta["model"] == "tiny"
    png_pixels = first_pixels(client.post(GEN, json={**body, "output_format": "png",
                                                      "response_format": "b64_json"}))  # fmt: skip
    diff = np.abs(pixels(data).astype(int) - png_pixels.astype(int))
    if fmt == "jpeg":
        assert diff.mean() < 3  # quality 100, full-resolution colour
    else:
        assert diff.max() == 0  # png; webp at the default compression 100 is lossless

    item = client.post(GEN, json=body).json()["data"][0]  # url: stored in this format
    assert item["url"] == f"http://testserver/files/{item['id']}.{fmt}"
    f = client.get(item["url"])
    assert f.status_code == 200 and f.headers["content-type"] == f"image/{fmt}"
    assert f'filename="unclip-{item["id"]}.{fmt}"' in f.headers["content-disposition"]
    assert Image.open(io.BytesIO(f.content)).format == PIL_FORMAT[fmt]
    assert image_text(f.content)["seed"] == "1"
    assert client.get(f"/files/{item['id']}").status_code == 200
    other = "webp" if fmt == "png" else "png"
    assert_error(client.get(f"/files/{item['id']}.{other}"), 404)
    listed = client.get(f"/v1/gallery/{item['id']}").json()
    assert listed["format"] == fmt and listed["url"] == item["url"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_compression_is_the_quality(client, fmt):
    body = {"prompt": "a red square", "seed": 1, "size": "256x256", "output_format": fmt,
            "response_format": "b64_json"}  # fmt: skip
    sizes = []
    for compression in (5, 100):
        r = client.post(GEN, json={**body, "output_compression": compression})
        assert r.status_code == 200, r.text
        sizes.append(len(file_bytes(r.json()["data"][0])))
    assert sizes[0] < sizes[1] / 2


def test_output_and_background_errors(client):
    err = assert_error(client.post(GEN, json={"prompt": "x", "output_format": "gif"}), 400,
                       "output_format")  # fmt: skip
    assert "webp" in err["message"]
    for bad in (-1, 101, "50", 5.5):
        assert_error(client.post(GEN, json={"prompt": "x", "output_compression": bad}), 400,
                     "output_compression")  # fmt: skip
    err = assert_error(client.post(GEN, json={"prompt": "x", "background": "transparent"}),
                       400, "background", "unsupported_background")  # fmt: skip
    assert "transparent" in err["message"] and "opaque" in err["message"]
    assert_error(client.post(GEN, json={"prompt": "x", "background": "green"}), 400, "background")
    # the ignored OpenAI fields take their documented values only
    assert_error(client.post(GEN, json={"prompt": "x", "quality": "ultra"}), 400, "quality")
    assert client.post(GEN, json={"prompt": "x", "quality": "hd", "style": "vivid",
                                  "moderation": "low"}).status_code == 200  # fmt: skip
    for background in ("auto", "opaque"):
        r = client.post(GEN, json={"prompt": "x", "background": background})
        assert r.status_code == 200 and r.json()["background"] == "opaque"
    # multipart routes read the same fields
    r = client.post(VAR, files={"image": upload()}, data={"output_format": "bmp"})
    assert_error(r, 400, "output_format")
    r = client.post(EDIT, files={"image": upload(), "mask": ("m.png", box_mask(), "image/png")},
                    data={"prompt": "x", "background": "transparent"})  # fmt: skip
    assert_error(r, 400, "background", "unsupported_background")
    # streaming options, and routes that do not stream
    for bad in (4, -1):
        r = client.post(GEN, json={"prompt": "x", "stream": True, "partial_images": bad})
        assert_error(r, 400, "partial_images")
    assert_error(client.post(GEN, json={"prompt": "x", "stream": "yes"}), 400, "stream")
    r = client.post(VAR, files={"image": upload()}, data={"stream": "true"})
    assert_error(r, 400, "stream")


# ---------------------------------------------------------------------------------------------
# Usage and metadata


def test_usage(client, pipe):
    prompt, negative = "a red apple", "a blue square"
    r = client.post(GEN, json={"prompt": prompt, "n": 2, "steps": 3, "upsampler_steps": 2})
    usage = r.json()["usage"]
    assert usage["input_tokens_details"] == {"text_tokens": tokens(pipe, prompt), "image_tokens": 0}
    assert usage["output_tokens"] == 2 * (3 + 3 + 2)  # images × (prior + decoder + upsampler)
    assert usage["output_tokens_details"] == {"image_tokens": 2 * 8, "text_tokens": 0}
    assert usage["input_tokens"] == tokens(pipe, prompt)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # the negative prompt is read too; a prompt longer than the context is cut at it
    long = "a red square and a green circle and a blue square and a black circle"
    r = client.post(GEN, json={"prompt": long, "negative_prompt": negative})
    text = r.json()["usage"]["input_tokens_details"]["text_tokens"]
    assert text == CONTEXT + tokens(pipe, negative)
    # a variation reads one image and no text
    r = client.post(VAR, files={"image": upload()}, data={"n": "3", "decoder_steps": "2"})
    usage = r.json()["usage"]
    assert usage["input_tokens_details"] == {"text_tokens": 0, "image_tokens": IMAGE_TOKENS}
    assert usage["output_tokens"] == 3 * (2 + 2)


def test_items_carry_their_metadata_and_redo_the_image(client, pipe, monkeypatch):
    # every image sampled on its own, as the single redo below samples it: then the two are
    # equal by construction (across batch sizes they agree only up to float rounding)
    monkeypatch.setattr(pipe, "max_batch", 1)
    body = {"prompt": "a green circle", "n": 2, "seed": 4, "steps": 3, "guidance": 2.0,
            "negative_prompt": "a red square", "response_format": "b64_json"}  # fmt: skip
    items = client.post(GEN, json=body).json()["data"]
    for i, item in enumerate(items):
        meta = item["unclip"]
        assert meta["method"] == "text_to_image" and meta["seed"] == 4 + i == item["seed"]
        assert meta["prompt"] == "a green circle" and meta["negative_prompt"] == "a red square"
        assert meta["steps"] == {"prior": 3, "decoder": 3, "upsampler": 2}
        assert meta["guidance"]["decoder"] == 2.0 and meta["model"] == "tiny"
        assert isinstance(meta["weights_hash"], str) and meta["weights_hash"]
        # the same as the file's own metadata
        text = image_text(file_bytes(item))
        text.pop("software")
        assert ImageInfo.from_png_text(text).to_dict() == meta
    # the metadata alone makes the image again
    meta = items[1]["unclip"]
    redo = {
        "prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"],
        "seed": meta["seed"], "guidance": meta["guidance"]["decoder"],
        "prior_guidance": meta["guidance"]["prior"], "response_format": "b64_json",
        **{f"{stage}_steps": steps for stage, steps in meta["steps"].items()},
    }  # fmt: skip
    again = client.post(GEN, json=redo).json()["data"][0]
    assert again["b64_json"] == items[1]["b64_json"]


# ---------------------------------------------------------------------------------------------
# Negative prompts, image-to-image, mix


def test_negative_prompt_reaches_the_pipeline(client, pipe):
    body = {"prompt": "a red apple", "seed": 2, "response_format": "b64_json"}
    plain = first_pixels(client.post(GEN, json=body))
    assert np.array_equal(plain, np.asarray(pipe.text_to_image("a red apple", seed=2)[0]))
    negative = first_pixels(client.post(GEN, json={**body, "negative_prompt": "a blue square"}))
    direct = pipe.text_to_image("a red apple", seed=2, negative_prompt="a blue square")[0]
    assert np.array_equal(negative, np.asarray(direct)) and not np.array_equal(negative, plain)
    assert_error(client.post(GEN, json={**body, "negative_prompt": " "}), 400, "negative_prompt")
    assert_error(client.post(GEN, json={**body, "negative_prompt": "x" * 201}), 400,
                 "negative_prompt", "prompt_too_long")  # fmt: skip
    r = client.post(EDIT, files={"image": upload(), "mask": ("m.png", box_mask(), "image/png")},
                    data={"prompt": "a red apple", "negative_prompt": "a blue square"})  # fmt: skip
    assert r.status_code == 200 and r.json()["data"][0]["unclip"]["negative_prompt"]


def test_variations_with_a_prompt_or_strength_are_image_to_image(client, pipe):
    source = png(color=(10, 200, 30))
    fields = {"prompt": "a yellow star", "strength": "0.5", "seed": "3", "n": "2",
              "prior_steps": "2", "response_format": "b64_json"}  # fmt: skip
    r = client.post(VAR, files={"image": ("a.png", source, "image/png")}, data=fields)
    assert r.status_code == 200, r.text
    items = r.json()["data"]
    meta = items[0]["unclip"]
    assert meta["method"] == "image_to_image" and meta["strength"] == 0.5
    assert meta["prompt"] == "a yellow star" and [i["seed"] for i in items] == [3, 4]
    direct = pipe.image_to_image(Image.open(io.BytesIO(source)), "a yellow star", strength=0.5,
                                 num_images=2, seed=3, prior_steps=2)  # fmt: skip
    for item, image in zip(items, direct, strict=True):
        assert np.array_equal(pixels(file_bytes(item)), np.asarray(image))
    # a strength alone: towards the image's own embedding
    r = client.post(VAR, files={"image": upload()}, data={"strength": "0.4", "seed": "1"})
    meta = r.json()["data"][0]["unclip"]
    assert meta["method"] == "image_to_image" and "prompt" not in meta
    # plain variations stay variations
    r = client.post(VAR, files={"image": upload()}, data={"seed": "1"})
    assert r.json()["data"][0]["unclip"]["method"] == "variations"
    errors = [
        ({"strength": "0.5", "invert": "true"}, "invert"),
        ({"prompt": "a cat", "eta": "0.5"}, "eta"),
        ({"strength": "1.5"}, "strength"),
        ({"prompt": " "}, "prompt"),
        ({"prior_guidance": "2"}, "prior_guidance"),  # no prompt: no prior
    ]
    for data, param in errors:
        assert_error(client.post(VAR, files={"image": upload()}, data=data), 400, param)


def test_mix_prompts_and_images(client, pipe, tmp_path):
    blue = png(color=(0, 0, 250))
    fields = {"input_1": "a red apple", "weight_1": "0.7", "weight_2": "0.3", "seed": "5",
              "response_format": "b64_json"}  # fmt: skip
    r = client.post(MIX, files={"input_2": ("b.png", blue, "image/png")}, data=fields)
    assert r.status_code == 200, r.text
    doc = r.json()
    meta = doc["data"][0]["unclip"]
    assert meta["method"] == "mix" and meta["weights"] == [0.7, 0.3] and meta["seed"] == 5
    assert [next(iter(i)) for i in meta["inputs"]] == ["text", "image"]
    direct = pipe.mix(["a red apple", Image.open(io.BytesIO(blue))], [0.7, 0.3], seed=5)[0]
    assert np.array_equal(pixels(file_bytes(doc["data"][0])), np.asarray(direct))
    assert doc["usage"]["input_tokens_details"] == {
        "text_tokens": tokens(pipe, "a red apple"), "image_tokens": IMAGE_TOKENS,
    }  # fmt: skip
    # weights 1 and 0: the first input alone; no weights: equal
    one = {"input_1": "a red apple", "seed": "5", "response_format": "b64_json"}
    alone = first_pixels(client.post(MIX, files=multipart(one)))
    both = {**one, "input_2": "a green circle"}
    weighted = {**both, "weight_1": "1", "weight_2": "0"}
    assert np.array_equal(first_pixels(client.post(MIX, files=multipart(weighted))), alone)
    equal = client.post(MIX, files=multipart(both)).json()["data"][0]["unclip"]
    assert equal["weights"][0] == equal["weights"][1]
    # a text input is a caption, even one naming a file on the server's disk
    on_disk = tmp_path / "secret.png"
    on_disk.write_bytes(blue)
    r = client.post(MIX, files=multipart({"input_1": str(on_disk), "seed": "5"}))
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["unclip"]["inputs"] == [{"text": str(on_disk)}]
    assert r.json()["usage"]["input_tokens_details"]["image_tokens"] == 0
    errors = [
        ({}, {}, "input_1"),
        ({"input_1": "a cat", "weight_3": "1"}, {}, "weight_3"),
        ({**both, "weight_1": "1"}, {}, "weight_2"),
        ({**both, "weight_1": "0", "weight_2": "0"}, {}, "weight_1"),
        ({**both, "weight_1": "-1", "weight_2": "1"}, {}, "weight_1"),
        ({"input_1": "a cat"}, {"input_1": ("a.png", blue, "image/png")}, "input_1"),
        ({"input_1": " "}, {}, "input_1"),
        ({"input_5": "a cat"}, {}, "input_5"),
        ({"prior_steps": "2"}, {"input_1": ("a.png", blue, "image/png")}, "prior_steps"),
    ]
    for data, files, param in errors:
        parts = [*multipart({"n": "1", **data}).items(), *files.items()]  # a key may repeat
        r = client.post(MIX, files=parts)
        assert_error(r, 400, param)


# ---------------------------------------------------------------------------------------------
# Streaming


def stream(client, path: str, **kwargs: Any) -> list[dict[str, Any]]:
    with client.stream("POST", path, **kwargs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(r.read().decode())


def x0_pixels(x0) -> list[np.ndarray]:
    """x₀ predictions [N, 3, s, s] in [-1, 1] as OUT × OUT RGB arrays (Lanczos)."""
    rows = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = [Image.fromarray(r.permute(1, 2, 0).numpy(), "RGB") for r in rows]
    return [np.asarray(im.resize((OUT, OUT), Image.Resampling.LANCZOS)) for im in images]


def test_stream_generation_partials_are_the_decoders_x0(client, pipe):
    body = {"prompt": "a red square", "n": 2, "seed": 3, "decoder_steps": 5, "stream": True,
            "partial_images": 2}  # fmt: skip
    events = stream(client, GEN, json=body)
    names = [e["event"] for e in events]
    assert names == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partials = [e["data"] for e in events[:4]]
    assert sorted((p["image_index"], p["partial_image_index"]) for p in partials) == [
        (0, 0), (0, 1), (1, 0), (1, 1),
    ]  # fmt: skip
    for p in partials:
        assert p["type"] == "image_generation.partial_image" and isinstance(p["created_at"], int)
        assert (p["size"], p["quality"], p["background"], p["output_format"]) == (
            f"{OUT}x{OUT}", "auto", "auto", "png",
        )  # fmt: skip
        # 5 steps in 3 parts: partials at the ends of the first two (steps 2 and 4 of 5)
        assert p["unclip"] == {"stage": "decoder", "step": 2 + 2 * p["partial_image_index"],
                               "steps": 5}  # fmt: skip
    # the partial images are the decoder's x₀ predictions at those steps
    seen: dict[int, Any] = {}

    def progress(stage: str, event: Any) -> None:
        if stage == "decoder":
            seen[event.index] = event.step.pred_x0.clone()

    pipe.text_to_image("a red square", n=2, seed=3, decoder_steps=5, progress=progress)
    for p in partials:
        expected = x0_pixels(seen[1 + 2 * p["partial_image_index"]])[p["image_index"]]
        assert np.array_equal(pixels(file_bytes(p)), expected)
    # then the images, as the same request without streaming gives them
    plain = client.post(GEN, json={**body, "stream": False, "response_format": "b64_json"})
    completed = [e["data"] for e in events[4:]]
    for k, (c, item) in enumerate(zip(completed, plain.json()["data"], strict=True)):
        assert c["type"] == "image_generation.completed" and c["image_index"] == k
        assert c["b64_json"] == item["b64_json"] and c["unclip"] == item["unclip"]
        assert c["seed"] == 3 + k and c["url"].endswith(f"{c['id']}.png")
        assert c["usage"]["output_tokens"] == 2 + 5 + 2  # this image's steps
        assert c["usage"]["input_tokens"] == plain.json()["usage"]["input_tokens"]


def test_stream_edit_in_jpeg_and_no_partials(client):
    files = {"image": upload(), "mask": ("m.png", box_mask(), "image/png")}
    data = {"prompt": "a red apple", "stream": "true", "partial_images": "1",
            "output_format": "jpeg", "quality": "high"}  # fmt: skip
    events = stream(client, EDIT, files=files, data=data)
    assert [e["event"] for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    partial, done = (e["data"] for e in events)
    assert partial["unclip"]["stage"] == "inpaint" and partial["quality"] == "high"
    for e in (partial, done):
        assert e["output_format"] == "jpeg"
        assert Image.open(io.BytesIO(file_bytes(e))).format == "JPEG"
    assert done["unclip"]["method"] == "inpaint" and done["usage"]["input_tokens"] > 0
    # partial_images 0 (or none): the images only
    events = stream(client, GEN, json={"prompt": "a red apple", "stream": True, "n": 2})
    assert [e["event"] for e in events] == ["image_generation.completed"] * 2


class FailingPipeline:
    """The tiny pipeline, except that ``text_to_image`` raises ``error`` at the decoder's
    fourth step (after the partial image at its third, of one partial in four steps)."""

    def __init__(self, pipe: Any, error: Exception) -> None:
        self._pipe = pipe
        self.error = error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def text_to_image(self, *args: Any, progress: Any, **kwargs: Any) -> Any:
        def failing(stage: str, event: Any) -> None:
            progress(stage, event)
            if stage == "decoder" and event.index == 3:
                raise self.error

        return self._pipe.text_to_image(*args, progress=failing, **kwargs)


@pytest.mark.parametrize(
    ("error", "status_type"),
    [
        (ValueError("no such thing"), "invalid_request_error"),
        (RuntimeError("oops"), "server_error"),
    ],
)
def test_a_failure_while_streaming_is_an_error_event(pipe, error, status_type):
    app = create_app(FailingPipeline(pipe, error), limits=LIMITS)
    body = {"prompt": "x", "stream": True, "partial_images": 1, "decoder_steps": 4}
    with TestClient(app) as c:
        events = stream(c, GEN, json=body)
    assert [e["event"] for e in events] == ["image_generation.partial_image", "error"]
    err = events[-1]["data"]["error"]
    assert err["type"] == status_type and str(error) in err["message"]


def test_a_stream_is_refused_before_it_starts_when_the_queue_is_full(pipe):
    gated = GatedPipeline(pipe)
    app = create_app(gated, limits=LIMITS, workers=1, queue_size=1)
    later = {"Prefer": "respond-async"}
    try:
        with TestClient(app) as c:
            a = c.post(GEN, json={"prompt": "a"}, headers=later).json()
            wait_for(lambda: c.get(f"/v1/jobs/{a['id']}").json()["status"] == "running")
            c.post(GEN, json={"prompt": "b"}, headers=later)
            r = c.post(GEN, json={"prompt": "c", "stream": True})
            assert_error(r, 429, code="queue_full")
            assert r.headers["content-type"] == "application/json"
            gated.gate.set()
    finally:
        gated.gate.set()


# ---------------------------------------------------------------------------------------------
# The OpenAPI document and the status


def test_openapi_and_status_list_the_new_fields(client):
    doc = client.get("/openapi.json").json()
    gen = doc["paths"][GEN]["post"]
    props = gen["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for key in ("output_format", "output_compression", "background", "negative_prompt",
                "stream", "partial_images"):  # fmt: skip
        assert key in props, key
    assert set(gen["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "text/event-stream" in doc["paths"][EDIT]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" not in doc["paths"][VAR]["post"]["responses"]["200"]["content"]
    variation = doc["paths"][VAR]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"prompt", "strength", "negative_prompt"} <= set(variation["schema"]["properties"])
    mix = doc["paths"][MIX]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"input_1", "input_4", "weight_1", "weight_4"} <= set(mix["properties"])
    assert "binary" not in str(mix["properties"]["input_1"])  # a prompt, or a file
    files = doc["paths"]["/files/{name}"]["get"]["responses"]["200"]["content"]
    assert {"image/png", "image/jpeg", "image/webp"} <= set(files)
    assert client.get("/v1/status").json()["output_formats"] == ["png", "jpeg", "webp"]


def test_import_of_the_app_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, unclip.server.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
