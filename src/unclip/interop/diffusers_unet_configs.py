"""Configs of diffusers' unCLIP UNets (Karlo) <-> unclip's :class:`UNetConfig` s.

Reads the ``config.json`` of ``decoder/`` (``UNet2DConditionModel``), ``text_proj/``
(``UnCLIPTextProjModel``) and ``super_res_first/``, ``super_res_last/`` (``UNet2DModel``)
as dicts, with diffusers' defaults for missing keys, and writes them back. Every option that
changes what the network computes is either mapped exactly onto a :class:`UNetConfig` field
or refused with a :class:`ConfigError` naming the file and field ("decoder/config.json:
down_block_types 'CrossAttnDownBlock2D' is not supported (supported: ...)"). The weights:
:mod:`unclip.interop.diffusers_unets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unclip.config import ConfigError
from unclip.decoder.unet import UNetConfig
from unclip.decoder.upsampler import UpsamplerConfig

#: the diffusers folders (components) these converters read and write
DECODER, TEXT_PROJ = "decoder", "text_proj"
SUPER_RES_FIRST, SUPER_RES_LAST = "super_res_first", "super_res_last"

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
COND_FIXED: dict[str, Any] = {
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
PLAIN_FIXED: dict[str, Any] = {**_FIXED, "class_embed_type": None}
_TEXT_PROJ_DEFAULTS = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768}
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
    r.require_defaults(COND_FIXED if conditional else PLAIN_FIXED)
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
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise r.error("block_out_channels", f"{channels!r} must be positive integers")
    mc = channels[0]
    if any(c % mc for c in channels):
        raise r.error("block_out_channels", f"{channels}: each must be a multiple of the first")
    groups = r["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
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


def decoder_config_from_diffusers(
    unet_config: Mapping[str, Any], text_proj_config: Mapping[str, Any], null_caption_len: int
) -> UNetConfig:
    """The decoder's :class:`UNetConfig` of diffusers' decoder and text-projection configs;
    ``null_caption_len``: the real tokens of the empty caption (its null caption)."""
    r = _Reader(unet_config, _COND_DEFAULTS, f"{DECODER}/config.json")
    fields = _unet_fields(r, conditional=True)
    fields.update(_io_fields(r, r["in_channels"]))
    cross = r.uniform("cross_attention_dim", len(r["block_out_channels"]))
    tp = _Reader(text_proj_config, _TEXT_PROJ_DEFAULTS, f"{TEXT_PROJ}/config.json")
    ted = 4 * fields["model_channels"]
    if tp["time_embed_dim"] != ted:
        raise tp.error("time_embed_dim", f"{tp['time_embed_dim']!r} must be the decoder's ({ted})")
    if tp["cross_attention_dim"] != cross:
        raise tp.error(
            "cross_attention_dim", f"{tp['cross_attention_dim']!r} must be the decoder's ({cross})"
        )
    dim = tp["clip_embeddings_dim"]
    fields.update(
        clip_dim=dim, clip_tokens=tp["clip_extra_context_tokens"], text_dim=dim,
        text_emb_dim=dim, context_dim=cross, context_norm="text",
        null_caption_len=null_caption_len, low_res_cond=False,
    )  # fmt: skip
    try:
        return UNetConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{DECODER}/config.json: {e}") from None


def upsampler_configs_from_diffusers(
    first_config: Mapping[str, Any], last_config: Mapping[str, Any], low_res_size: int
) -> tuple[UpsamplerConfig, UpsamplerConfig]:
    """The :class:`UpsamplerConfig` s of the super-res pair (``super_res_last`` without a
    ``sample_size`` takes the first's); ``low_res_size``: the decoder's image side."""
    first = _upsampler_config(first_config, SUPER_RES_FIRST, low_res_size, None)
    last = _upsampler_config(last_config, SUPER_RES_LAST, low_res_size, first.image_size)
    if (last.image_size, last.in_channels) != (first.image_size, first.in_channels):
        raise ConfigError(
            f"{SUPER_RES_LAST}/config.json: sample_size and in_channels must be {SUPER_RES_FIRST}'s"
        )
    return first, last


def _upsampler_config(
    config: Mapping[str, Any], name: str, low_res_size: int, size: int | None
) -> UpsamplerConfig:
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


def decoder_config_to_diffusers(cfg: UNetConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``decoder/config.json``, ``text_proj/config.json``) as dicts for a decoder of the Karlo
    layout; any other gives :class:`ConfigError` saying what it lacks."""
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
    unet = {
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
        **{k: v for k, v in COND_FIXED.items() if k not in _FIXED},
    }
    text_proj = {
        "_class_name": "UnCLIPTextProjModel",
        "clip_extra_context_tokens": cfg.clip_tokens,
        "clip_embeddings_dim": dim,
        "time_embed_dim": cfg.time_embed_dim,
        "cross_attention_dim": cfg.context_width,
    }
    return unet, text_proj


def upsampler_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """A super-res ``config.json`` as a dict for an upsampler diffusers can express exactly;
    any other gives :class:`ConfigError` saying what it lacks."""
    conditioned = bool(cfg.clip_dim or cfg.text_dim or cfg.text_emb_dim)
    blurred = getattr(cfg, "augment", "none") != "none"  # unclip blurs the input as trained
    _check_writable(
        cfg,
        {
            "no CLIP or caption conditioning": not conditioned,
            "low_res_cond true": cfg.low_res_cond,
            "low_res_mode 'bicubic_antialias'": cfg.low_res_mode == "bicubic_antialias",
            "augment 'none' (diffusers does not blur the low-res input)": not blurred,
            "num_head_channels > 0 or num_heads == 1": bool(cfg.num_head_channels)
            or cfg.num_heads == 1,
        },
        "upsampler",
    )
    attends = _levels_attending(cfg)
    plain = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    # read by AttnDown/UpBlock2D only; without them diffusers' default (Karlo's configs)
    resample = "resnet" if cfg.resblock_updown and any(attends) else "conv"
    return {
        "_class_name": "UNet2DModel",
        **_common_config(cfg),
        "in_channels": 2 * cfg.in_channels,
        "down_block_types": ["AttnDownBlock2D" if a else plain for a in attends],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in attends[::-1]],
        "downsample_type": resample,
        "upsample_type": resample,
        "add_attention": cfg.attention_mid,
        # explicit: with scale-shift, None would drop the mid attention's group norm
        "attn_norm_num_groups": cfg.norm_groups if cfg.attention_mid else None,
        "attention_head_dim": cfg.num_head_channels or None,
        "class_embed_type": None,
    }
