"""The WebVid TFDS builder on a synthetic WebVid-format copy made here.

The copy: moving boxes encoded as real H.264 mp4 files (landscape, portrait and a video smaller than the
training resolution), a WebVid-style CSV per split (a caption with a comma and quotes, a repeated videoid),
one video shorter than a clip, one corrupt file (random bytes) and one missing file. The build must count
and name the bad ones, store frames equal to an independent decode + resize/crop (raw frames), build the
same records twice (1 and 2 decoding processes), and be read through `open_source` + `make_loader` without
TensorFlow. The same copy built with JPEG and H.264 frames must decode within 40 dB PSNR of the raw build,
an older raw build (no recorded frame format) must still read, and the same videos as video2dataset tar
shards must build the same examples. The Beam runner's tests are in tests/test_webvid_beam.py.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from storydiff_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, RES, STRIDE = 4, 32, 2          # a clip covers (4 - 1) * 2 + 1 = 7 source frames
CONFIG = f"l{FRAMES}_r{RES}_s{STRIDE}"
HEADER = ["videoid", "name", "page_dir", "duration", "contentUrl"]
# videoid, caption, page_dir, video (frames, height, width) / "corrupt" / "missing"
TRAIN = [("1001", 'A red box, "sliding" right', "000001_000050", (14, 48, 80)),
         ("1002", "a box falling past a window", "000001_000050", (12, 64, 48)),
         ("1003", "too short", "000051_000100", (5, 40, 40)),
         ("1004", "corrupt", "000051_000100", "corrupt"),
         ("1005", "missing", "000051_000100", "missing"),
         ("1006", "café, petit écran", "000051_000100", (9, 24, 40)),
         ("1001", "the same video again", "000001_000050", None)]
VAL = [("2001", "a validation box", "000101_000150", (10, 36, 60))]
EXPECT_SKIPPED = {("1003", "too_short"), ("1004", "corrupt"), ("1005", "missing"), ("1001", "duplicate")}


def moving_box(frames, height, width, seed):
    """A box crossing a dark background, one position per frame (every frame differs from the others)."""
    rng = np.random.default_rng(seed)
    out = np.empty((frames, height, width, 3), np.uint8)
    out[:] = rng.integers(0, 60, 3, dtype=np.uint8)
    colour = rng.integers(140, 256, 3, dtype=np.uint8)
    for t in range(frames):
        y, x = (3 + 2 * t) % (height - 8), (1 + 3 * t) % (width - 10)
        out[t, y:y + 8, x:x + 10] = colour
    return out


def write_manual_dir(folder, splits=(("results_2M_train.csv", TRAIN), ("results_2M_val.csv", VAL))):
    from storydiff_jax.video_io import write_video

    os.makedirs(folder, exist_ok=True)
    for seed, (name, rows) in enumerate(splits):
        with open(os.path.join(folder, name), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            for i, (vid, caption, page, video) in enumerate(rows):
                w.writerow([vid, caption, page, "PT00H00M12S", f"https://example.invalid/{vid}.mp4"])
                path = os.path.join(folder, "videos", page, f"{vid}.mp4")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if video == "corrupt":
                    with open(path, "wb") as g:
                        g.write(np.random.default_rng(7).integers(0, 256, 4000, np.uint8).tobytes())
                elif isinstance(video, tuple):
                    write_video(moving_box(*video, seed=10 * seed + i), path, fps=8)
    return str(folder)


def write_tar_shards(folder, manual, rows=TRAIN, per_shard=(3, 2, 2)):
    """The CSV copy's videos as video2dataset writes them: shards 00000.tar ... of samples KEY.txt (caption),
    KEY.json (videoid, page_dir, ...), KEY.mp4, in the CSV's order. The corrupt video travels as it is; a
    missing video gives a sample without .mp4 (as a failed download would leave none at all)."""
    os.makedirs(folder, exist_ok=True)
    start = 0
    for shard, n in enumerate(per_shard):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
            for j, (vid, caption, page, _) in enumerate(rows[start:start + n]):
                key = f"{shard:05d}{j:04d}"
                meta = {"videoid": vid, "page_dir": page, "url": f"https://example.invalid/{vid}.mp4", "key": key,
                        "status": "success"}
                video = os.path.join(manual, "videos", page, f"{vid}.mp4")
                members = [(".json", json.dumps(meta).encode()), (".txt", caption.encode())]
                if os.path.exists(video):
                    with open(video, "rb") as f:
                        members.append((".mp4", f.read()))
                for ext, data in members:
                    info = tarfile.TarInfo(key + ext)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        start += n
    return str(folder)


def _has_beam():
    import importlib.util

    return importlib.util.find_spec("apache_beam") is not None


def cli(*args):
    from train.__main__ import main

    return main(["build-webvid", *map(str, args)])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The synthetic copy and its build (through the CLI's code path, in process)."""
    base = tmp_path_factory.mktemp("webvid")
    manual = write_manual_dir(base / "manual")
    data = base / "data"
    rc = cli("--manual-dir", manual, "--data-dir", data, "--frames", FRAMES, "--resolution", RES,
             "--stride", STRIDE, "--frames-format", "raw", "--quiet")
    assert rc == 0
    return manual, str(data), os.path.join(data, "webvid", CONFIG, "1.0.0")


def records(folder, split):
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(folder).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_build_counts_and_names_the_skipped(built, capsys):
    manual, data, folder = built
    files = sorted(os.listdir(folder))
    assert "webvid_build.json" in files and "dataset_info.json" in files, files
    assert any(f.startswith("webvid-train.array_record") for f in files), files
    with open(os.path.join(folder, "webvid_build.json")) as f:
        summary = json.load(f)
    print(json.dumps(summary["splits"]))
    assert summary["splits"]["train"] == {"rows": 7, "built": 3,
                                          "skipped": {"missing": 1, "corrupt": 1, "too_short": 1, "duplicate": 1}}
    assert summary["splits"]["validation"] == {"rows": 1, "built": 1, "skipped": {}}
    assert (summary["frames"], summary["resolution"], summary["stride"]) == (FRAMES, RES, STRIDE)
    assert {(s["videoid"], s["reason"]) for s in summary["skipped"]} == EXPECT_SKIPPED
    by_id = {s["videoid"]: s for s in summary["skipped"] if s["reason"] != "duplicate"}
    assert by_id["1005"]["path"] == os.path.join(manual, "videos", "000051_000100", "1005.mp4")
    assert "5 frames" in by_id["1003"]["detail"] and "needs 7" in by_id["1003"]["detail"]
    # No staging or download folders are left beside or inside the build.
    assert os.listdir(os.path.dirname(folder)) == ["1.0.0"]
    assert os.listdir(os.path.join(data, "webvid")) == [CONFIG]

    # The printed summary (a rebuild with --overwrite prints it again) names every skipped video.
    assert cli("--manual-dir", manual, "--data-dir", data, "--frames", FRAMES, "--resolution", RES,
               "--stride", STRIDE, "--frames-format", "raw", "--quiet", "--overwrite") == 0
    out = capsys.readouterr().out
    assert "built 4 of 8 videos" in out
    for vid, reason in EXPECT_SKIPPED - {("1001", "duplicate")}:
        line = next(text for text in out.splitlines() if f" {vid}: " in text)
        assert f"{vid}.mp4" in line, line
        assert f"skipped, {reason}" in out


def test_frames_equal_an_independent_decode(built):
    """Each record's frames = read_video (a whole, single-threaded decode) at the clip's frame indices,
    short side resized to R (PIL bicubic) and centre-cropped: exact (tolerance 0, the storage is lossless)."""
    from PIL import Image

    from storydiff_jax.images import center_crop, resize_short_side
    from storydiff_jax.video_io import read_video

    manual, _, folder = built
    rows = {vid: (caption, page) for vid, caption, page, video in TRAIN + VAL if isinstance(video, tuple)}
    seen = set()
    for split in ("train", "validation"):
        for r in records(folder, split):
            vid = r["videoid"].decode()
            seen.add(vid)
            caption, page = rows[vid]
            assert r["caption"].decode() == caption and r["page_dir"].decode() == page
            decoded = read_video(os.path.join(manual, "videos", page, f"{vid}.mp4"))
            total = len(decoded)
            start = (total - (FRAMES - 1) * STRIDE - 1) // 2          # the span centred in the video
            assert (int(r["source_frames"]), int(r["start_frame"])) == (total, start)
            picked = decoded[start:start + (FRAMES - 1) * STRIDE + 1:STRIDE]
            expect = np.stack([center_crop(np.asarray(resize_short_side(Image.fromarray(f), RES)), RES)
                               for f in picked])
            assert r["frames"].shape == (FRAMES, RES, RES, 3) and r["frames"].dtype == np.uint8
            err = np.abs(r["frames"].astype(int) - expect).max()
            shifted = np.stack([center_crop(np.asarray(resize_short_side(Image.fromarray(f), RES)), RES)
                                for f in decoded[start + 1:start + (FRAMES - 1) * STRIDE + 2:STRIDE]])
            off_by_one = np.abs(r["frames"].astype(int) - shifted).mean()
            print(f"{vid}: {total} frames, start {start}: max abs diff {err}; one frame later: mean {off_by_one:.1f}")
            assert err == 0
            assert off_by_one > 0.5            # the comparison can tell neighbouring frames apart
    assert seen == {"1001", "1002", "1006", "2001"}


def test_two_builds_give_the_same_records(built, tmp_path):
    """A second build with 2 decoding processes: the same records in the same order."""
    manual, _, folder = built
    other = tmp_path / "data2"
    assert cli("--manual-dir", manual, "--data-dir", other, "--frames", FRAMES, "--resolution", RES,
               "--stride", STRIDE, "--frames-format", "raw", "--quiet", "--workers", 2) == 0
    folder2 = os.path.join(other, "webvid", CONFIG, "1.0.0")
    for split in ("train", "validation"):
        a, b = records(folder, split), records(folder2, split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                assert np.array_equal(x[k], y[k]), (split, k)
    name = "webvid-train.array_record-00000-of-00001"
    with open(os.path.join(folder, name), "rb") as f, open(os.path.join(folder2, name), "rb") as g:
        assert f.read() == g.read()


READ_WITHOUT_TF = r"""
import importlib.util, json, sys
import numpy as np
from storydiff_jax.models import clip_text
from storydiff_jax.pipelines.components import preset_tokenizer_dir
from train.data import make_loader, open_source

tokenizer = clip_text.load_tokenizer(preset_tokenizer_dir("<|endoftext|>"))
out = {}
# The raw build read in this process; the H.264 build decoded in a grain worker process (same order: one worker).
for name, path, workers in (("raw", sys.argv[1], 0), ("h264", sys.argv[2], 1)):
    source = open_source(path, frames=4, resolution=32)
    it = iter(make_loader(source, per_host_batch=2, seed=0, num_frames=4, resolution=32, tokenizer=tokenizer,
                          workers=workers))
    batches = [next(it) for _ in range(3)]
    out[name] = {"source": type(source).__name__, "len": len(source),
                 "ids": [[str(i) for i in b["id"]] for b in batches],
                 "frames": list(batches[0]["frames"].shape), "dtype": str(batches[0]["frames"].dtype),
                 "input_ids": list(batches[0]["input_ids"].shape)}
    out[name + "_frames"] = np.concatenate([b["frames"] for b in batches]).astype(np.float64)
mse = np.mean((out.pop("raw_frames") - out.pop("h264_frames")) ** 2)
print(json.dumps({**out, "psnr": float(10 * np.log10(255 ** 2 / mse)),
                  "tensorflow_imported": "tensorflow" in sys.modules,
                  "tensorflow_findable": importlib.util.find_spec("tensorflow") is not None}))
"""


FAKE_TENSORFLOW = """
import os
with open(os.environ["FAKE_TF_MARKER"], "a") as f:
    f.write("tensorflow was imported\\n")
raise ImportError("fake tensorflow")
"""


def test_training_reads_through_open_source_and_grain_without_tensorflow(built, compressed, tmp_path):
    """A `tensorflow` package that records being imported sits first on the path (whether or not the real
    one is installed): reading through open_source + make_loader, the H.264 build decoded in a grain worker
    process, must never try to import it."""
    _, data, _ = built
    (tmp_path / "fake" / "tensorflow").mkdir(parents=True)
    (tmp_path / "fake" / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    marker = tmp_path / "tf-imported"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FAKE_TF_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), ROOT])}
    proc = subprocess.run([sys.executable, "-c", READ_WITHOUT_TF, data, compressed[1]["h264"]], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(got)
    for name in ("raw", "h264"):
        assert got[name]["source"] == "WebVidSource" and got[name]["len"] == 3
        assert got[name]["frames"] == [2, FRAMES, RES, RES, 3] and got[name]["dtype"] == "uint8"
        assert got[name]["input_ids"] == [2, 77]
        flat = [i for b in got[name]["ids"] for i in b]
        assert sorted(flat[:3]) == sorted(flat[3:6]) == ["1001", "1002", "1006"]   # each epoch: every clip once
    assert got["h264"]["ids"] == got["raw"]["ids"] and got["psnr"] >= 40
    assert not got["tensorflow_imported"] and not marker.exists()


def test_run_settings_must_match_the_build(built, tmp_path, capsys):
    from train.__main__ import main
    from train.data import open_source
    from train.webvid import WebVidSource

    _, data, folder = built
    for where in (data, os.path.join(data, "webvid"), folder):      # a TFDS data dir, dataset dir, or the build
        src = open_source(where, frames=FRAMES, resolution=RES)
        assert isinstance(src, WebVidSource) and len(src) == 3
        rec = src[0]
        assert set(rec) >= {"id", "frames", "caption"} and rec["frames"].shape == (FRAMES, RES, RES, 3)
    with pytest.raises(ConfigError, match="neither a WebVid build .* nor a clip folder"):
        open_source(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        open_source(data, frames=8, resolution=RES)
    msg = str(e.value)
    assert "--frames 8" in msg and f"{FRAMES} frames" in msg and "build-webvid --frames 8" in msg
    # The training CLI refuses before it creates the workdir.
    workdir = tmp_path / "run"
    rc = main(["smp", "--data-dir", data, "--workdir", str(workdir), "--preset", "tiny-video", "--frames",
               str(FRAMES), "--resolution", "64", "--batch-size", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    with capsys.disabled():
        print("\n" + err)
    assert rc == 2 and len(err.splitlines()) == 1 and "--resolution 64" in err and f"{RES}x{RES}" in err
    assert not workdir.exists()
    # --data-workers (grain processes decoding the clips) is checked as early; 0 keeps older runs' identity.
    rc = main(["smp", "--data-dir", data, "--workdir", str(workdir), "--preset", "tiny-video", "--frames",
               str(FRAMES), "--resolution", str(RES), "--data-workers", "-1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --data-workers must be a whole number >= 0, got -1" and not workdir.exists()
    from train.config import TrainConfig

    assert TrainConfig(model="tiny-video", data_dir=data).identity()["data_workers"] is None
    assert TrainConfig(model="tiny-video", data_dir=data, data_workers=2).identity()["data_workers"] == 2


def test_cli_errors_are_one_line_and_leave_nothing(built, tmp_path, capsys):
    manual, data, _ = built
    empty = tmp_path / "empty"
    empty.mkdir()
    no_columns = tmp_path / "cols"
    no_columns.mkdir()
    (no_columns / "results_train.csv").write_text("id,caption\n1,a\n")
    all_missing = tmp_path / "gone"
    all_missing.mkdir()
    with open(all_missing / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER, ["9001", "x", "p", "", ""], ["9002", "y", "p", "", ""]])
    val_gone = tmp_path / "valgone"     # a fine train CSV, a validation CSV of missing videos only
    val_gone.mkdir()
    for name, ids in (("results_train.csv", ["9101", "9102", "9103"]), ("results_val.csv", ["9201"])):
        with open(val_gone / name, "w", newline="") as f:
            csv.writer(f).writerows([HEADER] + [[i, "z", "p", "", ""] for i in ids])
    cases = {
        "no manual dir": ([tmp_path / "nowhere"], "no such folder"),
        "no csv": ([empty], "no .csv file and no .tar shard"),
        "csv without the columns": ([no_columns], "no column videoid, name, page_dir"),
        "nothing buildable": ([all_missing], "nothing buildable"),
        "empty validation split": ([val_gone], "nothing buildable in --manual-dir"),
        "bad layout field": ([manual, "--layout", "videos/{page}/{videoid}.mp4"], "no column page"),
        "frames": ([manual, "--frames", 1], "--frames 1"),
        "jpeg quality": ([manual, "--frames-format", "jpeg", "--jpeg-quality", 101], "--jpeg-quality 101: must be"),
        "crf for jpeg": ([manual, "--frames-format", "jpeg", "--h264-crf", 20], "--h264-crf applies to "
                                                                                "--frames-format h264"),
        "beam options alone": ([manual, "--beam-options=--direct_num_workers=2"], "--beam-options needs "
                                                                                  "--beam-runner"),
        "beam workers": ([manual, "--beam-runner", "DirectRunner", "--workers", 2], "the runner decides"),
    }
    if not _has_beam():
        cases["beam absent"] = ([manual, "--beam-runner", "DirectRunner"], "pip install 'storydiff-jax[beam]'")
    seen = []
    for what, (args, expect) in cases.items():
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        rc = cli("--manual-dir", *args[:1], "--data-dir", out, *args[1:], "--quiet")
        err = capsys.readouterr().err.strip()
        seen.append(f"{what}: rc {rc}: {err}")
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err, (what, err)
        assert not out.exists() or not os.listdir(out), (what, os.listdir(out))   # no half-built dataset
    assert "for split 'validation' (results_val.csv): 1 missing of 1 videos" in seen[4], seen[4]
    # A failed --overwrite keeps the earlier build whole.
    before = sorted(os.listdir(os.path.join(data, "webvid", CONFIG, "1.0.0")))
    assert cli("--manual-dir", all_missing, "--data-dir", data, "--frames", FRAMES, "--resolution", RES, "--stride",
               STRIDE, "--frames-format", "raw", "--overwrite", "--quiet") == 2
    assert "nothing buildable" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(data, "webvid", CONFIG, "1.0.0"))) == before
    assert os.listdir(os.path.join(data, "webvid", CONFIG)) == ["1.0.0"]
    # An existing build is not replaced silently.
    assert cli("--manual-dir", manual, "--data-dir", data, "--frames", FRAMES, "--resolution", RES, "--stride",
               STRIDE, "--frames-format", "raw", "--quiet") == 2
    assert "--overwrite" in capsys.readouterr().err
    with capsys.disabled():
        print("\n" + "\n".join(seen))


def test_exit_status_of_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train", "build-webvid", "--manual-dir", str(tmp_path / "none"),
                           "--data-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no such folder" in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Compressed frames, older builds, video2dataset shards


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def compressed(built, tmp_path_factory):
    """The copy built with JPEG frames (quality 95) and with the default format (H.264, CRF 15), side by
    side in one data dir."""
    manual = built[0]
    data = tmp_path_factory.mktemp("compressed")
    for extra in (["--frames-format", "jpeg"], []):
        assert cli("--manual-dir", manual, "--data-dir", data, "--frames", FRAMES, "--resolution", RES,
                   "--stride", STRIDE, "--quiet", *extra) == 0
    return str(data), {"jpeg": os.path.join(data, "webvid", CONFIG + "_jpeg_q95", "1.0.0"),
                       "h264": os.path.join(data, "webvid", CONFIG + "_h264_crf15", "1.0.0")}


def test_compressed_frames_decode_close_to_the_lossless_build(built, compressed):
    """Every clip of the JPEG and H.264 builds decodes (through WebVidSource, as training reads it) to
    within 40 dB PSNR of the raw build's frames; the builds record their format and store a fraction of
    the raw bytes; everything else in the records is the same."""
    from train.data import open_source
    from train.webvid import WebVidSource

    _, _, raw_folder = built
    data, folders = compressed
    raw = WebVidSource(raw_folder)
    for fmt, quality in (("jpeg", 95), ("h264", 15)):
        with open(os.path.join(folders[fmt], "webvid_build.json")) as f:
            summary = json.load(f)
        assert summary["frames_format"] == {"format": fmt, "quality": quality}
        assert summary["splits"]["train"]["skipped"] == {"missing": 1, "corrupt": 1, "too_short": 1, "duplicate": 1}
        source = WebVidSource(folders[fmt])
        assert len(source) == len(raw) == 3
        stored = records(folders[fmt], "train")
        field = "jpeg_frames" if fmt == "jpeg" else "h264_frames"
        for i in range(len(raw)):
            a, b = raw[i], source[i]
            assert (a["id"], a["caption"], a["page_dir"]) == (b["id"], b["caption"], b["page_dir"])
            assert b["frames"].shape == (FRAMES, RES, RES, 3) and b["frames"].dtype == np.uint8
            quality_db = psnr(b["frames"], a["frames"])
            size = sum(len(x) for x in np.atleast_1d(stored[i][field]))
            print(f"{fmt} {b['id']}: PSNR {quality_db:.1f} dB, {size} bytes stored (raw {a['frames'].nbytes})")
            assert quality_db >= 40
            assert size < a["frames"].nbytes
    # Builds of other formats sit side by side; a data dir holding several is not guessed from.
    with pytest.raises(ConfigError, match="holds several WebVid builds"):
        open_source(data, frames=FRAMES, resolution=RES)


def test_an_older_raw_build_still_reads(built, tmp_path):
    """A build written before frame formats existed (its summary names no format) reads as raw."""
    from train.webvid import WebVidSource

    _, _, folder = built
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    summary = json.loads((old / "webvid_build.json").read_text())
    for key in ("frames_format", "input", "runner"):
        summary.pop(key)
    (old / "webvid_build.json").write_text(json.dumps(summary))
    new, older = WebVidSource(folder), WebVidSource(str(old))
    assert older.codec.format == "raw" and len(older) == len(new)
    for i in range(len(new)):
        assert older[i]["id"] == new[i]["id"] and np.array_equal(older[i]["frames"], new[i]["frames"])


def test_video2dataset_shards_build_the_same_examples(built, tmp_path):
    """The train videos as 3 video2dataset tar shards (one sample's video corrupt, one without a video, a
    repeated videoid): the same records as the CSV layout, the same skip counts, the bad samples named by
    shard and member."""
    manual, _, folder = built
    shards = write_tar_shards(tmp_path / "shards", manual)
    data = tmp_path / "data"
    assert cli("--manual-dir", shards, "--data-dir", data, "--frames", FRAMES, "--resolution", RES, "--stride",
               STRIDE, "--frames-format", "raw", "--quiet") == 0
    built_folder = os.path.join(data, "webvid", CONFIG, "1.0.0")
    with open(os.path.join(built_folder, "webvid_build.json")) as f:
        summary = json.load(f)
    assert summary["input"] == "webdataset" and list(summary["splits"]) == ["train"]
    assert summary["splits"]["train"] == {"rows": 7, "built": 3,
                                          "skipped": {"missing": 1, "corrupt": 1, "too_short": 1, "duplicate": 1}}
    named = {s["videoid"]: (s["reason"], s["path"]) for s in summary["skipped"]}
    assert named["1004"] == ("corrupt", os.path.join(shards, "00001.tar") + ":000010000.mp4")
    assert named["1005"][0] == "missing" and named["1001"] == ("duplicate",
                                                              os.path.join(shards, "00002.tar") + ":000020001.mp4")
    a, b = records(folder, "train"), records(built_folder, "train")
    assert [r["videoid"] for r in a] == [r["videoid"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), x["videoid"]


def test_a_damaged_shard_is_read_up_to_the_damage(built, tmp_path):
    """A tar shard cut short: the samples before the cut are read, the cut is one 'corrupt' entry naming
    the shard (the build goes on with the other shards)."""
    from train.webvid_input import Unit, read_unit

    shards = write_tar_shards(tmp_path / "shards", built[0], per_shard=(3,))
    path = os.path.join(shards, "00000.tar")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) * 2 // 3])
    items = list(read_unit(Unit("train", "tar", path), shards, ""))
    print([(i.videoid, i.problem) for i in items])
    assert [i.videoid for i in items[:-1]] == ["1001", "1002"][:len(items) - 1] and len(items) >= 2
    assert items[-1].problem[0] == "corrupt" and items[-1].path == path and "breaks after" in items[-1].problem[1]
