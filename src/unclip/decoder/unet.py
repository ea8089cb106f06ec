"""The decoder UNet of DALL·E 2: the ADM/GLIDE UNet conditioned on a CLIP image embedding.

Architecture of Dhariwal & Nichol 2021 ("ADM": residual blocks with scale-shift group norm
from the timestep embedding, BigGAN-style resampling residual blocks, multi-head
self-attention at chosen resolutions) with the text conditioning of GLIDE (Nichol et al.
2021: attention layers also attend to projected context tokens, "encoder_kv").

DALL·E 2 conditioning (Ramesh et al. 2022, §2.1): the CLIP image embedding z_i is projected
and *added* to the timestep embedding, and projected into ``clip_tokens`` (4) extra context
tokens concatenated to the caption's token features. For classifier-free guidance the model
owns learned null conditions: in training it replaces z_i by a learned null embedding with
probability ``image_emb_drop_prob`` (10%) and the caption by a learned null token with
probability ``text_drop_prob`` (50%); at sampling, ``drop_image_emb`` / ``drop_text`` masks
force the null condition per row, so one batch can hold conditional and unconditional rows.

The same class serves the GLIDE inpainting variant (``inpaint=True``: the masked image and
the mask as 4 extra input channels; :func:`widen_to_inpainting` converts a trained decoder)
and the upsamplers (``low_res_cond=True``; see :mod:`unclip.decoder.upsampler`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import Config, ConfigError
from unclip.decoder.blocks import (
    AttentionBlock,
    Conv3x3,
    Downsample,
    ResBlock,
    UNetStage,
    Upsample,
)
from unclip.decoder.packed_conv import pack_convolutions, unpack_convolutions
from unclip.kept import kept, memoised
from unclip.nn import (
    TimestepEmbedder,
    apply_null,
    condition_drop_mask,
    normal_parameter,
    normalization,
    zero_module,
)


@dataclass
class UNetConfig(Config):
    """Size and conditioning of :class:`UNet`.

    Architecture: ``model_channels`` base width, multiplied per resolution level by
    ``channel_mult``; ``num_res_blocks`` residual blocks per level; self-attention at the
    resolutions (in pixels, relative to ``image_size``) listed in ``attention_resolutions``
    and, if ``attention_mid``, in the middle block, which is a residual block followed by
    ``mid_depth`` (attention, residual block) pairs; heads of ``num_head_channels`` channels
    each (or ``num_heads`` heads when ``num_head_channels`` is 0); ``resblock_updown`` uses
    BigGAN-style residual blocks to resample (else a strided conv / nearest+conv, or plain
    pooling / nearest when ``conv_resample`` is false); ``use_scale_shift_norm`` makes the
    timestep embedding a scale and shift of the group norm (else it is added).

    Inputs: ``in_channels`` of the noised image; ``inpaint`` adds ``in_channels + 1`` input
    channels (masked image and mask); ``low_res_cond`` adds ``in_channels`` (the low-resolution
    image resized to the output size with ``low_res_mode``). Output: ``out_channels``, doubled
    when ``learn_sigma`` (the learned-range variance of Improved DDPM).

    Conditioning: ``clip_dim`` width of z_i (0 = none), projected to ``clip_tokens`` context
    tokens; ``text_dim`` width of the CLIP text encoder's per-token features (0 = no caption).
    Context tokens have width ``context_dim`` (0: ``4 * model_channels``, that of the timestep
    embedding).

    Options for converted checkpoints (Karlo / diffusers' unCLIP decoder with its
    ``UnCLIPTextProjModel``; all off by default): ``text_emb_dim`` > 0 also projects the CLIP
    text embedding z_t and adds it to the timestep embedding with z_i's projection;
    ``context_norm`` ``"text"`` layer-normalises the caption tokens only (``"all"``: every
    context token, after concatenation); ``null_caption_len`` > 0 makes the null caption the
    text encoder's output for the empty caption (its first ``null_caption_len`` token features
    and its z_t, stored as buffers and projected like any caption) instead of a learned token;
    ``low_res_mode`` ``"bicubic_antialias"`` resizes the low-res input as diffusers' unCLIP
    pipeline does (``F.interpolate(..., antialias=True)``, a different bicubic kernel).
    """

    type_name = "decoder_unet"

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    attention_mid: bool = True
    mid_depth: int = 1
    num_heads: int = 4
    num_head_channels: int = 32
    dropout: float = 0.0
    resblock_updown: bool = True
    conv_resample: bool = True
    use_scale_shift_norm: bool = True
    norm_groups: int = 32
    learn_sigma: bool = False
    clip_dim: int = 512
    clip_tokens: int = 4
    text_dim: int = 512
    context_dim: int = 0
    text_emb_dim: int = 0
    context_norm: Literal["all", "text"] = "all"
    null_caption_len: int = 0
    image_emb_drop_prob: float = 0.1
    text_drop_prob: float = 0.5
    inpaint: bool = False
    low_res_cond: bool = False
    low_res_mode: Literal["bilinear", "bicubic", "bicubic_antialias"] = "bicubic"
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        for key in ("image_size", "in_channels", "out_channels", "model_channels", "norm_groups"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in (
            "num_res_blocks",
            "clip_dim",
            "clip_tokens",
            "text_dim",
            "num_head_channels",
            "context_dim",
            "text_emb_dim",
            "null_caption_len",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.context_norm == "text" and not self.text_dim:
            raise ConfigError("context_norm 'text' needs a caption (text_dim > 0)")
        if self.null_caption_len and not self.text_dim:
            raise ConfigError("null_caption_len > 0 needs a caption (text_dim > 0)")
        if self.mid_depth < 1:
            raise ConfigError(f"mid_depth must be at least 1, got {self.mid_depth}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult must be positive integers, got {self.channel_mult}")
        if self.num_head_channels == 0 and self.num_heads < 1:
            raise ConfigError("num_heads must be at least 1 when num_head_channels is 0")
        for key in ("image_emb_drop_prob", "text_drop_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            attends = self.image_size // 2**level in self.attention_resolutions or (
                self.attention_mid and level == last
            )
            ch = mult * self.model_channels
            if attends and self.num_head_channels and ch % self.num_head_channels:
                raise ConfigError(
                    f"level width {ch} is not divisible by num_head_channels={self.num_head_channels}"
                )

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding and of the context tokens."""
        return 4 * self.model_channels

    @property
    def context_width(self) -> int:
        """Width of the context tokens the attention layers read."""
        return self.context_dim or self.time_embed_dim

    @property
    def input_channels(self) -> int:
        """Channels entering the first conv: noised image, low-res image, masked image, mask."""
        c = self.in_channels
        if self.low_res_cond:
            c += self.in_channels
        if self.inpaint:
            c += self.in_channels + 1
        return c

    @property
    def output_channels(self) -> int:
        """``out_channels``, doubled with ``learn_sigma`` (mean/eps first, variance second)."""
        return self.out_channels * (2 if self.learn_sigma else 1)

    @property
    def has_context(self) -> bool:
        return (self.clip_dim > 0 and self.clip_tokens > 0) or self.text_dim > 0

    def heads_for(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels else self.num_heads


def embedding_or_null(
    value: torch.Tensor | None, null: torch.Tensor, drop: torch.Tensor | None, n: int, name: str
) -> torch.Tensor:
    """An embedding condition [n, D]: ``value`` with the rows where ``drop`` [n] is True
    replaced by the ``null`` embedding [D]; None: ``null`` for every row. ``name`` names the
    argument in the shape error."""
    if value is None:
        return null.expand(n, -1)
    if value.shape != (n, null.shape[-1]):
        raise ValueError(f"{name} must be [N, {null.shape[-1]}], got {tuple(value.shape)}")
    return apply_null(value, null, drop)


class UNet(nn.Module):
    """The DALL·E 2 decoder network (also the base of the inpainting decoder and upsamplers).

    Call as ``model(x, t, *, image_emb=None, text_tokens=None, text_mask=None, low_res=None,
    inpaint_image=None, inpaint_mask=None, drop_image_emb=None, drop_text=None,
    text_emb=None)``:

    - x: [N, in_channels, H, W] noised image; H, W divisible by 2^(len(channel_mult) - 1);
    - t: [N] long timestep indices (a scalar is broadcast);
    - image_emb: [N, clip_dim] CLIP image embedding z_i (unit norm, as CLIP returns it);
      None = the learned null embedding for every row (needs ``clip_dim > 0``);
    - text_tokens: [N, L, text_dim] CLIP text encoder per-token features; text_mask: [N, L]
      bool, True for real tokens (None: all real); text_tokens None = the null caption (the
      learned null token, or the stored empty caption with ``null_caption_len``);
    - text_emb: [N, text_emb_dim] CLIP text embedding z_t (``text_emb_dim`` models; None =
      the null caption's), dropped with the caption;
    - low_res: [N, in_channels, h, w] (``low_res_cond`` models, required): the lower-resolution
      image, resized to H×W with ``low_res_mode`` and concatenated to the input;
    - inpaint_image: [N, in_channels, H, W] and inpaint_mask: [N, 1, H, W] with 1 = known pixel
      (``inpaint`` models): the model sees ``inpaint_image * inpaint_mask`` and the mask;
      None = nothing known (zeros), i.e. plain generation;
    - drop_image_emb, drop_text: [N] bool, rows forced to the null condition (in training
      mode rows are also dropped at random with the config's probabilities).

    Returns [N, output_channels, H, W] (``2 * out_channels`` with ``learn_sigma``: the model
    mean/eps prediction first, the variance interpolation values second).
    """

    config_class: type[UNetConfig] = UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.config = config
        cfg = config
        mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
        self.time_embed = TimestepEmbedder(mc, ted)

        cw = cfg.context_width
        if cfg.clip_dim:
            self.null_image_emb = normal_parameter(cfg.clip_dim, std=1 / math.sqrt(cfg.clip_dim))
            self.clip_emb_proj = nn.Linear(cfg.clip_dim, ted)
            self.clip_tokens_proj = (
                nn.Linear(cfg.clip_dim, cfg.clip_tokens * cw) if cfg.clip_tokens else None
            )
        if cfg.text_dim:
            self.text_proj = nn.Linear(cfg.text_dim, cw)
            if cfg.null_caption_len:  # the empty caption's encoding, set by a converter
                self.register_buffer(
                    "null_caption_tokens", torch.zeros(cfg.null_caption_len, cfg.text_dim)
                )
            else:
                self.null_text_token = normal_parameter(cw, std=0.02)
        if cfg.text_emb_dim:
            self.text_emb_proj = nn.Linear(cfg.text_emb_dim, ted)
            if cfg.null_caption_len:
                self.register_buffer("null_text_emb", torch.zeros(cfg.text_emb_dim))
            else:
                d = cfg.text_emb_dim
                self.null_text_emb = normal_parameter(d, std=1 / math.sqrt(d))
        self.context_norm = nn.LayerNorm(cw) if cfg.has_context else None
        context_dim = cw if cfg.has_context else None

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in,
                ted,
                ch_out,
                dropout=cfg.dropout,
                use_scale_shift_norm=cfg.use_scale_shift_norm,
                groups=groups,
                **kw,
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.heads_for(ch), context_dim, groups)

        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions if r > 0}
        ch = mc * cfg.channel_mult[0]
        self.input_conv = Conv3x3(cfg.input_channels, ch)
        self.down = nn.ModuleList()
        skips = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.down.append(UNetStage(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                if cfg.resblock_updown:
                    sampler: nn.Module = res(ch, ch, down=True)
                else:
                    sampler = Downsample(ch, cfg.conv_resample)
                self.down.append(UNetStage([sampler]))
                skips.append(ch)
                ds *= 2

        # Pairs past the first append new keys (mid.3, mid.4, ...) and start as the identity
        # (zero output convs and projections): a decoder grown from a trained one with a
        # larger mid_depth computes the same function until it trains (DecoderRunConfig.init).
        mid: list[nn.Module] = [res(ch, ch)]
        for _ in range(cfg.mid_depth):
            if cfg.attention_mid:
                mid.append(attn(ch))
            mid.append(res(ch, ch))
        self.mid = UNetStage(mid)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * mc)]
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    if cfg.resblock_updown:
                        layers.append(res(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.up.append(UNetStage(layers))

        self.out_norm = normalization(ch, groups)
        self.out_conv = zero_module(Conv3x3(ch, cfg.output_channels))
        # the ResBlocks in execution order (a plain list: they are registered in the stages)
        self._res_blocks = [
            layer
            for stage in (*self.down, self.mid, *self.up)
            for layer in stage
            if isinstance(layer, ResBlock)
        ]
        self._stacked_emb_proj: tuple[torch.Tensor, torch.Tensor] | None = None
        self._step_memo: dict | None = None  # a sampling run's step-free conditioning
        self._frozen_users = 0  # frozen_weights contexts open (nested or in other threads)
        self._packed: list[nn.Module] = []  # the convolutions frozen_weights packed

    def null_parameters(self) -> list[nn.Parameter]:
        """The learned null-condition parameters (trained only on dropped rows)."""
        cfg, out = self.config, []
        if cfg.clip_dim:
            out.append(self.null_image_emb)
        if cfg.text_dim and not cfg.null_caption_len:
            out.append(self.null_text_token)
        if cfg.text_emb_dim and not cfg.null_caption_len:
            out.append(self.null_text_emb)
        return out

    @contextmanager
    def frozen_weights(self) -> Iterator[UNet]:
        """Within this context the weights are taken as fixed (a sampling run): what is
        derived from them alone is built once (the ResBlocks' embedding projections stacked
        into one matrix, detached, at entry; on the CPU the convolution weights in oneDNN's
        layout, at their first call: :mod:`unclip.decoder.packed_conv`). The stacked
        projections and Winograd's kernels are kept for the next run while the weights are
        unchanged (:mod:`unclip.kept`). In eval mode without autograd, what the conditioning
        gives independently of the timestep (the z_i and z_t projections, the context tokens
        and each attention block's keys and values of them) is made once per set of
        conditioning tensors and thread. Do not change or train the weights inside. Nested
        use, and use by several threads at once (a server's workers sharing a pipeline),
        share one context: it is set up by the first to enter and undone by the last to
        leave, so every run inside computes alike."""
        with _FROZEN_LOCK:
            if self._frozen_users == 0:
                self._freeze()
            self._frozen_users += 1
        try:
            yield self
        finally:
            with _FROZEN_LOCK:
                self._frozen_users -= 1
                if self._frozen_users == 0:
                    self._thaw()

    def _freeze(self) -> None:
        """Set up :meth:`frozen_weights`."""
        projs = [b.emb_proj for b in self._res_blocks]
        weights = [t for p in projs for t in (p.weight, p.bias)]
        self._stacked_emb_proj = kept(self, "stacked_emb_proj", weights, lambda: _stacked(projs))
        self._step_memo = {}
        for block in self.modules():
            if isinstance(block, AttentionBlock):
                block.context_memo = {}
        self._packed = pack_convolutions(self)

    def _thaw(self) -> None:
        """Undo :meth:`_freeze`."""
        unpack_convolutions(self._packed)
        self._stacked_emb_proj = self._step_memo = None
        self._packed = []
        for block in self.modules():
            if isinstance(block, AttentionBlock):
                block.context_memo = None

    def block_embeddings(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """emb [N, E] -> each ResBlock's ``emb_out`` [N, E'_k] in execution order,
        ``block.project(emb)``. Inside :meth:`frozen_weights`, one matmul with the
        stacked weights (the same numbers: a one-image emoji-small decoder call spends 110
        instead of 330 µs on them, 2 CPU cores); outside, one per block (stacking the weights
        at every call would cost more than it saves)."""
        if self._stacked_emb_proj is None:
            return [block.project(emb) for block in self._res_blocks]
        weight_t, bias = self._stacked_emb_proj  # x @ Wᵀ with Wᵀ stored row-major: the
        with torch.autocast(emb.device.type, enabled=False):  # fastest GEMM for N rows
            out = torch.addmm(bias, F.silu(emb), weight_t)  # [N, ΣE']
        return list(out.split([b.emb_proj.out_features for b in self._res_blocks], dim=1))

    def condition(
        self,
        n: int,
        t: torch.Tensor,
        image_emb: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_image_emb: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(emb [N, E], context [N, Lc, C] or None, context_mask [N, Lc] or None), E =
        4·model_channels, C = ``config.context_width``.

        Lc = clip_tokens + L (L = 1 for the learned null caption token alone,
        ``null_caption_len`` for the stored empty caption). Arguments as in the class docstring.
        """
        # The [N, E] embedding path (timestep MLP, z_i and z_t projections, each ResBlock's
        # scale and shift) runs in float32 with autocast off: the conditioning keeps full
        # precision at no cost (matmuls of N rows; measured on 2 CPU cores: sampling the
        # same, a decoder training step 4% faster than with these in bf16).
        with torch.autocast(t.device.type, enabled=False):
            emb = self.time_embed(t)  # [N, E]
        cond = {
            "image_emb": image_emb, "text_tokens": text_tokens, "text_mask": text_mask,
            "drop_image_emb": drop_image_emb, "drop_text": drop_text, "text_emb": text_emb,
        }  # fmt: skip
        added, context, context_mask = self._step_free_condition(n, t.device, cond)
        if added is not None:  # t + (z_i + z_t), the order of diffusers' unCLIP
            with torch.autocast(t.device.type, enabled=False):
                emb = emb + added  # [N, E]
        return emb, context, context_mask

    def _step_free_condition(
        self, n: int, device: torch.device, cond: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The part of :meth:`condition` that does not depend on the timestep: (the z_i and
        z_t projections summed [N, E] or None, context, context_mask). Within
        :meth:`frozen_weights` in eval mode it is made once per set of conditioning tensors
        (the same objects, unchanged: a sampler passes them at every step) and reused."""
        return memoised(
            self._step_memo, self, list(cond.values()), device,
            lambda: self._condition_parts(n, device, **cond), extra=(n,),
        )  # fmt: skip

    def _condition_parts(
        self,
        n: int,
        device: torch.device,
        image_emb: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_image_emb: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """See :meth:`_step_free_condition`."""
        cfg = self.config
        added: list[torch.Tensor] = []  # projections of z_i, z_t added to emb
        tokens: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []

        if cfg.clip_dim:
            drop = condition_drop_mask(
                n, cfg.image_emb_drop_prob, drop_image_emb, training=self.training, device=device
            )
            z = embedding_or_null(image_emb, self.null_image_emb, drop, n, "image_emb")  # [N, D]
            with torch.autocast(device.type, enabled=False):
                added.append(self.clip_emb_proj(z.to(self.clip_emb_proj.weight.dtype)))
            if self.clip_tokens_proj is not None:
                ct = self.clip_tokens_proj(z).reshape(n, cfg.clip_tokens, -1)  # [N, K, C]
                tokens.append(ct)
                masks.append(None)
        elif image_emb is not None:
            raise ValueError("image_emb given but this model has clip_dim=0")
        if text_tokens is not None and not cfg.text_dim:
            raise ValueError("text_tokens given but this model has text_dim=0")
        if text_emb is not None and not cfg.text_emb_dim:
            raise ValueError("text_emb given but this model has text_emb_dim=0")

        # one drop mask for the caption's tokens and its z_t
        drop = None
        if text_tokens is not None or text_emb is not None:
            drop = condition_drop_mask(
                n, cfg.text_drop_prob, drop_text, training=self.training, device=device
            )
        if cfg.text_emb_dim:
            zt = embedding_or_null(text_emb, self.null_text_emb, drop, n, "text_emb")  # [N, D_t]
            with torch.autocast(device.type, enabled=False):
                added.append(self.text_emb_proj(zt.to(self.text_emb_proj.weight.dtype)))
        if cfg.text_dim:
            tt, keep = self._caption(n, text_tokens, text_mask, drop)  # [N, L, C], [N, L]
            if cfg.context_norm == "text":
                tt = self.context_norm(tt)
            tokens.append(tt)
            masks.append(keep)
        summed = None
        if added:
            with torch.autocast(device.type, enabled=False):
                summed = added[0] if len(added) == 1 else added[0] + added[1]  # [N, E]
        if not tokens:
            return summed, None, None
        dtype = tokens[0].dtype
        context = torch.cat([x.to(dtype) for x in tokens], dim=1)  # [N, Lc, C]
        if cfg.context_norm == "all":
            context = self.context_norm(context)
        context_mask = None
        if any(m is not None for m in masks):
            context_mask = torch.cat(
                [
                    m
                    if m is not None
                    else torch.ones(n, x.shape[1], dtype=torch.bool, device=device)
                    for m, x in zip(masks, tokens, strict=True)
                ],
                dim=1,
            )  # [N, Lc]
        return summed, context, context_mask

    def _caption(
        self,
        n: int,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        drop: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The caption's projected tokens [N, L, C] and mask [N, L] (None: all real), rows
        where ``drop`` [N] is True replaced by the null caption: the learned null token, or
        with ``null_caption_len`` = k the stored empty caption's k token features (projected
        like any caption), then masked-out positions."""
        cfg = self.config
        k = cfg.null_caption_len
        if text_tokens is None:
            if k:
                return self.text_proj(self.null_caption_tokens.expand(n, -1, -1)), None
            return self.null_text_token.expand(n, 1, -1), None  # [N, 1, C]
        if text_tokens.ndim != 3 or text_tokens.shape[0] != n:
            raise ValueError(
                f"text_tokens must be [N, L, text_dim], got {tuple(text_tokens.shape)}"
            )
        assert drop is not None
        length = text_tokens.shape[1]
        keep = text_mask.bool() if text_mask is not None else None
        # with a mask, no data-dependent branch (torch.compile traces one graph):
        # undropped rows pass through torch.where unchanged
        if keep is None and not drop.any():
            return self.text_proj(text_tokens), None
        if k > length:
            raise ValueError(f"a caption of {length} tokens is shorter than the null caption ({k})")
        device = text_tokens.device
        first = torch.arange(length, device=device) < max(k, 1)  # [L]: the null caption's
        if k:
            pad = self.null_caption_tokens.new_zeros(length - k, cfg.text_dim)
            null_row = torch.cat([self.null_caption_tokens, pad])  # [L, text_dim]
            tt = self.text_proj(apply_null(text_tokens, null_row, drop))  # [N, L, C]
        else:
            tt = self.text_proj(text_tokens)  # [N, L, C]
            null_row = torch.where(
                first[:, None], self.null_text_token.to(tt.dtype), tt.new_zeros(())
            )  # [L, C]
            tt = apply_null(tt, null_row, drop)
        if keep is None:
            keep = torch.ones(n, length, dtype=torch.bool, device=device)
        return tt, torch.where(drop[:, None], first[None], keep)  # [N, L]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        low_res: torch.Tensor | None = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
        **cond: torch.Tensor | None,
    ) -> torch.Tensor:
        """See the class docstring; ``cond``: the keywords of :meth:`condition` (image_emb,
        text_tokens, text_mask, text_emb, drop_image_emb, drop_text)."""
        cfg = self.config
        n, c, height, width = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x must have {cfg.in_channels} channels, got {c}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}×{width} is not divisible by {factor}")
        t = t.reshape(1).expand(n) if t.ndim == 0 else t
        emb, context, context_mask = self.condition(n, t, **cond)

        inputs = [x]
        if cfg.low_res_cond:
            if low_res is None:
                raise ValueError(
                    "this model is conditioned on a low-resolution image: pass low_res"
                )
            aa = cfg.low_res_mode == "bicubic_antialias"
            up = F.interpolate(
                low_res.to(x.dtype),
                size=(height, width),
                mode="bicubic" if aa else cfg.low_res_mode,
                align_corners=False,
                antialias=aa,
            )  # [N, C, H, W]
            inputs.append(up)
        elif low_res is not None:
            raise ValueError("low_res given but this model has low_res_cond=false")
        if cfg.inpaint:
            if inpaint_mask is None:
                inpaint_mask = x.new_zeros(n, 1, height, width)
            if inpaint_image is None:
                inpaint_image = torch.zeros_like(x)
            mask = inpaint_mask.to(x.dtype)
            inputs += [inpaint_image.to(x.dtype) * mask, mask]
        elif inpaint_image is not None or inpaint_mask is not None:
            raise ValueError("inpaint inputs given but this model has inpaint=false")
        h = torch.cat(inputs, dim=1) if len(inputs) > 1 else x  # [N, input_channels, H, W]

        ckpt = cfg.use_checkpoint and self.training
        emb_outs = iter(self.block_embeddings(emb))
        h = self.input_conv(h)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb_outs, context, context_mask, ckpt)
            hs.append(h)
        h = self.mid(h, emb_outs, context, context_mask, ckpt)
        for stage in self.up:
            h = torch.cat([h, hs.pop().to(h.dtype)], dim=1)  # [N, ch + skip_ch, H', W']
            h = stage(h, emb_outs, context, context_mask, ckpt)
        return self.out_conv(self.out_norm.silu(h))


#: guards the count of open frozen_weights contexts of every UNet
_FROZEN_LOCK = threading.Lock()


def _stacked(projs: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections' weights stacked, transposed and detached: (Wᵀ [E, ΣE'], bias [ΣE'])."""
    with torch.no_grad():
        weight_t = torch.cat([p.weight for p in projs]).t().contiguous()
        return weight_t, torch.cat([p.bias for p in projs])


def widen_to_inpainting(model: UNet) -> UNet:
    """A copy of a trained decoder with ``inpaint=True``: its first conv gains the
    ``in_channels + 1`` inputs (masked image, mask) with zero weights, so the new model
    initially computes exactly what ``model`` does (GLIDE's inpainting fine-tuning start).
    Device, dtype and train/eval mode follow ``model``."""
    if model.config.inpaint:
        raise ValueError("the model already takes inpainting inputs")
    new = type(model)(model.config.replace(inpaint=True))
    state = model.state_dict()
    w = state["input_conv.weight"]  # [C0, C_in_old, 3, 3]
    extra = w.new_zeros(w.shape[0], model.config.in_channels + 1, *w.shape[2:])
    state["input_conv.weight"] = torch.cat([w, extra], dim=1)  # [C0, C_in_old + C + 1, 3, 3]
    new.to(device=w.device, dtype=w.dtype)
    new.load_state_dict(state)
    return new.train(model.training)
