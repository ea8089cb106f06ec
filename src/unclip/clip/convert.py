"""Load CLIP weights from elsewhere: :func:`load_clip` takes

- an unclip model folder (``config.json`` with ``"type": "clip"`` + ``model.safetensors``),
  or a pipeline folder with such a folder in ``clip/``;
- a transformers ``CLIPModel`` folder (``config.json`` with ``"model_type": "clip"`` and
  ``model.safetensors``, as its ``save_pretrained`` writes it; ViT only);
- an original OpenAI CLIP state dict (ViT or ResNet; also open_clip checkpoints of those
  architectures) as ``.safetensors``, or as ``.pt``/``.pth``/``.bin`` read with
  ``torch.load(weights_only=True)``. OpenAI's released ``.pt`` files are TorchScript
  archives, which are refused; save their ``state_dict()`` first (see the error message).

Foreign checkpoints carry no config, so this converter (and only it) infers the architecture
from tensor names and shapes, following OpenAI's ``build_model``.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unclip.clip.model import CLIP, OPENAI_MEAN, OPENAI_STD, CLIPConfig
from unclip.config import read_json
from unclip.hub import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    HubError,
    UnsafeWeightsError,
    from_pretrained,
    load_state_dict,
    load_weights_into,
)

__all__ = [
    "from_hf_state_dict",
    "from_openai_state_dict",
    "load_clip",
    "to_openai_state_dict",
]

# OpenAI name pattern -> our name (applied in order; the inverse maps back).
_OPENAI_TO_OURS = [
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.downsample\.0\.", ".downsample.conv."),
    (r"\.downsample\.1\.", ".downsample.bn."),
]
_OURS_TO_OPENAI = [
    (r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"),
    (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
    (r"\.attn\.proj\.", ".attn.out_proj."),
    (r"\.downsample\.conv\.", ".downsample.0."),
    (r"\.downsample\.bn\.", ".downsample.1."),
]
_OPENAI_TRANSPOSED = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual.proj.weight",
}
_OPENAI_EXTRA = {"input_resolution", "context_length", "vocab_size"}  # ints in JIT state dicts


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix (a DDP-wrapped save) and OpenAI's non-weight entries."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k not in _OPENAI_EXTRA:
            out[k] = v
    return out


def _count(state: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _openai_config(state: Mapping[str, torch.Tensor], source: str) -> CLIPConfig:
    """Architecture of an OpenAI-format state dict, as OpenAI's ``build_model`` infers it."""
    try:
        text_width = state["ln_final.weight"].shape[0]
        common: dict[str, Any] = {
            "embed_dim": state["text_projection"].shape[1],
            "context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "text_width": text_width,
            "text_layers": _count(state, r"transformer\.resblocks\.(\d+)\."),
            "text_heads": max(1, text_width // 64),
            "text_mlp_dim": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "activation": "quick_gelu",
            "image_mean": OPENAI_MEAN,
            "image_std": OPENAI_STD,
        }
        if "visual.proj" in state:  # ViT
            width, _, patch, _ = state["visual.conv1.weight"].shape
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {
                "vision_type": "vit",
                "vision_width": width,
                "vision_layers": _count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
                "vision_heads": max(1, width // 64),
                "vision_mlp_dim": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                "patch_size": patch,
                "image_size": patch * grid,
            }
        else:  # modified ResNet
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {
                "vision_type": "resnet",
                "vision_width": width,
                "vision_heads": max(1, width * 32 // 64),
                "resnet_layers": tuple(
                    _count(state, rf"visual\.layer{i}\.(\d+)\.") for i in range(1, 5)
                ),
                "image_size": grid * 32,
            }
    except (KeyError, IndexError, ValueError) as e:
        raise HubError(
            f"{source}: not an OpenAI CLIP state dict (missing or odd tensor {e})"
        ) from None
    return CLIPConfig(**common, **vision)


def from_openai_state_dict(
    state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) for an OpenAI-format CLIP state dict."""
    state = _strip_prefix(state)
    config = _openai_config(state, source)
    return config, _renamed(state, _OPENAI_TRANSPOSED, _OPENAI_TO_OURS)


def to_openai_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """Our CLIP's weights under OpenAI's names and layouts (the inverse of
    :func:`from_openai_state_dict`). OpenAI's loader assumes quick GELU, width / 64 heads and
    argmax pooling, so only models with such a config load back unchanged."""
    back = {ours: theirs for theirs, ours in _OPENAI_TRANSPOSED.items()}
    out = _renamed(model.state_dict(), back, _OURS_TO_OPENAI)
    for theirs in back.values() & out.keys():  # a ResNet has no visual.proj
        out[theirs] = out[theirs].contiguous()
    return out


def _renamed(
    state: Mapping[str, torch.Tensor],
    transposed: Mapping[str, str],
    renames: list[tuple[str, str]],
) -> dict[str, torch.Tensor]:
    """``state`` renamed: a key of ``transposed`` becomes its value, with the matrix
    transposed (a view); any other key goes through the (pattern, replacement) ``renames``
    in order."""
    out = {}
    for key, value in state.items():
        if key in transposed:
            out[transposed[key]] = value.T
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


#: the size fields of each CLIPConfig tower (``text_width``, ``vision_width``, …) <- the
#: transformers config key, with transformers' defaults for the text and the vision tower
_HF_TOWER_SIZES = {
    "width": ("hidden_size", 512, 768),
    "layers": ("num_hidden_layers", 12, 12),
    "heads": ("num_attention_heads", 8, 12),
    "mlp_dim": ("intermediate_size", 2048, 3072),
}


def _hf_config(doc: Mapping[str, Any], folder: Path) -> CLIPConfig:
    text = doc.get("text_config") or {}
    vision = doc.get("vision_config") or {}
    text_act = text.get("hidden_act", "quick_gelu")
    vision_act = vision.get("hidden_act", "quick_gelu")
    if text_act != vision_act or text_act not in ("gelu", "quick_gelu"):
        raise HubError(
            f"{folder / CONFIG_NAME}: unsupported activations (text {text_act!r}, vision "
            f"{vision_act!r}); unclip's CLIP uses one of 'gelu' or 'quick_gelu' for both"
        )
    if vision.get("num_channels", 3) != 3:
        raise HubError(f"{folder / CONFIG_NAME}: only RGB (num_channels 3) vision models load")
    eps_t, eps_v = text.get("layer_norm_eps", 1e-5), vision.get("layer_norm_eps", 1e-5)
    if not math.isclose(eps_t, eps_v):
        raise HubError(f"{folder / CONFIG_NAME}: text and vision layer_norm_eps differ")
    eos = text.get("eos_token_id", 2)
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = read_json(pre, HubError)
        mean = tuple(p.get("image_mean", mean))
        std = tuple(p.get("image_std", std))
    towers = {
        f"{name}_{field}": tower.get(key, defaults[i])
        for i, (name, tower) in enumerate((("text", text), ("vision", vision)))
        for field, (key, *defaults) in _HF_TOWER_SIZES.items()
    }
    return CLIPConfig(
        embed_dim=doc.get("projection_dim", 512),
        context_length=text.get("max_position_embeddings", 77),
        vocab_size=text.get("vocab_size", 49408),
        vision_type="vit",
        image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 32),
        **towers,
        activation=text_act,
        layer_norm_eps=float(eps_t),
        eot_token_id=None if eos == 2 else int(eos),  # transformers' legacy rule for id 2
        logit_scale_init=float(doc.get("logit_scale_init_value", math.log(1 / 0.07))),
        image_mean=mean,  # type: ignore[arg-type]
        image_std=std,  # type: ignore[arg-type]
    )


_HF_RENAMES = [
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.conv1."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^visual_projection\.", "visual.proj."),
    (r"\.self_attn\.out_proj\.", ".attn.proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict for a transformers ``CLIPModel`` state dict (q/k/v packed into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer older transformers versions saved
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        if m := re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise HubError(f"incomplete attention projections for {prefix}")
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES and _is_torchscript(path):
        raise UnsafeWeightsError(
            f"{path}: a TorchScript archive (as OpenAI's released .pt files are); unclip does "
            "not load those. If you trust it, convert it once with "
            "`torch.jit.load(path, map_location='cpu').state_dict()`, save that with "
            "safetensors.torch.save_file and load the .safetensors file"
        )
    return load_state_dict(path, allow_legacy=True)


def _build(config: CLIPConfig, state: Mapping[str, torch.Tensor], source: Path) -> CLIP:
    model = CLIP(config)
    load_weights_into(model, state, source)
    return model


def load_clip(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIP:
    """A CLIP model (eval mode) from any of the formats in the module docstring."""
    path = Path(path)
    if path.is_dir():
        config_file = path / CONFIG_NAME
        if not config_file.is_file() and (path / "clip" / CONFIG_NAME).is_file():
            return load_clip(path / "clip", device=device, dtype=dtype)
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; not a CLIP model folder")
        doc = read_json(config_file, HubError)
        if isinstance(doc, dict) and "format_version" in doc and "type" in doc:
            if doc["type"] != "clip":
                raise HubError(f"{config_file}: a {doc['type']!r} model, not a CLIP model")
            model = from_pretrained(path, device=device, dtype=dtype)
            assert isinstance(model, CLIP)
            return model
        if isinstance(doc, dict) and (
            doc.get("model_type") == "clip" or "CLIPModel" in (doc.get("architectures") or [])
        ):
            config = _hf_config(doc, path)
            files = [path / "model.safetensors", path / "pytorch_model.bin"]
            weights = next((f for f in files if f.is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"{path}: no model.safetensors (sharded or missing?)")
            model = _build(config, from_hf_state_dict(_read_weights(weights)), weights)
        else:
            raise HubError(
                f"{config_file}: neither an unclip CLIP folder nor a transformers CLIPModel"
            )
    elif path.is_file():
        config, state = from_openai_state_dict(_read_weights(path), str(path))
        model = _build(config, state, path)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
