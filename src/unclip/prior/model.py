"""The diffusion prior network of DALL·E 2 (Ramesh et al. 2022, §2.2).

A decoder-only Transformer with a causal attention mask over the sequence

    [caption tokens (CLIP text encoder per-token features, projected), z_t, timestep, noised z_i, query]

whose output at the final (learned query) token predicts the *unnoised* image embedding z_i
directly (the x₀ parameterisation, trained with MSE). The network never sees the diffusion
schedule: the diffusion code calls it as ``model(x, t, **cond)``.

Embedding scale: CLIP embeddings are unit vectors, so their coordinates have variance
about ``1/D``, far below the unit-variance Gaussian the diffusion process noises them
towards. The prior therefore works on embeddings rescaled to norm ``image_embed_scale``
(default ``sqrt(D)``, the convention of the public DALLE2-pytorch prior), i.e. unit
variance per coordinate: train on ``scale_embedding(z_i, s)`` and map a sample back with
``unscale_embedding(x, s)``. The text embedding condition is rescaled the same way inside
:meth:`DiffusionPriorTransformer.forward`, so callers pass CLIP's unit-norm ``z_t``.

A prior converted from Karlo (diffusers' ``PriorTransformer``) works on CLIP's *raw*
embeddings instead (``embeddings="raw"``): z_t is fed as the text encoder's projection gives
it, and the diffusion runs on z_i standardised per coordinate with the training set's
``clip_mean``/``clip_std``, whose sample is a raw (not unit) z_i
(:meth:`DiffusionPriorTransformer.from_latent` maps it back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import Config, ConfigError
from unclip.nn import (
    Attention,
    TimestepEmbedder,
    apply_null,
    condition_drop_mask,
    maybe_checkpoint,
    normal_parameter,
)

#: tokens after the caption: z_t, timestep, noised z_i, query
NUM_EXTRA_TOKENS = 4


def check_prior_transformer(config: Any, positive: tuple[str, ...] = ()) -> None:
    """The checks every prior Transformer config shares (this one's and the AR prior's):
    sizes at least 1, ``text_dim`` >= 0, heads dividing the width, probabilities in range."""
    for key in ("clip_dim", "text_len", "width", "layers", "heads", *positive):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.text_dim < 0:
        raise ConfigError(f"text_dim must be >= 0 (0 = no caption tokens), got {config.text_dim}")
    if config.width % config.heads:
        raise ConfigError(f"width ({config.width}) must be divisible by heads ({config.heads})")
    if not 0.0 <= config.text_drop_prob <= 1.0:
        raise ConfigError(f"text_drop_prob must be in [0, 1], got {config.text_drop_prob}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")


class CaptionConfig(Protocol):
    """What :class:`CaptionPrior` reads of its subclass's config (:class:`PriorConfig` or
    :class:`~unclip.prior.ar.ARPriorConfig`): the longest caption and the training
    probability of the null caption."""

    text_len: int
    text_drop_prob: float


@dataclass
class PriorConfig(Config):
    """Size and conditioning of :class:`DiffusionPriorTransformer`.

    ``clip_dim``: CLIP joint embedding width D (z_t and z_i). ``text_dim``: width of the CLIP
    text encoder's per-token features (0 = condition on z_t only). ``text_len``: the longest
    caption in tokens. ``text_drop_prob``: training probability of replacing the caption
    (z_t and tokens) by the learned null condition (DALL·E 2 uses 10%).
    ``image_embed_scale``: the norm embeddings are scaled to (None = ``sqrt(clip_dim)``).
    ``use_checkpoint``: recompute each block's activations in the backward pass.

    Off by default (a prior converted from Karlo turns them on): ``embeddings="raw"`` takes
    z_t as given and diffuses z_i standardised by the learned ``clip_mean``/``clip_std``
    (see the module docstring) instead of unit embeddings scaled to ``image_embed_scale``;
    ``null_text_tokens`` > 1 gives the null caption that many learned tokens (Karlo's null
    caption is the empty caption, whose start and end tokens are two).
    """

    type_name = "diffusion_prior"

    clip_dim: int = 512
    text_dim: int = 512
    text_len: int = 77
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_drop_prob: float = 0.1
    image_embed_scale: float | None = None
    use_checkpoint: bool = False
    embeddings: Literal["unit", "raw"] = "unit"
    null_text_tokens: int = 1

    def __post_init__(self) -> None:
        check_prior_transformer(self)
        if self.image_embed_scale is not None and self.image_embed_scale <= 0:
            raise ConfigError(f"image_embed_scale must be positive, got {self.image_embed_scale}")
        if self.embeddings not in ("unit", "raw"):
            raise ConfigError(f"embeddings must be 'unit' or 'raw', got {self.embeddings!r}")
        if not 1 <= self.null_text_tokens <= self.text_len:
            raise ConfigError(
                f"null_text_tokens must be in 1..text_len={self.text_len}, "
                f"got {self.null_text_tokens}"
            )

    @property
    def embed_scale(self) -> float:
        """The norm the prior's embeddings are scaled to."""
        if self.image_embed_scale is not None:
            return float(self.image_embed_scale)
        return math.sqrt(self.clip_dim)


def caption_tokens(
    text_proj: nn.Module | None,
    null_token: torch.Tensor,
    text_tokens: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    drop: torch.Tensor,
    text_len: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The caption part of a prior's input sequence, shared by both priors.

    text_tokens: [N, L, text_dim] or None (the null caption alone); text_mask: [N, L] bool;
    drop: [N] bool, rows given the null caption (its k tokens first, the rest masked out).
    null_token: [W], or [k, W] for a null caption of k tokens. ``text_proj`` None means
    ``text_dim == 0``: no caption tokens at all.
    Returns (tokens [N, L', W] in ``dtype``, key mask [N, L'] bool or None = all visible).
    """
    n = drop.shape[0]
    null = null_token.reshape(-1, null_token.shape[-1])  # [k, W]
    k = null.shape[0]
    if text_proj is None:
        if text_tokens is not None:
            raise ValueError("text_tokens given but the config has text_dim=0")
        return null_token.new_zeros((n, 0, null_token.shape[-1]), dtype=dtype), None
    if text_tokens is None:
        return null.expand(n, k, -1).to(dtype), None  # [N, k, W]
    if text_tokens.ndim != 3 or text_tokens.shape[0] != n:
        raise ValueError(f"text_tokens must be [N, L, text_dim], got {tuple(text_tokens.shape)}")
    length = text_tokens.shape[1]
    if not k <= length <= text_len:
        raise ValueError(f"caption length {length} is outside {k}..text_len={text_len}")
    tokens = text_proj(text_tokens.float())  # [N, L, W]
    keep = text_mask.bool() if text_mask is not None else None
    # with a mask, no data-dependent branch (torch.compile traces one graph): undropped rows
    # pass through torch.where unchanged
    if keep is None and not drop.any():
        return tokens.to(dtype), None
    first = torch.zeros(length, dtype=torch.bool, device=drop.device)
    first[:k] = True
    null_row = torch.cat([null.to(tokens.dtype), tokens.new_zeros(length - k, null.shape[-1])])
    tokens = apply_null(tokens, null_row, drop)
    keep = keep if keep is not None else torch.ones_like(first).expand(n, -1)
    keep = torch.where(drop[:, None], first[None], keep)  # [N, L]
    return tokens.to(dtype), keep


def scale_embedding(z: torch.Tensor, scale: float) -> torch.Tensor:
    """CLIP embeddings z: [N, D] -> [N, D] L2-normalised then multiplied by ``scale``.

    With ``scale = sqrt(D)`` each coordinate has unit variance on average, which matches the
    N(0, I) endpoint of the diffusion process the prior is trained on.
    """
    return F.normalize(z.float(), dim=-1) * scale


def unscale_embedding(x: torch.Tensor, scale: float, *, normalize: bool = True) -> torch.Tensor:
    """Inverse of :func:`scale_embedding`: x: [N, D] -> x / scale, then (by default)
    L2-normalised, giving a unit-norm CLIP image embedding for the decoder."""
    z = x.float() / scale
    return F.normalize(z, dim=-1) if normalize else z


def append_keys(key_mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """A key mask [N, L] bool extended by ``count`` visible keys: [N, L + count] (None, all
    keys visible, stays None)."""
    if key_mask is None:
        return None
    key_mask = key_mask.bool()
    return torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], count)], dim=1)


class CaptionPrior(nn.Module):
    """What both prior Transformers (:class:`DiffusionPriorTransformer` and
    :class:`~unclip.prior.ar.ARPrior`) do with the caption: their sequences start with the
    caption tokens at positions ``0 … L-1`` (``pos_emb`` rows), the null caption replacing
    the dropped rows' (see :func:`caption_tokens`). A subclass builds ``text_proj`` (None
    when ``text_dim == 0``), ``null_text_token`` [W] (or [k, W], a null caption of k tokens)
    and ``pos_emb`` [text_len + …, W].
    """

    config: CaptionConfig
    text_proj: nn.Linear | None
    null_text_token: nn.Parameter
    pos_emb: nn.Parameter

    def drop_mask(
        self, n: int, drop_text: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """The [n] bool rows given the null condition: ``drop_text`` (None: none), and in
        training mode also each row with probability ``config.text_drop_prob``."""
        return condition_drop_mask(
            n, self.config.text_drop_prob, drop_text, training=self.training, device=device
        )

    def caption(
        self,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        drop: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The caption tokens with their positions, (tokens [N, L, W] in ``dtype``, key mask
        [N, L] bool or None = all visible); arguments as in :func:`caption_tokens`."""
        tokens, keep = caption_tokens(
            self.text_proj, self.null_text_token, text_tokens, text_mask, drop,
            self.config.text_len, dtype,
        )  # fmt: skip
        return tokens + self.pos_emb[: tokens.shape[1]][None].to(dtype), keep

    def sequence(
        self,
        extra: torch.Tensor,
        drop: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The caption tokens (:meth:`caption`) then ``extra`` [N, E, W], the subclass's tokens
        after the caption with their positions: (h [N, L + E, W] in extra's dtype, key mask
        [N, L + E] bool or None = all visible). ``L``: the caption length (1 for the null
        token alone, 0 when ``text_dim == 0``)."""
        tokens, keep = self.caption(text_tokens, text_mask, drop, extra.dtype)
        return torch.cat([tokens, extra], dim=1), append_keys(keep, extra.shape[1])


class PreNormBlock(nn.Module):
    """The parts every pre-LayerNorm prior block shares: ``ln_1`` (before attention), ``ln_2``
    and the GELU MLP, and residual dropout. ``attention``: the subclass's attention modules,
    built before this call and registered between ``ln_1`` and ``ln_2``, so parameters are
    initialised and state-dict keys ordered as in a block written out in full.
    """

    def __init__(
        self, width: int, mlp_ratio: float, dropout: float, **attention: nn.Module
    ) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        for name, module in attention.items():
            self.add_module(name, module)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.drop = nn.Dropout(dropout)

    def residual_mlp(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h + drop(attn_out), then the MLP residual. h, attn_out: [N, S, W] -> [N, S, W]."""
        h = h + self.drop(attn_out)
        return h + self.drop(self.mlp(self.ln_2(h)))


class PriorBlock(PreNormBlock):
    """Pre-LayerNorm Transformer block with causal self-attention. h: [N, S, W] -> [N, S, W].

    ``past``: cached (keys, values) [N, Sp, W] of earlier tokens (see
    :meth:`DiffusionPriorTransformer.caption_cache`); ``key_mask`` then covers [N, Sp + S].
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__(width, mlp_ratio, dropout, attn=Attention(width, heads, dropout=dropout))

    def forward(
        self,
        h: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.residual_mlp(h, self.attn(self.ln_1(h), mask=key_mask, causal=True, past=past))


class DiffusionPriorTransformer(CaptionPrior):
    """Predicts the clean (scaled) CLIP image embedding from a noised one and the caption.

    Call as ``model(x, t, text_emb, text_tokens=None, text_mask=None, drop_text=None)``:

    - x: [N, D] noised image embedding, in the scaled space (see :func:`scale_embedding`);
    - t: [N] long timestep indices (a scalar is broadcast);
    - text_emb: [N, D] CLIP text embedding z_t (any norm; rescaled inside, or with
      ``embeddings="raw"`` taken as given);
    - text_tokens: [N, L, text_dim] CLIP text encoder per-token features, L <= text_len
      (None: the null token stands in when the config has ``text_dim > 0``);
    - text_mask: [N, L] bool, True for real tokens, False for padding (None: all real);
    - drop_text: [N] bool, rows that get the null caption condition (learned null z_t and a
      ``null_text_tokens`` learned null tokens) whatever the inputs; in training mode, rows are also
      dropped at random with probability ``config.text_drop_prob``;
    - caption_kv, caption_mask: instead of text_tokens and text_mask, the caption's cached
      keys and values from :meth:`caption_cache` (sampling only; the same drop_text).

    Returns [N, D]: the predicted unnoised embedding, in the scaled space.
    """

    config_class = PriorConfig

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        w, d = config.width, config.clip_dim
        self.text_proj = nn.Linear(config.text_dim, w) if config.text_dim else None
        self.text_emb_proj = nn.Linear(d, w)
        self.time_embed = TimestepEmbedder(w, w)
        self.x_proj = nn.Linear(d, w)
        self.query = normal_parameter(w, std=0.02)
        # positions: caption tokens 0..L-1, then the four fixed tokens at text_len..text_len+3,
        # so the outputs do not depend on how far a caption was padded
        self.pos_emb = normal_parameter(config.text_len + NUM_EXTRA_TOKENS, w, std=0.02)
        # null condition (classifier-free guidance): z_t in the scaled space, one caption token
        self.null_text_emb = normal_parameter(d, std=config.embed_scale / math.sqrt(d))
        k = config.null_text_tokens
        self.null_text_token = normal_parameter(*((k,) if k > 1 else ()), w, std=0.02)
        if config.embeddings == "raw":  # per-coordinate statistics of the raw z_i
            self.register_buffer("clip_mean", torch.zeros(d))
            self.register_buffer("clip_std", torch.ones(d))
        self.blocks = nn.ModuleList(
            PriorBlock(w, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.layers)
        )
        self.ln_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, d)

    @property
    def embed_scale(self) -> float:
        """The norm the prior's embeddings are scaled to (``config.embed_scale``)."""
        return self.config.embed_scale

    def from_latent(self, x: torch.Tensor) -> torch.Tensor:
        """A sample x: [N, D] of the space the diffusion runs in -> z_i [N, D] float32, unit
        norm (:func:`unscale_embedding`), or with ``embeddings="raw"`` (x is z_i standardised
        by ``clip_mean``/``clip_std``) a raw CLIP image embedding ``x · clip_std + clip_mean``
        (diffusers' ``post_process_latents``)."""
        if self.config.embeddings == "raw":
            return x.float() * self.clip_std.float() + self.clip_mean.float()
        return unscale_embedding(x, self.embed_scale)

    def null_parameters(self) -> list[nn.Parameter]:
        """The learned null-condition parameters (trained only on dropped rows)."""
        return [self.null_text_emb, self.null_text_token]

    def embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        drop: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input sequence: (h [N, L + 4, W], key_mask [N, L + 4] bool or None), see
        :meth:`~CaptionPrior.sequence`.

        ``drop``: [N] bool, the rows given the null caption (:meth:`~CaptionPrior.drop_mask`);
        the other arguments as in :meth:`forward`. :meth:`transformer` of it gives every
        token's final hidden state, [N, L + 4, W].
        """
        extra = self._extra_tokens(x, t, text_emb, drop)  # [N, 4, W]
        return self.sequence(extra, drop, text_tokens, text_mask)

    def _extra_tokens(
        self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        """The four tokens after the caption (z_t, timestep, noised z_i, query) with their
        positions: [N, 4, W] in the compute dtype (bf16 under autocast)."""
        cfg = self.config
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != cfg.clip_dim:
            raise ValueError(f"x must be [N, {cfg.clip_dim}], got {tuple(x.shape)}")
        if text_emb.shape != x.shape:
            raise ValueError(f"text_emb must be [N, {cfg.clip_dim}], got {tuple(text_emb.shape)}")
        t = t.reshape(1).expand(n) if t.ndim == 0 else t
        raw = cfg.embeddings == "raw"
        zt = text_emb.float() if raw else scale_embedding(text_emb, cfg.embed_scale)
        zt = apply_null(zt, self.null_text_emb, drop)
        parts = [self.text_emb_proj(zt), self.time_embed(t), self.x_proj(x)]  # 3 × [N, W]
        parts.append(self.query.expand(n, -1))
        dtype = parts[0].dtype
        extra = torch.stack([p.to(dtype) for p in parts], dim=1)  # [N, 4, W]
        return extra + self.pos_emb[cfg.text_len :][None].to(dtype)

    @torch.no_grad()
    def caption_cache(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The caption tokens' keys and values at every layer, for sampling.

        The caption comes first in the causal sequence, so its tokens never see x or t: their
        keys and values are the same at every sampling step. Computing them once and passing
        them to :meth:`forward` leaves each step only the four tokens after the caption (the
        same outputs up to rounding). Arguments as in :meth:`forward` (``text_emb`` [N, D]
        gives N). Returns ``{"caption_kv": [N, layers, 2, L, W], "caption_mask": [N, L]
        bool}``, to pass to :meth:`forward` with the same ``drop_text``.
        """
        n = text_emb.shape[0]
        drop = condition_drop_mask(n, 0.0, drop_text, training=False, device=text_emb.device)
        dtype = self.text_emb_proj(text_emb[:1].float()).dtype  # the compute dtype
        h, keep = self.caption(text_tokens, text_mask, drop, dtype)
        kv = []
        for block in self.blocks:
            kv.append(torch.stack(block.attn.keys_values(block.ln_1(h)), dim=1))  # [N, 2, L, W]
            h = block(h, keep)
        if keep is None:
            keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return {"caption_kv": torch.stack(kv, dim=1), "caption_mask": keep}

    def transformer(self, h: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The causal blocks and final LayerNorm: h: [N, S, W], key_mask: [N, S] -> [N, S, W]."""
        for block in self.blocks:
            h = maybe_checkpoint(
                block, h, key_mask, enabled=self.config.use_checkpoint and self.training
            )
        return self.ln_out(h)

    def sampling_conditions(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The (cond, uncond) model kwargs of a sampling run: the caption and the null
        condition (classifier-free guidance), for z_t [N, D], text_tokens [N, L, text_dim] and
        text_mask [N, L]. The caption tokens come as caption caches (:meth:`caption_cache`,
        computed here once for the whole run). Call it in the autocast context the sampler
        runs in, so the cache has the steps' precision.
        """
        n, dev = text_emb.shape[0], text_emb.device
        cond = {"text_emb": text_emb, "drop_text": torch.zeros(n, dtype=torch.bool, device=dev)}
        uncond = {"text_emb": text_emb, "drop_text": torch.ones(n, dtype=torch.bool, device=dev)}
        if self.config.text_dim:
            for kw in (cond, uncond):
                kw.update(self.caption_cache(text_emb, text_tokens, text_mask, kw["drop_text"]))
        return cond, uncond

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        caption_kv: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if caption_kv is not None:
            self._check_cache(x, caption_kv, text_tokens, text_mask)
        drop = self.drop_mask(x.shape[0], drop_text, x.device)
        if caption_kv is None:
            h = self.transformer(*self.embed(x, t, text_emb, drop, text_tokens, text_mask))
            return self.out(h[:, -1])  # [N, D], read at the query token
        h = self._extra_tokens(x, t, text_emb, drop)  # [N, 4, W]
        key_mask = append_keys(caption_mask, NUM_EXTRA_TOKENS)
        for i, block in enumerate(self.blocks):
            h = block(h, key_mask, (caption_kv[:, i, 0], caption_kv[:, i, 1]))
        return self.out(self.ln_out(h)[:, -1])  # [N, D]

    def _check_cache(
        self,
        x: torch.Tensor,
        caption_kv: torch.Tensor,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> None:
        """Refuse a caption cache given with the caption itself, in training, or of the wrong
        shape (it must be [N, layers, 2, L, W])."""
        if text_tokens is not None or text_mask is not None:
            raise ValueError("give text_tokens/text_mask or a caption cache, not both")
        if self.training:
            raise ValueError("a caption cache is for sampling: call model.eval() first")
        n = x.shape[0]
        if caption_kv.ndim != 5 or caption_kv.shape[:3] != (n, len(self.blocks), 2):
            raise ValueError(
                f"caption_kv must be [N, layers, 2, L, W] = [{n}, {len(self.blocks)}, 2, ...], "
                f"got {tuple(caption_kv.shape)}"
            )
