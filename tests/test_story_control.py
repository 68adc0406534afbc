"""ControlNets in stories through the Python API, on the tiny preset (64x64, 3 steps, random weights).

One pipeline with two ControlNets (a plain one and a Union, residuals summed) over a two-character story:
pose JSONs for panels 0, 1, 3, 4 (id panels 0, 1, 3 get theirs in their characters' write batches; read
panel 4 shares its batch with the [NC] panel 5, which has none) and for the Union on panels 1 and 4.
Checked in bank and window modes: determinism, controlled panels change, an uncontrolled panel that CSA does
not relate to a controlled one stays exactly as without ControlNet input, and a Union sees each panel's rows
alone (a map given to a neighbour in the batch leaves a panel untouched). One compiled program per phase.
"""

import dataclasses

import numpy as np
import pytest
from story_samples import STORY as STORY7
from story_samples import pose

from storydiff_jax.errors import ConfigError
from storydiff_jax.pipelines import StoryOptions, StoryPipeline

# The shared story's first six panels: 0 Ana, 1 Bo, 2 Ana, 3 Bo (id panels), 4 Ana+Bo, 5 [NC] (read).
STORY = "".join(STORY7.splitlines(keepends=True)[:9])
POSED = (0, 1, 3, 4)
CONTROLS = {**{p: pose(p) for p in POSED}, (1, 1): pose(5), (4, 1): pose(6)}
BANK = StoryOptions(steps=3, height=64, width=64, id_length=2, control_scale=1.5)
WINDOW = dataclasses.replace(BANK, mode="window", window=2, chunk=2)


@pytest.fixture(scope="module")
def pipe():
    return StoryPipeline.from_pretrained("tiny-sdxl", controlnets=["tiny-sdxl", "tiny-sdxl-union"])


@pytest.fixture(scope="module")
def bank_runs(pipe):
    return {name: pipe(STORY, BANK, controls=controls, progress=False).latents
            for name, controls in (("posed", CONTROLS), ("again", CONTROLS), ("none", None),
                                   ("union on 5", {**CONTROLS, (5, 1): pose(7)}))}


@pytest.fixture(scope="module")
def window_runs(pipe):
    return {name: pipe(STORY, WINDOW, controls=controls, progress=False).latents
            for name, controls in (("posed", CONTROLS), ("again", CONTROLS), ("none", None))}


def _change(a, b):
    return np.abs(a - b).reshape(len(a), -1).max(-1)


@pytest.mark.parametrize("mode", ["bank", "window"])
def test_story_control(mode, bank_runs, window_runs):
    runs = bank_runs if mode == "bank" else window_runs
    assert np.array_equal(runs["posed"], runs["again"]), "same seed and maps must give the same latents"
    change = _change(runs["posed"], runs["none"])
    scale = max(1.0, float(np.abs(runs["none"]).max()))
    print(f"\n{mode}: max |latent change| per panel with control vs without: {np.array2string(change, precision=3)}")
    assert np.all(change[list(POSED)] > 1e-2 * scale), change
    # The [NC] panel has no map and CSA relates it to nobody: bit for bit what it is without ControlNet input,
    # though its batch holds controlled panels (bank: read batch with panel 4; window: windows with panel 4).
    assert change[5] == 0.0, change


def test_union_sees_each_panel_alone(bank_runs):
    """Panel 5 gains a Union map: it changes, and panel 4 (its read-batch neighbour, Union-controlled) does not.
    With the Union's batch-axis attention over the whole batch (diffusers' batching), panel 4's residuals
    would depend on panel 5's map."""
    change = _change(bank_runs["union on 5"], bank_runs["posed"])
    assert change[5] > 0.0 and np.all(change[:5] == 0.0), change


def test_control_errors(pipe):
    with pytest.raises(ConfigError, match="panel 6, but the story has 6 panels"):
        pipe(STORY, BANK, controls={6: pose(0)}, progress=False)
    with pytest.raises(ConfigError, match="ControlNet 2, but 2 ControlNets are loaded"):
        pipe(STORY, BANK, controls={(0, 2): pose(0)}, progress=False)
    with pytest.raises(ConfigError, match="out of range for ControlNet 1, a Union with 6 control types"):
        pipe(STORY, dataclasses.replace(BANK, control_mode="repaint"), controls=CONTROLS, progress=False)
    with pytest.raises(ConfigError, match="made for sd15 U-Nets but the model is sdxl"):
        StoryPipeline.from_pretrained("tiny-sdxl", controlnets=["tiny-sd15"])
    with pytest.raises(ConfigError, match="control_start 0.5, control_end 0.5"):
        dataclasses.replace(BANK, control_start=0.5, control_end=0.5)
    with pytest.raises(ConfigError, match="'sketchy' is neither a number nor one of openpose"):
        StoryOptions.from_dict({"control_mode": "sketchy"})
    with pytest.raises(ConfigError, match="canny thresholds must be numbers >= 0"):
        StoryOptions.from_dict({"canny_low": "-1"})
