"""``assemble_pipeline``: trained stage folders (``RUN_DIR/final``) -> one pipeline folder.

Each model is rebuilt with :func:`unclip.hub.from_pretrained` (EMA weights when the folder
has them) and written back with only those weights, cast to ``dtype`` (fp16 by default:
half the size, and loading casts back), next to a copy of its ``diffusion.json`` (an
autoregressive prior has none: it samples codes, and its code book is in its weights). No
optimizer state or raw weights travel. The folder is built under a temporary name, loaded
once as a pipeline to check that the stages fit together, and only then renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from unclip.config import DIFFUSION_FILE, DiffusionConfig, building_folder
from unclip.pipeline.config import (
    PIPELINE_FILE,
    PipelineConfig,
    SamplingConfig,
    StagesConfig,
    upsampler_name,
)


def stage_folder(path: str | os.PathLike, what: str) -> Path:
    """A model folder: ``path`` itself, or ``path/final`` when given a training run folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such {what} folder")
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        return p / "final"
    return p


def _copy_diffusion_stage(src: Path, dst: Path, what: str, dtype: torch.dtype) -> None:
    from unclip.hub import from_pretrained, load_config, save_pretrained

    if what == "prior" and load_config(src).type_name == "ar_prior":
        save_pretrained(from_pretrained(src), dst, dtype=dtype)
        return
    if not (src / DIFFUSION_FILE).is_file():
        raise FileNotFoundError(
            f"{src / DIFFUSION_FILE}: missing; the {what} folder must come from `unclip train`"
        )
    diffusion = DiffusionConfig.load(src / DIFFUSION_FILE)
    model = from_pretrained(src)
    save_pretrained(model, dst, dtype=dtype)
    diffusion.save(dst / DIFFUSION_FILE)


def assemble_pipeline(
    out: str | os.PathLike,
    *,
    clip: str | os.PathLike,
    decoder: str | os.PathLike,
    prior: str | os.PathLike | None = None,
    upsamplers: Sequence[str | os.PathLike] = (),
    inpaint_decoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    sampling: SamplingConfig | None = None,
    name: str | None = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a pipeline folder at ``out`` from trained stage folders and return its path.

    ``clip``: a CLIP folder (unclip, or any format :func:`unclip.clip.load_clip` reads);
    ``tokenizer``: a tokenizer folder (default: ``CLIP/tokenizer``). ``prior``: a diffusion
    or autoregressive prior folder; None gives a pipeline without prior (the decoder gets z_t). ``upsamplers`` lowest resolution first.
    A stage may be given as a run folder; its ``final/`` is used. ``out`` must not exist
    unless ``overwrite``.
    """
    from unclip.clip import load_clip
    from unclip.hub import save_pretrained
    from unclip.pipeline.loading import load_pipeline
    from unclip.pipeline.stages import PipelineError
    from unclip.tokenizer import Tokenizer

    out = Path(out)
    clip_dir = stage_folder(clip, "clip")
    tok_dir = Path(tokenizer) if tokenizer else clip_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{tok_dir}: no tokenizer folder (a CLIP run's final/ has one; or pass a tokenizer)"
        )
    sources: list[tuple[str, Path, str]] = []
    if prior is not None:
        sources.append(("prior", stage_folder(prior, "prior"), "prior"))
    sources.append(("decoder", stage_folder(decoder, "decoder"), "decoder"))
    if inpaint_decoder is not None:
        sources.append(
            ("inpaint_decoder", stage_folder(inpaint_decoder, "inpaint decoder"), "inpaint decoder")
        )
    up_names = [upsampler_name(i) for i in range(len(upsamplers))]
    for sub, path in zip(up_names, upsamplers, strict=True):
        sources.append((sub, stage_folder(path, "upsampler"), "upsampler"))

    with building_folder(out, overwrite) as tmp:
        Tokenizer.load(tok_dir).save(tmp / "tokenizer")
        save_pretrained(load_clip(clip_dir), tmp / "clip", dtype=dtype)
        for sub, src, what in sources:
            _copy_diffusion_stage(src, tmp / sub, what, dtype)
        config = PipelineConfig(
            name=name or out.name,
            stages=StagesConfig(
                prior="prior" if prior is not None else None,
                inpaint_decoder="inpaint_decoder" if inpaint_decoder is not None else None,
                upsamplers=up_names,
            ),
            sampling=sampling or SamplingConfig(),
        )
        config.save(tmp / PIPELINE_FILE)
        try:
            load_pipeline(tmp, device="cpu")  # the stages must fit together
        except PipelineError as e:
            raise PipelineError(str(e).replace(str(tmp), str(out))) from None
    return out
