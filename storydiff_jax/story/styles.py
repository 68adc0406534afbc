"""Style templates: wrap a panel prompt in a look (anime, film noir, ...) plus a negative prompt.

The wording is our own. A style keeps the panel's prompt first-class: ``{prompt}`` sits near the
start so the story text, not the style, leads the CLIP tokens (prompts are truncated at 77 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from storydiff_jax.errors import ConfigError


@dataclass(frozen=True)
class Style:
    name: str
    positive: str  # contains "{prompt}" exactly once
    negative: str


# Shared negatives: defects every style wants to avoid.
_DEFECTS = "blurry, low resolution, jpeg artifacts, deformed hands, extra fingers, watermark, signature, text"

STYLES: dict[str, Style] = {
    s.name: s
    for s in [
        Style("none", "{prompt}", ""),
        Style(
            "anime",
            "anime illustration of {prompt}, clean cel shading, expressive eyes, vivid colours, "
            "detailed background art",
            f"photo, realistic skin, 3d render, muddy colours, {_DEFECTS}",
        ),
        Style(
            "comic book",
            "comic book panel, {prompt}, bold ink outlines, flat bright colours, halftone dots, "
            "dynamic framing",
            f"photo, photorealistic, soft focus, washed-out colours, {_DEFECTS}",
        ),
        Style(
            "line art",
            "black ink line drawing of {prompt}, crisp clean strokes, white background, "
            "minimal shading, sketchbook style",
            f"colour, painted, gradients, photo, heavy shading, {_DEFECTS}",
        ),
        Style(
            "film noir",
            "black and white film still, {prompt}, hard low-key lighting, long shadows, "
            "1940s crime drama mood, film grain",
            f"colour, bright cheerful lighting, cartoon, anime, {_DEFECTS}",
        ),
        Style(
            "photographic",
            "photograph of {prompt}, natural light, 35mm lens, shallow depth of field, "
            "sharp detail, true-to-life colours",
            f"drawing, painting, cartoon, anime, illustration, plastic skin, {_DEFECTS}",
        ),
        Style(
            "oil painting",
            "oil painting of {prompt}, visible brushstrokes, rich layered pigment, canvas texture, "
            "warm gallery lighting",
            f"photo, digital flat colours, cartoon, vector art, {_DEFECTS}",
        ),
        Style(
            "3d animation",
            "3d animated film still, {prompt}, soft global illumination, stylised proportions, "
            "polished render, family movie look",
            f"photo, 2d flat drawing, sketch, grainy, uncanny realism, {_DEFECTS}",
        ),
        Style(
            "isometric",
            "isometric diorama of {prompt}, 45 degree overhead view, miniature world, "
            "tidy geometric shapes, soft even lighting",
            f"perspective distortion, fisheye, close-up portrait, photo, {_DEFECTS}",
        ),
    ]
}


def normalise_style_name(name: str) -> str:
    """`Comic-Book`, `comic_book` and ` comic  book ` all become `comic book`."""
    return " ".join(name.lower().replace("-", " ").replace("_", " ").split())


def get_style(name: str) -> Style:
    key = normalise_style_name(name)
    if key not in STYLES:
        valid = ", ".join(repr(n) for n in STYLES)
        raise ConfigError(f"unknown style {name!r}; choose one of {valid}")
    return STYLES[key]


def style_names() -> list[str]:
    return list(STYLES)


def apply_style(name: str, prompt: str, extra_negative: str = "") -> tuple[str, str]:
    """Return ``(positive, negative)`` prompts for a panel prompt in style ``name``.

    ``extra_negative`` (e.g. the user's own negative prompt) is appended to the style's negative.
    """
    style = get_style(name)
    # str.replace rather than str.format: a prompt or template with braces must not break this.
    positive = style.positive.replace("{prompt}", prompt.strip())
    negative = ", ".join(part for part in (style.negative, extra_negative.strip()) if part)
    return positive, negative
