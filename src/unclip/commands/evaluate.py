"""``unclip eval``: measure a trained stage on a data split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure a trained model on a data split (CLIP retrieval and zero-shot accuracy)",
        description="Measure a trained model on a data split and print a table (or --json).",
    )
    stages = p.add_subparsers(dest="what", metavar="WHAT")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    c = stages.add_parser(
        "clip",
        help="retrieval recall@1/5/10 and zero-shot style/group accuracy of a CLIP",
        description="Encode every image and caption of a split with a CLIP and report "
        "text→image and image→text recall@1/5/10 among the split, and zero-shot accuracy for "
        "each manifest field given with --zero-shot FIELD=TEMPLATE (e.g. style='{} style').",
    )
    c.add_argument("--clip", required=True, help="CLIP model folder (with tokenizer/)")
    c.add_argument("--tokenizer", help="tokenizer folder (default: CLIP_FOLDER/tokenizer)")
    c.add_argument("--data", required=True, help="shard folder with manifest.jsonl")
    c.add_argument("--split", action="append", help="split(s) to measure (default: val)")
    c.add_argument(
        "--zero-shot",
        action="append",
        default=None,
        metavar="FIELD=TEMPLATE",
        help="manifest field to classify and its prompt template "
        "(default: style='{} style' and group='{}')",
    )
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_eval_clip)


def evaluate_clip(clip_dir: str, data: str, split: str, zero_shot: dict[str, str],
                  batch_size: int = 256, tokenizer: str | None = None) -> dict[str, float]:  # fmt: skip

    import torch

    from unclip.clip.convert import load_clip
    from unclip.data.datasets import open_dataset
    from unclip.data.shards import read_manifest
    from unclip.eval.clip_eval import retrieval_metrics, zero_shot_accuracy
    from unclip.tokenizer import Tokenizer

    model = load_clip(clip_dir)
    tok = Tokenizer.load(tokenizer or Path(clip_dir) / "tokenizer")
    ctx = model.config.context_length
    ds = open_dataset(data, split=split)
    records = {r["key"]: r for r in read_manifest(Path(data) / "manifest.jsonl")}
    imgs, texts, keys = [], [], []
    with torch.no_grad():
        for lo in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(lo, min(len(ds), lo + batch_size))]
            images = torch.stack([it["image"] for it in items])
            imgs.append(model.encode_image(model.preprocess(images)))
            texts.append(model.encode_text(tok([it["caption"] for it in items], ctx)))
            keys.extend(it["key"] for it in items)
        image_emb, text_emb = torch.cat(imgs), torch.cat(texts)
        out = {"images": float(len(keys)), **retrieval_metrics(image_emb, text_emb)}
        for field, template in zero_shot.items():
            truth = [str(records[k][field]) for k in keys]
            classes = sorted({str(r[field]) for r in records.values() if r.get(field)})
            class_emb = model.encode_text(tok([template.format(c) for c in classes], ctx))
            acc = zero_shot_accuracy(image_emb, truth, class_emb, classes)
            out[f"zero_shot_{field}"] = acc["accuracy"]
            out[f"zero_shot_{field}_mean_per_class"] = acc["mean_per_class"]
    return out


def _eval_clip(args: argparse.Namespace) -> int:
    zero_shot = {"style": "{} style", "group": "{}"}
    if args.zero_shot:
        zero_shot = {}
        for item in args.zero_shot:
            field, sep, template = item.partition("=")
            if not sep or "{}" not in template:
                raise ValueError(f"--zero-shot {item!r}: expected FIELD=TEMPLATE with {{}}")
            zero_shot[field] = template
    results = {
        split: evaluate_clip(
            args.clip, args.data, split, zero_shot, args.batch_size, args.tokenizer
        )
        for split in (args.split or ["val"])
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    names = list(next(iter(results.values())))
    print("metric".ljust(36) + "".join(s.rjust(10) for s in results))
    for name in names:
        row = "".join(
            (
                f"{results[s][name]:.0f}" if name == "images" else f"{100 * results[s][name]:.1f}%"
            ).rjust(10)
            for s in results
        )
        print(name.ljust(36) + row)
    print(f"(CLIP: {args.clip}; data: {args.data})", file=sys.stderr)
    return 0
