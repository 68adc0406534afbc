"""Comic typesetting (Pillow only): page counts and sizes, captions, determinism, font errors."""

import struct

import numpy as np
import pytest
from PIL import Image, ImageFont

from storydiff_jax.errors import ConfigError
from storydiff_jax.story import draw_caption, typeset
from storydiff_jax.story.comic import BORDER, GUTTER, plan_classic_pages


def make_panels(n, size=(96, 96)):
    """Distinct flat-colour panels, so a misplaced panel would show in the pixels."""
    rng = np.random.default_rng(0)
    return [Image.new("RGB", size, tuple(int(c) for c in rng.integers(40, 216, 3))) for _ in range(n)]


def as_array(image):
    return np.asarray(image, dtype=np.int16)


def test_none_layout_gives_no_pages():
    assert typeset(make_panels(3), [None] * 3, "none") == []
    assert typeset([], [], "four-panel") == []


@pytest.mark.parametrize("n, pages", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_four_panel_page_count_and_size(n, pages):
    w, h = 96, 64
    result = typeset(make_panels(n, (w, h)), None, "four-panel")
    assert len(result) == pages
    for page in result:
        assert page.mode == "RGB"
        assert page.size == (2 * (w + 2 * BORDER), 2 * (h + 2 * BORDER))


def test_four_panel_placement_and_padding():
    panels = make_panels(5)
    pages = typeset(panels, [None] * 5, "four-panel")
    second = as_array(pages[1])
    cell = 96 + 2 * BORDER
    # Panel 5 sits top-left of page 2 inside its border; the border and padding panels are white.
    assert (second[BORDER : BORDER + 96, BORDER : BORDER + 96] == as_array(panels[4])).all()
    assert (second[:BORDER] == 255).all() and (second[:, :BORDER] == 255).all()
    assert (second[:, cell:] == 255).all() and (second[cell:] == 255).all()


def test_panels_of_another_size_are_fitted():
    panels = make_panels(2, (96, 96)) + [Image.new("RGB", (200, 100), (0, 0, 255))]
    page = typeset(panels, None, "four-panel")[0]
    assert page.size == (2 * (96 + 2 * BORDER),) * 2
    blue = as_array(page)[96 + 3 * BORDER : 2 * 96 + 3 * BORDER, BORDER : 96 + BORDER]
    assert (blue == [0, 0, 255]).all()  # centre-cropped to the slot, not stretched with a border


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 12])
def test_classic_places_every_panel_on_equal_pages(n):
    panels = make_panels(n, (160, 128))
    pages = typeset(panels, None, "classic", seed=3)
    assert len(pages) >= 1 and len(pages) <= n
    for page in pages:
        assert page.size == (160 + 2 * BORDER, 2 * 128 + GUTTER + 2 * BORDER)
    # Every panel's colour shows up on some page (its slot may be scaled, not its colour).
    colours = set()
    for page in pages:
        colours |= {c for _, c in page.getcolors(maxcolors=1 << 16)}
    for panel in panels:
        assert panel.getpixel((0, 0)) in colours


def test_classic_page_count_follows_the_plan():
    heights = {"single": 128, "pair": 59, "big-left": 83, "big-right": 83}
    for seed in range(5):
        plan = plan_classic_pages(12, seed, heights, 2 * 128 + GUTTER)
        assert sum({"single": 1, "pair": 2, "big-left": 3, "big-right": 3}[k] for p in plan for k in p) == 12
        for rows in plan:  # each page's rows fit its height
            assert sum(heights[k] for k in rows) + GUTTER * (len(rows) - 1) <= 2 * 128 + GUTTER


def test_captions_are_drawn():
    panels = make_panels(4, (128, 128))
    plain = typeset(panels, [None] * 4, "four-panel")[0]
    captioned = typeset(panels, ["Hello there, this caption wraps over lines", None, None, "End"], "four-panel")[0]
    diff = np.abs(as_array(plain) - as_array(captioned)).sum(axis=2) > 0
    assert diff.any()
    # Only panels 1 and 4 changed, and only in their lower part (bottom-centred box).
    cell = 128 + 2 * BORDER
    assert diff[:cell, :cell].any() and diff[cell:, cell:].any()
    assert not diff[:cell, cell:].any() and not diff[cell:, :cell].any()
    assert not diff[: BORDER + 64, :cell].any()
    # Same for classic pages.
    plain = typeset(panels, None, "classic")
    captioned = typeset(panels, ["a", "b", "c", "d"], "classic")
    assert any((as_array(a) != as_array(b)).any() for a, b in zip(plain, captioned))


def test_caption_box_is_translucent_and_wraps():
    panel = Image.new("RGB", (200, 200), (200, 0, 0))
    out = as_array(draw_caption(panel, "one two three four five six seven eight nine ten eleven"))
    assert (out[:100] == [200, 0, 0]).all()  # top half untouched
    changed = np.argwhere((out != [200, 0, 0]).any(axis=2))
    assert changed[:, 0].max() - changed[:, 0].min() > 30  # several lines tall
    # The box lets some red through (semi-transparent) and has no pure-white pixels in its fill.
    box_colour = out[changed[:, 0].min() + 1, 100]
    assert 200 < box_colour[0] < 255 and box_colour[1] < 255
    # A caption that would cover the panel is cut to at most ~45 % of its height.
    out = as_array(draw_caption(panel, "word " * 400))
    assert (out[:100] == [200, 0, 0]).all()
    assert draw_caption(panel, None) is not panel and (as_array(draw_caption(panel, "  ")) == as_array(panel)).all()


def test_same_seed_same_bytes_different_seed_different_layout():
    panels = make_panels(12, (160, 160))
    captions = [f"Caption number {i}" for i in range(12)]
    for layout in ["four-panel", "classic"]:
        a = typeset(panels, captions, layout, seed=7)
        b = typeset(panels, captions, layout, seed=7)
        assert [p.tobytes() for p in a] == [p.tobytes() for p in b]
    layouts = {tuple(p.tobytes() for p in typeset(panels, captions, "classic", seed=s)) for s in range(3)}
    assert len(layouts) > 1
    heights = {"single": 160, "pair": 70, "big-left": 103, "big-right": 103}
    plans = {str(plan_classic_pages(12, s, heights, 340)) for s in range(4)}
    assert len(plans) > 1


def test_small_panels_use_single_and_pair_rows_only():
    # On 64 px panels the big+stack rows would leave slivers, so they are not used.
    pages = typeset(make_panels(9, (64, 64)), None, "classic", seed=1)
    assert all(p.size == (64 + 2 * BORDER, 2 * 64 + GUTTER + 2 * BORDER) for p in pages)


def test_font_path(tmp_path):
    bad = tmp_path / "missing.ttf"
    with pytest.raises(ConfigError, match="cannot load font"):
        typeset(make_panels(1), ["x"], "four-panel", font_path=str(bad))
    with pytest.raises(ConfigError, match="cannot load font"):
        typeset(make_panels(1), ["x"], "none", font_path=str(tmp_path))  # checked even with no pages
    junk = tmp_path / "junk.ttf"
    junk.write_bytes(b"not a font")
    with pytest.raises(ConfigError, match="junk.ttf"):
        typeset(make_panels(1), ["x"], "classic", font_path=str(junk))


def _bundled_font_bytes() -> bytes:
    """Pillow's bundled TrueType font (the built-in default), as a user's .ttf file would hold it."""
    data = ImageFont.load_default(size=12).font_variant().path  # a BytesIO for the bundled font
    data.seek(0)
    return data.read()


def _enlarged(font: bytes, factor: int) -> bytes:
    """The same font with its em square `factor` times smaller (the `head` table's unitsPerEm): FreeType then draws
    every glyph, ascent and descent `factor` times larger at the same requested pixel size."""
    tables = struct.unpack(">H", font[4:6])[0]
    for i in range(tables):
        tag, _, offset, _ = struct.unpack(">4sIII", font[12 + 16 * i:28 + 16 * i])
        if tag == b"head":
            at = offset + 18                    # head: version, revision, checksum, magic, flags, unitsPerEm
            units = struct.unpack(">H", font[at:at + 2])[0]
            return font[:at] + struct.pack(">H", units // factor) + font[at + 2:]
    raise AssertionError("no head table in the bundled font")


def _caption_rows(panels, caption, **kw) -> int:
    """How many pixel rows of the page the caption changes."""
    plain = as_array(typeset(panels, [None], "four-panel")[0])
    page = as_array(typeset(panels, [caption], "four-panel", **kw)[0])
    return int((plain != page).any(axis=(1, 2)).sum())


def test_font_path_is_used(tmp_path):
    panels = make_panels(1, (128, 128))
    same, large = tmp_path / "same.ttf", tmp_path / "large.ttf"
    same.write_bytes(_bundled_font_bytes())
    large.write_bytes(_enlarged(_bundled_font_bytes(), 3))
    # The same font file, once as shipped and once drawing its glyphs 3x as large at the requested size: if the
    # file were ignored (the built-in font drawn instead), both captions would be the same height.
    rows = _caption_rows(panels, "A caption", font_path=str(same))
    rows_large = _caption_rows(panels, "A caption", font_path=str(large))
    print(f"\ncaption rows: the font file {rows}, the same font drawn 3x larger {rows_large}, built-in font "
          f"{_caption_rows(panels, 'A caption')}")
    assert rows_large >= 2 * rows


def test_bad_arguments():
    with pytest.raises(ConfigError, match="four-panel"):
        typeset(make_panels(1), None, "manga")
    with pytest.raises(ConfigError, match="one caption"):
        typeset(make_panels(2), ["x"], "four-panel")
