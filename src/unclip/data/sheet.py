"""Contact sheets: a grid of images with their captions, for looking at data and samples."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["contact_sheet"]


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    columns: int = 8,
    cell: int = 128,
    text_lines: int = 3,
) -> Image.Image:
    """Lay ``images`` out ``columns`` wide, each scaled to ``cell`` px, captions underneath."""
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    line_h = 13 if captions else 0
    pad = 6
    rows = (len(images) + columns - 1) // columns
    cell_h = cell + (line_h * text_lines + 4 if captions else 0)
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell // 6)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell + pad), pad + r * (cell_h + pad)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:text_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + cell + 2 + j * line_h), line, fill=(20, 20, 20), font=font)
    return sheet
