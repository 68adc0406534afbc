"""Edge values of StoryOptions: one-line ConfigErrors at construction (CLI, web app and API alike), no substitutes."""

import pytest

from storydiff_jax.errors import ConfigError
from storydiff_jax.pipelines import StoryOptions


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), ["steps", "--steps"]),
    (dict(steps=-3), ["steps", "--steps"]),
    (dict(window=0), ["window", "--window"]),
    (dict(read_batch=0), ["read_batch", "--read-batch"]),
    (dict(chunk=0), ["chunk", "--chunk"]),
    (dict(steps=2.5), ["steps", "whole number"]),
    (dict(guidance=-0.5), ["guidance", "--guidance"]),
    (dict(guidance=float("nan")), ["guidance", "finite"]),
    (dict(mode="window", window=4, chunk=3), ["chunk 3", "window 4", "--chunk >= 4"]),
    (dict(sa32=1.5), ["sa32", "[0, 1]"]),
    (dict(mode="tiles"), ["mode", "bank, window"]),
])
def test_bad_values_raise_one_line_errors(kw, words):
    with pytest.raises(ConfigError) as e:
        StoryOptions(**kw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_good_values_are_kept_as_given():
    o = StoryOptions(steps=1, window=1, read_batch=1, guidance=0.0, mode="window", chunk=1)
    assert (o.steps, o.window, o.read_batch, o.guidance, o.chunk) == (1, 1, 1, 0.0, 1)
    # chunk only constrains window mode; the defaults leave read batch and chunk to the pipeline.
    assert StoryOptions(chunk=2, window=4).chunk == 2
    assert StoryOptions().read_batch is None and StoryOptions().chunk is None
