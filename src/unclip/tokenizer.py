"""Byte-level BPE tokenizer for captions, as in CLIP (Radford et al. 2021, §2.4 and App. A).

Text is cleaned (``ftfy.fix_text``, HTML entities, whitespace runs), lower-cased, split into
words with CLIP's pattern (contractions, letter runs, single digits, punctuation runs), mapped
byte by byte to printable characters (GPT-2's byte-to-unicode table), and merged with BPE;
the last symbol of each word carries the end-of-word suffix ``</w>``. A caption becomes
``[<|startoftext|>] + ids + [<|endoftext|>]`` padded with 0 to ``context_length``; a caption
that is too long is cut and its last kept position replaced by the end token, so every row
has exactly one end token (the text encoder pools there).

The vocabulary layout is CLIP's: 256 byte symbols, the same 256 with ``</w>``, one token per
merge in merge order, then the start and end tokens (so the end token has the largest id).
:meth:`Tokenizer.from_clip_vocab` reads the original ``bpe_simple_vocab_16e6.txt.gz`` and then
gives exactly the ids of the original CLIP tokenizer; :func:`train_tokenizer` learns merges
from captions with the HF ``tokenizers`` trainer.

Exact agreement with the original needs ``ftfy`` (imported lazily, on first use). Without it
the cleaning falls back to Unicode NFC normalisation, which agrees on ordinary text but not on
mojibake, curly quotes or full-width characters that ftfy would repair; a warning says so once.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Regex, decoders, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

__all__ = [
    "EOT_TOKEN",
    "SOT_TOKEN",
    "Tokenizer",
    "bytes_to_unicode",
    "clean_text",
    "train_tokenizer",
]

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
EOW = "</w>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
FORMAT_VERSION = 1
CLIP_NUM_MERGES = 49152 - 256 - 2  # the merges the original CLIP tokenizer reads from the file

# Unicode White_Space, which is what the `regex` module's \s (used by the original) matches;
# Python's own \s would also match U+001C..U+001F.
_WHITESPACE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)

# CLIP's word pattern, rewritten for a case-sensitive engine with the effect of the original's
# re.IGNORECASE on lower-cased text: "'s" also matches "'ſ" (U+017F folds to s), the start
# token also matches with ſ, and U+0345 (which folds to a letter) belongs to no class and is
# dropped. After cleaning, the only whitespace left is the plain space.
_WORD_PATTERN = (
    r"<\|[sſ]tartoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d"
    r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{0345}]+"
)

_warned_no_ftfy = False


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}  # printable bytes stand for themselves, in this order
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _fix_text(text: str) -> str:
    global _warned_no_ftfy
    try:
        import ftfy
    except ImportError:
        if not _warned_no_ftfy:
            warnings.warn(
                "ftfy is not installed: text cleaning falls back to NFC normalisation, which "
                "may tokenise unusual text differently from the original CLIP tokenizer "
                "(pip install ftfy)",
                stacklevel=3,
            )
            _warned_no_ftfy = True
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def clean_text(text: str) -> str:
    """CLIP's cleaning: fix text (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _base_vocab() -> list[str]:
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + EOW for s in symbols]


def _build(merges: Sequence[tuple[str, str]]) -> HFTokenizer:
    """An HF tokenizer with CLIP's pipeline and vocabulary layout for ``merges`` (in rank order)."""
    vocab: dict[str, int] = {}
    for token in _base_vocab():
        vocab.setdefault(token, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in (SOT_TOKEN, EOT_TOKEN):
        vocab.setdefault(token, len(vocab))
    model = BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=EOW, fuse_unk=False)
    tok = HFTokenizer(model)
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(EOW, " ")])
    # The start/end tokens are ordinary vocabulary entries, not HF "added tokens": the original
    # recognises them only where its word pattern starts a match (",<|endoftext|>" is not one),
    # which :meth:`Tokenizer.encode_batch` reproduces.
    return tok


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class Tokenizer:
    """Captions to fixed-length id tensors: ``tokenizer(["a cat"]) -> LongTensor [1, 77]``."""

    def __init__(self, tokenizer: HFTokenizer, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self._tok = tokenizer
        self.context_length = context_length
        sot, eot = tokenizer.token_to_id(SOT_TOKEN), tokenizer.token_to_id(EOT_TOKEN)
        if sot is None or eot is None:
            raise ValueError("the tokenizer has no start/end tokens")
        self.sot_token_id: int = sot
        self.eot_token_id: int = eot
        self.pad_token_id: int = 0
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[str, str]], context_length: int = 77) -> Tokenizer:
        """A tokenizer for BPE ``merges`` (pairs of byte-level symbols, in rank order)."""
        return cls(_build(merges), context_length)

    @classmethod
    def from_clip_vocab(cls, path: str | os.PathLike, context_length: int = 77) -> Tokenizer:
        """Read the original CLIP merges file (``bpe_simple_vocab_16e6.txt.gz``, or unzipped).

        The result tokenises exactly as the original CLIP tokenizer (with ``ftfy`` installed):
        vocabulary size 49,408, start token 49,406, end token 49,407.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such CLIP vocabulary file")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        try:
            lines = raw.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 BPE merges file ({e})") from None
        merges = []
        for i, line in enumerate(lines[1 : CLIP_NUM_MERGES + 1], start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {i} is not a merge of two symbols: {line!r}")
            merges.append((parts[0], parts[1]))
        return cls.from_merges(merges, context_length)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer folder written by :meth:`save`."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a tokenizer folder (no {TOKENIZER_FILE})")
        try:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            context_length = int(config["context_length"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path / CONFIG_FILE}: no such file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path / CONFIG_FILE}: not a tokenizer config ({e})") from None
        if int(config.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(f"{path / CONFIG_FILE}: written by a newer unclip; upgrade unclip")
        try:
            tok = HFTokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as e:  # the Rust side raises plain Exception
            raise ValueError(f"{path / TOKENIZER_FILE}: not a readable tokenizer ({e})") from None
        return cls(tok, context_length)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (HF ``tokenizers`` format) and ``tokenizer_config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / TOKENIZER_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "context_length": self.context_length,
            "cleaning": "clip",
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token string (byte-level symbols, ``</w>`` ending a word) -> id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of one text after cleaning, without start/end tokens and without truncation."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text (see :meth:`encode`), encoded in parallel by ``tokenizers``."""
        cleaned = [clean_text(t) for t in texts]
        out = [e.ids for e in self._tok.encode_batch(cleaned, add_special_tokens=False)]
        for i, text in enumerate(cleaned):
            if SOT_TOKEN in text or EOT_TOKEN in text:
                out[i] = self._encode_with_specials(text)
        return out

    def _encode_with_specials(self, text: str) -> list[int]:
        """Word by word: a word that is exactly a special token gets its id (as the original's
        cache does), every other word goes through BPE."""
        ids: list[int] = []
        for word, _ in self._tok.pre_tokenizer.pre_tokenize_str(text):
            if word == SOT_TOKEN:
                ids.append(self.sot_token_id)
            elif word == EOT_TOKEN:
                ids.append(self.eot_token_id)
            else:
                ids.extend(t.id for t in self._tok.model.tokenize(word))
        return ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (long): start, text, end, then 0s.

        Too long texts are truncated to ``context_length`` with the last position set to the
        end token (``clip.tokenize(..., truncate=True)``).
        """
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = context_length or self.context_length
        out = torch.full((len(texts), n_ctx), self.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(self.encode_batch(list(texts))):
            row = [self.sot_token_id, *ids[: n_ctx - 2], self.eot_token_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids: a leading start token is skipped, decoding stops at the end token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        text = "".join(self._tok.id_to_token(int(i)) or "" for i in ids)
        raw = bytearray(self._byte_decoder[c] for c in text if c in self._byte_decoder)
        return raw.decode("utf-8", errors="replace").replace(EOW, " ").strip()

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in ids]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _merges_of(tok: HFTokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    context_length: int = 77,
) -> Tokenizer:
    """Learn BPE merges from ``captions``; the vocabulary has at most ``vocab_size`` tokens.

    The vocabulary always holds all 512 byte symbols (with and without ``</w>``) and the two
    special tokens, so any text can be encoded; ``vocab_size - 514`` merges are learnt at most
    (fewer when the captions run out of pairs seen ``min_frequency`` times).
    """
    n_merges = vocab_size - len(_base_vocab()) - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least 514 (the byte symbols), got {vocab_size}")
    model = HFTokenizer(BPE(end_of_word_suffix=EOW))
    model.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 512,  # the trainer counts its alphabet; we cut merges below
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=EOW,
    )
    model.train_from_iterator((clean_text(c) for c in captions), trainer=trainer)
    return Tokenizer.from_merges(_merges_of(model)[:n_merges], context_length)
