"""Typeset generated panels into comic pages (Pillow only).

Layouts:

* ``none``       — no pages; the caller keeps the loose panels.
* ``four-panel`` — 2×2 grid per page, a 10 px white border around every panel, the last page padded
  with white panels.
* ``classic``    — a page is a stack of rows; a row is one full-width panel (``single``), two
  half-width panels side by side (``pair``), or one big panel beside two small stacked ones
  (``big-left`` / ``big-right``). Row kinds are drawn from a ``random.Random(seed)`` shuffle, so a
  seed always gives the same pages.

Captions are word-wrapped and drawn bottom-centre on a semi-transparent white box over the panel.
Panels whose shape differs from the target slot are centre-cropped (never stretched) to fit it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from storydiff_jax.errors import ConfigError

LAYOUTS = ("none", "four-panel", "classic")
BORDER = 10  # white border around each panel, in pixels; two borders make the gutter between panels
GUTTER = 2 * BORDER
WHITE = (255, 255, 255)
CAPTION_BOX = (255, 255, 255, 190)  # white at ~75 % opacity: the panel stays visible behind it
CAPTION_TEXT = (0, 0, 0, 255)
MAX_CAPTION_HEIGHT = 0.45  # a caption box never covers more than this fraction of the panel


def typeset(
    panels: list[Image.Image],
    captions: list[str | None] | None,
    layout: str,
    *,
    seed: int = 0,
    font_path: str | None = None,
) -> list[Image.Image]:
    """Lay ``panels`` (with their ``captions``, ``None`` entries for none) out as RGB comic pages."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown comic layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if captions is None:
        captions = [None] * len(panels)
    if len(captions) != len(panels):
        raise ConfigError(
            f"got {len(panels)} panels but {len(captions)} captions; pass one caption (or None) per panel"
        )
    fonts = _Fonts(font_path)  # checks the font path up front, even when no page gets drawn
    if layout == "none" or not panels:
        return []
    if layout == "four-panel":
        return _four_panel(panels, captions, fonts)
    return _classic(panels, captions, fonts, seed)


# ---------------------------------------------------------------------------------------- fonts


class _Fonts:
    """Fonts by pixel size: the user's TrueType file, or Pillow's scalable default font."""

    def __init__(self, font_path: str | None):
        self.font_path = font_path
        self._cache: dict[int, ImageFont.FreeTypeFont] = {}
        if font_path is not None:
            self.get(12)  # fail now with a clear message rather than halfway through a page

    def get(self, size: int):
        if size not in self._cache:
            if self.font_path is None:
                # Pillow >= 10.1 ships a scalable default font (needs FreeType, which wheels have).
                self._cache[size] = ImageFont.load_default(size=size)
            else:
                try:
                    self._cache[size] = ImageFont.truetype(self.font_path, size)
                except OSError as e:
                    raise ConfigError(
                        f"cannot load font {self.font_path!r} ({e}); pass a .ttf/.otf file "
                        "or leave the font unset to use the built-in one"
                    ) from None
        return self._cache[size]

    def for_panel(self, width: int):
        # ~24 characters of text per panel width reads well from thumbnails to full pages.
        return self.get(max(10, round(width / 24)))


# ------------------------------------------------------------------------------------- captions


def draw_caption(panel: Image.Image, caption: str | None, *, font_path: str | None = None) -> Image.Image:
    """A copy of ``panel`` (RGB) with ``caption`` bottom-centred on a translucent white box."""
    return _draw_caption(panel, caption, _Fonts(font_path))


def _draw_caption(panel: Image.Image, caption: str | None, fonts: _Fonts) -> Image.Image:
    panel = panel.convert("RGB")
    if not caption or not caption.strip():
        return panel
    font = fonts.for_panel(panel.width)
    size = font.size if hasattr(font, "size") else 10
    margin = max(3, size // 2)  # between the box and the panel edge
    pad = max(2, size // 3)  # between the text and the box edge
    spacing = max(1, size // 5)  # between lines
    ascent, descent = font.getmetrics()
    line_height = ascent + descent

    max_text_width = max(1, panel.width - 2 * (margin + pad))
    lines = _wrap(caption, font, max_text_width)
    # Keep the box from swallowing the picture: cut lines and mark the cut with "...".
    max_lines = max(1, int((panel.height * MAX_CAPTION_HEIGHT - 2 * pad + spacing) // (line_height + spacing)))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, max_text_width)

    widths = [font.getlength(line) for line in lines]
    box_w = int(max(widths)) + 2 * pad
    box_h = len(lines) * line_height + (len(lines) - 1) * spacing + 2 * pad
    left = (panel.width - box_w) // 2
    top = panel.height - margin - box_h

    overlay = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rounded_rectangle((left, top, left + box_w, top + box_h), radius=pad, fill=CAPTION_BOX)
    y = top + pad
    for line, width in zip(lines, widths):
        draw.text((round((panel.width - width) / 2), y), line, font=font, fill=CAPTION_TEXT)
        y += line_height + spacing
    return Image.alpha_composite(panel.convert("RGBA"), overlay).convert("RGB")


def _wrap(text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap; a word wider than a whole line is split between characters."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        # The word alone may still be too wide (a URL, a long name on a tiny panel).
        while font.getlength(word) > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


def _ellipsize(line: str, font, max_width: float) -> str:
    while line and font.getlength(line + "...") > max_width:
        line = line[:-1]
    return line.rstrip() + "..."


# ---------------------------------------------------------------------------------- four-panel


def _four_panel(panels, captions, fonts) -> list[Image.Image]:
    w, h = panels[0].size  # every panel is brought to the first one's size
    cell_w, cell_h = w + 2 * BORDER, h + 2 * BORDER
    cells = [_draw_caption(_fit(p, (w, h)), c, fonts) for p, c in zip(panels, captions)]
    cells += [Image.new("RGB", (w, h), WHITE)] * (-len(cells) % 4)  # pad to whole pages

    pages = []
    for start in range(0, len(cells), 4):
        page = Image.new("RGB", (2 * cell_w, 2 * cell_h), WHITE)
        for k, cell in enumerate(cells[start : start + 4]):
            row, col = divmod(k, 2)
            page.paste(cell, (col * cell_w + BORDER, row * cell_h + BORDER))
        pages.append(page)
    return pages


# ------------------------------------------------------------------------------------- classic

ROW_SIZES = {"single": 1, "pair": 2, "big-left": 3, "big-right": 3}


@dataclass(frozen=True)
class _Slot:
    x: int
    y: int  # relative to the row's top
    w: int
    h: int


def _row_slots(kind: str, width: int, aspect: float) -> list[_Slot]:
    """Panel slots of one row ``width`` px wide, in reading order; ``aspect`` is height / width."""
    if kind == "single":
        return [_Slot(0, 0, width, round(width * aspect))]
    if kind == "pair":
        half = (width - GUTTER) // 2
        height = round(half * aspect)
        return [_Slot(0, 0, half, height), _Slot(width - half, 0, half, height)]
    # A big panel beside a column of two small ones, every panel keeping the aspect ratio:
    # big_w + GUTTER + small_w = width and big_h = 2 * small_h + GUTTER.
    small_w = (width - GUTTER - GUTTER / aspect) / 3
    big_w = width - GUTTER - small_w
    big_h = round(big_w * aspect)
    small_h = (big_h - GUTTER) // 2
    small_w, big_w = round(small_w), round(big_w)
    if kind == "big-left":
        x_small = width - small_w
        return [
            _Slot(0, 0, big_w, big_h),
            _Slot(x_small, 0, small_w, small_h),
            _Slot(x_small, big_h - small_h, small_w, small_h),
        ]
    return [
        _Slot(0, 0, small_w, small_h),
        _Slot(0, big_h - small_h, small_w, small_h),
        _Slot(width - big_w, 0, big_w, big_h),
    ]


def _row_kinds(width: int, aspect: float) -> list[str]:
    kinds = ["single", "pair", "big-left", "big-right"]
    # On small panels the gutters would squeeze the small slots of a big+stack row to slivers.
    small_w = (width - GUTTER - GUTTER / aspect) / 3
    if small_w < width / 5:
        kinds = ["single", "pair"]
    return kinds


def plan_classic_pages(
    n_panels: int, seed: int, row_heights: dict[str, int], max_height: int
) -> list[list[str]]:
    """Row kinds, page by page, for ``n_panels`` panels.

    Rows come from a bag holding each kind in ``row_heights`` once, shuffled by
    ``random.Random(seed)``: the layout varies like a hand-drawn comic yet repeats for a seed. A page
    takes the next row from the bag that fits its remaining height (and the panels left); when none
    does, one more shuffled set of kinds joins the bag, and if still none fits the page is full.
    """
    rng = random.Random(seed)
    kinds = list(row_heights)
    bag: list[str] = []
    pages: list[list[str]] = [[]]
    used = 0  # content height of the current page
    left = n_panels
    refilled = False  # whether this page already added a set to the bag
    while left > 0:
        room = max_height - (used + GUTTER if pages[-1] else 0)
        # Rows are popped from the end of the bag; fitting rows are searched in that order too.
        fitting = [k for k in reversed(bag) if ROW_SIZES[k] <= left and row_heights[k] <= room]
        if not fitting:
            if not refilled:
                extra = list(kinds)
                rng.shuffle(extra)
                bag = extra + bag  # new rows go under the old ones, which are drawn first
                refilled = True
                continue
            # Nothing fits: start the next page. (An empty page always fits a `single` row, and
            # every set holds one, so this never loops.)
            pages.append([])
            used, refilled = 0, False
            continue
        kind = fitting[0]
        del bag[len(bag) - 1 - bag[::-1].index(kind)]  # remove the occurrence we picked
        used = row_heights[kind] if not pages[-1] else used + GUTTER + row_heights[kind]
        pages[-1].append(kind)
        left -= ROW_SIZES[kind]
    return pages


def _classic(panels, captions, fonts, seed: int) -> list[Image.Image]:
    w, h = panels[0].size
    aspect = h / w
    width = w  # a `single` row shows a panel at its native size
    max_content_h = 2 * h + GUTTER  # a page holds two `single` rows
    page_size = (width + 2 * BORDER, max_content_h + 2 * BORDER)
    slots = {kind: _row_slots(kind, width, aspect) for kind in _row_kinds(width, aspect)}
    heights = {kind: max(s.y + s.h for s in row) for kind, row in slots.items()}

    pages = []
    first = 0  # index of the next panel to place
    plan = plan_classic_pages(len(panels), seed, heights, max_content_h)
    for number, rows in enumerate(plan):
        # Spread a part-filled page's spare height over the gaps between rows so the panels
        # reach the bottom margin; the story's last page may stay short, so it is top-aligned.
        spare = max_content_h - sum(heights[k] for k in rows) - GUTTER * (len(rows) - 1)
        is_last = number == len(plan) - 1
        extra_gap = spare / (len(rows) - 1) if len(rows) > 1 and not is_last else 0.0

        page = Image.new("RGB", page_size, WHITE)
        y = float(BORDER)
        for kind in rows:
            for slot in slots[kind]:
                cell = _draw_caption(_fit(panels[first], (slot.w, slot.h)), captions[first], fonts)
                page.paste(cell, (BORDER + slot.x, round(y) + slot.y))
                first += 1
            y += heights[kind] + GUTTER + extra_gap
        pages.append(page)
    return pages


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` as RGB at exactly ``size``: resized, centre-cropped if the aspect ratio differs."""
    image = image.convert("RGB")
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
