"""The unCLIP pipeline: every DALL·E 2 capability as one method of :class:`UnclipPipeline`.

- :mod:`.config`: ``pipeline.json`` (stages and default sampling settings);
- :mod:`.loading`: :func:`load_pipeline` (a folder or a shipped name -> stages, device, dtype);
- :mod:`.stages`: :class:`Stage`, loading one, checking that stages fit, device and dtype;
- :mod:`.core`: :class:`UnclipPipeline`, the capabilities (text to image, variations,
  interpolation, text diffs, inpainting, outpainting, mixing, image to image, CLIP
  re-ranking), with negative prompts; :mod:`.base`: the stage glue they share;
- :mod:`.mixing` and :mod:`.img2img`: the weighted mix of captions and images, and SDEdit;
- :mod:`.provenance`: the weights hash and redoing a call from an image's metadata;
- :mod:`.runners`: the stage runners (prior with best-of-N candidates, decode, upsample,
  DDIM invert) as plain functions;
- :mod:`.settings`: the limits of a call and the sampling overrides;
- :mod:`.events`: the progress event and the typed image metadata (no torch);
- :mod:`.images`: the resize policy, the mask convention, slerp;
- :mod:`.assemble`: :func:`assemble_pipeline` (trained stage folders -> a pipeline folder).

Typical use::

    import unclip
    pipe = unclip.load_pipeline("path/to/pipeline")
    images = pipe.text_to_image("a red apple, noto style", n=4, seed=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unclip.lazy import lazy_exports

if TYPE_CHECKING:  # the names loaded on first use (_LAZY), for type checkers and editors
    from unclip.pipeline.assemble import assemble_pipeline
    from unclip.pipeline.config import (
        PIPELINE_FILE,
        DecoderSampling,
        PipelineConfig,
        PriorSampling,
        SamplingConfig,
        StagesConfig,
        UpsamplerSampling,
    )
    from unclip.pipeline.core import UnclipPipeline
    from unclip.pipeline.events import ImageInfo, ProgressCallback, ProgressEvent, image_info
    from unclip.pipeline.loading import load_pipeline, resolve_pipeline, shipped_pipelines
    from unclip.pipeline.settings import MAX_IMAGES, MAX_PROMPT_CHARS, check_prompt
    from unclip.pipeline.stages import PipelineError, Stage, parse_device

# Each public name and the module that defines it, imported on first use: importing a light
# module of the package (config, settings, events) loads no torch.
_LAZY = {
    "assemble_pipeline": "assemble",
    **dict.fromkeys(
        ("PIPELINE_FILE", "PipelineConfig", "StagesConfig", "SamplingConfig"), "config"
    ),
    **dict.fromkeys(("PriorSampling", "DecoderSampling", "UpsamplerSampling"), "config"),
    "UnclipPipeline": "core",
    **dict.fromkeys(("ImageInfo", "ProgressCallback", "ProgressEvent", "image_info"), "events"),
    **dict.fromkeys(("load_pipeline", "resolve_pipeline", "shipped_pipelines"), "loading"),
    **dict.fromkeys(("MAX_IMAGES", "MAX_PROMPT_CHARS", "check_prompt"), "settings"),
    **dict.fromkeys(("PipelineError", "Stage", "parse_device"), "stages"),
}


__getattr__, __dir__ = lazy_exports(
    globals(), {name: f"unclip.pipeline.{module}" for name, module in _LAZY.items()}
)


__all__ = [
    "MAX_IMAGES",
    "MAX_PROMPT_CHARS",
    "PIPELINE_FILE",
    "DecoderSampling",
    "ImageInfo",
    "PipelineConfig",
    "PipelineError",
    "PriorSampling",
    "ProgressCallback",
    "ProgressEvent",
    "SamplingConfig",
    "Stage",
    "StagesConfig",
    "UnclipPipeline",
    "UpsamplerSampling",
    "assemble_pipeline",
    "check_prompt",
    "image_info",
    "load_pipeline",
    "parse_device",
    "resolve_pipeline",
    "shipped_pipelines",
]
