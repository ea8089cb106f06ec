"""``unclip eval``: measure a trained stage on a data split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unclip.commands import SAMPLER_NAMES, add_command, add_dtype_argument, print_usage


def register(sub: argparse._SubParsersAction) -> None:
    stages = add_command(sub, "eval", _eval).add_subparsers(dest="what", metavar="WHAT")
    c = add_command(stages, "clip", _eval_clip)
    c.add_argument("--clip", required=True, help="CLIP model folder (with tokenizer/)")
    c.add_argument("--tokenizer", help="tokenizer folder (default: CLIP_FOLDER/tokenizer)")
    c.add_argument("--data", required=True, help="shard folder with manifest.jsonl")
    c.add_argument("--split", action="append", help="split(s) to measure (default: val)")
    c.add_argument(
        "--zero-shot",
        action="append",
        default=None,
        metavar="FIELD=TEMPLATE",
        help="manifest field to classify and its prompt template(s), '|'-separated and "
        "averaged; {style} expands to every style of the data set "
        "(default: style='{} style|{group}, {} style' and group='{}, {style} style')",
    )
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pr = add_command(stages, "prior", _eval_prior)
    pr.add_argument("--prior", required=True,
                    help="prior model folder (a diffusion prior with diffusion.json, or an AR prior)")  # fmt: skip
    pr.add_argument("--clip", required=True, help="the CLIP folder the prior was trained with")
    pr.add_argument("--train-embeddings", required=True, help="`unclip embed` output of train")
    pr.add_argument("--embeddings", action="append", required=True, metavar="DIR",
                    help="`unclip embed` output of a split to measure (repeatable)")  # fmt: skip
    pr.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    pr.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1)")
    pr.add_argument("--candidates", type=int, default=2, help="samples per caption (default 2)")
    pr.add_argument("--temperature", type=float, default=1.0,
                    help="AR prior: sampling temperature (default 1; 0 = greedy)")  # fmt: skip
    pr.add_argument("--top-k", type=int, default=0, help="AR prior: top-k (default 0 = off)")
    pr.add_argument("--top-p", type=float, default=1.0, help="AR prior: top-p (default 1 = off)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pp = add_command(stages, "pipeline", _eval_pipeline)
    pp.add_argument("--pipeline", default="emoji-small", help="pipeline name or folder")
    pp.add_argument("--data", required=True, help="shard folder with manifest.jsonl")
    pp.add_argument("--split", action="append", help="split(s) (default: test)")
    pp.add_argument("--limit", type=int, help="at most this many captions per split")
    pp.add_argument("--no-prior-baseline", action="store_true", help="also measure z_t -> decoder")
    pp.add_argument("--decoder-sampler", choices=SAMPLER_NAMES,
                    help="override the pipeline's decoder sampler")  # fmt: skip
    pp.add_argument("--decoder-steps", type=int, help="override the pipeline's decoder steps")
    pp.add_argument("--prior-steps", type=int, help="override the pipeline's prior steps")
    pp.add_argument("--upsampler-steps", type=int, help="override the upsampler steps")
    pp.add_argument("--decoder-guidance", type=float,
                    help="override the decoder's guidance scale (1 = off)")  # fmt: skip
    pp.add_argument("--prior-guidance", type=float,
                    help="override the prior's guidance scale (1 = off)")  # fmt: skip
    pp.add_argument("--judge", metavar="CLIP",
                    help="measure in this CLIP's feature space instead of the pipeline's own (a "
                    "CLIP folder with tokenizer/, or a pipeline folder), to compare pipelines "
                    "built on different CLIPs")  # fmt: skip
    pp.add_argument("--by", metavar="FIELD",
                    help="also report retrieval top-1/top-5 for each value of this manifest "
                    "field (e.g. group: which kinds of emoji the pipeline draws recognisably)")  # fmt: skip
    add_dtype_argument(pp)
    pp.add_argument("--grid", help="write a contact sheet of the first 32 samples here")
    pp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pp.add_argument("--no-progress", action="store_true")


def _eval(args: argparse.Namespace) -> int:
    """measure a trained model on a data split (CLIP retrieval and zero-shot accuracy)

    Measure a trained model on a data split and print a table (or --json).
    """
    return print_usage(args)


#: ``unclip eval clip``'s default zero-shot prompts per manifest field (see expand_templates)
ZERO_SHOT_TEMPLATES = {"style": "{} style|{group}, {} style", "group": "{}, {style} style"}


def expand_templates(template: str, records) -> list[str]:
    """Prompt ensembling (CLIP §3.1.4): ``|`` separates templates, and ``{FIELD}`` expands a
    template into one per value of that manifest field (``"{}, {style} style"`` -> one per
    style); ``{}`` stays for the class name. The class embedding is the mean over them."""
    import re

    records = list(records)
    out: list[str] = []
    for t in template.split("|"):
        expanded = [t]
        for field in re.findall(r"\{(\w+)\}", t):
            values = sorted({str(r[field]) for r in records if r.get(field)})
            if not values:
                raise ValueError(f"template {t!r}: the manifest has no field {field!r}")
            expanded = [e.replace("{" + field + "}", v) for e in expanded for v in values]
        out += expanded
    return out


def zero_shot_classes(encode_text, records, field: str, template: str):
    """(class names: the sorted values of ``field`` in ``records``, their prompt embeddings
    [C, D] from ``template`` expanded over ``records`` (:func:`expand_templates`) and averaged
    per class). ``encode_text``: list of T texts -> [T, D]."""
    from unclip.eval.clip_eval import class_embeddings

    records = list(records)
    classes = sorted({str(r[field]) for r in records if r.get(field)})
    return classes, class_embeddings(encode_text, expand_templates(template, records), classes)


def evaluate_clip(clip_dir: str, data: str, split: str, zero_shot: dict[str, str],
                  batch_size: int = 256, tokenizer: str | None = None) -> dict[str, float]:  # fmt: skip

    import torch

    from unclip.clip.convert import load_clip
    from unclip.data.datasets import open_dataset
    from unclip.data.shards import read_manifest
    from unclip.eval.clip_eval import retrieval_metrics, zero_shot_accuracy
    from unclip.tokenizer import Tokenizer
    from unclip.train.stages.common import clip_tokenizer_dir

    model = load_clip(clip_dir)
    tok = Tokenizer.load(tokenizer or clip_tokenizer_dir(clip_dir))
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
            classes, class_emb = zero_shot_classes(
                lambda texts: model.encode_text(tok(texts, ctx)), records.values(), field, template
            )
            acc = zero_shot_accuracy(image_emb, truth, class_emb, classes)
            out[f"zero_shot_{field}"] = acc["accuracy"]
            out[f"zero_shot_{field}_mean_per_class"] = acc["mean_per_class"]
    return out


def _eval_clip(args: argparse.Namespace) -> int:
    """retrieval recall@1/5/10 and zero-shot style/group accuracy of a CLIP

    Encode every image and caption of a split with a CLIP and report text→image and image→text
    recall@1/5/10 among the split, and zero-shot accuracy for each manifest field given with
    --zero-shot FIELD=TEMPLATE (e.g. style='{} style').
    """
    zero_shot = dict(ZERO_SHOT_TEMPLATES)
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


def _eval_prior(args: argparse.Namespace) -> int:
    """cosine similarity of the prior's samples to the true CLIP image embeddings

    For every caption of the given embedding folders, compare three guesses of its image's CLIP
    embedding by mean cosine similarity to the true one: the caption embedding z_t itself, a
    linear regression z_t -> z_i fitted on --train-embeddings, and samples of the prior (a
    diffusion prior with DDIM, or an autoregressive prior).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from unclip.clip.text import TextEncoder
    from unclip.config import DIFFUSION_FILE, DiffusionConfig
    from unclip.data.embeddings import EmbeddingShards
    from unclip.diffusion import GaussianDiffusion
    from unclip.eval.prior_eval import (
        fit_linear_map,
        linear_map_predict,
        sample_ar_prior_embeddings,
        sample_prior_embeddings,
    )
    from unclip.hub import from_pretrained

    if args.steps < 1 or args.candidates < 1:
        raise ValueError("--steps and --candidates must be at least 1")
    prior = from_pretrained(args.prior)
    is_ar = prior.config.type_name == "ar_prior"
    diffusion = None
    if not is_ar:
        diffusion = GaussianDiffusion.from_config(
            DiffusionConfig.load(Path(args.prior) / DIFFUSION_FILE)
        )
    text = TextEncoder(args.clip)
    train = EmbeddingShards(args.train_embeddings)
    w = fit_linear_map(
        torch.from_numpy(np.asarray(train.text_emb, dtype=np.float32)),
        torch.from_numpy(np.asarray(train.image_emb, dtype=np.float32)),
    )
    results = {}
    for folder in args.embeddings:
        shards = EmbeddingShards(folder)
        z_t = F.normalize(torch.from_numpy(np.asarray(shards.text_emb, dtype=np.float32)), dim=-1)
        z_i = F.normalize(torch.from_numpy(np.asarray(shards.image_emb, dtype=np.float32)), dim=-1)
        if is_ar:
            sampled = sample_ar_prior_embeddings(
                prior, text, shards.captions, z_t, guidance=args.guidance,
                candidates=args.candidates, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p,
            )  # fmt: skip
        else:
            sampled = sample_prior_embeddings(
                prior, diffusion, text, shards.captions, z_t, steps=args.steps,
                guidance=args.guidance, candidates=args.candidates,
            )  # fmt: skip
        results[Path(folder).name] = {
            "captions": len(shards),
            "cos_text_embedding": (z_t * z_i).sum(-1).mean().item(),
            "cos_linear_regression": (linear_map_predict(w, z_t) * z_i).sum(-1).mean().item(),
            "cos_prior": (sampled * z_i).sum(-1).mean().item(),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("split".ljust(12) + "captions".rjust(10) + "z_t".rjust(10) + "linear".rjust(10)
          + "prior".rjust(10))  # fmt: skip
    for name, r in results.items():
        print(name.ljust(12) + str(r["captions"]).rjust(10)
              + "".join(f"{r[k]:.4f}".rjust(10) for k in ("cos_text_embedding",
                        "cos_linear_regression", "cos_prior")))  # fmt: skip
    return 0


def style_classes(judge, manifest: list[dict]):
    """(style names, their prompt embeddings [S, D] in ``judge``'s space) for zero-shot style
    naming with ``unclip eval clip``'s prompts ("{} style" alone where a record has no
    ``group``), or None where a manifest record has no ``style``."""
    if not manifest or not all(r.get("style") for r in manifest):
        return None
    grouped = all(r.get("group") for r in manifest)
    template = ZERO_SHOT_TEMPLATES["style"] if grouped else "{} style"
    return zero_shot_classes(judge.encode_text, manifest, "style", template)


def style_named(emb, records: list[dict], styles) -> float:
    """Share of the images (emb [N, D], one per record) whose closest style prompt of
    ``styles`` (from :func:`style_classes`) is their record's style."""
    from unclip.eval.clip_eval import zero_shot_accuracy

    names, style_emb = styles
    asked = [str(r["style"]) for r in records]
    return zero_shot_accuracy(emb, asked, style_emb, names)["accuracy"]


def evaluate_pipeline(pipe, records: list[dict], real_emb, *, use_prior: bool, overrides: dict,
                      progress: bool = True, keep_images: int = 0, judge=None,
                      styles=None, by: str | None = None):  # fmt: skip
    """Metrics of ``pipe`` generating one image per record (seed = index), in the feature space
    of ``judge`` (anything with ``encode_text``/``encode_image``; default the pipeline itself).

    With ``styles`` (:func:`style_classes`), also how often the judge names the asked style of
    the generated images (``style_named``); with ``by`` (a record field), retrieval top-1/top-5
    of the records of each of its values (``r@1 VALUE``, ``r@5 VALUE``; still among all the
    split's real images)."""
    import torch
    from tqdm import tqdm

    from unclip.eval.clip_eval import hits_at_k
    from unclip.eval.metrics import clip_score, frechet_distance, kernel_distance

    judge = judge or pipe
    gen_emb, kept = [], []
    step = max(1, pipe.max_batch)  # one call per batch: caption i still gets seed i
    with tqdm(total=len(records), desc="eval", unit="img", disable=not progress) as bar:
        for start in range(0, len(records), step):
            captions = [r["caption"] for r in records[start : start + step]]
            images = pipe.text_to_image(captions, seed=start, use_prior=use_prior, **overrides)
            gen_emb.append(judge.encode_image(images))
            kept.extend(images[: max(0, keep_images - len(kept))])
            bar.update(len(captions))
    gen = torch.cat(gen_emb)
    text = judge.encode_text([r["caption"] for r in records])
    sim = gen @ real_emb.T  # generated i vs real j; the caption's own image is j = i
    out = {
        "images": float(len(records)),
        "clip_score": clip_score(gen, text),
        "fd_clip": frechet_distance(gen, real_emb),
        "kid_clip": kernel_distance(gen, real_emb, subset_size=min(100, len(records))),
    }
    hits = {k: hits_at_k(sim, k).float() for k in (1, 5)}
    out.update({f"retrieval_r@{k}": h.mean().item() for k, h in hits.items()})
    if styles is not None:
        out["style_named"] = style_named(gen, records, styles)
    if by:
        values = [str(r.get(by)) for r in records]
        for value in sorted(set(values)):
            rows = torch.tensor([v == value for v in values])
            out.update({f"r@{k} {value}": h[rows].mean().item() for k, h in hits.items()})
    return out, kept


def _eval_pipeline(args: argparse.Namespace) -> int:
    """sample quality of a pipeline on a split: CLIP score, FD, KID, retrieval

    Generate one image per caption of a split (seed = row index) and report, in the pipeline's
    CLIP feature space (or --judge's): the CLIP score (cosine between the caption and the
    generated image), Fréchet distance and KID against the split's real images, and how often
    the generated image retrieves its caption's real image among the split's real images
    (top-1/top-5). Where the manifest gives each image a style: how often the CLIP names the
    asked style (zero-shot, with `unclip eval clip`'s prompts) of the generated images and, as a
    ceiling, of the real ones (real_style_named). With --no-prior-baseline the same numbers for
    the decoder fed z_t instead of a prior sample (the paper's §5.1 baseline).
    """
    from unclip.data.datasets import open_dataset
    from unclip.data.shards import read_manifest
    from unclip.data.sheet import contact_sheet
    from unclip.data.transforms import from_tensor
    from unclip.pipeline import load_pipeline

    pipe = load_pipeline(args.pipeline, dtype=args.dtype)
    judge = pipe
    if args.judge:
        from unclip.eval.judge import ClipJudge

        judge = ClipJudge(args.judge, pipe.image_size, pipe.device)
    keys = ("decoder_sampler", "decoder_steps", "prior_steps", "upsampler_steps",
            "decoder_guidance", "prior_guidance")  # fmt: skip
    overrides = {k: v for k in keys if (v := getattr(args, k)) is not None}
    manifest = {r["key"]: r for r in read_manifest(Path(args.data) / "manifest.jsonl")}
    styles = style_classes(judge, list(manifest.values()))  # once: the same for every split
    results, grid = {}, []
    for split in args.split or ["test"]:
        ds = open_dataset(args.data, split=split)
        n = min(len(ds), args.limit or len(ds))
        items = [ds[i] for i in range(n)]
        records = [manifest[it["key"]] for it in items]
        real = judge.encode_image([from_tensor(it["image"]) for it in items])
        real_named = None if styles is None else style_named(real, records, styles)
        modes = [("unclip", True)] + ([("no_prior", False)] if args.no_prior_baseline else [])
        for name, use_prior in modes:
            metrics, kept = evaluate_pipeline(
                pipe, records, real, use_prior=use_prior, overrides=overrides,
                progress=not args.no_progress, keep_images=32 if args.grid and not grid else 0,
                judge=judge, styles=styles, by=args.by,
            )  # fmt: skip
            if real_named is not None:  # the ceiling: the split's real images, named alike
                metrics["real_style_named"] = real_named
            results[f"{split}/{name}"] = metrics
            if kept:
                grid = list(zip(kept, [r["caption"] for r in records], strict=False))
    if args.grid and grid:
        contact_sheet([g[0] for g in grid], [g[1] for g in grid]).save(args.grid)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    space = f"CLIP {args.judge}" if args.judge else "the pipeline's own CLIP"
    print(f"(pipeline: {args.pipeline}; measured in the feature space of {space})", file=sys.stderr)
    names = list(dict.fromkeys(name for metrics in results.values() for name in metrics))
    width = max(16, *(len(name) + 2 for name in names))  # --by rows carry the value's name
    print("metric".ljust(width) + "".join(k.rjust(18) for k in results))
    for name in names:  # 4 significant figures: KID (about 1e-3) keeps its digits; - : no such row
        cells = (f"{m[name]:.4g}" if name in m else "-" for m in results.values())
        print(name.ljust(width) + "".join(c.rjust(18) for c in cells))
    return 0
