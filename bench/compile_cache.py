"""Compile once per machine: what JAX's persistent compilation cache saves the CLIs (storydiff_jax.compile_cache).

    python bench/compile_cache.py [--preset sdxl] [--size 768] [--out docs/compile_cache.md]

Every measurement runs in a fresh process (within one process JAX's in-memory caches would answer instead):
1. `python -m infer.story` on the tiny preset (examples/lighthouse_keepers.txt, progress bars on): seconds from
   launching the command to its first denoising step (the write phase's first progress tick) and to its end;
   with `--compile-cache off`, then twice with one fresh cache folder (the first run fills it, the second
   reads it).
2. The story pipeline's write and read programs for `--preset` at `--size`² (bf16, 35 steps, 4 id images, read
   batch 4; abstract weights: nothing is allocated or run), built by the pipeline's own builders and compiled
   as a watched CLI run compiles them (one step per call): without the cache, into a fresh folder, from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORY = ROOT / "examples" / "lighthouse_keepers.txt"
FIRST_TICK = re.compile(rb"write [^:\r\n]+:\s+\d+%\|[^|]*\| 1/\d+")


def cli_run(cache: str, out: str) -> dict:
    """Launch `python -m infer.story` and watch its progress bars: seconds to the first step and to the end."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "infer.story", "--story", str(STORY), "--out", out,
                             "--compile-cache", cache], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen, first = b"", None
    while chunk := proc.stderr.read1(4096):
        seen += chunk
        if first is None and FIRST_TICK.search(seen):
            first = time.perf_counter() - t0
    if proc.wait() != 0:
        raise RuntimeError(seen.decode(errors="replace")[-2000:])
    return {"first_step_s": first, "total_s": time.perf_counter() - t0}


def program_worker(preset: str, size: int) -> dict:
    """Trace and compile the write and read programs of an abstract-weight pipeline; seconds for each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from storydiff_jax import consistent as csa
    from storydiff_jax.models.unet import FreeU
    from storydiff_jax.pipelines import StoryPipeline
    from storydiff_jax.pipelines.components import load_components
    from storydiff_jax.pipelines.story import Conditioning
    from storydiff_jax.schedulers import make_sampler

    dtype, steps, ids, batch = jnp.bfloat16, 35, 4, 4
    pipe = StoryPipeline(load_components(preset, dtype=dtype, abstract=True))
    cfg = pipe.config
    side = size // cfg.vae.downscale
    layout = csa.csa_layout(cfg.unet, (side, side))
    sampler = make_sampler("ddim", cfg.scheduler, steps)
    settings = csa.CSASettings()
    (s,) = csa.draw_write_schedules(0, 1, ids, steps, list(layout.tokens), (size, size), settings)
    spec = jax.ShapeDtypeStruct

    def rows(n):
        pooled = spec((2 * n, cfg.unet.text_embeds_dim), dtype) if cfg.unet.is_sdxl else None
        return Conditioning(spec((2 * n, 77, cfg.unet.cross_attention_dim), dtype), pooled)

    bank = tuple(spec((steps, 1, 2, s.index[L].shape[1], width), dtype) for L, width in zip(layout.tokens,
                                                                                             layout.widths))
    valid = {L: spec((steps, 1, s.index[L].shape[1]), jnp.bool_) for L in s.index}
    latents = spec((ids, side, side, cfg.unet.in_channels), jnp.float32)
    common = (spec((1, 6), jnp.float32), spec((), jnp.float32))
    one_step = spec((1,), jnp.int32)
    programs = {
        "write": (pipe._program(pipe._write_program, sampler, layout.tokens, FreeU()),
                  (pipe._unet_state, latents, bank, spec((), jnp.int32), rows(ids), *common,
                   (s.index, s.others, s.others_len, s.flips))),
        "read": (pipe._program(pipe._read_program, sampler, layout.tokens, FreeU(), False),
                 (pipe._unet_state, spec((batch,) + latents.shape[1:], jnp.float32), rows(batch), *common, bank,
                  valid, spec((batch, 1), jnp.bool_), np.zeros((batch, steps, len(layout.tokens)), bool))),
    }
    out = {}
    for name, (program, args) in programs.items():
        t0 = time.perf_counter()
        lowered = program.lower(*args, steps=one_step)      # tracing the Python: never cached
        t1 = time.perf_counter()
        lowered.compile()                                   # XLA, or the cache's stored executable
        out[f"{name}_trace_s"], out[f"{name}_s"] = t1 - t0, time.perf_counter() - t1
    return out


def programs(preset: str, size: int, cache: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", "--preset", preset, "--size", str(size),
                           "--compile-cache", cache], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(cli: dict, compiled: dict, args, command: str) -> str:
    import jax

    def row(name, r, keys):
        return f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |"

    lines = [f"## Persistent compilation cache ({datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()})", "",
             f"Command: `{command}`  ",
             f"Backend: cpu ({os.cpu_count()} cores), jax {jax.__version__}. Every row is a fresh process.", "",
             "`python -m infer.story` on the tiny preset (examples/lighthouse_keepers.txt, progress bars on):", "",
             "| run | to the first denoising step (s) | whole command (s) |", "| --- | ---: | ---: |",
             row("`--compile-cache off`", cli["off"], ("first_step_s", "total_s")),
             row("fresh cache folder, first run (fills it)", cli["fill"], ("first_step_s", "total_s")),
             row("second run (reads it)", cli["hit"], ("first_step_s", "total_s")), "",
             f"Story write and read programs, {args.preset} at {args.size}² (bf16 abstract weights, 35 steps, 4 id "
             "images, read batch 4, one step per call, as the pipelines compile them), seconds to trace "
             "(Python, never cached) and to compile (or load):", "",
             "| run | write: trace | write: compile | read: trace | read: compile |",
             "| --- | ---: | ---: | ---: | ---: |",
             *(row(name, compiled[key], ("write_trace_s", "write_s", "read_trace_s", "read_s")) for name, key in (
                 ("`--compile-cache off`", "off"), ("fresh cache folder (compiles and stores)", "fill"),
                 ("from the cache", "hit"))), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sdxl")
    p.add_argument("--size", type=int, default=768)
    p.add_argument("--out", help="append the report (markdown) to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-cache", default="off", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker:
        from storydiff_jax import compile_cache

        compile_cache.enable(args.compile_cache)
        print(json.dumps(program_worker(args.preset, args.size)))
        return 0
    with tempfile.TemporaryDirectory(prefix="compile-cache-bench-") as tmp:
        cli = {"off": cli_run("off", f"{tmp}/off")}
        cli["fill"] = cli_run(f"{tmp}/cli-cache", f"{tmp}/fill")
        cli["hit"] = cli_run(f"{tmp}/cli-cache", f"{tmp}/hit")
        print(json.dumps(cli), flush=True)
        compiled = {"off": programs(args.preset, args.size, "off")}
        compiled["fill"] = programs(args.preset, args.size, f"{tmp}/program-cache")
        compiled["hit"] = programs(args.preset, args.size, f"{tmp}/program-cache")
        print(json.dumps(compiled), flush=True)
    text = report(cli, compiled, args, "python bench/compile_cache.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]))
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
