"""``UnclipPipeline``: tokenizer, CLIP, prior, decoder and upsamplers composed into the
capabilities of DALL·E 2 (Ramesh et al. 2022) and GLIDE (Nichol et al. 2021).

No diffusion maths lives here: every sample is drawn by :mod:`unclip.diffusion` (samplers,
classifier-free guidance, DDIM inversion, RePaint); this module only wires conditions,
seeds and image formats.

**Seeds.** Image ``i`` of a call with ``seed=s`` is drawn with seed ``s + i`` (prompts of a
list are numbered prompt-major: prompt ``p``, image ``j`` of ``n`` is image ``p·n + j``), and
each stage draws its noise from its own CPU ``torch.Generator`` derived from that seed. The
images of a call are sampled together in batches of up to ``pipe.max_batch`` (default 8),
and each image's rows of noise come from its own generators, so an image gets the same noise
in any batch: it equals the single call with its seed up to float rounding (the networks run
at another batch size, which may sum in another order: on the shipped model about a grey level
at a few pixels in float32, a few grey levels in bfloat16, whose roundings are coarser). The
same call with the same seed gives the same bytes on the same machine; set
``pipe.max_batch = 1`` to sample every image on its own, exactly as single calls do. ``seed=None`` draws a random seed; the seed used is in every image's ``info``.

**Sampling overrides** (keyword arguments of every generating method; None = the
pipeline's default from ``pipeline.json``): ``sampler`` (all stages), ``prior_sampler``,
``prior_steps``, ``prior_guidance``, ``prior_candidates``, ``prior_eta``, and for an
autoregressive prior ``prior_temperature``, ``prior_top_k``, ``prior_top_p``,
``prior_ar_guidance``,
``decoder_sampler``, ``decoder_steps``, ``decoder_guidance``, ``decoder_eta``,
``upsampler_sampler``, ``upsampler_steps``, ``upsampler_eta``, ``upsampler_strength``.

**Outputs** are RGB PIL images at the pipeline's output resolution; ``image.info`` holds
the strings written into a PNG's text metadata: ``prompt``, ``seed``, ``model``,
``method``, ``steps``, ``guidance``, ``sampler`` (the last three as JSON objects by stage)
and, where it applies, ``clip_score``, ``frame``, ``theta``.

**Progress:** ``progress(stage, step)`` is called after every model call with the stage
name (``"prior"``, ``"decoder"``, ``"inpaint"``, ``"invert"``, ``"upsampler"`` or
``"upsampler2"``…) and the :class:`~unclip.diffusion.SampleStep`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unclip.config import ConfigError, DiffusionConfig
from unclip.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    SampleStep,
    classifier_free_guidance,
    ddim_invert,
    final,
    randn,
    repaint_sample,
)
from unclip.pipeline.config import (
    PIPELINE_FILE,
    DecoderSampling,
    PipelineConfig,
    PriorSampling,
    SamplingConfig,
    UpsamplerSampling,
)
from unclip.pipeline.images import (
    ImageInput,
    as_image,
    downscale_keep,
    has_transparency,
    keep_mask,
    paste_canvas,
    prepare_image,
    repaint_mask,
    scale_box,
    slerp,
)

ProgressCallback = Callable[[str, SampleStep], None]

#: the longest prompt accepted, in characters (CLIP reads at most its context length in
#: tokens anyway; longer input is almost certainly a mistake)
MAX_PROMPT_CHARS = 1000
#: the most images (or frames) one call may draw
MAX_IMAGES = 1024
#: images of one call sampled together as a batch (UnclipPipeline.max_batch)
DEFAULT_MAX_BATCH = 8
#: the largest seed (seeds are non-negative; seed + index must stay below this)
MAX_SEED = 2**63 - 1
DIFFUSION_FILE = "diffusion.json"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

_PRIOR_KEYS = ("sampler", "steps", "guidance", "candidates", "eta")
_PRIOR_KEYS += ("temperature", "top_k", "top_p", "ar_guidance")  # autoregressive prior
_OVERRIDES: dict[str, tuple[str, str]] = {
    f"{stage}_{key}": (stage, key)
    for stage, keys in (
        ("prior", _PRIOR_KEYS),
        ("decoder", ("sampler", "steps", "guidance", "eta")),
        ("upsampler", ("sampler", "steps", "eta", "strength")),
    )
    for key in keys
}
_STAGE_IDS = {"prior": 1, "decoder": 2, "upsampler": 3}


class PipelineError(ValueError):
    """A pipeline folder that cannot be used (missing stage, stages that do not fit)."""


@dataclass
class TextCondition:
    """Captions encoded by CLIP, one row each (N = 1 for one caption): z_t [N, D] (unit norm),
    per-token features tokens [N, L, W] and mask [N, L] (True up to and including the end
    token). ``text`` is the caption (the first one's for N > 1)."""

    text: str
    z_t: Tensor
    tokens: Tensor
    mask: Tensor

    @staticmethod
    def cat(rows: Sequence[TextCondition]) -> TextCondition:
        """The conditions stacked along dim 0 (each still encoded on its own)."""
        return TextCondition(
            rows[0].text,
            torch.cat([r.z_t for r in rows]),
            torch.cat([r.tokens for r in rows]),
            torch.cat([r.mask for r in rows]),
        )

    def row(self, i: int) -> TextCondition:
        """Row ``i`` as a one-caption condition."""
        return TextCondition(
            self.text, self.z_t[i : i + 1], self.tokens[i : i + 1], self.mask[i : i + 1]
        )


@dataclass
class Stage:
    """A stage: its network and the diffusion process it was trained with (None for the
    autoregressive prior, which samples codes instead)."""

    model: nn.Module
    diffusion: GaussianDiffusion | None


def is_ar_prior(model: nn.Module) -> bool:
    """Whether ``model`` is an autoregressive prior (type ``ar_prior``)."""
    return getattr(getattr(model, "config", None), "type_name", "") == "ar_prior"


# ---------------------------------------------------------------------------------------------
# Loading


def shipped_pipelines() -> list[str]:
    """Names of the pipelines installed with the package (``src/unclip/weights/<name>/``)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / PIPELINE_FILE).is_file())


def resolve_pipeline(name_or_path: str | os.PathLike) -> Path:
    """The pipeline folder for a path (folder or its ``pipeline.json``) or a shipped name."""
    path = Path(name_or_path)
    name = os.fspath(name_or_path)
    bare = bool(name) and "/" not in name and os.sep not in name and not name.startswith(".")
    if path.exists():
        if path.is_file() and path.name == PIPELINE_FILE:
            path = path.parent
        if (path / PIPELINE_FILE).is_file():
            return path
        # a bare name that happens to be some other local folder still means the shipped one
        if not (bare and (WEIGHTS_DIR / name / PIPELINE_FILE).is_file()):
            raise FileNotFoundError(f"{path}: not a pipeline folder (no {PIPELINE_FILE})")
    if bare:
        shipped = WEIGHTS_DIR / name
        if (shipped / PIPELINE_FILE).is_file():
            return shipped
        names = ", ".join(shipped_pipelines()) or "none in this version"
        raise FileNotFoundError(
            f"no pipeline {name!r}: not a folder, nor a pipeline shipped with unclip "
            f"(shipped: {names}); pass the path of a pipeline folder "
            "(`unclip train pipeline` assembles one)"
        )
    raise FileNotFoundError(f"{name}: no such pipeline folder")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """A torch device from a user string, with a clear error for a bad or absent device."""
    if device is None:
        return _default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


def _load_stage(folder: Path, what: str, device: torch.device) -> Stage:
    from unclip.hub import from_pretrained

    if not folder.is_dir():
        raise PipelineError(f"{folder}: the {what} stage folder is missing")
    model = from_pretrained(folder, device=device)
    if what == "prior" and is_ar_prior(model):
        return Stage(model, None)  # samples codes: no diffusion.json
    file = folder / DIFFUSION_FILE
    if not file.is_file():
        raise PipelineError(f"{file}: missing; a diffusion stage folder needs {DIFFUSION_FILE}")
    diffusion = GaussianDiffusion.from_config(DiffusionConfig.load(file))
    learn_sigma = getattr(model.config, "learn_sigma", False)
    if diffusion.learn_sigma != learn_sigma:
        raise PipelineError(
            f"{folder}: the model's learn_sigma ({learn_sigma}) and {DIFFUSION_FILE}'s "
            f"({diffusion.learn_sigma}) disagree"
        )
    return Stage(model, diffusion)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA GPU with bf16 support, or a CPU
    with AVX-512 BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: environment variable that overrides what "auto" picks (float32, float16 or bfloat16), e.g.
#: ``UNCLIP_DTYPE=float32`` to sample as a CPU without bf16 does; unset or "auto": per device
DTYPE_ENV = "UNCLIP_DTYPE"


def default_dtype(device: torch.device) -> torch.dtype:
    """The sampling precision ``load_pipeline`` picks for "auto": :data:`DTYPE_ENV` when set,
    else bfloat16 where :func:`native_bf16`, else float32."""
    forced = os.environ.get(DTYPE_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in DTYPES:
            raise ValueError(f"{DTYPE_ENV} must be auto, {', '.join(DTYPES)}; got {forced!r}")
        return DTYPES[forced]
    return torch.bfloat16 if native_bf16(device) else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A sampling precision from a dtype, its name, or None/"auto" (:func:`default_dtype`)."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def load_pipeline(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> UnclipPipeline:
    """Load a pipeline folder (or a shipped pipeline by name) onto ``device`` (default: CUDA
    when available, else CPU).

    ``dtype`` is the compute precision of the sampling networks (prior, decoders,
    upsamplers): float32, or float16/bfloat16 run under ``torch.autocast`` with float32
    weights and float32 sampler state, so every network is used as it was trained (with
    bf16 autocast). None or "auto": :func:`default_dtype` (bfloat16 on a CPU with AVX-512 BF16
    or AMX, or a GPU with bf16; float32 elsewhere; the ``UNCLIP_DTYPE`` environment variable
    overrides it). CLIP always runs in float32, so
    embeddings and scores do not depend on it. The convolutional stages are kept in the
    channels-last memory format, which oneDNN and cuDNN run faster.
    """
    from unclip.clip import load_clip
    from unclip.tokenizer import Tokenizer

    folder = resolve_pipeline(name_or_path)
    config = PipelineConfig.load(folder / PIPELINE_FILE)
    dev = parse_device(device)
    dtype = resolve_dtype(dtype, dev)  # refused before any weights are read
    stages = config.stages
    tok_dir = folder / stages.tokenizer
    if not tok_dir.is_dir():
        raise PipelineError(f"{tok_dir}: the tokenizer stage folder is missing")
    tokenizer = Tokenizer.load(tok_dir)
    clip_dir = folder / stages.clip
    if not clip_dir.is_dir():
        raise PipelineError(f"{clip_dir}: the clip stage folder is missing")
    clip = load_clip(clip_dir, device=dev)
    prior = _load_stage(folder / stages.prior, "prior", dev) if stages.prior else None
    decoder = _load_stage(folder / stages.decoder, "decoder", dev)
    inpaint = (
        _load_stage(folder / stages.inpaint_decoder, "inpaint_decoder", dev)
        if stages.inpaint_decoder
        else None
    )
    upsamplers = [_load_stage(folder / u, "upsampler", dev) for u in stages.upsamplers]
    return UnclipPipeline(
        tokenizer=tokenizer,
        clip=clip,
        prior=prior,
        decoder=decoder,
        inpaint_decoder=inpaint,
        upsamplers=upsamplers,
        config=config,
        path=folder,
        device=dev,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------
# Helpers


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """A CPU generator for one stage of one image, seeded from (seed, stage) by NumPy's
    ``SeedSequence``, so the stages draw independent noise and no stage's step count shifts
    another stage's noise."""
    stage_id = _STAGE_IDS.get(stage) or 100 + int(stage.removeprefix("upsampler") or 1)
    state = np.random.SeedSequence([seed, stage_id]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def step_images(stage: str, step: Any) -> int:
    """How many images a progress call's step is drawing: the batch size for the image stages
    (decoder, inpaint, upsamplers), 1 for the others (the prior's rows are candidates)."""
    x = getattr(step, "x", None)
    image_stage = stage in ("decoder", "inpaint") or stage.startswith("upsampler")
    return int(x.shape[0]) if image_stage and isinstance(x, Tensor) and x.dim() == 4 else 1


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been called on it."""
    return getattr(module, "_compiled_call_impl", None) is not None


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its compiled forward (the copy of a compiled module
    would still call the original's)."""
    import copy

    out = copy.deepcopy(module)
    for m in out.modules():
        if is_compiled(m):
            m._compiled_call_impl = None
    return out


def stage_generators(seeds: int | Sequence[int], stage: str) -> list[torch.Generator]:
    """One :func:`stage_generator` per image of a batch (a sampler draws row k's noise with
    generator k alone, so an image gets the same noise in any batch)."""
    return [stage_generator(s, stage) for s in ([seeds] if isinstance(seeds, int) else seeds)]


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Mixed precision for ``dtype`` float16/bfloat16; a no-op context for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _model_fn(model: nn.Module) -> Callable[..., Tensor]:
    """The network as a diffusion model function with float32 output; it runs in the
    precision of the autocast context around the sampler (see ``UnclipPipeline._drain``)."""

    def fn(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return model(x, t, **kwargs).float()

    return fn


def _guided(
    fn: Callable[..., Tensor],
    guidance: float,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    learn_sigma: bool,
) -> Callable[..., Tensor]:
    """Classifier-free guidance of ``fn``; at scale 1 the plain conditional model (one pass)."""
    if guidance == 1.0:
        return lambda x, t, **kw: fn(x, t, **cond, **kw)
    return classifier_free_guidance(fn, guidance, cond, uncond, learn_sigma=learn_sigma)


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
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{what} must be between {low} and {high:,}, got {value}")
    return int(value)


def _check_seed(seed: int | None, count: int) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED - count:
        raise ValueError(f"seed must be between 0 and {MAX_SEED - count:,}, got {seed}")
    return int(seed)


def _to_pil(x: Tensor, info: dict[str, Any]) -> Image.Image:
    """[1, 3, H, W] in [-1, 1] -> RGB image with ``info`` (values as strings)."""
    from unclip.data.transforms import from_tensor

    img = from_tensor(x[0])
    img.info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    return img


# ---------------------------------------------------------------------------------------------


class UnclipPipeline:
    """DALL·E 2: caption → z_t → prior → z_i → decoder → upsamplers → image.

    Build with :func:`load_pipeline`. Attributes: ``tokenizer``, ``clip`` (a
    :class:`~unclip.clip.CLIP`), ``prior``/``decoder``/``inpaint_decoder`` (a :class:`Stage`
    or None), ``upsamplers`` (list of :class:`Stage`), ``config`` (the
    :class:`~unclip.pipeline.config.PipelineConfig`), ``device``, ``dtype``.
    See the module docstring for seeds, sampling overrides, outputs and progress.
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        clip: nn.Module,
        prior: Stage | None,
        decoder: Stage,
        inpaint_decoder: Stage | None = None,
        upsamplers: Sequence[Stage] = (),
        config: PipelineConfig | None = None,
        path: Path | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.clip = clip
        self.prior = prior
        self.decoder = decoder
        # a decoder trained with the inpainting inputs part of the time (GLIDE §4) paints
        # plain images (nothing known) and edits: it is its own inpainting decoder
        if inpaint_decoder is None and decoder is not None and decoder.model.config.inpaint:
            inpaint_decoder = decoder
        self.inpaint_decoder = inpaint_decoder
        self.upsamplers = list(upsamplers)
        self.config = config or PipelineConfig()
        self.path = path
        self.device = device or torch.device("cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        for stage in (decoder, inpaint_decoder, *self.upsamplers):  # faster convolutions
            if stage is not None:
                stage.model.to(memory_format=torch.channels_last)
        #: images sampled together in one batch (see the module docstring on seeds)
        self.max_batch = DEFAULT_MAX_BATCH
        self.name = self.config.name or (path.name if path else "unclip")
        self._check_stages()

    def __repr__(self) -> str:
        ups = " -> ".join(str(u.model.config.image_size) for u in self.upsamplers)
        return (
            f"UnclipPipeline({self.name!r}, {self.base_size}px"
            + (f" -> {ups}px" if ups else "")
            + f", prior={'yes' if self.prior else 'no'}, "
            f"inpaint_decoder={'yes' if self.inpaint_decoder else 'no'}, device={self.device})"
        )

    # -- structure ---------------------------------------------------------------------------

    def _check_stages(self) -> None:
        c = self.clip.config
        where = str(self.path) if self.path else "pipeline"
        if self.tokenizer.vocab_size > c.vocab_size:
            raise PipelineError(
                f"{where}: the tokenizer has {self.tokenizer.vocab_size} tokens but CLIP's "
                f"vocabulary holds {c.vocab_size}"
            )

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise PipelineError(f"{where}: {msg}")

        if self.prior is not None:
            p = self.prior.model.config
            need(p.clip_dim == c.embed_dim, f"prior clip_dim {p.clip_dim} != CLIP {c.embed_dim}")
            need(
                p.text_dim in (0, c.text_width),
                f"prior text_dim {p.text_dim} != CLIP text width {c.text_width}",
            )
            need(
                not p.text_dim or p.text_len >= c.context_length,
                f"prior text_len {p.text_len} < CLIP context length {c.context_length}",
            )
        for label, stage in (("decoder", self.decoder), ("inpaint_decoder", self.inpaint_decoder)):
            if stage is None:
                continue
            d = stage.model.config
            need(d.clip_dim == c.embed_dim, f"{label} clip_dim {d.clip_dim} != CLIP {c.embed_dim}")
            need(
                d.text_dim in (0, c.text_width),
                f"{label} text_dim {d.text_dim} != CLIP text width {c.text_width}",
            )
            need(not d.low_res_cond, f"{label} is an upsampler (low_res_cond)")
        if self.inpaint_decoder is not None:
            d = self.inpaint_decoder.model.config
            need(d.inpaint, "inpaint_decoder was not trained with inpainting inputs")
            need(
                d.image_size == self.base_size,
                f"inpaint_decoder image_size {d.image_size} != decoder {self.base_size}",
            )
        size = self.base_size
        for i, up in enumerate(self.upsamplers):
            u = up.model.config
            need(getattr(u, "low_res_cond", False), f"upsampler {i + 1} is not an upsampler")
            need(
                u.low_res_size == size,
                f"upsampler {i + 1} expects {u.low_res_size}px input, the stage before "
                f"gives {size}px",
            )
            size = u.image_size

    def compile(self, **options: Any) -> UnclipPipeline:
        """Compile the sampling networks (prior, decoders, upsamplers) with ``torch.compile``
        (``options`` are passed on; on a CPU it needs a C++ compiler). The first call at each
        new batch shape then takes a while (a minute or more per stage on a small CPU); later
        calls run faster (fused GroupNorm/SiLU/residual kernels). Worth it for a server or a
        long batch job, not for one image. Returns the pipeline."""
        for stage in (self.prior, self.decoder, self.inpaint_decoder, *self.upsamplers):
            if stage is not None and not is_compiled(stage.model):
                stage.model.compile(**options)  # in place: same module, same state dict
        return self

    @property
    def base_size(self) -> int:
        """The decoder's resolution."""
        return int(self.decoder.model.config.image_size)

    @property
    def image_size(self) -> int:
        """The output resolution (the last upsampler's, or the decoder's)."""
        if self.upsamplers:
            return int(self.upsamplers[-1].model.config.image_size)
        return self.base_size

    # -- settings ----------------------------------------------------------------------------

    def sampling_settings(self, **overrides: Any) -> SamplingConfig:
        """The pipeline's default sampling with ``overrides`` applied (None = keep), checked:
        a known sampler, 1 ≤ steps ≤ the stage's diffusion timesteps, guidance in [0, 100]."""
        base = self.config.sampling
        changes: dict[str, dict[str, Any]] = {"prior": {}, "decoder": {}, "upsampler": {}}
        sampler = overrides.pop("sampler", None)
        if sampler is not None:
            for stage in changes:
                changes[stage]["sampler"] = sampler
        for name, value in overrides.items():
            if name not in _OVERRIDES:
                known = ", ".join(["sampler", *_OVERRIDES])
                raise TypeError(f"unexpected keyword argument {name!r}; sampling options: {known}")
            if value is not None:
                stage, key = _OVERRIDES[name]
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
                if key == "sampler" and value not in SAMPLERS:
                    raise ValueError(
                        f"unknown sampler {value!r}; choose one of {', '.join(SAMPLERS)}"
                    )
                if key in ("steps", "candidates", "top_k"):
                    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
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
        limits = [("prior", self.prior), ("decoder", self.decoder)]
        limits += [("upsampler", u) for u in self.upsamplers]
        for stage, st in limits:
            if st is None or st.diffusion is None:
                continue
            steps = getattr(out, stage).steps
            if steps > st.diffusion.num_timesteps:
                raise ValueError(
                    f"{stage}_steps={steps} is more than the {stage}'s "
                    f"{st.diffusion.num_timesteps} diffusion timesteps"
                )
        if out.prior.candidates > 64:
            raise ValueError(f"prior_candidates must be at most 64, got {out.prior.candidates}")
        return out

    # -- encoders ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> Tensor:
        """CLIP text embeddings z_t, L2-normalised: N captions -> [N, D] float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.cat([self._text(t).z_t for t in texts]) if texts else torch.zeros(0)

    @torch.no_grad()
    def encode_image(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """CLIP image embeddings z_i, L2-normalised: N images (PIL or paths) -> [N, D] float32.
        Each image is composited onto white and centre-cropped (see ``pipeline.images``)."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        rows = [self._clip_image(prepare_image(as_image(img), self.image_size)) for img in images]
        return torch.cat(rows) if rows else torch.zeros(0)

    def _clip_image(self, x: Tensor) -> Tensor:
        """[1, 3, H, W] in [-1, 1] -> z_i [1, D] float32."""
        pixels = self.clip.preprocess(x.to(self.device))
        z = self.clip.encode_image(pixels)  # float32 always (see load_pipeline)
        return F.normalize(z.float(), dim=-1)

    def _text(self, text: str) -> TextCondition:
        """Encode one caption (on its own, so results do not depend on batch composition)."""
        check_prompt(text)
        clip = self.clip
        tokens = self.tokenizer([text], clip.config.context_length).to(self.device)
        with torch.no_grad():  # float32 always (see load_pipeline)
            z_t, feats, mask = clip.encode_text_condition(tokens)  # [1, D], [1, L, W], [1, L]
        return TextCondition(text, F.normalize(z_t.float(), dim=-1), feats.float(), mask)

    # -- stages ------------------------------------------------------------------------------

    def _run(
        self,
        name: str,
        stage: Stage,
        fn: Callable[..., Tensor],
        shape_or_noise: tuple[int, ...] | Tensor,
        sampler: str,
        steps: int,
        eta: float,
        generator: torch.Generator,
        progress: ProgressCallback | None,
        **kwargs: Any,
    ) -> Tensor:
        options = dict(kwargs)
        if sampler == "ddim":
            options["eta"] = eta
        callback = None if progress is None else (lambda step: progress(name, step))
        steps_iter = SAMPLERS[sampler](
            stage.diffusion,
            fn,
            shape_or_noise,
            steps,
            generator=generator,
            progress=callback,
            device=self.device,
            **options,
        )
        return self._drain(steps_iter, stage.model)

    def _drain(self, steps_iter: Iterable[SampleStep], model: nn.Module | None = None) -> Tensor:
        """Run a sampler to its end inside one autocast context, so each weight is cast to
        the low precision once per run rather than at every model call (autocast caches
        casts until its outermost context exits); a UNet ``model`` also runs inside its
        ``frozen_weights`` context (tensors derived from its weights built once per run)."""
        frozen = getattr(model, "frozen_weights", None)
        with _autocast(self.device, self.dtype), frozen() if frozen else nullcontext():
            return final(steps_iter)

    def _sample_prior(
        self,
        text: TextCondition,
        seeds: int | Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
    ) -> Tensor:
        """z_i [N, D] for N captions (``text`` [N], one seed each): ``candidates`` samples per
        caption, drawn as one batch, and the one closest to its z_t kept."""
        assert self.prior is not None
        from unclip.prior import unscale_embedding

        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if self.prior.diffusion is None:
            rows = [
                self._sample_ar_prior(text.row(j), s, settings, progress)
                for j, s in enumerate(seeds)
            ]
            return torch.cat(rows)
        st = settings.prior
        model = self.prior.model
        n, c = len(seeds), st.candidates
        with _autocast(self.device, self.dtype):  # [n·c] rows; caption caches in that dtype
            cond, uncond = model.sampling_conditions(
                text.z_t.repeat_interleave(c, 0),
                text.tokens.repeat_interleave(c, 0),
                text.mask.repeat_interleave(c, 0),
            )
        fn = _guided(_model_fn(model), st.guidance, cond, uncond, False)
        x = self._run(
            "prior",
            self.prior,
            fn,
            (n * c, model.config.clip_dim),
            st.sampler,
            st.steps,
            st.eta,
            stage_generators(seeds, "prior"),  # caption j's c rows from seed j
            progress,
        )
        z = unscale_embedding(x, model.embed_scale).view(n, c, -1)  # unit norm
        best = (z * text.z_t[:, None]).sum(-1).argmax(1)  # DALL·E 2: keep the higher z_i · z_t
        return z[torch.arange(n, device=z.device), best]  # [n, D]

    def _sample_ar_prior(
        self,
        text: TextCondition,
        seed: int,
        settings: SamplingConfig,
        progress: ProgressCallback | None,
    ) -> Tensor:
        """z_i [1, D] from an autoregressive prior: ``candidates`` code sequences (guided on
        the logits by ``ar_guidance``), decoded, the one closest to z_t kept."""
        assert self.prior is not None
        st = settings.prior
        model = self.prior.model
        c = st.candidates
        k_total = model.config.components
        tokens = mask = None
        if model.config.text_dim:
            tokens, mask = text.tokens.expand(c, -1, -1), text.mask.expand(c, -1)

        def callback(k: int, codes: Tensor) -> None:
            if progress is not None:
                x = codes.float()
                progress("prior", SampleStep(k, k_total, k_total - 1 - k, x, x))

        with _autocast(self.device, self.dtype):
            z = model.sample(
                text.z_t.expand(c, -1), tokens, mask, guidance=st.ar_guidance,
                temperature=st.temperature, top_k=st.top_k, top_p=st.top_p,
                generator=stage_generator(seed, "prior"), callback=callback,
            )  # fmt: skip
        z = F.normalize(z.float(), dim=-1)  # [c, D]
        best = int((z @ text.z_t[0]).argmax())  # DALL·E 2: keep the higher z_i · z_t
        return z[best : best + 1]

    def _decoder_kwargs(
        self, stage: Stage, z_i: Tensor, text: TextCondition | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) model kwargs of a decoder; uncond drops z_i and the caption."""
        cond: dict[str, Any] = {"image_emb": z_i}
        if text is not None and stage.model.config.text_dim:
            cond["text_tokens"] = text.tokens
            cond["text_mask"] = text.mask
        uncond = dict(cond)
        yes = torch.ones(z_i.shape[0], dtype=torch.bool, device=self.device)
        cond["drop_image_emb"] = cond["drop_text"] = ~yes
        uncond["drop_image_emb"] = uncond["drop_text"] = yes
        return cond, uncond

    def _decode(
        self,
        z_i: Tensor,
        text: TextCondition | None,
        seeds: int | Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
        *,
        noise: Tensor | None = None,
        known: tuple[Tensor, Tensor] | None = None,
        repaint: bool = False,
        repaint_options: dict[str, int] | None = None,
        eta: float | None = None,
    ) -> Tensor:
        """Decode z_i [N, D] (``text`` [N] or None, one seed per row) to images [N, 3, s, s]
        at the decoder's resolution, as one batch.

        ``noise``: x_T [N or 1, 3, s, s] (None: drawn from the seeds); ``eta``: DDIM η in place
        of the settings' (None: keep). ``known``: (image [1, 3, s, s], keep mask [1, 1, s, s])
        to inpaint: the inpainting decoder when the pipeline has one (and not ``repaint``),
        else RePaint with the plain decoder.
        """
        st = settings.decoder
        n = z_i.shape[0]
        use_inpaint_model = known is not None and self.inpaint_decoder is not None and not repaint
        stage = self.inpaint_decoder if use_inpaint_model else self.decoder
        assert stage is not None
        cond, uncond = self._decoder_kwargs(stage, z_i, text)
        if known is not None:
            known = (known[0].expand(n, -1, -1, -1), known[1].expand(n, -1, -1, -1))
        if use_inpaint_model:
            assert known is not None
            for kw in (cond, uncond):
                kw["inpaint_image"], kw["inpaint_mask"] = known[0], known[1]
        fn = _guided(
            _model_fn(stage.model),
            st.guidance,
            cond,
            uncond,
            stage.diffusion.learn_sigma,
        )
        s = self.base_size
        start = noise.expand(n, -1, -1, -1) if noise is not None else (n, 3, s, s)
        generator = stage_generators(seeds, "decoder")
        if known is not None and not use_inpaint_model:
            steps_iter = repaint_sample(
                stage.diffusion,
                fn,
                start,
                st.steps,
                x_known=known[0],
                keep_mask=known[1],
                generator=generator,
                progress=None if progress is None else (lambda step: progress("inpaint", step)),
                device=self.device,
                **(repaint_options or {}),
            )
            return self._drain(steps_iter, stage.model)
        x = self._run(
            "inpaint" if use_inpaint_model else "decoder",
            stage,
            fn,
            start,
            st.sampler,
            st.steps,
            st.eta if eta is None else eta,
            generator,
            progress,
        )
        if known is not None:  # keep the known pixels exactly
            x = known[1] * known[0] + (1 - known[1]) * x
        return x

    def _invert(
        self,
        image: Tensor,
        z_i: Tensor,
        settings: SamplingConfig,
        progress: ProgressCallback | None,
    ) -> Tensor:
        """x_T [1, 3, s, s] of an image [1, 3, s, s] by DDIM inversion of the decoder,
        conditioned on its own z_i (no guidance: inverting a guided model is unstable)."""
        cond, _ = self._decoder_kwargs(self.decoder, z_i, None)
        fn = _guided(_model_fn(self.decoder.model), 1.0, cond, cond, False)
        callback = None if progress is None else (lambda step: progress("invert", step))
        steps_iter = ddim_invert(
            self.decoder.diffusion,
            fn,
            image.to(self.device),
            settings.decoder.steps,
            progress=callback,
            device=self.device,
        )
        return self._drain(steps_iter, self.decoder.model)

    def _upsample(
        self,
        x: Tensor,
        seeds: int | Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
    ) -> Tensor:
        """Run the upsamplers in turn on a batch, one seed per image: [N, 3, s, s] ->
        [N, 3, S, S]. A stage trained with the
        (deterministic) blur augmentation gets the same blur on its input, as in training;
        random (BSR) degradation is a training-only corruption and is not applied."""
        from unclip.decoder.upsampler import gaussian_blur

        st = settings.upsampler
        for k, up in enumerate(self.upsamplers):
            cfg = up.model.config
            low = x.clamp(-1.0, 1.0)
            if cfg.augment == "blur":
                low = gaussian_blur(low, cfg.blur_kernel, cfg.blur_sigma)
            side = low.shape[-1] * cfg.image_size // cfg.low_res_size
            name = "upsampler" if k == 0 else f"upsampler{k + 1}"
            fn = _model_fn(up.model)
            generator = stage_generators(seeds, name)
            start: tuple[int, ...] | Tensor = (x.shape[0], 3, side, side)
            steps: int | None = st.steps
            extra: dict[str, Any] = {}
            if st.strength < 1.0:  # SDEdit: start from the noised bicubic enlargement
                t0 = round(st.strength * (up.diffusion.num_timesteps - 1))
                ts = torch.linspace(t0, 0, st.steps).round().long().tolist()
                extra["timesteps"] = sorted(set(ts), reverse=True)
                steps = None
                big = F.interpolate(x.clamp(-1, 1), size=(side, side), mode="bicubic")
                noise = randn(big.shape, generator)  # on the CPU, row k from generator k
                t = torch.full((x.shape[0],), t0, dtype=torch.long)
                start = up.diffusion.q_sample(big.clamp(-1, 1).cpu(), t, noise.cpu()).to(
                    self.device
                )
            x = self._run(
                name,
                up,
                lambda x_, t_, low=low, fn=fn, **kw: fn(x_, t_, low_res=low, **kw),
                start,
                st.sampler,
                steps,
                st.eta,
                generator,
                progress,
                **extra,
            )
        return x

    def _resize_to_base(self, x: Tensor) -> Tensor:
        """[N, 3, S, S] at the output resolution -> the decoder's [N, 3, s, s] (antialiased)."""
        s = self.base_size
        if x.shape[-1] == s:
            return x
        return F.interpolate(x, size=(s, s), mode="bicubic", antialias=True).clamp(-1, 1)

    def _info(
        self, method: str, seed: int, settings: SamplingConfig, stages: Sequence[str], **extra: Any
    ) -> dict[str, Any]:
        steps = {}
        guidance = {}
        samplers = {}
        for stage in stages:
            st = getattr(settings, "decoder" if stage == "inpaint" else stage)
            if stage == "prior" and self.prior is not None and self.prior.diffusion is None:
                steps[stage] = self.prior.model.config.components  # one code per step
                samplers[stage] = "autoregressive"
                guidance[stage] = st.ar_guidance
                continue
            steps[stage] = st.steps
            samplers[stage] = st.sampler
            if hasattr(st, "guidance"):
                guidance[stage] = st.guidance
        info: dict[str, Any] = {"method": method, "seed": str(seed), "model": self.name}
        info.update(steps=steps, guidance=guidance, sampler=samplers)
        info.update({k: v for k, v in extra.items() if v is not None})
        return info

    def _frames(
        self,
        z: Tensor,
        noise: Tensor | None,
        seeds: Sequence[int],
        settings: SamplingConfig,
        progress: ProgressCallback | None,
        infos: Sequence[dict[str, Any]],
        eta: float | None = None,
    ) -> list[Image.Image]:
        """Decode and upsample images from z [F, D] without a caption, image k with
        ``seeds[k]`` from x_T ``noise`` [F or 1, 3, s, s] (None: drawn from the seeds), in
        batches; image k gets ``infos[k]``. ``eta``: as in ``_decode``."""
        out = []
        for rows in self._batches(len(infos)):
            part = slice(rows.start, rows.stop)
            batch_seeds = list(seeds[part])
            x_t = noise[part] if noise is not None and noise.shape[0] > 1 else noise
            x = self._decode(z[part], None, batch_seeds, settings, progress, noise=x_t, eta=eta)
            x = self._upsample(x, batch_seeds, settings, progress)
            out += [_to_pil(x[j : j + 1], infos[k]) for j, k in enumerate(rows)]
        return out

    def _batches(self, count: int) -> list[range]:
        """Indices 0..count-1 in runs of at most ``max_batch`` (the images of one batch)."""
        size = max(1, int(self.max_batch))
        return [range(i, min(i + size, count)) for i in range(0, count, size)]

    def _stages_used(self, *first: str) -> list[str]:
        return [*first, *(["upsampler"] if self.upsamplers else [])]

    def _z_from_text(
        self,
        text: TextCondition,
        seeds: int | Sequence[int],
        settings: SamplingConfig,
        use_prior: bool,
        progress: ProgressCallback | None,
    ) -> Tensor:
        """z_i [N, D] for ``text`` [N]: prior samples, or z_t itself."""
        if use_prior and self.prior is not None:
            return self._sample_prior(text, seeds, settings, progress)
        return text.z_t  # the paper's §5.1 baseline: the text embedding in place of z_i

    # -- capabilities ------------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(
        self,
        prompt: str | Sequence[str],
        n: int = 1,
        *,
        seed: int | None = None,
        candidates: int | None = None,
        keep: int | None = None,
        use_prior: bool = True,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Text to image (DALL·E 2 §2): ``n`` images per prompt, prompt-major order.

        ``candidates=N``: draw N images per prompt and return the ``keep`` (default ``n``)
        with the highest CLIP similarity to the prompt, best first (CLIP re-ranking; the
        ``clip_score`` is in each image's info). ``use_prior=False`` feeds the decoder the
        text embedding z_t instead of a prior sample (the paper's §5.1 baseline; also what
        happens when the pipeline has no prior). Image ``p·draw + i`` uses seed ``seed + p·draw
        + i`` where draw = ``candidates`` or ``n``.
        """
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
        settings = self.sampling_settings(**overrides)
        base = _check_seed(seed, draw * len(prompts))
        used_prior = use_prior and self.prior is not None
        stages = self._stages_used(*(["prior"] if used_prior else []), "decoder")
        texts = [self._text(t) for t in prompts]
        images: list[Image.Image] = []  # image k: prompt k // draw, seed base + k
        for rows in self._batches(draw * len(prompts)):
            text = TextCondition.cat([texts[k // draw] for k in rows])
            seeds = [base + k for k in rows]
            z = self._z_from_text(text, seeds, settings, use_prior, progress)
            x = self._upsample(
                self._decode(z, text, seeds, settings, progress), seeds, settings, progress
            )
            for j, k in enumerate(rows):
                info = self._info(
                    "text_to_image", base + k, settings, stages, prompt=prompts[k // draw]
                )
                if not used_prior:
                    info["prior"] = "none (text embedding)"
                images.append(_to_pil(x[j : j + 1], info))
        if candidates is None:
            return images
        out: list[Image.Image] = []
        for p, text in enumerate(texts):
            group = images[p * draw : (p + 1) * draw]
            scores = self.encode_image(group) @ text.z_t[0]  # as delivered (8-bit), as `rank`
            for img, score in zip(group, scores.tolist(), strict=True):
                img.info["clip_score"] = f"{score:.4f}"
            order = sorted(range(draw), key=lambda j: -scores[j])[:keep]
            out.extend(group[j] for j in order)
        return out

    @torch.no_grad()
    def variations(
        self,
        image: ImageInput,
        n: int = 1,
        *,
        invert: bool = False,
        eta: float | None = None,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Variations of an image (DALL·E 2 §3.1): its CLIP embedding z_i decoded with new
        noise. ``invert=True`` starts every sample from the image's DDIM-inverted x_T and
        samples with DDIM at ``eta`` (default 0.5; η = 0 reconstructs the image), giving
        variations close to the original; otherwise each seed draws fresh noise (``eta``
        default: the pipeline's decoder η)."""
        img = as_image(image)
        n = check_count(n, "n")
        if eta is not None and not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        settings = self.sampling_settings(**overrides)
        base = _check_seed(seed, n)
        x_full = prepare_image(img, self.image_size).to(self.device)
        z = self._clip_image(x_full)
        noise = None
        if invert:
            noise = self._invert(self._resize_to_base(x_full), z, settings, progress)
            eta = 0.5 if eta is None else eta
        stages = self._stages_used("decoder")
        if invert:
            settings = settings.replace(decoder=settings.decoder.replace(sampler="ddim"))
        extra = {"inverted": "true" if invert else None}
        if eta is not None:
            extra["eta"] = str(eta)
        seeds = [base + i for i in range(n)]
        infos = [self._info("variations", s, settings, stages, **extra) for s in seeds]
        return self._frames(z.expand(n, -1), noise, seeds, settings, progress, infos, eta)

    @torch.no_grad()
    def interpolate(
        self,
        a: ImageInput,
        b: ImageInput,
        frames: int = 5,
        *,
        invert_noise: bool = False,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Interpolation between two images (DALL·E 2 §3.2): frame k decodes
        slerp(z_a, z_b, k / (frames - 1)). The decoder noise is the same for every frame
        (drawn from ``seed``), or with ``invert_noise=True`` the slerp of the two images'
        DDIM-inverted x_T, so the end frames reconstruct the inputs."""
        frames = check_count(frames, "frames", 2)
        img_a, img_b = as_image(a, "first image"), as_image(b, "second image")
        settings = self.sampling_settings(**overrides)
        base = _check_seed(seed, 1)
        xa = prepare_image(img_a, self.image_size).to(self.device)
        xb = prepare_image(img_b, self.image_size).to(self.device)
        za, zb = self._clip_image(xa), self._clip_image(xb)
        if invert_noise:
            na = self._invert(self._resize_to_base(xa), za, settings, progress)
            nb = self._invert(self._resize_to_base(xb), zb, settings, progress)
        else:
            s = self.base_size
            g = stage_generator(base, "decoder")
            na = nb = torch.randn((1, 3, s, s), generator=g).to(self.device)
        ts = [k / (frames - 1) for k in range(frames)]
        z = torch.cat([slerp(za, zb, t) for t in ts])
        noise = torch.cat([slerp(na, nb, t) for t in ts]) if invert_noise else na
        infos = [
            self._info(
                "interpolate",
                base,
                settings,
                self._stages_used("decoder"),
                frame=str(k),
                t=f"{t:.4f}",
                inverted="true" if invert_noise else None,
            )
            for k, t in enumerate(ts)
        ]
        return self._frames(z, noise, [base] * frames, settings, progress, infos)

    @torch.no_grad()
    def text_diff(
        self,
        image: ImageInput,
        source: str,
        target: str,
        frames: int = 5,
        *,
        max_theta: float = 0.5,
        invert: bool = True,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Text diffs (DALL·E 2 §3.3): move the image's z_i towards the text diff
        z_d = normalize(z_t(target) - z_t(source)): frame k decodes slerp(z_i, z_d, θ_k) with
        θ_k = max_theta · k / (frames - 1) (the paper goes to 0.25–0.5). The decoder noise is
        the image's DDIM-inverted x_T (``invert=True``, as in the paper) or drawn from ``seed``."""
        check_prompt(source, "source caption")
        check_prompt(target, "target caption")
        frames = check_count(frames, "frames", 2)
        if not 0.0 < max_theta <= 1.0:
            raise ValueError(f"max_theta must be in (0, 1], got {max_theta}")
        img = as_image(image)
        settings = self.sampling_settings(**overrides)
        base = _check_seed(seed, 1)
        x_full = prepare_image(img, self.image_size).to(self.device)
        z = self._clip_image(x_full)
        diff = self._text(target).z_t - self._text(source).z_t
        if float(diff.norm()) < 1e-6:
            raise ValueError("the source and target captions have the same CLIP embedding")
        z_d = diff / diff.norm(dim=-1, keepdim=True)
        if invert:
            noise = self._invert(self._resize_to_base(x_full), z, settings, progress)
        else:
            s = self.base_size
            noise = torch.randn((1, 3, s, s), generator=stage_generator(base, "decoder"))
        noise = noise.to(self.device)
        thetas = [max_theta * k / (frames - 1) for k in range(frames)]
        infos = [
            self._info(
                "text_diff",
                base,
                settings,
                self._stages_used("decoder"),
                source=source,
                target=target,
                frame=str(k),
                theta=f"{theta:.4f}",
                inverted="true" if invert else None,
            )
            for k, theta in enumerate(thetas)
        ]
        zs = torch.cat([slerp(z, z_d, theta) for theta in thetas])
        return self._frames(zs, noise, [base] * frames, settings, progress, infos)

    def _inpaint_core(
        self,
        method: str,
        known_full: Tensor,
        keep_full: Tensor,
        prompt: str,
        n: int,
        seed: int | None,
        use_prior: bool,
        repaint: bool,
        repaint_resample: int,
        repaint_jump: int,
        progress: ProgressCallback | None,
        overrides: dict[str, Any],
        extra: dict[str, Any],
    ) -> list[Image.Image]:
        check_prompt(prompt)
        n = check_count(n, "n")
        repaint_resample = check_count(repaint_resample, "repaint_resample", 1, 100)
        repaint_jump = check_count(repaint_jump, "repaint_jump", 1, 1000)
        settings = self.sampling_settings(**overrides)
        base = _check_seed(seed, n)
        text = self._text(prompt)
        known_full, keep_full = known_full.to(self.device), keep_full.to(self.device)
        known = (self._resize_to_base(known_full), downscale_keep(keep_full, self.base_size))
        with_model = self.inpaint_decoder is not None and not repaint
        options = {
            "jump_length": max(1, min(repaint_jump, settings.decoder.steps // 2)),
            "resample": repaint_resample,
        }
        used_prior = use_prior and self.prior is not None
        stages = self._stages_used(*(["prior"] if used_prior else []), "inpaint")
        out: list[Image.Image] = []
        for rows in self._batches(n):
            seeds = [base + i for i in rows]
            texts = TextCondition.cat([text] * len(seeds))
            z = self._z_from_text(texts, seeds, settings, use_prior, progress)
            x = self._decode(
                z, texts, seeds, settings, progress, known=known, repaint=repaint,
                repaint_options=options,
            )  # fmt: skip
            x = self._upsample(x, seeds, settings, progress)
            x = keep_full * known_full + (1 - keep_full) * x  # known pixels exactly as given
            for j, s in enumerate(seeds):
                info = self._info(
                    method, s, settings, stages, prompt=prompt,
                    inpainting="inpaint_decoder" if with_model else "repaint", **extra,
                )  # fmt: skip
                out.append(_to_pil(x[j : j + 1], info))
        return out

    @torch.no_grad()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput | None,
        prompt: str,
        n: int = 1,
        *,
        seed: int | None = None,
        use_prior: bool = True,
        repaint: bool = False,
        repaint_resample: int = 4,
        repaint_jump: int = 5,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Edit the masked region of an image to fit ``prompt`` (GLIDE §4 / DALL·E 2 edits).

        ``mask``: same size as ``image``; white or transparent = repaint (see
        ``pipeline.images``). None: the image's own transparent pixels are repainted. The
        inpainting decoder is used when the pipeline has one (unless ``repaint=True``);
        otherwise RePaint (Lugmayr et al. 2022) with the plain decoder, going back up
        ``repaint_jump`` steps ``repaint_resample - 1`` times per jump point. z_i comes
        from the prior given the prompt. The kept pixels of the output equal the input's.
        """
        img = as_image(image)
        if mask is None:
            if not has_transparency(img):
                raise ValueError(
                    "no mask given and the image has no transparent pixels; pass a mask "
                    "(white or transparent = repaint)"
                )
            repaint_px = repaint_mask(img)
        else:
            mask_img = as_image(mask, "mask")
            if mask_img.size != img.size:
                raise ValueError(
                    f"the mask is {mask_img.size[0]}×{mask_img.size[1]} but the image is "
                    f"{img.size[0]}×{img.size[1]}; they must be the same size"
                )
            repaint_px = repaint_mask(mask_img)
        keep = keep_mask(repaint_px, self.image_size)
        if bool(keep.all()):
            raise ValueError("the mask marks nothing to repaint (white or transparent = repaint)")
        known = prepare_image(img, self.image_size)
        return self._inpaint_core(
            "inpaint", known, keep, prompt, n, seed, use_prior, repaint, repaint_resample,
            repaint_jump, progress, overrides, {},
        )  # fmt: skip

    @torch.no_grad()
    def outpaint(
        self,
        image: ImageInput,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        prompt: str = "",
        n: int = 1,
        *,
        seed: int | None = None,
        use_prior: bool = True,
        repaint: bool = False,
        repaint_resample: int = 4,
        repaint_jump: int = 5,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> list[Image.Image]:
        """Grow the canvas by the margins (pixels of the input image) and paint the new area
        to fit ``prompt``. The grown canvas is centred on a white square (any extra area is
        painted too), the square is resized to the output resolution and inpainted, and the
        result is cropped back to the grown canvas: its longer side is the output size."""
        img = as_image(image)
        w, h = img.size
        margins = {"left": left, "right": right, "top": top, "bottom": bottom}
        limit = 4 * max(w, h)
        for key, value in margins.items():
            check_count(value, key, 0, limit)
        if not any(margins.values()):
            raise ValueError("outpaint needs a margin: give left, right, top or bottom > 0")
        canvas, repaint_px, box = paste_canvas(img, left, right, top, bottom)
        size = self.image_size
        keep = keep_mask(repaint_px, size)
        known = prepare_image(canvas, size)
        images = self._inpaint_core(
            "outpaint", known, keep, prompt, n, seed, use_prior, repaint, repaint_resample,
            repaint_jump, progress, overrides,
            {"margins": json.dumps(margins)},
        )  # fmt: skip
        crop = scale_box(box, size / canvas.size[0], size)
        out = []
        for im in images:
            cropped = im.crop(crop)
            cropped.info.update(im.info)
            out.append(cropped)
        return out

    @torch.no_grad()
    def scores(self, prompt: str, images: Sequence[ImageInput]) -> Tensor:
        """CLIP cosine similarity of each image with ``prompt``: [N] float32."""
        check_prompt(prompt)
        if not images:
            return torch.zeros(0)
        z_t = self._text(prompt).z_t[0]
        return (self.encode_image(list(images)) @ z_t).cpu()

    @torch.no_grad()
    def rank(
        self, prompt: str, images: Sequence[ImageInput], k: int | None = None
    ) -> list[Image.Image]:
        """The ``k`` (default all) images most similar to ``prompt`` under CLIP, best first;
        each copy carries ``clip_score`` and ``rank_index`` (its position in ``images``)."""
        if not images:
            raise ValueError("rank needs at least one image")
        k = len(images) if k is None else check_count(k, "k", 1, len(images))
        pil = [as_image(img) for img in images]
        sims = self.scores(prompt, pil)
        order = torch.argsort(sims, descending=True, stable=True)[:k].tolist()
        out = []
        for j in order:
            img = pil[j].copy()
            img.info.update(
                {"prompt": prompt, "clip_score": f"{float(sims[j]):.4f}", "rank_index": str(j)}
            )
            out.append(img)
        return out
