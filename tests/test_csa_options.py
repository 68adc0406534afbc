"""Edge values of StoryOptions: one-line ConfigErrors at construction (CLI, web app and API alike), no substitutes."""

import numpy as np
import pytest

from storydiff_jax.consistent import CSASettings, draw_flips
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


@pytest.mark.parametrize("flag, value, words", [("--steps", "0", "steps must be"), ("--read-batch", "0", "read_batch"),
                                                ("--guidance", "-1", "guidance must be")])
def test_cli_refuses_edge_values_before_any_work(tmp_path, flag, value, words):
    import subprocess
    import sys
    from pathlib import Path

    story = tmp_path / "s.txt"
    story.write_text("[Ana] a girl\n\n[Ana] reads\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "infer.story", "--story", str(story), "--out", str(out), flag, value,
                           "--quiet"], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and words in errors[0], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [story]


def test_csa_defaults_are_the_official_ones():
    """CSASettings' defaults, pinned to the official code: HVision-NKU/StoryDiffusion,
    gradio_app_sdxl_specific_id_low_vram.py (the default entry point; read at commit 0a2f9d99),
    SpatialAttnProcessor2_0.__call__: `if cur_step < 1` plain attention; then `rand_num = 0.3` while
    `cur_step < 20`, else 0.1, and CSA `if random_number > rand_num`: P(CSA) 0.7 for steps 1-19, 0.9 from step 20.
    Its UI sliders `sa32_` / `sa64_` start at 0.5."""
    official = CSASettings(sa32=0.5, sa64=0.5, plain_steps=1, switch_step=20, p_early=0.7, p_late=0.9)
    assert CSASettings() == official
    assert StoryOptions().csa() == official
    # The probabilities are of CSA (the official `random_number > rand_num`), not of plain attention.
    flips = draw_flips(np.random.default_rng(0), 30, 4000, official)
    print(f"\nP(CSA): step 0 {flips[0].mean():.3f}, steps 1-19 {flips[1:20].mean():.3f}, "
          f"steps 20-29 {flips[20:].mean():.3f}")
    assert not flips[0].any()
    assert abs(flips[1:20].mean() - 0.7) < 0.01 and abs(flips[20:].mean() - 0.9) < 0.01
