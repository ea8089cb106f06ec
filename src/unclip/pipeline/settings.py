"""What one call of the pipeline may ask for: the limits on prompts, counts and seeds, and
the sampling overrides applied to a pipeline's default settings.

**Sampling overrides** (keyword arguments of every generating method; None = the
pipeline's default from ``pipeline.json``): ``sampler`` (all stages), ``prior_sampler``,
``prior_steps``, ``prior_guidance``, ``prior_candidates``, ``prior_eta``, and for an
autoregressive prior ``prior_temperature``, ``prior_top_k``, ``prior_top_p``,
``prior_ar_guidance``; ``decoder_sampler``, ``decoder_steps``, ``decoder_guidance``,
``decoder_eta``; ``upsampler_sampler``, ``upsampler_steps``, ``upsampler_eta``,
``upsampler_strength``; and ``preset`` (a name of
:data:`~unclip.pipeline.config.SAMPLING_PRESETS`, e.g. ``"fast"``), whose overrides apply
first: the call's own overrides win key by key.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from numbers import Integral
from typing import Any

from unclip.config import ConfigError
from unclip.pipeline.config import (
    MAX_CANDIDATES,
    SAMPLER_NAMES,
    SAMPLING_PRESETS,
    DecoderSampling,
    PriorSampling,
    SamplingConfig,
    UpsamplerSampling,
)

#: the longest prompt accepted, in characters (CLIP reads at most its context length in
#: tokens anyway; longer input is almost certainly a mistake)
MAX_PROMPT_CHARS = 1000
#: the most images (or frames) one call may draw
MAX_IMAGES = 1024
#: images of one call sampled together as a batch (UnclipPipeline.max_batch)
DEFAULT_MAX_BATCH = 8
#: the largest seed (seeds are non-negative; seed + index must stay below this)
MAX_SEED = 2**63 - 1

_PRIOR_KEYS = ("sampler", "steps", "guidance", "candidates", "eta")
_PRIOR_KEYS += ("temperature", "top_k", "top_p", "ar_guidance")  # autoregressive prior
OVERRIDES: dict[str, tuple[str, str]] = {
    f"{stage}_{key}": (stage, key)
    for stage, keys in (
        ("prior", _PRIOR_KEYS),
        ("decoder", ("sampler", "steps", "guidance", "eta")),
        ("upsampler", ("sampler", "steps", "eta", "strength")),
    )
    for key in keys
}


def check_prompt(prompt: Any, what: str = "prompt") -> str:
    """A non-empty caption of at most :data:`MAX_PROMPT_CHARS` characters of valid Unicode
    (no lone surrogates), or ValueError naming ``what`` and the offending character."""
    if not isinstance(prompt, str):
        raise TypeError(f"{what} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"the {what} is empty; describe the image in a few words")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the {what} is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}"
        )
    for i, ch in enumerate(prompt):
        if "\ud800" <= ch <= "\udfff":  # from undecodable bytes; no tokenizer can encode it
            raise ValueError(
                f"the {what} has a lone surrogate (U+{ord(ch):04X}) at character {i + 1}; "
                "it is not valid Unicode text (was it read with the wrong encoding?)"
            )
    return prompt


def check_count(value: Any, what: str, low: int = 1, high: int = MAX_IMAGES) -> int:
    """An integer in [low, high], or ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{what} must be between {low} and {high:,}, got {value}")
    return int(value)


def check_draw(
    prompt: str | Sequence[str], n: Any, candidates: Any, keep: Any
) -> tuple[list[str], int, int | None]:
    """Checked text-to-image counts: (prompts, images drawn per prompt, images kept per
    prompt or None for all). ``candidates`` draws that many per prompt and keeps ``keep``
    (default ``n``) of them; without it ``n`` are drawn and ``keep`` must be None."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        check_prompt(p)
    n = check_count(n, "n")
    if candidates is not None:
        candidates = check_count(candidates, "candidates")
        keep = check_count(n if keep is None else keep, "keep", 1, candidates)
    elif keep is not None:
        raise ValueError("keep needs candidates (keep the best K of N candidates)")
    draw = candidates or n
    check_count(draw * len(prompts), "the number of images")
    return prompts, draw, keep


def check_seed(seed: int | None, count: int) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED - count:
        raise ValueError(f"seed must be between 0 and {MAX_SEED - count:,}, got {seed}")
    return int(seed)


def apply_overrides(
    base: SamplingConfig, overrides: dict[str, Any], timesteps: Sequence[tuple[str, int]] = ()
) -> SamplingConfig:
    """``base`` with the sampling ``overrides`` of a call applied (keyword names as in
    :data:`OVERRIDES` or ``sampler`` for every stage; None = keep), checked: a known sampler,
    numbers of the right type, each stage's own limits, steps at most the stage's diffusion
    timesteps (``timesteps``: (stage, T) pairs), at most :data:`MAX_CANDIDATES` prior
    candidates. A ``preset`` is expanded first (:func:`expand_preset`)."""
    changes: dict[str, dict[str, Any]] = {"prior": {}, "decoder": {}, "upsampler": {}}
    overrides = expand_preset(overrides)
    sampler = overrides.pop("sampler", None)
    if sampler is not None:
        for stage in changes:
            changes[stage]["sampler"] = sampler
    for name, value in overrides.items():
        if name not in OVERRIDES:
            known = ", ".join(["sampler", *OVERRIDES])
            raise TypeError(f"unexpected keyword argument {name!r}; sampling options: {known}")
        if value is not None:
            stage, key = OVERRIDES[name]
            changes[stage][key] = value
    stages: dict[str, Any] = {}
    for stage, cls in (
        ("prior", PriorSampling),
        ("decoder", DecoderSampling),
        ("upsampler", UpsamplerSampling),
    ):
        current = getattr(base, stage).to_dict()
        for key, value in changes[stage].items():
            label = f"{stage}_{key}"
            if key == "sampler" and value not in SAMPLER_NAMES:
                raise ValueError(
                    f"unknown sampler {value!r}; choose one of {', '.join(SAMPLER_NAMES)}"
                )
            if key in ("steps", "candidates", "top_k"):
                if isinstance(value, bool) or not isinstance(value, Integral):
                    raise ValueError(f"{label} must be an integer, got {value!r}")
                value = int(value)
            if key in ("guidance", "eta", "strength", "temperature", "top_p", "ar_guidance"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{label} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{label} must be finite, got {value}")
            current[key] = value
        try:
            stages[stage] = cls.from_dict(current, where=stage)
        except ConfigError as e:
            raise ValueError(str(e).replace(f"{stage}: ", f"{stage}_", 1)) from None
    out = SamplingConfig(**stages)
    for stage, total in timesteps:
        steps = getattr(out, stage).steps
        if steps > total:
            raise ValueError(
                f"{stage}_steps={steps} is more than the {stage}'s {total} diffusion timesteps"
            )
    if out.prior.candidates > MAX_CANDIDATES:
        raise ValueError(
            f"prior_candidates must be at most {MAX_CANDIDATES}, got {out.prior.candidates}"
        )
    return out


def expand_preset(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with its ``preset`` (None = none) replaced by the preset's overrides
    (:data:`~unclip.pipeline.config.SAMPLING_PRESETS`), under the call's own as
    :func:`layer_overrides` puts them. An unknown preset is a ValueError naming the known
    ones."""
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset is None:
        return overrides
    if not isinstance(preset, str) or preset not in SAMPLING_PRESETS:
        known = ", ".join(map(repr, SAMPLING_PRESETS))
        raise ValueError(f"unknown preset {preset!r}; choose one of {known}")
    return layer_overrides(SAMPLING_PRESETS[preset], overrides)


def layer_overrides(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments ``under`` with ``over`` on top: ``over``'s ``preset`` expanded
    (:func:`expand_preset`), then each of its values that is not None wins over ``under``'s
    of the same key, and its ``sampler`` (every stage's) over ``under``'s per-stage samplers.
    A preset on its own (under a call's overrides) and an image's recorded settings (under
    ``unclip generate --from-png``'s flags) are layered so."""
    over = expand_preset(over)
    given = {k: v for k, v in over.items() if v is not None}
    if "sampler" in given:
        under = {k: v for k, v in under.items() if not k.endswith("_sampler")}
    return {**over, **under, **given}


#: the settings of a stage an image's ``sampling`` metadata records (those that its
#: ``steps``, ``guidance`` and ``sampler`` do not say), per stage; "ar_prior": an
#: autoregressive prior's
RECORDED_SETTINGS = {
    "prior": ("candidates", "eta"),
    "ar_prior": ("candidates", "temperature", "top_k", "top_p"),
    "decoder": ("eta",),
    "upsampler": ("eta", "strength"),
}


def sampling_info(
    settings: SamplingConfig, stages: Sequence[str], ar_codes: int | None = None
) -> dict[str, dict[str, Any]]:
    """How an image's ``stages`` were sampled, for its metadata: ``{"steps": {stage: …},
    "guidance": {…}, "sampler": {…}, "sampling": {override name: value}}`` (``inpaint``
    reads the decoder's settings; upsamplers have no guidance; ``sampling``: the
    :data:`RECORDED_SETTINGS` of the stages, as the keyword arguments that set them).
    ``ar_codes``: the prior is autoregressive and draws that many codes, one per step,
    guided by ``ar_guidance``. :func:`overrides_from_info` reads it back."""
    steps: dict[str, Any] = {}
    guidance: dict[str, Any] = {}
    samplers: dict[str, Any] = {}
    others: dict[str, Any] = {}
    for stage in stages:
        key = "decoder" if stage == "inpaint" else stage
        st = getattr(settings, key)
        ar = stage == "prior" and ar_codes is not None
        for name in RECORDED_SETTINGS["ar_prior" if ar else key]:
            others[f"{key}_{name}"] = getattr(st, name)
        if ar:
            steps[stage], samplers[stage], guidance[stage] = (
                ar_codes,
                "autoregressive",
                st.ar_guidance,
            )
            continue
        steps[stage] = st.steps
        samplers[stage] = st.sampler
        if hasattr(st, "guidance"):
            guidance[stage] = st.guidance
    return {"steps": steps, "guidance": guidance, "sampler": samplers, "sampling": others}


def overrides_from_info(
    steps: dict[str, Any] | None,
    guidance: dict[str, Any] | None,
    sampler: dict[str, Any] | None,
    sampling: dict[str, Any] | None,
) -> dict[str, Any]:
    """The sampling overrides that redo an image from its metadata (the inverse of
    :func:`sampling_info`): its per-stage ``steps``, ``guidance`` and ``sampler`` and its
    other ``sampling`` settings as keyword arguments; names that are not sampling options
    are skipped."""
    out: dict[str, Any] = {}
    samplers = sampler or {}
    for stage, value in (steps or {}).items():
        if samplers.get(stage) != "autoregressive":  # an AR prior's steps are its code count
            out[f"{'decoder' if stage == 'inpaint' else stage}_steps"] = value
    for stage, value in samplers.items():
        if value != "autoregressive":
            out[f"{'decoder' if stage == 'inpaint' else stage}_sampler"] = value
    for stage, value in (guidance or {}).items():
        ar = samplers.get(stage) == "autoregressive"
        out[f"{'decoder' if stage == 'inpaint' else stage}_{'ar_' if ar else ''}guidance"] = value
    out.update(sampling or {})
    return {k: v for k, v in out.items() if k in OVERRIDES}
