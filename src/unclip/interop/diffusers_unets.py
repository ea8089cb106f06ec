"""diffusers' unCLIP UNets (Karlo) <-> unclip's decoder and upsampler modules, exactly.

A diffusers unCLIP folder holds the decoder as a ``UNet2DConditionModel`` (``decoder/``) with
an ``UnCLIPTextProjModel`` (``text_proj/``) that turns z_i, z_t and the caption into the
decoder's extra timestep embedding and context tokens, and the 64→256 super-resolution pair
as two ``UNet2DModel`` (``super_res_first/`` for every step but the last,
``super_res_last/`` for the last, as Karlo samples). The same ADM architecture is unclip's
:class:`~unclip.decoder.unet.UNet`: this module maps configs and state dicts both ways,
without importing diffusers (configs arrive as dicts, weights as state dicts).

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
from unclip.decoder.unet import UNet, UNetConfig
from unclip.decoder.upsampler import Upsampler, UpsamplerConfig

#: the diffusers folders (components) these converters read and write
DECODER, TEXT_PROJ = "decoder", "text_proj"
SUPER_RES_FIRST, SUPER_RES_LAST = "super_res_first", "super_res_last"

State = dict[str, Tensor]
Component = tuple[dict[str, Any], State]  # (config.json as a dict, state dict)

# diffusers' constructor defaults of the keys read here (a config.json may omit any of them)
_COMMON_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
}
_COND_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1280,
}
_PLAIN_DEFAULTS: dict[str, Any] = {
    **_COMMON_DEFAULTS,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D"] * 3 + ["UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
    "add_attention": True,
}
# options that must keep diffusers' default (they change what the network computes)
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "time_embedding_type": "positional",
    "num_class_embeds": None,
}
_COND_FIXED: dict[str, Any] = {
    **_FIXED,
    "class_embed_type": "identity",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "num_attention_heads": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
_PLAIN_FIXED: dict[str, Any] = {**_FIXED, "class_embed_type": None}
_EQUIVALENT = {"mid_block_only_cross_attention": (None, False)}

# block type -> (has attention, resampling: "resnet" | "conv" | the *_type config key)
_COND_DOWN = {
    "ResnetDownsampleBlock2D": (False, "resnet"),
    "SimpleCrossAttnDownBlock2D": (True, "resnet"),
}
_COND_UP = {
    "ResnetUpsampleBlock2D": (False, "resnet"),
    "SimpleCrossAttnUpBlock2D": (True, "resnet"),
}
_COND_MID = ("UNetMidBlock2DSimpleCrossAttn",)
_PLAIN_DOWN = {
    "ResnetDownsampleBlock2D": (False, "resnet"),
    "DownBlock2D": (False, "conv"),
    "AttnDownBlock2D": (True, "downsample_type"),
}
_PLAIN_UP = {
    "ResnetUpsampleBlock2D": (False, "resnet"),
    "UpBlock2D": (False, "conv"),
    "AttnUpBlock2D": (True, "upsample_type"),
}
_PLAIN_MID = ("UNetMidBlock2D",)


class _Reader:
    """A diffusers config dict read with its class's defaults; errors name ``file`` and field."""

    def __init__(self, config: Mapping[str, Any], defaults: Mapping[str, Any], file: str) -> None:
        self.config, self.defaults, self.file = config, defaults, file

    def __getitem__(self, key: str) -> Any:
        value = self.config.get(key, self.defaults.get(key))
        return list(value) if isinstance(value, tuple) else value

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key} {message}")

    def unsupported(self, key: str, value: Any, supported: Any) -> ConfigError:
        return self.error(key, f"{value!r} is not supported (supported: {supported})")

    def require_defaults(self, fixed: Mapping[str, Any]) -> None:
        for key, want in fixed.items():
            value = self.config.get(key, want)
            if value != want and value not in _EQUIVALENT.get(key, ()):
                raise self.unsupported(key, value, repr(want))

    def uniform(self, key: str, n: int) -> Any:
        """A per-block setting (a value or a list of n) that unclip needs equal for all."""
        value = self[key]
        if isinstance(value, list):
            if len(value) != n or len(set(map(str, value))) != 1:
                raise self.error(key, f"{value!r}: per-block values are not supported (one value)")
            value = value[0]
        return value

    def block_types(
        self, key: str, table: Mapping[str, tuple[bool, str]]
    ) -> list[tuple[bool, str]]:
        out = []
        for name in self[key]:
            kind = table.get(name[7:] if name.startswith("UNetRes") else name)
            if kind is None:
                raise self.unsupported(key, name, ", ".join(table))
            attn, resample = kind
            if resample not in ("resnet", "conv"):  # AttnDown/UpBlock2D: from the config
                resample = self[resample]
                if resample not in ("resnet", "conv"):
                    raise self.unsupported(
                        "downsample_type" if "down" in key else "upsample_type",
                        resample,
                        "'resnet', 'conv'",
                    )
            out.append((attn, resample))
        return out


def _unet_fields(r: _Reader, *, conditional: bool) -> dict[str, Any]:
    """The :class:`UNetConfig` fields of a diffusers UNet config (``conditional``:
    ``UNet2DConditionModel``, else ``UNet2DModel``), or ConfigError."""
    r.require_defaults(_COND_FIXED if conditional else _PLAIN_FIXED)
    channels = r["block_out_channels"]
    levels = len(channels)
    down = r.block_types("down_block_types", _COND_DOWN if conditional else _PLAIN_DOWN)
    up = r.block_types("up_block_types", _COND_UP if conditional else _PLAIN_UP)
    if len(down) != levels or len(up) != levels:
        raise r.error(
            "down_block_types", "and up_block_types need one entry per block_out_channels"
        )
    mid_types = _COND_MID if conditional else _PLAIN_MID
    if r["mid_block_type"] not in mid_types:
        raise r.unsupported("mid_block_type", r["mid_block_type"], ", ".join(mid_types))
    mc = channels[0]
    if any(c % mc for c in channels):
        raise r.error("block_out_channels", f"{channels}: each must be a multiple of the first")
    groups = r["norm_num_groups"]
    if not isinstance(groups, int) or any(c % groups for c in channels):
        raise r.error("norm_num_groups", f"{groups!r} must divide every block_out_channels")
    if r["time_embedding_dim"] not in (None, 4 * mc):
        raise r.unsupported("time_embedding_dim", r["time_embedding_dim"], f"None or {4 * mc}")

    # attention at a level: in its down block and in its up block alike
    attn_levels = [lv for lv in range(levels) if down[lv][0]]
    up_levels = [levels - 1 - i for i in range(levels) if up[i][0]]
    if sorted(up_levels) != attn_levels:
        raise r.error("up_block_types", "must attend at the levels down_block_types attend at")
    # the resampling of the blocks that resample (all but the deepest down, the last up)
    resampling = {kind for _, kind in down[:-1]} | {kind for _, kind in up[:-1]}
    if len(resampling) > 1:
        raise r.error(
            "down_block_types", "mix residual-block and conv resampling (unclip: one kind)"
        )
    updown = resampling != {"conv"}
    if not updown and r["downsample_padding"] != 1:
        raise r.unsupported("downsample_padding", r["downsample_padding"], "1")

    shift = r["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise r.unsupported("resnet_time_scale_shift", shift, "'default', 'scale_shift'")
    if conditional:
        attention_mid = True
    else:
        attention_mid = bool(r["add_attention"])
        attn_groups = r["attn_norm_num_groups"]
        if attention_mid and attn_groups is None and shift != "default":
            # diffusers' UNetMidBlock2D then attends without a group norm
            raise r.error(
                "attn_norm_num_groups",
                "None with resnet_time_scale_shift 'scale_shift' and add_attention (an "
                "attention without group norm) is not supported",
            )
        if attention_mid and attn_groups not in (None, groups):
            raise r.unsupported("attn_norm_num_groups", attn_groups, f"None or {groups}")

    head_dim = r.uniform("attention_head_dim", levels)
    if conditional and not isinstance(head_dim, int):
        raise r.unsupported("attention_head_dim", head_dim, "an integer")
    layers = r.uniform("layers_per_block", levels)
    size = r["sample_size"]
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise r.unsupported("sample_size", size, "a square size")
        size = size[0]
    if not isinstance(size, int) or size % 2 ** (levels - 1):
        raise r.error(
            "sample_size", f"{size!r} must be an integer divisible by {2 ** (levels - 1)}"
        )
    return {
        "image_size": size,
        "model_channels": mc,
        "channel_mult": tuple(c // mc for c in channels),
        "num_res_blocks": layers,
        "attention_resolutions": tuple(size // 2**lv for lv in attn_levels),
        "attention_mid": attention_mid,
        "mid_depth": 1,
        "num_heads": 1,
        "num_head_channels": head_dim or 0,
        "dropout": float(r["dropout"]),
        "resblock_updown": updown,
        "conv_resample": True,
        "use_scale_shift_norm": shift == "scale_shift",
        "norm_groups": groups,
        "inpaint": False,
        "use_checkpoint": False,
    }


def _io_fields(r: _Reader, image_channels: int) -> dict[str, Any]:
    out = r["out_channels"]
    if out not in (image_channels, 2 * image_channels):
        raise r.unsupported(
            "out_channels",
            out,
            f"{image_channels}, or {2 * image_channels} with a learned variance",
        )
    return {
        "in_channels": image_channels,
        "out_channels": image_channels,
        "learn_sigma": out != image_channels,
    }


def _build(cls: type[UNet], config: UNetConfig, state: State, where: str) -> UNet:
    """``cls(config)`` holding ``state`` (its tensors, assigned: no float32 copy), eval mode."""
    with torch.device("meta"):
        model = cls(config)
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
    extra = sorted(set(state) - used)
    if extra:
        raise ConfigError(f"{where}: unexpected weights ({len(extra)}, e.g. {extra[0]!r})")
    return out


def _unet_state_to_diffusers(model: UNet) -> State:
    state = model.state_dict()
    out = {}
    for key, dkeys in _unet_key_map(model):
        for d, part in zip(dkeys, state[key].chunk(len(dkeys)), strict=True):
            out[d] = part.clone()
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
    r = _Reader(unet_config, _COND_DEFAULTS, f"{DECODER}/config.json")
    fields = _unet_fields(r, conditional=True)
    fields.update(_io_fields(r, r["in_channels"]))
    cross = r.uniform("cross_attention_dim", len(r["block_out_channels"]))
    tp = _Reader(
        text_proj_config,
        {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768},
        f"{TEXT_PROJ}/config.json",
    )
    dim, k_tokens = tp["clip_embeddings_dim"], tp["clip_extra_context_tokens"]
    if tp["time_embed_dim"] != 4 * fields["model_channels"]:
        raise tp.error(
            "time_embed_dim",
            f"{tp['time_embed_dim']!r} must be the decoder's 4·block_out_channels[0] = {4 * fields['model_channels']}",
        )
    if tp["cross_attention_dim"] != cross:
        raise tp.error(
            "cross_attention_dim", f"{tp['cross_attention_dim']!r} must be the decoder's ({cross})"
        )
    tokens, z_t = null_caption
    if tokens.ndim != 2 or tokens.shape[1] != dim or z_t.shape != (dim,) or not len(tokens):
        raise ValueError(
            f"null_caption must be (tokens [k, {dim}], z_t [{dim}]), got {tuple(tokens.shape)}, {tuple(z_t.shape)}"
        )
    fields.update(
        clip_dim=dim, clip_tokens=k_tokens, text_dim=dim, text_emb_dim=dim, context_dim=cross,
        context_norm="text", null_caption_len=tokens.shape[0], low_res_cond=False,
    )  # fmt: skip
    try:
        config = UNetConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{DECODER}/config.json: {e}") from None
    with torch.device("meta"):
        skeleton = UNet(config)
    state = _unet_state(skeleton, unet_state, f"{DECODER}/", dtype)
    where = f"{TEXT_PROJ}/"
    for key, dkey in _text_proj_key_map():
        state[key] = _take(text_proj_state, dkey, where, dtype)
    for p in ("weight", "bias"):
        w = _take(text_proj_state, f"{_TOKENS}.{p}", where, dtype)
        state[f"clip_tokens_proj.{p}"] = _tokens_from_diffusers(w, k_tokens)
    extra = (
        set(text_proj_state)
        - {d for _, d in _text_proj_key_map()}
        - {f"{_TOKENS}.weight", f"{_TOKENS}.bias"}
    )
    if extra:
        raise ConfigError(f"{where}: unexpected weights ({len(extra)}, e.g. {sorted(extra)[0]!r})")
    like = state["input_conv.weight"]
    state["null_caption_tokens"] = tokens.to(like.dtype)
    state["null_text_emb"] = z_t.to(like.dtype)
    return _build(UNet, config, state, f"{DECODER}/")


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
    first = _upsampler_config(first_config, SUPER_RES_FIRST, low_res_size, None)
    last = _upsampler_config(last_config, SUPER_RES_LAST, low_res_size, first.image_size)
    if (last.image_size, last.in_channels) != (first.image_size, first.in_channels):
        raise ConfigError(
            f"{SUPER_RES_LAST}/config.json: sample_size and in_channels must be {SUPER_RES_FIRST}'s"
        )
    out = []
    for name, state, config in (
        (SUPER_RES_FIRST, first_state, first),
        (SUPER_RES_LAST, last_state, last),
    ):
        with torch.device("meta"):
            skeleton = Upsampler(config)
        where = f"{name}/"
        out.append(_build(Upsampler, config, _unet_state(skeleton, state, where, dtype), where))
    return out[0], out[1]  # type: ignore[return-value]


def _upsampler_config(
    config: Mapping[str, Any], name: str, low_res_size: int, size: int | None
) -> UpsamplerConfig:
    """The :class:`UpsamplerConfig` of a super-res ``UNet2DModel`` config (``size``: the
    sample size when the config has none)."""
    if config.get("sample_size") is None and size is not None:
        config = {**config, "sample_size": size}
    r = _Reader(config, _PLAIN_DEFAULTS, f"{name}/config.json")
    fields = _unet_fields(r, conditional=False)
    if r["in_channels"] % 2:
        raise r.error("in_channels", f"{r['in_channels']!r} must be twice the image channels")
    fields.update(_io_fields(r, r["in_channels"] // 2))
    fields.update(
        clip_dim=0, clip_tokens=0, text_dim=0, low_res_cond=True, low_res_size=low_res_size,
        low_res_mode="bicubic_antialias", augment="none",
    )  # fmt: skip
    try:
        return UpsamplerConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{name}/config.json: {e}") from None


def _levels_attending(cfg: UNetConfig) -> list[bool]:
    return [
        cfg.image_size // 2**lv in cfg.attention_resolutions for lv in range(len(cfg.channel_mult))
    ]


def _check_writable(cfg: UNetConfig, checks: Mapping[str, bool], what: str) -> None:
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    checks = {
        **checks,
        "mid_depth == 1": cfg.mid_depth == 1,
        "inpaint false": not cfg.inpaint,
        "norm_groups dividing every level width": all(w % cfg.norm_groups == 0 for w in widths),
        "conv_resample true": cfg.conv_resample,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise ConfigError(
            f"this {what} cannot be written as diffusers' unCLIP (it needs {', '.join(failed)})"
        )


def _common_config(cfg: UNetConfig) -> dict[str, Any]:
    return {
        "sample_size": cfg.image_size,
        "out_channels": cfg.output_channels,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "norm_num_groups": cfg.norm_groups,
        "dropout": cfg.dropout,
        **_FIXED,
        "downsample_padding": 1,
    }


def decoder_to_diffusers(model: UNet) -> dict[str, Component]:
    """``{"decoder": (config, state), "text_proj": (config, state)}``: diffusers'
    ``UNet2DConditionModel`` and ``UnCLIPTextProjModel`` computing what ``model`` does
    (``from_config(config)`` then ``load_state_dict(state)``). The null caption is not
    written: diffusers' pipeline encodes the empty caption itself. Only decoders of the
    Karlo layout can be written (those :func:`decoder_from_diffusers` returns, or trained
    with the same options); any other gives :class:`ConfigError` saying what it lacks."""
    cfg = model.config
    dim = cfg.clip_dim
    _check_writable(
        cfg,
        {
            "clip_dim > 0": dim > 0,
            "clip_tokens > 0": cfg.clip_tokens > 0,
            "text_dim == text_emb_dim == clip_dim": cfg.text_dim == cfg.text_emb_dim == dim,
            "context_norm 'text'": cfg.context_norm == "text",
            "null_caption_len > 0": cfg.null_caption_len > 0,
            "low_res_cond false": not cfg.low_res_cond,
            "attention_mid true": cfg.attention_mid,
            "resblock_updown true": cfg.resblock_updown,
            "num_head_channels > 0": cfg.num_head_channels > 0,
        },
        "decoder",
    )
    attends = _levels_attending(cfg)
    unet_config = {
        "_class_name": "UNet2DConditionModel",
        **_common_config(cfg),
        "in_channels": cfg.in_channels,
        "down_block_types": [
            "SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attends
        ],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": [
            "SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in attends[::-1]
        ],
        "cross_attention_dim": cfg.context_width,
        "attention_head_dim": cfg.num_head_channels,
        **{k: v for k, v in _COND_FIXED.items() if k not in _FIXED},
    }
    state = model.state_dict()
    text_proj_state = {d: state[u].clone() for u, d in _text_proj_key_map()}
    for p in ("weight", "bias"):
        w = state[f"clip_tokens_proj.{p}"]
        text_proj_state[f"{_TOKENS}.{p}"] = _tokens_to_diffusers(w, cfg.clip_tokens).clone()
    text_proj_config = {
        "_class_name": "UnCLIPTextProjModel",
        "clip_extra_context_tokens": cfg.clip_tokens,
        "clip_embeddings_dim": dim,
        "time_embed_dim": cfg.time_embed_dim,
        "cross_attention_dim": cfg.context_width,
    }
    return {
        DECODER: (unet_config, _unet_state_to_diffusers(model)),
        TEXT_PROJ: (text_proj_config, text_proj_state),
    }


def _upsampler_to_diffusers(model: Upsampler) -> Component:
    cfg = model.config
    _check_writable(
        cfg,
        {
            "no CLIP or caption conditioning": not (
                cfg.clip_dim or cfg.text_dim or cfg.text_emb_dim
            ),
            "low_res_mode 'bicubic_antialias'": cfg.low_res_mode == "bicubic_antialias",
            "augment 'none' (diffusers does not blur the low-res input)": cfg.augment == "none",
            "num_head_channels > 0 or num_heads == 1": cfg.num_head_channels > 0
            or cfg.num_heads == 1,
        },
        "upsampler",
    )
    attends = _levels_attending(cfg)
    plain = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    config = {
        "_class_name": "UNet2DModel",
        **_common_config(cfg),
        "in_channels": 2 * cfg.in_channels,
        "down_block_types": ["AttnDownBlock2D" if a else plain for a in attends],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in attends[::-1]],
        "downsample_type": "resnet" if cfg.resblock_updown else "conv",
        "upsample_type": "resnet" if cfg.resblock_updown else "conv",
        "add_attention": cfg.attention_mid,
        "attn_norm_num_groups": cfg.norm_groups if cfg.attention_mid else None,
        "attention_head_dim": cfg.num_head_channels or None,
        "class_embed_type": None,
    }
    return config, _unet_state_to_diffusers(model)


def upsampler_to_diffusers(first: Upsampler, last: Upsampler | None = None) -> dict[str, Component]:
    """``{"super_res_first": (config, state), "super_res_last": (config, state)}``: diffusers'
    ``UNet2DModel`` pair computing what ``first`` and ``last`` do (``last`` None: ``first``
    for every step, as unclip's own upsampler runs). Upsamplers diffusers cannot express
    exactly (a blurred or non-antialiased low-res input, conditioning) give
    :class:`ConfigError`."""
    return {
        SUPER_RES_FIRST: _upsampler_to_diffusers(first),
        SUPER_RES_LAST: _upsampler_to_diffusers(first if last is None else last),
    }
