"""Subcommands of the ``unclip`` command, one module per family (see ``unclip.cli``)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from unclip.pipeline.config import SAMPLER_NAMES as SAMPLER_NAMES  # re-exported for commands

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def add_dtype_argument(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str = "--dtype",
    choices: tuple[str, ...] = DTYPE_CHOICES,
) -> None:
    """The sampling-precision option every pipeline command shares (default auto)."""
    p.add_argument(
        flag,
        choices=choices,
        default="auto",
        help="precision the sampling networks run in (default auto, as load_pipeline: "
        "float32 on a CPU where unclip's compiled kernels run and bf16 has no AMX, else "
        "bfloat16 on a CPU with AVX-512 BF16 or AMX or a GPU with bf16, else float32; "
        "CLIP and the sampler state stay float32; UNCLIP_DTYPE in the environment overrides auto)",
    )


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name``, which calls ``run(args)``; its help is ``run``'s docstring.

    The docstring's first paragraph is the one line the parent's ``--help`` lists for it, the
    rest the description its own ``--help`` prints (the first paragraph again where there is
    no rest); argparse re-wraps both. ``kwargs`` go to ``add_parser`` (a ``description`` given
    there wins, for text built from constants). A command that needs a verb or stage after
    it has ``run`` print the help: ``args.parser`` is its parser.
    """
    summary, _, rest = (run.__doc__ or "").strip().partition("\n\n")  # no docs under -OO
    kwargs.setdefault("description", _unwrapped(rest) or _unwrapped(summary))
    p = sub.add_parser(name, help=_unwrapped(summary), **kwargs)
    p.set_defaults(func=run, parser=p)
    return p


def print_usage(args: argparse.Namespace) -> int:
    """For a command with verbs (``unclip data``), called without one: its help, exit code 2."""
    args.parser.print_help()
    return 2


def _unwrapped(text: str) -> str | None:
    return re.sub(r"\s+", " ", text).strip() or None
