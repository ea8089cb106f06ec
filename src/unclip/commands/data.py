"""``unclip data emoji|check|sheet``: build the emoji set, inspect any data set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unclip.commands import add_command, print_usage


def register(sub: argparse._SubParsersAction) -> None:
    verbs = add_command(sub, "data", _data).add_subparsers(dest="verb", metavar="VERB")

    e = add_command(verbs, "emoji", _emoji)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--cache", help="npm cache folder (default: ~/.cache/unclip/npm)")
    e.add_argument("--node-modules", help="use this existing node_modules folder instead of npm")
    e.add_argument("--workers", type=int, help="processes for rendering (default: all cores)")
    e.add_argument("--styles", nargs="+", help="build only these styles (ids: twemoji, noto…)")
    e.add_argument("--limit", type=int, help="at most this many images per style (for trials)")
    e.add_argument("--sheet", help="also write a contact sheet of 64 training images here")
    e.add_argument("--no-progress", action="store_true")

    c = add_command(verbs, "check", _check)
    c.add_argument("data", help="data set: folder, table (.csv/.parquet) or shards")
    c.add_argument("--split", help="a split named in the shard folder's manifest.jsonl")
    c.add_argument("--size", type=int, default=64)
    c.add_argument("--no-progress", action="store_true")

    s = add_command(verbs, "sheet", _sheet)
    s.add_argument("data", help="data set: folder, table (.csv/.parquet) or shards")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--split", help="a split named in the manifest")
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=int, default=0)


def _data(args: argparse.Namespace) -> int:
    """build the emoji data set; check or preview any data set

    Build the default emoji data set, or check and preview a data set (a folder of images +
    .txt captions, a CSV/Parquet table, or WebDataset shards).
    """
    return print_usage(args)


def write_sheet(data: str, out: str, split: str | None, n: int, seed: int) -> None:
    import torch

    from unclip.data.datasets import open_dataset
    from unclip.data.sheet import contact_sheet
    from unclip.data.transforms import from_tensor

    ds = open_dataset(data, split=split)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [ds[i] for i in order]
    sheet = contact_sheet(
        [from_tensor(it["image"]) for it in items], [it["caption"] for it in items]
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"unclip: wrote {out} ({len(items)} images)", file=sys.stderr)


def _emoji(args: argparse.Namespace) -> int:
    """build the ~23,000-image emoji set from npm packages

    Install the emoji packages with npm (into --cache, reused later), render every emoji at
    64×64 on white and write WebDataset shards, manifest.jsonl (captions, tags, style, licence,
    split) and stats.json into --out. Deterministic.
    """
    from unclip.data.emoji import build_emoji

    stats = build_emoji(
        args.out,
        cache=args.cache,
        modules=args.node_modules,
        workers=args.workers,
        styles=args.styles,
        limit=args.limit,
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps({k: v for k, v in stats.items() if k != "failed"}, indent=2))
    if args.sheet:
        write_sheet(args.out, args.sheet, "train", 64, 0)
    return 0


def _check(args: argparse.Namespace) -> int:
    """read every sample of a data set and report what would be skipped

    Decode every image of a data set and print the counts, the caption lengths and the samples
    a training run would skip (with the first few names).
    """
    from tqdm import tqdm

    from unclip.data.datasets import open_dataset

    ds = open_dataset(args.data, size=args.size, split=args.split)
    good = 0
    lengths = []
    for i in tqdm(range(len(ds)), desc="check", unit="img", disable=args.no_progress):
        try:
            _key, _image, caption = ds.image(i)
        except ValueError as e:
            ds.skips.add("not a readable image", str(e).split(": ", 1)[0])
            continue
        good += 1
        lengths.append(len(caption.split()))
    print(f"{args.data}: {good} readable samples of {len(ds)} listed")
    if lengths:
        lengths.sort()
        print(f"caption words: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    if ds.skips.total:
        print(ds.skips.summary())
    return 0 if good else 1


def _sheet(args: argparse.Namespace) -> int:
    """write a contact sheet of random samples with their captions

    Draw N random samples of a data set (seeded) into one PNG, captions below.
    """
    write_sheet(args.data, args.out, args.split, args.n, args.seed)
    return 0
