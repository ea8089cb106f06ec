"""Parameter counts and forward FLOPs of unclip models, from their configs alone.

A model is built from its config with uninitialised weights (constructed on the ``meta``
device, then given empty CPU storage, so even a large config costs no random init), its
parameters are counted, and one forward pass on a batch of 1 with representative inputs is
run under :class:`torch.utils.flop_counter.FlopCounterMode`:

- CLIP: one image ``[1, 3, S, S]`` through the image encoder, and separately one caption of
  the full context length through the text encoder;
- diffusion prior: one noised embedding ``[1, D]`` with z_t ``[1, D]`` and, when the model
  reads caption tokens, ``text_len`` token features ``[1, text_len, text_dim]``;
- decoder UNet: one noised image ``[1, C, S, S]`` with z_i ``[1, clip_dim]`` and
  ``text_len`` caption token features when the model reads them (the CLIP context length);
- upsampler: one noised image ``[1, C, S, S]`` with its low-resolution input
  ``[1, C, s, s]``.

FLOPs are those the counter attributes to matrix products, convolutions and attention
(a multiply-add counts 2); element-wise ops, norms and softmax are not counted, as is usual.
For a diffusion model the count is per model call: a sampler makes ``steps`` calls (twice the
batch with classifier-free guidance).

Sources (:func:`load_models`): a model folder (``config.json``), a model ``config.json``
document itself, a training run config (``configs/*/...json``: ``model`` + ``train`` +
``data`` [+ ``diffusion``]) or a pipeline folder (``pipeline.json`` naming stage subfolders).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from unclip.clip.model import CLIP, CLIPConfig
from unclip.config import PIPELINE_FILE, Config, ConfigError
from unclip.decoder.unet import UNet, UNetConfig
from unclip.decoder.upsampler import Upsampler, UpsamplerConfig
from unclip.hub import CONFIG_NAME, meta_model
from unclip.prior.ar import ARPrior, ARPriorConfig
from unclip.prior.model import DiffusionPriorTransformer, PriorConfig

#: caption length assumed for a decoder's text tokens when no CLIP config says otherwise
DEFAULT_TEXT_LEN = 77

#: stage name -> model config class, in the order a run config's model section is tried
STAGE_CONFIGS: dict[str, type[Config]] = {
    "clip": CLIPConfig,
    "prior": PriorConfig,
    "upsampler": UpsamplerConfig,
    "decoder": UNetConfig,
}

#: keys only an upsampler's model config has (they tell it from a decoder's)
_UPSAMPLER_KEYS = {f.name for f in dataclasses.fields(UpsamplerConfig)} - {
    f.name for f in dataclasses.fields(UNetConfig)
}


@dataclasses.dataclass
class ModelStats:
    """What :func:`model_stats` measures for one model.

    ``flops``: forward FLOPs of one sample per input kind (``"image"``, ``"caption"`` or
    ``"embedding"``); ``parts``: for models with one encoder per input kind (CLIP), the
    parameters of the encoder each kind goes through; ``inputs``: the shapes the forward
    passes used.
    """

    name: str
    type: str
    params: int
    flops: dict[str, int]
    parts: dict[str, int] = dataclasses.field(default_factory=dict)
    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def gflops(self) -> float:
        """GFLOPs of the model's main forward pass for one sample (CLIP: the image encoder)."""
        return next(iter(self.flops.values())) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gflops": self.gflops}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def _sdpa_flops(
    query_shape: torch.Size,
    key_shape: torch.Size,
    value_shape: torch.Size,
    *args: Any,
    **kwargs: Any,
) -> int:
    """Attention FLOPs (Q·Kᵀ and weights·V; masks and causality not discounted)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: attention kernels torch's counter has no formula for (the CPU flash kernel of SDPA)
_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops


def forward_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs that :class:`FlopCounterMode` counts in ``fn(*args, **kwargs)`` (no grad),
    including SDPA on the CPU, which torch's own table leaves out."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def model_class_for(config: Config) -> type[nn.Module]:
    """The model class a config builds (upsampler before decoder: it is a subclass)."""
    for cfg_cls, model_cls in (
        (CLIPConfig, CLIP),
        (PriorConfig, DiffusionPriorTransformer),
        (ARPriorConfig, ARPrior),
        (UpsamplerConfig, Upsampler),
        (UNetConfig, UNet),
    ):
        if isinstance(config, cfg_cls):
            return model_cls
    raise ConfigError(f"no statistics for a {type(config).__name__}")


def build_model(config: Config) -> nn.Module:
    """The model of ``config`` in eval mode with uninitialised float32 CPU weights."""
    model = meta_model(model_class_for(config), config)
    return model.to_empty(device="cpu").eval()


def _representative_calls(
    model: nn.Module, config: Config, text_len: int
) -> dict[str, tuple[Callable[[], Any], dict[str, list[int]]]]:
    """Input kind -> (a call of one forward pass on a batch of 1, its input shapes)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([500])
    if isinstance(config, CLIPConfig):
        assert isinstance(model, CLIP)
        s, length = config.image_size, config.context_length
        pixels = torch.randn(1, 3, s, s, generator=g)
        tokens = torch.randint(1, config.vocab_size - 1, (1, length), generator=g)
        tokens[0, -1] = config.vocab_size - 1  # the end token (largest id) ends a full caption
        calls = {
            "image": (lambda: model.encode_image(pixels), {"pixels": list(pixels.shape)}),
            "caption": (lambda: model.encode_text(tokens), {"tokens": list(tokens.shape)}),
        }
        if model.visual is None:  # a text encoder alone (vision_type "none")
            del calls["image"]
        return calls
    if isinstance(config, PriorConfig):
        d = config.clip_dim
        kwargs: dict[str, torch.Tensor] = {
            "x": torch.randn(1, d, generator=g),
            "t": t,
            "text_emb": torch.randn(1, d, generator=g),
        }
        if config.text_dim:
            kwargs["text_tokens"] = torch.randn(1, config.text_len, config.text_dim, generator=g)
        shapes = {k: list(v.shape) for k, v in kwargs.items() if k != "t"}
        return {"embedding": (lambda: model(**kwargs), shapes)}
    if isinstance(config, ARPriorConfig):
        d, k = config.clip_dim, config.components
        ar: dict[str, torch.Tensor] = {
            "codes": torch.randint(0, config.buckets, (1, k), generator=g),
            "text_emb": torch.randn(1, d, generator=g),
            "dot_code": torch.zeros(1, dtype=torch.long),
        }
        if config.text_dim:
            ar["text_tokens"] = torch.randn(1, config.text_len, config.text_dim, generator=g)
        shapes = {k: list(v.shape) for k, v in ar.items()}
        # one teacher-forced pass = the work of sampling all K codes with the KV cache
        return {"embedding": (lambda: model(**ar), shapes)}
    if isinstance(config, UNetConfig):
        s, c = config.image_size, config.in_channels
        x = torch.randn(1, c, s, s, generator=g)
        cond: dict[str, torch.Tensor] = {}
        if config.low_res_cond:
            low = config.low_res_size if isinstance(config, UpsamplerConfig) else s // 2
            cond["low_res"] = torch.randn(1, c, low, low, generator=g)
        if config.clip_dim:
            cond["image_emb"] = torch.randn(1, config.clip_dim, generator=g)
        if config.text_dim:
            cond["text_tokens"] = torch.randn(1, text_len, config.text_dim, generator=g)
        if config.inpaint:
            cond["inpaint_image"] = torch.randn(1, c, s, s, generator=g)
            cond["inpaint_mask"] = torch.ones(1, 1, s, s)
        shapes = {"x": list(x.shape), **{k: list(v.shape) for k, v in cond.items()}}
        return {"image": (lambda: model(x, t, **cond), shapes)}
    raise ConfigError(f"no statistics for a {type(config).__name__}")


def model_stats(config: Config, name: str = "", text_len: int = DEFAULT_TEXT_LEN) -> ModelStats:
    """Parameters and forward FLOPs per sample of the model ``config`` describes.

    ``text_len``: caption tokens fed to a decoder that reads them (CLIP and the prior use
    their own context lengths).
    """
    if isinstance(config, ARPriorConfig) and config.components < 1:
        raise ConfigError(
            f"{name or 'AR prior'}: components 0 means the count is taken from the training "
            "embeddings (the PCA keeps `variance` of their variance); give the trained model "
            "folder, or set model.components"
        )
    model = build_model(config)
    params = count_parameters(model)
    parts: dict[str, int] = {}
    if isinstance(model, CLIP):
        parts["image"] = count_parameters(model.visual) if model.visual is not None else 0
        parts["caption"] = params - parts["image"] - model.logit_scale.numel()
    flops: dict[str, int] = {}
    inputs: dict[str, list[int]] = {}
    for kind, (call, shapes) in _representative_calls(model, config, text_len).items():
        flops[kind] = forward_flops(call)
        inputs.update(shapes)
    return ModelStats(name, config.type_name, params, flops, parts, inputs)


# ---------------------------------------------------------------------------------------------
# Finding the configs


@dataclasses.dataclass
class ModelSource:
    """A model config found by :func:`load_models` and the caption length a decoder sees."""

    name: str
    config: Config
    text_len: int = DEFAULT_TEXT_LEN


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _model_folder_config(path: Path) -> Config:
    from unclip.hub import load_config

    return load_config(path)


def _clip_context(folder: Path) -> int | None:
    """The context length of the CLIP model folder ``folder``, if it is one."""
    if not (folder / CONFIG_NAME).is_file():
        return None
    config = _model_folder_config(folder)
    return config.context_length if isinstance(config, CLIPConfig) else None


def run_config_stage(doc: dict[str, Any], path: Path, stage: str | None = None) -> str:
    """Which stage a training run config (``{"model": ..., "train": ...}``) is for.

    ``stage`` forces one. Otherwise the stages whose model config parses the ``model`` section
    strictly are candidates; a tie is broken by the file name (``clip``/``prior``/
    ``upsampler``/``decoder`` in it), then by upsampler-only keys.
    """
    model = doc.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: a run config needs a 'model' object")
    if stage == "ar_prior" or (doc.get("type") == "ar" and stage in (None, "prior")):
        return "ar_prior"  # `unclip train prior --type ar` run configs say so
    if stage is not None:
        if stage not in STAGE_CONFIGS:
            raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGE_CONFIGS)})")
        return stage
    fits = []
    errors = []
    for name, cls in STAGE_CONFIGS.items():
        try:
            cls.from_dict(model)
        except ConfigError as e:
            errors.append(f"{name}: {e}")
        else:
            fits.append(name)
    if not fits:
        raise ConfigError(f"{path}: 'model' matches no stage's config ({'; '.join(errors)})")
    if len(fits) == 1:
        return fits[0]
    stem = path.stem.lower()
    named = [s for s in fits if s in stem]
    if len(named) == 1:
        return named[0]
    if set(fits) >= {"upsampler", "decoder"}:
        if _UPSAMPLER_KEYS & set(model) or model.get("low_res_cond"):
            return "upsampler"
        if "clip" not in fits and "prior" not in fits:
            return "decoder"
    raise ConfigError(
        f"{path}: cannot tell which stage 'model' is for (it fits {', '.join(fits)}); "
        "pass the stage explicitly (unclip info --stage ...)"
    )


def _run_config_source(path: Path, doc: dict[str, Any], stage: str | None) -> ModelSource:
    from unclip.run_configs import (
        ARPriorRunConfig,
        ClipRunConfig,
        DecoderRunConfig,
        PriorRunConfig,
        UpsamplerRunConfig,
    )

    name = run_config_stage(doc, path, stage)
    run_cls: type[Config] = {
        "clip": ClipRunConfig,
        "prior": PriorRunConfig,
        "ar_prior": ARPriorRunConfig,
        "decoder": DecoderRunConfig,
        "upsampler": UpsamplerRunConfig,
    }[name]
    run = run_cls.from_dict(doc, where=str(path))
    text_len = DEFAULT_TEXT_LEN
    if getattr(run, "clip", ""):
        text_len = _run_clip_context(path, run.clip) or text_len  # type: ignore[attr-defined]
    return ModelSource(str(path), run.model, text_len)  # type: ignore[attr-defined]


def _run_clip_context(path: Path, clip_dir: str) -> int | None:
    """The caption length of a run config's CLIP: its ``clip`` model folder where it exists
    yet, else the ``clip.json`` run config beside ``path`` (``configs/<name>/clip.json``)."""
    found = _clip_context(Path(clip_dir))
    if found is None and path.name != "clip.json" and (path.parent / "clip.json").is_file():
        sibling = _read_json(path.parent / "clip.json")
        model = sibling.get("model") if isinstance(sibling, dict) else None
        if isinstance(model, dict):
            try:
                found = CLIPConfig.from_dict(model).context_length
            except ConfigError:
                found = None
    return found


def _pipeline_sources(folder: Path) -> list[ModelSource]:
    from unclip.pipeline.config import PIPELINE_FILE, PipelineConfig

    pipe = PipelineConfig.load(folder / PIPELINE_FILE)
    stages = pipe.stages
    text_len = _clip_context(folder / stages.clip) or DEFAULT_TEXT_LEN
    named = [("clip", stages.clip), ("prior", stages.prior), ("decoder", stages.decoder)]
    named.append(("inpaint_decoder", stages.inpaint_decoder))
    named += [(f"upsampler {i + 1}", sub) for i, sub in enumerate(stages.upsamplers)]
    return [
        ModelSource(f"{folder}/{sub}", _model_folder_config(folder / sub), text_len)
        for _, sub in named
        if sub is not None
    ]


def load_models(
    path: str | Path, stage: str | None = None, text_len: int | None = None
) -> list[ModelSource]:
    """The model configs at ``path``: a pipeline folder (all its stages), a model folder or
    its ``config.json``, or a training run config. ``stage`` forces the stage of a run
    config; ``text_len`` overrides the caption length assumed for decoders."""
    path = Path(path)
    if path.is_dir():
        if (path / PIPELINE_FILE).is_file():
            sources = _pipeline_sources(path)
        elif (path / CONFIG_NAME).is_file():
            sources = [ModelSource(str(path), _model_folder_config(path))]
        else:
            raise FileNotFoundError(
                f"{path}: neither a pipeline folder (pipeline.json) nor a model folder "
                "(config.json)"
            )
    elif path.is_file():
        if path.name == PIPELINE_FILE:
            sources = _pipeline_sources(path.parent)
        else:
            doc = _read_json(path)
            if not isinstance(doc, dict):
                raise ConfigError(f"{path}: expected a JSON object")
            if "type" in doc and "config" in doc:
                sources = [ModelSource(str(path), _model_folder_config(path))]
            elif "model" in doc:
                sources = [_run_config_source(path, doc, stage)]
            else:
                raise ConfigError(
                    f"{path}: not a model config (type + config) nor a run config (model + ...)"
                )
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if text_len is not None:
        sources = [dataclasses.replace(s, text_len=text_len) for s in sources]
    return sources


def stats_for_path(
    path: str | Path, stage: str | None = None, text_len: int | None = None
) -> list[ModelStats]:
    """:func:`model_stats` of every model :func:`load_models` finds at ``path``."""
    return [model_stats(s.config, s.name, s.text_len) for s in load_models(path, stage, text_len)]


def format_count(n: float) -> str:
    """1234567 -> ``"1.23M"``; small numbers stay plain."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}" if n / size < 1000 else f"{n / size:.0f}{unit}"
    return str(int(n))


def format_table(stats: list[ModelStats]) -> str:
    """A plain-text table: name, type, parameters, GFLOPs per sample and what a sample is."""
    rows = [("name", "type", "params", "GFLOPs", "per")]
    for s in stats:
        for i, (kind, flops) in enumerate(s.flops.items()):
            first = i == 0
            per = kind
            if kind in s.parts:
                per += f" (encoder: {format_count(s.parts[kind])} params)"
            rows.append(
                (
                    s.name if first else "",
                    s.type if first else "",
                    format_count(s.params) if first else "",
                    f"{flops / 1e9:.4g}",
                    per,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3}
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
