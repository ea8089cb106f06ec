"""``pipeline.json``: which stage lives in which subfolder, and the default sampling settings.

A pipeline folder looks like::

    pipeline.json       {"type": "unclip_pipeline", "format_version": 1, "name": ...,
                         "stages": {...}, "sampling": {...}}
    tokenizer/          a tokenizer folder (unclip.tokenizer)
    clip/               a CLIP model folder
    prior/              a diffusion prior model folder + diffusion.json, or an
                        autoregressive prior ("ar_prior") folder, which needs none
    decoder/            a decoder UNet model folder + diffusion.json
    inpaint_decoder/    optional: a decoder trained with the GLIDE inpainting inputs
    upsampler/ …        zero or more upsampler folders, lowest resolution first

Stage paths are relative to the pipeline folder and may not leave it. Parsing is strict
(unknown keys and wrong types are errors that name the field), as for every unclip config.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath, PureWindowsPath
from typing import Literal, get_args

from unclip.config import PIPELINE_FILE as PIPELINE_FILE  # its home; re-exported here
from unclip.config import Config, ConfigError

PIPELINE_TYPE = "unclip_pipeline"
PIPELINE_FORMAT_VERSION = 1

# Limits of the sampling settings a caller may ask for (command line, server, pipeline.json),
# and the defaults of a capability's own options: their one home, which the pipeline, the CLI
# and the server import.
MAX_STEPS = 1000  # the diffusion schedules' length: more steps than timesteps mean nothing
MAX_GUIDANCE = 100.0
MAX_CANDIDATES = 64  # prior samples per image, each a full prior run
MAX_REPAINT_RESAMPLE = 100  # RePaint's passes over each jump point
# RePaint's defaults (inpainting with a plain decoder): passes over each jump point, and steps
# jumped back up (at most half the decoder's steps)
DEFAULT_REPAINT_RESAMPLE = 4
DEFAULT_REPAINT_JUMP = 5
#: the widest margin ``outpaint`` adds, in multiples of the input image's longer side
MAX_OUTPAINT_MARGIN = 4
#: how far ``image_to_image`` noises its input by default (a fraction of the decoder's schedule)
DEFAULT_STRENGTH = 0.6

#: the samplers a stage may use: the names of ``unclip.diffusion.SAMPLERS`` (a test keeps them
#: equal), here so that the CLI and the server list them without importing torch
SamplerName = Literal["ddim", "ddpm", "dpmpp_2m", "karlo"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)

#: Named sampling presets: sampling overrides (keyword names of
#: :data:`unclip.pipeline.settings.OVERRIDES`) that a call's ``preset`` applies before its own
#: overrides, which win key by key (``sampler`` counts for every stage's sampler). Their one
#: home: the CLI's ``--fast``, the API's ``preset=`` and the server's ``preset`` field read
#: it. "fast": the fewest decoder steps whose FD in CLIP space is within 3% of the default's
#: (DDIM, 25 steps) and whose CLIP score is within 1%, measured on emoji-small's 621 val
#: captions with ``benchmarks/steps_vs_quality.py``: FD +2.3%, CLIP score -0.2%, 0.6× the
#: time per image (9 steps: FD +3.1%; docs/benchmarks.md, "Decoder steps vs sample quality").
SAMPLING_PRESETS: dict[str, dict[str, object]] = {
    "fast": {"decoder_sampler": "dpmpp_2m", "decoder_steps": 10},
}


@dataclasses.dataclass
class StageSampling(Config):
    """What every stage's default sampling sets: the ``sampler``, its ``steps`` and ``eta``
    (DDIM's η: 0 = deterministic, 1 = DDPM-like noise)."""

    sampler: SamplerName = "ddim"
    steps: int = 25
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must be in [0, 1], got {self.eta}")


@dataclasses.dataclass
class PriorSampling(StageSampling):
    """Default sampling of the prior: ``candidates`` z_i are drawn per image and the one with
    the highest dot product with z_t is kept (DALL·E 2 §2.2); ``guidance`` is the
    classifier-free guidance scale (1 = none; Karlo/diffusers use 4).

    ``sampler``, ``steps`` and ``eta`` apply to a diffusion prior; ``temperature`` (0 =
    greedy), ``top_k`` (0 = off) and ``top_p`` (1 = off) to an autoregressive prior, whose
    guidance (on the code logits) is ``ar_guidance``.
    """

    guidance: float = 4.0
    candidates: int = 2
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95
    ar_guidance: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_guidance(self.guidance)
        _check_guidance(self.ar_guidance)
        if self.candidates < 1:
            raise ConfigError(f"candidates must be at least 1, got {self.candidates}")
        if not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class DecoderSampling(StageSampling):
    """Default sampling of the decoder (and the inpainting decoder)."""

    guidance: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_guidance(self.guidance)


@dataclasses.dataclass
class UpsamplerSampling(StageSampling):
    """Default sampling of every upsampler (no guidance: they see no caption or embedding).

    ``strength`` < 1 starts from the bicubic enlargement of the input noised to timestep
    ``strength · T`` (SDEdit, Meng et al. 2022) instead of pure noise: an ε-predicting
    upsampler sampled in a few steps gets its first, noisiest steps wrong, and the low
    resolution image already fixes what those steps would decide.
    """

    steps: int = 7  # few: the low-resolution image already fixes most of the picture
    strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {self.strength}")


@dataclasses.dataclass
class SamplingConfig(Config):
    """Per-stage default sampling settings (the public defaults of Karlo/diffusers)."""

    prior: PriorSampling = dataclasses.field(default_factory=PriorSampling)
    decoder: DecoderSampling = dataclasses.field(default_factory=DecoderSampling)
    upsampler: UpsamplerSampling = dataclasses.field(default_factory=UpsamplerSampling)


def upsampler_name(k: int) -> str:
    """The stage name of upsampler ``k`` (0-based): ``upsampler``, ``upsampler2``, …"""
    return "upsampler" if k == 0 else f"upsampler{k + 1}"


@dataclasses.dataclass
class StagesConfig(Config):
    """Subfolders of the pipeline folder. ``prior`` may be null (the decoder is then fed the
    text embedding z_t, the paper's §5.1 baseline); ``inpaint_decoder`` null means inpainting
    uses RePaint with the plain decoder; ``upsamplers`` run in order, lowest resolution first."""

    tokenizer: str = "tokenizer"
    clip: str = "clip"
    prior: str | None = "prior"
    decoder: str = "decoder"
    inpaint_decoder: str | None = None
    upsamplers: list[str] = dataclasses.field(default_factory=lambda: ["upsampler"])

    def __post_init__(self) -> None:
        for key in ("tokenizer", "clip", "prior", "decoder", "inpaint_decoder"):
            value = getattr(self, key)
            if value is not None:
                _check_relative(key, value)
        for i, value in enumerate(self.upsamplers):
            _check_relative(f"upsamplers[{i}]", value)


@dataclasses.dataclass
class PipelineConfig(Config):
    """The document in ``pipeline.json``. ``embeddings``: what the stages take as z_t and z_i:
    ``"unit"`` CLIP's L2-normalised embeddings (unclip's own stages), ``"raw"`` CLIP's
    projections unnormalised (stages converted from Karlo, trained that way); the pipeline's
    ``encode_text``/``encode_image`` and CLIP scores are unit-norm either way."""

    type: str = PIPELINE_TYPE
    format_version: int = PIPELINE_FORMAT_VERSION
    name: str = ""
    stages: StagesConfig = dataclasses.field(default_factory=StagesConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    embeddings: Literal["unit", "raw"] = "unit"

    def __post_init__(self) -> None:
        if self.type != PIPELINE_TYPE:
            raise ConfigError(f"type must be {PIPELINE_TYPE!r}, got {self.type!r}")
        if self.format_version < 1:
            raise ConfigError(f"format_version must be at least 1, got {self.format_version}")
        if self.format_version > PIPELINE_FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} was written by a newer unclip (this one "
                f"reads up to {PIPELINE_FORMAT_VERSION}); upgrade unclip"
            )


def _check_guidance(guidance: float) -> None:
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise ConfigError(f"guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance}")


def _check_relative(key: str, value: str) -> None:
    """A stage path must be a relative path inside the pipeline folder."""
    if not value:
        raise ConfigError(f"{key}: empty stage path")
    for flavour in (PurePosixPath, PureWindowsPath):
        p = flavour(value)
        if p.is_absolute() or p.anchor or ".." in p.parts:
            raise ConfigError(f"{key}: {value!r} must be a folder inside the pipeline folder")
