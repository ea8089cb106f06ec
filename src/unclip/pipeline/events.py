"""What the pipeline hands its consumers (the CLI, the server, tests), as plain data: the
progress event of every model call and an image's metadata as a type. No torch: the server's
job tracker and the CLI's bar read these without reaching into the samplers.

**Progress.** The pipeline calls ``progress(stage, event)`` after every model call, with a
:class:`ProgressEvent` (``event.stage == stage``; the stage is also passed first so a callback
may ignore the event).

**Metadata.** Every image the pipeline makes carries an :class:`ImageInfo` (typed fields;
:func:`image_info` reads it, :func:`attach_info` sets it), and its ``image.info`` holds the
same as strings, its PNG text chunks (:meth:`ImageInfo.to_png_text`). The CLI's PNGs and
``--json``, and the server's answers and gallery, read the typed value; only an image read
from a file is parsed (:meth:`ImageInfo.from_png_text`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
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

_FOUR_DECIMALS = frozenset({"t", "theta", "clip_score"})
"""Fields whose PNG text has four decimals (the value is kept rounded to them)."""
INFO_ATTRIBUTE = "unclip_info"
"""The attribute of a PIL image that holds its :class:`ImageInfo` (see :func:`attach_info`)."""


@dataclass(frozen=True)
class ImageInfo:
    """An image's metadata, typed: how the pipeline made it (``method``, ``seed``, ``model``
    and ``weights_hash``, a short hash of the stage weights; per-stage ``steps``, ``guidance``
    and ``sampler``, and the other ``sampling`` settings as override names, such as
    ``{"prior_candidates": 2, "decoder_eta": 0.0}``) and what applies to its method
    (``prompt``; ``negative_prompt``; ``strength`` of an image-to-image call; ``image``, the
    input image's file where it was given as a path; ``inputs`` of a mix, each
    ``{"text": caption}`` or ``{"image": file or None}``, with their ``weights``; ``prior`` "none (text embedding)" without a prior sample; ``source`` and
    ``target`` of a text diff; ``frame`` and its ``t`` or ``theta``; ``inverted`` "true" when
    decoded from DDIM-inverted noise; DDIM ``eta``; ``inpainting`` "inpaint_decoder" or
    "repaint"; ``clip_score`` of a re-ranked image; outpaint ``margins``; ``rank_index`` in
    the ranked list; ``resized_from`` "WxH" where the server resized it). None = not set.
    ``extra``: other PNG text of an image read from a file, kept as it was.

    :meth:`to_png_text` is its PNG text (strings, the pipeline's order: the bytes of a PNG do
    not change with this type), :meth:`from_png_text` reads it back (for images read from
    files), :meth:`to_dict` is the plain dict ``--json`` and the server print.
    """

    method: str | None = None
    seed: int | None = None
    model: str | None = None
    weights_hash: str | None = None
    steps: dict[str, int] | None = None
    guidance: dict[str, float] | None = None
    sampler: dict[str, str] | None = None
    sampling: dict[str, Any] | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    strength: float | None = None
    image: str | None = None
    inputs: list[dict[str, Any]] | None = None
    weights: list[float] | None = None
    prior: str | None = None
    source: str | None = None
    target: str | None = None
    frame: int | None = None
    t: float | None = None
    theta: float | None = None
    inverted: str | None = None
    eta: float | None = None
    inpainting: str | None = None
    clip_score: float | None = None
    margins: dict[str, int] | None = None
    rank_index: int | None = None
    resized_from: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _FOUR_DECIMALS:  # the value is what the PNG says
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, round(float(value), 4))

    def replace(self, **changes: Any) -> ImageInfo:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def _items(self) -> list[tuple[str, Any]]:
        """(name, value) of the fields that are set, in the PNG's order (``extra`` first)."""
        names = [f.name for f in fields(self) if f.name != "extra"]
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]

    def to_png_text(self) -> dict[str, str]:
        """The PNG text chunks: numbers as text (``t``, ``theta``, ``clip_score`` with four
        decimals), the per-stage settings, margins and mix inputs and weights as JSON."""
        out = dict(self.extra)
        for name, value in self._items():
            if isinstance(value, (dict, list)):
                out[name] = json.dumps(value)
            elif name in _FOUR_DECIMALS:
                out[name] = f"{value:.4f}"
            else:
                out[name] = str(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The set fields as a plain (JSON-ready) dict, in the PNG's order."""
        return {**self.extra, **dict(self._items())}

    @classmethod
    def from_png_text(cls, text: Mapping[str, Any]) -> ImageInfo:
        """The metadata in an image's PNG text (its string entries; others are skipped): a
        field whose text does not parse as its type, and any other entry, go to ``extra``."""
        known: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for key, value in text.items():
            if not isinstance(value, str):
                continue
            try:
                known[key] = _PARSERS[key](value)
            except (KeyError, ValueError):
                extra[key] = value
        return cls(**known, extra=extra)


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text!r}")
    return value


def _json_list(text: str) -> list[Any]:
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError(f"not a JSON list: {text!r}")
    return value


def _parser(annotation: str) -> Callable[[str], Any]:
    """How the PNG text of a field with this (string) annotation is read."""
    parsers = (("dict", _json_object), ("list", _json_list), ("int", int), ("float", float))
    for prefix, parse in parsers:
        if annotation.startswith(prefix):
            return parse
    return str


_PARSERS = {f.name: _parser(str(f.type)) for f in fields(ImageInfo) if f.name != "extra"}


def image_info(image: Any) -> ImageInfo:
    """The metadata of a PIL image: the :class:`ImageInfo` the pipeline attached to it (while
    its PNG text still says the same), else read from its PNG text (an image from a file)."""
    info = getattr(image, INFO_ATTRIBUTE, None)
    if isinstance(info, ImageInfo):
        text = image.info
        if all(text.get(k) == v for k, v in info.to_png_text().items()):
            return info
    return ImageInfo.from_png_text(image.info)


def attach_info(image: Any, info: ImageInfo) -> Any:
    """Give a PIL image the metadata ``info``: as its PNG text in ``image.info`` (keys it has
    keep their place, new ones follow) and typed, for :func:`image_info`. Returns the image."""
    image.info.update(info.to_png_text())
    setattr(image, INFO_ATTRIBUTE, info)
    return image
