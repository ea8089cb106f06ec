"""Captions -> what the prior and the decoder are conditioned on, with a frozen CLIP text side.

:class:`TextEncoder` is the one caption encoder of the package: the pipeline encodes prompts
with it, training encodes a run's captions with it (as ``FrozenTextEncoder``), and the
benchmarks and the evaluation judge use it too. :func:`clip_tokenizer_dir` finds the
tokenizer that belongs to a CLIP folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from unclip.config import PIPELINE_FILE

__all__ = ["TOKENIZER_FOLDER", "TextEncoder", "clip_tokenizer_dir"]

#: the subfolder that holds a CLIP's tokenizer (in a CLIP run's final/ and a pipeline folder)
TOKENIZER_FOLDER = "tokenizer"


def clip_tokenizer_dir(clip_dir: str | os.PathLike) -> Path:
    """The tokenizer folder of the CLIP model at ``clip_dir``: its own ``tokenizer/`` (a CLIP
    run's ``final/``, or a pipeline folder given whole), else, for a pipeline's ``clip/``, the
    pipeline's ``tokenizer/`` beside it. Raises FileNotFoundError naming the paths tried."""
    from unclip.tokenizer import TOKENIZER_FILE

    clip_dir = Path(clip_dir)
    tried = [clip_dir / TOKENIZER_FOLDER]
    if (clip_dir.parent / PIPELINE_FILE).is_file():
        tried.append(clip_dir.parent / TOKENIZER_FOLDER)
    for folder in tried:
        if (folder / TOKENIZER_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"{clip_dir}: no tokenizer for this CLIP model; tried "
        + ", ".join(str(f) for f in tried)
        + " (give a CLIP run's final/, a pipeline folder or a pipeline's clip/)"
    )


class TextEncoder:
    """A CLIP's text side: captions -> (z_t [N, D] unit norm (see ``normalize``), token
    features [N, L, W] float32, mask [N, L] bool, True up to and including the end token).

    ``clip`` is a CLIP model (used as it is; ``tokenizer=`` is then required) or a CLIP folder
    (loaded, frozen and put in eval mode; its tokenizer found by :func:`clip_tokenizer_dir`),
    moved to ``device`` when one is given.
    Each row is encoded on its own by the network, so it does not depend on the other
    captions of the call; token ids are cached per distinct caption (up to ``cache_size``).

    A training run meets the same captions every epoch. Given the run's captions
    (:meth:`precompute`), the encoder encodes each distinct one once, in float32, in sorted
    order and fixed chunks, on the first call (so on the training device), and then only looks
    rows up: a text-encoder forward per step (13 GFLOP for 256 captions) would otherwise cost
    as much as a small network's whole step. The table is the same whenever it is built, so a
    resumed run reads the same features as an uninterrupted one. It is kept while it fits in
    ``table_bytes``; captions outside it are encoded per call.
    """

    cache_size = 1_000_000
    table_bytes = 4 * 2**30
    chunk = 256
    #: False: z_t as CLIP's projection gives it, not L2-normalised (what a converted Karlo
    #: pipeline's stages take); set it before the first call
    normalize = True

    def __init__(
        self,
        clip: torch.nn.Module | str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        tokenizer: object | None = None,
        cache_size: int | None = None,
    ) -> None:
        if isinstance(clip, (str, os.PathLike)):
            from unclip.clip.convert import load_clip
            from unclip.tokenizer import Tokenizer

            model = load_clip(clip).requires_grad_(False).eval()
            if tokenizer is None:
                tokenizer = Tokenizer.load(clip_tokenizer_dir(clip))
            clip = model
        if tokenizer is None:
            raise TypeError("TextEncoder(model) needs tokenizer=, the model's tokenizer")
        if device is not None:
            clip.to(device)
        self.model = clip
        self.tokenizer = tokenizer
        if cache_size is not None:
            self.cache_size = cache_size
        self.context_length = self.model.config.context_length
        self._ids: dict[str, Tensor] = {}
        self._pending: list[str] = []
        self._rows: dict[str, int] = {}
        self._table: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def width(self) -> int:
        """W, the width of the token features."""
        return self.model.config.text_width

    @property
    def dim(self) -> int:
        """D, the embedding dimension of z_t."""
        return self.model.config.embed_dim

    def precompute(self, captions: Sequence[str]) -> None:
        """Encode these captions once, at the first call (see the class docstring); a table
        larger than ``table_bytes`` is not built."""
        unique = sorted(set(captions))
        cfg = self.model.config
        row_bytes = 4 * (cfg.embed_dim + self.context_length * cfg.text_width) + self.context_length
        self._pending = unique if len(unique) * row_bytes <= self.table_bytes else []
        self._rows, self._table = {}, None

    def _build_table(self, device: torch.device) -> None:
        captions, self._pending = self._pending, []
        parts = []
        with torch.autocast(device.type, enabled=False):
            for i in range(0, len(captions), self.chunk):
                tokens = self.tokens(captions[i : i + self.chunk]).to(device)
                z_t, feats, mask = self._encode(tokens)
                parts.append((z_t.float(), feats.float(), mask))
        self._table = tuple(torch.cat(x) for x in zip(*parts, strict=True))  # type: ignore[assignment]
        self._rows = {c: i for i, c in enumerate(captions)}

    def _encode(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.normalize:
            return self.model.encode_text_condition(tokens)
        return self.model.encode_text_condition(tokens, normalize=False)

    def tokens(self, captions: Sequence[str]) -> Tensor:
        """Token ids ``[N, L]`` of ``captions`` (cached per distinct caption)."""
        new = [c for c in dict.fromkeys(captions) if c not in self._ids]
        fresh = dict(zip(new, self.tokenizer(new, self.context_length), strict=True)) if new else {}
        for caption, row in fresh.items():
            if len(self._ids) >= self.cache_size:
                break
            self._ids[caption] = row
        return torch.stack([self._ids[c] if c in self._ids else fresh[c] for c in captions])

    @torch.no_grad()
    def __call__(
        self, captions: Sequence[str], device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(z_t [N, D], token features [N, L, W] float32, mask [N, L]) of N captions, on
        ``device`` (default: the model's; the model moves there)."""
        captions = list(captions)
        param = next(self.model.parameters())
        device = torch.device(device) if device is not None else param.device
        if param.device != device:
            self.model.to(device)
            self._table = None if self._table is None else tuple(t.to(device) for t in self._table)  # type: ignore[assignment]
        if self._pending:
            self._build_table(device)
        if self._table is not None and all(c in self._rows for c in captions):
            rows = torch.tensor([self._rows[c] for c in captions])
            if device.type == "cuda":  # no wait for the device: a pinned, asynchronous copy
                rows = rows.pin_memory()
            rows = rows.to(device, non_blocking=True)
            return tuple(t.index_select(0, rows) for t in self._table)  # type: ignore[return-value]
        tokens = self.tokens(captions).to(device)
        z_t, feats, mask = self._encode(tokens)  # [N, D], [N, L, W], [N, L]
        return z_t, feats.float(), mask
