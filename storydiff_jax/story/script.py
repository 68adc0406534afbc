"""Story scripts: parse the text format and plan which panels carry each character's identity.

The format (see ``examples/``)::

    [Lena] a young woman with short red hair, green raincoat
    [Max] a scruffy grey terrier with a blue collar

    [Lena] wakes up in a tiny attic room # Another rainy Monday.
    [Lena] [Max] walk along the harbour
    [NC] a lighthouse on a cliff at dusk # Far away, a light blinks.

* The first block (up to the first blank line, or a line ``---``) defines the characters, one
  ``[Name] description`` per line. A story with no characters starts with ``---``.
* Every later non-blank line is a panel. ``[Name]`` is replaced by the character's description;
  ``[NC]`` marks a panel without characters; the text after the *last* ``#`` is the caption.
* Lines starting with ``//`` are comments, anywhere.
* A character line may end with reference photos for photo mode (PhotoMaker, docs/identity.md):
  ``[Lena] a woman img with short red hair <ref: lena1.jpg, lena2.jpg>``; relative paths are read from the
  story file's folder. The marker is not part of the description.

StoryDiffusion's consistent self-attention needs a few "id panels" per character that are generated
together first and whose attention features every later ("read") panel borrows. We pick, for each
character, its first ``id_length`` panels that show that character *alone*: a panel that also shows
someone else would mix two identities into the shared features.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from storydiff_jax.errors import ConfigError, StoryError

NO_CHARACTER = "NC"  # the reserved tag of a panel without characters
SEPARATOR = "---"
COMMENT = "//"

# `[Name] description` — a name is any run of characters without brackets or '#'.
_CHARACTER_LINE = re.compile(r"^\[([^\[\]#]*)\](.*)$")
# A `[Name]` tag inside a panel line.
_TAG = re.compile(r"\[([^\[\]#]*)\]")
# Reference photos on a character line: `<ref: a.jpg, b.jpg>` (as A1111's `<lora:...>`, kept out of the prompt).
_REF_MARKER = re.compile(r"<\s*ref\s*:([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class Character:
    name: str
    description: str
    line: int  # 1-based line of the definition
    photos: tuple[str, ...] = ()  # reference photos from a `<ref: ...>` marker (photo mode)


@dataclass(frozen=True)
class Panel:
    index: int  # 0-based position in the story
    prompt: str  # the text prompt, tags replaced by descriptions, spaces normalised
    caption: str | None  # text after the last '#', None when there is none (or it is blank)
    characters: tuple[str, ...]  # names in order of first mention, without repeats
    no_character: bool  # the line was marked [NC]
    line: int  # 1-based line in the story file


@dataclass
class Story:
    characters: dict[str, Character]
    panels: list[Panel]
    # name -> indices of that character's id panels, in story order. Only characters that appear
    # in at least one panel are keys.
    id_panels: dict[str, list[int]] = field(default_factory=dict)
    id_length: int = 0

    def read_panels(self) -> list[int]:
        """Indices of the panels that are not id panels, in story order."""
        ids = {i for indices in self.id_panels.values() for i in indices}
        return [p.index for p in self.panels if p.index not in ids]


def parse_story(text: str, *, id_length: int | None, known_characters: Iterable[str] = (),
                photo_dir: str | None = None) -> Story:
    """Parse a story script and plan its id panels.

    ``id_length=None`` picks ``default_id_length(story)`` (the CLI should say which it picked).
    ``known_characters``: characters whose bank is already loaded: they need no id panels.
    ``photo_dir``: the folder relative ``<ref: ...>`` photo paths are read from (the story file's; None: as given).
    Raises ``StoryError`` (with the line number) for anything the script gets wrong.
    """
    story = parse_script(text, photo_dir=photo_dir)
    known = set(known_characters)
    if id_length is None:
        id_length = default_id_length(story, skip=known)
    story.id_panels = id_plan(story, id_length, skip=known)
    story.id_length = id_length
    return story


def parse_script(text: str, *, photo_dir: str | None = None) -> Story:
    """Parse the characters and panels only, without an id plan (``story.id_panels`` is empty)."""
    lines = text.splitlines()
    # Skip leading blank lines and comments: the character block starts at the first real line.
    pos = 0
    while pos < len(lines) and _is_skippable(lines[pos]):
        pos += 1
    if pos == len(lines):
        raise StoryError(
            "the story is empty; write `[Name] description` lines, a blank line, then one panel per line",
            line=1,
        )

    characters: dict[str, Character] = {}
    while pos < len(lines):
        raw = lines[pos].strip()
        pos += 1
        if raw == "" or raw == SEPARATOR:
            break  # end of the character block
        if raw.startswith(COMMENT):
            continue
        character = _parse_character(raw, pos, photo_dir)  # pos is now the 1-based number of this line
        if character.name in characters:
            first = characters[character.name].line
            raise StoryError(
                f"character [{character.name}] is defined twice (first on line {first}); "
                "give each character one line, or rename one of them",
                line=pos,
            )
        characters[character.name] = character

    panels: list[Panel] = []
    for number in range(pos + 1, len(lines) + 1):
        raw = lines[number - 1].strip()
        # A `---` after a blank-line separator is tolerated rather than becoming a panel "---".
        if _is_skippable(raw) or raw == SEPARATOR:
            continue
        panels.append(_parse_panel(raw, number, len(panels), characters))

    if not panels:
        raise StoryError(
            "the story has no panels; after the character lines add a blank line (or `---`) "
            "and then one panel per line",
            line=max(len(lines), 1),
        )
    return Story(characters=characters, panels=panels)


def _is_skippable(line: str) -> bool:
    stripped = line.strip()
    return stripped == "" or stripped.startswith(COMMENT)


def _parse_character(raw: str, number: int, photo_dir: str | None = None) -> Character:
    hint = (
        "a character line is `[Name] description`; if the panels start here, "
        "put a blank line or `---` between the characters and the panels"
    )
    match = _CHARACTER_LINE.match(raw)
    if match is None:
        raise StoryError(f"malformed character line {raw!r}: {hint}", line=number)
    name, rest = match.group(1).strip(), match.group(2)
    photos = []
    for marker in _REF_MARKER.findall(rest):
        paths = [p.strip() for p in marker.split(",") if p.strip()]
        if not paths:
            raise StoryError(f"character [{name}]: the <ref: ...> marker names no photo; write "
                             f"<ref: photo1.jpg, photo2.jpg> or remove it", line=number)
        photos += [_photo_path(p, photo_dir) for p in paths]
    description = _normalise_spaces(_REF_MARKER.sub(" ", rest))
    if not name:
        raise StoryError(f"malformed character line {raw!r}: the name in [] is empty; {hint}", line=number)
    if name == NO_CHARACTER:
        raise StoryError(
            f"[{NO_CHARACTER}] is reserved for panels without characters; pick another character name",
            line=number,
        )
    if not description:
        raise StoryError(
            f"malformed character line {raw!r}: character [{name}] has no description; "
            f"write `[{name}] a short description of their looks`",
            line=number,
        )
    return Character(name=name, description=description, line=number, photos=tuple(photos))


def _photo_path(path: str, photo_dir: str | None) -> str:
    path = os.path.expanduser(path)
    return os.path.join(photo_dir, path) if photo_dir and not os.path.isabs(path) else path


def _parse_panel(raw: str, number: int, index: int, characters: dict[str, Character]) -> Panel:
    if _REF_MARKER.search(raw):
        raise StoryError("a <ref: ...> marker belongs on a character's line (reference photos are per character): "
                         "[Name] description <ref: photo.jpg>", line=number)
    # Only the last '#' starts the caption, so prompts may contain '#' themselves.
    if "#" in raw:
        prompt_text, caption_text = raw.rsplit("#", 1)
    else:
        prompt_text, caption_text = raw, None

    names: list[str] = []
    no_character = False
    for tag in _TAG.findall(prompt_text):
        name = tag.strip()
        if name == NO_CHARACTER:
            no_character = True
        elif name in characters:
            if name not in names:
                names.append(name)
        else:
            raise StoryError(_unknown_name_message(name, characters), line=number)

    if no_character and names:
        shown = ", ".join(f"[{n}]" for n in names)
        raise StoryError(
            f"panel is marked [{NO_CHARACTER}] but also shows {shown}; "
            f"remove [{NO_CHARACTER}] or the character names",
            line=number,
        )

    def replace(match: re.Match) -> str:
        name = match.group(1).strip()
        # As in StoryDiffusion, the description is followed by a space; spaces are normalised below.
        return "" if name == NO_CHARACTER else characters[name].description + " "

    prompt = _normalise_spaces(_TAG.sub(replace, prompt_text))
    if not prompt:
        raise StoryError(
            "panel has no prompt text; describe the scene before the '#' caption",
            line=number,
        )
    return Panel(
        index=index,
        prompt=prompt,
        caption=_caption(caption_text),
        characters=tuple(names),
        no_character=no_character,
        line=number,
    )


def _caption(text: str | None) -> str | None:
    if text is None:
        return None
    # A caption is shown to readers: `[Name]` reads as the name, `[NC]` disappears.
    def replace(match: re.Match) -> str:
        name = match.group(1).strip()
        return "" if name == NO_CHARACTER else name

    caption = _normalise_spaces(_TAG.sub(replace, text))
    return caption or None


def _unknown_name_message(name: str, characters: dict[str, Character]) -> str:
    if characters:
        defined = ", ".join(f"[{n}]" for n in characters)
        message = f"unknown character [{name}]; the defined characters are {defined}"
        close = difflib.get_close_matches(name, list(characters), n=1) or [
            n for n in characters if n.lower() == name.lower()
        ]
        if close:
            message += f" (did you mean [{close[0]}]?)"
        return message + f"; define [{name}] in the character block or fix the spelling"
    return (
        f"unknown character [{name}]; no characters are defined: "
        f"add `[{name}] description` lines before the first blank line, "
        f"or use [{NO_CHARACTER}] for a panel without characters"
    )


def _normalise_spaces(text: str) -> str:
    return " ".join(text.split())


def solo_panels(story: Story) -> dict[str, list[int]]:
    """For each character shown in some panel: the indices of the panels showing it alone."""
    solo: dict[str, list[int]] = {}
    for panel in story.panels:
        for name in panel.characters:
            solo.setdefault(name, [])
        if len(panel.characters) == 1:
            solo[panel.characters[0]].append(panel.index)
    # Keep the character block's order so plans and messages are stable.
    return {name: solo[name] for name in story.characters if name in solo}


def max_id_length(story: Story, *, skip: Iterable[str] = ()) -> int:
    """The largest ``id_length`` every character supports (its number of single-character panels).

    0 means some character never appears alone, so no ``id_length`` works. When no panel shows a
    character nothing limits it; the number of panels is returned as a natural cap.
    """
    skip = set(skip)
    counts = [len(indices) for name, indices in solo_panels(story).items() if name not in skip]
    return min(counts) if counts else len(story.panels)


def default_id_length(story: Story, preferred: int = 4, *, skip: Iterable[str] = ()) -> int:
    """``min(preferred, max_id_length(story))``, at least 1 (so a bad story errors in ``id_plan``)."""
    return max(1, min(preferred, max_id_length(story, skip=skip)))


def id_plan(story: Story, id_length: int, *, skip: Iterable[str] = ()) -> dict[str, list[int]]:
    """Each character's first ``id_length`` single-character panels (characters in no panel: none).

    skip: characters that need no id panels (their bank was loaded).
    """
    if isinstance(id_length, bool) or not isinstance(id_length, int) or id_length < 1:
        raise ConfigError(f"id_length must be a whole number >= 1, got {id_length!r}; try --id-length 2")
    skip = set(skip)
    solo = {name: indices for name, indices in solo_panels(story).items() if name not in skip}
    largest = max_id_length(story, skip=skip)
    plan: dict[str, list[int]] = {}
    for name, indices in solo.items():
        if len(indices) < id_length:
            character = story.characters[name]
            count = f"{len(indices)} panel{'s' if len(indices) != 1 else ''}"
            if largest >= 1:
                fix = f"use --id-length {largest} or add panels showing only [{name}]"
            else:
                fix = f"add panels showing only [{name}] (a line with [{name}] and no other name)"
            raise StoryError(
                f"character [{name}] has {count} showing it alone, but id_length {id_length} needs "
                f"{id_length} (its first {id_length} solo panels become its id panels); {fix}",
                line=character.line,
            )
        plan[name] = indices[:id_length]
    return plan
