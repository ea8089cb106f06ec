"""A diffusers unCLIP folder (Karlo's layout) -> an unclip pipeline, and back.

A folder with ``model_index.json`` naming ``UnCLIPPipeline`` (text to image: ``prior/``,
``decoder/``, ``text_proj/``, ``super_res_first/``, ``super_res_last/``, ``text_encoder/``,
``tokenizer/``, ``prior_scheduler/``, ``decoder_scheduler/``, ``super_res_scheduler/``) or
``UnCLIPImageVariationPipeline`` (the same without the prior, with ``image_encoder/`` and
``feature_extractor/``) is read as JSON and safetensors (diffusers and transformers are not
imported) and converted exactly:

- ``text_encoder`` (+ ``image_encoder``) -> unclip's CLIP, ``tokenizer`` -> its tokenizer
  (:mod:`unclip.interop.diffusers_clip`);
- ``prior`` -> :class:`~unclip.prior.model.DiffusionPriorTransformer` (:mod:`unclip.interop.diffusers_prior`);
- ``decoder`` + ``text_proj`` -> the decoder UNet, ``super_res_first``/``super_res_last`` ->
  an upsampler stage whose ``last_step`` network is ``super_res_last`` (:mod:`unclip.interop.diffusers_unets`);
- each ``UnCLIPScheduler`` -> the stage's ``diffusion.json`` (:mod:`unclip.interop.diffusers_schedulers`),
  sampled with the ``karlo`` sampler, with Karlo's defaults: prior 25 steps at guidance 4 and
  one candidate, decoder 25 steps at guidance 8, super-resolution 7 steps;
- the pipeline takes CLIP's embeddings unnormalised (``embeddings: "raw"``), as Karlo's stages
  were trained, and the null conditions of guidance are the empty caption's encoding.

:func:`load_diffusers_pipeline` builds an :class:`~unclip.pipeline.core.UnclipPipeline` from
such a folder (what ``unclip.load_pipeline`` does when it sees ``model_index.json``);
:func:`write_unclip_folder` writes the conversion as a plain unclip pipeline folder and
:func:`write_diffusers_folder` writes an unclip pipeline back in diffusers' layout (``unclip
convert``). Anything the converters cannot express is a one-line
:class:`~unclip.config.ConfigError` naming the folder, file and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from unclip.config import (
    DIFFUSION_FILE,
    PIPELINE_FILE,
    ConfigError,
    DiffusionConfig,
)
from unclip.interop import karlo_configs as karlo
from unclip.interop.diffusers_clip import (
    HF_WEIGHTS,
    clip_config_from_diffusers,
    clip_from_diffusers,
    clip_to_diffusers,
    empty_caption,
    read_json,
    read_weights,
    tokenizer_from_diffusers,
    tokenizer_to_diffusers,
)
from unclip.interop.diffusers_prior import (
    prior_config_from_diffusers,
    prior_from_diffusers,
    prior_to_diffusers,
)
from unclip.interop.diffusers_schedulers import diffusion_from_scheduler, scheduler_from_diffusion

if TYPE_CHECKING:
    from unclip.clip.model import CLIP, CLIPConfig
    from unclip.decoder import UNetConfig, UpsamplerConfig
    from unclip.pipeline.core import UnclipPipeline
    from unclip.pipeline.stages import Stage
    from unclip.prior.model import PriorConfig
    from unclip.tokenizer import Tokenizer

MODEL_INDEX = "model_index.json"
TEXT_TO_IMAGE = "UnCLIPPipeline"
VARIATION = "UnCLIPImageVariationPipeline"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"
#: the empty caption's tokens (start and end with CLIP's tokenizer): the null caption's length
EMPTY_CAPTION_TOKENS = 2

#: model_index.json as diffusers writes it (and unclip writes back), per pipeline class
MODEL_INDEXES: dict[str, dict[str, Any]] = {
    TEXT_TO_IMAGE: karlo.MODEL_INDEX,
    VARIATION: karlo.VARIATION_MODEL_INDEX,
}
#: the classes unclip also reads for a component, besides the one diffusers writes
_ALSO_READ = {
    "tokenizer": ("CLIPTokenizerFast",),
    "feature_extractor": ("CLIPImageProcessorPil", "CLIPFeatureExtractor"),
}
#: the components of each pipeline class, and the classes unclip converts for each
COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    cls: {
        name: (entry[1], *_ALSO_READ.get(name, ()))
        for name, entry in index.items()
        if not name.startswith("_")
    }
    for cls, index in MODEL_INDEXES.items()
}


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``model_index.json`` and no ``pipeline.json``."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_INDEX).is_file() and not (p / PIPELINE_FILE).is_file()


def karlo_sampling() -> Any:
    """The sampling settings of diffusers' ``UnCLIPPipeline`` (Karlo's defaults)."""
    from unclip.pipeline.config import (
        DecoderSampling,
        PriorSampling,
        SamplingConfig,
        UpsamplerSampling,
    )

    return SamplingConfig(
        prior=PriorSampling(sampler="karlo", steps=25, guidance=4.0, candidates=1),
        decoder=DecoderSampling(sampler="karlo", steps=25, guidance=8.0),
        upsampler=UpsamplerSampling(sampler="karlo", steps=7),
    )


@dataclass
class Converted:
    """A diffusers folder converted: unclip modules (float32, eval mode, CPU) and each
    diffusion stage's :class:`DiffusionConfig`."""

    name: str
    tokenizer: Tokenizer
    clip: CLIP
    decoder: tuple[nn.Module, DiffusionConfig]
    upsampler: tuple[nn.Module, nn.Module, DiffusionConfig]
    prior: tuple[nn.Module, DiffusionConfig] | None = None


def _index(folder: Path) -> str:
    """The pipeline class, with every component it expects checked."""
    doc = read_json(folder / MODEL_INDEX)
    cls = doc.get("_class_name")
    if cls not in COMPONENTS:
        raise ConfigError(
            f"{folder / MODEL_INDEX}: pipeline {cls!r} is not supported "
            f"(unclip converts {TEXT_TO_IMAGE} and {VARIATION})"
        )
    expected = COMPONENTS[cls]
    for name in doc:
        if not name.startswith("_") and name not in expected:
            raise ConfigError(f"{folder / MODEL_INDEX}: unknown component {name!r} for {cls}")
    for name, classes in expected.items():
        entry = doc.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ConfigError(f"{folder / MODEL_INDEX}: component {name!r} is missing")
        if entry[1] not in classes:
            raise ConfigError(
                f"{folder / MODEL_INDEX}: {name} is a {entry[1]!r}; unclip converts "
                + " or ".join(repr(c) for c in classes)
            )
        if not (folder / name).is_dir():
            raise ConfigError(f"{folder / name}: the {name} folder is missing")
    return cls


def _component(
    folder: Path, name: str, configs: FolderConfigs
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as :func:`read_configs` read it, weights) of a diffusers model component."""
    return configs.documents[name], read_weights(folder / name, DIFFUSERS_WEIGHTS)


def _diffusion(folder: Path, name: str) -> DiffusionConfig:
    where = folder / name / SCHEDULER_FILE
    return diffusion_from_scheduler(read_json(where), str(where))


def _located(e: ConfigError, folder: Path) -> ConfigError:
    """An error from a converter that names a file relative to the folder, made absolute."""
    msg = str(e)
    return ConfigError(msg if msg.startswith(str(folder)) else f"{folder}/{msg}")


@dataclass
class FolderConfigs:
    """The unclip configs of a diffusers unCLIP folder, read from its JSON files alone.

    ``super_res``: (``super_res_first``, ``super_res_last``); ``diffusion``: each diffusion
    stage's :class:`DiffusionConfig` by unclip stage name (``"prior"`` where the folder has
    one, ``"decoder"``, ``"upsampler"``); ``documents``: each component's ``config.json`` as
    read, by component name (the converters take them with the weights)."""

    clip: CLIPConfig
    decoder: UNetConfig
    super_res: tuple[UpsamplerConfig, UpsamplerConfig]
    diffusion: dict[str, DiffusionConfig]
    prior: PriorConfig | None = None
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_configs(path: str | os.PathLike, null_tokens: int = EMPTY_CAPTION_TOKENS) -> FolderConfigs:
    """Every stage's unclip config of the diffusers unCLIP folder ``path``, from its
    ``model_index.json`` and config files; no weights or tokenizer files are read, so a
    folder of configs alone is enough (:func:`~unclip.interop.karlo_configs.write_config_folder`).
    ``null_tokens``: the empty caption's token count (the null caption of the prior and the
    decoder; :func:`convert_diffusers_folder` takes it from the tokenizer). Anything unclip
    cannot express is a one-line :class:`ConfigError` naming the file and field."""
    from unclip.interop.diffusers_unet_configs import (
        decoder_config_from_diffusers,
        upsampler_configs_from_diffusers,
    )

    folder = Path(path)
    if not (folder / MODEL_INDEX).is_file():
        raise ConfigError(f"{folder}: not a diffusers pipeline folder (no {MODEL_INDEX})")
    cls = _index(folder)
    variation = cls == VARIATION

    documents: dict[str, dict[str, Any]] = {}

    def doc(name: str) -> dict[str, Any]:
        if name not in documents:
            documents[name] = read_json(folder / name / "config.json")
        return documents[name]

    clip = clip_config_from_diffusers(
        doc("text_encoder"),
        doc("image_encoder") if variation else None,
        folder / "text_encoder",
        folder / "image_encoder",
        folder / "feature_extractor" if variation else None,
    )
    diffusion = {}
    prior = None
    try:
        if not variation:
            where = str(folder / "prior" / "config.json")
            prior = prior_config_from_diffusers(doc("prior"), where)
            prior = prior.replace(null_text_tokens=null_tokens)
            diffusion["prior"] = _diffusion(folder, "prior_scheduler")
        decoder = decoder_config_from_diffusers(doc("decoder"), doc("text_proj"), null_tokens)
        super_res = upsampler_configs_from_diffusers(
            doc("super_res_first"), doc("super_res_last"), decoder.image_size
        )
    except ConfigError as e:
        raise _located(e, folder) from None
    diffusion["decoder"] = _diffusion(folder, "decoder_scheduler")
    if diffusion["decoder"].learn_sigma != decoder.learn_sigma:
        raise ConfigError(
            f"{folder / 'decoder_scheduler' / SCHEDULER_FILE}: variance_type does not fit the "
            f"decoder's out_channels ({decoder.output_channels})"
        )
    diffusion["upsampler"] = _diffusion(folder, "super_res_scheduler")
    if diffusion["upsampler"].learn_sigma:
        raise ConfigError(
            f"{folder / 'super_res_scheduler' / SCHEDULER_FILE}: variance_type learned_range "
            "does not fit the super-resolution UNets (3 output channels)"
        )
    return FolderConfigs(clip, decoder, super_res, diffusion, prior, documents)


def convert_diffusers_folder(path: str | os.PathLike) -> Converted:
    """Read and convert a diffusers unCLIP folder (see the module docstring); every config
    is checked (:func:`read_configs`) before any weights are read."""
    from unclip.interop.diffusers_unets import decoder_from_diffusers, upsampler_from_diffusers

    folder = Path(path)
    configs = read_configs(folder)
    variation = configs.prior is None
    tokenizer = tokenizer_from_diffusers(folder / "tokenizer")
    clip = clip_from_diffusers(
        configs.clip, folder / "text_encoder", folder / "image_encoder" if variation else None
    )
    if tokenizer.vocab_size > clip.config.vocab_size:
        raise ConfigError(f"{folder / 'tokenizer'}: more tokens than the text encoder's vocabulary")
    empty = empty_caption(clip, tokenizer)  # the unconditional condition of Karlo's guidance
    z_t, states, mask = empty
    k = int(mask.sum())
    null_caption = (states[0, :k], z_t[0])
    try:
        prior = None
        if not variation:
            doc, state = _component(folder, "prior", configs)
            model = prior_from_diffusers(doc, state, empty, str(folder / "prior" / "config.json"))
            prior = (model, configs.diffusion["prior"])
        unet_doc, unet_state = _component(folder, "decoder", configs)
        tp_doc, tp_state = _component(folder, "text_proj", configs)
        decoder = decoder_from_diffusers(
            unet_state, unet_doc, tp_state, tp_doc, null_caption=null_caption
        )
        first_doc, first_state = _component(folder, "super_res_first", configs)
        last_doc, last_state = _component(folder, "super_res_last", configs)
        first, last = upsampler_from_diffusers(
            first_state, first_doc, last_state, last_doc,
            low_res_size=decoder.config.image_size,
        )  # fmt: skip
    except ConfigError as e:
        raise _located(e, folder) from None
    return Converted(
        name=folder.name,
        tokenizer=tokenizer,
        clip=clip,
        prior=prior,
        decoder=(decoder, configs.diffusion["decoder"]),
        upsampler=(first, last, configs.diffusion["upsampler"]),
    )


def _pipeline_config(converted: Converted) -> Any:
    from unclip.pipeline.config import PipelineConfig, StagesConfig

    return PipelineConfig(
        name=converted.name,
        stages=StagesConfig(prior="prior" if converted.prior else None, upsamplers=["upsampler"]),
        sampling=karlo_sampling(),
        embeddings="raw",
    )


def own_storage(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Give every tensor of ``model`` its own freshly allocated storage on ``device`` (one
    copy), as ``from_pretrained`` does (converters may keep views into the loaded weights
    file, whose alignment can change which CPU kernel runs, and so the last bits of
    results)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.to(device, memory_format=torch.contiguous_format, copy=True)
    return model


def load_diffusers_pipeline(
    path: str | os.PathLike, dev: torch.device, dtype: torch.dtype, offload: bool = False
) -> UnclipPipeline:
    """An :class:`~unclip.pipeline.core.UnclipPipeline` from a diffusers unCLIP folder,
    converted in memory, on ``dev`` sampling in ``dtype`` (``unclip.load_pipeline`` resolves
    both and calls this for such a folder)."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.pipeline.core import UnclipPipeline
    from unclip.pipeline.stages import Stage

    c = convert_diffusers_folder(path)

    at = torch.device("cpu") if offload else dev  # where the stages wait (``offload``)

    def stage(model: nn.Module, cfg: DiffusionConfig, last: nn.Module | None = None) -> Stage:
        own_storage(model, at)
        if last is not None:
            own_storage(last, at)
        return Stage(model, GaussianDiffusion.from_config(cfg), last)

    first, last, up_cfg = c.upsampler
    return UnclipPipeline(
        tokenizer=c.tokenizer,
        clip=own_storage(c.clip, dev),
        prior=stage(*c.prior) if c.prior else None,
        decoder=stage(*c.decoder),
        upsamplers=[stage(first, up_cfg, last)],
        config=_pipeline_config(c),
        path=Path(path),
        device=dev,
        dtype=dtype,
        offload=offload,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def write_unclip_folder(converted: Converted, folder: Path, dtype: torch.dtype) -> None:
    """Write a converted folder into the empty ``folder`` as a plain unclip pipeline
    folder (``pipeline.json`` + stage folders; the upsampler's ``last_step/`` holds
    ``super_res_last``), weights in ``dtype`` (float16 halves the size; loading casts back
    to float32). ``folder``: typically from :func:`unclip.config.building_folder`."""
    from unclip.hub import save_pretrained

    converted.tokenizer.save(folder / "tokenizer")
    save_pretrained(converted.clip, folder / "clip", dtype=dtype)
    stages: list[tuple[str, nn.Module, DiffusionConfig, nn.Module | None]] = []
    if converted.prior is not None:
        stages.append(("prior", *converted.prior, None))
    stages.append(("decoder", *converted.decoder, None))
    first, last, up_cfg = converted.upsampler
    stages.append(("upsampler", first, up_cfg, last))
    for name, model, cfg, last_model in stages:
        save_pretrained(model, folder / name, dtype=dtype)
        cfg.save(folder / name / DIFFUSION_FILE)
        if last_model is not None:
            from unclip.pipeline.stages import LAST_STEP_FOLDER

            save_pretrained(last_model, folder / name / LAST_STEP_FOLDER, dtype=dtype)
    _pipeline_config(converted).save(folder / PIPELINE_FILE)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_component(
    folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], weights: str, cls: str
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in config.items() if k != "_class_name"}
    if cls:  # a diffusers model (transformers configs name their class in "architectures")
        doc = {"_class_name": cls, **doc}
    _write_json(folder / "config.json", doc)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))


def write_diffusers_folder(pipe: UnclipPipeline, folder: Path, dtype: torch.dtype) -> None:
    """Write ``pipe`` into the empty ``folder`` (as :func:`write_unclip_folder`) in
    diffusers' unCLIP layout: ``UnCLIPPipeline`` when it has a prior,
    else ``UnCLIPImageVariationPipeline`` (needs CLIP's image encoder). Only pipelines that
    diffusers runs the same way convert: raw embeddings, Karlo's stage architectures and
    null conditions, one upsampler sampled with the karlo sampler's scheduler; otherwise a
    ConfigError says what does not fit."""
    from unclip.interop.diffusers_unets import decoder_to_diffusers, upsampler_to_diffusers
    from unclip.pipeline.stages import is_ar_prior

    where = str(pipe.path or pipe.name)
    if not pipe.raw_embeddings:
        raise ConfigError(
            f"{where}: its stages take unit CLIP embeddings; diffusers' unCLIP pipelines feed "
            "raw ones (pipeline.json embeddings 'raw': pipelines converted from diffusers)"
        )
    if len(pipe.upsamplers) != 1:
        raise ConfigError(f"{where}: diffusers' unCLIP has exactly one super-resolution stage")
    if pipe.prior is not None and is_ar_prior(pipe.prior.model):
        raise ConfigError(f"{where}: an autoregressive prior has no diffusers equivalent")
    variation = pipe.prior is None
    if variation and pipe.clip.visual is None:
        raise ConfigError(f"{where}: no prior and no image encoder: nothing diffusers can run")
    empty = empty_caption(pipe.clip, pipe.tokenizer)
    cast = {"dtype": dtype}
    text_cfg, text_state, vis_cfg, vis_state = clip_to_diffusers(pipe.clip, **cast)
    _write_component(folder / "text_encoder", text_cfg, text_state, HF_WEIGHTS[0], "")
    tokenizer_to_diffusers(pipe.tokenizer, folder / "tokenizer")
    if variation:
        assert vis_cfg is not None and vis_state is not None
        _write_component(folder / "image_encoder", vis_cfg, vis_state, HF_WEIGHTS[0], "")
        c = pipe.clip.config
        _write_json(folder / "feature_extractor" / "preprocessor_config.json", {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": c.image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": c.image_size, "width": c.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(c.image_mean), "image_std": list(c.image_std),
            "do_convert_rgb": True,
        })  # fmt: skip
    else:
        assert pipe.prior is not None and pipe.prior.diffusion is not None
        doc, state = prior_to_diffusers(pipe.prior.model, empty, dtype)
        _write_component(folder / "prior", doc, state, DIFFUSERS_WEIGHTS[0], "PriorTransformer")
        _write_scheduler(folder / "prior_scheduler", _stage_diffusion(pipe, "prior"), where)
    for name, (cfg, state) in decoder_to_diffusers(pipe.decoder.model).items():
        state = {k: v.to(dtype) for k, v in state.items()}
        cls = cfg.get("_class_name", "")
        _write_component(folder / name, cfg, state, DIFFUSERS_WEIGHTS[0], cls)
    up = pipe.upsamplers[0]
    for name, (cfg, state) in upsampler_to_diffusers(up.model, up.last_step).items():
        state = {k: v.to(dtype) for k, v in state.items()}
        _write_component(folder / name, cfg, state, DIFFUSERS_WEIGHTS[0], "UNet2DModel")
    _write_scheduler(folder / "decoder_scheduler", _stage_diffusion(pipe, "decoder"), where)
    _write_scheduler(folder / "super_res_scheduler", _stage_diffusion(pipe, "upsampler"), where)
    _write_json(folder / MODEL_INDEX, MODEL_INDEXES[VARIATION if variation else TEXT_TO_IMAGE])


def _stage_diffusion(pipe: UnclipPipeline, what: str) -> DiffusionConfig:
    """The :class:`DiffusionConfig` of a stage of ``pipe`` (read back from its folder, or
    rebuilt from the in-memory diffusion for a pipeline converted on load)."""
    stage = {"prior": pipe.prior, "decoder": pipe.decoder}.get(what) or pipe.upsamplers[0]
    d = stage.diffusion
    assert d is not None
    from unclip.diffusion.schedules import cosine_betas

    if d.is_respaced or not torch.allclose(
        d.schedule.betas.double(), cosine_betas(d.num_timesteps).double()
    ):
        raise ConfigError(f"{pipe.path or pipe.name}: the {what} stage's schedule is not cosine")
    sampler = getattr(pipe.config.sampling, what).sampler
    if sampler != "karlo":
        raise ConfigError(
            f"{pipe.path or pipe.name}: the {what} stage samples with {sampler!r}; diffusers' "
            "UnCLIPScheduler is unclip's 'karlo' sampler"
        )
    return DiffusionConfig(
        schedule="cosine",
        timesteps=d.num_timesteps,
        prediction=d.prediction,
        learn_sigma=d.learn_sigma,
        clip_denoised=d.clip_denoised,
        dynamic_threshold=d.dynamic_threshold,
        clip_range=d.clip_range,
    )


def _write_scheduler(folder: Path, cfg: DiffusionConfig, where: str) -> None:
    doc = scheduler_from_diffusion(cfg, where)
    _write_json(folder / SCHEDULER_FILE, {**doc, "_diffusers_version": karlo.DIFFUSERS_VERSION})
