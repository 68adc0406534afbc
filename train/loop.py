"""`python -m train smp`: the training loop around `step.Trainer`.

A run lives in its workdir:

    WORKDIR/run.json                 the run's settings (a different run refuses to resume here)
    WORKDIR/checkpoints/<step>/      orbax: `state` (params, Adam moments, step, RNG key) + `data` (the grain
                                     iterator, one file per process); async saves, the newest `keep` kept
    WORKDIR/examples-p<i>.log        `step<TAB>id,id,...`: the clips process i fed to each step
    WORKDIR/tensorboard/             event files (process 0)

Several processes (hosts) share one workdir, as on a pod with a shared filesystem: process 0 writes
run.json and the TensorBoard events, every process its example log and its grain iterator file, and orbax
writes each array's shards from the processes that hold them.

Resuming restores the newest complete checkpoint; orbax writes a step under a temporary name and renames
it when complete, so a run killed at any moment (SIGKILL included) resumes from the last whole one and
redoes the steps after it with the same data and the same randomness: the params reached at any step are
bit-identical to an uninterrupted run's. SIGTERM (a preemption notice) saves the current step first; with
several processes the signal may reach one host only, and all hosts still save the same step (`Preemption`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storydiff_jax.errors import CheckpointError, ConfigError

from .config import RUN_FILE, TrainConfig, claim_workdir

# Dense bf16 peak TFLOP/s per chip, by `device_kind` prefix (vendor datasheets). MFU is reported against
# this; unknown kinds (CPUs, anything not listed) show "n/a".
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU7x": 2307.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA H800": 989.0, "NVIDIA GH200": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0, "NVIDIA L4": 121.0, "NVIDIA A10G": 70.0,
}


def peak_tflops(device_kind: str) -> float | None:
    for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return PEAK_TFLOPS[prefix]
    return None


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """`jax.distributed.initialize()` for a multi-host run: from the arguments, or (all None) from the
    cluster's environment (TPU pods, SLURM, Open MPI, ...). Must run before anything touches a device.

    CPU hosts exchange their collectives through gloo (set unless another implementation was chosen):
    without a CPU collectives implementation a cross-process program cannot run on CPU devices.
    """
    import jax

    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--distributed: jax.distributed.initialize failed ({first}); give every process the same "
                          "--coordinator HOST:PORT (reachable, a free port on process 0) and --num-processes, and "
                          "each its own --process-id, or run under a cluster JAX detects") from None


@dataclass
class Preemption:
    """SIGTERM (a preemption notice): the loop saves the step it reached and stops, on every host at the
    same step.

    One process: a Python handler sets `requested`, read at each step boundary.
    Several processes: the notice may reach one host only, and hosts may be a step apart when it does.
    JAX's preemption sync manager (started by `jax.distributed.initialize`; its own SIGTERM handler tells
    the coordination service) agrees on a step every host still reaches (the largest step any host has
    asked about, plus one); `reached(step)` is True on every host at that same step. Asking is a host-side
    check, no collective, so the steps stay asynchronous. No Python handler then: it would replace JAX's.
    """
    processes: int = 1
    log: object = print
    requested: bool = False
    synced: bool = False
    previous: object = field(default=None, repr=False)

    def __enter__(self):
        import jax

        if self.processes > 1:
            self.synced = bool(jax.config.jax_enable_preemption_service)
            if not self.synced:
                self.log("warning: jax_enable_preemption_service is off: SIGTERM is not synchronised across hosts "
                         "and ends this process unsaved; the run resumes from its last periodic checkpoint")
            return self

        def handler(signum, frame):
            self.requested = True
        try:
            self.previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:   # not the main thread (e.g. called from a UI worker): no handler
            self.previous = None
        return self

    def reached(self, step: int) -> bool:
        """Save `step` (just completed) and stop? Every host must ask at every step, in order."""
        if self.synced:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class EmulatedHosts:
    """The global batches of an `n`-process run, read by one process: process i's per-host batch is what
    shard i of n gives (`make_loader(shard=(i, n))`), concatenated in process order, which is how
    `make_array_from_process_local_data` lays the hosts' parts out along the batch axis. A grain-style
    iterator (get_state / set_state / start_prefetch), so it is checkpointed like the real one."""

    def __init__(self, iterators: list):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"emulated_processes": [it.get_state().decode() for it in self.iterators]}).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state.decode())["emulated_processes"]
        if len(states) != len(self.iterators):
            raise CheckpointError(f"the checkpoint's data position is for {len(states)} emulated processes, this run "
                                  f"emulates {len(self.iterators)}; resume with the same number")
        for it, st in zip(self.iterators, states):
            it.set_state(st.encode())

    def start_prefetch(self) -> None:
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


def check_process_count(manager, step: int, processes: int) -> None:
    """The grain iterator files of checkpoint `step` were written by as many processes as this run has:
    each process's data position is saved apart, so a run resumes only on the same number of hosts."""
    folder = os.path.join(str(manager.directory), str(step), "data")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    counts = {int(m.group(1)) for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", n) for n in names) if m}
    if counts and processes not in counts:
        n = max(counts)
        raise CheckpointError(f"checkpoint {step} in {manager.directory} was written by {n} processes, this run has "
                              f"{processes}; resume with --num-processes {n} (each process's data position is saved "
                              "apart)")


class ExampleLog:
    """Which clips each step consumed, one line per step; on resume, lines of steps not in the checkpoint
    are dropped first (those steps run again with the same examples)."""

    def __init__(self, workdir: str, process: int, resume_step: int):
        self.path = os.path.join(workdir, f"examples-p{process}.log")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and int(line.split("\t", 1)[0]) < resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")

    def write(self, step: int, ids) -> None:
        self.file.write(f"{step}\t{','.join(str(i) for i in ids)}\n")
        self.file.flush()   # reaches the OS before the step runs: survives a SIGKILL of this process

    def close(self) -> None:
        self.file.close()


def read_example_log(path: str) -> list[tuple[int, list[str]]]:
    with open(path) as f:
        return [(int(s), ids.split(","))
                for s, ids in (line.rstrip("\n").split("\t", 1) for line in f if line.strip())]


def checkpoint_manager(workdir: str, cfg: TrainConfig, *, read_only: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=not read_only,
                                           read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_names=("state", "data"))


def restore_state(manager, step: int, abstract_state, iterator=None):
    """The `state` (and, given an iterator, the data position) saved at `step`."""
    import grain
    import orbax.checkpoint as ocp

    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
        return manager.restore(step, args=ocp.args.Composite(**args))["state"]
    except Exception as e:   # orbax raises many kinds; the message's first line says which part
        raise CheckpointError(f"checkpoint {step} in {manager.directory} cannot be restored "
                              f"({str(e).splitlines()[0][:200]}); delete it to resume from the one before") from None


def read_state(workdir: str, step: int) -> dict:
    """The `state` saved at `step`, as arrays on this process's first device, whatever mesh saved it
    (export, tests)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = checkpointer.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), meta)
        return checkpointer.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"{path}: checkpoint cannot be read ({str(e).splitlines()[0][:200]}); export an "
                              "earlier step or train again") from None


def step_flops(compiled) -> float | None:
    """FLOPs of one compiled train step on one device, from XLA's cost analysis of the program (an
    analytic count over its HLO, not a measurement); None where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:   # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


@dataclass
class Meter:
    """Throughput over the steps since the last report."""
    devices: int
    per_step_examples: int
    flops_per_device: float | None
    peak: float | None
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def tick(self):
        self.steps += 1

    def report(self) -> dict[str, float | None]:
        now = time.perf_counter()
        dt, n = max(now - self.t0, 1e-9), self.steps
        self.t0, self.steps = now, 0
        sps = n / dt
        tflops = self.flops_per_device * sps / 1e12 if self.flops_per_device else None
        return {"steps_per_s": sps, "examples_per_s_per_device": sps * self.per_step_examples / self.devices,
                "tflops_per_device": tflops,
                "mfu": tflops / self.peak if tflops is not None and self.peak else None}


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def claim(workdir: str, cfg: TrainConfig, process: int) -> bool:
    """`claim_workdir` for one of several processes sharing `workdir`: process 0 writes run.json; the
    others check it when it is there (written whole, by a rename) and otherwise only make the folder, so
    no two processes write the same file. True: the workdir held this run already."""
    if process == 0 or os.path.exists(os.path.join(workdir, RUN_FILE)):
        return claim_workdir(workdir, cfg)
    os.makedirs(workdir, exist_ok=True)
    return False


@dataclass
class PreparedRun:
    """What `prepare` builds and `run_steps` uses: the mesh, the trainer, the state and frozen weights on
    the devices, the data iterator (at the restored position), the checkpoint manager."""
    cfg: TrainConfig
    workdir: str
    mesh: Any
    trainer: Any
    state: dict
    frozen: dict
    iterator: Any
    manager: Any
    start: int                    # the step the loop starts at (the restored checkpoint's, or 0)
    timings: dict


@dataclass
class LoopOutcome:
    step: int                     # the step reached
    stopped: bool                 # SIGTERM: saved and stopped before cfg.steps
    last: dict                    # the last reported metrics
    history: list[dict]
    flops_per_device: float | None
    device_kind: str


def train(cfg: TrainConfig, workdir: str, *, progress: bool = True, log=print, emulate_processes: int = 1) -> dict:
    """Run (or resume) the training run `cfg` in `workdir` up to `cfg.steps`. Returns a summary.

    emulate_processes=n (one process only): read the data as an n-process run does (see `EmulatedHosts`),
    so that this run computes exactly what an n-host run computes (the multi-host test's reference).
    """
    import jax

    run = prepare(cfg, workdir, log=log, emulate_processes=emulate_processes)
    if run.start >= cfg.steps:
        run.manager.close()
        log(f"{workdir} is already at step {run.start} of {cfg.steps}; nothing to do")
        return summary(run, LoopOutcome(run.start, False, {}, [], None, jax.devices()[0].device_kind))
    outcome = run_steps(run, progress=progress, log=log)
    if outcome.stopped:
        log(f"SIGTERM: saved step {outcome.step} in {workdir}; run the same command to resume")
    return summary(run, outcome)


def summary(run: PreparedRun, outcome: LoopOutcome) -> dict:
    return {"step": outcome.step, "preempted": outcome.stopped, "metrics": outcome.last, "history": outcome.history,
            "flops_per_step_per_device": outcome.flops_per_device, "device_kind": outcome.device_kind,
            "timings": run.timings}


def prepare(cfg: TrainConfig, workdir: str, *, log=print, emulate_processes: int = 1) -> PreparedRun:
    """Check the input, claim the workdir, load the model, place state and frozen weights on the mesh, open
    the data and restore the newest checkpoint when the workdir holds this run."""
    import jax

    from storydiff_jax.pipelines.video_components import PRESETS, load_video_components, load_video_config
    from storydiff_jax.sharding import make_mesh, parse_mesh, put_sharded

    from .data import make_loader, open_source
    from .features import open_features
    from .step import Trainer, check_batch, check_settings, split_params

    t0 = time.perf_counter()
    # Everything that can be wrong with the input is checked before the workdir is touched.
    source = open_source(cfg.data_dir, frames=cfg.frames, resolution=cfg.resolution)
    config = load_video_config(cfg.model)
    sizes = parse_mesh(cfg.mesh, jax.device_count())
    if emulate_processes > 1 and jax.process_count() > 1:
        raise ConfigError("emulate_processes is for a one-process run; this run has several processes")
    hosts = max(jax.process_count(), emulate_processes)
    check_batch(cfg.batch_size, sizes, hosts)
    mesh = make_mesh(sizes)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} exists and is not a folder; choose another --workdir")
    check_settings(cfg, config)
    # A feature cache (train/features.py) must be of this run's frames, resolution, dtype, data and model.
    cache = open_features(cfg, source) if cfg.features else None
    components = load_video_components(cfg.model)
    if cache is not None:
        cache.check_model(cfg, components)
    resuming = claim(workdir, cfg, jax.process_index())   # the last input check: a workdir of another run
    # A converted folder's trained SMP is fine-tuned; presets (random weights) and folders without one
    # start from the training initialisation (the SMP = plain interpolation).
    trainable, frozen, config = split_params(components, cfg,
                                             smp_from_model=cfg.model not in PRESETS and components.smp is not None)
    trainer = Trainer.build(cfg, config, components.tokenizer)

    manager = checkpoint_manager(workdir, cfg)
    state = trainer.init_state(trainable)
    if cache is not None:
        frozen = cache.frozen(frozen)   # the encoders stay off the devices; their constant outputs instead
    state_sh, frozen_sh, _ = trainer.shardings(mesh, state, frozen)
    frozen = put_sharded(frozen, frozen_sh)
    loader_args = dict(per_host_batch=cfg.batch_size // hosts, seed=cfg.seed, num_frames=cfg.frames,
                       resolution=cfg.resolution, tokenizer=components.tokenizer, prepared=cache is not None,
                       workers=cfg.data_workers)
    data = source if cache is None else cache   # cached rows: the same indices, so the same clips per step
    if emulate_processes > 1:
        iterator = EmulatedHosts([iter(make_loader(data, shard=(i, hosts), **loader_args)) for i in range(hosts)])
    else:
        iterator = iter(make_loader(data, **loader_args))
    start = manager.latest_step() if resuming else None
    if start is not None:
        check_process_count(manager, start, jax.process_count())
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        state = restore_state(manager, start, abstract, iterator)
        log(f"resumed {workdir} at step {start}")
    else:
        start = 0
        state = put_sharded(state, state_sh)
    return PreparedRun(cfg, workdir, mesh, trainer, state, frozen, iterator, manager, start,
                       {"load_s": time.perf_counter() - t0})


def run_steps(run: PreparedRun, *, progress: bool, log) -> LoopOutcome:
    """Compile the step, then train from `run.start` to `cfg.steps`: log and report metrics, save every
    `save_every` steps and at the end, and on SIGTERM save the step reached (on every host the same) and stop."""
    import grain
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec
    from tqdm import tqdm

    from .step import global_batch, learning_rate

    cfg, mesh, manager, iterator = run.cfg, run.mesh, run.manager, run.iterator
    state, frozen = run.state, run.frozen
    t0 = time.perf_counter()
    local = next(iterator)
    compiled = run.trainer.compiled_step(mesh, state, frozen, global_batch(local, mesh))
    run.timings["compile_s"] = time.perf_counter() - t0
    log(f"model and state ready in {run.timings['load_s']:.1f}s, step compiled in {run.timings['compile_s']:.1f}s "
        f"({jax.device_count()} devices, mesh {dict(mesh.shape)})")
    device = jax.devices()[0]
    meter = Meter(jax.device_count(), cfg.batch_size, step_flops(compiled), peak_tflops(device.device_kind))
    scalar = NamedSharding(mesh, PartitionSpec())

    writer = None
    if jax.process_index() == 0:
        writer = event_writer(os.path.join(run.workdir, "tensorboard"))
    examples = ExampleLog(run.workdir, jax.process_index(), run.start)
    bar = tqdm(total=cfg.steps, initial=run.start, desc="train smp", unit="step", disable=not progress,
               dynamic_ncols=True)
    last: dict = {}
    history: list[dict] = []
    step = run.start
    stopped = False

    def save(step, force=False):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(iterator)), force=force)

    with Preemption(jax.process_count(), log) as preempt:
        try:
            while step < cfg.steps:
                if local is None:
                    local = next(iterator)
                examples.write(step, local["id"])
                lr = np.float32(learning_rate(cfg, step))
                state, metrics = compiled(state, frozen, global_batch(local, mesh), jax.device_put(lr, scalar))
                local = None
                step += 1
                meter.tick()
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                            "lr": float(lr), **meter.report()}
                    history.append({"step": step, **last})
                    report(last, step, bar=bar, writer=writer, log=None if progress else log)
                due = step % cfg.save_every == 0 or step == cfg.steps
                stop = preempt.reached(step)
                if due or stop:
                    save(step, force=not due)
                if stop and step < cfg.steps:
                    stopped = True
                    break
        finally:
            bar.close()
            examples.close()
            if writer is not None:
                writer.close()
            manager.wait_until_finished()
            manager.close()
    return LoopOutcome(step, stopped, last, history, meter.flops_per_device, device.device_kind)


def event_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is installed,
    only to accept torch tensors (ours are floats), which costs every training process 2.4 s and the memory
    of torch."""
    import sys

    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None   # makes `import torch` raise ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


def report(metrics: dict, step: int, *, bar, writer, log) -> None:
    """One step's metrics: the progress bar's postfix, TensorBoard (process 0), and a log line when `log`
    is given (--quiet: no bar)."""
    bar.set_postfix_str(f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['steps_per_s']:.2f} step/s")
    if writer is not None:
        for k, v in metrics.items():
            if v is not None:
                writer.add_scalar(f"train/{k}", v, step)
    if log is not None:
        log(f"step {step}: loss {metrics['loss']:.5f} grad_norm {metrics['grad_norm']:.4f} lr "
            f"{metrics['lr']:.3e} steps/s {metrics['steps_per_s']:.3f} examples/s/device "
            f"{metrics['examples_per_s_per_device']:.3f} TFLOP/s/device "
            f"{_fmt(metrics['tflops_per_device'], '.4f')} MFU {_fmt(metrics['mfu'], '.2%')}")
