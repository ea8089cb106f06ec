"""The run configs of the training stages: a model config with its training and data configs.

Each is a :class:`StageRunConfig` (the ``train`` and ``data`` sections) with the stage's
model config and settings. A run folder keeps its own copy (``run_config.json``), so
``--resume`` needs no ``--config``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from unclip.clip.model import CLIPConfig
from unclip.config import Config, ConfigError, DataConfig, DiffusionConfig, TrainConfig
from unclip.decoder.unet import UNetConfig
from unclip.decoder.upsampler import UpsamplerConfig
from unclip.prior.ar import ARPriorConfig
from unclip.prior.model import PriorConfig


@dataclasses.dataclass
class StageRunConfig(Config):
    """What every stage's run config holds besides its model: ``train``, the optimisation
    (steps, batch, learning rate, EMA, checkpoints), and ``data``, where the samples come from.
    """

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


@dataclasses.dataclass
class ClipRunConfig(StageRunConfig):
    """``caption_variants``: probability of training a sample on a variant of its caption built
    from the manifest (tags, group: "cherry blossom, noto style, animals & nature", "flower,
    plant, noto style", "animals & nature, noto style") instead of the caption itself.

    ``concept_run``: k > 1 fills each batch with runs of k images of one concept (the
    manifest's ``concept``: the same emoji in different art styles), hard negatives that only
    the style tells apart, which teaches style far better than random batches."""

    model: CLIPConfig = dataclasses.field(default_factory=CLIPConfig)
    caption_variants: float = 0.0
    concept_run: int = 1


@dataclasses.dataclass
class PriorRunConfig(StageRunConfig):
    """``clip``: the CLIP model whose text encoder gives the caption's per-token features: a
    CLIP run's ``final/`` (tokenizer inside), a pipeline folder or a pipeline's ``clip/``
    (tokenizer beside it; see :func:`~unclip.train.stages.common.clip_tokenizer_dir`);
    ``data.embeddings``: the ``unclip embed`` output to train on."""

    model: PriorConfig = dataclasses.field(default_factory=PriorConfig)
    diffusion: DiffusionConfig = dataclasses.field(
        default_factory=lambda: DiffusionConfig(prediction="x0")
    )
    clip: str = ""
    type: Literal["diffusion"] = "diffusion"

    def __post_init__(self) -> None:
        if self.model.embeddings != "unit":
            raise ConfigError(
                f"model.embeddings: a prior run trains on unit CLIP embeddings ('unit'), got "
                f"{self.model.embeddings!r} (the space of converted Karlo priors, standardised "
                "by their clip_mean and clip_std)"
            )


@dataclasses.dataclass
class ARPriorRunConfig(StageRunConfig):
    """The autoregressive prior (``unclip train prior --type ar``): ``model.components`` 0
    keeps the principal components reaching ``model.variance`` of the training embeddings'
    variance; the PCA and quantiser are fitted on every row of ``data.embeddings`` before
    training (deterministically) and saved in the model's weights."""

    model: ARPriorConfig = dataclasses.field(default_factory=ARPriorConfig)
    clip: str = ""
    type: Literal["ar"] = "ar"


@dataclasses.dataclass
class DecoderRunConfig(StageRunConfig):
    """``clip``: as in :class:`PriorRunConfig` (needed when ``model.text_dim`` > 0).
    ``inpaint_prob``: for an ``inpaint`` model, the fraction of samples trained with a
    random mask (the rest see no known pixels and learn plain generation). ``init``: a decoder
    model folder (a run's ``final/``, a pipeline's ``decoder/``) whose weights start a new run;
    ``model`` may be grown from it (a larger ``mid_depth``): every weight of the folder must fit
    the new model, and the added layers start as the identity."""

    model: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = dataclasses.field(
        default_factory=lambda: DiffusionConfig(learn_sigma=True, loss="hybrid")
    )
    clip: str = ""
    inpaint_prob: float = 0.5
    init: str = ""


@dataclasses.dataclass
class UpsamplerRunConfig(StageRunConfig):
    """``crop_size`` > 0 trains on random square crops of that side (the paper trains its
    upsamplers on quarter-size crops; a convolutional network samples at full size later).
    ``init``: an upsampler model folder whose weights start a new run (as the decoder's)."""

    model: UpsamplerConfig = dataclasses.field(default_factory=UpsamplerConfig)
    diffusion: DiffusionConfig = dataclasses.field(
        default_factory=lambda: DiffusionConfig(learn_sigma=True, loss="hybrid")
    )
    crop_size: int = 0
    init: str = ""
