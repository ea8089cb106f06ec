"""Checks of the generation commands' inputs that need no model: flag ranges, the seed,
writable ``--out``/``--grid`` folders, input image files and ``--prompts`` files. They run
before the pipeline is loaded, so a mistake costs one line and no waiting; each raises
``ValueError`` or ``FileNotFoundError`` with one line naming the flag or file.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def check_int(value: int | None, flag: str, low: int, high: int) -> None:
    """Refuse ``value`` outside [low, high] in one line naming ``flag`` (None passes)."""
    if value is not None and not low <= value <= high:
        raise ValueError(f"{flag} must be between {low} and {high:,}, got {value}")


def check_float(value: float | None, flag: str, low: float, high: float) -> None:
    """Refuse a non-finite ``value`` or one outside [low, high] (None passes)."""
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{flag} must be between {low:g} and {high:g}, got {value}")


def check_common(args: argparse.Namespace) -> None:
    """The checks every generation command shares: step, guidance, candidate, -n and seed
    ranges, the ``--negative`` caption, a seed drawn when none was given, and writable
    ``--out``/``--grid`` places."""
    from unclip.pipeline.config import MAX_CANDIDATES, MAX_GUIDANCE, MAX_STEPS
    from unclip.pipeline.settings import MAX_IMAGES, MAX_SEED

    for flag in ("prior_steps", "decoder_steps", "upsampler_steps"):
        check_int(getattr(args, flag, None), "--" + flag.replace("_", "-"), 1, MAX_STEPS)
    for flag in ("prior_guidance", "decoder_guidance"):
        check_float(getattr(args, flag, None), "--" + flag.replace("_", "-"), 0.0, MAX_GUIDANCE)
    check_int(getattr(args, "prior_candidates", None), "--prior-candidates", 1, MAX_CANDIDATES)
    check_int(getattr(args, "num", None), "-n", 1, MAX_IMAGES)
    if getattr(args, "negative", None) is not None:
        from unclip.pipeline.settings import check_prompt

        check_prompt(args.negative, "--negative caption")
    check_int(getattr(args, "seed", None), "--seed", 0, MAX_SEED - MAX_IMAGES)
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


def load_images(paths: Sequence[str], what: str = "image") -> list[Any]:
    """Decode the input images with ``load_image``, refusing a missing file or a folder
    (before the decoder's modules, and torch, are imported)."""
    for name in paths:
        if not Path(name).exists():
            raise FileNotFoundError(f"{name}: no such {what} file")
        if Path(name).is_dir():
            raise ValueError(f"{name}: is a folder, not an {what} file")
    from unclip.data.transforms import load_image

    return [load_image(name) for name in paths]


def check_inpaint(args: argparse.Namespace) -> None:
    """The RePaint options of ``edit`` and ``outpaint``."""
    from unclip.pipeline.config import MAX_REPAINT_RESAMPLE, MAX_STEPS

    check_int(args.resample, "--resample", 1, MAX_REPAINT_RESAMPLE)
    check_int(args.jump, "--jump", 1, MAX_STEPS)


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
