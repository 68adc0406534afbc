"""`build-webvid --beam-runner`: the WebVid build as an Apache Beam pipeline (TFDS's Beam support), on the
synthetic WebVid copy of tests/test_webvid.py.

  * DirectRunner with 2 worker processes (`--direct_running_mode=multi_processing`) builds the same examples
    (every record field, in the same order) and the same skip report as the one-machine build, and neither
    the launcher nor its workers import TensorFlow;
  * the video2dataset tar shards on the in-process DirectRunner: the same as their one-machine build;
  * a Beam build stopped by SIGTERM mid-pipeline leaves nothing behind; a split the pipeline builds nothing
    of is a one-line error, nothing left.

apache-beam is in the `beam` extra, not in `dev` (it pins protobuf < 7 and pyarrow < 26, below what the rest of
the project installs), so these tests skip where it is absent; run them in an environment made with
`pip install -e '.[dev,beam]'`.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="apache-beam is not installed: these tests need "
                                          "`pip install 'storydiff-jax[beam]'` (not in the dev extra)")

from test_webvid import FAKE_TENSORFLOW, FRAMES, RES, STRIDE, cli, records, write_manual_dir, write_tar_shards  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["--frames", str(FRAMES), "--resolution", str(RES), "--stride", str(STRIDE), "--frames-format", "raw"]
TWO_WORKERS = "--beam-options=--direct_num_workers=2 --direct_running_mode=multi_processing"


def _beam_cli(manual, data, *extra, env=None, wait=True):
    """`python -m train build-webvid` in a subprocess (Beam's worker processes import `train` from ROOT)."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    args = [sys.executable, "-m", "train", "build-webvid", "--manual-dir", str(manual), "--data-dir", str(data),
            *SETTINGS, "--beam-runner", "DirectRunner", "--quiet", *extra]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _build_folder(data):
    return os.path.join(data, "webvid", f"l{FRAMES}_r{RES}_s{STRIDE}", "1.0.0")


def _summary(folder):
    with open(os.path.join(folder, "webvid_build.json")) as f:
        return json.load(f)


def _same_records(a_folder, b_folder, splits):
    for split in splits:
        a, b = records(a_folder, split), records(b_folder, split)
        assert [r["videoid"] for r in a] == [r["videoid"] for r in b] and a, split
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), (split, x["videoid"])


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """The synthetic copy, its tar shards, and their one-machine builds (the references)."""
    base = tmp_path_factory.mktemp("webvid-beam")
    manual = write_manual_dir(base / "manual")
    shards = write_tar_shards(base / "shards", manual)
    for source, data in ((manual, base / "local"), (shards, base / "local-shards")):
        assert cli("--manual-dir", source, "--data-dir", data, *SETTINGS, "--quiet") == 0
    return base, manual, shards


def test_direct_runner_with_two_workers_equals_the_local_build(copy):
    base, manual, _ = copy
    (base / "fake" / "tensorflow").mkdir(parents=True)
    (base / "fake" / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    marker = base / "tf-imported"
    t0 = time.perf_counter()
    rc, out, err = _beam_cli(manual, base / "beam", TWO_WORKERS,
                             env={"PYTHONPATH": os.pathsep.join([str(base / "fake"), ROOT]),
                                  "FAKE_TF_MARKER": str(marker)})
    took = time.perf_counter() - t0
    assert rc == 0, err[-3000:]
    print(f"\nDirectRunner, 2 worker processes: {took:.1f} s\n{out}")
    local, beam = _summary(_build_folder(base / "local")), _summary(_build_folder(base / "beam"))
    assert beam["runner"] == "DirectRunner" and local["runner"] == "local"
    assert beam["splits"] == local["splits"] and beam["skipped"] == local["skipped"]
    assert {s["reason"] for s in beam["skipped"]} == {"missing", "corrupt", "too_short", "duplicate"}
    _same_records(_build_folder(base / "local"), _build_folder(base / "beam"), ["train", "validation"])
    # Nothing of the pipeline's side output or staging is left beside the records.
    assert sorted(os.listdir(_build_folder(base / "beam"))) == sorted(os.listdir(_build_folder(base / "local")))
    assert not marker.exists(), marker.read_text()   # neither the launcher nor a worker imported TensorFlow


def test_tar_shards_on_beam_equal_their_local_build(copy):
    base, _, shards = copy
    rc, _, err = _beam_cli(shards, base / "beam-shards")
    assert rc == 0, err[-3000:]
    local, beam = _summary(_build_folder(base / "local-shards")), _summary(_build_folder(base / "beam-shards"))
    assert beam["input"] == "webdataset" and beam["splits"] == local["splits"] and beam["skipped"] == local["skipped"]
    _same_records(_build_folder(base / "local-shards"), _build_folder(base / "beam-shards"), ["train"])


def test_an_interrupted_or_empty_beam_build_leaves_nothing(copy, tmp_path):
    _, manual, _ = copy
    data = tmp_path / "stopped"
    proc = _beam_cli(manual, data, TWO_WORKERS, wait=False)
    # Beam's file sinks make their temporary folders once the pipeline runs: stop it then.
    t0 = time.perf_counter()
    while not glob.glob(str(data / "webvid" / "*" / ".1.0.0.partial-*" / "beam-skipped" / "*")):
        assert proc.poll() is None and time.perf_counter() - t0 < 300, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    print(f"\nSIGTERM {time.perf_counter() - t0:.1f} s after the start: exit {proc.returncode}, "
          f"{err.strip().splitlines()[-1]}")
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted: build stopped")
    assert not [os.path.join(r, n) for r, d, f in os.walk(data) for n in d + f], "the stopped build left files"

    # A validation split whose only video is missing: TFDS's Beam writer refuses the empty split inside the
    # pipeline; the command says which split in one last line and leaves nothing.
    empty = tmp_path / "valgone"
    empty.mkdir()
    with open(os.path.join(manual, "results_2M_train.csv")) as f:
        (empty / "results_2M_train.csv").write_text("".join(f.readlines()[:2]))
    (empty / "results_2M_val.csv").write_text("videoid,name,page_dir,duration,contentUrl\n9201,z,p,,\n")
    os.symlink(os.path.join(manual, "videos"), empty / "videos")
    rc, _, err = _beam_cli(empty, tmp_path / "out")
    last = err.strip().splitlines()[-1]
    print(last)
    assert rc == 2 and last.startswith("error: nothing buildable") and "split 'validation'" in last
    assert not [n for r, d, f in os.walk(tmp_path / "out") for n in d + f]
