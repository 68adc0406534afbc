"""Training the SMP on the micro model (tests/train_model.py: 16x16, 4 frames, batch 8) on 8 fake CPU devices.

The train step trained here is the cached-features one (the frozen encoders' outputs come from a feature
cache, `python -m train cache-features`, written first; tests/test_train_features.py checks that it feeds
the same loss as the raw step, and tests/test_train_multihost.py trains the raw step end to end). Two
subprocesses run side by side and compile as few train steps as they can:

* on one device, the first two steps from the same state and batches with --remat none, blocks and full:
  losses, gradients (read back from Adam's first moment), updated params, the compiled programs' memory;
* on 8 devices (the driver):
  1. a `python -m train smp` run on a data=2 x fsdp=4 mesh with --remat blocks that must overfit the handful
     of clips: the reference (its compiled step is reused by everything below on that mesh);
  2. its first two steps again, compared with one device's;
  3. kill, resume on another mesh, resume: a `python -m train smp` subprocess on the reference's settings
     killed with SIGKILL mid-way (a real process, not an exception); the driver resumes that workdir through
     the CLI entry point (`train.__main__.main`) on fsdp=8 with --remat full, sends itself a real SIGTERM
     two steps later (the run saves the step it reached and exits 143), and resumes on the reference's mesh
     to the end. The examples consumed per step must equal the reference's exactly, the params to float
     rounding (three meshes did the arithmetic);

then the tests read their measurements, export the reference and render with `infer.transition`, and check
the one-line errors.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from train_model import model_args, restore_params, write_clips, write_micro_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY, CLIPS = 6, 2, 8
RESOLUTION, FRAMES = 16, 4
MESH, REMAT = "data=2,fsdp=4", "blocks"              # the reference run's
OTHER_MESH, OTHER_REMAT = "fsdp=8", "full"          # what the killed run resumes with, for two steps
# fsdp_min_size 1024: the micro model's arrays are small; most of them shard over fsdp like a real model's.
RUN = dict(steps=STEPS, batch_size=8, frames=FRAMES, resolution=RESOLUTION, lr=3e-3, warmup=0, schedule="constant",
           save_every=SAVE_EVERY, log_every=1, seed=3, fsdp_min_size=1024)


def _run_args(data, workdir, model, features=None, **over):
    s = {**RUN, "mesh": MESH, "remat": REMAT, **over}
    args = ["smp", "--data-dir", str(data), "--workdir", str(workdir), *model_args(model), "--quiet"]
    if features:
        args += ["--features", str(features)]
    for k, v in s.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _losses(out: str) -> dict[int, float]:
    """{step: loss} from the metric lines of `python -m train smp --quiet`."""
    return {int(line.split()[1].rstrip(":")): float(line.split("loss ")[1].split()[0])
            for line in out.splitlines() if line.startswith("step ")}


def _flat(tree) -> dict[str, np.ndarray]:
    from train.step import flatten

    return {k: np.asarray(v) for k, v in flatten(tree).items()}


# ------------------------------------------------------------------------------------------------ driver

def driver(root):
    """Runs with 8 host devices (`cpu_env(8)`); writes its measurements to root/driver.json and the arrays
    the tests compare to root/first-steps-8.npz."""
    import jax

    from train.__main__ import main

    assert jax.device_count() == 8
    model, data, cache = (os.path.join(root, n) for n in ("model", "clips", "cache"))
    results = {}
    # The reference run first: its compiled step goes to the persistent compilation cache, where the
    # subprocess that is killed below finds it; that subprocess then runs beside the first steps.
    t0 = time.perf_counter()
    ref = os.path.join(root, "ref")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(_run_args(data, ref, model, cache))
    results["train"] = {"rc": rc, "out": out.getvalue(), "s": time.perf_counter() - t0}
    work = os.path.join(root, "killed")
    killed = start_killed_run(data, work, model, cache)

    first_steps(root, [("8-blocks", 8, "blocks")])
    t0 = time.perf_counter()
    results["resume"] = resume_on_other_meshes(killed, data, work, model, cache, main)
    results["resume"]["s"] = time.perf_counter() - t0
    # The one error that needs several devices: a batch the mesh cannot split.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(_run_args(data, ref + "-bad-batch", model, cache, batch_size=12))
    results["bad_batch"] = {"rc": rc, "stderr": err.getvalue(), "left": os.path.exists(ref + "-bad-batch")}
    with open(os.path.join(root, "driver.json"), "w") as f:
        json.dump(results, f)


def first_steps(root, runs):
    """Two steps from the same state and batches for each (name, devices, remat) of `runs`: what they trained
    (root/first-steps-<devices>.npz), and the compiled step's memory and FLOPs (root/first-steps-<devices>.json)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from storydiff_jax.pipelines.video_components import load_video_components
    from storydiff_jax.sharding import make_mesh, put_sharded
    from train.config import TrainConfig
    from train.data import make_loader
    from train.features import open_features
    from train.loop import step_flops
    from train.step import Trainer, global_batch, split_params

    model, data, cache = (os.path.join(root, n) for n in ("model", "clips", "cache"))
    comp = load_video_components(model)
    arrays, summary = {}, {}
    for name, n, remat in runs:
        cfg = TrainConfig(model=model, data_dir=data, features=cache, remat=remat, **RUN)
        source = open_features(cfg)
        trainable, frozen, config = split_params(comp, cfg, smp_from_model=True)
        trainer = Trainer.build(cfg, config, comp.tokenizer)
        loader = iter(make_loader(source, per_host_batch=8, seed=cfg.seed, num_frames=FRAMES, resolution=RESOLUTION,
                                  tokenizer=comp.tokenizer, prepared=True))
        mesh = make_mesh({"data": 2, "fsdp": 4} if n == 8 else {"data": 1, "fsdp": 1}, jax.devices()[:n])
        state = trainer.init_state(trainable)
        frozen = source.frozen(frozen)
        state_sh, frozen_sh, _ = trainer.shardings(mesh, state, frozen)
        state, frozen = put_sharded(state, state_sh), put_sharded(frozen, frozen_sh)
        batches = [global_batch(next(loader), mesh) for _ in range(2)]
        t0 = time.perf_counter()
        step = trainer.compiled_step(mesh, state, frozen, batches[0])   # on 8 devices: the reference run's
        mem = step.memory_analysis()
        lr = jax.device_put(np.float32(cfg.lr), NamedSharding(mesh, P()))
        out = {"compile_s": time.perf_counter() - t0, "temp_bytes": int(mem.temp_size_in_bytes),
               "argument_bytes": int(mem.argument_size_in_bytes), "flops": step_flops(step), "loss": [],
               "grad_norm": []}
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            state, metrics = step(state, frozen, batch, lr)
            out["loss"].append(float(metrics["loss"]))
            out["grad_norm"].append(float(metrics["grad_norm"]))
            adam = state["opt"][1]
            if i == 0:   # after one step from zero, Adam's moments are (1 - b) x the clipped gradient (squared)
                arrays.update({f"{name}/mu/{k}": v for k, v in _flat(adam.mu).items()})
                arrays.update({f"{name}/nu/{k}": v for k, v in _flat(adam.nu).items()})
        arrays.update({f"{name}/params/{k}": v for k, v in _flat(state["params"]).items()})
        out["steps_s"] = time.perf_counter() - t0
        summary[name] = out
    devices = runs[0][1]
    np.savez(os.path.join(root, f"first-steps-{devices}.npz"), **arrays)
    with open(os.path.join(root, f"first-steps-{devices}.json"), "w") as f:
        json.dump(summary, f)


def _signal_when(log, when, send, proc=None, timeout=900):
    """Call `send()` once `when(number of logged steps)` holds for the example log that this run writes (a
    resumed run first rewrites the log as a new file: wait for a new inode). Returns whether it was sent."""
    from train.loop import read_example_log

    before = os.stat(log).st_ino if os.path.exists(log) else None
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            if os.stat(log).st_ino != before and when(len(read_example_log(log))):
                send()
                return True
        except (FileNotFoundError, ValueError):   # not written yet / a line being written
            pass
        time.sleep(0.05)
    return False


def start_killed_run(data, work, model, cache):
    """A `python -m train smp` subprocess on the reference's settings, SIGKILLed (by a watcher thread) once
    its first checkpoint exists and the step after it has started."""
    log = os.path.join(work, "examples-p0.log")
    first_save = os.path.join(work, "checkpoints", str(SAVE_EVERY))
    # This process's environment: 8 devices and the suite's flags (the pytest process set them).
    proc = subprocess.Popen([sys.executable, "-m", "train", *_run_args(data, work, model, cache)], cwd=ROOT,
                            env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Once step SAVE_EVERY has started and its checkpoint exists (the next save is a step and a save away).
    ready = lambda n: n > SAVE_EVERY and os.path.isdir(first_save)  # noqa: E731
    watcher = threading.Thread(target=_signal_when, args=(log, ready, proc.kill, proc), daemon=True)
    watcher.start()
    return proc, watcher


def resume_on_other_meshes(killed, data, work, model, cache, main):
    """Resume the killed run here through the CLI entry point on OTHER_MESH with OTHER_REMAT, SIGTERM
    ourselves two steps after the restored one, resume again on the reference's mesh to the end. Returns
    what the test checks."""
    from train.loop import read_example_log

    proc, watcher = killed
    killed_out = proc.communicate(timeout=900)[0]
    watcher.join()
    log = os.path.join(work, "examples-p0.log")
    r = {"killed_rc": proc.returncode, "killed_out": killed_out[-2000:], "killed_at": len(read_example_log(log))}

    def run_main(args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as e:
                rc = e.code
        return rc, out.getvalue() + err.getvalue()

    sender = threading.Thread(target=_signal_when, args=(log, lambda n: n >= SAVE_EVERY + 2,
                                                         lambda: os.kill(os.getpid(), signal.SIGTERM)), daemon=True)
    sender.start()
    r["term_rc"], r["term_out"] = run_main(_run_args(data, work, model, cache, mesh=OTHER_MESH, remat=OTHER_REMAT))
    sender.join()
    r["final_rc"], r["final_out"] = run_main(_run_args(data, work, model, cache))
    r["log"] = read_example_log(log)
    return r


# ------------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import cpu_env  # here, not at the top: the subprocesses run this file without torch

    from train.__main__ import main

    root = tmp_path_factory.mktemp("train")
    write_micro_model(root / "model")
    write_clips(root / "clips", n=CLIPS, frames=FRAMES, size=RESOLUTION)
    t0 = time.perf_counter()
    assert main(["cache-features", "--data-dir", str(root / "clips"), "--out", str(root / "cache"), "--quiet",
                 *model_args(root / "model"), "--frames", str(FRAMES), "--resolution", str(RESOLUTION)]) == 0
    t_cache = time.perf_counter() - t0
    # XLA's CPU scheduler orders a program for thread parallelism by default, which keeps recomputed
    # activations alive as long as kept ones (--remat would save nothing); accelerators schedule for memory.
    scheduler = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**cpu_env(n), "XLA_FLAGS": f"{cpu_env(n)['XLA_FLAGS']} {scheduler}"})
             for mode, n in (("driver", 8), ("one-device", 1))]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    with open(root / "driver.json") as f:
        results = json.load(f)
    arrays, steps = {}, {}
    for n in (1, 8):
        with np.load(root / f"first-steps-{n}.npz") as f:
            arrays.update(f)
        with open(root / f"first-steps-{n}.json") as f:
            steps.update(json.load(f))
    print(f"cache {t_cache:.1f}s; both subprocesses {time.perf_counter() - t0 - t_cache:.1f}s: the driver's reference "
          f"run {results['train']['s']:.1f}s, resumes {results['resume']['s']:.1f}s; one device: "
          + ", ".join(f"{k} compiled in {v['compile_s']:.1f}s" for k, v in steps.items()))
    return {"root": root, "data": str(root / "clips"), "model": str(root / "model"), "cache": str(root / "cache"),
            "ref": str(root / "ref"), "arrays": arrays, "first_steps": steps, **results}


def _runs(run, name, kind):
    prefix = f"{name}/{kind}/"
    return {k[len(prefix):]: v for k, v in run["arrays"].items() if k.startswith(prefix)}


def _max_rel(a: dict, b: dict) -> float:
    """max |a - b| over all arrays / max |a|."""
    assert a.keys() == b.keys() and a
    scale = max(float(np.max(np.abs(x))) for x in a.values())
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a) / scale


def test_remat_changes_no_value_and_saves_memory(run):
    """--remat blocks and full on one device: the same losses, gradients and updated params as none; less
    temporary memory, more FLOPs."""
    steps = run["first_steps"]
    base = steps["1-none"]
    for name in ("1-blocks", "1-full"):
        s = steps[name]
        grads = _max_rel(_runs(run, "1-none", "mu"), _runs(run, name, "mu"))
        params = _max_rel(_runs(run, "1-none", "params"), _runs(run, name, "params"))
        loss = max(abs(a - b) / abs(a) for a, b in zip(base["loss"], s["loss"]))
        print(f"remat {name[2:]} vs none: losses {s['loss']} vs {base['loss']} (rel {loss:.1e}); step-1 gradients "
              f"{grads:.1e}, step-2 params {params:.1e} (max |diff| / max |x|); temporaries "
              f"{s['temp_bytes'] / 2**20:.2f} vs {base['temp_bytes'] / 2**20:.2f} MiB; FLOPs "
              f"{s['flops'] / 1e9:.3f} vs {base['flops'] / 1e9:.3f} G; compiled in {s['compile_s']:.1f}s")
        assert loss <= 1e-6 and grads <= 1e-6
        # Adam's first update is about lr x sign(gradient): an element whose gradient is near zero turns float
        # rounding into a visible difference, so the params after two steps get a looser bound.
        assert params <= 1e-4
        assert s["temp_bytes"] < base["temp_bytes"] and s["flops"] > base["flops"]


def test_one_device_and_a_data_fsdp_mesh_agree(run):
    """data=2 x fsdp=4 on 8 devices against one device, first two steps: losses, gradient norms, gradients,
    params. The micro model's SMP starts from non-zero weights (its folder's), so every trained component has
    gradients at the first step: each one's Adam moments are checked non-zero, array by array."""
    one, eight = run["first_steps"]["1-none"], run["first_steps"]["8-blocks"]
    grads = _max_rel(_runs(run, "1-none", "mu"), _runs(run, "8-blocks", "mu"))
    params = _max_rel(_runs(run, "1-none", "params"), _runs(run, "8-blocks", "params"))
    print(f"1 device vs data=2 x fsdp=4: losses {one['loss']} vs {eight['loss']}; grad norms {one['grad_norm']} vs "
          f"{eight['grad_norm']}; step-1 gradients {grads:.1e}, step-2 params {params:.1e} (max |diff| / max |x|)")
    for a, b in zip(one["loss"], eight["loss"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    for a, b in zip(one["grad_norm"], eight["grad_norm"]):
        assert abs(a - b) <= 1e-4 * a
    assert grads < 1e-4 and params < 1e-4
    assert one["loss"][1] != one["loss"][0]   # the second step saw the first one's update

    mu, nu = _runs(run, "8-blocks", "mu"), _runs(run, "8-blocks", "nu")
    components = {k.split(".")[0] for k in mu}
    assert components == {"image_proj", "smp", "unet"}
    zero = [k for k in mu if not (np.any(mu[k]) and np.any(nu[k]))]
    print(f"Adam moments after one step: {len(mu) - len(zero)}/{len(mu)} arrays non-zero"
          + (f" (zero: {zero})" if zero else ""))
    assert not zero
    for part in (".motion_modules.", ".to_k_ip.", ".to_v_ip."):
        assert any(part in k for k in mu), part
    # fsdp sharded the large arrays: the 8-device program holds less per device than the 1-device one.
    assert eight["argument_bytes"] < one["argument_bytes"]


def test_overfits_a_handful_of_clips(run):
    """The reference run (`python -m train smp --quiet` through its entry point): a metrics line per step, the
    loss falling on 8 clips seen 8 times."""
    r = run["train"]
    assert r["rc"] == 0, r["out"][-3000:]
    lines = [line for line in r["out"].splitlines() if line.startswith("step ")]
    losses = [loss for _, loss in sorted(_losses(r["out"]).items())]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    start, end = np.mean(losses[:2]), np.mean(losses[-2:])
    print(f"loss over {STEPS} steps on {CLIPS} clips: first 2 steps {start:.4f}, last 2 {end:.4f}, ratio "
          f"{end / start:.3f}; per step {np.round(losses, 4).tolist()}")
    assert end / start < 0.9   # measured 0.85
    assert "lr 3.000e-03" in lines[-1] and "MFU n/a" in lines[-1]   # CPU: no known peak
    assert f"trained to step {STEPS}" in r["out"] and "mesh {'data': 2, 'fsdp': 4}" in r["out"]


def test_sigkill_and_sigterm_resume_on_other_meshes(run):
    """SIGKILL mid-way; resume on fsdp=8 with --remat full; SIGTERM (saves the step it is at); resume on the
    reference's mesh: the same examples at every step as the uninterrupted reference, the same params to
    float rounding."""
    r = run["resume"]
    work = os.path.join(run["root"], "killed")
    assert r["killed_rc"] == -signal.SIGKILL, f"not killed mid-way (rc {r['killed_rc']}): {r['killed_out']}"
    assert SAVE_EVERY < r["killed_at"] < STEPS
    assert r["term_rc"] == 143, r["term_out"][-3000:]
    assert f"resumed {work} at step {SAVE_EVERY}" in r["term_out"]
    assert "mesh {'data': 1, 'fsdp': 8}" in r["term_out"]
    term_step = int(r["term_out"].split("SIGTERM: saved step ")[1].split()[0])
    assert SAVE_EVERY < term_step < STEPS and os.path.isdir(os.path.join(work, "checkpoints", str(term_step)))
    assert r["final_rc"] == 0, r["final_out"][-3000:]
    assert f"resumed {work} at step {term_step}" in r["final_out"] and "mesh {'data': 2, 'fsdp': 4}" in r["final_out"]

    from train.loop import read_example_log

    ref_log, our_log = read_example_log(os.path.join(run["ref"], "examples-p0.log")), [tuple(x) for x in r["log"]]
    assert [s for s, _ in our_log] == list(range(STEPS))
    assert our_log == [(s, ids) for s, ids in ref_log]   # the same examples at every step: none lost or repeated
    for _, ids in our_log:      # 8 clips, batch 8: every step is one epoch, a permutation of the clips
        assert sorted(ids) == [f"clip-{i:03d}" for i in range(CLIPS)]
    ref_losses = _losses(run["train"]["out"])
    ours = {**_losses(r["term_out"]), **_losses(r["final_out"])}
    assert sorted(ours) == list(range(SAVE_EVERY + 1, STEPS + 1))
    loss_diff = max(abs(ours[s] - ref_losses[s]) / ref_losses[s] for s in ours)
    a, b = restore_params(run["ref"], STEPS), restore_params(work, STEPS)
    diff = _max_rel(a, b)
    print(f"SIGKILL after {r['killed_at']} logged steps, resumed at {SAVE_EVERY} on {OTHER_MESH} (remat "
          f"{OTHER_REMAT}); SIGTERM saved step {term_step}, resumed there on {MESH}: losses of steps "
          f"{SAVE_EVERY + 1}-{STEPS} vs the uninterrupted run's within {loss_diff:.1e} (relative); params at step "
          f"{STEPS}: max |diff| / max |param| {diff:.1e} over {len(a)} arrays ({r['s']:.0f}s)")
    assert loss_diff <= 1e-4
    # Adam turns rounding into ~lr-sized steps where a gradient is near zero (see the remat test).
    assert diff <= 1e-3


def test_export_then_infer_transition(run, tmp_path):
    from storydiff_jax.checkpoints import load_params
    from storydiff_jax.video_io import read_video
    from train.__main__ import main as train_main

    model = tmp_path / "model"
    assert train_main(["export", "--workdir", run["ref"], "--dst", str(model)]) == 0
    index = json.loads((model / "model_index.json").read_text())
    assert index["smp_trained"] and index["sources"]["step"] == STEPS
    trained = restore_params(run["ref"], STEPS)
    written = {name: load_params(str(model / name / "params")) for name in ("smp", "unet", "image_proj")}
    for key, value in trained.items():
        component, path = key.split(".", 1)
        assert np.array_equal(written[component][path], value), key
    assert any(".motion_modules." in k for k in trained)

    from PIL import Image

    frames = tmp_path / "a.png", tmp_path / "b.png"
    clip = np.load(os.path.join(run["data"], "clips", "clip-001.npz"))["frames"]
    Image.fromarray(clip[0]).save(frames[0])
    Image.fromarray(clip[-1]).save(frames[1])
    out = tmp_path / "walk.mp4"
    from infer.transition import main as transition_main

    assert transition_main(["--model", str(model), "--start", str(frames[0]), "--end", str(frames[1]), "--out",
                            str(out), "--frames", str(FRAMES), "--steps", "2", "--height", str(RESOLUTION),
                            "--width", str(RESOLUTION), "--quiet"]) == 0
    assert read_video(str(out)).shape == (FRAMES, RESOLUTION, RESOLUTION, 3)


def test_one_line_errors(run, tmp_path, capsys):
    from train.__main__ import main

    bad = run["bad_batch"]
    assert bad["rc"] == 2 and not bad["left"]
    assert bad["stderr"].count("\n") == 1 and "--batch-size 12 is not divisible by the data axis" in bad["stderr"]

    empty = tmp_path / "empty"
    from train.data import write_clip_folder

    write_clip_folder(str(empty), [])
    data, model = run["data"], run["model"]
    one = dict(mesh="data=auto")   # this process has one device
    cases = {
        "missing data dir": (_run_args(tmp_path / "nowhere", tmp_path / "w1", model, **one), "no such folder"),
        "empty dataset": (_run_args(empty, tmp_path / "w2", model, **one), "the dataset is empty"),
        "another run's workdir": (_run_args(data, run["ref"], model, run["cache"], lr=5e-4, **one),
                                  "holds another run (lr: 0.003 there, 0.0005 here)"),
        "frames over the limit": (_run_args(data, tmp_path / "w3", model, frames=40, **one), "--frames 40 exceeds"),
        "resolution": (_run_args(data, tmp_path / "w4", model, resolution=30, **one),
                       "--resolution 30 is not a multiple of 4"),
        "mesh": (_run_args(data, tmp_path / "w5", model), "--mesh data=2,fsdp=4 needs 8 devices, there are 1"),
        "remat": (_run_args(data, tmp_path / "w6", model, remat="some", **one), "invalid choice: 'some'"),
    }
    for name, (args, message) in cases.items():
        capsys.readouterr()
        with contextlib.suppress(SystemExit):   # argparse's own errors exit 2 by raising
            assert main(args) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        if name != "remat":
            assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
    assert sorted(os.listdir(tmp_path)) == ["empty"]     # no workdir was created by a refused run
    with open(os.path.join(run["ref"], "run.json")) as f:
        assert json.load(f)["config"]["lr"] == RUN["lr"]  # the refused run left the reference untouched

    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "WebVid TFDS builder" in proc.stdout and "export" in proc.stdout


def test_attention_in_query_blocks_is_exact():
    """Under --remat, attention over more logits than its budget runs in query blocks recomputed in the
    backward pass (`set_remat` sets the budget; the micro model's attentions are all under it): the same
    values and gradients as in one piece, with and without a key mask, queries not a multiple of the block."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from storydiff_jax.nn.attention import Attention, dot_product_attention
    from storydiff_jax.nn.remat import set_remat

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 8)), jnp.float32) for _ in range(3))
    budget = 2 * 3 * 37 * 5   # 5 queries a block: 8 blocks, the last one padded

    def loss(q, k, v, mask, budget):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask, backend="xla", logits_budget=budget)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=4)
    for mask in (None, jnp.asarray(rng.random((2, 1, 1, 37)) > 0.2)):
        (whole, g_whole), (blocked, g_blocked) = grad(q, k, v, mask, None), grad(q, k, v, mask, budget)
        assert abs(float(whole) - float(blocked)) <= 1e-6 * abs(float(whole))
        for a, b in zip(g_whole, g_blocked):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))
    blocks = jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, backend="xla", logits_budget=budget))(q)
    assert any(e.primitive.name == "scan" for e in blocks.eqns)   # it did run in blocks

    layer = Attention(8, 2, 4, rngs=nnx.Rngs(0))
    assert layer.logits_budget is None
    assert set_remat(layer, "blocks").logits_budget is not None and set_remat(layer, "none").logits_budget is None


def test_mesh_and_fsdp_rules():
    from jax.sharding import PartitionSpec as P

    from storydiff_jax.errors import ConfigError
    from storydiff_jax.sharding import param_spec, parse_mesh
    from train.step import check_batch

    assert parse_mesh("data=auto", 8) == {"data": 8, "fsdp": 1}
    assert parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp=2", 8) == {"data": 4, "fsdp": 2}
    for spec, message in (("model=2", "axes: data, fsdp"), ("fsdp=3", "does not divide the 8 devices"),
                          ("data=x", "not a whole number")):
        with pytest.raises(ConfigError, match=message):
            parse_mesh(spec, 8)
    with pytest.raises(ConfigError, match="use a multiple of 8"):
        check_batch(12, {"data": 2, "fsdp": 4})
    # Large arrays shard their largest fsdp-divisible axis; small ones and fsdp=1 stay replicated.
    assert param_spec((1280, 5120), 4, 1 << 18) == P(None, "fsdp")
    assert param_spec((5120, 1283), 4, 1 << 18) == P("fsdp", None)
    assert param_spec((3, 3, 320, 320), 4, 1 << 18) == P(None, None, "fsdp", None)   # conv kernel, HWIO
    assert param_spec((320, 320), 4, 1 << 18) == P()                                  # under 2^18 elements
    assert param_spec((1280, 5120), 1, 1 << 18) == P()
    assert param_spec((64,), 4, 1 << 18) == P()


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    mode, root = sys.argv[1:3]
    if mode == "driver":
        driver(root)
    else:
        first_steps(root, [("1-none", 1, "none"), ("1-blocks", 1, "blocks"), ("1-full", 1, "full")])
