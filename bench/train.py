"""Train-step throughput of `python -m train smp`: step time, examples/s, TFLOP/s and MFU per device.

    python bench/train.py [--preset video] [--resolutions 256,512] [--frames 16] [--batch-per-device 1] \\
        [--dtype bfloat16] [--remat] [--steps 10] [--compile-only] [--out docs/bench_train.md]

The step is the trainer's own (`train.step.Trainer.compiled_step`): frozen VAE encode of every frame, CLIP
ViT-H-14 of the first/last frames, CLIP text encoder, IP-Adapter-Plus Resampler + SMP (trained), the video
U-Net (SD1.5 + AnimateDiff v2 motion modules + IP layers) forward and backward, AdamW update; all devices
on the `data` axis, --batch-per-device clips of --frames frames each, random weights of the preset and
random clips (uint8 frames, a tokenised caption).

Each resolution runs in its own subprocess (its own device memory). Reported per resolution:
  compile          lowering + XLA compilation of the step;
  FLOPs / step     XLA's cost analysis of the compiled step on one device (what the trainer's MFU uses,
                   `train.loop.step_flops`; with --remat it includes the recomputation), and next to it
                   an independent count: 2 x M x N x K of every matmul and convolution in the step's jaxpr
                   (global, divided by the device count; elementwise work not counted);
  memory           the compiled program's temporaries and arguments (`memory_analysis()`);
  step time        median over --steps timed steps after one untimed step (not with --compile-only);
  examples/s/dev   batch / step time / devices; TFLOP/s/dev = XLA FLOPs / step time;
  MFU              TFLOP/s/dev over the device kind's dense bf16 peak (`train.loop.PEAK_TFLOPS`).

Target (GPU, preset video, 16 frames, bf16): MFU >= 40%. `bash bench/run_gpu.sh train` runs it. On a CPU:
`--preset tiny-video --resolutions 64 --frames 4` is a functional check; `--compile-only` at real size shows
the FLOP count and memory without running a step.
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

from harness import ROOT, fmt_bytes, fmt_s, machine, settings_key, shown_command, spawn, write_worker_result

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


def measure(args, resolution: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from storydiff_jax.models.clip_text import load_tokenizer, tokenize
    from storydiff_jax.pipelines.components import preset_tokenizer_dir
    from storydiff_jax.pipelines.video_components import load_video_components, load_video_config
    from storydiff_jax.sharding import make_mesh, put_sharded
    from train.config import TrainConfig
    from train.loop import peak_tflops, step_flops
    from train.step import Trainer, split_params

    devices = jax.device_count()
    batch = args.batch_per_device * devices
    cfg = TrainConfig(model=args.preset, data_dir="-", batch_size=batch, frames=args.frames, resolution=resolution,
                      dtype=args.dtype, remat=args.remat, warmup=0, schedule="constant")
    mesh = make_mesh({"data": devices, "fsdp": 1})
    out = {"resolution": resolution, "batch": batch, "devices": devices, "backend": jax.default_backend(),
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
    out["params_trainable"] = int(sum(np.prod(v.shape) for t in trainable.values() for v in t.values()))
    out["params_frozen"] = int(sum(np.prod(v.shape) for t in frozen.values() for v in t.values()))
    ids = np.repeat(tokenize(tokenizer, [CAPTION]).astype(np.int32), batch, axis=0)
    frames_shape = (batch, args.frames, resolution, resolution, 3)
    if args.compile_only:
        state = jax.eval_shape(trainer.init_state, trainable)
        host_batch = {"frames": jax.ShapeDtypeStruct(frames_shape, jnp.uint8),
                      "input_ids": jax.ShapeDtypeStruct(ids.shape, jnp.int32)}
        state_sh, frozen_sh, batch_sh = trainer.shardings(mesh, state, frozen)
        spec = lambda t, s: jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)  # noqa: E731
        state, frozen_in, data = spec(state, state_sh), spec(frozen, frozen_sh), spec(host_batch, batch_sh)
    else:
        state = trainer.init_state(trainable)
        state_sh, frozen_sh, batch_sh = trainer.shardings(mesh, state, frozen)
        state, frozen_in = put_sharded(state, state_sh), put_sharded(frozen, frozen_sh)
        rng = np.random.default_rng(0)
        host_batch = {"frames": rng.integers(0, 256, frames_shape, dtype=np.uint8), "input_ids": ids}
        data = put_sharded(host_batch, batch_sh)
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


def run_worker(args) -> int:
    return write_worker_result("resolution", args.worker, lambda: measure(args, int(args.worker)), args.result)


# --------------------------------------------------------------------------------------------------
# The driver


def _tf(x):
    return "n/a" if x is None else f"{x / 1e12:.3g}"


def report(args, argv, results: dict) -> str:
    ok = [r for r in results.values() if "error" not in r]
    gpu = bool(ok) and all(r.get("backend") == "gpu" for r in ok)
    functional = args.preset.startswith("tiny-") or not gpu or args.compile_only
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    kind = "compile only" if args.compile_only else ("GPU measurement" if gpu else "CPU run")
    title = f"{kind} — NOT the target measurement" if functional else kind
    out = [f"## Train-step benchmark, {args.preset}, {args.frames} frames, {args.dtype}"
           f"{' + remat' if args.remat else ''}, {args.batch_per_device} clip(s) per device — {title} ({now})", ""]
    if functional:
        tiny = ", tiny random-weight model" if args.preset.startswith("tiny-") else ""
        out += [f"> **Not the target measurement** ({kind}{tiny}):"
                " it shows the benchmark runs end to end; its times say nothing about the target "
                f"({TARGET}). The real measurement: `bash bench/run_gpu.sh train` on a GPU machine "
                f"(`{REAL_COMMAND}`).",
                ""]
    out += [f"Command: `python {' '.join(shlex.quote(a) for a in ['bench/train.py', *shown_command(argv)])}`", ""]
    devices = "; ".join(sorted({f"{r['backend']} {r['device']} x{r['devices']} ({r['versions']})" for r in ok}))
    out += [f"Machine: {machine(load=True)}. {devices}", ""]
    if ok:
        r = ok[0]
        out += [f"Parameters: {r['params_trainable'] / 1e6:.1f} M trained (SMP, image projection, IP layers"
                f"{'' if args.freeze_motion else ', motion modules'}), {r['params_frozen'] / 1e6:.1f} M frozen.", ""]
    out += ["| resolution | global batch | compile | XLA TFLOP / step / device | dot+conv TFLOP (jaxpr) | temp | "
            "arguments | step time (median) | examples/s/device | TFLOP/s/device | MFU | peak device memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in args.resolutions:
        r = results.get(str(res), {"error": "not run"})
        if "error" in r:
            out.append(f"| {res}² | | failed: {r['error']} | | | | | | | | | |")
            continue
        mfu = r.get("mfu")
        out.append(f"| {res}² | {r['batch']} | {fmt_s(r['compile_s'])} | {_tf(r.get('flops_xla'))} | "
                   f"{_tf(r.get('flops_dots'))} | {fmt_bytes(r.get('temp_bytes'))} | "
                   f"{fmt_bytes(r.get('argument_bytes'))} | "
                   f"{fmt_s(r.get('step_s'))} | "
                   + ("n/a" if r.get("examples_per_s_per_device") is None else f"{r['examples_per_s_per_device']:.3f}")
                   + f" | {'n/a' if r.get('tflops_per_device') is None else format(r['tflops_per_device'], '.2f')} | "
                   f"{'n/a' if mfu is None else f'**{mfu:.1%}**'} | {fmt_bytes(r.get('peak_device'))} |")
    out += ["", "XLA TFLOP: `compiled.cost_analysis()['flops']` of the step on one device (the trainer's MFU "
            "numerator; includes recomputation under --remat). dot+conv: 2 x multiply-adds of every matmul and "
            "convolution in the step's jaxpr over all devices / device count, an independent count that leaves "
            "out elementwise work. MFU against the device's dense bf16 peak "
            + (f"({ok[0]['peak_tflops']:.0f} TFLOP/s)" if ok and ok[0].get("peak_tflops") else "(unknown here: n/a)")
            + ". Step time: median of the timed steps after one untimed step; one clip = "
            f"{args.frames} frames.", ""]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="video", choices=["video", "tiny-video"])
    p.add_argument("--resolutions", default="256,512", help="comma-separated square frame sides")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch-per-device", type=int, default=1, help="clips per device per step")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--remat", action="store_true", help="recompute U-Net activations in the backward pass")
    p.add_argument("--freeze-motion", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one untimed)")
    p.add_argument("--compile-only", action="store_true", help="abstract weights: compile, count, no step run")
    p.add_argument("--out", type=Path, help="append the report (markdown) to this file")
    p.add_argument("--results", type=Path, default=ROOT / "out" / "bench" / "train",
                   help="folder of the per-resolution result JSON files")
    p.add_argument("--reuse", action="store_true", help="take stored results of identical settings")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    if (not args.resolutions or min(args.resolutions) < 8 or args.frames < 2 or args.steps < 1
            or args.batch_per_device < 1):
        p.error("need resolutions >= 8, --frames >= 2, --steps >= 1, --batch-per-device >= 1")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_worker(args) if args.worker else drive(args, argv)


def drive(args, argv) -> int:
    """One worker subprocess per resolution, then the table."""
    args.results.mkdir(parents=True, exist_ok=True)
    results = {}
    for res in args.resolutions:
        fields = {k: v for k, v in vars(args).items() if k not in ("out", "results", "reuse", "worker", "result",
                                                                   "resolutions")}
        path = args.results / (settings_key(f"train-{res}", {**fields, "resolution": res}) + ".json")
        results[str(res)] = spawn(__file__, argv, "resolution", str(res), path, reuse=args.reuse, torch_side=False)
    text = report(args, argv, results)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
