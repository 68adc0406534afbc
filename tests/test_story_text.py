"""Story scripts (parsing, id plan, errors) and style templates. Pure Python: runs in well under a second."""

from pathlib import Path

import pytest

from storydiff_jax.errors import ConfigError, StoryError
from storydiff_jax.story import (
    STYLES,
    apply_style,
    default_id_length,
    id_plan,
    max_id_length,
    normalise_style_name,
    parse_script,
    parse_story,
    style_names,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

TWO = """\
[Lena] a woman with red hair
[Max] a grey terrier

[Lena] reads a book # Caption one
[Max] sleeps
[Lena] and [Max] walk on the beach # Together
[NC] a lighthouse at dusk # Far away
[Lena] drinks tea
[Max] barks
"""


def test_replacement_and_spaces():
    story = parse_story(TWO, id_length=2)
    assert list(story.characters) == ["Lena", "Max"]
    assert story.characters["Max"].description == "a grey terrier"
    assert story.characters["Max"].line == 2
    p = story.panels[0]
    # `[Name]` -> description + " ", repeated spaces collapsed, text around kept.
    assert p.prompt == "a woman with red hair reads a book"
    assert p.caption == "Caption one"
    assert p.characters == ("Lena",) and not p.no_character
    assert (p.index, p.line) == (0, 4)
    assert story.panels[1].caption is None
    assert (parse_story("[A] tall   man\n\nthe [A]   , waving\n", id_length=1).panels[0].prompt
            == "the tall man , waving")


def test_multi_character_and_nc_panels():
    story = parse_story(TWO, id_length=2)
    both = story.panels[2]
    assert both.characters == ("Lena", "Max")
    assert both.prompt == "a woman with red hair and a grey terrier walk on the beach"
    nc = story.panels[3]
    assert nc.no_character and nc.characters == ()
    assert nc.prompt == "a lighthouse at dusk" and nc.caption == "Far away"
    # A name repeated in one line counts once.
    s = parse_story("[A] a cat\n\n[A] chases [A]'s tail\n", id_length=1)
    assert s.panels[0].characters == ("A",)
    assert s.panels[0].prompt == "a cat chases a cat 's tail"


def test_caption_after_last_hash():
    story = parse_story("[A] a cat\n\n[A] sits by door #3 # The # sign # Last part\n[A] runs #\n", id_length=1)
    assert story.panels[0].prompt == "a cat sits by door #3 # The # sign"
    assert story.panels[0].caption == "Last part"
    assert story.panels[1].caption is None  # blank caption is no caption
    # In a caption, [Name] reads as the name.
    s = parse_story("[A] a cat\n\n[A] naps # [A] is  tired\n", id_length=1)
    assert s.panels[0].caption == "A is tired"


def test_comments_blank_lines_and_separator():
    text = (
        "// a comment before the characters\n\n"
        "[A] a cat\n// a comment among the characters\n[B] a dog\n"
        "---\n"
        "// a comment among the panels\n"
        "[A] naps\n\n\n"
        "   // indented comment\n"
        "[B] digs\n"
    )
    story = parse_story(text, id_length=1)
    assert list(story.characters) == ["A", "B"]
    assert [p.prompt for p in story.panels] == ["a cat naps", "a dog digs"]
    assert [p.line for p in story.panels] == [8, 12]
    assert [p.index for p in story.panels] == [0, 1]
    # A story without characters starts with `---`.
    s = parse_story("---\n[NC] a forest\na river at night\n", id_length=1)
    assert s.characters == {} and len(s.panels) == 2 and s.id_panels == {}
    assert s.panels[1].characters == () and not s.panels[1].no_character


def test_id_plan():
    story = parse_story(TWO, id_length=2)
    # Solo panels only: the [Lena] and [Max] panel (index 2) is never an id panel.
    assert story.id_panels == {"Lena": [0, 4], "Max": [1, 5]}
    assert story.id_length == 2
    assert story.read_panels() == [2, 3]
    assert id_plan(story, 1) == {"Lena": [0], "Max": [1]}
    assert max_id_length(story) == 2
    assert default_id_length(story) == 2
    assert parse_story(TWO, id_length=None).id_length == 2
    # A character that appears in no panel needs no id panels.
    s = parse_story("[A] a cat\n[B] a dog\n\n[A] naps\n", id_length=1)
    assert s.id_panels == {"A": [0]} and max_id_length(s) == 1
    # Many solo panels: the first id_length are the id panels, default is capped at 4.
    s = parse_story("[A] a cat\n\n" + "".join(f"[A] scene {i}\n" for i in range(7)), id_length=None)
    assert s.id_length == 4 and s.id_panels == {"A": [0, 1, 2, 3]} and max_id_length(s) == 7


def _error(text, id_length=1):
    with pytest.raises(StoryError) as info:
        parse_story(text, id_length=id_length)
    return info.value


def test_unknown_name():
    e = _error("[Lena] a woman\n[Max] a dog\n\n[Lena] runs\n[Lina] jumps\n")
    assert e.line == 5
    msg = str(e)
    assert msg.startswith("line 5: ")
    assert "[Lina]" in msg and "[Lena], [Max]" in msg and "did you mean [Lena]" in msg
    e = _error("---\n[Ghost] floats\n")
    assert e.line == 2 and "no characters are defined" in str(e) and "[NC]" in str(e)


def test_duplicate_character():
    e = _error("[A] a cat\n[B] a dog\n[A] another cat\n\n[A] naps\n")
    assert e.line == 3
    assert "[A] is defined twice" in str(e) and "line 1" in str(e)


def test_malformed_character_lines():
    # A panel line without a separator before it: the hint says to add the blank line.
    e = _error("[A] a cat\nthe cat sleeps\n")
    assert e.line == 2 and "malformed character line" in str(e) and "blank line or `---`" in str(e)
    e = _error("[A]\n\n[A] naps\n")
    assert e.line == 1 and "no description" in str(e)
    e = _error("// intro\n[] nobody\n\n[NC] x\n")
    assert e.line == 2 and "name in [] is empty" in str(e)
    e = _error("[NC] a reserved name\n\n[NC] x\n")
    assert e.line == 1 and "reserved" in str(e)


def test_too_few_solo_panels():
    text = "[A] a cat\n[B] a dog\n\n[A] naps\n[A] eats\n[B] digs\n[A] and [B] play\n"
    e = _error(text, id_length=2)
    assert e.line == 2  # B's definition line
    msg = str(e)
    assert "[B] has 1 panel showing it alone" in msg and "id_length 2" in msg
    assert "--id-length 1" in msg
    assert max_id_length(parse_script(text)) == 1
    # A character never shown alone: no id_length works, so the fix is to add a solo panel.
    e = _error("[A] a cat\n[B] a dog\n\n[A] naps\n[A] and [B] play\n", id_length=1)
    assert e.line == 2 and "has 0 panels" in str(e) and "add panels showing only [B]" in str(e)
    assert "--id-length" not in str(e)
    with pytest.raises(ConfigError, match="id_length must be"):
        parse_story(TWO, id_length=0)


def test_nc_with_character():
    e = _error("[A] a cat\n\n[A] naps\n[NC] [A] in a field # x\n")
    assert e.line == 4 and "[NC]" in str(e) and "[A]" in str(e) and "remove" in str(e)


def test_empty_and_no_panels():
    for text in ["", "\n\n  \n", "// only a comment\n\n"]:
        e = _error(text)
        assert e.line == 1 and "empty" in str(e)
    e = _error("[A] a cat\n[B] a dog\n")
    assert e.line == 2 and "no panels" in str(e)
    e = _error("[A] a cat\n\n// nothing yet\n")
    assert e.line == 3 and "no panels" in str(e)
    e = _error("[A] a cat\n\n[NC] # only a caption\n")
    assert e.line == 3 and "no prompt text" in str(e)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.txt")), ids=lambda p: p.name)
def test_examples_parse(path):
    text = path.read_text()
    story = parse_story(text, id_length=2)
    assert story.characters and len(story.panels) >= 8
    assert all(len(v) == 2 for v in story.id_panels.values())
    assert max_id_length(story) >= 2


def test_examples_cover_the_format():
    stories = {p.stem: parse_story(p.read_text(), id_length=2) for p in EXAMPLES.glob("*.txt")}
    assert len(stories) >= 3
    first = stories["lighthouse_keepers"]
    assert max_id_length(first) >= 4 and len(first.characters) == 2
    assert any(p.no_character for p in first.panels) and any(p.caption for p in first.panels)
    assert any(len(p.characters) > 1 for p in first.panels)
    assert len(stories["baker_day"].characters) == 1 and len(stories["baker_day"].panels) >= 8
    assert len(stories["three_explorers"].characters) == 3


# --------------------------------------------------------------------------------------- styles


def test_styles():
    expected = {"none", "anime", "comic book", "line art", "film noir", "photographic",
                "oil painting", "3d animation", "isometric"}
    assert set(style_names()) == expected == set(STYLES)
    for name, style in STYLES.items():
        assert style.positive.count("{prompt}") == 1, name
        positive, negative = apply_style(name, "a cat on a roof")
        assert "a cat on a roof" in positive and "{prompt}" not in positive
        assert (negative == "") == (name == "none")
    assert apply_style("none", "a cat") == ("a cat", "")


def test_style_names_are_normalised():
    reference = apply_style("comic book", "x")
    for spelling in ["comic-book", "Comic book", "COMIC_BOOK", "  comic   Book "]:
        assert apply_style(spelling, "x") == reference
    assert normalise_style_name("3D-Animation") == "3d animation"


def test_style_extra_negative_and_braces():
    positive, negative = apply_style("anime", "a {weird} prompt", extra_negative=" ugly ")
    assert "a {weird} prompt" in positive
    assert negative.endswith(", ugly")
    assert apply_style("none", "x", extra_negative="ugly") == ("x", "ugly")


def test_unknown_style():
    with pytest.raises(ConfigError) as info:
        apply_style("vaporwave", "x")
    msg = str(info.value)
    assert "'vaporwave'" in msg and "'film noir'" in msg and "'isometric'" in msg


def test_story_package_imports_no_jax_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, storydiff_jax.story; "
        "bad = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=EXAMPLES.parent)
