"""The web page in headless Chromium (Playwright driving the system's browser): generate from
a prompt with a negative prompt in WebP, open the variations panel and run variations and
image-to-image at a chosen strength, paint a mask with the brush and run an edit, and mix two
prompts with the weight slider.

Playwright cannot download its own browsers here, so the test launches the system's Chromium
(Debian's ``chromium``; another one with ``UNCLIP_CHROMIUM=/path``). Without one the test is
skipped, unless ``UNCLIP_REQUIRE_BROWSER=1`` (set by ``.ci/run``): then it fails.

Screenshots go to the test's tmp folder; with ``UNCLIP_WRITE_SCREENSHOTS=1`` they are also
copied to ``docs/`` (``docs/server-generate.png``, ``docs/server-edit.png``).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import httpx
import numpy as np
import pytest
from PIL import Image

from server_helpers import serving
from tiny_pipeline import OUT, write_tiny_pipeline
from unclip.pipeline import load_pipeline
from unclip.server import create_app
from unclip.server.uploads import image_text

DOCS = Path(__file__).resolve().parent.parent / "docs"
TIMEOUT_MS = 20_000
VIEWPORT = {"width": 900, "height": 640}


def find_chromium() -> tuple[str | None, str]:
    """(path of a Chromium to drive, or None; why none was found)."""
    explicit = os.environ.get("UNCLIP_CHROMIUM")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit, ""
        return None, f"UNCLIP_CHROMIUM={explicit} is not an executable"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path, ""
    return None, "no Chromium found (apt-get install chromium, or set UNCLIP_CHROMIUM=/path)"


def need_browser(reason: str) -> NoReturn:
    """Skip, or fail when the run requires the browser test (``UNCLIP_REQUIRE_BROWSER=1``)."""
    if os.environ.get("UNCLIP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (UNCLIP_REQUIRE_BROWSER=1: the browser test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        need_browser("playwright is not installed (pip install playwright, in the test extras)")
    path, why = find_chromium()
    if path is None:
        need_browser(why)
    return path


class RecordingPipeline:
    """The tiny pipeline, recording what the routes give ``inpaint`` (edits) and the keyword
    arguments of the other methods the page reaches (``calls``: method -> their kwargs)."""

    RECORDED = ("text_to_image", "variations", "image_to_image", "mix")

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self.edits: list[dict[str, Any]] = []
        self.calls: dict[str, list[dict[str, Any]]] = {name: [] for name in self.RECORDED}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._pipe, name)
        if name not in self.RECORDED:
            return attr

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls[name].append({"args": args, **kwargs})
            return attr(*args, **kwargs)

        return record

    def inpaint(self, image: Any, mask: Any, prompt: str, *args: Any, **kwargs: Any) -> Any:
        self.edits.append({"image": image.copy(), "mask": mask.copy(), "prompt": prompt, **kwargs})
        return self._pipe.inpaint(image, mask, prompt, *args, **kwargs)


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size < 200_000, f"{name} is {path.stat().st_size:,} bytes"
    if os.environ.get("UNCLIP_WRITE_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)
    return path


def test_page_generate_vary_edit_mix(chromium, one_thread, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    pipe = RecordingPipeline(load_pipeline(write_tiny_pipeline(tmp_path / "tiny"), device="cpu"))
    app = create_app(pipe, gallery_db=tmp_path / "data" / "gallery.sqlite", queue_size=4)
    problems: list[str] = []  # uncaught exceptions and console errors in the page

    with serving(app) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.on(
                "response",
                lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )
            page.goto(base)
            expect(page.locator("#model")).to_contain_text("tiny")
            expect(page.locator("#empty")).to_be_visible()
            cards = page.locator("#gallery .card")
            message = page.locator("#message")

            # generate: 2 WebP images from a prompt and a negative prompt, shown in the gallery
            page.fill("#prompt", "a red apple")
            page.fill("#negative-prompt", "a blue square")
            page.select_option("#output-format", "webp")
            page.fill("#n", "2")
            page.fill("#seed", "7")
            page.click("#generate-button")
            expect(message).to_have_text("done: 2 image(s)")
            expect(message).to_have_class("message ok")
            expect(cards).to_have_count(2)
            expect(page.locator("#empty")).to_be_hidden()
            expect(page.locator("#progress")).to_be_hidden()
            expect(page.locator("#generate-button")).to_be_enabled()
            for i in range(2):
                img = cards.nth(i).locator("img")
                expect(img).to_have_js_property("complete", True)
                assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [OUT, OUT]
            expect(cards.first.locator(".caption")).to_have_text("a red apple")
            expect(cards.first.locator(".seed")).to_have_text(" seed 8")  # newest first
            gallery = httpx.get(f"{base}/v1/gallery").json()["data"]
            assert [g["method"] for g in gallery] == ["text_to_image", "text_to_image"]
            assert {g["seed"] for g in gallery} == {7, 8}
            assert {g["format"] for g in gallery} == {"webp"}
            assert all(g["url"].endswith(".webp") for g in gallery)
            assert {g["info"]["negative_prompt"] for g in gallery} == {"a blue square"}
            (generated,) = pipe.calls["text_to_image"]
            assert generated["negative_prompt"] == "a blue square" and generated["seed"] == 7
            first_file = httpx.get(gallery[0]["url"])
            assert first_file.headers["content-type"] == "image/webp"
            assert Image.open(io.BytesIO(first_file.content)).format == "WEBP"

            # variations of the newest image (empty prompt): n (2) more cards
            vary = page.locator("#vary")
            expect(vary).to_be_hidden()
            cards.first.locator('[data-action="vary"]').click()
            expect(vary).to_be_visible()
            expect(page.locator("#vary-image")).to_have_js_property("complete", True)
            page.click("#vary-run")
            expect(message).to_have_text("done: 2 image(s)")
            expect(cards).to_have_count(4)
            gallery = httpx.get(f"{base}/v1/gallery").json()["data"]
            assert [g["method"] for g in gallery[:2]] == ["variations", "variations"]
            (varied,) = pipe.calls["variations"]
            assert varied["n"] == 2 and "negative_prompt" not in varied
            save_screenshot(page, tmp_path, "server-generate.png")

            # image-to-image of the same image: a prompt and the strength slider at 0.3
            page.fill("#vary-prompt", "a yellow star")
            page.fill("#strength", "0.3")
            expect(page.locator("#strength-value")).to_have_text("0.30")
            page.click("#vary-run")
            expect(message).to_have_text("done: 2 image(s)")
            expect(cards).to_have_count(6)
            gallery = httpx.get(f"{base}/v1/gallery").json()["data"]
            assert [g["method"] for g in gallery[:2]] == ["image_to_image"] * 2
            assert gallery[0]["info"]["strength"] == "0.3"
            (img2img,) = pipe.calls["image_to_image"]
            assert img2img["args"][1] == "a yellow star" and img2img["strength"] == 0.3
            assert img2img["num_images"] == 2 and img2img["negative_prompt"] == "a blue square"
            page.click("#vary-close")
            expect(vary).to_be_hidden()

            # edit the newest generated image: paint a horizontal stroke across the middle
            target = cards.nth(4)
            target_id = target.get_attribute("data-id")
            target.locator('[data-action="edit"]').click()
            editor = page.locator("#editor")
            expect(editor).to_be_visible()
            canvas = page.locator("#edit-mask")
            expect(canvas).to_have_js_property("width", OUT)
            expect(page.locator("#edit-prompt")).to_have_value("a red apple")
            box = canvas.bounding_box()
            assert box is not None and box["width"] > 100
            y = box["y"] + box["height"] * 0.5
            page.mouse.move(box["x"] + box["width"] * 0.25, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=12)
            page.mouse.up()
            painted = canvas.evaluate(
                "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
                ".filter((v, i) => i % 4 === 3 && v > 0).length"
            )
            assert 4 <= painted < OUT * OUT / 2, painted
            page.fill("#edit-prompt", "a green circle")
            save_screenshot(page, tmp_path, "server-edit.png")

            page.click("#edit-run")
            expect(editor).to_be_hidden()
            expect(message).to_have_text("done: 2 image(s)")
            expect(cards).to_have_count(8)
            expect(cards.first.locator(".caption")).to_have_text("a green circle")
            expect(cards.first.locator("img")).to_have_js_property("complete", True)
            assert cards.first.locator("img").evaluate("i => i.naturalWidth") == OUT
            gallery = httpx.get(f"{base}/v1/gallery").json()["data"]
            assert [(g["method"], g["prompt"]) for g in gallery[:2]] == [
                ("inpaint", "a green circle")
            ] * 2
            target_file = httpx.get(f"{base}/files/{target_id}.webp").content

            # mix two prompts, the weight slider at 0.25 (B's weight)
            page.fill("#mix-a", "a red apple")
            page.fill("#mix-b", "a green circle")
            page.fill("#mix-weight", "0.25")
            expect(page.locator("#mix-weight-value")).to_have_text("0.25")
            page.click("#mix-button")
            expect(message).to_have_text("done: 2 image(s)")
            expect(cards).to_have_count(10)
            gallery = httpx.get(f"{base}/v1/gallery").json()["data"]
            assert [g["method"] for g in gallery[:2]] == ["mix", "mix"]
            (mixed,) = pipe.calls["mix"]
            assert mixed["args"] == (["a red apple", "a green circle"], [0.75, 0.25])
            assert mixed["seed"] == 7 and mixed["negative_prompt"] == "a blue square"
            assert problems == []

        finally:
            browser.close()

    # what the page sent: the image it edits, and a mask of its size, white where the brush
    # went (the middle rows, the middle half of the columns), black elsewhere
    assert len(pipe.edits) == 1
    edit = pipe.edits[0]
    assert edit["prompt"] == "a green circle" and edit["n"] == 2
    assert edit["negative_prompt"] == "a blue square"
    assert np.array_equal(
        np.asarray(edit["image"].convert("RGB")),
        np.asarray(Image.open(io.BytesIO(target_file)).convert("RGB")),
    )
    assert image_text(target_file)["seed"] == "8"
    mask = np.asarray(edit["mask"].convert("L"))
    assert mask.shape == (OUT, OUT) and set(np.unique(mask).tolist()) <= {0, 255}
    rows, cols = np.nonzero(mask)
    assert rows.min() >= OUT // 2 - 3 and rows.max() <= OUT // 2 + 2, rows
    assert cols.min() >= OUT // 4 - 3 and cols.max() <= 3 * OUT // 4 + 2, cols
    assert (mask[OUT // 2, OUT // 4 : 3 * OUT // 4] == 255).all(), "the stroke has gaps"
