"""Story scripts, style templates and comic typesetting (pure Python + Pillow; no jax, no torch)."""

from storydiff_jax.story.comic import LAYOUTS, draw_caption, typeset
from storydiff_jax.story.script import (
    NO_CHARACTER,
    Character,
    Panel,
    Story,
    default_id_length,
    id_plan,
    max_id_length,
    parse_script,
    parse_story,
    solo_panels,
)
from storydiff_jax.story.styles import STYLES, Style, apply_style, get_style, normalise_style_name, style_names

__all__ = [
    "LAYOUTS",
    "NO_CHARACTER",
    "STYLES",
    "Character",
    "Panel",
    "Story",
    "Style",
    "apply_style",
    "default_id_length",
    "draw_caption",
    "get_style",
    "id_plan",
    "max_id_length",
    "normalise_style_name",
    "parse_script",
    "parse_story",
    "solo_panels",
    "style_names",
    "typeset",
]
