"""The official ``openai`` client against a real uvicorn server (the tiny pipeline, a free
loopback port): the Images API as clients call it today (streamed generations and edits with
partial images, output formats, ``usage``, the ``unclip`` metadata of each image, errors),
and the server under concurrent load."""

from __future__ import annotations

import threading
import time
import warnings

import httpx
import openai
import pytest

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
