"""End to end through `python -m infer.story` on the tiny preset: files, manifest, banks, errors.

Random-weight tiny model at 64x64 and 3 steps: pictures are noise, but every phase runs for real.
"""

import json
import os
import subprocess
import sys

import pytest
from story_samples import STORY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "3", "--height", "64", "--width", "64", "--quiet"]


def cli(*args, env=None, check=False):
    proc = subprocess.run([sys.executable, "-m", "infer.story", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_end_to_end(tmp_path):
    story = tmp_path / "s.txt"
    story.write_text(STORY)
    out = tmp_path / "out"
    bank = tmp_path / "bank.npz"
    proc = cli("--story", str(story), "--out", str(out), "--id-length", "2", "--layout", "classic",
               "--save-bank", str(bank), *FAST, check=True)
    assert "random-weight preset" in proc.stdout
    assert sorted(os.listdir(out / "panels")) == [f"{i:02d}.png" for i in range(7)]
    assert len(os.listdir(out / "pages")) >= 1
    manifest = json.loads((out / "story.json").read_text())
    assert manifest["model"] == "preset:tiny-sdxl" and manifest["seed"] == 0
    assert manifest["settings"]["steps"] == 3 and manifest["settings"]["sa32"] == 0.5
    assert set(manifest["timings"]) >= {"load_s", "write_s", "read_s", "decode_s"}
    assert manifest["id_panels"] == {"Ana": [0, 2], "Bo": [1, 3]}
    assert bank.is_file()
    # Loading the bank with another size is refused, and nothing is written.
    out2 = tmp_path / "out2"
    proc = cli("--story", str(story), "--out", str(out2), "--load-bank", str(bank), "--steps", "3",
               "--height", "96", "--width", "96", "--quiet")
    assert proc.returncode != 0 and "height" in proc.stderr and not out2.exists()


BAD_STORIES = {
    "unknown": ("[Ana] a girl\n\n[Ana] reads\n[Cid] jumps\n", "Cid", "line 4"),
    "duplicate": ("[Ana] a girl\n[Ana] a woman\n\n[Ana] reads\n", "defined twice", "line 2"),
    "too_few": ("[Ana] a girl\n\n[Ana] reads\n", "id_length", "line 1"),
    "nc_with_name": ("[Ana] a girl\n\n[Ana] reads\n[Ana] sits\n[NC] [Ana] sleeps\n", "NC", "line 5"),
    "empty": ("\n\n// nothing\n", "empty", "line 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_STORIES))
def test_cli_story_errors(tmp_path, case):
    text, word, where = BAD_STORIES[case]
    story = tmp_path / "bad.txt"
    story.write_text(text)
    out = tmp_path / "out"
    proc = cli("--story", str(story), "--out", str(out), "--id-length", "2", *FAST)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert word in lines[0] and where in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_bad_size(tmp_path):
    story = tmp_path / "s.txt"
    story.write_text(STORY)
    proc = cli("--story", str(story), "--out", str(tmp_path / "o"), "--steps", "2", "--height", "100", "--quiet")
    assert proc.returncode == 2 and "multiple of 32" in proc.stderr and not (tmp_path / "o").exists()


# 8 fake devices vs 1 through this CLI: tests/test_story_photos.py::test_eight_devices_match_one (a story in photo
# mode that also holds a character without photos and an [NC] panel: one 8-device run covers both modes).
