"""Multi-host training of the raw step (the frozen encoders inside it) on the micro model (tests/train_model.py):
two local processes (`python -m train smp --distributed`, `jax.distributed.initialize` on localhost, CPU
collectives through gloo, one fake CPU device each) against one process that reads the same global batches
(`train(..., emulate_processes=2)`, two fake devices, a checkpoint every step).

The two-process run is the preempted one: SIGTERM reaches process 1 only, a step in; both processes must
save the same step k (JAX's preemption sync point) and exit with 143. Restarted, both resume at k and run
to the end (two steps when k = 2), as a preempted pod job does. Their params, their per-step losses and the
clips each process fed to each step must equal the one-process run's.

On CPU process 1 compiles the train step at each of its starts (JAX writes the persistent compilation cache
from process 0 only, and a multi-process program's compile options name the process): five compilations of
the micro model's step in all, three of them side by side.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from train_model import FRAMES, RESOLUTION, model_args, restore_params, write_clips, write_micro_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CLIPS, HOSTS = 4, 8, 2
# save_every = STEPS: the only checkpoint before the end is the preemption's.
# remat none: the cheapest step to compile (tests/test_train.py checks the others give the same values).
RUN = dict(steps=STEPS, batch_size=2, frames=FRAMES, resolution=RESOLUTION, lr=3e-3, warmup=0, schedule="constant",
           save_every=STEPS, log_every=1, seed=3, remat="none")
# The reference keeps every step, to be compared at whichever step the preempted hosts saved.
REF = {**RUN, "save_every": 1, "keep": STEPS}
TIMEOUT = 900



def _env(devices: int) -> dict:
    from conftest import cpu_env  # here, not at the top: the reference subprocess runs this file without torch

    return cpu_env(devices)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_args(data, workdir, model, port, process):
    args = [sys.executable, "-m", "train", "smp", "--data-dir", data, "--workdir", workdir, *model_args(model),
            "--quiet", "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(HOSTS),
            "--process-id", str(process)]
    for k, v in RUN.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _start_hosts(data, workdir, model):
    port = _free_port()
    return [subprocess.Popen(_host_args(data, workdir, model, port, i), cwd=ROOT, env=_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(HOSTS)]


def _finish(procs):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=TIMEOUT)
        outs.append(out)
    return [p.returncode for p in procs], outs


def _losses(out):
    """{step: loss} from the `--quiet` metric lines."""
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+): loss ([0-9.]+)", out, re.M)}


def reference(data, model, workdir, out):
    """One process, two devices, the data read as two processes read it (run as a subprocess)."""
    import jax

    from train.config import TrainConfig
    from train.loop import train

    assert jax.device_count() == 2 and jax.process_count() == 1
    summary = train(TrainConfig(model=model, data_dir=data, **REF), workdir, progress=False,
                    log=lambda *a: None, emulate_processes=HOSTS)
    with open(out, "w") as f:
        json.dump({"losses": {h["step"]: h["loss"] for h in summary["history"]}, "timings": summary["timings"]}, f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from train.loop import read_example_log

    root = tmp_path_factory.mktemp("multihost")
    model = write_micro_model(root / "model")
    data = write_clips(root / "clips", n=CLIPS)
    ref, ref_out, work = str(root / "ref"), str(root / "ref.json"), str(root / "hosts")
    t0 = time.perf_counter()
    # The reference runs beside the two hosts (three processes on two cores; the hosts' steps wait on each
    # other's collectives anyway).
    ref_proc = subprocess.Popen([sys.executable, __file__, data, model, ref, ref_out], cwd=ROOT, env=_env(2),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = _start_hosts(data, work, model)
    # SIGTERM to process 1 alone, once it has started its second step.
    log1 = os.path.join(work, "examples-p1.log")
    deadline = time.time() + TIMEOUT
    signalled_at = None
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(log1) and len(read_example_log(log1)) >= 2:
            procs[1].send_signal(signal.SIGTERM)
            signalled_at = len(read_example_log(log1))
            break
        time.sleep(0.05)
    term_rc, term_out = _finish(procs)
    t_term = time.perf_counter() - t0
    # Restart both: they resume at the saved step and run to the end.
    resume_rc, resume_out = _finish(_start_hosts(data, work, model))
    t_resume = time.perf_counter() - t0 - t_term
    ref_text, _ = ref_proc.communicate(timeout=TIMEOUT)
    assert ref_proc.returncode == 0, ref_text[-4000:]
    with open(ref_out) as f:
        ref_results = json.load(f)
    print(f"two hosts to the SIGTERM: {t_term:.1f}s; resumed to the end: {t_resume:.1f}s; all with the reference "
          f"{time.perf_counter() - t0:.1f}s (reference compile {ref_results['timings'].get('compile_s', 0):.1f}s)")
    saved = [int(m.group(1)) if (m := re.search(r"SIGTERM: saved step (\d+)", o)) else None for o in term_out]
    return {"data": data, "ref": ref, "work": work, "signalled_at": signalled_at, "term": (term_rc, term_out),
            "saved": saved, "resume": (resume_rc, resume_out),
            "ref_losses": {int(k): v for k, v in ref_results["losses"].items()}}


def test_sigterm_on_one_host_saves_the_same_step_on_both(run):
    rcs, outs = run["term"]
    assert run["signalled_at"] is not None, "process 1 never started its second step: " + outs[1][-3000:]
    assert rcs == [143, 143], [o[-3000:] for o in outs]
    saved = run["saved"]
    print(f"SIGTERM to process 1 during step {run['signalled_at']}; saved step {saved[0]} (process 0) and "
          f"{saved[1]} (process 1)")
    assert saved[0] == saved[1] and run["signalled_at"] <= saved[0] < STEPS
    ckpt = os.path.join(run["work"], "checkpoints", str(saved[0]))
    # One grain iterator file per process; both processes' array shards under one checkpoint.
    assert sorted(os.listdir(os.path.join(ckpt, "data"))) == ["commit_success.txt", "process_0-of-2.json",
                                                              "process_1-of-2.json"]
    # Process 0 alone writes run.json and TensorBoard events; every process its own example log.
    names = sorted(os.listdir(run["work"]))
    assert names == ["checkpoints", "examples-p0.log", "examples-p1.log", "run.json", "tensorboard"], names


def test_both_hosts_resume_from_the_preemption_save(run):
    saved = run["saved"][0]
    assert sorted(os.listdir(os.path.join(run["work"], "checkpoints"))) == [str(saved), str(STEPS)]
    rcs, outs = run["resume"]
    assert rcs == [0, 0], [o[-3000:] for o in outs]
    for o in outs:
        assert f"resumed {run['work']} at step {saved}" in o and f"trained to step {STEPS}" in o
    assert len(os.listdir(os.path.join(run["work"], "tensorboard"))) == 2   # one events file per start


def test_two_hosts_agree_with_one_process(run):
    from train.loop import read_example_log

    last = STEPS   # the hosts' newest checkpoint, after the restart
    assert run["saved"][0] is not None, run["term"][1][1][-3000:]
    # The clips: process i fed shard i of the shuffled clips; together the one-process run's global batches.
    ref_log = read_example_log(os.path.join(run["ref"], "examples-p0.log"))
    logs = [read_example_log(os.path.join(run["work"], f"examples-p{i}.log"))[:last] for i in range(HOSTS)]
    assert [s for s, _ in ref_log] == list(range(STEPS))
    for i, log in enumerate(logs):
        assert [s for s, _ in log] == list(range(last)), i
    assert [ids for _, ids in ref_log[:last]] == [a + b for (_, a), (_, b) in zip(*logs)]
    shards = [sorted({x for _, ids in log for x in ids}) for log in logs]
    assert not set(shards[0]) & set(shards[1])   # disjoint shards, no clip read by both hosts

    # The losses of every step the hosts ran, before the SIGTERM and after the restart.
    host_losses = {**_losses(run["term"][1][0]), **_losses(run["resume"][1][0])}
    assert sorted(host_losses) == list(range(1, last + 1))
    ref_losses = run["ref_losses"]
    worst = max(abs(host_losses[s] - ref_losses[s]) for s in host_losses)
    print("losses, two hosts vs one process:",
          [(s, host_losses[s], round(ref_losses[s], 5)) for s in sorted(host_losses)])
    assert worst <= 1e-5   # the printed losses have 5 decimals

    for step in (run["saved"][0], last):   # the preemption's save and the end, after the restart
        a, b = restore_params(run["ref"], step), restore_params(run["work"], step)
        assert a.keys() == b.keys() and len(a) > 100
        diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
        scale = max(float(np.max(np.abs(a[k]))) for k in a)
        same = sum(np.array_equal(a[k], b[k]) for k in a)
        print(f"params at step {step}: {same}/{len(a)} arrays bit-identical; max |diff| {diff:.2e} (max |param| "
              f"{scale:.2f})")
        assert diff <= 1e-6 * scale


def test_distributed_option_errors(tmp_path):
    """Bad multi-host options: one line, exit 2, nothing written (no devices needed)."""
    cases = [(["--distributed", "--num-processes", "2", "--process-id", "0"],
              "jax.distributed.initialize failed (coordinator_address should be defined.)"),
             (["--process-id", "1"], "--coordinator / --num-processes / --process-id need --distributed")]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "-m", "train", "smp", "--data-dir", str(tmp_path / "clips"),
                               "--workdir", str(tmp_path / "w"), *extra], cwd=ROOT, env=_env(1),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_resume_on_another_process_count_is_refused(tmp_path):
    from types import SimpleNamespace

    from storydiff_jax.errors import CheckpointError
    from train.loop import check_process_count

    data = tmp_path / "checkpoints" / "4" / "data"
    data.mkdir(parents=True)
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text("{}")
    manager = SimpleNamespace(directory=tmp_path / "checkpoints")
    check_process_count(manager, 4, 2)
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1; resume with --num-processes 2"):
        check_process_count(manager, 4, 1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    reference(*sys.argv[1:5])
