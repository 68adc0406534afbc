"""`python -m infer.app` end to end: one app process on the tiny presets (a free localhost port), driven through
its HTTP API with gradio_client: a 4-panel story (gallery, pages, the run folder as a zip, bank, a ControlNet
posing a panel from an uploaded keypoint file), determinism,
continuing with the saved bank, a transition from two of its panels, a malformed story (the CLI's own error
line, nothing written), upload checks, and the queue (one run at a time, the next one waits and is told).

AppServer is shared with tests/test_app_browser.py.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT_S = 300   # imports + loading both tiny presets: ~35 s on a CPU shared by several jobs
STORY4 = ("[Ana] a girl with a red scarf\n\n[Ana] reads a book #Monday.\n[Ana] walks in the park #Tuesday.\n"
          "[Ana] sleeps under a tree\n[NC] a lighthouse at night #The end.\n")
FAST = dict(height=64, width=64, steps=3)   # the shapes of tests/test_story_cli.py: compiled programs are reused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """infer.app in a subprocess; ready when its page answers, or a RuntimeError with the app's log."""

    def __init__(self, out, log_path, *extra):
        self.out = str(out)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = str(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infer.app", "--port", str(self.port), "--out", self.out, *extra], cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infer.app exited with {self.proc.returncode} before answering:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                self.stop()
                raise RuntimeError(f"infer.app did not answer on {self.url} within {READY_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        print(f"infer.app ready after {self.startup_s:.1f} s on {self.url}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    srv = AppServer(root / "out", root / "app.log", "--controlnet", "tiny-sdxl")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(server.out + "-client"))


def story_inputs(text, **overrides):
    values = dict(text=text, style="none", negative="", layout="four-panel", height=128, width=128, steps=8,
                  guidance=5.0, seed=0, id_length="auto", sa32=0.5, sa64=0.5, mode="bank", window=4, sampler="ddim",
                  freeu=True, save_bank=False, bank_upload=None, continue_bank=False, control_files=None,
                  lora_files=None, lora_scale=1.0)
    values.update(overrides)
    return values


def _story_files(out):
    folder = os.path.join(out, "stories")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def pose_file(folder, name):
    """An OpenPose keypoint file named `name` (named by panel, as the app expects)."""
    from story_samples import pose

    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(pose(1), f)
    return path


@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    """The first story's inputs: panel 2 posed by an uploaded keypoint file."""
    from gradio_client import handle_file

    return dict(id_length="2", control_files=[handle_file(pose_file(tmp_path_factory.mktemp("poses"), "2.json"))],
                **FAST)


@pytest.fixture(scope="module")
def first_story(server, client, posed):
    t0 = time.perf_counter()
    result = client.predict(**story_inputs(STORY4, save_bank=True, **posed), api_name="/story")
    print(f"first 4-panel story (compiles): {time.perf_counter() - t0:.1f} s")
    return result


def test_story_end_to_end(server, first_story):
    panels, pages, run_zip, bank, log, *_ = first_story
    assert [p["caption"] for p in panels] == ["Monday.", "Tuesday.",
                                               "a girl with a red scarf sleeps under a tree", "The end."]
    assert len(pages) == 1 and "random-weight preset" in log
    runs = [n for n in _story_files(server.out) if not n.endswith(".zip")]
    assert len(runs) == 1, runs
    folder = os.path.join(server.out, "stories", runs[0])
    # The zip is the run folder exactly as the CLI writes it: same names, same bytes.
    with zipfile.ZipFile(run_zip) as z:
        names = sorted(n for n in z.namelist() if not n.endswith("/"))
        on_disk = sorted(os.path.relpath(os.path.join(d, f), os.path.dirname(folder))
                         for d, _, fs in os.walk(folder) for f in fs)
        assert names == on_disk
        assert names == sorted([f"{runs[0]}/story.json", f"{runs[0]}/pages/00.png", f"{runs[0]}/control/02.png"]
                               + [f"{runs[0]}/panels/{i:02d}.png" for i in range(4)])
        for n in names:
            with open(os.path.join(os.path.dirname(folder), n), "rb") as f:
                assert z.read(n) == f.read(), n
        manifest = json.loads(z.read(f"{runs[0]}/story.json"))
    assert manifest["model"] == "preset:tiny-sdxl" and manifest["settings"]["steps"] == 3
    assert manifest["settings"]["height"] == 64 and manifest["id_panels"] == {"Ana": [0, 1]}
    assert manifest["controlnets"] == [{"source": "tiny-sdxl", "scale": 1.0}]
    assert [p.get("control", [{}])[0].get("map") for p in manifest["panels"]] == [None, None, "control/02.png", None]
    for p in panels:
        assert Image.open(p["image"]).size == (64, 64)
    # The bank went under --out/banks and came back as a download.
    saved = os.listdir(os.path.join(server.out, "banks"))
    assert saved == [runs[0] + ".npz"] and os.path.getsize(bank) == os.path.getsize(
        os.path.join(server.out, "banks", saved[0]))
    assert not [n for n in _story_files(server.out) if n.startswith(".")]   # no partial folders left


def test_transition_from_story_panels(server, client, first_story):
    from storydiff_jax.video_io import read_video

    t0 = time.perf_counter()
    video, files, log = client.predict(source="panels of the last story", start_panel=0, end_panel=3,
                                       start_upload=None, end_upload=None, prompt="", frames=4, steps=2, seed=0,
                                       api_name="/transition")
    print(f"transition (4 frames, 2 steps): {time.perf_counter() - t0:.1f} s")
    path = video["video"] if isinstance(video, dict) else video
    assert read_video(path).shape == (4, 64, 64, 3)
    written = sorted(os.listdir(os.path.join(server.out, "videos")))
    assert len(written) == 2 and written[0].endswith(".json") and written[1].endswith(".mp4")
    manifest = json.loads(open(next(f for f in files if f.endswith(".json"))).read())
    assert manifest["transitions"][0]["prompt"] == "a lighthouse at night"   # the end panel's prompt
    assert manifest["transitions"][0]["start"].startswith(os.path.join(server.out, "stories"))
    assert manifest["settings"]["steps"] == 2 and manifest["frames"] == 4


def test_same_seed_same_panels_and_bank_continuation(server, client, first_story, posed):
    again = client.predict(**story_inputs(STORY4, **posed), api_name="/story")
    for a, b in zip(first_story[0], again[0]):
        assert np.array_equal(np.asarray(Image.open(a["image"])), np.asarray(Image.open(b["image"])))
    # Continue with the bank saved by the first run: Ana is not regenerated (no id panels), the run says so.
    sequel = "[Ana] a girl with a red scarf\n\n[Ana] swims in the sea #Thursday.\n[Ana] waves goodbye #Friday.\n"
    panels, _, run_zip, _, _, *_ = client.predict(**story_inputs(sequel, continue_bank=True, negative="-blurry",
                                                               **FAST), api_name="/story")
    assert [p["caption"] for p in panels] == ["Thursday.", "Friday."]
    with zipfile.ZipFile(run_zip) as z:
        manifest = json.loads(z.read(next(n for n in z.namelist() if n.endswith("story.json"))))
    assert manifest["id_panels"] == {} and manifest["loaded_bank"].startswith(os.path.join(server.out, "banks"))
    assert manifest["settings"]["negative"] == "-blurry"   # a value starting with "-" reaches the CLI parser intact


def _cli_error(tmp_path, text):
    story = tmp_path / "bad.txt"
    story.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "infer.story", "--story", str(story), "--out", str(tmp_path / "o"),
                           "--id-length", "2", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr.strip().removeprefix("error: ")


@pytest.mark.parametrize("text", ["[Ana] a girl\n\n[Ana] reads\n[Ana] sits\n[Cid] jumps\n",
                                  "[Ana] a girl\n[Ana] a woman\n\n[Ana] reads\n"])
def test_malformed_story_is_the_cli_error_and_writes_nothing(server, client, tmp_path, text):
    from gradio_client.exceptions import AppError

    before = _story_files(server.out)
    with pytest.raises(AppError) as err:
        client.predict(**story_inputs(text, id_length="2", **FAST), api_name="/story")
    expected = _cli_error(tmp_path, text)
    print(f"page error: {err.value}")
    assert str(err.value) == expected
    assert _story_files(server.out) == before


def test_bad_settings_and_uploads(server, client, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 600, np.uint8).tobytes())
    cases = [
        (dict(height=100), "multiple of 32"),                      # StoryOptions / pipeline checks, as the CLI
        (dict(guidance=-1.0), "guidance must be a finite number >= 0"),
        (dict(steps=0), "steps must be a whole number >= 1"),
        (dict(bank_upload=handle_file(__file__)), r"Invalid file type.*\.npz"),   # Gradio's own type check
        (dict(bank_upload=handle_file(str(junk))), "not a readable character bank"),
        (dict(control_files=[handle_file(pose_file(tmp_path, "pose.json"))]), "name each file after the panel"),
        (dict(control_files=[handle_file(pose_file(tmp_path, "9.json"))]), "panel 9, but the story has 4 panels"),
    ]
    before = _story_files(server.out)
    for overrides, words in cases:
        settings = {**FAST, **overrides}
        with pytest.raises(AppError, match=words):
            client.predict(**story_inputs(STORY4, id_length="2", **settings), api_name="/story")
    with pytest.raises(AppError, match="no bank saved in this session yet"):   # a new session has none
        Client(server.url, verbose=False).predict(**story_inputs(STORY4, continue_bank=True, **FAST),
                                                  api_name="/story")
    assert _story_files(server.out) == before
    small, wide = tmp_path / "a.png", tmp_path / "wide.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(small)
    Image.new("RGB", (5000, 8)).save(wide)
    with pytest.raises(AppError, match="at most 4096 pixels"):
        client.predict(source="uploaded images", start_panel=None, end_panel=None,
                       start_upload=handle_file(str(small)), end_upload=handle_file(str(wide)), prompt="", frames=4,
                       steps=2, seed=0, api_name="/transition")
    with pytest.raises(AppError, match="no end image uploaded"):
        client.predict(source="uploaded images", start_panel=None, end_panel=None,
                       start_upload=handle_file(str(small)), end_upload=None, prompt="", frames=4, steps=2, seed=0,
                       api_name="/transition")


def test_one_run_at_a_time_the_next_waits_in_line(server, first_story):
    """Three users at once: the device runs one story at a time; the others are told their place in line."""
    from gradio_client import Client
    from gradio_client.utils import Status

    clients = [Client(server.url, verbose=False, download_files=str(server.out + "-client")) for _ in range(3)]
    # Same settings as the first story: its compiled programs serve all three (another seed draws other CSA
    # token counts, i.e. other shapes, and would compile again).
    jobs = [c.submit(**story_inputs(STORY4, id_length="2", **FAST), api_name="/story") for c in clients]
    ranks = [set() for _ in jobs]
    while not all(j.done() for j in jobs):
        for j, seen in zip(jobs, ranks):
            s = j.status()
            if s.code == Status.IN_QUEUE and s.rank is not None:
                seen.add(s.rank)
        time.sleep(0.02)
    for j in jobs:
        assert len(j.result()[0]) == 4
    print(f"queue ranks seen per job: {ranks}")
    assert max(max(r, default=-1) for r in ranks) >= 1, ranks   # someone waited behind another waiting job


def test_wrong_model_folder_fails_before_serving(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "infer.app", "--model", str(tmp_path / "nope"), "--out", str(out),
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "no such folder" in lines[0] and "convert" in lines[0] and not out.exists()
