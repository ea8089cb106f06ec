"""``make demo``: generate an image with the shipped default model, or say why it cannot."""

from __future__ import annotations

import sys
from importlib import resources

from unclip.config import PIPELINE_FILE

DEFAULT_PIPELINE = "emoji-small"


def shipped_pipeline_dir(name: str = DEFAULT_PIPELINE):
    """The packaged pipeline folder ``name`` if it is installed with the package, else None."""
    root = resources.files("unclip") / "weights" / name
    return root if root.is_dir() and (root / PIPELINE_FILE).is_file() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prompt = argv[0] if argv else "a red apple, noto style"
    if shipped_pipeline_dir() is None:
        print(
            f"unclip: no default model yet: the '{DEFAULT_PIPELINE}' pipeline is not shipped in "
            "this version.\nThe package is installed; `make test` runs the suite, and "
            "`unclip --help` lists what works today.",
            file=sys.stderr,
        )
        return 0
    from unclip.cli import main as cli_main

    return cli_main(["generate", prompt, "--out", "demo", "--seed", "0"])


if __name__ == "__main__":
    sys.exit(main())
