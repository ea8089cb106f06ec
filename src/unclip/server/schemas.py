"""The Images API's request models, and :func:`validate`, which turns a validation error into
an OpenAI error object naming the field.

Unknown fields are refused (a typo should not be silently ignored); the OpenAI fields that
make no sense here (``quality``, ``style``, ``moderation``…) are accepted and ignored. Each
model says which of its fields are files (``files``), which texts condition the images
(:meth:`ImageRequest.texts`, for the ``usage``) and whether the prior runs
(:meth:`ImageRequest.prior_used`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unclip.pipeline.config import SamplerName
from unclip.pipeline.settings import MAX_IMAGES, MAX_SEED
from unclip.server.errors import bad_request

__all__ = [
    "MIX_SLOTS",
    "EditRequest",
    "GenerationRequest",
    "ImageRequest",
    "InterpolationRequest",
    "MixRequest",
    "PriorOptions",
    "PromptRequest",
    "VariationRequest",
    "WithPrior",
    "validate",
]

#: the most inputs a mix takes (fields ``input_1`` … ``input_4``)
MIX_SLOTS = 4
#: the most partial images a streamed request may ask for (as the OpenAI API)
MAX_PARTIAL_IMAGES = 3
OutputFormat = Literal["png", "jpeg", "webp"]
#: the OpenAI API's ``quality`` values (accepted and ignored: one pipeline, one quality)
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]


class ImageRequest(BaseModel):
    """The fields of every image route."""

    model_config = ConfigDict(extra="forbid")
    #: a multipart request's file fields (name: required), in the order they are read
    files: ClassVar[dict[str, bool]] = {}
    #: file fields that may be sent as text instead (a mix input: a prompt or an image)
    text_or_file: ClassVar[tuple[str, ...]] = ()

    model: str | None = Field(None, description="ignored: the server runs one pipeline")
    user: str | None = Field(None, description="ignored")
    safety_identifier: str | None = Field(None, description="ignored")
    size: str | None = Field(
        None,
        description="'auto' or 'SxS' with S the pipeline's resolution (default) or 256, 512, "
        "1024 (a plain resize of the pipeline's output)",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="default 'url' (as the OpenAI API for DALL·E 2)"
    )
    quality: Quality | None = Field(None, description="ignored (echoed in streamed events)")
    style: Literal["vivid", "natural"] | None = Field(None, description="ignored")
    output_format: OutputFormat | None = Field(
        None, description="file format of the images (default png); url files get its extension"
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg/webp quality, 0-100 (default 100); png ignores it"
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="'auto' or 'opaque' (the images are opaque); 'transparent' is refused"
    )
    # extensions
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED - MAX_IMAGES,
        description="seed of the first image; image i uses seed+i",
    )
    steps: int | None = Field(None, description="sampling steps of the prior and the decoder")
    decoder_steps: int | None = None
    upsampler_steps: int | None = None
    guidance: float | None = Field(None, description="decoder guidance scale (1 = off)")
    decoder_guidance: float | None = None
    sampler: SamplerName | None = Field(None, description="sampler of every stage")
    preset: Literal["fast"] | None = Field(
        None,
        description="'fast': the sampling preset with fewer decoder steps (FD within 3% of "
        "the default's); the fields above override it",
    )

    def texts(self) -> list[str]:
        """The texts that condition the images (prompts, negative prompt)."""
        return []

    def prior_used(self) -> bool:
        """Whether the request may run the prior (so takes the prior's settings)."""
        return False


class PriorOptions(ImageRequest):
    prior_steps: int | None = None
    prior_guidance: float | None = None


class WithPrior(PriorOptions):
    use_prior: bool = Field(True, description="false: decode the caption's text embedding")

    def prior_used(self) -> bool:
        return True  # with use_prior=false the prior's settings are accepted and unused


class PromptRequest(WithPrior):
    """A prompt, its negative, and streaming (generations and edits)."""

    prompt: str
    n: int = 1
    negative_prompt: str | None = Field(
        None, description="what the images should not show (guidance pushes away from it)"
    )
    stream: bool | None = Field(
        False, description="answer with server-sent events (partial images, then the images)"
    )
    partial_images: int | None = Field(
        None, ge=0, le=MAX_PARTIAL_IMAGES, description="partial images per image when streaming"
    )

    def texts(self) -> list[str]:
        return [self.prompt] + ([self.negative_prompt] if self.negative_prompt else [])


class GenerationRequest(PromptRequest):
    """``POST /v1/images/generations`` (JSON)."""

    moderation: Literal["low", "auto"] | None = Field(None, description="ignored")


class EditRequest(PromptRequest):
    """``POST /v1/images/edits`` (multipart; files ``image`` and optional ``mask``)."""

    files: ClassVar[dict[str, bool]] = {"image": True, "mask": False}

    repaint: bool = Field(False, description="RePaint with the plain decoder")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="ignored")


class VariationRequest(PriorOptions):
    """``POST /v1/images/variations`` (multipart; file ``image``): variations, or with a
    ``prompt`` or a ``strength`` image-to-image (the image noised to ``strength`` and
    denoised under the prompt's, or the image's, CLIP embedding)."""

    files: ClassVar[dict[str, bool]] = {"image": True}

    n: int = 1
    invert: bool = Field(False, description="start from the image's DDIM-inverted noise")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM η")
    prompt: str | None = Field(None, description="image-to-image: what to draw")
    strength: float | None = Field(
        None, ge=0.0, le=1.0, description="image-to-image: how far the image is noised (0-1)"
    )
    negative_prompt: str | None = None

    @property
    def image_to_image(self) -> bool:
        return self.prompt is not None or self.strength is not None

    def texts(self) -> list[str]:
        return [t for t in (self.prompt, self.negative_prompt) if t]

    def prior_used(self) -> bool:
        return self.prompt is not None


def _slot(k: int) -> Any:
    return Field(None, description=f"input {k}: a prompt, or an image file in this field")


def _weight(k: int) -> Any:
    return Field(None, ge=0.0, description=f"weight of input {k} (default: equal weights)")


class MixRequest(PriorOptions):
    """``POST /v1/images/mix`` (multipart): up to :data:`MIX_SLOTS` inputs, each a prompt
    (text) or an image (file), mixed by their weights (an extension)."""

    files: ClassVar[dict[str, bool]] = {f"input_{k}": False for k in range(1, MIX_SLOTS + 1)}
    text_or_file: ClassVar[tuple[str, ...]] = tuple(files)

    n: int = 1
    negative_prompt: str | None = None
    input_1: str | None = _slot(1)
    input_2: str | None = _slot(2)
    input_3: str | None = _slot(3)
    input_4: str | None = _slot(4)
    weight_1: float | None = _weight(1)
    weight_2: float | None = _weight(2)
    weight_3: float | None = _weight(3)
    weight_4: float | None = _weight(4)

    def prompts(self) -> dict[int, str]:
        """The text inputs by slot number."""
        out = {}
        for k in range(1, MIX_SLOTS + 1):
            value = getattr(self, f"input_{k}", None)
            if value is not None:
                out[k] = value
        return out

    def weight(self, k: int) -> float | None:
        return getattr(self, f"weight_{k}", None)

    def texts(self) -> list[str]:
        texts = list(self.prompts().values())
        return texts + ([self.negative_prompt] if self.negative_prompt else [])

    def prior_used(self) -> bool:
        return bool(self.prompts())


class InterpolationRequest(ImageRequest):
    """``POST /v1/images/interpolations`` (multipart; files ``image_a`` and ``image_b``)."""

    files: ClassVar[dict[str, bool]] = {"image_a": True, "image_b": True}

    frames: int = 5
    invert_noise: bool = False


def validate(model: type[BaseModel], data: dict[str, Any], *, strict: bool = False) -> Any:
    """``data`` as ``model``. JSON bodies are read strictly (``true`` is not a step count,
    ``"2"`` is not a number: the types the OpenAPI document gives); multipart fields are
    text, so they are converted (``"2"`` -> 2)."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise bad_request(
                f"Unrecognized request argument supplied: {param}", param=param
            ) from None
        if err["type"] == "missing":
            raise bad_request(f"Missing required parameter: '{param}'.", param=param) from None
        raise bad_request(f"Invalid value for '{param}': {err['msg']}.", param=param) from None
