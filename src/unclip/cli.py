"""The ``unclip`` command. ``main(argv)`` is callable from tests and returns an exit code.

Subcommands are registered in ``COMMANDS`` as they land; each has a ``--help``. Errors a user
can fix (bad config, missing file, refused weights) are printed as one line naming the file or
field, with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

import unclip
from unclip.commands import add_command

# Training stages: name -> (help, "module:run"). The module's ``run(args) -> int`` trains the
# stage; an optional ``add_args(parser)`` in the same module adds stage-specific flags. A module
# is imported only when its stage is parsed or its help shown, and imports torch only in the
# functions that train (so ``unclip train STAGE --help`` is quick); one that sets
# ``COMMON_TRAIN_ARGS = False`` does without --config/--run-dir/--resume (the tokenizer).
TRAIN_STAGES: dict[str, tuple[str, str]] = {
    "tokenizer": (
        "learn a byte-level BPE vocabulary from a data set's captions",
        "unclip.train.stages.tokenizer:run",
    ),
    "clip": (
        "train CLIP (text and image encoders) with the contrastive loss",
        "unclip.train.stages.clip:run",
    ),
    "prior": (
        "train the prior (caption embedding -> CLIP image embedding; diffusion or --type ar)",
        "unclip.train.stages.prior:run",
    ),
    "decoder": (
        "train the diffusion decoder (CLIP image embedding -> image; inpainting optional)",
        "unclip.train.stages.decoder:run",
    ),
    "upsampler": (
        "train a diffusion upsampler (low-resolution image -> image)",
        "unclip.train.stages.upsampler:run",
    ),
    "pipeline": (
        "assemble trained stages (CLIP, prior, decoder, upsamplers) into a pipeline folder",
        "unclip.train.stages.pipeline:run",
    ),
}

# Other subcommands: modules under unclip.commands with ``register(subparsers)``; each
# registers one or more commands (with ``unclip.commands.add_command``: the function a command
# runs documents it) and keeps heavy imports, torch above all, inside the functions it runs.
COMMAND_MODULES: list[str] = [
    "unclip.commands.data",
    "unclip.commands.embed",
    "unclip.commands.clip",
    "unclip.commands.evaluate",
    "unclip.commands.generate",
    "unclip.commands.remix",
    "unclip.commands.info",
    "unclip.commands.serve",
    "unclip.commands.bench",
    "unclip.commands.convert",
]


#: unclip's error classes that are the user's to fix (module, name)
_USER_ERROR_CLASSES = (
    ("unclip.config", "ConfigError"),
    ("unclip.hub", "HubError"),
    ("unclip.train.checkpoint", "CheckpointError"),
    ("unclip.train.loop", "TrainingDiverged"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports as one ``error:`` line. A class whose module was never
    imported cannot have been raised, so only loaded modules are looked in: reporting an
    argument error imports nothing (no torch)."""
    loaded = [getattr(sys.modules[m], n) for m, n in _USER_ERROR_CLASSES if m in sys.modules]
    return (
        *loaded,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        OSError,
    )


class _StageParser(argparse.ArgumentParser):
    """The parser of ``unclip train STAGE``: the stage's flags are added when it first parses
    or prints its help, so that building the ``unclip`` parser imports no stage module."""

    def __init__(self, *args: Any, target: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._target = target  # "module:run" of TRAIN_STAGES; "" once the flags are added

    def _add_stage_args(self) -> None:
        if not self._target:
            return
        module = importlib.import_module(self._target.partition(":")[0])
        self._target = ""
        if getattr(module, "COMMON_TRAIN_ARGS", True):
            add_common_train_args(self)
        if hasattr(module, "add_args"):
            module.add_args(self)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._add_stage_args()
        return super().parse_known_args(*args, **kwargs)

    def format_help(self) -> str:
        self._add_stage_args()
        return super().format_help()


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = add_command(sub, "train", _run_train)
    stages = train.add_subparsers(dest="stage", metavar="STAGE", parser_class=_StageParser)
    for name, (help_text, target) in sorted(TRAIN_STAGES.items()):
        stages.add_parser(name, help=help_text, description=help_text, target=target)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_common_train_args(p: argparse.ArgumentParser) -> None:
    """Flags every ``unclip train STAGE`` shares; the rest lives in the ``--config`` file."""
    p.add_argument(
        "--config", help="JSON run config (model, train, data…); on --resume, the run's own copy"
    )
    p.add_argument("--run-dir", required=True, help="folder for checkpoints and metrics.jsonl")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest whole checkpoint"
    )
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (no bf16 autocast)")
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        metavar="M",
        help="stop after M minutes of training, with a checkpoint and final/ of the step reached "
        "(--resume goes on later, on the same LR schedule)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun, shard weights, gradients and optimizer state across the processes "
        "(FSDP) instead of replicating them (DDP); for models too large for one device",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch (default: $UNCLIP_THREADS, else the machine's physical "
        "cores, not counting hyperthreads, divided among the processes torchrun starts on it); "
        "on a busy machine fewer threads than cores can be much faster",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(args: argparse.Namespace) -> int:
    """train a stage (CLIP, prior, decoder, upsampler) with the one training loop

    Train one stage of the pipeline. A run folder gets checkpoints/step-N/ folders (each a
    loadable model folder), checkpoints/latest and metrics.jsonl; --resume continues
    bit-for-bit from the newest whole checkpoint.
    """
    if not args.stage:
        if not TRAIN_STAGES:
            print(
                "unclip train: no training stages are available in this version yet",
                file=sys.stderr,
            )
            return 2
        args.parser.print_help()
        return 2
    module_name, _, attr = TRAIN_STAGES[args.stage][1].partition(":")
    fn: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module_name), attr)
    if not hasattr(args, "threads"):  # a stage that does not train (tokenizer, pipeline)
        return fn(args)
    import torch

    from unclip.train.distributed import set_threads

    before = torch.get_num_threads()
    set_threads(args.threads)
    try:
        return fn(args)
    finally:  # main() called from Python leaves the caller's setting as it was
        torch.set_num_threads(before)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip",
        description="unclip: DALL·E 2 (unCLIP) — text to image, variations, edits, and training.",
    )
    parser.add_argument("--version", action="version", version=f"unclip {unclip.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("unclip: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"unclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    if "unclip.train.distributed" in sys.modules:  # a torchrun rank that finished training
        sys.modules["unclip.train.distributed"].exit_after_group(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
