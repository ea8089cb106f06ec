"""The unCLIP pipeline: every DALL·E 2 capability as one method of :class:`UnclipPipeline`.

- :mod:`.config`: ``pipeline.json`` (stages and default sampling settings);
- :mod:`.core`: :func:`load_pipeline` and :class:`UnclipPipeline` (text to image, variations,
  interpolation, text diffs, inpainting, outpainting, CLIP re-ranking);
- :mod:`.images`: the resize policy, the mask convention, slerp;
- :mod:`.assemble`: :func:`assemble_pipeline` (trained stage folders -> a pipeline folder).

Typical use::

    import unclip
    pipe = unclip.load_pipeline("path/to/pipeline")
    images = pipe.text_to_image("a red apple, noto style", n=4, seed=0)
"""

from __future__ import annotations

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
from unclip.pipeline.core import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    PipelineError,
    ProgressCallback,
    Stage,
    UnclipPipeline,
    check_prompt,
    load_pipeline,
    parse_device,
    resolve_pipeline,
    shipped_pipelines,
)

__all__ = [
    "MAX_IMAGES",
    "MAX_PROMPT_CHARS",
    "PIPELINE_FILE",
    "DecoderSampling",
    "PipelineConfig",
    "PipelineError",
    "PriorSampling",
    "ProgressCallback",
    "SamplingConfig",
    "Stage",
    "StagesConfig",
    "UnclipPipeline",
    "UpsamplerSampling",
    "assemble_pipeline",
    "check_prompt",
    "load_pipeline",
    "parse_device",
    "resolve_pipeline",
    "shipped_pipelines",
]
