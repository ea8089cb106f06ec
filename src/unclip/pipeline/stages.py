"""A pipeline's stages, below the pipeline itself: :class:`Stage` (a network and its
diffusion), loading one from its folder (:func:`load_stage`), the checks that the stages of a
pipeline fit together (:func:`check_stages`), and the device and sampling precision they run
on (:func:`parse_device`, :func:`resolve_dtype`). Nothing here imports the pipeline class;
:mod:`.loading` assembles one from these.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from unclip.config import DIFFUSION_FILE, DiffusionConfig
from unclip.diffusion import GaussianDiffusion
from unclip.precision import compiled_float32_faster, native_bf16


class PipelineError(ValueError):
    """A pipeline folder that cannot be used (missing stage, stages that do not fit)."""


#: a stage folder's subfolder holding the network of its last sampling step, when it has one
LAST_STEP_FOLDER = "last_step"


@dataclass
class Stage:
    """A stage: its network and the diffusion process it was trained with (None for the
    autoregressive prior, which samples codes instead). ``last_step``: a second network that
    takes the last sampling step (t = 0) in place of ``model`` (Karlo's ``super_res_last``;
    the stage folder's ``last_step/``), or None."""

    model: nn.Module
    diffusion: GaussianDiffusion | None
    last_step: nn.Module | None = None

    def networks(self) -> list[nn.Module]:
        """The stage's networks: ``model``, then ``last_step`` when there is one."""
        return [self.model] + ([self.last_step] if self.last_step is not None else [])


def is_ar_prior(model: nn.Module) -> bool:
    """Whether ``model`` is an autoregressive prior (type ``ar_prior``)."""
    return getattr(getattr(model, "config", None), "type_name", "") == "ar_prior"


class StagedPipeline(Protocol):
    """What :func:`check_stages` and :func:`~unclip.pipeline.provenance.weights_hash` read of a
    pipeline (:class:`~unclip.pipeline.base.PipelineBase` has it all): its tokenizer, CLIP,
    stages, folder and the decoder's resolution."""

    tokenizer: Any
    clip: nn.Module
    prior: Stage | None
    decoder: Stage
    inpaint_decoder: Stage | None
    upsamplers: list[Stage]
    path: Path | None

    @property
    def base_size(self) -> int: ...


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


def load_stage(folder: Path, what: str, device: torch.device) -> Stage:
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
    last = None
    if (folder / LAST_STEP_FOLDER).is_dir():
        last = from_pretrained(folder / LAST_STEP_FOLDER, device=device)
        if (
            type(last) is not type(model)
            or getattr(last.config, "learn_sigma", False) != learn_sigma
        ):
            raise PipelineError(f"{folder / LAST_STEP_FOLDER}: not a network of the same kind")
    return Stage(model, diffusion, last)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: environment variable that overrides what "auto" picks (float32, float16 or bfloat16), e.g.
#: ``UNCLIP_DTYPE=float32`` to sample as a CPU without bf16 does; unset or "auto": per device
DTYPE_ENV = "UNCLIP_DTYPE"


def default_dtype(device: torch.device) -> torch.dtype:
    """The sampling precision ``load_pipeline`` picks for "auto": :data:`DTYPE_ENV` when set,
    else bfloat16 where :func:`native_bf16` unless :func:`compiled_float32_faster`, else
    float32."""
    forced = os.environ.get(DTYPE_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in DTYPES:
            raise ValueError(f"{DTYPE_ENV} must be auto, {', '.join(DTYPES)}; got {forced!r}")
        return DTYPES[forced]
    if native_bf16(device) and not compiled_float32_faster(device):
        return torch.bfloat16
    return torch.float32


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


def check_stages(pipe: StagedPipeline) -> None:
    """Raise :class:`PipelineError` naming the folder unless the stages of ``pipe`` fit together:
    the tokenizer within CLIP's vocabulary, every embedding width equal to CLIP's, each
    upsampler taking the resolution of the stage before it."""
    c = pipe.clip.config
    where = str(pipe.path) if pipe.path else "pipeline"
    if pipe.tokenizer.vocab_size > c.vocab_size:
        raise PipelineError(
            f"{where}: the tokenizer has {pipe.tokenizer.vocab_size} tokens but CLIP's "
            f"vocabulary holds {c.vocab_size}"
        )

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise PipelineError(f"{where}: {msg}")

    if pipe.prior is not None:
        p = pipe.prior.model.config
        need(p.clip_dim == c.embed_dim, f"prior clip_dim {p.clip_dim} != CLIP {c.embed_dim}")
        need(
            p.text_dim in (0, c.text_width),
            f"prior text_dim {p.text_dim} != CLIP text width {c.text_width}",
        )
        need(
            not p.text_dim or p.text_len >= c.context_length,
            f"prior text_len {p.text_len} < CLIP context length {c.context_length}",
        )
    for label, stage in (("decoder", pipe.decoder), ("inpaint_decoder", pipe.inpaint_decoder)):
        if stage is None:
            continue
        d = stage.model.config
        need(d.clip_dim == c.embed_dim, f"{label} clip_dim {d.clip_dim} != CLIP {c.embed_dim}")
        need(
            d.text_dim in (0, c.text_width),
            f"{label} text_dim {d.text_dim} != CLIP text width {c.text_width}",
        )
        need(not d.low_res_cond, f"{label} is an upsampler (low_res_cond)")
    if pipe.inpaint_decoder is not None:
        d = pipe.inpaint_decoder.model.config
        need(d.inpaint, "inpaint_decoder was not trained with inpainting inputs")
        need(
            d.image_size == pipe.base_size,
            f"inpaint_decoder image_size {d.image_size} != decoder {pipe.base_size}",
        )
    size = pipe.base_size
    for i, up in enumerate(pipe.upsamplers):
        u = up.model.config
        need(getattr(u, "low_res_cond", False), f"upsampler {i + 1} is not an upsampler")
        need(
            u.low_res_size == size,
            f"upsampler {i + 1} expects {u.low_res_size}px input, the stage before gives {size}px",
        )
        size = u.image_size


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been called on it."""
    return getattr(module, "_compiled_call_impl", None) is not None


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its compiled forward (the copy of a compiled module
    would still call the original's)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if is_compiled(m):
            m._compiled_call_impl = None
    return out
