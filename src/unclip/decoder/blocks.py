"""Building blocks of the ADM/GLIDE UNet (:mod:`unclip.decoder.unet`).

Resampling layers, the ADM residual block with scale-shift group norm (Dhariwal & Nichol
2021), spatial self-attention that also attends to context tokens (GLIDE's encoder_kv), and
the stage container that runs them in order. Module names inside each block are part of the
checkpoint keys: keep them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unclip.decoder import winograd
from unclip.decoder.upsample_conv import upsample_conv3x3
from unclip.kept import memoised
from unclip.nn import Attention, maybe_checkpoint, normalization, zero_module


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, padding=1)`` (the same parameters and
    state-dict keys) that can also convolve its input upsampled ×2 (nearest) without making
    it: :meth:`upsampled`, one 2×2 phase convolution at the low resolution
    (:mod:`unclip.decoder.upsample_conv`). Within a sampling run
    :mod:`unclip.decoder.packed_conv` runs both with weights prepared once."""

    packable = True  # packed_convolutions may replace forward (and so upsampled)

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C', H, W]; as Winograd where :func:`winograd.trains`."""
        if winograd.trains(x, self):
            return winograd.winograd_conv_autograd(x, self.weight, self.bias)
        return super().forward(x)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W], residual [N, C', H, W] -> ``residual + self(x)``; within a sampling
        run one Winograd pass that adds ``residual`` as it writes, where it applies."""
        packed = getattr(self.__dict__.get("forward"), "plus", None)
        if packed is not None:
            return packed(x, residual)
        return residual + self(x)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> this conv of x upsampled ×2 (nearest), [N, C', 2H, 2W]."""
        packed = getattr(self.__dict__.get("forward"), "upsampled", None)
        if packed is not None:
            return packed(x)
        return upsample_conv3x3(x, self.weight, self.bias)


class Downsample(nn.Module):
    """[N, C, H, W] -> [N, out, H/2, W/2]: a stride-2 3×3 conv, or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels == channels:
            self.op = nn.AvgPool2d(2)
        else:
            raise ValueError("pooling cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """[N, C, H, W] -> [N, out, 2H, 2W]: nearest-neighbour ×2, then optionally a 3×3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("upsampling without a conv cannot change the channel count")
        self.conv = Conv3x3(channels, out_channels) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.conv.upsampled(x)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class ResBlock(nn.Module):
    """ADM residual block. x: [N, C, H, W], emb_out: [N, E'] -> [N, out, H', W'].

    ``emb_out`` is the block's projection of the timestep embedding emb [N, E],
    ``emb_proj(silu(emb))`` (:meth:`project`; E' = 2·out with scale-shift norm, else out). The
    UNet computes the projections of all its blocks as one matmul
    (:meth:`unclip.decoder.unet.UNet.block_embeddings`), since each is only N rows.
    ``up``/``down`` resample inside the block (BigGAN, Brock et al. 2019): H' = 2H or H/2. With
    ``use_scale_shift_norm`` the embedding gives (scale, shift) applied after the second group
    norm, ``norm(h) * (1 + scale) + shift``; otherwise it is added before it. The last conv
    starts at zero, so a new block is the identity (on its skip path).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels, groups)
        self.in_conv = Conv3x3(channels, out_channels)
        self.up, self.updown = up, up or down
        # h is resampled before in_conv; upsampling happens inside it (in_conv.upsampled)
        self.h_upd: nn.Module = Downsample(channels, False) if down else nn.Identity()
        if up:
            self.x_upd: nn.Module = Upsample(channels, False)
        else:
            self.x_upd = self.h_upd
        self.emb_proj = nn.Linear(
            emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels
        )
        self.out_norm = normalization(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(Conv3x3(out_channels, out_channels))
        self.skip = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """emb [N, E] -> this block's ``emb_out`` [N, E'], with autocast off (float32 in a
        float32 model: see UNet.condition)."""
        with torch.autocast(emb.device.type, enabled=False):
            return self.emb_proj(F.silu(emb))

    def forward(self, x: torch.Tensor, emb_out: torch.Tensor) -> torch.Tensor:
        h = self.in_norm.silu(x)
        h = self.in_conv.upsampled(h) if self.up else self.in_conv(self.h_upd(h))
        x = self.x_upd(x)
        e = emb_out[:, :, None, None]  # [N, E', 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm.silu(h, scale, shift)
        else:
            h = self.out_norm.silu(h + e.to(h.dtype))
        return self.out_conv.plus(self.dropout(h), self.skip(x))


class AttentionBlock(nn.Module):
    """Spatial self-attention that also attends to context tokens (GLIDE's encoder_kv).

    x: [N, C, H, W]; context: [N, Lc, context_dim]; context_mask: [N, Lc] bool (True = real
    token). Returns x + attention output, [N, C, H, W]. The output projection starts at zero.
    """

    def __init__(
        self, channels: int, num_heads: int, context_dim: int | None = None, groups: int = 32
    ) -> None:
        super().__init__()
        self.norm = normalization(channels, groups)
        self.attn = Attention(channels, num_heads, context_dim=context_dim)
        zero_module(self.attn.proj)
        #: set to a dict by UNet.frozen_weights: the keys, values and mask of the last context
        self.context_memo: dict | None = None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]
        past, mask = self._context(context, context_mask, n, h * w)
        out = self.attn(seq, mask=mask, past=past)  # [N, HW, C]
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # [N, C, H, W]

    def _context(
        self, context: torch.Tensor | None, context_mask: torch.Tensor | None, n: int, hw: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """(the context's keys and values, 2 × [N, Lc, C], or None; the key mask [N, Lc + HW]
        or None). With :attr:`context_memo` set (a sampling run), in eval mode without
        autograd, reused while the same context and mask come back unchanged to the same
        thread (the UNet passes the same objects at every step of a run:
        :func:`unclip.kept.memoised`)."""
        device = "cpu" if context is None else context.device
        return memoised(
            self.context_memo, self, [context, context_mask], device,
            lambda: self._context_keys(context, context_mask, n, hw), extra=(n, hw),
        )  # fmt: skip

    def _context_keys(
        self, context: torch.Tensor | None, context_mask: torch.Tensor | None, n: int, hw: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """:meth:`_context`, made afresh."""
        past = mask = None
        if context is not None:
            past = self.attn.context_keys_values(context)  # 2 × [N, Lc, C], before the HW keys
            if context_mask is not None:  # [N, Lc + HW]: the image's own keys are all real
                own = context_mask.new_ones(n, hw, dtype=torch.bool)
                mask = torch.cat([context_mask.bool(), own], dim=1)
        return past, mask


class UNetStage(nn.ModuleList):
    """A sequence of ResBlock / AttentionBlock / resampling layers applied in order; each
    ResBlock takes the next of ``emb_outs`` (its embedding projection, in execution order)."""

    def forward(  # type: ignore[override]
        self,
        h: torch.Tensor,
        emb_outs: Iterator[torch.Tensor],
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        use_checkpoint: bool = False,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = maybe_checkpoint(layer, h, next(emb_outs), enabled=use_checkpoint)
            elif isinstance(layer, AttentionBlock):
                h = maybe_checkpoint(layer, h, context, context_mask, enabled=use_checkpoint)
            else:
                h = layer(h)
        return h
