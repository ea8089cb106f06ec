"""Writing the generation commands' results: PNGs with their text metadata, the contact
sheet (``--grid``), and the paths or ``--json`` report on stdout. Every file is first saved
to a temporary name and all are renamed into place together, so a failure never leaves a
partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def seed_caption(image: Any) -> str:
    """An image's caption in a contact sheet: its seed."""
    return f"seed {image.info.get('seed')}"


def _pnginfo(image: Any) -> Any:
    """The PNG text chunks of an image: its metadata's text, then the software."""
    from PIL.PngImagePlugin import PngInfo

    import unclip
    from unclip.pipeline.events import image_info

    meta = PngInfo()
    for key, value in image_info(image).to_png_text().items():
        meta.add_itxt(key, value)
    meta.add_itxt("software", f"unclip {unclip.__version__}")
    return meta


def atomic_save(items: Sequence[tuple[Any, Path, Any]]) -> None:
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


def write_results(
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
    from unclip.pipeline.events import image_info

    out_dir = Path(args.out)
    names = names or [str(i) for i in range(len(images))]
    paths = [out_dir / f"{args.command}-{seed}-{name}.png" for name in names]
    items = [(img, path, _pnginfo(img)) for img, path in zip(images, paths, strict=True)]
    if args.grid:
        sheet = contact_sheet(
            images, [captions(img) for img in images], columns=columns or min(8, len(images))
        )
        items.append((sheet, Path(args.grid), None))
    atomic_save(items)
    if args.json:
        doc = {
            "command": args.command,
            "pipeline": str(args.pipeline),
            "images": [
                {"path": str(path), **image_info(img).to_dict()}
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
