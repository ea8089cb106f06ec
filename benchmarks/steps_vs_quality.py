"""Sample quality against decoder steps: Fréchet distance in CLIP feature space per sampler.

For each sampler (ddim, ddpm, dpmpp_2m) and decoder step count (5, 10, 25, 50, 100, 250),
the pipeline draws one image per caption of a data split (seed = row index; the prior and
upsamplers keep the pipeline's settings), and the Fréchet distance between the CLIP image
embeddings of the samples and of the split's real images is measured
(``unclip.eval.metrics.frechet_distance``, the FD of ``unclip eval pipeline``), together with
the CLIP score (mean cosine between each caption and its sample, as in ``unclip eval
pipeline``) and the seconds per image. The "knee" of a sampler is the fewest steps whose FD
is within ``--tolerance`` (default 5%) of its best FD and whose CLIP score is within
``--clip-tolerance`` (default 1%) of its best; the pipeline's default decoder setting should
sit there. The "fast" setting is the fewest steps, of any sampler, whose FD is within
``--fast-tolerance`` (default 3%) of the default setting's FD and whose CLIP score is within
``--clip-tolerance`` of the default's: what the ``fast`` sampling preset
(``unclip.pipeline.config.SAMPLING_PRESETS``, ``unclip generate --fast``) should be; the
section says whether it is.

``--steps`` takes one list for every sampler (``--steps 5,10,25``) or a list per sampler
(``--steps ddim=10,25 --steps dpmpp_2m=5,8,10``; samplers without one get the default
list). ``--reuse-prior`` samples each caption's prior z_i once and decodes it at every
setting (the prior and its seed do not change between settings, so the images are the same
as without it); its seconds are measured on the first setting and added to every row's.

Writes a line plot (``docs/steps_vs_quality.svg``; drawn by hand, no plotting library
needed), a Markdown section of docs/benchmarks.md, and JSON to stdout. FD from a few hundred
samples in 256 dimensions is biased upwards; compare the rows with each other, not with
other tables. The full run draws ``images × 6 × 3`` images (``--images 128``: about 2,300),
so plan on an hour or more on a 2-core CPU.

usage: python benchmarks/steps_vs_quality.py [--pipeline emoji-small] [--data data/emoji]
       [--split test] [--images 128] [--spread] [--steps [SAMPLER=]5,10,25,50,100,250 ...]
       [--samplers ddim,ddpm,dpmpp_2m] [--reuse-prior] [--quick]
       python benchmarks/steps_vs_quality.py --from-json RESULT.json [--from-json MORE.json]
       (re-render only)

``--from-json`` takes the JSON a full run printed and writes its table and plot again without
sampling anything, judging the knee and the fast setting against the pipeline's *current*
default decoder setting and ``fast`` preset (for when they change but the weights do not); the
section says it was re-rendered. Given more than once, the rows of the later runs (of the same
captions, seeds and precision: the same images at equal settings) are added to the first's, a
later row replacing an earlier one of the same sampler and steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import torch

from unclip.commands import SAMPLER_NAMES, add_dtype_argument
from unclip.commands.bench_report import machine_info, markdown_table, write_doc_section

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "steps_vs_quality.svg"
DEFAULT_STEPS = (5, 10, 25, 50, 100, 250)
SAMPLERS = SAMPLER_NAMES
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def real_set(
    pipe: Any, data: str, split: str | None, limit: int, spread: bool = False
) -> tuple[list[str], Any]:
    """(captions, CLIP image embeddings [N, D]) of the first ``limit`` items of the split, or
    with ``spread`` of ``limit`` items evenly spaced over it (a split is stored style by
    style, so its first items are of a few styles only)."""
    from unclip.data.datasets import open_dataset
    from unclip.data.transforms import from_tensor

    has_manifest = (Path(data) / "manifest.jsonl").is_file()
    ds = open_dataset(data, size=pipe.image_size, split=split if has_manifest else None)
    n = min(len(ds), limit)
    if n < 2:
        raise SystemExit(f"{data}: need at least 2 images, found {len(ds)}")
    index = [i * len(ds) // n for i in range(n)] if spread else range(n)
    items = [ds[i] for i in index]
    real = pipe.encode_image([from_tensor(it["image"]) for it in items])
    return [it["caption"] for it in items], real


class PriorCache:
    """Wraps ``pipe._sample_prior`` so that each batch of captions and seeds is sampled once:
    the decoder settings a run compares leave the prior's settings and seeds alone, so its
    z_i are the same at every setting. ``seconds``: time spent sampling (cache misses)."""

    def __init__(self, pipe: Any) -> None:
        self.sample = pipe._sample_prior
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.seconds = 0.0
        pipe._sample_prior = self

    def __call__(self, text: Any, seeds: Any, *args: Any, **kwargs: Any) -> Any:
        seeds_key = seeds if isinstance(seeds, int) else tuple(seeds)
        key = (text.text, tuple(text.z_t.shape), seeds_key)  # a run's seeds fix its captions
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = self.sample(text, seeds, *args, **kwargs)
            self.seconds += time.perf_counter() - t
        return self.cache[key]


def measure(
    pipe: Any,
    captions: list[str],
    real: Any,
    sampler: str,
    steps: int,
    prior: PriorCache | None = None,
    prior_seconds: float = 0.0,
) -> dict[str, float]:
    """FD, CLIP score and seconds per image of one decoder setting. With a ``prior`` cache,
    the seconds are those of the stages after the prior plus ``prior_seconds`` (per image)."""
    from unclip.eval.metrics import clip_score, frechet_distance

    before = prior.seconds if prior else 0.0
    t = time.perf_counter()
    feats = []
    step = max(1, pipe.max_batch)  # one call per batch: caption i still gets seed i
    for start in range(0, len(captions), step):
        images = pipe.text_to_image(
            captions[start : start + step], seed=start, decoder_sampler=sampler,
            decoder_steps=steps,
        )  # fmt: skip
        feats.append(pipe.encode_image(images))
    seconds = (time.perf_counter() - t) / len(captions)
    if prior is not None:
        seconds += prior_seconds - (prior.seconds - before) / len(captions)
    gen = torch.cat(feats)
    return {
        "fd": frechet_distance(gen, real),
        "clip_score": clip_score(gen, pipe.encode_text(captions)),
        "s_per_image": seconds,
    }


def knee(points: list[tuple[int, float]], tolerance: float, higher_is_better: bool = False) -> int:
    """The fewest steps whose value is within ``tolerance`` (relative) of the best value
    (the lowest, or the highest with ``higher_is_better``)."""
    if higher_is_better:
        best = max(v for _, v in points)
        return min(s for s, v in points if v >= best - abs(best) * tolerance - 1e-12)
    best = min(v for _, v in points)
    return min(s for s, v in points if v <= best + abs(best) * tolerance + 1e-12)


# ---------------------------------------------------------------------------------------------
# A hand-drawn SVG line plot (matplotlib is not a dependency)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values whose range covers [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    ticks = [round(math.floor(lo / step + 1e-9) * step, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def svg_line_plot(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    marker_x: float | None = None,
    marker_label: str = "",
    width: int = 640,
    height: int = 400,
) -> str:
    """Lines (log-scale x, linear y) with point markers, axes, ticks, a legend and an optional
    dashed vertical marker; returns the SVG document."""
    left, right, top, bottom = 70, 150, 40, 55
    pw, ph = width - left - right, height - top - bottom
    xs = sorted(
        {x for pts in series.values() for x, _ in pts} | ({marker_x} if marker_x else set())
    )
    ys = [y for pts in series.values() for _, y in pts]
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    if lx1 == lx0:
        lx0, lx1 = lx0 - 0.5, lx1 + 0.5
    pad = 0.04 * (lx1 - lx0)  # keep the end points off the frame
    lx0, lx1 = lx0 - pad, lx1 + pad
    margin = 0.05 * (max(ys) - min(ys))  # the y axis spans the values, not 0 to the top one
    yticks = _nice_ticks(min(ys) - margin, max(ys) + margin)
    y0, y1 = yticks[0], yticks[-1]

    def px(x: float) -> float:
        return left + (math.log10(x) - lx0) / (lx1 - lx0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="15">'
        f"{escape(title)}</text>",
    ]
    for y in yticks:
        yy = py(y)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" '
                   'stroke="#e5e5e5"/>')  # fmt: skip
        out.append(f'<text x="{left - 8}" y="{yy + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in xs:
        xx = px(x)
        out.append(f'<line x1="{xx:.1f}" y1="{top}" x2="{xx:.1f}" y2="{top + ph}" '
                   'stroke="#f0f0f0"/>')  # fmt: skip
        out.append(f'<text x="{xx:.1f}" y="{top + ph + 18}" text-anchor="middle">{x:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               'stroke="#333"/>')  # fmt: skip
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">'
               f"{escape(xlabel)}</text>")  # fmt: skip
    out.append(f'<text transform="translate(18 {top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')  # fmt: skip
    if marker_x:
        xx = px(marker_x)
        out.append(f'<line x1="{xx:.1f}" y1="{top}" x2="{xx:.1f}" y2="{top + ph}" '
                   'stroke="#555" stroke-dasharray="5,4"/>')  # fmt: skip
        out.append(f'<text x="{xx + 4:.1f}" y="{top + 14}" fill="#555">'
                   f"{escape(marker_label)}</text>")  # fmt: skip
    for k, (name, pts) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"/>')
        ly = top + 10 + 20 * k
        out.append(f'<line x1="{left + pw + 15}" y1="{ly}" x2="{left + pw + 40}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')  # fmt: skip
        out.append(f'<text x="{left + pw + 46}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="emoji-small", help="pipeline name or folder")
    p.add_argument("--data", default=str(REPO / "data" / "emoji"), help="data set of real images")
    p.add_argument("--split", default="test", help="split (shard folders with a manifest)")
    p.add_argument("--images", type=int, default=128, help="captions/images (default 128)")
    p.add_argument(
        "--spread",
        action="store_true",
        help="take the --images captions evenly spaced over the split, not its first ones",
    )
    p.add_argument("--steps", action="append", metavar="[SAMPLER=]N,N,...",
                   help="decoder step counts, comma-separated, for every sampler or (repeat "
                   "the flag) for one (default " + ",".join(map(str, DEFAULT_STEPS)) + ")")  # fmt: skip
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="samplers, comma-separated")
    p.add_argument("--tolerance", type=float, default=0.05, help="knee: FD within this of best")
    p.add_argument(
        "--fast-tolerance",
        type=float,
        default=0.03,
        help="fast setting: FD within this (relative) of the default setting's",
    )
    p.add_argument(
        "--reuse-prior",
        action="store_true",
        help="sample each caption's prior z_i once and decode it at every setting",
    )
    p.add_argument(
        "--clip-tolerance",
        type=float,
        default=0.01,
        help="knee: CLIP score within this (relative) of best",
    )
    add_dtype_argument(p, choices=("auto", "float32", "bfloat16"))
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--quick", action="store_true", help="6 images, steps 2 and 4")
    p.add_argument("--doc", help=f"Markdown file for the table (default in full mode: {DOC})")
    p.add_argument("--plot", help=f"SVG plot to write (default in full mode: {PLOT})")
    p.add_argument("--no-doc", action="store_true", help="write neither Markdown nor plot")
    p.add_argument(
        "--from-json",
        action="append",
        metavar="FILE",
        help="re-render the table and plot of an earlier run's JSON (no sampling), "
        "judged against the pipeline's current default; repeat to merge runs",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    from unclip.pipeline import load_pipeline

    images = min(args.images, 6) if args.quick else args.images
    doc, plot = output_paths(args)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    plan = step_plan(samplers, args.steps, [2, 4] if args.quick else list(DEFAULT_STEPS))
    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype)
    args.dtype = str(pipe.dtype).removeprefix("torch.")
    default = pipe.sampling_settings().decoder
    captions, real = real_set(pipe, args.data, args.split, images, args.spread)

    rows: list[dict[str, Any]] = []
    prior = PriorCache(pipe) if args.reuse_prior else None
    prior_seconds = 0.0
    for sampler in samplers:
        for k in plan[sampler]:
            r = measure(pipe, captions, real, sampler, k, prior, prior_seconds)
            if prior is not None and not prior_seconds:
                prior_seconds = prior.seconds / len(captions)
            rows.append({"sampler": sampler, "steps": k, **r})
            print(f"{sampler:9s} {k:4d} steps  FD {r['fd']:.4f}  CLIP {r['clip_score']:.4f}  "
                  f"{r['s_per_image']:.3f} s/img", file=sys.stderr)  # fmt: skip
    knees = sampler_knees(rows, samplers, args.tolerance, args.clip_tolerance)
    result = {
        "pipeline": pipe.name,
        "data": args.data,
        "split": args.split,
        "images": len(captions),
        "spread": args.spread,
        "dtype": args.dtype,
        "quick": args.quick,
        "default": {"sampler": default.sampler, "steps": default.steps},
        "tolerance": args.tolerance,
        "clip_tolerance": args.clip_tolerance,
        "knee_steps": knees,
        "default_at_knee": knees.get(default.sampler) == default.steps,
        "fast_tolerance": args.fast_tolerance,
        "fast": fast_setting(
            rows, default.sampler, default.steps, args.fast_tolerance, args.clip_tolerance
        ),
        "fast_preset": preset_setting(pipe, "fast"),
        "reuse_prior": args.reuse_prior,
        "prior_s_per_image": prior_seconds if prior is not None else None,
        "machine": machine_info(),
        "results": rows,
    }
    write_outputs(result, doc, plot)
    print(json.dumps(result, indent=2))
    return 0


def step_plan(
    samplers: list[str], specs: list[str] | None, default: list[int]
) -> dict[str, list[int]]:
    """Each sampler's decoder step counts from the ``--steps`` flags: ``N,N,...`` for every
    sampler, ``SAMPLER=N,N,...`` for one (later flags win); ``default`` where none is given."""
    plan = {s: list(default) for s in samplers}
    for spec in specs or []:
        name, sep, counts = spec.rpartition("=")
        try:
            steps = sorted({int(c) for c in counts.split(",") if c.strip()})
        except ValueError:
            raise SystemExit(f"--steps {spec}: not a comma-separated list of integers") from None
        if not steps or min(steps) < 1:
            raise SystemExit(f"--steps {spec}: give step counts of at least 1")
        if not sep:
            plan = {s: list(steps) for s in samplers}
        elif name in plan:
            plan[name] = steps
        else:
            raise SystemExit(f"--steps {spec}: {name!r} is not one of --samplers {samplers}")
    return plan


def fast_setting(
    rows: list[dict[str, Any]],
    sampler: str,
    steps: int,
    tolerance: float,
    clip_tolerance: float,
) -> dict[str, Any] | None:
    """The measured setting with the fewest decoder steps (then the lowest FD) whose FD is
    within ``tolerance`` (relative) of the default setting's (``sampler``, ``steps``) and
    whose CLIP score is within ``clip_tolerance`` of its; None if the default was not
    measured. Returns {"sampler", "steps", "fd_ratio", "clip_ratio"} (ratios to the
    default's)."""
    ref = next((r for r in rows if r["sampler"] == sampler and r["steps"] == steps), None)
    if ref is None:
        return None
    # relative to |ref|: an FD estimated from few images can come out negative
    ok = [
        r
        for r in rows
        if r["fd"] <= ref["fd"] + abs(ref["fd"]) * tolerance + 1e-12
        and r["clip_score"] >= ref["clip_score"] - abs(ref["clip_score"]) * clip_tolerance - 1e-12
    ]
    if not ok:  # NaN measurements
        return None
    best = min(ok, key=lambda r: (r["steps"], r["fd"]))
    return {
        "sampler": best["sampler"],
        "steps": best["steps"],
        "fd_ratio": best["fd"] / ref["fd"],
        "clip_ratio": best["clip_score"] / ref["clip_score"],
        "speedup": ref["s_per_image"] / best["s_per_image"],
    }


def preset_setting(pipe: Any, name: str) -> dict[str, Any]:
    """The decoder sampler and steps the sampling preset ``name`` gives on ``pipe``."""
    d = pipe.sampling_settings(preset=name).decoder
    return {"sampler": d.sampler, "steps": d.steps}


def output_paths(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(Markdown file, SVG plot) to write: the defaults in full mode, only what was asked
    for in quick mode, neither with ``--no-doc``."""
    if args.no_doc:
        return None, None
    if args.quick:
        return args.doc, args.plot
    return args.doc or str(DOC), args.plot or str(PLOT)


def sampler_knees(
    rows: list[dict[str, Any]], samplers: list[str], tolerance: float, clip_tolerance: float
) -> dict[str, int]:
    """Each sampler's knee: the larger of its FD knee and its CLIP-score knee."""
    knees = {}
    for s in samplers:
        mine = [r for r in rows if r["sampler"] == s]
        by_fd = knee([(r["steps"], r["fd"]) for r in mine], tolerance)
        by_clip = knee([(r["steps"], r["clip_score"]) for r in mine], clip_tolerance, True)
        knees[s] = max(by_fd, by_clip)
    return knees


def write_outputs(result: dict[str, Any], doc: str | None, plot: str | None) -> None:
    """Write the SVG plot (when ``plot``) and the docs section (when ``doc``) of a result."""
    d = result["default"]
    if plot:
        samplers = list(result["knee_steps"])
        rows = result["results"]
        series = {s: [(r["steps"], r["fd"]) for r in rows if r["sampler"] == s] for s in samplers}
        svg = svg_line_plot(
            series,
            title=f"FD (CLIP features) vs decoder steps — {result['pipeline']}, "
            f"{result['images']} images",
            xlabel="decoder steps (log scale)",
            ylabel="Fréchet distance, CLIP space (lower is better)",
            marker_x=d["steps"],
            marker_label=f"default ({d['sampler']}, {d['steps']})",
        )
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        Path(plot).write_text(svg, encoding="utf-8")
        result["plot"] = str(plot)
    if doc:
        write_doc_section(doc, "steps-vs-quality", format_markdown(result, doc, plot))


def rerender(args: argparse.Namespace) -> int:
    """``--from-json``: the table and plot of saved runs (merged), against today's default
    setting and ``fast`` preset."""
    from unclip.pipeline import load_pipeline

    same = ("pipeline", "data", "split", "images", "dtype", "quick")
    result: dict[str, Any] = {}
    for path in map(Path, args.from_json):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
            if not result:
                result = run
            elif any(run.get(k) != result.get(k) for k in (*same, "spread")):
                print(f"error: {path}: not a run of the same set ({', '.join(same)})",
                      file=sys.stderr)  # fmt: skip
                return 2
            else:
                new = {(r["sampler"], r["steps"]) for r in run["results"]}
                old = [r for r in result["results"] if (r["sampler"], r["steps"]) not in new]
                result["results"] = old + run["results"]
                result.setdefault("merged", []).append(run["machine"]["time"])
            rows = result["results"]
            samplers = list(dict.fromkeys(r["sampler"] for r in rows))
            knees = sampler_knees(rows, samplers, result["tolerance"], result["clip_tolerance"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {path}: not a steps_vs_quality result ({e})", file=sys.stderr)
            return 2
    pipe = load_pipeline(args.pipeline, device="cpu")
    default = pipe.sampling_settings().decoder
    result["knee_steps"] = knees
    result["default"] = {"sampler": default.sampler, "steps": default.steps}
    result["default_at_knee"] = knees.get(default.sampler) == default.steps
    result.setdefault("fast_tolerance", 0.03)
    result["fast"] = fast_setting(rows, default.sampler, default.steps,
                                  result["fast_tolerance"], result["clip_tolerance"])  # fmt: skip
    result["fast_preset"] = preset_setting(pipe, "fast")
    result["rerendered"] = machine_info()["time"]
    write_outputs(result, *output_paths(args))
    print(json.dumps(result, indent=2))
    return 0


def format_markdown(r: dict[str, Any], doc: str, plot: str | None) -> str:
    import os

    samplers = list(r["knee_steps"])
    steps = sorted({row["steps"] for row in r["results"]})
    fd = {(row["sampler"], row["steps"]): row for row in r["results"]}
    table = [
        (
            k,
            *(
                f"{fd[(s, k)]['fd']:.4f} / {fd[(s, k)]['clip_score']:.4f} "
                f"({fd[(s, k)]['s_per_image']:.2f} s)"
                if (s, k) in fd
                else "—"
                for s in samplers
            ),
        )
        for k in steps
    ]
    d = r["default"]
    lines = [
        "## Decoder steps vs sample quality",
        "",
        f"`python benchmarks/steps_vs_quality.py` — pipeline {r['pipeline']}, {r['images']} "
        f"captions of {r['data']} ({r['split']}"
        + (", evenly spaced over the split" if r.get("spread") else "")
        + "), one sample each (seed = row), "
        f"sampling in {r['dtype']}; {r['machine']['threads']} threads, {r['machine']['time']}."
        + (" **Quick mode: not a measurement.**" if r["quick"] else "")
        + (
            f" With the rows of {len(r['merged'])} more run{'s' * (len(r['merged']) > 1)} of "
            f"the same captions and seeds ({', '.join(r['merged'])}), each timed under its "
            "own load."
            if r.get("merged")
            else ""
        )
        + (
            f" Re-rendered from the JSON ({r['rerendered']}; `--from-json`): the measurements "
            "are the runs'."
            if r.get("rerendered")
            else ""
        ),
        "Cells: Fréchet distance to the real images in CLIP feature space (lower is better) / "
        "CLIP score (higher is better), and seconds per image end to end"
        + (
            f" (the prior sampled once per caption, {r['prior_s_per_image']:.2f} s per image, "
            "and its time added to every cell: `--reuse-prior`)."
            if r.get("reuse_prior")
            else "."
        ),
        "",
        markdown_table(["decoder steps", *samplers], table),
        "",
        "Knee (fewest steps within "
        f"{100 * r['tolerance']:.0f}% of the sampler's best FD and within "
        f"{100 * r['clip_tolerance']:.0f}% of its best CLIP score): "
        + ", ".join(f"{s} {k}" for s, k in r["knee_steps"].items())
        + f". Default: {d['sampler']} with {d['steps']} steps"
        + (" — at the knee." if r["default_at_knee"] else " — not at the knee."),
    ]
    if r.get("fast"):
        f, p = r["fast"], r["fast_preset"]
        tol = 100 * r["fast_tolerance"]
        lines += [
            "",
            f"Fast (fewest steps of any sampler within {tol:.0f}% of the default's FD and "
            f"{100 * r['clip_tolerance']:.0f}% of its CLIP score): {f['sampler']} with "
            f"{f['steps']} steps, FD {100 * (f['fd_ratio'] - 1):+.1f}% and CLIP score "
            f"{100 * (f['clip_ratio'] - 1):+.1f}% against the default. The `fast` preset "
            "(`--fast`): "
            f"{p['sampler']} with {p['steps']} steps"
            + (
                " — the measured setting."
                if (p["sampler"], p["steps"]) == (f["sampler"], f["steps"])
                else " — not the measured setting."
            ),
        ]
    if plot:
        rel = os.path.relpath(Path(plot).resolve(), Path(doc).resolve().parent)
        lines += ["", f"![FD vs decoder steps]({rel})"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
