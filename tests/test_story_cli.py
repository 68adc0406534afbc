"""End to end through `python -m infer.story` on the tiny preset: files, manifest, banks, errors, devices.

Random-weight tiny model at 64x64 and 3 steps: pictures are noise, but every phase runs for real.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import xla_flags
from story_samples import STORY, pose

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


def test_eight_devices_match_one(tmp_path):
    """Panels sharded over 8 fake CPU devices equal the 1-device panels, byte for byte, with a ControlNet posing
    an id panel (in its write batch) and two read panels (in a read batch with an uncontrolled one on 8
    devices, alone on 1), given through --control-dir and --control."""
    story = tmp_path / "s.txt"
    story.write_text(STORY)
    poses = tmp_path / "poses"
    poses.mkdir()
    for name, k in (("00.json", 0), ("4.json", 1), ("notes.txt", 2)):      # a file not named by panel: ignored
        (poses / name).write_text(json.dumps(pose(k)))
    (tmp_path / "six.json").write_text(json.dumps(pose(2)))
    control = ["--controlnet", "tiny-sdxl:0.8", "--control-dir", str(poses), "--control", f"6={tmp_path / 'six.json'}"]
    outs = []
    # Same per-device shapes in both runs (one read panel per device and call): XLA's CPU GEMMs block
    # their sums by problem size, so equal bytes need equal per-device problems.
    for n in (1, 8):
        out = tmp_path / f"out{n}"
        cli("--story", str(story), "--out", str(out), "--id-length", "2", "--read-batch", str(n), *FAST, *control,
            env={"XLA_FLAGS": xla_flags(n)}, check=True)
        manifest = json.loads((out / "story.json").read_text())
        assert len(manifest["devices"]) == n
        outs.append(out)
    assert manifest["controlnets"] == [{"source": "tiny-sdxl", "scale": 0.8}]
    assert [p.get("control", [{}])[0].get("map") for p in manifest["panels"]] == [
        "control/00.png", None, None, None, "control/04.png", None, "control/06.png"]
    assert sorted(os.listdir(out / "control")) == ["00.png", "04.png", "06.png"]
    for i in range(7):
        a = (outs[0] / "panels" / f"{i:02d}.png").read_bytes()
        b = (outs[1] / "panels" / f"{i:02d}.png").read_bytes()
        assert a == b, f"panel {i} differs between 1 and 8 devices"


def _run_in_process(argv, capsys):
    """`python -m infer.story ARGV` in this process (the CLI's own parser, run() and one-line error handling)."""
    import infer.story
    from storydiff_jax.cli import run_command

    args = infer.story.build_parser().parse_args(argv)
    code = run_command(lambda: infer.story.run(args), interrupted="")
    return code, capsys.readouterr().err


CONTROL_ERRORS = {
    "panel": (["--controlnet", "tiny-sdxl", "--control", "7=pose.json"], "panel 7, but the story has 7 panels"),
    "unreadable": (["--controlnet", "tiny-sdxl", "--control", "2=broken.png"], "control image of panel 2: image"),
    "architecture": (["--controlnet", "tiny-sd15", "--control", "2=pose.json"], "made for sd15 U-Nets but the model "
                     "is sdxl"),
    "union mode": (["--controlnet", "tiny-sdxl-union", "--control", "2=pose.json", "--control-mode", "7"],
                   "control mode 7 (repaint) is out of range for ControlNet 0, a Union with 6 control types"),
    "no controlnet": (["--control", "2=pose.json"], "no ControlNet is loaded; pass --controlnet DIR"),
}


@pytest.mark.parametrize("case", sorted(CONTROL_ERRORS))
def test_control_errors(tmp_path, case, capsys, monkeypatch):
    """Bad control input: one line, exit 2, nothing written (checked in this process: no JAX start-up per case)."""
    flags, message = CONTROL_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.txt").write_text(STORY)
    (tmp_path / "pose.json").write_text(json.dumps(pose(0)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, err = _run_in_process(["--story", "s.txt", "--out", "out", "--id-length", "2", *FAST, *flags], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["broken.png", "pose.json", "s.txt"]
