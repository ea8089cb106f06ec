"""The shipped default pipeline: loads by name, fits the size budget, generates an image."""

from __future__ import annotations

from pathlib import Path

import unclip
from unclip.pipeline.core import resolve_pipeline


def test_emoji_small_is_shipped_small_and_in_fp16():
    from safetensors import safe_open

    folder = resolve_pipeline("emoji-small")
    files = list(Path(folder).rglob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < 80 * 2**20
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = st.get_slice(key)
                assert t.get_dtype() in ("F16", "I64", "BOOL"), f"{f}:{key} is {t.get_dtype()}"


def test_emoji_small_generates_an_image():
    pipe = unclip.load_pipeline("emoji-small")
    kw = {"prior_steps": 4, "decoder_steps": 4, "upsampler_steps": 2}
    a = pipe.text_to_image("a red apple, noto style", seed=0, **kw)[0]
    b = pipe.text_to_image("a red apple, noto style", seed=0, **kw)[0]
    assert a.size == (pipe.image_size, pipe.image_size) == (64, 64)
    assert a.tobytes() == b.tobytes()
    assert a.info["prompt"] == "a red apple, noto style"
