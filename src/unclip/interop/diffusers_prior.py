"""diffusers' ``PriorTransformer`` (Karlo's prior) <-> unclip's
:class:`~unclip.prior.model.DiffusionPriorTransformer`, exactly.

Both are the same causal Transformer over [caption tokens, z_t, timestep, noised z_i, query]
(diffusers calls the query ``prd_embedding``) with positions 0…76 for the caption and 77…80
for the four tokens after it, pre-LayerNorm blocks with a GELU MLP, and the output read at the
query. What differs is expressed by unclip config fields (default off):

- ``embeddings="raw"``: Karlo feeds z_t as the text encoder's projection gives it and
  diffuses z_i standardised with ``clip_mean``/``clip_std`` (diffusers'
  ``post_process_latents`` maps a sample back), where unclip's own priors use unit
  embeddings scaled to √D;
- the null condition: Karlo's guidance runs the unconditional pass on the empty caption "",
  whose encoding is a constant, so it is stored as the learned null condition: ``null_text_emb``
  = z_t(""), ``null_text_tokens`` = 2 (start and end) caption tokens projected by the prior's
  caption projection. Padding is masked in both, so nothing else of "" matters.

Keys: ``proj_in`` -> ``x_proj``, ``embedding_proj`` -> ``text_emb_proj``,
``encoder_hidden_states_proj`` -> ``text_proj``, ``time_embedding.linear_{1,2}`` ->
``time_embed.mlp.{0,2}``, ``positional_embedding`` [1, S, W] -> ``pos_emb`` [S, W],
``prd_embedding`` -> ``query``, blocks ``norm1``/``attn1.to_{q,k,v}``/``attn1.to_out.0``/
``norm3``/``ff.net.{0.proj,2}`` -> ``ln_1``/``attn.qkv``/``attn.proj``/``ln_2``/``mlp.{0,3}``,
``norm_out`` -> ``ln_out``, ``proj_to_clip_embeddings`` -> ``out``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from unclip.config import ConfigError
from unclip.hub import meta_model
from unclip.interop.diffusers_clip import check_converted
from unclip.prior.model import NUM_EXTRA_TOKENS, DiffusionPriorTransformer, PriorConfig

PRIOR_CLASS = "PriorTransformer"

#: the PriorTransformer options unclip expresses, and the only values it accepts for each
#: (None = any value; checked against the other sizes below)
_SUPPORTED: dict[str, tuple[Any, ...] | None] = {
    "num_attention_heads": None,
    "attention_head_dim": None,
    "num_layers": None,
    "embedding_dim": None,
    "num_embeddings": None,
    "additional_embeddings": (NUM_EXTRA_TOKENS,),
    "dropout": None,
    "time_embed_act_fn": ("silu",),
    "norm_in_type": (None,),
    "embedding_proj_norm_type": (None,),
    "encoder_hid_proj_type": ("linear",),
    "added_emb_type": ("prd",),
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}

#: the options of a prior config.json that unclip writes as they are (diffusers' defaults,
#: the values Karlo uses; ``None`` sizes follow the others)
PRIOR_WRITTEN: dict[str, Any] = {
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}

_BLOCK_RENAMES = [
    (r"\.norm1\.", ".ln_1."),
    (r"\.attn1\.to_out\.0\.", ".attn.proj."),
    (r"\.norm3\.", ".ln_2."),
    (r"\.ff\.net\.0\.proj\.", ".mlp.0."),
    (r"\.ff\.net\.2\.", ".mlp.3."),
]
_RENAMES = {
    "proj_in": "x_proj",
    "embedding_proj": "text_emb_proj",
    "encoder_hidden_states_proj": "text_proj",
    "time_embedding.linear_1": "time_embed.mlp.0",
    "time_embedding.linear_2": "time_embed.mlp.2",
    "norm_out": "ln_out",
    "proj_to_clip_embeddings": "out",
}


def prior_config_from_diffusers(doc: dict[str, Any], where: str) -> PriorConfig:
    """unclip's :class:`PriorConfig` for a ``PriorTransformer`` config.json (``where`` names
    the file in errors). Options unclip cannot express exactly are refused, naming the field."""
    for key, value in doc.items():
        if key.startswith("_"):
            continue
        if key not in _SUPPORTED:
            raise ConfigError(f"{where}: unknown PriorTransformer option {key!r}")
        allowed = _SUPPORTED[key]
        if allowed is not None and value not in allowed:
            raise ConfigError(
                f"{where}: {key}={value!r} is not supported (unclip has {allowed[0]!r})"
            )
    heads = int(doc.get("num_attention_heads", 32))
    width = heads * int(doc.get("attention_head_dim", 64))
    dim = int(doc.get("embedding_dim", 768))
    for key, want in (
        ("time_embed_dim", width),
        ("embedding_proj_dim", dim),
        ("clip_embed_dim", dim),
    ):
        if doc.get(key) not in (None, want):
            raise ConfigError(f"{where}: {key}={doc[key]} is not supported (unclip has {want})")
    return PriorConfig(
        clip_dim=dim,
        text_dim=dim,  # diffusers projects encoder_hidden_states from embedding_dim
        text_len=int(doc.get("num_embeddings", 77)),
        width=width,
        layers=int(doc.get("num_layers", 20)),
        heads=heads,
        mlp_ratio=4.0,
        dropout=float(doc.get("dropout", 0.0)),
        text_drop_prob=0.0,
        embeddings="raw",
        null_text_tokens=2,
    )


def prior_from_diffusers(
    doc: dict[str, Any],
    state: dict[str, Tensor],
    empty: tuple[Tensor, Tensor, Tensor],
    where: str,
) -> DiffusionPriorTransformer:
    """A :class:`DiffusionPriorTransformer` (eval mode, float32) equal to a diffusers prior.

    doc: the prior's config.json; state: its weights; empty: the text encoder's output for
    "" (z_t [1, D], token states [1, L, W], mask [1, L]; see
    :func:`~unclip.interop.diffusers_clip.empty_caption`), stored as the null condition.
    """
    config = prior_config_from_diffusers(doc, where)
    z_t, states, mask = empty
    k = int(mask.sum())
    if not bool(mask[0, :k].all()) or k < 1:
        raise ConfigError(f"{where}: the empty caption's mask is not a prefix")
    config = config.replace(null_text_tokens=k)
    ours: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        value = value.float()
        if key == "positional_embedding":
            ours["pos_emb"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key == "prd_embedding":
            ours["query"] = value.reshape(-1)
        elif key in ("clip_mean", "clip_std"):
            ours[key] = value.reshape(-1)
        elif m := re.match(r"^transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)$", key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif key.startswith("transformer_blocks."):
            name = "blocks." + key.removeprefix("transformer_blocks.")
            for pattern, repl in _BLOCK_RENAMES:
                name = re.sub(pattern, repl, name)
            ours[name] = value
        else:
            module, _, leaf = key.rpartition(".")
            if module not in _RENAMES:
                raise ConfigError(f"{where}: unexpected tensor {key!r}")
            ours[f"{_RENAMES[module]}.{leaf}"] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConfigError(f"{where}: block {block} lacks one of to_q/to_k/to_v")
        ours[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"])
    for key in ("text_proj.weight", "text_proj.bias", "pos_emb"):
        if key not in ours:
            raise ConfigError(f"{where}: missing tensor for unclip's {key}")
    if states.shape[-1] != config.text_dim or z_t.shape[-1] != config.clip_dim:
        raise ConfigError(
            f"{where}: embedding_dim {config.clip_dim} does not match the text encoder "
            f"(width {states.shape[-1]}, projection {z_t.shape[-1]})"
        )
    with torch.no_grad():  # the empty caption, projected as the prior projects every caption
        null_tokens = states[0, :k].float() @ ours["text_proj.weight"].T + ours["text_proj.bias"]
    ours["null_text_emb"] = z_t[0].float()
    ours["null_text_token"] = null_tokens if k > 1 else null_tokens[0]
    model = meta_model(DiffusionPriorTransformer, config)  # no second copy of the weights
    check_converted(model.state_dict(), ours, where)
    model.load_state_dict(ours, assign=True)
    return model.eval()


def prior_to_diffusers(
    model: DiffusionPriorTransformer,
    empty: tuple[Tensor, Tensor, Tensor],
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json, state dict) of a diffusers ``PriorTransformer`` equal to ``model``.

    Only priors diffusers' ``UnCLIPPipeline`` runs the same way convert: raw embeddings, and
    a null condition equal to the empty caption ``empty`` (as Karlo's); otherwise a
    ConfigError says which."""
    cfg = model.config
    if cfg.embeddings != "raw":
        raise ConfigError(
            "this prior works on unit CLIP embeddings; diffusers' UnCLIPPipeline feeds raw ones "
            "(only priors converted from diffusers convert back)"
        )
    if cfg.text_dim != cfg.clip_dim or cfg.mlp_ratio != 4.0:
        raise ConfigError("diffusers' PriorTransformer needs text_dim == clip_dim and mlp_ratio 4")
    z_t, states, mask = empty
    k = int(mask.sum())
    with torch.no_grad():
        sd = {key: v.detach().float() for key, v in model.state_dict().items()}
        null = states[0, :k].float() @ sd["text_proj.weight"].T + sd["text_proj.bias"]
    same = (
        k == cfg.null_text_tokens
        and torch.allclose(sd["null_text_token"].reshape(k, -1), null, atol=1e-5, rtol=1e-4)
        and torch.allclose(sd["null_text_emb"], z_t[0].float(), atol=1e-5, rtol=1e-4)
    )
    if not same:
        raise ConfigError(
            "this prior's null condition is learned; diffusers' UnCLIPPipeline uses the empty "
            "caption's encoding"
        )
    back = {v: k_ for k_, v in _RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in ("null_text_emb", "null_text_token"):
            continue
        if key == "pos_emb":
            out["positional_embedding"] = value[None]
        elif key == "query":
            out["prd_embedding"] = value.reshape(1, 1, -1)
        elif key in ("clip_mean", "clip_std"):
            out[key] = value[None]
        elif m := re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            for part, name in zip(value.chunk(3), "qkv", strict=True):
                out[f"transformer_blocks.{m.group(1)}.attn1.to_{name}.{m.group(2)}"] = part
        elif key.startswith("blocks."):
            name = "transformer_blocks." + key.removeprefix("blocks.")
            for theirs, ours in [
                (".norm1.", ".ln_1."), (".attn1.to_out.0.", ".attn.proj."), (".norm3.", ".ln_2."),
                (".ff.net.0.proj.", ".mlp.0."), (".ff.net.2.", ".mlp.3."),
            ]:  # fmt: skip
                name = name.replace(ours, theirs)
            out[name] = value
        else:
            module, _, leaf = key.rpartition(".")
            out[f"{back[module]}.{leaf}"] = value
    out = {k_: v.to(dtype or torch.float32).contiguous() for k_, v in out.items()}
    doc = {
        "_class_name": PRIOR_CLASS,
        "num_attention_heads": cfg.heads,
        "attention_head_dim": cfg.width // cfg.heads,
        "num_layers": cfg.layers,
        "embedding_dim": cfg.clip_dim,
        "num_embeddings": cfg.text_len,
        "additional_embeddings": NUM_EXTRA_TOKENS,
        "dropout": cfg.dropout,
        **PRIOR_WRITTEN,
    }
    return doc, out
