"""Train step of `python -m train smp`: memory per device, FLOPs, and (when run) step time, examples/s, MFU.

    python bench/train.py [--preset video] [--resolutions 256,512] [--frames 16] [--batch-per-device 1[,2]] \\
        [--dtype bfloat16] [--remat none,blocks,full] [--inputs raw,cached] [--mesh data=..,fsdp=..] \\
        [--cpu-devices N] [--steps 10] [--compile-only] [--out docs/bench_train.md]

The step is the trainer's own (`train.step.Trainer.compiled_step`) with its shardings: with --inputs raw,
frozen VAE encode of every frame, CLIP ViT-H-14 of the first/last frames and the CLIP text encoder inside
the step; with cached, their outputs as inputs (a feature cache, `smp --features`); then IP-Adapter-Plus
Resampler + SMP (trained), the video U-Net (SD1.5 + AnimateDiff v2 motion modules + IP layers) forward and
backward with the --remat checkpoints, AdamW update. --batch-per-device clips of --frames frames on every
device of the --mesh (batch over data x fsdp; weights, Adam moments and frozen weights over fsdp); random
weights of the preset and random inputs. --cpu-devices N makes N fake CPU devices, so that a mesh compiles
(`--compile-only`) on a machine without accelerators; XLA's memory analysis is then per device of that mesh.

Each combination (resolution, inputs, remat, clips per device) runs in its own subprocess, one at a time
(its own device memory). Reported per combination:
  compile          lowering + XLA compilation of the step;
  FLOPs / step     XLA's cost analysis of the compiled step on one device (what the trainer's MFU uses,
                   `train.loop.step_flops`; it counts a loop's body once), and an independent count: 2 x M x N
                   x K of every matmul and convolution in the step's jaxpr (global, divided by the device
                   count; recomputation and loop iterations included, no elementwise work) with its ratio to
                   the same combination without remat;
  memory           the compiled program's temporaries, arguments and what one device holds at the peak
                   (`memory_analysis()`), and the most clips per device that fit 16, 32, 80 and 95 GiB
                   (a line through two --batch-per-device values);
  step time        median over --steps timed steps after one untimed step (not with --compile-only);
  examples/s/dev   batch / step time / devices; MFU: XLA FLOPs / step time over the device kind's dense bf16
                   peak (`train.loop.PEAK_TFLOPS`).

Target (GPU, preset video, 16 frames, bf16): MFU >= 40%. `bash bench/run_gpu.sh train` runs it. The memory
table of docs/bench_train.md: `--compile-only --cpu-devices 8 --mesh data=1,fsdp=8` (and fsdp 1). On a CPU,
`--preset tiny-video --resolutions 64 --frames 4` is a functional check of a real run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

from harness import ROOT, GiB, fmt_bytes, fmt_s, machine, settings_key, shown_command, spawn, write_worker_result

# This file is bench/train.py: with bench/ on sys.path, `import train` would find it instead of the
# repository's `train` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, ROOT)]

TARGET = "MFU >= 40% in bf16 (GPU, video preset, 16 frames)"
REAL_COMMAND = "python bench/train.py --preset video --resolutions 256,512 --frames 16 --dtype bfloat16"
CAPTION = "a red fox walks through a snowy forest, soft morning light"


# --------------------------------------------------------------------------------------------------
# An independent FLOP count: matmuls and convolutions of the step's jaxpr


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def dot_conv_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and conv_general_dilated in a (closed) jaxpr, sub-jaxprs
    included (scan bodies times their length; cond: the costliest branch)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec   # (out feature, in feature, *spatial)
            total += 2.0 * _prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * _prod(rhs[d] for d in spec[2:])
        subs = [v for v in eqn.params.values() if isinstance(v, (Jaxpr, ClosedJaxpr))]
        subs += [b for v in eqn.params.values() if isinstance(v, (tuple, list)) for b in v
                 if isinstance(b, (Jaxpr, ClosedJaxpr))]
        if name == "cond":
            total += max((dot_conv_flops(b) for b in subs), default=0.0)
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            total += times * sum(dot_conv_flops(s) for s in subs)
    return total


# --------------------------------------------------------------------------------------------------
# One resolution (a worker subprocess)


def abstract_split(config, cfg):
    """`train.step.split_params` on shapes only (no weights drawn), with the same trainable/frozen split
    and dtypes (`train.step.placement`)."""
    import jax
    import jax.numpy as jnp

    from storydiff_jax.pipelines.video_components import expected_params
    from train.step import COMPONENTS, placement, smp_config_for

    config = dataclasses.replace(config, smp=smp_config_for(config))
    trainable, frozen = {}, {}
    for name in COMPONENTS:
        t, f = {}, {}
        for k, s in expected_params(name, config).items():
            train, dtype = placement(config, cfg, name, k)
            dtype = dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
            (t if train else f)[k] = jax.ShapeDtypeStruct(s.shape, dtype)
        if t:
            trainable[name] = t
        frozen[name] = f
    return trainable, frozen, config


def cached_inputs(trainer, frozen, raw_batch):
    """The feature-cache variant of the step's inputs, as shapes: frozen weights without the encoders plus
    the two constant features, and the cached batch (`Trainer.cached_conditioning`'s inputs)."""
    import jax

    from train.step import FROZEN_ONLY

    per_clip = jax.eval_shape(trainer.encode_features, frozen, raw_batch)
    constants = jax.eval_shape(trainer.constant_features, frozen)
    frozen = {k: v for k, v in frozen.items() if k not in FROZEN_ONLY}
    return {**frozen, "features": constants}, per_clip


def measure(args, combo: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from storydiff_jax.models.clip_text import load_tokenizer, tokenize
    from storydiff_jax.pipelines.components import preset_tokenizer_dir
    from storydiff_jax.pipelines.video_components import load_video_components, load_video_config
    from storydiff_jax.sharding import make_mesh, parse_mesh, put_sharded
    from train.config import TrainConfig
    from train.loop import peak_tflops, step_flops
    from train.step import FROZEN_ONLY, Trainer, split_params

    resolution, remat, inputs, per_device = parse_combo(combo)
    devices = jax.device_count()
    sizes = parse_mesh(args.mesh, devices)
    batch = per_device * devices
    cfg = TrainConfig(model=args.preset, data_dir="-", batch_size=batch, frames=args.frames, resolution=resolution,
                      dtype=args.dtype, remat=remat, warmup=0, schedule="constant", mesh=args.mesh)
    mesh = make_mesh(sizes)
    out = {"combo": combo, "resolution": resolution, "remat": remat, "inputs": inputs, "batch": batch,
           "devices": devices, "mesh": dict(mesh.shape), "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "versions": f"jax {jax.__version__}"}
    t0 = time.perf_counter()
    if args.compile_only:
        trainable, frozen, config = abstract_split(load_video_config(args.preset), cfg)
        tokenizer = load_tokenizer(preset_tokenizer_dir("<|endoftext|>"))
    else:
        components = load_video_components(args.preset)
        trainable, frozen, config = split_params(components, cfg, smp_from_model=False)
        tokenizer = components.tokenizer
        del components
    trainer = Trainer.build(cfg, config, tokenizer)
    ids = np.repeat(tokenize(tokenizer, [CAPTION]).astype(np.int32), batch, axis=0)
    raw = {"frames": jax.ShapeDtypeStruct((batch, args.frames, resolution, resolution, 3), jnp.uint8),
           "input_ids": jax.ShapeDtypeStruct(ids.shape, jnp.int32)}
    spec = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    shapes = raw if inputs == "raw" else None
    if inputs == "cached":
        frozen_shapes, shapes = cached_inputs(trainer, spec(frozen), raw)
    out["params_trainable"] = int(sum(np.prod(v.shape) for t in trainable.values() for v in t.values()))
    out["params_frozen"] = int(sum(np.prod(v.shape) for t in frozen.values() for v in t.values()))
    state = jax.eval_shape(trainer.init_state, trainable) if args.compile_only else trainer.init_state(trainable)
    if inputs == "cached":   # the encoders' weights leave; their two constant outputs come in
        frozen = frozen_shapes if args.compile_only else {**{k: v for k, v in frozen.items() if k not in FROZEN_ONLY},
                                                          "features": random_arrays(frozen_shapes["features"])}
    state_sh, frozen_sh, batch_sh = trainer.shardings(mesh, state, frozen)
    if args.compile_only:
        placed = lambda t, s: jax.tree.map(  # noqa: E731
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
        state, frozen_in, data = placed(state, state_sh), placed(frozen, frozen_sh), placed(shapes, batch_sh)
    else:
        host = ({"frames": np.random.default_rng(0).integers(0, 256, raw["frames"].shape, dtype=np.uint8),
                 "input_ids": ids} if inputs == "raw" else random_arrays(shapes))
        state, frozen_in, data = put_sharded(state, state_sh), put_sharded(frozen, frozen_sh), put_sharded(host,
                                                                                                          batch_sh)
    del trainable, frozen
    out["setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    compiled = trainer.compiled_step(mesh, state, frozen_in, data)
    out["compile_s"] = time.perf_counter() - t0
    out["flops_xla"] = step_flops(compiled)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    out["flops_dots"] = dot_conv_flops(jax.make_jaxpr(trainer.step_fn)(state, frozen_in, data, lr)) / devices
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["argument_bytes"] = int(mem.argument_size_in_bytes)
        out["output_bytes"] = int(mem.output_size_in_bytes)
        out["alias_bytes"] = int(mem.alias_size_in_bytes)
    peak = peak_tflops(out["device"])
    out["peak_tflops"] = peak
    if args.compile_only:
        return out

    scalar = NamedSharding(mesh, PartitionSpec())
    lr = jax.device_put(np.float32(1e-5), scalar)
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen_in, data, lr)
    out["first_step_s"] = (jax.block_until_ready(metrics), time.perf_counter() - t0)[1]
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen_in, data, lr)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
    out["step_s_min"] = min(times)
    out["loss"] = float(metrics["loss"])
    out["examples_per_s_per_device"] = batch / out["step_s"] / devices
    if out["flops_xla"]:
        out["tflops_per_device"] = out["flops_xla"] / out["step_s"] / 1e12
        out["mfu"] = out["tflops_per_device"] / peak if peak else None
    try:
        stats = jax.devices()[0].memory_stats() or {}
        out["peak_device"] = stats.get("peak_bytes_in_use")
    except Exception:   # CPU devices have no allocator statistics
        pass
    return out


def random_arrays(shapes):
    """Host arrays of `shapes` (cached features), standard normal in each shape's dtype: a measurement's
    inputs, not data."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype), shapes)


def combo_name(resolution: int, remat: str, inputs: str, per_device: int) -> str:
    return f"{resolution}-{remat}-{inputs}-{per_device}"


def parse_combo(combo: str) -> tuple[int, str, str, int]:
    resolution, remat, inputs, per_device = combo.split("-")
    return int(resolution), remat, inputs, int(per_device)


def run_worker(args) -> int:
    return write_worker_result("combo", args.worker, lambda: measure(args, args.worker), args.result)


# --------------------------------------------------------------------------------------------------
# The driver

CAPACITIES_GIB = (16, 32, 80, 95)   # v5e; v4 / v6e; A100 / H100 80 GB; v5p
MEMORY_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def _tf(x):
    return "n/a" if x is None else f"{x / 1e12:.3g}"


def device_bytes(r: dict) -> int | None:
    """What one device holds at the step's peak, by XLA's buffer assignment: temporaries + arguments +
    outputs, less the outputs that reuse a donated argument's buffer (the state)."""
    if r.get("temp_bytes") is None:
        return None
    return r["temp_bytes"] + r["argument_bytes"] + r.get("output_bytes", 0) - r.get("alias_bytes", 0)


def clips_that_fit(rows: list[dict], capacity: int) -> str:
    """The most clips per device within `capacity` bytes: from the line through two measured batch sizes
    (memory grows by the same bytes per clip), or from one (>= 1 fits or 0 fits) when only one was measured."""
    pts = sorted((r["per_device"], device_bytes(r)) for r in rows if device_bytes(r) is not None)
    if not pts:
        return "n/a"
    if len(pts) == 1:
        return ">= 1" if pts[0][1] <= capacity else "0"
    (b1, m1), (b2, m2) = pts[0], pts[-1]
    per_clip = (m2 - m1) / (b2 - b1)
    fixed = m1 - per_clip * b1
    return str(max(0, int((capacity - fixed) // per_clip))) if per_clip > 0 else "n/a"


def report(args, argv, results: dict) -> str:
    ok = [r for r in results.values() if "error" not in r]
    gpu = bool(ok) and all(r.get("backend") == "gpu" for r in ok)
    functional = args.preset.startswith("tiny-") or not gpu or args.compile_only
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    kind = "compile only" if args.compile_only else ("GPU measurement" if gpu else "CPU run")
    title = f"{kind} — NOT the target measurement" if functional else kind
    mesh = ok[0]["mesh"] if ok else {}
    mesh_text = ",".join(f"{k}={v}" for k, v in mesh.items())
    out = [f"## Train-step benchmark, {args.preset}, {args.frames} frames, {args.dtype}, mesh {mesh_text or '?'} — "
           f"{title} ({now})", ""]
    if functional:
        tiny = ", tiny random-weight model" if args.preset.startswith("tiny-") else ""
        out += [f"> **Not the target measurement** ({kind}{tiny}): the memory and FLOP columns are XLA's analyses "
                f"of the compiled step; its times say nothing about the throughput target ({TARGET}). The real "
                f"measurement: `bash bench/run_gpu.sh train` on a GPU machine (`{REAL_COMMAND}`).", ""]
    out += [f"Command: `python {' '.join(shlex.quote(a) for a in ['bench/train.py', *shown_command(argv)])}`", ""]
    devices = "; ".join(sorted({f"{r['backend']} {r['device']} x{r['devices']} ({r['versions']})" for r in ok}))
    out += [f"Machine: {machine(load=True)}. {devices}", ""]
    if ok:
        r = ok[0]
        out += [f"Parameters: {r['params_trainable'] / 1e6:.1f} M trained (SMP, image projection, IP layers"
                f"{'' if args.freeze_motion else ', motion modules'}), {r['params_frozen'] / 1e6:.1f} M frozen.", ""]
    fits = " | ".join(f"clips ≤ {c} GiB" for c in CAPACITIES_GIB)
    out += ["| resolution | inputs | remat | clips / device | compile | XLA TFLOP / step / device | FLOPs vs no remat "
            f"| dot+conv TFLOP (jaxpr) | temp | arguments | per device | {fits} | step time (median) | "
            "examples/s/device | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(CAPACITIES_GIB) + "---|---|---|"]
    for combo, r in results.items():
        res, remat, inputs, per_device = parse_combo(combo)
        head = f"| {res}² | {inputs} | {remat} | {per_device} |"
        if "error" in r:
            out.append(head + f" failed: {r['error']} |" + " |" * (11 + len(CAPACITIES_GIB)))
            continue
        r["per_device"] = per_device
        base = results.get(combo_name(res, "none", inputs, per_device), {})
        flops_ratio = (f"{r['flops_dots'] / base['flops_dots']:.2f}x" if r.get("flops_dots") and base.get("flops_dots")
                       else "n/a")
        same = [dict(x, per_device=parse_combo(c)[3]) for c, x in results.items() if "error" not in x
                and parse_combo(c)[:3] == (res, remat, inputs)]
        fit = " | ".join(clips_that_fit(same, c * GiB) for c in CAPACITIES_GIB)
        mfu = r.get("mfu")
        eps = r.get("examples_per_s_per_device")
        out.append(head + f" {fmt_s(r['compile_s'])} | {_tf(r.get('flops_xla'))} | {flops_ratio} | "
                   f"{_tf(r.get('flops_dots'))} | {fmt_bytes(r.get('temp_bytes'))} | "
                   f"{fmt_bytes(r.get('argument_bytes'))} | {fmt_bytes(device_bytes(r))} | {fit} | "
                   f"{fmt_s(r.get('step_s'))} | {'n/a' if eps is None else f'{eps:.3f}'} | "
                   f"{'n/a' if mfu is None else f'**{mfu:.1%}**'} |")
    out += ["", "Per device: temporaries + arguments + outputs − outputs aliased to donated arguments (XLA's buffer "
            "assignment of the compiled step for one device of the mesh; weights, Adam moments and the batch "
            "sharded as in training). Clips ≤ N GiB: the most clips per device within N GiB, on the line through "
            "the measured batch sizes (≥ 1 / 0 where one batch size was measured). XLA TFLOP: "
            "`compiled.cost_analysis()['flops']` of the step on one device (the trainer's MFU numerator; it counts "
            "a loop's body once, so the query-blocked attention of --remat is undercounted). dot+conv: 2 x "
            "multiply-adds of every matmul and convolution in the step's jaxpr (recomputation and every loop "
            "iteration included, elementwise work not) over all devices / device count; FLOPs vs no remat is its "
            "ratio. inputs raw: frozen VAE / CLIP vision / text encoders in the step; cached: "
            "their outputs from a feature cache (`--features`). MFU against the device's dense bf16 peak "
            + (f"({ok[0]['peak_tflops']:.0f} TFLOP/s)" if ok and ok[0].get("peak_tflops") else "(unknown here: n/a)")
            + f". Step time: median of the timed steps after one untimed step; one clip = {args.frames} frames.", ""]
    return "\n".join(out) + "\n"


def _list(text: str, choices=None, cast=str) -> list:
    values = [cast(v) for v in text.split(",") if v.strip()]
    if not values or (choices and any(v not in choices for v in values)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list" +
                                         (f" of {', '.join(choices)}" if choices else ""))
    return values


def parse_args(argv=None):
    from storydiff_jax.nn.remat import REMAT_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="video", choices=["video", "tiny-video"])
    p.add_argument("--resolutions", default="256,512", help="comma-separated square frame sides")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch-per-device", default="1", help="clips per device per step; a list (e.g. 1,2) measures "
                                                         "each and fits a line for the clips-that-fit columns")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--remat", default="blocks", help=f"comma-separated list of {', '.join(REMAT_MODES)}")
    p.add_argument("--inputs", default="raw", help="comma-separated list of raw (encoders in the step), cached "
                                                    "(feature cache: their outputs as inputs)")
    p.add_argument("--mesh", default="data=auto", help="data=..,fsdp=.. over all devices (train's --mesh)")
    p.add_argument("--cpu-devices", type=int, help="run on this many fake CPU devices (XLA_FLAGS="
                                                  "--xla_force_host_platform_device_count): a mesh on a CPU machine")
    p.add_argument("--freeze-motion", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one untimed)")
    p.add_argument("--compile-only", action="store_true", help="abstract weights: compile, count, no step run")
    p.add_argument("--out", type=Path, help="append the report (markdown) to this file")
    p.add_argument("--results", type=Path, default=ROOT / "out" / "bench" / "train",
                   help="folder of the per-combination result JSON files")
    p.add_argument("--reuse", action="store_true", help="take stored results of identical settings")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.resolutions = _list(args.resolutions, cast=int)
        args.batches = _list(args.batch_per_device, cast=int)
        args.remats = _list(args.remat, REMAT_MODES)
        args.input_kinds = _list(args.inputs, ("raw", "cached"))
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if min(args.resolutions) < 8 or args.frames < 2 or args.steps < 1 or min(args.batches) < 1:
        p.error("need resolutions >= 8, --frames >= 2, --steps >= 1, --batch-per-device >= 1")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_worker(args) if args.worker else drive(args, argv)


def drive(args, argv) -> int:
    """One worker subprocess per (resolution, inputs, remat, clips per device), one at a time, then the table."""
    import os

    # XLA's CPU scheduler orders a program for thread parallelism by default, which keeps recomputed
    # activations alive as long as kept ones (--remat would show no saving); accelerators' schedulers are
    # memory-aware, and so is this one. It changes nothing on other backends.
    flags = [MEMORY_SCHEDULER]
    if args.cpu_devices:
        flags.append(f"--xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    args.results.mkdir(parents=True, exist_ok=True)
    results = {}
    fields = {k: v for k, v in vars(args).items() if k in ("preset", "frames", "dtype", "mesh", "cpu_devices",
                                                           "freeze_motion", "steps", "compile_only")}
    for res in args.resolutions:
        for inputs in args.input_kinds:
            for remat in args.remats:
                for per_device in args.batches:
                    combo = combo_name(res, remat, inputs, per_device)
                    path = args.results / (settings_key(f"train-{combo}", {**fields, "combo": combo}) + ".json")
                    results[combo] = spawn(__file__, argv, "combo", combo, path, reuse=args.reuse, torch_side=False)
    text = report(args, argv, results)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
