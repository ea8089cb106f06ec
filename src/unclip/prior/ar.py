"""The autoregressive (AR) prior of DALL·E 2 (Ramesh et al. 2022, §2.2).

The CLIP image embedding z_i becomes a short sequence of discrete codes: PCA fitted on the
training embeddings keeps the ``K`` leading principal components (the paper keeps 319 of
1,024; here a configured count, or the smallest one reaching a target share of the
variance, 99% by default), ordered by decreasing eigenvalue, and each component is quantised
into ``B`` buckets with quantile edges (the paper uses 1,024). A decoder-only Transformer
with a causal mask predicts the codes one at a time after the prefix

    [caption tokens (CLIP per-token features, projected), z_t, dot, c_0, …, c_{K-2}]

where ``dot`` is the quantised dot product z_i·z_t (captions that describe their image
better have higher products, so sampling conditions on the upper half of the buckets, as
the paper does). Trained with cross-entropy; the caption is dropped 10% of the time (a
learned null condition owned by the model) for classifier-free guidance on the logits.

The PCA and the quantiser live in the model's buffers, so ``save_pretrained`` /
``from_pretrained`` carry them in ``model.safetensors`` with no extra file. Fit them with
:func:`unclip.prior.codebook.fit_codebook` and :meth:`ARPrior.load_codebook` before training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import Config, ConfigError
from unclip.nn import apply_null, normal_parameter, self_attention
from unclip.prior.codebook import Codebook, pca_dequantize, pca_quantize
from unclip.prior.model import CaptionPrior, PreNormBlock, append_keys, check_prior_transformer

#: tokens between the caption and the codes: z_t, dot
NUM_EXTRA_TOKENS = 2


@dataclass
class ARPriorConfig(Config):
    """Size, code book and conditioning of :class:`ARPrior`.

    ``clip_dim``: CLIP embedding width D. ``text_dim``: width of the CLIP text encoder's
    per-token features (0 = condition on z_t only). ``text_len``: the longest caption.
    ``components``: principal components K kept (0 = the smallest count reaching
    ``variance`` of the training embeddings' variance; a fitted model always has K ≥ 1).
    ``buckets``: quantisation buckets B per component. ``dot_buckets``: buckets of the
    z_i·z_t token. ``text_drop_prob``: training probability of the null caption condition.
    ``smoothing``: σ, in buckets, of the ordinal label smoothing of the training targets (a
    discretised Gaussian around the true bucket instead of one-hot; 0 = one-hot, as in the
    paper). Buckets are ordered values, and a one-hot target gives no credit for a near miss,
    which on small data sets leaves each of many buckets with too few examples to learn from.
    """

    type_name = "ar_prior"

    clip_dim: int = 512
    text_dim: int = 512
    text_len: int = 77
    components: int = 0
    variance: float = 0.99
    buckets: int = 256
    dot_buckets: int = 16
    width: int = 256
    layers: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_drop_prob: float = 0.1
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_prior_transformer(self, positive=("dot_buckets",))
        if self.smoothing < 0:
            raise ConfigError(f"smoothing must be ≥ 0 (buckets), got {self.smoothing}")
        if self.buckets < 2:
            raise ConfigError(f"buckets must be at least 2, got {self.buckets}")
        if not 0 <= self.components <= self.clip_dim:
            raise ConfigError(
                f"components must be in 0..clip_dim={self.clip_dim} (0 = by variance), "
                f"got {self.components}"
            )
        if not 0.0 < self.variance <= 1.0:
            raise ConfigError(f"variance must be in (0, 1], got {self.variance}")


def ordinal_targets(codes: torch.Tensor, buckets: int, sigma: float) -> torch.Tensor:
    """Soft targets for ordered buckets: codes [M] long -> [M, B] probabilities, a Gaussian of
    standard deviation ``sigma`` buckets around each code, cut to 0..B-1 and renormalised."""
    j = torch.arange(buckets, device=codes.device, dtype=torch.float32)
    d = (j[None] - codes.float()[:, None]) / sigma  # [M, B]
    return torch.softmax(-0.5 * d * d, dim=-1)


# ---------------------------------------------------------------------------------------------
# Sampling helpers


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0 = all) and the smallest set whose probability
    reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020); the rest become -inf.
    logits: [N, B] -> [N, B]. The most likely token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits [N, B] -> [N] long. ``temperature`` 0 is argmax; otherwise
    inverse-CDF sampling with one uniform per row from ``generator`` (on its own device, so a
    CPU generator gives the same tokens on any device)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)  # [N, B]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(logits.shape[0], 1, generator=generator, device=gen_device).to(probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [N, 1]
    return idx.squeeze(-1).clamp_max(logits.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# The network


class ARBlock(PreNormBlock):
    """Pre-LayerNorm causal Transformer block with an optional key/value cache.

    h: [N, S, W]; key_mask: [N, S_past + S] bool (True = real token) or None;
    past: (k, v) each [N, S_past, W] or None. Returns (h [N, S, W], (k, v) [N, S_past + S, W]).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        qkv, proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        super().__init__(width, mlp_ratio, dropout, qkv=qkv, proj=proj)
        self.num_heads = heads  # qkv, proj, num_heads, dropout: as unclip.nn.self_attention reads
        self.dropout = dropout

    def forward(
        self,
        h: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self_attention(self, self.ln_1(h), mask=key_mask, causal=True, past=past)
        return self.residual_mlp(h, a), kv


class ARPrior(CaptionPrior):
    """Caption -> CLIP image embedding as a sequence of PCA codes (DALL·E 2 §2.2, AR prior).

    Call as ``model(codes, text_emb, dot_code, text_tokens=None, text_mask=None,
    drop_text=None)``:

    - codes: [N, K] long, the target codes (teacher forcing; the last one is never read);
    - text_emb: [N, D] CLIP text embedding z_t (any norm; normalised inside);
    - dot_code: [N] long, the quantised z_i·z_t (:meth:`dot_code`);
    - text_tokens: [N, L, text_dim] caption token features, L <= text_len (None: the null
      token when ``text_dim > 0``); text_mask: [N, L] bool, True for real tokens;
    - drop_text: [N] bool, rows given the null condition (null caption, z_t and dot); in
      training mode rows are also dropped with probability ``config.text_drop_prob``.

    Returns logits [N, K, B]: row k predicts code k from the prefix and codes < k.
    """

    config_class = ARPriorConfig

    def __init__(self, config: ARPriorConfig) -> None:
        super().__init__()
        if config.components < 1:
            raise ValueError(
                "ARPriorConfig.components must be set (fit the code book with fit_codebook "
                "and build the model with its component count)"
            )
        self.config = config
        w, d, k, b = config.width, config.clip_dim, config.components, config.buckets
        self.text_proj = nn.Linear(config.text_dim, w) if config.text_dim else None
        self.text_emb_proj = nn.Linear(d, w)
        self.dot_emb = nn.Embedding(config.dot_buckets, w)
        self.code_emb = nn.Embedding(b, w)
        self.code_value = nn.Linear(1, w)  # the bucket's value too: buckets are ordered
        # positions: caption 0..L-1, z_t and dot at text_len, text_len + 1, codes after them
        self.pos_emb = normal_parameter(config.text_len + NUM_EXTRA_TOKENS + k, w, std=0.02)
        self.null_text_emb = normal_parameter(w, std=0.02)
        self.null_text_token = normal_parameter(w, std=0.02)
        self.null_dot = normal_parameter(w, std=0.02)
        self.blocks = nn.ModuleList(
            ARBlock(w, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.layers)
        )
        self.ln_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, b)
        # the code book (fit_codebook), saved with the weights
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_components", torch.zeros(k, d))
        self.register_buffer("pca_explained", torch.zeros(k))
        self.register_buffer("bucket_edges", torch.zeros(k, b - 1))
        self.register_buffer("bucket_centres", torch.zeros(k, b))
        self.register_buffer("dot_edges", torch.zeros(config.dot_buckets - 1))

    # -- code book ---------------------------------------------------------------------------

    def load_codebook(self, codebook: Codebook) -> None:
        """Copy a fitted :class:`Codebook` (matching K, B, Bd) into the buffers."""
        pairs = {
            "pca_mean": codebook.mean,
            "pca_components": codebook.components,
            "pca_explained": codebook.explained,
            "bucket_edges": codebook.edges,
            "bucket_centres": codebook.centres,
            "dot_edges": codebook.dot_edges,
        }
        with torch.no_grad():
            for name, value in pairs.items():
                buf = getattr(self, name)
                if tuple(buf.shape) != tuple(value.shape):
                    raise ValueError(
                        f"code book {name} has shape {tuple(value.shape)}, the model needs "
                        f"{tuple(buf.shape)} (components/buckets/dot_buckets must match)"
                    )
                buf.copy_(value.to(buf))

    @property
    def codebook(self) -> Codebook:
        """The buffers as a :class:`Codebook` (views, not copies)."""
        return Codebook(
            self.pca_mean, self.pca_components, self.pca_explained, self.bucket_edges,
            self.bucket_centres, self.dot_edges,
        )  # fmt: skip

    def encode(self, z_i: torch.Tensor) -> torch.Tensor:
        """z_i: [N, D] -> codes [N, K] long."""
        return pca_quantize(z_i, self.pca_mean, self.pca_components, self.bucket_edges)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [N, K] -> unit-norm z_i [N, D] (bucket centres → inverse PCA → L2-normalise)."""
        return pca_dequantize(codes, self.pca_mean, self.pca_components, self.bucket_centres)

    def dot_code(self, z_i: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """The bucket of the cosine z_i·z_t: [N, D] × [N, D] -> [N] long."""
        with torch.autocast(z_i.device.type, enabled=False):
            dots = (F.normalize(z_i.float(), dim=-1) * F.normalize(z_t.float(), dim=-1)).sum(-1)
            return torch.searchsorted(self.dot_edges.float(), dots.contiguous(), right=True)

    # -- sequence ----------------------------------------------------------------------------

    def _extra_tokens(
        self, text_emb: torch.Tensor, dot_code: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        """The two tokens between the caption and the codes (z_t, dot) with their positions:
        [N, 2, W] in the compute dtype. ``drop``: [N] bool, the rows given the null condition
        (:meth:`~unclip.prior.model.CaptionPrior.drop_mask`)."""
        cfg = self.config
        n = text_emb.shape[0]
        if text_emb.ndim != 2 or text_emb.shape[1] != cfg.clip_dim:
            raise ValueError(f"text_emb must be [N, {cfg.clip_dim}], got {tuple(text_emb.shape)}")
        if dot_code.shape != (n,):
            raise ValueError(f"dot_code must be [N] = [{n}], got {tuple(dot_code.shape)}")
        zt = F.normalize(text_emb.float(), dim=-1) * math.sqrt(cfg.clip_dim)
        zt_tok = apply_null(self.text_emb_proj(zt), self.null_text_emb, drop)  # [N, W]
        dot_tok = apply_null(self.dot_emb(dot_code.long()), self.null_dot, drop)  # [N, W]
        dtype = zt_tok.dtype
        extra = torch.stack([zt_tok, dot_tok.to(dtype)], dim=1)  # [N, 2, W]
        return extra + self.pos_emb[cfg.text_len : cfg.text_len + NUM_EXTRA_TOKENS][None].to(dtype)

    def embed_codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes: [N, S] long for components start..start+S-1 -> [N, S, W]."""
        k0 = self.config.text_len + NUM_EXTRA_TOKENS + start
        pos = self.pos_emb[k0 : k0 + codes.shape[1]]
        centres = self.bucket_centres[start : start + codes.shape[1]].float()  # [S, B]
        scale = centres.std(dim=1, keepdim=True).clamp_min(1e-6)  # [S, 1]
        values = (centres.gather(1, codes.long().T) / scale).T  # [N, S], about unit variance
        value_emb = self.code_value(values[..., None].to(self.code_value.weight.dtype))
        return self.code_emb(codes.long()) + value_emb + pos[None]

    def transformer(
        self,
        h: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Causal blocks + final norm: h [N, S, W] -> ([N, S, W], per-layer (k, v) cache).
        ``key_mask`` [N, S_past + S] covers the cached keys too."""
        cache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, key_mask, None if past is None else past[i])
            cache.append(kv)
        return self.ln_out(h), cache

    def forward(
        self,
        codes: torch.Tensor,
        text_emb: torch.Tensor,
        dot_code: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k = self.config.components
        if codes.ndim != 2 or codes.shape[1] != k:
            raise ValueError(f"codes must be [N, {k}], got {tuple(codes.shape)}")
        drop = self.drop_mask(text_emb.shape[0], drop_text, text_emb.device)
        extra = self._extra_tokens(text_emb, dot_code, drop)
        prefix, key_mask = self.sequence(extra, drop, text_tokens, text_mask)  # [N, P, W]
        x = self.embed_codes(codes[:, : k - 1]).to(prefix.dtype)  # [N, K - 1, W]
        h = torch.cat([prefix, x], dim=1)  # [N, P + K - 1, W]
        h, _ = self.transformer(h, append_keys(key_mask, k - 1))
        return self.head(h[:, prefix.shape[1] - 1 :])  # [N, K, B]

    def loss(
        self,
        z_i: torch.Tensor,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        model: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the codes of z_i [N, D] given the caption: (loss [], accuracy []).
        ``model``: the callable to run (e.g. the DDP wrapper of this module; default self)."""
        codes = self.encode(z_i)  # [N, K]
        dot = self.dot_code(z_i, text_emb)
        logits = (model or self)(codes, text_emb, dot, text_tokens, text_mask)  # [N, K, B]
        logits = logits.float().reshape(-1, self.config.buckets)
        target = codes.reshape(-1)
        if self.config.smoothing > 0:
            loss = F.cross_entropy(logits, ordinal_targets(target, logits.shape[1],
                                                           self.config.smoothing))  # fmt: skip
        else:
            loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc

    # -- sampling ----------------------------------------------------------------------------

    def high_dot_codes(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n] long dot buckets drawn uniformly from the upper half (DALL·E 2 §2.2 conditions
        the AR prior on a high z_i·z_t); the buckets are quantiles, so this samples the top
        half of the training distribution."""
        nb = self.config.dot_buckets
        lo = nb // 2
        dev = generator.device if generator is not None else torch.device("cpu")
        codes = torch.randint(lo, nb, (n,), generator=generator, device=dev)
        return codes.to(self.pos_emb.device)

    @torch.no_grad()
    def sample_codes(
        self,
        text_emb: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        dot_code: torch.Tensor | None = None,
        guidance: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        drop_text: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Draw codes [N, K] one component at a time.

        ``guidance`` s: logits u + s·(c − u) of the conditional (c) and null-condition (u)
        passes; 1 = the conditional model alone (one pass), 0 = the unconditional one.
        ``dot_code`` [N] (None: :meth:`high_dot_codes`). ``temperature``/``top_k``/``top_p``
        as in :func:`sample_logits`. ``use_cache``: reuse keys/values (same result, faster).
        ``drop_text`` [N] bool: rows sampled with the null condition (guidance 1 only).
        ``callback(k, codes)`` after each component with the codes so far [N, k + 1].
        """
        cfg = self.config
        n = text_emb.shape[0]
        if dot_code is None:
            dot_code = self.high_dot_codes(n, generator)
        dot_code = dot_code.to(text_emb.device)
        guided = guidance != 1.0
        if guidance == 0.0:
            drop = torch.ones(n, dtype=torch.bool, device=text_emb.device)
            guided = False
        elif guided:
            drop = torch.arange(2 * n, device=text_emb.device) >= n  # [cond rows; uncond rows]
        else:
            drop = drop_text
        rows = 2 if guided else 1
        if rows == 2:
            text_emb, dot_code = text_emb.repeat(2, 1), dot_code.repeat(2)
            text_tokens = None if text_tokens is None else text_tokens.repeat(2, 1, 1)
            text_mask = None if text_mask is None else text_mask.repeat(2, 1)
        drop = self.drop_mask(text_emb.shape[0], drop, text_emb.device)
        extra = self._extra_tokens(text_emb, dot_code, drop)
        prefix, key_mask = self.sequence(extra, drop, text_tokens, text_mask)  # [rows·N, P, W]
        codes = torch.zeros(n, cfg.components, dtype=torch.long, device=text_emb.device)

        def logits_of(h_last: torch.Tensor) -> torch.Tensor:
            logits = self.head(h_last).float()  # [rows·N, B]
            if rows == 2:
                c, u = logits[:n], logits[n:]
                return u + guidance * (c - u)
            return logits

        h, cache = self.transformer(prefix, key_mask)
        for k in range(cfg.components):
            codes[:, k] = sample_logits(
                logits_of(h[:, -1]), temperature=temperature, top_k=top_k, top_p=top_p,
                generator=generator,
            )  # fmt: skip
            if callback is not None:
                callback(k, codes[:, : k + 1])
            if k == cfg.components - 1:
                break
            if use_cache:
                x = self.embed_codes(codes[:, k : k + 1], start=k).repeat(rows, 1, 1)
                key_mask = append_keys(key_mask, 1)
                h, cache = self.transformer(x.to(prefix.dtype), key_mask, cache)
            else:
                x = self.embed_codes(codes[:, : k + 1]).repeat(rows, 1, 1)
                h, _ = self.transformer(
                    torch.cat([prefix, x.to(prefix.dtype)], 1), append_keys(key_mask, k + 1)
                )
        return codes

    @torch.no_grad()
    def sample(
        self, text_emb: torch.Tensor, text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Unit-norm z_i [N, D] for captions (:meth:`sample_codes` then :meth:`decode`)."""
        return self.decode(self.sample_codes(text_emb, text_tokens, text_mask, **kwargs))
