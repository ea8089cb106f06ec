"""The official ``openai`` client against a real uvicorn server (the tiny pipeline, a free
loopback port): the Images API as clients call it today (streamed generations and edits with
partial images, output formats, ``usage``, the ``unclip`` metadata of each image, errors),
and the server under concurrent load."""

from __future__ import annotations

import io
import threading
import time
import warnings

import httpx
import openai
import pytest
from PIL import Image

from server_helpers import LIMITS, GatedPipeline, box_mask, decode, png, serving, wait_for
from tiny_pipeline import OUT
from unclip.server import create_app
from unclip.server.jobs import JobCancelled
from unclip.server.uploads import png_text

pytestmark = pytest.mark.usefixtures("one_thread")


def test_openai_client(pipe):
    app = create_app(pipe, limits=LIMITS, api_key="k-123")
    with serving(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0)
        gen = client.images.generate(
            prompt="cherry blossom, noto style", n=2, response_format="b64_json",
            extra_body={"seed": 4, "steps": 2},
        )  # fmt: skip
        assert len(gen.data) == 2
        assert all(decode(d.b64_json).size == (OUT, OUT) for d in gen.data)
        edit = client.images.edit(
            image=("a.png", png(), "image/png"),
            mask=("m.png", box_mask(), "image/png"),
            prompt="a red apple",
            response_format="b64_json",
        )
        assert decode(edit.data[0].b64_json).size == (OUT, OUT)
        with warnings.catch_warnings():  # the variations endpoint is deprecated upstream
            warnings.simplefilter("ignore", DeprecationWarning)
            var = client.images.create_variation(image=("a.png", png(), "image/png"), n=1)
        assert var.data[0].url.startswith(base)
        fetched = httpx.get(var.data[0].url)
        assert fetched.status_code == 200 and png_text(fetched.content)["method"] == "variations"
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", n=9)
        assert e.value.status_code == 400 and e.value.body["param"] == "n"
        with pytest.raises(openai.BadRequestError):
            client.images.edit(
                image=("a.png", png(), "image/png"),
                mask=("m.png", box_mask((8, 8)), "image/png"),
                prompt="x",
            )
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt="x")


def test_concurrent_load_bounded(pipe):
    """24 concurrent requests against 1 worker and 2 queue slots: each one gets its images or
    a 429, the accepted ones all finish, and the server keeps serving."""
    gated = GatedPipeline(pipe)
    app = create_app(gated, limits=LIMITS, workers=1, queue_size=2)
    results: list[int] = []
    lock = threading.Lock()
    try:
        with serving(app) as base, httpx.Client(base_url=base, timeout=60) as http:

            def one(i: int) -> None:
                r = http.post("/v1/images/generations", json={"prompt": f"p{i}", "seed": i})
                with lock:
                    results.append(r.status_code)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1

            threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
            for t in threads:
                t.start()
            wait_for(lambda: results.count(429) >= 21)
            gated.gate.set()
            for t in threads:
                t.join(60)
            assert len(results) == 24 and set(results) <= {200, 429}
            assert 2 <= results.count(200) <= 3  # 1 running + 2 waiting (or 2 if all queued first)
            assert http.get("/v1/status").json()["queue"]["queued"] == 0
            assert http.post("/v1/images/generations", json={"prompt": "after"}).status_code == 200
    finally:
        gated.gate.set()


def test_client_disconnect_cancels_the_job(pipe):
    gated = GatedPipeline(pipe)
    app = create_app(gated, limits=LIMITS, workers=1, queue_size=1)
    try:
        with serving(app) as base:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"}, timeout=0.3)
            time.sleep(1.0)  # the server polls for a disconnect every 0.5 s
            gated.gate.set()
            wait_for(lambda: len(gated.raised) == 1)
            assert isinstance(gated.raised[0], JobCancelled)
            status = httpx.get(f"{base}/v1/status").json()["queue"]
            assert status["running"] == 0
    finally:
        gated.gate.set()


# ---------------------------------------------------------------------------------------------
# Today's Images API through the official client: streaming, output formats, usage


def test_openai_client_streams_partial_images_then_the_image(pipe):
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    app = create_app(pipe, limits=LIMITS)
    with serving(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        events = list(
            client.images.generate(
                prompt="cherry blossom, noto style", stream=True, partial_images=2,
                extra_body={"seed": 6, "decoder_steps": 4},
            )
        )  # fmt: skip
        plain = client.images.generate(
            prompt="cherry blossom, noto style", response_format="b64_json",
            extra_body={"seed": 6, "decoder_steps": 4},
        )  # fmt: skip
    assert [type(e) for e in events] == [
        ImageGenPartialImageEvent, ImageGenPartialImageEvent, ImageGenCompletedEvent,
    ]  # fmt: skip
    partials, done = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]
    for p in partials:
        assert p.type == "image_generation.partial_image" and p.output_format == "png"
        assert decode(p.b64_json).size == (OUT, OUT) and p.size == f"{OUT}x{OUT}"
    assert done.type == "image_generation.completed" and done.background == "auto"
    image = decode(done.b64_json)
    assert image.format == "PNG" and image.size == (OUT, OUT)
    assert done.b64_json == plain.data[0].b64_json  # the image a plain request gives
    assert done.usage.output_tokens == 2 + 4 + 2 and done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    # unclip's extensions reach the client as extra fields
    assert done.model_extra["unclip"]["seed"] == 6 and done.model_extra["image_index"] == 0
    assert plain.data[0].model_extra["unclip"]["steps"]["decoder"] == 4
    assert plain.usage is not None and plain.usage.output_tokens == done.usage.output_tokens


def test_openai_client_edits_in_webp_and_streams_an_edit(pipe):
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent

    app = create_app(pipe, limits=LIMITS)
    image, mask = ("a.png", png(), "image/png"), ("m.png", box_mask(), "image/png")
    with serving(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        edit = client.images.edit(
            image=image, mask=mask, prompt="a red apple", output_format="webp",
            response_format="b64_json", extra_body={"seed": 2},
        )  # fmt: skip
        url_edit = client.images.edit(
            image=image, mask=mask, prompt="a red apple", output_format="webp",
            output_compression=40,
        )  # fmt: skip
        fetched = httpx.get(url_edit.data[0].url)
        events = list(
            client.images.edit(
                image=image, mask=mask, prompt="a red apple", stream=True, partial_images=1,
                output_format="jpeg", extra_body={"seed": 2},
            )
        )  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", output_format="gif")
        assert e.value.body["param"] == "output_format"
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", background="transparent")
        assert e.value.body["code"] == "unsupported_background"
    assert edit.output_format == "webp" and edit.usage.input_tokens_details.image_tokens > 0
    webp = decode(edit.data[0].b64_json)
    assert webp.format == "WEBP" and webp.size == (OUT, OUT)
    assert edit.data[0].model_extra["unclip"]["method"] == "inpaint"
    assert url_edit.data[0].url.endswith(".webp")
    assert fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).format == "WEBP"
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]
    assert decode(events[1].b64_json).format == "JPEG"
    assert events[1].model_extra["unclip"]["seed"] == 2


class GatedStream:
    """The tiny pipeline, except that ``text_to_image`` waits for ``gate`` after the
    decoder's second step (so a request streaming three partials of four steps has sent
    its first)."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self.gate = threading.Event()
        self.raised: list[BaseException] = []

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def text_to_image(self, *args, progress, **kwargs):
        def gated(stage, event):
            progress(stage, event)
            if stage == "decoder" and event.index == 1:
                assert self.gate.wait(30), "gate never opened"

        try:
            return self._pipe.text_to_image(*args, progress=gated, **kwargs)
        except BaseException as e:
            self.raised.append(e)
            raise


def test_a_client_leaving_a_stream_cancels_the_job(pipe):
    gated = GatedStream(pipe)
    app = create_app(gated, limits=LIMITS, workers=1, queue_size=1)
    body = {"prompt": "x", "stream": True, "partial_images": 3, "decoder_steps": 4}
    try:
        with serving(app) as base:
            with httpx.stream("POST", f"{base}/v1/images/generations", json=body) as r:
                lines = r.iter_lines()
                assert next(lines) == "event: image_generation.partial_image"
            queue = app.state.unclip.queue
            wait_for(lambda: all(j.cancel_reason for j in queue._running))
            gated.gate.set()
            wait_for(lambda: len(gated.raised) == 1)
            assert isinstance(gated.raised[0], JobCancelled)
            wait_for(lambda: httpx.get(f"{base}/v1/status").json()["queue"]["running"] == 0)
    finally:
        gated.gate.set()
