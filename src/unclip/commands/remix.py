"""Generation commands that start from captions and images together, or from an earlier
result: ``unclip mix``, ``unclip img2img`` and ``unclip generate --from-png``.

Like the commands of :mod:`unclip.commands.generate`, each is a thin layer over one pipeline
method (``mix``, ``image_to_image``; ``--from-png`` the method the PNG names), checks its
inputs before the pipeline is loaded, and writes its images only when all of them succeeded.
Input images are passed to the pipeline as paths, so the outputs' metadata names them and
``--from-png`` can redo the call.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from unclip.commands.gen_checks import check_common, check_float, load_images
from unclip.commands.gen_options import (
    RESIZE_POLICY,
    add_shared_args,
    command_parser,
    pipeline_call,
)
from unclip.commands.outputs import seed_caption, write_results
from unclip.pipeline.config import DEFAULT_STRENGTH


def register(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "mix", run_mix, RESIZE_POLICY)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a caption, or an image file (an INPUT naming an existing file is an "
                   "image; one ending in .png, .jpg… that names none is an error)")  # fmt: skip
    p.add_argument("--weights", metavar="W1,W2,…", help="one weight >= 0 per INPUT, comma "
                   "separated (default: equal); normalised to sum 1")  # fmt: skip
    p.add_argument("-n", "--num", type=int, default=1, metavar="N", help="images (default 1)")
    add_shared_args(p, prior=True, no_prior=False)

    p = command_parser(sub, "img2img", run_img2img, RESIZE_POLICY)
    p.add_argument("image", metavar="IMAGE", help="the image to start from")
    p.add_argument("prompt", metavar="CAPTION", nargs="?",
                   help="what the new image should show (default: the image's own CLIP "
                   "embedding, no caption)")  # fmt: skip
    p.add_argument("--strength", type=float, metavar="S", help="how far to noise IMAGE, from "
                   f"0 (keep it) to 1 (pure noise: CAPTION alone) (default {DEFAULT_STRENGTH})")  # fmt: skip
    p.add_argument("-n", "--num", type=int, default=1, metavar="N", help="images (default 1)")
    add_shared_args(p, prior=True, no_prior=False)


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``--weights`` "0.7,0.3" -> [0.7, 0.3], checked against ``count`` inputs (None: none
    given); ValueError in one line naming the flag."""
    if text is None:
        return None
    from unclip.pipeline.mixing import check_weights

    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text}: not a comma-separated list of numbers") from None
    try:
        return check_weights(count, weights)
    except ValueError as e:
        raise ValueError(f"--weights {text}: {e}") from None


def run_mix(args: argparse.Namespace) -> int:
    """mix captions and images by weight (their CLIP image embeddings, slerped)

    Weighted mixing (DALL·E 2 §3): every INPUT becomes a CLIP image embedding (an image
    through CLIP, a caption through the prior), the embeddings are combined by --weights (a
    slerp of two, the renormalised weighted mean of more) and decoded, as variations are, from
    the mix alone. An input of weight 0 is left out: weights 1,0 give the first input's image.
    """
    from unclip.pipeline.mixing import MAX_MIX_INPUTS, is_image_input
    from unclip.pipeline.settings import check_prompt

    if len(args.inputs) > MAX_MIX_INPUTS:
        raise ValueError(f"{len(args.inputs)} inputs; mix combines at most {MAX_MIX_INPUTS}")
    weights = parse_weights(args.weights, len(args.inputs))
    kinds = [is_image_input(item) for item in args.inputs]
    for item, is_image in zip(args.inputs, kinds, strict=True):
        if not is_image:
            check_prompt(item, f"caption {item!r}")
    load_images([item for item, is_image in zip(args.inputs, kinds, strict=True) if is_image])
    check_common(args)
    with pipeline_call(args, args.num) as (pipe, shared):
        images = pipe.mix(args.inputs, weights, num_images=args.num, **shared)
    return write_results(args, images, args.seed, seed_caption)


def run_img2img(args: argparse.Namespace) -> int:
    """redraw an image under a caption, keeping as much of it as --strength says (SDEdit)

    Image to image (SDEdit): IMAGE is noised to --strength of the decoder's noise schedule and
    denoised under CAPTION's image embedding from the prior (or, without CAPTION, its own CLIP
    embedding). Strength 0 keeps the image, 1 ignores it (the same image `generate CAPTION`
    draws with the same seed); 0.4-0.7 keeps the layout and colours and changes the rest.
    """
    from unclip.pipeline.settings import check_prompt

    if args.prompt is not None:
        check_prompt(args.prompt)
    check_float(args.strength, "--strength", 0.0, 1.0)
    load_images([args.image])
    check_common(args)
    strength = {} if args.strength is None else {"strength": args.strength}
    with pipeline_call(args, args.num) as (pipe, shared):
        images = pipe.image_to_image(
            args.image, args.prompt, num_images=args.num, **strength, **shared
        )
    return write_results(args, images, args.seed, seed_caption)


def read_png_info(path: str) -> Any:
    """The :class:`~unclip.pipeline.events.ImageInfo` in a PNG's text chunks; one-line
    errors for a missing or unreadable file or one without unclip metadata."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from unclip.pipeline.events import ImageInfo

    if not Path(path).is_file():
        raise FileNotFoundError(f"--from-png {path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            text = dict(img.info)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"--from-png {path}: not a readable image ({e})") from None
    info = ImageInfo.from_png_text(text)
    if info.method is None:
        raise ValueError(f"--from-png {path}: no unclip metadata (not made by unclip?)")
    return info


def redo_png(args: argparse.Namespace) -> int:
    """``unclip generate --from-png FILE``: the call that made FILE, again (its method,
    inputs, seed, settings, negative prompt and strength; flags given override them: ``--fast``
    the settings its preset names, ``--sampler`` every stage's sampler), with a one-line
    warning when the pipeline's name or weights differ from FILE's."""
    from unclip.pipeline.mixing import is_image_input
    from unclip.pipeline.provenance import redo_call
    from unclip.pipeline.settings import layer_overrides

    if args.prompt is not None or args.prompts is not None:
        raise ValueError("--from-png redoes the PNG's call; give no CAPTION or --prompts with it")
    if args.candidates is not None or args.keep is not None or args.no_prior:
        raise ValueError("--from-png takes no --candidates, --keep or --no-prior")
    info = read_png_info(args.from_png)
    try:
        method, call_args, kwargs = redo_call(info)
    except ValueError as e:
        raise ValueError(f"--from-png {args.from_png}: {e}") from None
    inputs = call_args[0] if method == "mix" else call_args[:1] if method != "text_to_image" else []
    load_images([item for item in inputs if is_image_input(item)])
    if args.seed is None:
        args.seed = info.seed
    check_common(args)
    kwargs["n" if method in ("text_to_image", "variations") else "num_images"] = args.num
    with pipeline_call(args, args.num) as (pipe, shared):
        if pipe.name != info.model or pipe.weights_hash != info.weights_hash:
            print(
                f"unclip generate: warning: {args.from_png} was made by {info.model!r} (weights "
                f"{info.weights_hash}), this is {pipe.name!r} (weights {pipe.weights_hash}); "
                "the images may differ",
                file=sys.stderr,
            )
        images = getattr(pipe, method)(*call_args, **layer_overrides(kwargs, shared))
    return write_results(args, images, args.seed, seed_caption)
