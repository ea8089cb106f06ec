"""Property-based checks (hypothesis) of the pipeline and CLI inputs: any input either works or
is refused with a one-line ValueError; nothing else escapes, and nothing is half-written."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from unclip import cli

SETTINGS = settings(
    max_examples=12,
    derandomize=True,  # the same examples on every run: CI never flakes on a lucky draw
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


FAST = {"prior_steps": 2, "decoder_steps": 2, "upsampler_steps": 2}


@SETTINGS
@given(prompt=st.text(min_size=0, max_size=300))
def test_any_unicode_prompt_generates_or_is_refused(pipe, prompt):
    try:
        images = pipe.text_to_image(prompt, seed=0, **FAST)
    except ValueError as e:
        assert prompt.strip() == "" or len(prompt) > 1000, f"refused a fine prompt: {e}"
        assert "\n" not in str(e)
        return
    assert len(images) == 1 and images[0].size == (pipe.image_size, pipe.image_size)


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**9), max_value=10**9),
)


@SETTINGS
@given(guidance=numbers, steps=st.integers(min_value=-5, max_value=10**7))
def test_guidance_and_steps_are_checked(pipe, guidance, steps):
    fine_g = isinstance(guidance, int) or math.isfinite(guidance)
    limit = pipe.decoder.diffusion.num_timesteps  # steps may not exceed the trained schedule
    try:
        pipe.text_to_image(
            "a red square", seed=1, prior_steps=2, upsampler_steps=2,
            decoder_steps=steps, decoder_guidance=guidance,
        )  # fmt: skip
    except ValueError as e:
        assert "\n" not in str(e)
        assert not fine_g or steps < 1 or steps > limit or abs(guidance) > 100, str(e)
        return
    assert fine_g and 1 <= steps <= limit and abs(guidance) <= 100


@SETTINGS
@given(seed=st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.none()))
def test_seeds_reproduce_or_are_refused(pipe, seed):
    try:
        a = pipe.text_to_image("a blue circle", seed=seed, **FAST)[0]
    except ValueError as e:
        assert seed is not None and (seed < 0 or seed >= 2**63), str(e)
        return
    if seed is not None:
        b = pipe.text_to_image("a blue circle", seed=seed, **FAST)[0]
        assert a.tobytes() == b.tobytes()


modes = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK", "F"])


@SETTINGS
@given(mode=modes, w=st.integers(1, 70), h=st.integers(1, 70))
def test_images_of_any_mode_and_size_vary(pipe, mode, w, h):
    img = Image.new(mode, (w, h))
    out = pipe.variations(img, seed=0, decoder_steps=2, upsampler_steps=2)
    assert len(out) == 1 and out[0].mode == "RGB"


@SETTINGS
@given(
    mask_mode=st.sampled_from(["L", "1", "RGBA", "RGB", "LA"]),
    mw=st.integers(1, 40),
    mh=st.integers(1, 40),
)
def test_masks_of_other_sizes_or_modes(pipe, mask_mode, mw, mh):
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    mask = Image.new(mask_mode, (mw, mh))
    try:
        out = pipe.inpaint(image, mask, "a square", seed=0, **FAST)
    except ValueError as e:
        assert (mw, mh) != (16, 16), str(e)
        assert "mask" in str(e)
        return
    assert out[0].size == image.size or out[0].size[0] == pipe.image_size


@SETTINGS
@given(prompt=st.text(max_size=40), num=st.integers(-3, 40), steps=st.integers(-3, 3))
def test_cli_generate_never_tracebacks(pipeline_dir, tmp_path_factory, prompt, num, steps, capsys):
    out = tmp_path_factory.mktemp("cli")
    args = ["generate", prompt, "-n", str(num), "--pipeline", str(pipeline_dir), "--out", str(out),
            "--decoder-steps", str(steps), "--prior-steps", "2", "--upsampler-steps", "2",
            "--seed", "0", "--no-progress"]  # fmt: skip
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse refuses a prompt that looks like an option
        assert e.code == 2
        return
    err = capsys.readouterr().err
    if rc == 0:
        assert len(list(out.glob("*.png"))) == num
    else:
        assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0
        assert list(out.glob("*.png")) == []
