"""Peak memory and wall time of `python -m convert pipeline` on a full-size SDXL single file.

    .venv/bin/python bench/convert_memory.py [--workdir DIR] [--dtype float16] [--keep]

1. A separate process writes a full-size SDXL-base checkpoint in the single-file SGM layout
   (`model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.{0,1}.*`), fp16, ~6.9 GB:
   the key names and shapes come from the diffusers / transformers models of the shipped
   `convert/configs/sdxl` configs, built on the meta device, mapped to SGM names by the inverse map of
   tests/test_single_file.py. The file is streamed to disk tensor by tensor (header first, then the data,
   per the safetensors format), so the builder never holds more than one tensor; values are windows of
   one pool of N(0, 0.02) fp16 numbers.
2. `python -m convert pipeline --src FILE --dst OUT --dtype float16 --no-progress` runs in another
   process; its peak RSS comes from wait4's rusage, and /proc/PID/status is sampled every 0.1 s for the
   anonymous (RssAnon: the process's own arrays) and file-backed (RssFile: mmapped checkpoint pages, which
   are page cache the kernel can drop) parts, per component (the component being converted is read off
   the files in the temporary output folder).
3. Prints a markdown table; deletes the ~14 GB of files unless --keep.

Needs ~15 GB free under --workdir (default: a new folder in /tmp) and ~14 GiB of available memory
(checked before starting; see docs/conversion.md for what holds it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GiB = 2 ** 30
_ST_DTYPES = {"float16": "F16", "int64": "I64", "int32": "I32"}


# --------------------------------------------------------------------------------------------------
# 1. The fixture: a full-size SDXL single file, written tensor by tensor
# --------------------------------------------------------------------------------------------------

def sgm_layout() -> dict[str, tuple[tuple[int, ...], str, object]]:
    """{SGM key: (shape, safetensors dtype name, value or None)} of a full SDXL-base single file."""
    import torch
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    # the diffusers -> SGM inverse map of the single-file tests
    from test_single_file import _build, _originals, _single_file

    models = _build("sdxl", device="meta")              # convert/configs/sdxl, no memory
    ckpt = _single_file("sdxl", models, _originals(models))
    layout = {}
    for key, t in sorted(ckpt.items()):
        if t.is_floating_point():
            value = None if t.is_meta else t.to(torch.float16).numpy()   # real buffers (logit_scale, ...) keep theirs
            layout[key] = (tuple(t.shape), "float16", value)
        else:
            layout[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numpy())   # position_ids
    return layout


def write_single_file(path: Path, seed: int = 0) -> dict:
    """Stream the layout to `path` as a safetensors file; returns stats."""
    layout = sgm_layout()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (shape, dtype, _) in layout.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # the data starts 8-byte aligned, as safetensors writes it
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(np.float16)
    chunk = len(pool) // 2
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for shape, dtype, value in layout.values():
            if value is not None:
                f.write(np.ascontiguousarray(value, dtype=dtype).tobytes())
                continue
            left = int(np.prod(shape, dtype=np.int64))
            while left:
                n = min(left, chunk)
                start = int(rng.integers(0, len(pool) - n + 1))
                f.write(pool[start:start + n].data)
                left -= n
    size = path.stat().st_size
    assert size == 8 + len(blob) + offset, (size, offset)
    n_params = sum(int(np.prod(s, dtype=np.int64)) for s, d, v in layout.values() if d == "float16")
    return {"tensors": len(layout), "params": n_params, "bytes": size}


def check_single_file(path: Path) -> str:
    """The file reads back through the converter's own detection."""
    sys.path.insert(0, str(ROOT))
    from convert import single_file as sf

    keys, shapes = sf.read_keys_and_shapes(path)
    arch = sf.detect_architecture(keys, shapes)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
        assert tuple(t.shape) == (320, 4, 3, 3) and str(t.dtype) == "torch.float16"
    return arch


# --------------------------------------------------------------------------------------------------
# 2. The measured conversion
# --------------------------------------------------------------------------------------------------

def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _phase(dst: Path, components: list[str]) -> str:
    """Which component the converter is on, from what it has written into its temporary folder."""
    tmps = list(dst.parent.glob(f".{dst.name}.partial-*"))
    if not tmps:
        return "done" if dst.exists() else "start"
    tmp = tmps[0]
    for name in components:
        if not (tmp / name / "config.json").exists():   # written right after the component's parameters
            saving = (tmp / name).is_dir() and any((tmp / name).glob("params*"))
            return f"{name}: saving" if saving else f"{name}: reading + converting"
    return "tokenizers, index"


def run_measured(cmd: list[str], dst: Path, components: list[str], interval: float = 0.1) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    peaks: dict[str, dict[str, int]] = {}
    overall: dict[str, int] = {}
    # Output goes to files, not pipes: nobody reads a pipe while we poll, and a full pipe would block the child.
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_f, stderr=err_f, text=True)
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            s = _status_kib(proc.pid)
            phase = _phase(dst, components)
            for k, v in s.items():
                overall[k] = max(overall.get(k, 0), v)
                peaks.setdefault(phase, {})[k] = max(peaks.get(phase, {}).get(k, 0), v)
            time.sleep(interval)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    return {"rc": proc.returncode, "wall_s": wall, "ru_maxrss_kib": usage.ru_maxrss,
            "cpu_s": usage.ru_utime + usage.ru_stime, "sampled_kib": overall, "phases_kib": peaks,
            "stdout": out, "stderr": err}


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="where to write the ~7 GB source and the output (default: /tmp)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--min-memory-gib", type=float, default=15.0,
                    help="refuse to start with less MemAvailable than this (default: 15)")
    ap.add_argument("--force", action="store_true", help="start even with less memory available")
    ap.add_argument("--build-only", metavar="FILE", help=argparse.SUPPRESS)   # the builder subprocess
    args = ap.parse_args(argv)

    if args.build_only:
        stats = write_single_file(Path(args.build_only))
        stats["arch"] = check_single_file(Path(args.build_only))
        print(json.dumps(stats))
        return 0

    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    need = (7 + 7 * (2 if args.dtype == "float32" else 1) + 1) * GiB
    if free < need:
        shutil.rmtree(work, ignore_errors=True)
        print(f"error: {work} has {free / GiB:.1f} GiB free, this needs ~{need / GiB:.0f} GiB", file=sys.stderr)
        return 2
    avail = _mem_available()
    if avail is not None and avail < args.min_memory_gib * GiB and not args.force:
        shutil.rmtree(work, ignore_errors=True)
        print(f"error: only {avail / GiB:.1f} GiB of memory available; the conversion peaks near 14 GiB (fp16): "
              f"free some, or pass --force / --min-memory-gib", file=sys.stderr)
        return 2
    src, dst = work / "sdxl-random-fp16.safetensors", work / "sdxl-jax"
    try:
        t0 = time.perf_counter()
        builder = subprocess.Popen([sys.executable, __file__, "--build-only", str(src)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = builder.communicate()     # reads both pipes, then reaps the child: its rusage is ours below
        if builder.returncode != 0:
            print(err, file=sys.stderr)
            print(f"error: building the fixture failed (exit code {builder.returncode})", file=sys.stderr)
            return 1
        stats = json.loads(out.strip().splitlines()[-1])
        build_s = time.perf_counter() - t0
        import resource
        build_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20   # only child so far
        print(f"built {src} ({stats['bytes'] / 1e9:.2f} GB, {stats['tensors']} tensors, "
              f"{stats['params'] / 1e9:.3f} B params, {stats['arch']}) in {build_s:.0f} s, "
              f"builder peak RSS {build_rss:.2f} GiB", flush=True)

        cmd = [sys.executable, "-m", "convert", "pipeline", "--src", str(src), "--dst", str(dst),
               "--dtype", args.dtype, "--no-progress"]
        components = ["unet", "vae", "text_encoder", "text_encoder_2"]
        r = run_measured(cmd, dst, components)
        if r["rc"] != 0:
            print(r["stderr"], file=sys.stderr)
            print(f"error: conversion failed with exit code {r['rc']}", file=sys.stderr)
            return 1
        out_bytes = _du(dst)
        model_bytes = stats["params"] * 2
        print()
        print("| measure | value |")
        print("|---|---|")
        print(f"| command | `python -m convert pipeline --src sdxl-random-fp16.safetensors --dst sdxl-jax "
              f"--dtype {args.dtype} --no-progress` |")
        print(f"| source file | {stats['bytes'] / GiB:.2f} GiB ({stats['params'] / 1e9:.3f} B params, fp16) |")
        print(f"| converted folder | {out_bytes / GiB:.2f} GiB ({args.dtype}) |")
        print(f"| wall time | {r['wall_s']:.0f} s (CPU {r['cpu_s']:.0f} s) |")
        print(f"| peak RSS (wait4 ru_maxrss) | {r['ru_maxrss_kib'] / 2**20:.2f} GiB "
              f"({r['ru_maxrss_kib'] * 1024 / model_bytes:.2f}x the fp16 model) |")
        s = r["sampled_kib"]
        print(f"| peak anonymous (RssAnon, sampled) | {s.get('RssAnon', 0) / 2**20:.2f} GiB |")
        print(f"| peak file-backed (RssFile, sampled) | {s.get('RssFile', 0) / 2**20:.2f} GiB |")
        print()
        print("| phase | peak RSS | peak RssAnon | peak RssFile |")
        print("|---|---|---|---|")
        for phase, p in r["phases_kib"].items():
            print(f"| {phase} | {p.get('VmRSS', 0) / 2**20:.2f} GiB | {p.get('RssAnon', 0) / 2**20:.2f} GiB | "
                  f"{p.get('RssFile', 0) / 2**20:.2f} GiB |")
        print()
        print("converter said:", r["stdout"].strip())
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
