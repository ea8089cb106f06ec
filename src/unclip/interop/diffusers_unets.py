"""diffusers' unCLIP UNets (Karlo) <-> unclip's decoder and upsampler modules, exactly.

A diffusers unCLIP folder holds the decoder as a ``UNet2DConditionModel`` (``decoder/``) with
an ``UnCLIPTextProjModel`` (``text_proj/``) that turns z_i, z_t and the caption into the
decoder's extra timestep embedding and context tokens, and the 64→256 super-resolution pair
as two ``UNet2DModel`` (``super_res_first/`` for every step but the last,
``super_res_last/`` for the last, as Karlo samples). The same ADM architecture is unclip's
:class:`~unclip.decoder.unet.UNet`: this module maps the state dicts both ways (the configs:
:mod:`unclip.interop.diffusers_unet_configs`), without importing diffusers (configs arrive as
dicts, weights as state dicts).

What maps onto what (decoder): ``SimpleCrossAttn*`` blocks (spatial self-attention that also
attends to context tokens through ``add_k_proj``/``add_v_proj``, GLIDE's encoder_kv) are
:class:`~unclip.decoder.blocks.AttentionBlock` with context; ``Resnet{Down,Up}sampleBlock2D``
resample inside a residual block (``resblock_updown``); ``resnet_time_scale_shift
"scale_shift"`` is ``use_scale_shift_norm``; the text projection's four parts are
``clip_emb_proj`` (z_i → timestep), ``text_emb_proj`` (z_t → timestep, ``text_emb_dim``),
``clip_tokens_proj`` (z_i → context tokens; diffusers lays the tokens out channel-major, so
the rows are permuted) and ``text_proj`` + ``context_norm`` (caption tokens, layer norm on
them only: ``context_norm="text"``); its learned classifier-free-guidance embedding is
``null_image_emb``. diffusers' unconditional branch encodes the empty caption; unclip's
decoder owns that as its null caption (``null_caption_len``), given to the converter.

Anything else (another block, attention or embedding option) raises
:class:`~unclip.config.ConfigError` naming the folder's file and the field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from unclip.config import ConfigError
from unclip.decoder.blocks import AttentionBlock, Downsample, ResBlock, Upsample
from unclip.decoder.unet import UNet
from unclip.decoder.upsampler import Upsampler
from unclip.hub import meta_model
from unclip.interop.diffusers_unet_configs import (
    DECODER,
    SUPER_RES_FIRST,
    SUPER_RES_LAST,
    TEXT_PROJ,
    decoder_config_from_diffusers,
    decoder_config_to_diffusers,
    upsampler_config_to_diffusers,
    upsampler_configs_from_diffusers,
)

State = dict[str, Tensor]
Component = tuple[dict[str, Any], State]  # (config.json as a dict, state dict)


def _build(model: UNet, state: State, where: str) -> UNet:
    """The meta-device ``model`` holding ``state`` (its tensors, assigned: no float32 copy),
    eval mode."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConfigError(f"{where}: the weights do not fit the config ({e})") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# state-dict key maps


def _leaves(module: nn.Module, prefix: str, dprefix: str) -> Iterator[tuple[str, list[str]]]:
    """(unclip key, [diffusers keys]) of one layer; several diffusers keys are concatenated
    along dim 0 into the unclip tensor (fused q/k/v)."""
    if isinstance(module, ResBlock):
        names = [("in_norm", "norm1"), ("in_conv", "conv1"), ("emb_proj", "time_emb_proj")]
        names += [("out_norm", "norm2"), ("out_conv", "conv2")]
        if isinstance(module.skip, nn.Conv2d):
            names.append(("skip", "conv_shortcut"))
        for u, d in names:
            yield from _leaves(getattr(module, u), f"{prefix}.{u}", f"{dprefix}.{d}")
    elif isinstance(module, AttentionBlock):
        yield from _leaves(module.norm, f"{prefix}.norm", f"{dprefix}.group_norm")
        for p in ("weight", "bias"):
            yield f"{prefix}.attn.qkv.{p}", [f"{dprefix}.to_{c}.{p}" for c in "qkv"]
            if module.attn.context_kv is not None:
                yield f"{prefix}.attn.context_kv.{p}", [f"{dprefix}.add_{c}_proj.{p}" for c in "kv"]
            yield f"{prefix}.attn.proj.{p}", [f"{dprefix}.to_out.0.{p}"]
    elif isinstance(module, Downsample):
        yield from _leaves(module.op, f"{prefix}.op", f"{dprefix}.conv")
    elif isinstance(module, Upsample):
        yield from _leaves(module.conv, f"{prefix}.conv", f"{dprefix}.conv")
    else:  # Linear, Conv2d, GroupNorm, LayerNorm
        for p, _ in module.named_parameters(recurse=False):
            yield f"{prefix}.{p}", [f"{dprefix}.{p}"]


def _unet_key_map(model: UNet) -> Iterator[tuple[str, list[str]]]:
    """(unclip key, [diffusers keys]) of every UNet weight, walking the blocks as diffusers
    lays them out: ``down_blocks.{level}.{resnets,attentions}.{i}``, ``downsamplers.0``,
    ``mid_block``, ``up_blocks.{deepest level first}``, ``upsamplers.0``."""
    cfg = model.config
    levels = len(cfg.channel_mult)
    yield from _leaves(model.time_embed.mlp[0], "time_embed.mlp.0", "time_embedding.linear_1")
    yield from _leaves(model.time_embed.mlp[2], "time_embed.mlp.2", "time_embedding.linear_2")
    yield from _leaves(model.input_conv, "input_conv", "conv_in")

    def stage(prefix: str, layers: nn.Module, block: str, i: int, sampler: str) -> Iterator:
        for j, layer in enumerate(layers):
            if isinstance(layer, AttentionBlock):
                name = f"{block}.attentions.{i}"
            elif isinstance(layer, (Downsample, Upsample)) or getattr(layer, "updown", False):
                name = f"{block}.{sampler}.0"
            else:
                name = f"{block}.resnets.{i}"
            yield from _leaves(layer, f"{prefix}.{j}", name)

    k = 0
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            yield from stage(f"down.{k}", model.down[k], f"down_blocks.{level}", i, "downsamplers")
            k += 1
        if level != levels - 1:
            yield from stage(f"down.{k}", model.down[k], f"down_blocks.{level}", 0, "downsamplers")
            k += 1
    res = att = 0
    for j, layer in enumerate(model.mid):
        if isinstance(layer, AttentionBlock):
            yield from _leaves(layer, f"mid.{j}", f"mid_block.attentions.{att}")
            att += 1
        else:
            yield from _leaves(layer, f"mid.{j}", f"mid_block.resnets.{res}")
            res += 1
    k = 0
    for b in range(levels):
        for i in range(cfg.num_res_blocks + 1):
            yield from stage(f"up.{k}", model.up[k], f"up_blocks.{b}", i, "upsamplers")
            k += 1
    yield from _leaves(model.out_norm, "out_norm", "conv_norm_out")
    yield from _leaves(model.out_conv, "out_conv", "conv_out")


def _text_proj_key_map() -> list[tuple[str, str]]:
    """(unclip key, text_proj key) of the decoder's conditioning layers (all but the context
    tokens' projection, whose rows are permuted: :func:`_tokens_from_diffusers`)."""
    pairs = [("null_image_emb", "learned_classifier_free_guidance_embeddings")]
    for u, d in (
        ("clip_emb_proj", "clip_image_embeddings_project_to_time_embeddings"),
        ("text_emb_proj", "embedding_proj"),
        ("text_proj", "encoder_hidden_states_proj"),
        ("context_norm", "text_encoder_hidden_states_norm"),
    ):
        pairs += [(f"{u}.weight", f"{d}.weight"), (f"{u}.bias", f"{d}.bias")]
    return pairs


_TOKENS = "clip_extra_context_tokens_proj"


def _tokens_from_diffusers(w: Tensor, k: int) -> Tensor:
    """diffusers' context-token projection rows (channel-major: row c·K + k is token k's
    channel c) -> unclip's (token-major: row k·C + c). w: [C·K, ...] -> [K·C, ...]."""
    return w.reshape(-1, k, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _tokens_to_diffusers(w: Tensor, k: int) -> Tensor:
    """The inverse of :func:`_tokens_from_diffusers`: [K·C, ...] -> [C·K, ...]."""
    return w.reshape(k, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _take(state: Mapping[str, Tensor], key: str, where: str, dtype: torch.dtype | None) -> Tensor:
    if key not in state:
        raise ConfigError(f"{where}: the weights lack {key!r}")
    t = state[key]
    return t if dtype is None else t.to(dtype)


def _unet_state(
    model: UNet, state: Mapping[str, Tensor], where: str, dtype: torch.dtype | None
) -> State:
    """unclip's UNet weights from a diffusers UNet state dict (unused keys: ConfigError)."""
    out, used = {}, set()
    for key, dkeys in _unet_key_map(model):
        parts = [_take(state, d, where, dtype) for d in dkeys]
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        used.update(dkeys)
    _no_extra(state, used, where)
    return out


def _no_extra(state: Mapping[str, Tensor], used: set[str], where: str) -> None:
    extra = sorted(set(state) - used)
    if extra:
        raise ConfigError(f"{where}: unexpected weights ({len(extra)}, e.g. {extra[0]!r})")


def _unet_state_to_diffusers(model: UNet) -> State:
    """diffusers' UNet state dict of ``model``: fused q/k/v split (into copies: a safetensors
    file cannot hold views of one storage), the rest ``model``'s tensors."""
    state = model.state_dict()
    out = {}
    for key, dkeys in _unet_key_map(model):
        parts = state[key].chunk(len(dkeys))
        for d, part in zip(dkeys, parts, strict=True):
            out[d] = part.clone() if len(parts) > 1 else part
    return out


# ---------------------------------------------------------------------------------------------
# public API


def decoder_from_diffusers(
    unet_state: Mapping[str, Tensor],
    unet_config: Mapping[str, Any],
    text_proj_state: Mapping[str, Tensor],
    text_proj_config: Mapping[str, Any],
    *,
    null_caption: tuple[Tensor, Tensor],
    dtype: torch.dtype | None = None,
) -> UNet:
    """unclip's decoder :class:`UNet` (eval mode) computing what diffusers' unCLIP decoder
    ``UNet2DConditionModel`` with its ``UnCLIPTextProjModel`` computes.

    ``null_caption``: (tokens [k, D], z_t [D]) the CLIP text encoder's output for the empty
    caption, only its k real (unmasked) tokens (k = 2 for CLIP: start and end): what
    diffusers' pipeline feeds the unconditional branch; the decoder keeps them as its null
    caption (``null_caption_len`` = k). ``dtype``: cast every tensor (None: keep the state's).
    The model holds the given tensors where no cast or reshuffle was needed (shared storage).
    Unsupported configs or weights that do not fit: :class:`ConfigError` naming the file.
    """
    tokens, z_t = null_caption
    config = decoder_config_from_diffusers(unet_config, text_proj_config, tokens.shape[0])
    dim = config.text_dim
    if tokens.ndim != 2 or tokens.shape[1] != dim or z_t.shape != (dim,) or not len(tokens):
        raise ValueError(
            f"null_caption must be (tokens [k, {dim}], z_t [{dim}]), "
            f"got {tuple(tokens.shape)}, {tuple(z_t.shape)}"
        )
    skeleton = meta_model(UNet, config)  # keys and shapes, no memory
    state = _unet_state(skeleton, unet_state, f"{DECODER}/", dtype)
    where = f"{TEXT_PROJ}/"
    used = {f"{_TOKENS}.weight", f"{_TOKENS}.bias"}
    for key, dkey in _text_proj_key_map():
        state[key] = _take(text_proj_state, dkey, where, dtype)
        used.add(dkey)
    for p in ("weight", "bias"):
        w = _take(text_proj_state, f"{_TOKENS}.{p}", where, dtype)
        state[f"clip_tokens_proj.{p}"] = _tokens_from_diffusers(w, config.clip_tokens)
    _no_extra(text_proj_state, used, where)
    like = state["input_conv.weight"]
    state["null_caption_tokens"] = tokens.to(like.dtype)
    state["null_text_emb"] = z_t.to(like.dtype)
    return _build(skeleton, state, f"{DECODER}/")


def upsampler_from_diffusers(
    first_state: Mapping[str, Tensor],
    first_config: Mapping[str, Any],
    last_state: Mapping[str, Tensor],
    last_config: Mapping[str, Any],
    *,
    low_res_size: int,
    dtype: torch.dtype | None = None,
) -> tuple[Upsampler, Upsampler]:
    """(first, last): unclip :class:`Upsampler` s (eval mode) computing what diffusers'
    ``super_res_first`` and ``super_res_last`` ``UNet2DModel`` compute on the noisy image
    concatenated with the low-res image resized as diffusers' pipeline does (bicubic,
    antialiased: ``low_res_mode="bicubic_antialias"``). Karlo runs ``last`` for the final
    step only. ``low_res_size``: side of the decoder's images (the low-res input).
    ``super_res_last`` without a ``sample_size`` takes the first's. ``dtype`` as in
    :func:`decoder_from_diffusers`."""
    configs = upsampler_configs_from_diffusers(first_config, last_config, low_res_size)
    out = []
    for name, state, config in zip(
        (SUPER_RES_FIRST, SUPER_RES_LAST), (first_state, last_state), configs, strict=True
    ):
        skeleton, where = meta_model(Upsampler, config), f"{name}/"
        out.append(_build(skeleton, _unet_state(skeleton, state, where, dtype), where))
    return out[0], out[1]  # type: ignore[return-value]


def decoder_to_diffusers(model: UNet) -> dict[str, Component]:
    """``{"decoder": (config, state), "text_proj": (config, state)}``: diffusers'
    ``UNet2DConditionModel`` and ``UnCLIPTextProjModel`` computing what ``model`` does
    (``from_config(config)`` then ``load_state_dict(state)``). The null caption is not
    written: diffusers' pipeline encodes the empty caption itself. Only decoders of the
    Karlo layout can be written (those :func:`decoder_from_diffusers` returns, or trained
    with the same options); any other gives :class:`ConfigError` saying what it lacks.
    Tensors that need no reshuffle share storage with ``model``."""
    unet_config, text_proj_config = decoder_config_to_diffusers(model.config)
    state = model.state_dict()
    text_proj_state = {d: state[u] for u, d in _text_proj_key_map()}
    for p in ("weight", "bias"):
        w = state[f"clip_tokens_proj.{p}"]
        text_proj_state[f"{_TOKENS}.{p}"] = _tokens_to_diffusers(w, model.config.clip_tokens)
    return {
        DECODER: (unet_config, _unet_state_to_diffusers(model)),
        TEXT_PROJ: (text_proj_config, text_proj_state),
    }


def upsampler_to_diffusers(first: Upsampler, last: Upsampler | None = None) -> dict[str, Component]:
    """``{"super_res_first": (config, state), "super_res_last": (config, state)}``: diffusers'
    ``UNet2DModel`` pair computing what ``first`` and ``last`` do (``last`` None: ``first``
    for every step, as unclip's own upsampler runs). Upsamplers diffusers cannot express
    exactly (a blurred or non-antialiased low-res input, conditioning) give
    :class:`ConfigError`. Tensors share storage with the models as in
    :func:`decoder_to_diffusers`."""
    last = first if last is None else last
    return {
        name: (upsampler_config_to_diffusers(m.config), _unet_state_to_diffusers(m))
        for name, m in ((SUPER_RES_FIRST, first), (SUPER_RES_LAST, last))
    }
