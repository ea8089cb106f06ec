"""The server on a tiny random pipeline: the OpenAI Images API over raw HTTP, every error
path, the queue (429, timeouts, cancel), SSE progress, the gallery, the page and ``unclip
serve``. (The official ``openai`` client against a real server: ``test_openai_client.py``;
the fields of today's Images API, streaming and the extensions of issue #33:
``test_server_images.py``.)"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server_helpers import (
    LIMITS,
    GatedPipeline,
    assert_error,
    bomb_png,
    box_mask,
    decode,
    parse_sse,
    png,
    wait_for,
)
from tiny_pipeline import OUT
from unclip import cli
from unclip.server import Limits, create_app
from unclip.server.bodies import MULTIPART_OVERHEAD
from unclip.server.jobs import Job, JobQueue, QueueFull
from unclip.server.uploads import png_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gallery_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "gallery.sqlite"


@pytest.fixture(scope="module")
def client(pipe, gallery_db) -> Iterator[TestClient]:
    app = create_app(pipe, limits=LIMITS, gallery_db=gallery_db, queue_size=4)
    with TestClient(app) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# The Images API over raw HTTP


def test_generations_b64_json_reproducible(client):
    body = {"prompt": "a red square", "n": 2, "seed": 5, "response_format": "b64_json"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert isinstance(doc["created"], int) and doc["size"] == f"{OUT}x{OUT}"
    assert [d["seed"] for d in doc["data"]] == [5, 6]
    images = [decode(d["b64_json"]) for d in doc["data"]]
    assert all(im.size == (OUT, OUT) and im.format == "PNG" for im in images)
    meta = png_text(base64.b64decode(doc["data"][0]["b64_json"]))
    assert meta["prompt"] == "a red square" and meta["seed"] == "5" and meta["model"] == "tiny"
    again = client.post("/v1/images/generations", json={**body, "n": 1, "seed": 6}).json()
    assert again["data"][0]["b64_json"] == doc["data"][1]["b64_json"]  # seed s+i = seed s+i


def test_generations_url_size_and_overrides(client):
    r = client.post(
        "/v1/images/generations",
        json={"prompt": "a green circle", "size": "256x256", "steps": 3, "guidance": 2.0},
    )
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert item["url"].startswith("http://testserver/files/") and "b64_json" not in item
    f = client.get(item["url"])
    assert f.status_code == 200 and f.headers["content-type"] == "image/png"
    meta = png_text(f.content)
    assert Image.open(io.BytesIO(f.content)).size == (256, 256)
    assert meta["resized_from"] == f"{OUT}x{OUT}"
    assert json.loads(meta["steps"]) == {"prior": 3, "decoder": 3, "upsampler": 2}
    assert json.loads(meta["guidance"])["decoder"] == 2.0
    assert_error(client.post("/v1/images/generations", json={"prompt": "x", "size": "300x300"}),
                 400, "size")  # fmt: skip


def test_variations_edits_interpolations(client):
    r = client.post(
        "/v1/images/variations",
        files={"image": ("a.png", png(), "image/png")},
        data={"n": "2", "seed": "3", "response_format": "b64_json", "decoder_steps": "2"},
    )
    assert r.status_code == 200, r.text
    assert [d["seed"] for d in r.json()["data"]] == [3, 4]
    assert png_text(base64.b64decode(r.json()["data"][0]["b64_json"]))["method"] == "variations"

    source = np.array(Image.new("RGB", (20, 20), (10, 200, 30)))
    r = client.post(
        "/v1/images/edits",
        files={"image": ("a.png", png(color=(10, 200, 30)), "image/png"),
               "mask": ("m.png", box_mask(box=(0, 0, 20, 10)), "image/png")},
        data={"prompt": "a red apple", "seed": "1", "response_format": "b64_json"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    out = np.array(decode(r.json()["data"][0]["b64_json"]).convert("RGB"))
    # the black (keep) half is the input's, exactly
    kept = np.array(Image.fromarray(source).resize((OUT, OUT)))[OUT // 2 + 1 :]
    assert np.abs(out[OUT // 2 + 1 :].astype(int) - kept.astype(int)).max() <= 1

    # no mask: the image's transparent pixels are repainted; `image[]` as the openai client
    # sends a list
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    r = client.post(
        "/v1/images/edits",
        files={"image[]": ("t.png", buf.getvalue(), "image/png")},
        data={"prompt": "a blue square"},
    )
    assert r.status_code == 200, r.text

    r = client.post(
        "/v1/images/interpolations",
        files={"image_a": ("a.png", png(), "image/png"),
               "image_b": ("b.png", png(color=(0, 0, 250)), "image/png")},
        data={"frames": "3", "seed": "2", "response_format": "b64_json"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    frames = [png_text(base64.b64decode(d["b64_json"])) for d in r.json()["data"]]
    assert [f["frame"] for f in frames] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------
# Error paths


def test_json_errors(client):
    gen = "/v1/images/generations"
    json_type = {"Content-Type": "application/json"}
    r = client.post(gen, content=b"{not json", headers=json_type)
    err = assert_error(r, 400, code="invalid_json")
    assert "JSON" in err["message"]
    assert_error(client.post(gen, json=["a list"]), 400, code="invalid_json")
    err = assert_error(client.post(gen, json={"prompt": "x", "stepz": 3}), 400, "stepz")
    assert "Unrecognized request argument" in err["message"]
    assert_error(client.post(gen, json={"n": 1}), 400, "prompt")
    assert_error(client.post(gen, json={"prompt": "   "}), 400, "prompt")
    assert_error(client.post(gen, json={"prompt": "x" * 201}), 400, "prompt", "prompt_too_long")
    assert_error(client.post(gen, json={"prompt": "x", "n": 5}), 400, "n")
    assert_error(client.post(gen, json={"prompt": "x", "n": "many"}), 400, "n")
    assert_error(client.post(gen, json={"prompt": "x", "steps": 21}), 400, "steps")
    assert_error(client.post(gen, json={"prompt": "x", "prior_guidance": 500}), 400)
    assert_error(client.post(gen, json={"prompt": "x", "response_format": "gif"}), 400,
                 "response_format")  # fmt: skip
    assert_error(client.post(gen, json={"prompt": "x", "seed": -1}), 400, "seed")
    from unclip.pipeline.settings import MAX_IMAGES, MAX_SEED  # the CLI's bound too

    big = client.post(gen, json={"prompt": "x", "seed": 2**62 + 1, "response_format": "b64_json"})
    assert big.status_code == 200 and big.json()["data"][0]["seed"] == 2**62 + 1
    assert_error(client.post(gen, json={"prompt": "x", "seed": MAX_SEED}), 400, "seed")
    assert_error(
        client.post(gen, json={"prompt": "x", "seed": MAX_SEED - MAX_IMAGES + 1}), 400, "seed"
    )
    # variations have no prior: its options are unknown there
    r = client.post("/v1/images/variations", files={"image": ("a.png", png(), "image/png")},
                    data={"prior_steps": "2"})  # fmt: skip
    assert_error(r, 400, "prior_steps")


def test_pipeline_errors_are_400(client, pipe):
    # more steps than the tiny upsampler has timesteps: refused by the pipeline, before queueing
    assert pipe.upsamplers[0].diffusion.num_timesteps < LIMITS.max_steps + 100
    r = client.post("/v1/images/generations", json={"prompt": "x", "upsampler_steps": 20})
    assert r.status_code == 200  # 20 <= 50 timesteps: fine
    tiny_limits = Limits(max_steps=1000)
    app = create_app(pipe, limits=tiny_limits)
    with TestClient(app) as c:
        err = assert_error(c.post("/v1/images/generations", json={"prompt": "x", "steps": 60}), 400)
        assert "timesteps" in err["message"]


def test_upload_errors(client):
    edits, variations = "/v1/images/edits", "/v1/images/variations"
    image = ("a.png", png(), "image/png")
    r = client.post(variations, files={"image": ("a.txt", b"not an image at all", "text/plain")})
    assert_error(r, 400, "image", "invalid_image")
    r = client.post(variations, files={"image": ("a.png", b"", "image/png")})
    assert_error(r, 400, "image", "invalid_image")
    truncated = png((64, 64), (1, 2, 3))[:-30]
    assert_error(client.post(variations, files={"image": ("a.png", truncated, "image/png")}),
                 400, "image", "invalid_image")  # fmt: skip
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>'
    assert_error(client.post(variations, files={"image": ("a.svg", svg, "image/svg+xml")}),
                 400, "image", "invalid_image")  # fmt: skip
    assert_error(client.post(variations, files={"n": (None, "1")}), 400, "image")
    assert_error(client.post(variations, data={"n": "1"}), 415, code="invalid_content_type")
    assert_error(client.post(variations, json={"image": "x"}), 415, code="invalid_content_type")
    assert_error(client.post(variations, files={"image": image, "extra": image}), 400, "extra")
    # mask of another size; no mask and no transparency; a mask that keeps everything
    r = client.post(edits, files={"image": image, "mask": ("m.png", box_mask((8, 8)), "image/png")},
                    data={"prompt": "x"})  # fmt: skip
    assert_error(r, 400, "mask", "mask_size_mismatch")
    assert_error(client.post(edits, files={"image": image}, data={"prompt": "x"}), 400, "mask")
    black = ("m.png", png(mode="L", color=0), "image/png")
    r = client.post(edits, files={"image": image, "mask": black}, data={"prompt": "x"})
    assert_error(r, 400, "mask")
    r = client.post(edits, files={"image": image, "mask": ("m.png", box_mask(), "image/png")})
    assert_error(r, 400, "prompt")


def test_size_limits(client):
    variations = "/v1/images/variations"
    # a decompression bomb: a small file declaring 400 megapixels is refused undecoded
    bomb = bomb_png()
    assert len(bomb) < LIMITS.max_upload_bytes
    t = time.perf_counter()
    r = client.post(variations, files={"image": ("bomb.png", bomb, "image/png")})
    assert_error(r, 400, "image", "image_too_large")
    assert time.perf_counter() - t < 5
    # a file over the upload limit, inside the body limit
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert LIMITS.max_upload_bytes < len(buf.getvalue()) < 2 * LIMITS.max_upload_bytes
    r = client.post(variations, files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert_error(r, 413, "image", "file_too_large")
    # a body over the route's limit: refused on Content-Length, before it is read
    big = b"0" * (2 * LIMITS.max_upload_bytes + MULTIPART_OVERHEAD + 1)
    r = client.post(variations, files={"image": ("big.png", big, "image/png")})
    assert_error(r, 413, code="request_too_large")
    r = client.post("/v1/images/generations", json={"prompt": "x" * (LIMITS.max_json_bytes + 1)})
    assert_error(r, 413, code="request_too_large")


def test_body_limit_while_streaming(client):
    """A chunked body without Content-Length is cut off at the limit too."""

    def chunks():
        for _ in range(40):
            yield b"x" * 1024

    r = client.post(
        "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(r, 413, code="request_too_large")


def test_unknown_routes_and_methods(client):
    err = assert_error(client.get("/v1/nothing"), 404)
    assert "/v1/nothing" in err["message"]
    assert_error(client.get("/v1/images/generations"), 405)
    assert_error(client.get("/v1/jobs/0123"), 404)
    assert_error(client.get("/files/" + "0" * 32 + ".png"), 404)
    assert_error(client.get("/files/..%2Fgallery.sqlite"), 404)


def test_cross_origin_and_host_checks(pipe):
    app = create_app(pipe, limits=LIMITS, allowed_hosts=("127.0.0.1", "localhost"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/status").status_code == 200
        evil = {"Origin": "http://evil.example"}
        r = c.post("/v1/images/generations", json={"prompt": "x"}, headers=evil)
        assert_error(r, 403)
        same = {"Origin": "http://127.0.0.1:8000"}
        r = c.post("/v1/images/generations", json={"prompt": "x"}, headers=same)
        assert r.status_code == 200
        assert_error(c.get("/v1/status", headers={"Host": "rebound.example:8000"}), 400)


# ---------------------------------------------------------------------------------------------
# API key


def test_api_key(pipe):
    app = create_app(pipe, limits=LIMITS, api_key="s3cret")
    with TestClient(app) as c:
        err = assert_error(c.get("/v1/status"), 401, code="missing_api_key")
        assert c.get("/v1/status").headers["www-authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer wrong"}
        assert_error(c.post("/v1/images/generations", json={"prompt": "x"}, headers=bad), 401,
                     code="invalid_api_key")  # fmt: skip
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/status", headers=good).status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "x"}, headers=good)
        assert r.status_code == 200
        # the page, the OpenAPI document and result files (capability URLs) need no key
        assert c.get("/").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get(r.json()["data"][0]["url"]).status_code == 200
        assert err["message"]


# ---------------------------------------------------------------------------------------------
# Queue: 429, timeouts, cancellation


def test_queue_full_429(pipe):
    gated = GatedPipeline(pipe)
    app = create_app(gated, limits=LIMITS, workers=1, queue_size=1)
    async_ = {"Prefer": "respond-async"}
    try:
        with TestClient(app) as c:
            a = c.post("/v1/images/generations", json={"prompt": "a"}, headers=async_)
            assert a.status_code == 202 and a.headers["location"] == f"/v1/jobs/{a.json()['id']}"
            wait_for(lambda: c.get(f"/v1/jobs/{a.json()['id']}").json()["status"] == "running")
            b = c.post("/v1/images/generations", json={"prompt": "b"}, headers=async_)
            assert b.status_code == 202 and b.json()["status"] == "queued"
            for headers in (async_, {}):
                r = c.post("/v1/images/generations", json={"prompt": "c"}, headers=headers)
                err = assert_error(r, 429, code="queue_full")
                assert err["type"] == "requests"
                assert int(r.headers["retry-after"]) >= 1
            assert c.get("/v1/status").json()["queue"] == {
                "workers": 1, "size": 1, "queued": 1, "running": 1,
            }  # fmt: skip
            gated.gate.set()
            for job in (a, b):
                jid = job.json()["id"]
                wait_for(lambda jid=jid: c.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded")
            done = c.get(f"/v1/jobs/{b.json()['id']}").json()
            assert len(done["result"]["data"]) == 1 and done["progress"]["fraction"] == 1.0
            # the queue drained: a new request is served
            assert c.post("/v1/images/generations", json={"prompt": "d"}).status_code == 200
    finally:
        gated.gate.set()


def test_request_timeout_frees_the_worker(pipe):
    gated = GatedPipeline(pipe)
    limits = Limits(request_timeout=0.5)
    app = create_app(gated, limits=limits, workers=1, queue_size=2)
    try:
        with TestClient(app) as c:
            t = time.perf_counter()
            r = c.post("/v1/images/generations", json={"prompt": "slow"})
            assert_error(r, 504, code="timeout")
            assert r.json()["error"]["type"] == "server_error"
            assert time.perf_counter() - t < 5
            gated.gate.set()  # the stuck job resumes, sees its deadline and stops
            r = c.post("/v1/images/generations", json={"prompt": "fast"})
            assert r.status_code == 200, r.text
    finally:
        gated.gate.set()


def test_cancel_jobs(pipe):
    gated = GatedPipeline(pipe)
    app = create_app(gated, limits=LIMITS, workers=1, queue_size=2)
    async_ = {"Prefer": "respond-async"}
    try:
        with TestClient(app) as c:
            a = c.post("/v1/images/generations", json={"prompt": "a"}, headers=async_).json()
            wait_for(lambda: c.get(f"/v1/jobs/{a['id']}").json()["status"] == "running")
            b = c.post("/v1/images/generations", json={"prompt": "b"}, headers=async_).json()
            queued = c.delete(f"/v1/jobs/{b['id']}").json()
            assert queued["status"] == "cancelled" and queued["error"]["code"] == "cancelled"
            c.delete(f"/v1/jobs/{a['id']}")
            gated.gate.set()
            wait_for(lambda: c.get(f"/v1/jobs/{a['id']}").json()["status"] == "cancelled")
            assert c.get(f"/v1/jobs/{a['id']}").json()["result"] is None
    finally:
        gated.gate.set()


def test_finished_jobs_are_forgotten(pipe, monkeypatch):
    from unclip.server import state

    monkeypatch.setattr(state, "MAX_KEPT_JOBS", 2)
    with TestClient(create_app(pipe, limits=LIMITS)) as c:
        ids = []
        for i in range(3):
            r = c.post("/v1/images/generations", json={"prompt": f"p{i}"},
                       headers={"Prefer": "respond-async"})  # fmt: skip
            ids.append(r.json()["id"])
            wait_for(lambda: c.get(f"/v1/jobs/{ids[-1]}").json()["status"] == "succeeded")
        assert_error(c.get(f"/v1/jobs/{ids[0]}"), 404)
        assert c.get(f"/v1/jobs/{ids[2]}").status_code == 200


def test_two_workers_give_the_same_bytes(pipe):
    """Two worker threads share the pipeline: concurrent results equal sequential ones."""
    body = {"prompt": "a black circle", "seed": 11, "response_format": "b64_json"}
    with TestClient(create_app(pipe, limits=LIMITS, workers=2)) as c:
        expected = c.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
        out: list[str] = []

        def one() -> None:
            r = c.post("/v1/images/generations", json=body)
            out.append(r.json()["data"][0]["b64_json"])

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert out == [expected] * 4


def test_job_queue_alone():
    gate = threading.Event()
    q = JobQueue(workers=1, queue_size=1)
    first = q.submit(Job(lambda progress: gate.wait(10), kind="hold"))
    wait_for(lambda: first.status == "running")
    second = q.submit(Job(lambda progress: "ok"))
    with pytest.raises(QueueFull) as e:
        q.submit(Job(lambda progress: "no"))
    assert e.value.retry_after >= 1
    gate.set()
    assert second.wait(10) and second.result == "ok"
    # close cancels what waits
    gate.clear()
    third = q.submit(Job(lambda progress: gate.wait(10)))
    wait_for(lambda: third.status == "running")
    fourth = q.submit(Job(lambda progress: "never"))
    q.close(timeout=0.5)
    assert fourth.status == "cancelled" and fourth.result is None
    gate.set()
    with pytest.raises(RuntimeError):
        q.submit(Job(lambda progress: None))


# ---------------------------------------------------------------------------------------------
# Progress as server-sent events


def test_sse_progress(client):
    r = client.post(
        "/v1/images/generations",
        json={"prompt": "a yellow star", "n": 2, "seed": 0},
        headers={"Prefer": "respond-async"},
    )
    assert r.status_code == 202
    job = r.json()
    with client.stream("GET", job["events_url"]) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(s.read().decode())
    names = [e["event"] for e in events]
    assert names[:2] == ["queued", "started"] and names[-1] == "done"
    progress = [e["data"] for e in events if e["event"] == "progress"]
    assert {p["stage"] for p in progress} == {"prior", "decoder", "upsampler"}
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert progress[-1]["image"] == 2 and progress[-1]["images"] == 2
    done = events[-1]["data"]
    assert done["status"] == "succeeded" and [d["seed"] for d in done["result"]["data"]] == [0, 1]
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
    # resume after an event id (as EventSource does on reconnect)
    started = next(e for e in events if e["event"] == "started")
    with client.stream("GET", job["events_url"], headers={"Last-Event-ID": started["id"]}) as s:
        again = parse_sse(s.read().decode())
    assert again and int(again[0]["id"]) == int(started["id"]) + 1
    assert again[-1]["event"] == "done"
    assert client.get(f"/v1/jobs/{job['id']}").json()["result"] == done["result"]


# ---------------------------------------------------------------------------------------------
# Gallery


def test_gallery_persists(client, pipe, gallery_db):
    r = client.post("/v1/images/generations", json={"prompt": "a smiling face", "n": 3, "seed": 9})
    ids = [d["id"] for d in r.json()["data"]]
    page = client.get("/v1/gallery", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert {it["id"] for it in page["data"]} <= set(ids)  # newest first
    rest = client.get("/v1/gallery", params={"limit": 200, "before": page["data"][-1]["id"]})
    listed = [it["id"] for it in page["data"] + rest.json()["data"]]
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    item = client.get(f"/v1/gallery/{ids[0]}").json()
    assert (
        item["prompt"] == "a smiling face"
        and item["seed"] == 9
        and item["method"] == "text_to_image"
    )
    assert item["width"] == OUT and item["info"]["model"] == "tiny"
    assert (gallery_db.parent / "images" / f"{ids[0]}.png").is_file()
    # a new server on the same database sees the same gallery
    with TestClient(create_app(pipe, gallery_db=gallery_db)) as other:
        assert other.get(f"/v1/gallery/{ids[1]}").json()["prompt"] == "a smiling face"
        assert other.get(item["url"].replace("http://testserver", "")).status_code == 200
    assert client.delete(f"/v1/gallery/{ids[0]}").json()["deleted"] is True
    assert_error(client.get(f"/v1/gallery/{ids[0]}"), 404)
    assert_error(client.delete(f"/v1/gallery/{ids[0]}"), 404)
    assert not (gallery_db.parent / "images" / f"{ids[0]}.png").exists()
    assert_error(client.get(f"/files/{ids[0]}.png"), 404)


def test_no_gallery(pipe):
    with TestClient(create_app(pipe, limits=LIMITS)) as c:
        assert_error(c.get("/v1/gallery"), 404, code="no_gallery")
        r = c.post("/v1/images/generations", json={"prompt": "x"})  # url: held in memory
        assert c.get(r.json()["data"][0]["url"]).status_code == 200
        assert c.get("/v1/status").json()["gallery"] is False


# ---------------------------------------------------------------------------------------------
# The page and the OpenAPI document


def test_page_and_openapi(client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="prompt"' in r.text and "/static/app.js" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "respond-async" in js.text and "events_url" in js.text
    assert client.get("/static/style.css").status_code == 200
    doc = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
                 "/v1/images/interpolations", "/v1/jobs/{job_id}/events", "/v1/gallery"):  # fmt: skip
        assert path in doc["paths"], path
    form = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["image"]["format"] == "binary"
    assert "image" in form["schema"]["required"] and "prompt" in form["schema"]["required"]
    body = doc["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]
    assert "seed" in body["application/json"]["schema"]["properties"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


# ---------------------------------------------------------------------------------------------
# unclip serve


@pytest.fixture
def serve_registered(monkeypatch):
    if "unclip.commands.serve" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "unclip.commands.serve"])


def test_serve_command(serve_registered, pipeline_dir, tmp_path, capsys, monkeypatch):
    from unclip.commands.serve import build_app, is_loopback

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0 and "--api-key" in capsys.readouterr().out
    assert cli.main(["serve", "--pipeline", str(pipeline_dir), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    parser = cli.build_parser()
    monkeypatch.setenv("UNCLIP_API_KEY", "from-env")
    args = parser.parse_args(["serve", "--pipeline", str(pipeline_dir), "--device", "cpu",
                              "--data-dir", str(tmp_path / "data"), "--max-n", "2"])  # fmt: skip
    assert args.host == "127.0.0.1" and is_loopback(args.host) and not is_loopback("0.0.0.0")
    app = build_app(args)
    with TestClient(app, base_url="http://localhost:8000") as c:
        key = {"Authorization": "Bearer from-env"}
        status = c.get("/v1/status", headers=key).json()
        assert status["limits"]["max_n"] == 2 and status["gallery"] is True
        assert c.get("/v1/status", headers={**key, "Host": "evil.example"}).status_code == 400
    assert (tmp_path / "data" / "gallery.sqlite").is_file()


def test_import_unclip_stays_light():
    code = (
        "import sys, unclip, unclip.commands.serve, unclip.server; "
        "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
