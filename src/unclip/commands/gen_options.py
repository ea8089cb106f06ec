"""Options the generation commands share: their argument groups and help texts, and the
pipeline they name (``--pipeline/--device/--dtype/--compile``) and the sampling overrides
(``--sampler``, ``--*-steps``, ``--*-guidance``…, ``--fast``) turned into pipeline keyword
arguments.

A flag and the keyword it becomes live here together; nothing here imports torch (the
pipeline is imported inside :func:`load_pipeline_from`).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from unclip.commands import SAMPLER_NAMES, add_command, add_dtype_argument
from unclip.pipeline.config import (
    DEFAULT_REPAINT_JUMP,
    DEFAULT_REPAINT_RESAMPLE,
    MAX_REPAINT_RESAMPLE,
)

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


def command_parser(
    sub: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    *policies: str,
) -> argparse.ArgumentParser:
    """A generation command that calls ``run`` (:func:`unclip.commands.add_command`: the first
    paragraph of ``run``'s docstring is its help line, the rest its description), with the
    ``policies`` as further paragraphs of the description and, except for ``rank``, the output
    naming as epilog; each paragraph is wrapped on its own."""
    rest = inspect.cleandoc(run.__doc__ or "").partition("\n\n")[2]
    return add_command(
        sub,
        name,
        run,
        description="\n\n".join([rest, *policies]),
        epilog=OUTPUT_POLICY if name != "rank" else None,
        formatter_class=_ParagraphFormatter,
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--pipeline``, ``--device``, ``--dtype``, ``--compile``, ``--offload``."""
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
    g.add_argument(
        "--offload",
        action="store_true",
        help="keep the stages on the CPU and move each to the device only while it samples "
        "(one stage's weights on the GPU at a time: for a GPU too small for the pipeline)",
    )


def add_sampling_args(
    p: argparse.ArgumentParser,
    *,
    prior: bool,
    guidance: bool = True,
    negative: bool = True,
    no_prior: bool = True,
) -> None:
    """Seed, sampler and per-stage step/guidance overrides (prior ones if ``prior``, with
    ``--no-prior`` if ``no_prior`` too), and ``--negative`` if ``negative``."""
    g = p.add_argument_group("sampling (defaults: the pipeline's pipeline.json)")
    g.add_argument("--seed", type=int, help="seed of the first image; image i uses SEED+i "
                   "(default: random, reported in the metadata and --json)")  # fmt: skip
    if negative:
        g.add_argument("--negative", metavar="TEXT", help="negative prompt: a caption to steer "
                       "away from (guidance pushes from it instead of from no caption)")  # fmt: skip
    g.add_argument(
        "--sampler", choices=SAMPLER_NAMES, help="sampler for every stage (default per stage)"
    )
    g.add_argument(
        "--fast",
        action="store_true",
        help="the 'fast' preset: fewer decoder steps with a better sampler, FD within 3%% of "
        "the default's (its steps and cost: docs/benchmarks.md); the flags above and below win",
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
        if no_prior:
            g.add_argument(
                "--no-prior",
                action="store_true",
                help="feed the decoder the text embedding instead of a prior sample (§5.1 "
                "baseline)",
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


def add_output_args(p: argparse.ArgumentParser, images: bool = True) -> None:
    """``--out`` (if the command writes images), ``--grid``, ``--json``, ``--no-progress``."""
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


def add_inpaint_args(p: argparse.ArgumentParser) -> None:
    """``-n`` and the RePaint options of ``edit`` and ``outpaint``."""
    p.add_argument("-n", "--num", type=int, default=1, metavar="N", help="images (default 1)")
    g = p.add_argument_group("inpainting")
    g.add_argument("--repaint", action="store_true",
                   help="use RePaint even if the pipeline has an inpainting decoder")  # fmt: skip
    g.add_argument("--resample", type=int, default=DEFAULT_REPAINT_RESAMPLE, metavar="R",
                   help=f"RePaint: passes over each jump, 1-{MAX_REPAINT_RESAMPLE} (default "
                   f"{DEFAULT_REPAINT_RESAMPLE})")  # fmt: skip
    g.add_argument("--jump", type=int, default=DEFAULT_REPAINT_JUMP, metavar="J",
                   help=f"RePaint: steps to jump back up (default {DEFAULT_REPAINT_JUMP}, at "
                   "most half the steps)")  # fmt: skip


def add_shared_args(p: argparse.ArgumentParser, *, inpaint: bool = False, **sampling: bool) -> None:
    """The option groups every image-making command has (inpainting if ``inpaint``,
    sampling, model, output, in that order in --help); ``sampling``: the keywords of
    :func:`add_sampling_args` (``prior`` required)."""
    if inpaint:
        add_inpaint_args(p)
    add_sampling_args(p, **sampling)
    add_model_args(p)
    add_output_args(p)


@contextmanager
def pipeline_call(args: argparse.Namespace, count: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The pipeline of ``args`` and the keyword arguments every capability call takes from
    them: the seed, the sampling overrides, ``--negative`` where given, and a progress bar
    for ``count`` images (closed on exit). The command calls the capability itself."""
    from unclip.commands.progress import progress_bar

    pipe = load_pipeline_from(args)
    shared = {"seed": args.seed, **sampling_overrides(args)}
    if getattr(args, "negative", None) is not None:
        shared["negative_prompt"] = args.negative
    with progress_bar(args, count, pipe) as bar:
        yield pipe, {**shared, "progress": bar}


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given on the command line, as pipeline keyword arguments
    (``--fast``: ``preset="fast"``, which the other flags override)."""
    keys = ("sampler", "prior_steps", "prior_guidance", "prior_candidates", "decoder_steps",
            "decoder_guidance", "upsampler_steps", "upsampler_strength")  # fmt: skip
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "fast", False):
        out["preset"] = "fast"
    return out


def load_pipeline_from(args: argparse.Namespace) -> Any:
    """The pipeline ``--pipeline/--device/--dtype`` name (``--offload``: stages offloaded),
    compiled with ``--compile``."""
    from unclip.pipeline import load_pipeline

    offload = getattr(args, "offload", False)
    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype, offload=offload)
    return pipe.compile() if getattr(args, "compile", False) else pipe
