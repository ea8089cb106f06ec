"""Loading a pipeline: a folder (or a shipped name) -> its stages on a device, at a precision.

:func:`load_pipeline` reads ``pipeline.json``, the tokenizer, CLIP and every sampling stage
(a model folder + its ``diffusion.json``, :func:`~unclip.pipeline.stages.load_stage`), checks
that the stages fit together (:func:`~unclip.pipeline.stages.check_stages`) and returns an
:class:`~unclip.pipeline.core.UnclipPipeline`. The top of the package: the stage-level pieces
live in :mod:`.stages`, the pipeline in :mod:`.core`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unclip.config import PIPELINE_FILE
from unclip.pipeline.config import PipelineConfig
from unclip.pipeline.core import UnclipPipeline
from unclip.pipeline.stages import PipelineError, load_stage, parse_device, resolve_dtype

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


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


def load_pipeline(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    offload: bool = False,
) -> UnclipPipeline:
    """Load a pipeline folder (or a shipped pipeline by name) onto ``device`` (default: CUDA
    when available, else CPU). A diffusers unCLIP folder (``model_index.json``, Karlo's
    layout) is converted on load (:mod:`unclip.pipeline.diffusers_folder`).

    ``dtype`` is the compute precision of the sampling networks (prior, decoders,
    upsamplers): float32, or float16/bfloat16 run under ``torch.autocast`` with float32
    weights and float32 sampler state, so every network is used as it was trained (with
    bf16 autocast). None or "auto": :func:`default_dtype` (float32 on a CPU where unclip's
    compiled kernels run and bf16 has no AMX, as they are faster; else bfloat16 on a CPU with
    AVX-512 BF16 or AMX, or a GPU with bf16; float32 elsewhere; the ``UNCLIP_DTYPE``
    environment variable overrides it). CLIP always runs in float32, so
    embeddings and scores do not depend on it. The convolutional stages are kept in the
    channels-last memory format, which oneDNN and cuDNN run faster.

    ``offload``: the sampling networks are loaded to (and wait on) the CPU, and each stage
    moves to ``device`` only while it samples (one stage's weights on the accelerator at a
    time, for a GPU too small for all of them; CLIP stays on ``device``).
    """
    from unclip.clip import load_clip
    from unclip.pipeline.diffusers_folder import is_diffusers_folder, load_diffusers_pipeline
    from unclip.tokenizer import Tokenizer

    dev = parse_device(device)
    dtype = resolve_dtype(dtype, dev)  # refused before any weights are read
    if is_diffusers_folder(name_or_path):  # Karlo's layout: converted on load
        return load_diffusers_pipeline(name_or_path, dev, dtype, offload)
    folder = resolve_pipeline(name_or_path)
    config = PipelineConfig.load(folder / PIPELINE_FILE)
    stages = config.stages
    tok_dir = folder / stages.tokenizer
    if not tok_dir.is_dir():
        raise PipelineError(f"{tok_dir}: the tokenizer stage folder is missing")
    tokenizer = Tokenizer.load(tok_dir)
    clip_dir = folder / stages.clip
    if not clip_dir.is_dir():
        raise PipelineError(f"{clip_dir}: the clip stage folder is missing")
    clip = load_clip(clip_dir, device=dev)
    at = torch.device("cpu") if offload else dev  # where the stages wait
    prior = load_stage(folder / stages.prior, "prior", at) if stages.prior else None
    decoder = load_stage(folder / stages.decoder, "decoder", at)
    inpaint = (
        load_stage(folder / stages.inpaint_decoder, "inpaint_decoder", at)
        if stages.inpaint_decoder
        else None
    )
    upsamplers = [load_stage(folder / u, "upsampler", at) for u in stages.upsamplers]
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
        offload=offload,
    )
