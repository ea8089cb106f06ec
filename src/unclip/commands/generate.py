"""Generation commands: ``unclip generate|vary|interpolate|textdiff|edit|outpaint|rank``.

Each is a thin layer over one :class:`unclip.pipeline.UnclipPipeline` method. Inputs are
checked before the pipeline is loaded (missing or unreadable files, empty or overlong
prompts, mask sizes, step counts), so a mistake costs one line and no waiting. Images are
generated in memory and written only when all of them succeeded: each PNG goes to a
temporary name and is renamed into place, so a failure never leaves a partial file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unclip.commands import SAMPLER_NAMES, add_dtype_argument

DEFAULT_PIPELINE = "emoji-small"
DEFAULT_OUT = "unclip-out"

RESIZE_POLICY = (
    "Input images: any file Pillow reads (PNG, JPEG, WebP, GIF, BMP…) or SVG; RGBA and "
    "palette images are composited onto white, then the centre square is cropped (the "
    "shorter side is kept whole) and resized with Lanczos to the pipeline's output "
    "resolution."
)
MASK_POLICY = (
    "Mask convention: white or transparent = repaint, black = keep. A mask with any "
    "transparent pixel is read by its alpha channel only (alpha < 128 = repaint), otherwise "
    "by its grey level (>= 128 = repaint). The mask must have the image's size; it gets the "
    "same centre crop and a nearest-neighbour resize."
)
OUTPUT_POLICY = (
    "Output: PNGs named OUT/COMMAND-SEED-I.png (I = 0, 1, …) with the prompt, seed, steps, "
    "guidance, sampler and model in their text metadata; the same seed gives the same bytes "
    "on the same machine (another CPU, precision or -n may change a few grey levels). The "
    "output folder is checked before any model is loaded; nothing is written unless every "
    "image succeeded."
)


# ---------------------------------------------------------------------------------------------
# Parsers


class _ParagraphFormatter(argparse.HelpFormatter):
    """Wraps description and epilog paragraph by paragraph (blank lines are kept)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n\n".join(
            textwrap.fill(" ".join(part.split()), width, initial_indent=indent,
                          subsequent_indent=indent)
            for part in text.split("\n\n")
        )  # fmt: skip


def _parser(
    sub: argparse._SubParsersAction, name: str, help_text: str, description: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=OUTPUT_POLICY if name != "rank" else None,
        formatter_class=_ParagraphFormatter,
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        metavar="NAME_OR_PATH",
        help=f"a pipeline folder, or the name of a shipped pipeline (default: {DEFAULT_PIPELINE})",
    )
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    add_dtype_argument(g)
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the sampling networks: minutes of compiling first, faster "
        "sampling after (pays off for many images)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, *, prior: bool, guidance: bool = True) -> None:
    g = p.add_argument_group("sampling (defaults: the pipeline's pipeline.json)")
    g.add_argument("--seed", type=int, help="seed of the first image; image i uses SEED+i "
                   "(default: random, reported in the metadata and --json)")  # fmt: skip
    g.add_argument(
        "--sampler", choices=SAMPLER_NAMES, help="sampler for every stage (default per stage)"
    )
    if prior:
        g.add_argument("--prior-steps", type=int, metavar="N", help="prior sampling steps")
        g.add_argument(
            "--prior-guidance", type=float, metavar="W", help="prior guidance scale (1 = off)"
        )
        g.add_argument(
            "--prior-candidates",
            type=int,
            metavar="N",
            help="z_i samples per image; the one closest to the caption's z_t is kept",
        )
        g.add_argument(
            "--no-prior",
            action="store_true",
            help="feed the decoder the text embedding instead of a prior sample (§5.1 baseline)",
        )
    g.add_argument("--decoder-steps", type=int, metavar="N", help="decoder sampling steps")
    if guidance:
        g.add_argument(
            "--decoder-guidance", type=float, metavar="W", help="decoder guidance scale (1 = off)"
        )
    g.add_argument("--upsampler-steps", type=int, metavar="N", help="steps of each upsampler")
    g.add_argument(
        "--upsampler-strength",
        type=float,
        metavar="S",
        help="start each upsampler from its input noised to S·T (0 < S ≤ 1; 1 = pure noise)",
    )


def _add_output_args(p: argparse.ArgumentParser, images: bool = True) -> None:
    g = p.add_argument_group("output")
    if images:
        g.add_argument(
            "--out",
            default=DEFAULT_OUT,
            metavar="DIR",
            help=f"folder for the PNGs (created if needed; default: {DEFAULT_OUT})",
        )
    g.add_argument("--grid", metavar="PATH", help="also write a contact sheet PNG of the results")
    g.add_argument("--json", action="store_true", help="print machine-readable results to stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub,
        "generate",
        "generate images from a caption (text -> prior -> decoder -> upsamplers)",
        "Generate images from a caption with the unCLIP pipeline (DALL·E 2 §2): the prior "
        "turns the caption's CLIP text embedding into an image embedding, the decoder and the "
        "upsamplers turn that into pixels. With --candidates N, N images are drawn and the "
        "--keep best by CLIP similarity to the caption are kept (CLIP re-ranking).",
    )
    p.add_argument("prompt", metavar="CAPTION", nargs="?",
                   help="what to draw (1 to 1,000 characters)")  # fmt: skip
    p.add_argument("--prompts", metavar="FILE", help="instead of CAPTION: a text file with one "
                   "caption per line (blank lines and lines starting with # are skipped); every "
                   "caption gets -n images (seeds as with several prompts in text_to_image), files "
                   "OUT/generate-SEED-pP-I.png, "
                   "and --grid has one row per caption")  # fmt: skip
    p.add_argument("-n", "--num", type=int, default=1, metavar="N", help="images (default 1)")
    p.add_argument("--candidates", type=int, metavar="N", help="draw N images and re-rank by CLIP")
    p.add_argument("--keep", type=int, metavar="K", help="with --candidates: keep the best K "
                   "(default: -n)")  # fmt: skip
    _add_sampling_args(p, prior=True)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_generate)

    p = _parser(
        sub,
        "vary",
        "variations of an image (same CLIP embedding, new noise)",
        "Decode an image's CLIP image embedding with new noise (DALL·E 2 §3.1): images with "
        "the same content and style but different details. --invert starts from the image's "
        "DDIM-inverted noise instead, for variations closer to the original.\n\n" + RESIZE_POLICY,
    )
    p.add_argument("image", metavar="IMAGE", help="the image to vary")
    p.add_argument("-n", "--num", type=int, default=4, metavar="N", help="variations (default 4)")
    p.add_argument("--invert", action="store_true", help="start from the DDIM-inverted noise")
    p.add_argument("--eta", type=float, help="DDIM η in [0, 1] (default: 0.5 with --invert, "
                   "else the pipeline's)")  # fmt: skip
    _add_sampling_args(p, prior=False)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_vary)

    p = _parser(
        sub,
        "interpolate",
        "interpolate between two images (slerp of CLIP image embeddings)",
        "Frames between two images (DALL·E 2 §3.2): frame k decodes the spherical "
        "interpolation of their CLIP image embeddings at k/(frames-1), with the same noise "
        "for every frame, or with --invert-noise the interpolation of both images' "
        "DDIM-inverted noise.\n\n" + RESIZE_POLICY,
    )
    p.add_argument("a", metavar="A", help="first image")
    p.add_argument("b", metavar="B", help="second image")
    p.add_argument("--frames", type=int, default=5, metavar="N", help="frames, >= 2 (default 5)")
    p.add_argument(
        "--invert-noise", action="store_true", help="interpolate the images' inverted noise"
    )
    _add_sampling_args(p, prior=False)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_interpolate)

    p = _parser(
        sub,
        "textdiff",
        "change an image along a text direction (DALL·E 2 text diffs)",
        "Text diffs (DALL·E 2 §3.3): move the image's CLIP embedding towards "
        "normalize(z_t(TO) - z_t(FROM)) by angles 0 … --max-theta, decoding each frame from "
        "the image's DDIM-inverted noise (or seeded noise with --no-invert).\n\n" + RESIZE_POLICY,
    )
    p.add_argument("image", metavar="IMAGE", help="the image to change")
    p.add_argument("--from", dest="source", required=True, metavar="TEXT",
                   help="caption describing the image now")  # fmt: skip
    p.add_argument("--to", dest="target", required=True, metavar="TEXT",
                   help="caption describing the wanted change")  # fmt: skip
    p.add_argument("--frames", type=int, default=5, metavar="N", help="frames, >= 2 (default 5)")
    p.add_argument("--max-theta", type=float, default=0.5, metavar="T",
                   help="largest slerp angle fraction, in (0, 1] (default 0.5)")  # fmt: skip
    p.add_argument("--no-invert", action="store_true", help="seeded noise, not inverted noise")
    _add_sampling_args(p, prior=False)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_textdiff)

    p = _parser(
        sub,
        "edit",
        "repaint the masked part of an image to fit a caption (inpainting)",
        "Inpainting (GLIDE §4): repaint the masked region to fit CAPTION, with the pipeline's "
        "inpainting decoder when it has one, else RePaint with the plain decoder. Kept pixels "
        "are copied from the input. Without --mask, the image's own transparent pixels are "
        "repainted.\n\n" + RESIZE_POLICY + "\n\n" + MASK_POLICY,
    )
    p.add_argument("image", metavar="IMAGE", help="the image to edit")
    p.add_argument("prompt", metavar="CAPTION", help="what the repainted image should show")
    p.add_argument("--mask", metavar="MASK", help="mask image (white/transparent = repaint)")
    _add_inpaint_args(p)
    _add_sampling_args(p, prior=True)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_edit)

    p = _parser(
        sub,
        "outpaint",
        "grow an image's canvas and paint the new border to fit a caption",
        "Outpainting: add the margins (in pixels of the input image) and paint them to fit "
        "CAPTION. The grown canvas is centred on a white square that is resized to the output "
        "resolution and inpainted; the result is cropped back to the grown canvas (its longer "
        "side is the output resolution).\n\n" + RESIZE_POLICY,
    )
    p.add_argument("image", metavar="IMAGE", help="the image to extend")
    p.add_argument("prompt", metavar="CAPTION", help="what the grown image should show")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, metavar="PX",
                       help=f"pixels to add on the {side} (default 0; at most 4x the image side)")  # fmt: skip
    _add_inpaint_args(p)
    _add_sampling_args(p, prior=True)
    _add_model_args(p)
    _add_output_args(p)
    p.set_defaults(func=run_outpaint)

    p = _parser(
        sub,
        "rank",
        "order images by CLIP similarity to a caption",
        "Score each image against CAPTION with the pipeline's CLIP (cosine similarity of the "
        "embeddings) and print the best first, one 'score<TAB>path' line each.\n\n" + RESIZE_POLICY,
    )
    p.add_argument("prompt", metavar="CAPTION", help="the caption to rank against")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images to rank")
    p.add_argument("-k", "--top", type=int, metavar="K", help="print only the best K")
    _add_model_args(p)
    _add_output_args(p, images=False)
    p.set_defaults(func=run_rank)


def _add_inpaint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--num", type=int, default=1, metavar="N", help="images (default 1)")
    g = p.add_argument_group("inpainting")
    g.add_argument("--repaint", action="store_true",
                   help="use RePaint even if the pipeline has an inpainting decoder")  # fmt: skip
    g.add_argument("--resample", type=int, default=4, metavar="R",
                   help="RePaint: passes over each jump, 1-100 (default 4)")  # fmt: skip
    g.add_argument("--jump", type=int, default=5, metavar="J",
                   help="RePaint: steps to jump back up (default 5, at most half the steps)")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Checks that need no model


def _check_int(value: int | None, flag: str, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"{flag} must be between {low} and {high:,}, got {value}")


def _check_float(value: float | None, flag: str, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{flag} must be between {low:g} and {high:g}, got {value}")


def _check_common(args: argparse.Namespace) -> None:
    from unclip.pipeline.config import MAX_CANDIDATES, MAX_GUIDANCE, MAX_STEPS
    from unclip.pipeline.settings import MAX_IMAGES, MAX_SEED

    for flag in ("prior_steps", "decoder_steps", "upsampler_steps"):
        _check_int(getattr(args, flag, None), "--" + flag.replace("_", "-"), 1, MAX_STEPS)
    for flag in ("prior_guidance", "decoder_guidance"):
        _check_float(getattr(args, flag, None), "--" + flag.replace("_", "-"), 0.0, MAX_GUIDANCE)
    _check_int(getattr(args, "prior_candidates", None), "--prior-candidates", 1, MAX_CANDIDATES)
    _check_int(getattr(args, "num", None), "-n", 1, MAX_IMAGES)
    _check_int(getattr(args, "seed", None), "--seed", 0, MAX_SEED - MAX_IMAGES)
    if getattr(args, "seed", "absent") is None:
        import secrets

        args.seed = secrets.randbelow(2**31)  # drawn here so the file names can carry it
    out = getattr(args, "out", None)
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder")
        check_writable(Path(out), "--out")
    if args.grid:
        if Path(args.grid).is_dir():
            raise ValueError(f"--grid {args.grid}: is a folder; give a file name such as grid.png")
        check_writable(Path(args.grid).parent, "--grid")


def check_writable(folder: Path, flag: str) -> None:
    """Refuse, before any model is loaded, a folder that cannot be created or written: its
    nearest existing ancestor must be a folder we may write into (a file in the way or a
    read-only folder would otherwise fail only after sampling)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == folder else f"folder {existing}"
        raise ValueError(f"{flag} {folder}: cannot write into the {what} (permission denied)")


def _load_images(paths: Sequence[str], what: str = "image") -> list[Any]:
    from unclip.data.transforms import load_image

    images = []
    for name in paths:
        if not Path(name).exists():
            raise FileNotFoundError(f"{name}: no such {what} file")
        if Path(name).is_dir():
            raise ValueError(f"{name}: is a folder, not an {what} file")
        images.append(load_image(name))
    return images


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("sampler", "prior_steps", "prior_guidance", "prior_candidates", "decoder_steps",
            "decoder_guidance", "upsampler_steps", "upsampler_strength")  # fmt: skip
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _load(args: argparse.Namespace) -> Any:
    from unclip.pipeline import load_pipeline

    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype)
    return pipe.compile() if getattr(args, "compile", False) else pipe


# ---------------------------------------------------------------------------------------------
# Progress and output


class _Progress:
    """A tqdm bar on stderr fed by the pipeline's (stage, step) callback; one bar per stage
    run, labelled with the stage and the images it is drawing (a batch: "images 1-8/16")."""

    def __init__(self, enabled: bool, images: int, last_stage: str = "decoder") -> None:
        self.enabled = enabled
        self.images = images
        self.last_stage = last_stage  # an image is done when this stage finishes
        self.done = 0
        self.bar: Any = None

    def __call__(self, stage: str, step: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(file=sys.stderr, leave=False, dynamic_ncols=True)
        from unclip.pipeline.runners import step_images

        count = step_images(stage, step)
        if step.index == 0:
            first = min(self.done + 1, self.images)
            last = min(self.done + count, self.images)
            label = f"image {first}" if last <= first else f"images {first}-{last}"
            # the new label first: reset() redraws, and must not show the last stage's name
            self.bar.set_description(f"{label}/{self.images} {stage}", refresh=False)
            self.bar.reset(total=step.total)
        self.bar.update(1)
        if step.index == step.total - 1 and stage == self.last_stage:
            self.done += count

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(args: argparse.Namespace, images: int, pipe: Any) -> _Progress:
    from unclip.pipeline.config import upsampler_name

    last = "inpaint" if args.command in ("edit", "outpaint") else "decoder"
    if pipe.upsamplers:
        n = len(pipe.upsamplers)
        last = upsampler_name(n - 1)
    return _Progress(not args.no_progress, images, last)


def _pnginfo(info: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    import unclip

    meta = PngInfo()
    for key, value in info.items():
        if isinstance(value, str):
            meta.add_itxt(key, value)
    meta.add_itxt("software", f"unclip {unclip.__version__}")
    return meta


def _atomic_save(items: Sequence[tuple[Any, Path, Any]]) -> None:
    """Save (image, path, pnginfo) triples: all to temporary names, then all renamed."""
    temps: list[tuple[Path, Path]] = []
    try:
        for image, path, meta in items:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temps.append((tmp, path))
            image.save(tmp, format="PNG", pnginfo=meta)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()


def _decoded(info: dict[str, Any]) -> dict[str, Any]:
    """Image info for --json: the JSON-valued fields parsed, numbers as numbers."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if not isinstance(value, str):
            continue
        if key in ("steps", "guidance", "sampler", "margins"):
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        if key in ("seed", "frame", "rank_index"):
            out[key] = int(value)
        elif key in ("clip_score", "theta", "t", "eta"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _finish(
    args: argparse.Namespace,
    images: Sequence[Any],
    seed: int | None,
    captions: Callable[[Any], str],
    names: Sequence[str] | None = None,
    columns: int | None = None,
) -> int:
    """Write the PNGs (and the grid) atomically, then report paths (or JSON) on stdout.
    ``names``: file name suffixes (default 0, 1, …); ``columns``: of the grid (default ≤ 8)."""
    from unclip.data.sheet import contact_sheet

    out_dir = Path(args.out)
    names = names or [str(i) for i in range(len(images))]
    paths = [out_dir / f"{args.command}-{seed}-{name}.png" for name in names]
    items = [(img, path, _pnginfo(img.info)) for img, path in zip(images, paths, strict=True)]
    if args.grid:
        sheet = contact_sheet(
            images, [captions(img) for img in images], columns=columns or min(8, len(images))
        )
        items.append((sheet, Path(args.grid), None))
    _atomic_save(items)
    if args.json:
        doc = {
            "command": args.command,
            "pipeline": str(args.pipeline),
            "images": [
                {"path": str(path), **_decoded(img.info)}
                for img, path in zip(images, paths, strict=True)
            ],
            "grid": args.grid,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for path in paths:
            sys.stdout.write(f"{path}\n")
        print(f"unclip {args.command}: wrote {len(paths)} image(s) to {out_dir}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Commands


MAX_PROMPTS = 256


def read_prompts(path: str) -> list[str]:
    """Captions of a ``--prompts`` file: one per line, blank and ``#`` lines skipped."""
    from unclip.pipeline.settings import check_prompt

    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--prompts {path}: is a folder; give a text file, one caption per line")
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read ({e.strerror})") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"--prompts {path}: line {line} is not UTF-8 text ({e.reason})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(check_prompt(line, f"caption on line {number} of {path}"))
    if not prompts:
        raise ValueError(f"--prompts {path}: no captions (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"--prompts {path}: {len(prompts)} captions; the limit is {MAX_PROMPTS}")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from unclip.pipeline.settings import MAX_IMAGES, check_prompt

    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give either a CAPTION or --prompts FILE (one caption per line)")
    prompts = read_prompts(args.prompts) if args.prompts else [check_prompt(args.prompt)]
    _check_common(args)
    _check_int(args.candidates, "--candidates", 1, MAX_IMAGES)
    if args.keep is not None:
        if args.candidates is None:
            raise ValueError("--keep needs --candidates (keep the best K of N candidates)")
        _check_int(args.keep, "--keep", 1, args.candidates)
    elif args.candidates is not None and args.num > args.candidates:
        raise ValueError(f"-n {args.num} is more than --candidates {args.candidates}")
    pipe = _load(args)
    count = (args.candidates or args.num) * len(prompts)
    with _progress(args, count, pipe) as bar:
        images = pipe.text_to_image(
            prompts if args.prompts else prompts[0],
            n=args.num,
            seed=args.seed,
            candidates=args.candidates,
            keep=args.keep if args.candidates else None,
            use_prior=not args.no_prior,
            progress=bar,
            **_overrides(args),
        )
    if args.prompts is None:
        return _finish(args, images, args.seed, lambda img: f"seed {img.info.get('seed')}")
    names = [f"p{i // args.num}-{i % args.num}" for i in range(len(images))]
    return _finish(args, images, args.seed, lambda img: str(img.info.get("prompt", "")),
                   names=names, columns=args.num)  # fmt: skip


def run_vary(args: argparse.Namespace) -> int:
    _check_common(args)
    _check_float(args.eta, "--eta", 0.0, 1.0)
    (image,) = _load_images([args.image])
    pipe = _load(args)
    with _progress(args, args.num, pipe) as bar:
        images = pipe.variations(
            image,
            n=args.num,
            invert=args.invert,
            eta=args.eta,
            seed=args.seed,
            progress=bar,
            **_overrides(args),
        )
    return _finish(args, images, args.seed, lambda img: f"seed {img.info.get('seed')}")


def run_interpolate(args: argparse.Namespace) -> int:
    from unclip.pipeline.settings import MAX_IMAGES

    _check_common(args)
    _check_int(args.frames, "--frames", 2, MAX_IMAGES)
    a, b = _load_images([args.a, args.b])
    pipe = _load(args)
    with _progress(args, args.frames, pipe) as bar:
        images = pipe.interpolate(
            a,
            b,
            frames=args.frames,
            invert_noise=args.invert_noise,
            seed=args.seed,
            progress=bar,
            **_overrides(args),
        )
    return _finish(args, images, args.seed, lambda img: f"t = {img.info.get('t')}")


def run_textdiff(args: argparse.Namespace) -> int:
    from unclip.pipeline.settings import MAX_IMAGES, check_prompt

    check_prompt(args.source, "--from caption")
    check_prompt(args.target, "--to caption")
    _check_common(args)
    _check_int(args.frames, "--frames", 2, MAX_IMAGES)
    if not (math.isfinite(args.max_theta) and 0.0 < args.max_theta <= 1.0):
        raise ValueError(f"--max-theta must be in (0, 1], got {args.max_theta}")
    (image,) = _load_images([args.image])
    pipe = _load(args)
    with _progress(args, args.frames, pipe) as bar:
        images = pipe.text_diff(
            image,
            args.source,
            args.target,
            frames=args.frames,
            max_theta=args.max_theta,
            invert=not args.no_invert,
            seed=args.seed,
            progress=bar,
            **_overrides(args),
        )
    # "theta", not "θ": the contact sheet's default font has no Greek letters
    return _finish(args, images, args.seed, lambda img: f"theta = {img.info.get('theta')}")


def _check_inpaint(args: argparse.Namespace) -> None:
    from unclip.pipeline.config import MAX_STEPS

    _check_int(args.resample, "--resample", 1, 100)
    _check_int(args.jump, "--jump", 1, MAX_STEPS)


def run_edit(args: argparse.Namespace) -> int:
    from unclip.pipeline.images import has_transparency
    from unclip.pipeline.settings import check_prompt

    check_prompt(args.prompt)
    _check_common(args)
    _check_inpaint(args)
    (image,) = _load_images([args.image])
    mask = None
    if args.mask:
        (mask,) = _load_images([args.mask], "mask")
        if mask.size != image.size:
            raise ValueError(
                f"{args.mask}: the mask is {mask.size[0]}×{mask.size[1]} but {args.image} is "
                f"{image.size[0]}×{image.size[1]}; they must be the same size"
            )
    elif not has_transparency(image):
        raise ValueError(
            f"{args.image}: no --mask given and the image has no transparent pixels; pass "
            "--mask MASK (white or transparent = repaint)"
        )
    pipe = _load(args)
    with _progress(args, args.num, pipe) as bar:
        images = pipe.inpaint(image, mask, args.prompt, **_paint_options(args, bar))
    return _finish(args, images, args.seed, lambda img: f"seed {img.info.get('seed')}")


def _paint_options(args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """The keyword arguments ``edit`` and ``outpaint`` pass alike to the pipeline."""
    return {
        "n": args.num,
        "seed": args.seed,
        "use_prior": not args.no_prior,
        "repaint": args.repaint,
        "repaint_resample": args.resample,
        "repaint_jump": args.jump,
        "progress": bar,
        **_overrides(args),
    }


def run_outpaint(args: argparse.Namespace) -> int:
    from unclip.pipeline.settings import check_prompt

    check_prompt(args.prompt)
    _check_common(args)
    _check_inpaint(args)
    (image,) = _load_images([args.image])
    limit = 4 * max(image.size)
    margins = {s: getattr(args, s) for s in ("left", "right", "top", "bottom")}
    for side, value in margins.items():
        _check_int(value, f"--{side}", 0, limit)
    if not any(margins.values()):
        raise ValueError("outpaint needs a margin: give --left, --right, --top or --bottom > 0")
    pipe = _load(args)
    with _progress(args, args.num, pipe) as bar:
        images = pipe.outpaint(image, prompt=args.prompt, **margins, **_paint_options(args, bar))
    return _finish(args, images, args.seed, lambda img: f"seed {img.info.get('seed')}")


def run_rank(args: argparse.Namespace) -> int:
    from unclip.data.sheet import contact_sheet
    from unclip.pipeline.settings import check_prompt

    check_prompt(args.prompt)
    _check_common(args)
    _check_int(args.top, "-k", 1, len(args.images))
    images = _load_images(args.images)
    pipe = _load(args)
    ranked = pipe.rank(args.prompt, images, k=args.top)
    rows = [
        (float(img.info["clip_score"]), args.images[int(img.info["rank_index"])]) for img in ranked
    ]
    if args.grid:
        sheet = contact_sheet(
            ranked,
            [f"{score:.3f} {Path(p).name}" for score, p in rows],
            columns=min(8, len(ranked)),
        )
        _atomic_save([(sheet, Path(args.grid), None)])
    if args.json:
        doc = {
            "command": "rank",
            "prompt": args.prompt,
            "pipeline": str(args.pipeline),
            "ranking": [{"path": p, "score": score} for score, p in rows],
            "grid": args.grid,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for score, p in rows:
            sys.stdout.write(f"{score:.4f}\t{p}\n")
    return 0
