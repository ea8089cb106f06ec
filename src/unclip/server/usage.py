"""What a request used, in the shape of the OpenAI Images API's ``usage`` object.

unclip has no billing tokens; ``usage`` counts what the networks read and how much sampling
ran, so that a client can log and compare requests:

- ``input_tokens_details.text_tokens``: the CLIP tokens of every text the request gives
  (prompt, negative prompt, mix prompts), as the text encoder reads them: start and end
  tokens included, cut at the tokenizer's context length;
- ``input_tokens_details.image_tokens``: per input image (an edit's, a variation's, mix or
  interpolation images; never a mask), the tokens of CLIP's image encoder (a ViT's patches
  plus its class token; a ResNet's attention-pool grid plus one), whether or not the method
  runs CLIP on it: a fixed count per image;
- ``output_tokens`` (and ``output_tokens_details.image_tokens``): the sampling steps run for
  the output images, summed over images and stages (prior, decoder, upsamplers: the
  ``steps`` of each image's metadata). Guidance doubling a step's network calls, DDIM
  inversion and the prior's extra candidates are not counted;
- ``total_tokens``: input plus output.

Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["InputTokens", "clip_image_tokens", "count_inputs", "output_tokens", "usage"]


@dataclass(frozen=True)
class InputTokens:
    """The input side of a request's usage."""

    text: int = 0
    image: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image


def clip_image_tokens(pipe: Any) -> int:
    """The tokens of the pipeline's CLIP image encoder for one image (0 when unknown)."""
    config = getattr(getattr(pipe, "clip", None), "config", None)
    if config is None:
        return 0
    if getattr(config, "vision_type", "vit") == "resnet":
        grid = int(config.image_size) // 32
    else:
        grid = int(config.image_size) // int(config.patch_size)
    return grid * grid + 1


def count_inputs(pipe: Any, texts: Sequence[str], images: int) -> InputTokens:
    """The input tokens of a request giving ``texts`` and ``images`` input images."""
    text = 0
    tokenizer = getattr(pipe, "tokenizer", None)
    if texts and tokenizer is not None:
        context = int(tokenizer.context_length)
        text = sum(min(len(ids) + 2, context) for ids in tokenizer.encode_batch(list(texts)))
    return InputTokens(text, images * clip_image_tokens(pipe))


def output_tokens(infos: Iterable[Any]) -> int:
    """The sampling steps run for images with these :class:`ImageInfo`."""
    return sum(sum((info.steps or {}).values()) for info in infos)


def usage(inputs: InputTokens, output: int) -> dict[str, Any]:
    """The ``usage`` object of an answer or a ``completed`` event."""
    return {
        "input_tokens": inputs.total,
        "input_tokens_details": {"text_tokens": inputs.text, "image_tokens": inputs.image},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": inputs.total + output,
    }
