"""Reproducible requests: which weights made an image, and the call that makes it again.

Every image's :class:`~unclip.pipeline.events.ImageInfo` names the pipeline (``model``) and
carries ``weights_hash`` (:func:`weights_hash`, computed once per pipeline) besides the
method, seed and settings of its call; :func:`redo_call` turns that metadata back into the
call (``unclip generate --from-png`` uses it).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from unclip.pipeline.config import upsampler_name
from unclip.pipeline.events import ImageInfo
from unclip.pipeline.settings import overrides_from_info

if TYPE_CHECKING:
    from unclip.pipeline.stages import StagedPipeline

#: hex digits of SHA-256 kept in ``weights_hash``
HASH_DIGITS = 12
#: the methods :func:`redo_call` can redo from an image's metadata
REDOABLE = ("text_to_image", "variations", "image_to_image", "mix")


def weights_hash(pipe: StagedPipeline) -> str:
    """A short content hash of the weights of every network of ``pipe`` (CLIP, prior,
    decoder, inpainting decoder, upsamplers, each with its last-step network if it has one):
    SHA-256 over each one's state-dict entries (name, dtype, shape and bytes) in name order,
    its first :data:`HASH_DIGITS` hex digits. The same weights give the same hash on any
    device; any changed value changes it."""
    named = [("prior", pipe.prior), ("decoder", pipe.decoder)]
    if pipe.inpaint_decoder is not pipe.decoder:
        named.append(("inpaint_decoder", pipe.inpaint_decoder))
    named += [(upsampler_name(k), up) for k, up in enumerate(pipe.upsamplers)]
    stages = [("clip", pipe.clip)] + [
        (f"{name}/{i}", net)
        for name, stage in named
        if stage is not None
        for i, net in enumerate(stage.networks())
    ]
    h = hashlib.sha256()
    for name, module in stages:
        h.update(f"[{name}]".encode())
        for key, value in sorted(module.state_dict().items()):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:HASH_DIGITS]


def redo_call(info: ImageInfo) -> tuple[str, list[Any], dict[str, Any]]:
    """(method name, positional arguments, keyword arguments) of the pipeline call that makes
    the image with metadata ``info`` again: the same method, inputs, seed, sampling settings,
    negative prompt and strength, for one image. Input images are their recorded files.
    ValueError (one line) for a method not in :data:`REDOABLE` or metadata that lacks what the
    call needs."""
    method = info.method
    if method not in REDOABLE:
        raise ValueError(
            f"cannot redo a {method or 'unknown'} image from its metadata; "
            f"redoable: {', '.join(REDOABLE)}"
        )
    if info.seed is None:
        raise ValueError("its metadata has no seed")
    kwargs: dict[str, Any] = {"seed": info.seed}
    kwargs.update(overrides_from_info(info.steps, info.guidance, info.sampler, info.sampling))
    if info.negative_prompt is not None:
        kwargs["negative_prompt"] = info.negative_prompt

    def need(value: Any, what: str) -> Any:
        if value is None:
            raise ValueError(f"its metadata has no {what} (a {method} image needs one)")
        return value

    if method == "text_to_image":
        if info.prior == "none (text embedding)":
            kwargs["use_prior"] = False
        return method, [need(info.prompt, "prompt")], kwargs
    if method == "image_to_image":
        kwargs["strength"] = need(info.strength, "strength")
        return method, [need(info.image, "input image file"), info.prompt], kwargs
    if method == "variations":
        if info.inverted == "true":
            kwargs["invert"] = True
        if info.eta is not None:
            kwargs["eta"] = info.eta
        return method, [need(info.image, "input image file")], kwargs
    inputs = []
    for k, item in enumerate(need(info.inputs, "mix inputs"), 1):
        value = item.get("text", item.get("image")) if isinstance(item, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"mix input {k} has no caption or image file in its metadata")
        inputs.append(value)
    kwargs["weights"] = info.weights
    return method, [inputs], kwargs
