"""The generation commands' progress bar on stderr, fed by the pipeline's progress stream."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unclip.pipeline.events import ProgressEvent


class Progress:
    """A tqdm bar on stderr fed by the pipeline's progress events; one bar per stage
    run, labelled with the stage and the images it is drawing (a batch: "images 1-8/16")."""

    def __init__(self, enabled: bool, images: int, last_stage: str = "decoder") -> None:
        self.enabled = enabled
        self.images = images
        self.last_stage = last_stage  # an image is done when this stage finishes
        self.done = 0
        self.bar: Any = None

    def __call__(self, stage: str, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(file=sys.stderr, leave=False, dynamic_ncols=True)
        count = event.images
        if event.index == 0:
            first = min(self.done + 1, self.images)
            last = min(self.done + count, self.images)
            label = f"image {first}" if last <= first else f"images {first}-{last}"
            # the new label first: reset() redraws, and must not show the last stage's name
            self.bar.set_description(f"{label}/{self.images} {stage}", refresh=False)
            self.bar.reset(total=event.total)
        self.bar.update(1)
        if event.last and stage == self.last_stage:
            self.done += count

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(args: argparse.Namespace, images: int, pipe: Any) -> Progress:
    """The bar for ``images`` images of ``pipe`` (off with ``--no-progress``); an image is
    done when the pipeline's last stage finishes."""
    from unclip.pipeline.config import upsampler_name

    last = "inpaint" if args.command in ("edit", "outpaint") else "decoder"
    if pipe.upsamplers:
        n = len(pipe.upsamplers)
        last = upsampler_name(n - 1)
    return Progress(not args.no_progress, images, last)
