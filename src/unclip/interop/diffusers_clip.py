"""The CLIP parts of a diffusers unCLIP folder -> unclip's :class:`~unclip.clip.CLIP` and
:class:`~unclip.tokenizer.Tokenizer`, and back.

- ``text_encoder/``: a transformers ``CLIPTextModelWithProjection`` (``config.json`` of
  ``model_type`` ``clip_text_model`` + ``model.safetensors``);
- ``image_encoder/`` (the image-variation layout): a ``CLIPVisionModelWithProjection``;
  ``feature_extractor/``: its ``CLIPImageProcessor`` (``preprocessor_config.json``: mean, std);
- ``tokenizer/``: a ``CLIPTokenizer`` (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``).

The two towers become one unclip CLIP (text only, ``vision_type="none"``, without an image
encoder). Karlo's stages take the text encoder's ``text_embeds`` (the projected end-token
state, not normalised) as z_t and its ``last_hidden_state`` as caption tokens, which is what
:meth:`unclip.clip.CLIP.encode_text_condition` gives with ``normalize=False``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unclip.clip.convert import _hf_config, _read_weights, from_hf_state_dict
from unclip.clip.model import CLIP, CLIPConfig
from unclip.config import ConfigError
from unclip.config import read_json as read_config_json
from unclip.hub import HubError, check_weights, meta_model
from unclip.tokenizer import EOT_TOKEN, SOT_TOKEN, Tokenizer

TEXT_MODEL_TYPE = "clip_text_model"
VISION_MODEL_TYPE = "clip_vision_model"
#: the most merges transformers' CLIPTokenizer reads from merges.txt
MAX_MERGES = 49152 - 256 - 2


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or unreadable file is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    doc = read_config_json(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return doc


def weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` present in ``folder`` (safetensors before pickle-based files)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ConfigError(f"{folder}: sharded weights are not supported; save unsharded")
    raise ConfigError(f"{folder}: no weights file ({' or '.join(names)})")


def read_weights(folder: Path, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The state dict in ``folder`` (see :func:`weights_file`), read without unpickling."""
    path = weights_file(folder, names)
    try:
        return _read_weights(path)
    except HubError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def check_converted(own: dict[str, Tensor], state: dict[str, Tensor], where: str | Path) -> None:
    """:func:`unclip.hub.check_weights` of converted weights ``state`` against a model's
    own state dict ``own`` (names, shapes, float-ness), its error a one-line ConfigError
    naming ``where``."""
    try:
        check_weights(own, state, where)
    except HubError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _merges_and_vocab(folder: Path) -> tuple[list[tuple[str, str]], dict[str, int]]:
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = read_json(folder / "vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
        merges = [tuple(line.split()) for line in lines[:MAX_MERGES]]
    elif (folder / "tokenizer.json").is_file():
        model = read_json(folder / "tokenizer.json").get("model") or {}
        if model.get("type") != "BPE":
            raise ConfigError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer")
        vocab = model.get("vocab") or {}
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
        raise ConfigError(
            f"{folder}: no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)"
        )
    if any(len(m) != 2 for m in merges):
        raise ConfigError(f"{folder}: malformed merges")
    return merges, {str(k): int(v) for k, v in vocab.items()}  # type: ignore[misc]


def tokenizer_from_diffusers(folder: Path) -> Tokenizer:
    """unclip's tokenizer for a transformers ``CLIPTokenizer`` folder. unclip rebuilds CLIP's
    vocabulary from the merges (bytes, bytes + ``</w>``, merges, start, end), so the folder's
    vocabulary must be laid out that way (CLIP's is); the context length is the folder's
    ``model_max_length``."""
    config = read_json(folder / "tokenizer_config.json")
    length = int(config.get("model_max_length", 77))
    if not 2 <= length <= 100_000:
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: model_max_length {length}")
    for key, want in (("bos_token", SOT_TOKEN), ("eos_token", EOT_TOKEN)):
        token = config.get(key, want)
        token = token.get("content", want) if isinstance(token, dict) else token
        if token != want:
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: {key} {token!r}, not {want!r}")
    merges, vocab = _merges_and_vocab(folder)
    tok = Tokenizer.from_merges(merges, context_length=length)
    ours = tok.get_vocab()
    if ours != vocab:
        bad = next((k for k in vocab if ours.get(k) != vocab[k]), None)
        raise ConfigError(
            f"{folder}: the vocabulary is not laid out as CLIP's (e.g. {bad!r} is "
            f"{vocab.get(bad) if bad else '?'} there, {ours.get(bad) if bad else '?'} in unclip)"
        )
    return tok


def tokenizer_to_diffusers(tokenizer: Tokenizer, folder: Path) -> None:
    """Write ``tokenizer`` as a transformers ``CLIPTokenizer`` folder (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = json.loads(tokenizer._tok.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    specials = {
        "bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
    }  # fmt: skip
    config = {
        **specials, "model_max_length": tokenizer.context_length,
        "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(specials, indent=2), encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------
# Text and image encoders


def _check_type(doc: dict[str, Any], want: str, path: Path) -> None:
    got = doc.get("model_type")
    if got != want:
        raise ConfigError(f"{path}: model_type {got!r}, expected {want!r}")


def clip_config_from_diffusers(
    text: dict[str, Any],
    vision: dict[str, Any] | None,
    text_dir: Path,
    image_dir: Path | None = None,
    feature_dir: Path | None = None,
) -> CLIPConfig:
    """unclip's :class:`CLIPConfig` of a ``text_encoder/config.json`` document ``text`` and,
    for the image-variation layout, an ``image_encoder/config.json`` one (``vision``; None: a
    text encoder alone, ``vision_type="none"``). The pixel mean and std come from
    ``feature_dir/preprocessor_config.json`` when it exists (else CLIP's). Errors name the
    files in ``text_dir`` and ``image_dir``."""
    _check_type(text, TEXT_MODEL_TYPE, text_dir / "config.json")
    image_cfg = (image_dir or text_dir.parent / "image_encoder") / "config.json"
    if vision is not None:
        _check_type(vision, VISION_MODEL_TYPE, image_cfg)
        if vision.get("projection_dim", 512) != text.get("projection_dim", 512):
            raise ConfigError(
                f"{image_cfg}: projection_dim {vision.get('projection_dim')} "
                f"!= the text encoder's {text.get('projection_dim')}"
            )
    doc = {
        "text_config": text,
        "vision_config": (
            {"hidden_act": text.get("hidden_act", "quick_gelu")} if vision is None else vision
        ),
        "projection_dim": text.get("projection_dim", 512),
    }
    try:
        config = _hf_config(doc, feature_dir or text_dir)
    except HubError as e:
        raise ConfigError(str(e)) from None
    return config.replace(vision_type="none") if vision is None else config


def clip_from_diffusers_state(config: CLIPConfig, state: dict[str, Tensor], where: Path) -> CLIP:
    """unclip's CLIP (eval mode, float32) of ``config`` holding transformers' CLIP ``state``
    (text tower, + vision tower for a config with one): its float32 tensors assigned, not
    copied; meta tensors give a meta model (shapes checked, nothing allocated). ``where``
    names the folder in errors."""
    state = from_hf_state_dict(state)
    model = meta_model(CLIP, config)  # no random initialisation, no second copy of the weights
    state.setdefault("logit_scale", torch.tensor(math.log(1 / 0.07)))
    check_converted(model.state_dict(), state, where)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    # the non-persistent buffers come from the config, not the weights
    model.image_mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    model.image_std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return model.eval()


def clip_from_diffusers(config: CLIPConfig, text_dir: Path, image_dir: Path | None = None) -> CLIP:
    """One unclip CLIP (eval mode, float32) of ``config`` (:func:`clip_config_from_diffusers`
    of the folders' config files, read once) holding the weights of a ``text_encoder/``
    folder and, when given, an ``image_encoder/`` folder."""
    state = read_weights(text_dir, HF_WEIGHTS)
    if image_dir is not None:
        state.update(read_weights(image_dir, HF_WEIGHTS))
    return clip_from_diffusers_state(
        config, state, text_dir if image_dir is None else image_dir.parent
    )


def _text_config(config: CLIPConfig) -> dict[str, Any]:
    eos = config.eot_token_id
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": TEXT_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.text_width,
        "intermediate_size": config.text_mlp_dim or 4 * config.text_width,
        "num_hidden_layers": config.text_layers,
        "num_attention_heads": config.text_heads,
        "max_position_embeddings": config.context_length,
        "projection_dim": config.embed_dim,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "bos_token_id": 0 if eos is None else eos - 1,
        "eos_token_id": 2 if eos is None else eos,  # 2: transformers' argmax pooling
        "pad_token_id": 1 if eos is None else eos,
    }


def _vision_config(config: CLIPConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": VISION_MODEL_TYPE,
        "hidden_size": config.vision_width,
        "intermediate_size": config.vision_mlp_dim or 4 * config.vision_width,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": config.vision_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "projection_dim": config.embed_dim,
        "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps,
        "num_channels": 3,
    }


_TO_HF = [
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.proj\.", "visual_projection."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


def clip_to_diffusers(
    model: CLIP, dtype: torch.dtype | None = None
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any] | None, dict[str, Tensor] | None]:
    """(text config, text state, vision config, vision state) of transformers'
    ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection`` (vision None for a
    text-only CLIP). ViT image encoders only."""
    import re

    cfg = model.config
    if cfg.vision_type == "resnet":
        raise ConfigError("a ResNet CLIP has no transformers CLIPVisionModel equivalent")
    text: dict[str, Tensor] = {}
    vision: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "logit_scale":
            continue
        value = value.detach().to(dtype or value.dtype).contiguous()
        m = re.match(r"^(.*)\.attn\.qkv\.(weight|bias)$", key)
        names = [key]
        parts = [value]
        if m:
            names = [f"{m.group(1)}.attn.{p}_proj.{m.group(2)}" for p in "qkv"]
            parts = [p.contiguous() for p in value.chunk(3, dim=0)]
        for name, part in zip(names, parts, strict=True):
            name = name.replace(".attn.q_proj", ".self_attn.q_proj")
            name = name.replace(".attn.k_proj", ".self_attn.k_proj")
            name = name.replace(".attn.v_proj", ".self_attn.v_proj")
            for pattern, repl in _TO_HF:
                name = re.sub(pattern, repl, name)
            (vision if name.startswith(("vision_model.", "visual_projection.")) else text)[name] = (
                part
            )
    if cfg.vision_type == "none":
        return _text_config(cfg), text, None, None
    return _text_config(cfg), text, _vision_config(cfg), vision


def empty_caption(clip: CLIP, tokenizer: Tokenizer) -> tuple[Tensor, Tensor, Tensor]:
    """The text encoder's output for the empty caption "", the unconditional condition of
    Karlo's classifier-free guidance: (z_t [1, D] as the projection gives it, token states
    [1, L, W], mask [1, L] bool: the start and end tokens), float32 on the CPU."""
    tokens = tokenizer([""], clip.config.context_length)
    with torch.no_grad():
        z_t, states, mask = clip.encode_text_condition(tokens, normalize=False)
    return z_t.float(), states.float(), mask
