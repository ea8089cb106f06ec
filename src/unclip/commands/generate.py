"""Generation commands: ``unclip generate|vary|interpolate|textdiff|edit|outpaint|rank``
(``mix``, ``img2img`` and ``generate --from-png`` are in :mod:`unclip.commands.remix`).

Each is a thin layer over one :class:`unclip.pipeline.UnclipPipeline` method, which it calls
itself (so the UNet runs four frames below the command function). Its docstring is its
``--help``. Inputs are
checked before the pipeline is loaded (:mod:`unclip.commands.gen_checks`: missing or
unreadable files, empty or overlong prompts, mask sizes, step counts), so a mistake costs one
line and no waiting. Images are generated in memory and written only when all of them
succeeded (:mod:`unclip.commands.outputs`). The options the commands share are in
:mod:`unclip.commands.gen_options`, the progress bar in :mod:`unclip.commands.progress`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from unclip.commands.gen_checks import (
    check_common,
    check_float,
    check_inpaint,
    check_int,
    load_images,
    read_prompts,
)
from unclip.commands.gen_options import (
    MASK_POLICY,
    RESIZE_POLICY,
    add_model_args,
    add_output_args,
    add_shared_args,
    command_parser,
    load_pipeline_from,
    pipeline_call,
)
from unclip.commands.outputs import atomic_save, seed_caption, write_results
from unclip.pipeline.config import MAX_OUTPAINT_MARGIN


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "generate", run_generate)
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
    p.add_argument("--from-png", metavar="FILE", help="instead of CAPTION: redo the call that "
                   "made FILE (an unclip PNG: text_to_image, variations, image_to_image or mix) "
                   "from its metadata; flags given too override its settings")  # fmt: skip
    add_shared_args(p, prior=True)

    p = command_parser(sub, "vary", run_vary, RESIZE_POLICY)
    p.add_argument("image", metavar="IMAGE", help="the image to vary")
    p.add_argument("-n", "--num", type=int, default=4, metavar="N", help="variations (default 4)")
    p.add_argument("--invert", action="store_true", help="start from the DDIM-inverted noise")
    p.add_argument("--eta", type=float, help="DDIM η in [0, 1] (default: 0.5 with --invert, "
                   "else the pipeline's)")  # fmt: skip
    add_shared_args(p, prior=False)

    p = command_parser(sub, "interpolate", run_interpolate, RESIZE_POLICY)
    p.add_argument("a", metavar="A", help="first image")
    p.add_argument("b", metavar="B", help="second image")
    p.add_argument("--frames", type=int, default=5, metavar="N", help="frames, >= 2 (default 5)")
    p.add_argument(
        "--invert-noise", action="store_true", help="interpolate the images' inverted noise"
    )
    add_shared_args(p, prior=False, negative=False)

    p = command_parser(sub, "textdiff", run_textdiff, RESIZE_POLICY)
    p.add_argument("image", metavar="IMAGE", help="the image to change")
    p.add_argument("--from", dest="source", required=True, metavar="TEXT",
                   help="caption describing the image now")  # fmt: skip
    p.add_argument("--to", dest="target", required=True, metavar="TEXT",
                   help="caption describing the wanted change")  # fmt: skip
    p.add_argument("--frames", type=int, default=5, metavar="N", help="frames, >= 2 (default 5)")
    p.add_argument("--max-theta", type=float, default=0.5, metavar="T",
                   help="largest slerp angle fraction, in (0, 1] (default 0.5)")  # fmt: skip
    p.add_argument("--no-invert", action="store_true", help="seeded noise, not inverted noise")
    add_shared_args(p, prior=False, negative=False)

    p = command_parser(sub, "edit", run_edit, RESIZE_POLICY, MASK_POLICY)
    p.add_argument("image", metavar="IMAGE", help="the image to edit")
    p.add_argument("prompt", metavar="CAPTION", help="what the repainted image should show")
    p.add_argument("--mask", metavar="MASK", help="mask image (white/transparent = repaint)")
    add_shared_args(p, prior=True, inpaint=True)

    p = command_parser(sub, "outpaint", run_outpaint, RESIZE_POLICY)
    p.add_argument("image", metavar="IMAGE", help="the image to extend")
    p.add_argument("prompt", metavar="CAPTION", help="what the grown image should show")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, metavar="PX",
                       help=f"pixels to add on the {side} (default 0; at most {MAX_OUTPAINT_MARGIN}x "
                       "the image's longer side)")  # fmt: skip
    add_shared_args(p, prior=True, inpaint=True)

    p = command_parser(sub, "rank", run_rank, RESIZE_POLICY)
    p.add_argument("prompt", metavar="CAPTION", help="the caption to rank against")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images to rank")
    p.add_argument("-k", "--top", type=int, metavar="K", help="print only the best K")
    add_model_args(p)
    add_output_args(p, images=False)


def run_generate(args: argparse.Namespace) -> int:
    """generate images from a caption (text -> prior -> decoder -> upsamplers)

    Generate images from a caption with the unCLIP pipeline (DALL·E 2 §2): the prior turns
    the caption's CLIP text embedding into an image embedding, the decoder and the upsamplers
    turn that into pixels. With --candidates N, N images are drawn and the --keep best by CLIP
    similarity to the caption are kept (CLIP re-ranking). --negative steers away from a
    caption; --from-png FILE makes an unclip PNG again from its metadata.
    """
    from unclip.pipeline.settings import MAX_IMAGES, check_prompt

    if args.from_png is not None:
        from unclip.commands.remix import redo_png

        return redo_png(args)
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give either a CAPTION or --prompts FILE (one caption per line)")
    prompts = read_prompts(args.prompts) if args.prompts else [check_prompt(args.prompt)]
    check_common(args)
    check_int(args.candidates, "--candidates", 1, MAX_IMAGES)
    if args.keep is not None:
        if args.candidates is None:
            raise ValueError("--keep needs --candidates (keep the best K of N candidates)")
        check_int(args.keep, "--keep", 1, args.candidates)
    elif args.candidates is not None and args.num > args.candidates:
        raise ValueError(f"-n {args.num} is more than --candidates {args.candidates}")
    prompt = prompts if args.prompts else prompts[0]
    keep = args.keep if args.candidates else None
    with pipeline_call(args, (args.candidates or args.num) * len(prompts)) as (pipe, shared):
        images = pipe.text_to_image(
            prompt,
            args.num,
            candidates=args.candidates,
            keep=keep,
            use_prior=not args.no_prior,
            **shared,
        )
    if args.prompts is None:
        return write_results(args, images, args.seed, seed_caption)
    names = [f"p{i // args.num}-{i % args.num}" for i in range(len(images))]
    return write_results(args, images, args.seed, lambda img: str(img.info.get("prompt", "")),
                         names=names, columns=args.num)  # fmt: skip


def run_vary(args: argparse.Namespace) -> int:
    """variations of an image (same CLIP embedding, new noise)

    Decode an image's CLIP image embedding with new noise (DALL·E 2 §3.1): images with the
    same content and style but different details. --invert starts from the image's
    DDIM-inverted noise instead, for variations closer to the original.
    """
    check_common(args)
    check_float(args.eta, "--eta", 0.0, 1.0)
    load_images([args.image])  # checked now; the pipeline reads it by path (its metadata names it)
    with pipeline_call(args, args.num) as (pipe, shared):
        images = pipe.variations(args.image, args.num, invert=args.invert, eta=args.eta, **shared)
    return write_results(args, images, args.seed, seed_caption)


def run_interpolate(args: argparse.Namespace) -> int:
    """interpolate between two images (slerp of CLIP image embeddings)

    Frames between two images (DALL·E 2 §3.2): frame k decodes the spherical interpolation of
    their CLIP image embeddings at k/(frames-1), with the same noise for every frame, or with
    --invert-noise the interpolation of both images' DDIM-inverted noise.
    """
    from unclip.pipeline.settings import MAX_IMAGES

    check_common(args)
    check_int(args.frames, "--frames", 2, MAX_IMAGES)
    a, b = load_images([args.a, args.b])
    with pipeline_call(args, args.frames) as (pipe, shared):
        images = pipe.interpolate(a, b, args.frames, invert_noise=args.invert_noise, **shared)
    return write_results(args, images, args.seed, lambda img: f"t = {img.info.get('t')}")


def run_textdiff(args: argparse.Namespace) -> int:
    """change an image along a text direction (DALL·E 2 text diffs)

    Text diffs (DALL·E 2 §3.3): move the image's CLIP embedding towards
    normalize(z_t(TO) - z_t(FROM)) by angles 0 … --max-theta, decoding each frame from the
    image's DDIM-inverted noise (or seeded noise with --no-invert).
    """
    from unclip.pipeline.settings import MAX_IMAGES, check_prompt

    check_prompt(args.source, "--from caption")
    check_prompt(args.target, "--to caption")
    check_common(args)
    check_int(args.frames, "--frames", 2, MAX_IMAGES)
    if not (math.isfinite(args.max_theta) and 0.0 < args.max_theta <= 1.0):
        raise ValueError(f"--max-theta must be in (0, 1], got {args.max_theta}")
    (image,) = load_images([args.image])
    with pipeline_call(args, args.frames) as (pipe, shared):
        images = pipe.text_diff(
            image,
            args.source,
            args.target,
            args.frames,
            max_theta=args.max_theta,
            invert=not args.no_invert,
            **shared,
        )
    # "theta", not "θ": the contact sheet's default font has no Greek letters
    return write_results(args, images, args.seed, lambda img: f"theta = {img.info.get('theta')}")


def _paint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments ``edit`` and ``outpaint`` pass alike to the pipeline."""
    return {
        "n": args.num,
        "use_prior": not args.no_prior,
        "repaint": args.repaint,
        "repaint_resample": args.resample,
        "repaint_jump": args.jump,
    }


def run_edit(args: argparse.Namespace) -> int:
    """repaint the masked part of an image to fit a caption (inpainting)

    Inpainting (GLIDE §4): repaint the masked region to fit CAPTION, with the pipeline's
    inpainting decoder when it has one, else RePaint with the plain decoder. Kept pixels are
    copied from the input. Without --mask, the image's own transparent pixels are repainted.
    """
    from unclip.pipeline.images import has_transparency
    from unclip.pipeline.settings import check_prompt

    check_prompt(args.prompt)
    check_common(args)
    check_inpaint(args)
    (image,) = load_images([args.image])
    mask = None
    if args.mask:
        (mask,) = load_images([args.mask], "mask")
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
    with pipeline_call(args, args.num) as (pipe, shared):
        images = pipe.inpaint(image, mask, args.prompt, **_paint_options(args), **shared)
    return write_results(args, images, args.seed, seed_caption)


def run_outpaint(args: argparse.Namespace) -> int:
    """grow an image's canvas and paint the new border to fit a caption

    Outpainting: add the margins (in pixels of the input image) and paint them to fit
    CAPTION. The grown canvas is centred on a white square that is resized to the output
    resolution and inpainted; the result is cropped back to the grown canvas (its longer side
    is the output resolution).
    """
    from unclip.pipeline.settings import check_prompt

    check_prompt(args.prompt)
    check_common(args)
    check_inpaint(args)
    (image,) = load_images([args.image])
    limit = MAX_OUTPAINT_MARGIN * max(image.size)
    margins = {s: getattr(args, s) for s in ("left", "right", "top", "bottom")}
    for side, value in margins.items():
        check_int(value, f"--{side}", 0, limit)
    if not any(margins.values()):
        raise ValueError("outpaint needs a margin: give --left, --right, --top or --bottom > 0")
    with pipeline_call(args, args.num) as (pipe, shared):
        options = {**margins, **_paint_options(args), **shared}
        images = pipe.outpaint(image, prompt=args.prompt, **options)
    return write_results(args, images, args.seed, seed_caption)


def run_rank(args: argparse.Namespace) -> int:
    """order images by CLIP similarity to a caption

    Score each image against CAPTION with the pipeline's CLIP (cosine similarity of the
    embeddings) and print the best first, one 'score<TAB>path' line each.
    """
    from unclip.data.sheet import contact_sheet
    from unclip.pipeline.events import image_info
    from unclip.pipeline.settings import check_prompt

    check_prompt(args.prompt)
    check_common(args)
    check_int(args.top, "-k", 1, len(args.images))
    images = load_images(args.images)
    pipe = load_pipeline_from(args)
    ranked = pipe.rank(args.prompt, images, k=args.top)
    infos = [image_info(img) for img in ranked]
    rows = [(info.clip_score, args.images[info.rank_index]) for info in infos]
    if args.grid:
        sheet = contact_sheet(
            ranked,
            [f"{score:.3f} {Path(p).name}" for score, p in rows],
            columns=min(8, len(ranked)),
        )
        atomic_save([(sheet, Path(args.grid), None)])
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
