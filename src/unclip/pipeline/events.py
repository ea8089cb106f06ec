"""What the pipeline hands its consumers (the CLI, the server, tests), as plain data: the
progress event of every model call and the typed view of an image's metadata. No torch: the
server's job tracker and the CLI's bar read these without reaching into the samplers.

**Progress.** The pipeline calls ``progress(stage, event)`` after every model call, with a
:class:`ProgressEvent` (``event.stage == stage``; the stage is also passed first so a callback
may ignore the event).

**Metadata.** An image's ``info`` holds strings only (they become its PNG text chunks,
byte for byte); :data:`JSON_FIELDS`, :data:`INT_FIELDS` and :data:`FLOAT_FIELDS` say how each
field is typed, and :func:`image_fields` gives the typed values (``--json``, the server).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """One model call of a stage: step ``index`` (0-based) of ``total`` of stage ``stage``
    ("prior", "decoder", "inpaint", "invert", "upsampler", "upsampler2", …), drawing
    ``images`` images at once (the batch size of an image stage; 1 for the prior, whose rows
    are candidates, and for inversion). ``step``: the sampler's
    :class:`~unclip.diffusion.SampleStep` (x, x0 tensors) for callers that want the
    trajectory; consumers that only count need not touch it."""

    stage: str
    index: int
    total: int
    images: int = 1
    step: Any = None

    @property
    def last(self) -> bool:
        """Whether this is the stage's last step."""
        return self.index == self.total - 1


ProgressCallback = Callable[[str, ProgressEvent], None]

JSON_FIELDS = frozenset({"steps", "guidance", "sampler", "margins"})
"""Fields whose string is JSON (per-stage settings, outpaint margins)."""
INT_FIELDS = frozenset({"seed", "frame", "rank_index"})
FLOAT_FIELDS = frozenset({"clip_score", "theta", "t", "eta"})


def png_text(info: Mapping[str, Any]) -> dict[str, str]:
    """The string-valued fields of an image's ``info``: its PNG text chunks, in order."""
    return {k: v for k, v in info.items() if isinstance(v, str)}


def image_fields(info: Mapping[str, Any]) -> dict[str, Any]:
    """The typed metadata of an image's ``info`` (only its string fields, in order): JSON
    fields parsed (kept as the string when not JSON), integers and floats as numbers, the
    rest as strings."""
    out: dict[str, Any] = {}
    for key, value in png_text(info).items():
        if key in JSON_FIELDS:
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        if key in INT_FIELDS:
            out[key] = int(value)
        elif key in FLOAT_FIELDS:
            out[key] = float(value)
        else:
            out[key] = value
    return out
