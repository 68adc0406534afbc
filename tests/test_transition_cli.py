"""End to end through `python -m infer.transition` on the `tiny-video` preset: mp4, gif and frame folders
read back with the right frame count, a story folder as one long video, and every input error as one line
with a non-zero exit and nothing written.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from storydiff_jax.video_io import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--frames", "4", "--steps", "2", "--quiet"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "infer.transition", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _picture(path, seed, size=(64, 64)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def frames_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    return _picture(root / "a.png", 0), _picture(root / "b.png", 1, size=(90, 70))


def _listing(folder):
    return sorted(p for p in os.listdir(folder))


def test_mp4_and_folder(tmp_path, frames_in):
    a, b = frames_in
    mp4, folder = tmp_path / "walk.mp4", tmp_path / "frames"
    proc = cli("--start", a, "--end", b, "--out", mp4, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random-weight preset" in proc.stdout and "plain token interpolation" not in proc.stdout
    video = read_video(str(mp4))
    assert video.shape == (4, 64, 64, 3)
    manifest = json.loads((tmp_path / "walk.json").read_text())
    assert manifest["frames"] == 4 and manifest["model"] == "preset:tiny-video" and manifest["seed"] == 0
    assert manifest["settings"]["smp"] == "predict" and manifest["settings"]["steps"] == 2
    assert set(manifest["transitions"][0]["timings"]) == {"encode_s", "denoise_s", "decode_s"}

    proc = cli("--start", a, "--end", b, "--out", folder, "--smp", "none", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = _listing(folder)
    assert names == [f"frame_{i:04d}.png" for i in range(4)] + ["transition.json"]
    assert json.loads((folder / "transition.json").read_text())["settings"]["smp"] == "none"
    # --overwrite is needed to replace, and nothing else was left beside the outputs.
    proc = cli("--start", a, "--end", b, "--out", folder, *FAST)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert _listing(tmp_path) == ["frames", "walk.json", "walk.mp4"]


def test_story_dir_is_one_long_video(tmp_path):
    story = tmp_path / "story"
    (story / "panels").mkdir(parents=True)
    panels = []
    for i in range(3):
        _picture(story / "panels" / f"{i:02d}.png", 10 + i)
        panels.append({"file": f"panels/{i:02d}.png", "prompt": f"panel {i}", "caption": "", "characters": [],
                       "line": i + 1})
    (story / "story.json").write_text(json.dumps({"panels": panels}))
    out = tmp_path / "story.gif"
    proc = cli("--story-dir", story, "--out", out, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two transitions of 4 frames sharing their boundary frame: 4 + 3.
    assert read_video(str(out)).shape[0] == 7
    manifest = json.loads((tmp_path / "story.json").read_text())
    assert [t["prompt"] for t in manifest["transitions"]] == ["panel 1", "panel 2"]


def _errors(root, a, b):
    no_manifest = root / "empty-story"
    no_manifest.mkdir()
    one = root / "one-panel"
    (one / "panels").mkdir(parents=True)
    _picture(one / "panels" / "00.png", 3)
    (one / "story.json").write_text(json.dumps({"panels": [{"file": "panels/00.png", "prompt": "x"}]}))
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    return {
        "missing-image": (["--start", root / "nope.png", "--end", b], "nope.png"),
        "unreadable-image": (["--start", broken, "--end", b], "broken.png"),
        "too-few-frames": (["--start", a, "--end", b, "--frames", "1"], "frames 1 is outside 2..32"),
        "too-many-frames": (["--start", a, "--end", b, "--frames", "40"], "frames 40 is outside 2..32"),
        "zero-frames": (["--start", a, "--end", b, "--frames", "0"], "frames 0 is outside 2..32"),  # not the default
        "bad-size": (["--start", a, "--end", b, "--height", "100"], "height 100 is not a positive multiple of 64"),
        "no-frames": ([], "no input frames"),
        "story-without-manifest": (["--story-dir", no_manifest], "no readable story.json"),
        "story-one-panel": (["--story-dir", one], "1 panel(s); a transition needs at least 2"),
    }


CASES = ["missing-image", "unreadable-image", "too-few-frames", "too-many-frames", "zero-frames", "bad-size",
         "no-frames", "story-without-manifest", "story-one-panel"]


@pytest.mark.parametrize("case", CASES)
def test_errors_one_line_nothing_written(tmp_path, frames_in, case):
    a, b = frames_in
    args, words = _errors(tmp_path, a, b)[case]
    out = tmp_path / "out" / "v.mp4"
    proc = cli(*FAST, *args, "--out", out)   # the case's flags last: they win
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_unknown_extension(tmp_path, frames_in):
    a, b = frames_in
    proc = cli("--start", a, "--end", b, "--out", tmp_path / "v.avi", *FAST)
    assert proc.returncode == 2 and "unknown output type '.avi'" in proc.stderr
    assert os.listdir(tmp_path) == []
