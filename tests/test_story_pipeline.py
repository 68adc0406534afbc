"""End to end on the tiny preset: the story CLI and StoryPipeline (files, shapes, determinism, banks, errors).

Random-weight tiny model at 64x64 and 3 steps: pictures are noise, but every phase runs for real.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from storydiff_jax.errors import ConfigError
from storydiff_jax.pipelines import StoryOptions, StoryPipeline
from storydiff_jax.pipelines.bank import CharacterBank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = """[Ana] a girl with a yellow scarf
[Bo] a small brown dog

[Ana] reads a book #Monday.
[Bo] sleeps on a rug
[Ana] walks in the park #Tuesday.
[Bo] chases a ball
[Ana] and [Bo] run to the sea #Wednesday.
[NC] waves on a beach at night
[Ana] laughs #The end.
"""
FAST = ["--steps", "3", "--height", "64", "--width", "64", "--quiet"]


def cli(*args, env=None, check=False):
    proc = subprocess.run([sys.executable, "-m", "infer.story", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pipe():
    return StoryPipeline.from_pretrained("tiny-sdxl")


def opts(**kw):
    base = dict(steps=3, height=64, width=64, id_length=2, layout="four-panel")
    base.update(kw)
    return StoryOptions(**base)


def arrays(result):
    return [np.asarray(p) for p in result.panels]


def test_panels_pages_and_determinism(pipe):
    a = pipe(STORY, opts(seed=1), progress=False)
    assert len(a.panels) == 7 and all(p.size == (64, 64) for p in a.panels)
    assert len(a.pages) == 2                      # four-panel: 7 panels -> 2 pages of 2x2
    assert a.story.id_panels == {"Ana": [0, 2], "Bo": [1, 3]}
    b = pipe(STORY, opts(seed=1), progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b))), "same seed must give the same pixels"
    c = pipe(STORY, opts(seed=2), progress=False)
    assert not any(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(c))), "a new seed must change panels"
    # The bank holds both characters, K valid tokens per step at rate ~0.5 of 2 id images' tokens.
    bank = a.bank
    assert list(bank.characters) == ["Ana", "Bo"]
    steps, chars, halves, k, _ = bank.tokens[0].shape
    assert (steps, chars, halves) == (3, 2, 2)
    tokens_per_image = bank.layer_tokens[0]
    frac = bank.valid[tokens_per_image].sum(-1) / (2 * tokens_per_image)
    assert np.all((frac > 0.2) & (frac < 0.8)), frac


def test_csa_changes_read_panels_but_rate_zero_is_plain(pipe):
    """sa=0 stores no tokens: read panels then equal plain generation; sa=1 changes them."""
    plain = arrays(pipe(STORY, opts(sa32=0.0, sa64=0.0), progress=False))
    csa = arrays(pipe(STORY, opts(sa32=1.0, sa64=1.0), progress=False))
    nc_panel = 5
    assert np.array_equal(plain[nc_panel], csa[nc_panel]), "[NC] panels use plain attention"
    assert not np.array_equal(plain[4], csa[4]), "a character panel must see its bank"


def test_bank_round_trip(pipe, tmp_path):
    first = pipe(STORY, opts(seed=3), progress=False)
    path = tmp_path / "chars.npz"
    first.bank.save(str(path))
    bank = CharacterBank.load(str(path))
    assert bank.characters == first.bank.characters
    assert all(np.array_equal(a, b) for a, b in zip(bank.tokens, first.bank.tokens))
    # Reading a host-memory (offloaded) bank gives the same panels as reading it from device memory.
    second = pipe(STORY, opts(seed=3, bank_offload=True), bank=bank, progress=False)
    assert second.story.id_panels == {}, "characters from a loaded bank need no id panels"
    for i in first.story.read_panels():
        assert np.array_equal(np.asarray(first.panels[i]), np.asarray(second.panels[i])), i
    with pytest.raises(ConfigError, match="steps"):
        pipe(STORY, opts(seed=3, steps=2), bank=bank, progress=False)


def test_window_mode_runs_and_is_deterministic(pipe):
    a = pipe(STORY, opts(mode="window", window=3), progress=False)
    b = pipe(STORY, opts(mode="window", window=3), progress=False)
    assert len(a.panels) == 7 and a.bank is None
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


def test_size_must_be_multiple_of_32(pipe):
    with pytest.raises(ConfigError, match="multiple of 32"):
        pipe(STORY, opts(height=70), progress=False)


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
    """Panels sharded over 8 fake CPU devices equal the 1-device panels, byte for byte."""
    story = tmp_path / "s.txt"
    story.write_text(STORY)
    outs = []
    # Same per-device shapes in both runs (one read panel per device and call): XLA's CPU GEMMs block
    # their sums by problem size, so equal bytes need equal per-device problems.
    for n in (1, 8):
        out = tmp_path / f"out{n}"
        cli("--story", str(story), "--out", str(out), "--id-length", "2", "--read-batch", str(n), *FAST,
            env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}, check=True)
        manifest = json.loads((out / "story.json").read_text())
        assert len(manifest["devices"]) == n
        outs.append(out)
    for i in range(7):
        a = (outs[0] / "panels" / f"{i:02d}.png").read_bytes()
        b = (outs[1] / "panels" / f"{i:02d}.png").read_bytes()
        assert a == b, f"panel {i} differs between 1 and 8 devices"
