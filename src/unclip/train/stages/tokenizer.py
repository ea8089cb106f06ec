"""``unclip train tokenizer``: learn a BPE vocabulary from a data set's captions."""

from __future__ import annotations

import argparse
import sys

COMMON_TRAIN_ARGS = False


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="data set whose captions to learn from (shards, folder, table)")
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    p.add_argument("--split", help="split named in the manifest (default: all samples)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--context-length", type=int, default=77, help="tokens per caption")
    p.add_argument("--min-frequency", type=int, default=2)


def captions_of(data: str, split: str | None) -> list[str]:
    """Captions (and, from an emoji manifest, tags) of a data set, without decoding images."""
    from pathlib import Path

    from unclip.data.datasets import open_dataset
    from unclip.data.shards import read_manifest

    manifest = Path(data) / "manifest.jsonl"
    if manifest.exists():
        records = [r for r in read_manifest(manifest) if split is None or r.get("split") == split]
        return [r["caption"] for r in records] + [" ".join(r.get("tags", [])) for r in records]
    ds = open_dataset(data, split=split)
    return [ds.load(i)[2] for i in range(len(ds))]


def run(args: argparse.Namespace) -> int:
    from unclip.tokenizer import train_tokenizer

    captions = captions_of(args.data, args.split)
    tok = train_tokenizer(
        captions,
        args.vocab_size,
        min_frequency=args.min_frequency,
        context_length=args.context_length,
    )
    tok.save(args.out)
    lengths = sorted(len(tok.encode(c)) for c in captions)
    print(
        f"unclip: tokenizer with {tok.vocab_size} tokens written to {args.out}; "
        f"{len(captions)} texts, tokens per text: median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}",
        file=sys.stderr,
    )
    return 0
