"""Contact sheets: rows of captioned thumbnails to check by eye (the audit's near-duplicate groups, the
label-issue candidates, the visitors' feedback). Unreadable files keep their slot as a red box."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .decode import ImageLoadError, load_image

LINE_HEIGHT = 12


@dataclass(frozen=True)
class Thumbnail:
    """One picture of a sheet and the caption lines under it; ``highlight`` names the line drawn in red."""

    path: str | os.PathLike
    caption: Sequence[str]
    highlight: int | None = None


@dataclass(frozen=True)
class SheetRow:
    thumbnails: Sequence[Thumbnail]
    header: str | None = None  # a line above the row (the audit names each group)
    header_alert: bool = False  # drawn in red


@dataclass(frozen=True)
class SheetLayout:
    thumb: int = 112
    caption_lines: int = 3
    margin: int = 4
    columns: int | None = None  # width in thumbnails (default: the widest row)
    font: ImageFont.ImageFont = field(default_factory=ImageFont.load_default)


def grid(thumbnails: Sequence[Thumbnail], columns: int) -> list[SheetRow]:
    """Thumbnails in rows of ``columns``, no headers."""
    return [SheetRow(thumbnails[start : start + columns]) for start in range(0, len(thumbnails), columns)]


def draw_contact_sheet(rows: Sequence[SheetRow], path: str | os.PathLike, layout: SheetLayout = SheetLayout()) -> Path | None:
    """Draw ``rows`` into one PNG/JPEG at ``path``; None (nothing written) when there is nothing to show."""
    rows = [row for row in rows if row.thumbnails]
    if not rows:
        return None
    size, gap = layout.thumb, layout.margin
    columns = layout.columns or max(len(row.thumbnails) for row in rows)
    caption = LINE_HEIGHT * layout.caption_lines + 2
    height = sum((LINE_HEIGHT + 2 if row.header else 0) + size + caption for row in rows) + 2 * gap
    sheet = Image.new("RGB", (columns * (size + gap) + gap, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = gap
    for row in rows:
        if row.header:
            draw.text((gap, y), row.header, fill="red" if row.header_alert else "black", font=layout.font)
            y += LINE_HEIGHT + 2
        for column, thumbnail in enumerate(row.thumbnails[:columns]):
            x = gap + column * (size + gap)
            try:
                image = load_image(thumbnail.path)
                image.thumbnail((size, size))
                sheet.paste(image, (x + (size - image.width) // 2, y + (size - image.height) // 2))
            except ImageLoadError:  # reported elsewhere already; keep the slot visible
                draw.rectangle((x, y, x + size, y + size), outline="red")
            for line, words in enumerate(thumbnail.caption[: layout.caption_lines]):
                colour = "red" if line == thumbnail.highlight else "black"
                draw.text((x, y + size + 1 + LINE_HEIGHT * line), words, fill=colour, font=layout.font)
        y += size + caption
    sheet.save(path)
    return Path(path)
