"""What the side-by-side benchmarks (bench/story.py, bench/transition.py) share: one subprocess per side,
so each peak-memory counter belongs to one side alone, and the machine facts that go into the tables.

A benchmark script runs itself as a worker (`--worker NAME --result FILE.json`); the driver starts the
workers with `spawn`, optionally reusing a result written earlier with the same settings (`settings_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 2 ** 20, 2 ** 30


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB


def _proc_line(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            return next((line for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def cpu_model() -> str:
    line = _proc_line("/proc/cpuinfo", "model name")
    return line.split(":", 1)[1].strip() if line else (platform.processor() or "unknown CPU")


def machine(load: bool = False) -> str:
    """Host, CPU, memory and Python; with `load`, the load average now (a busy host slows the CPU sides)."""
    line = _proc_line("/proc/meminfo", "MemTotal")
    mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM" if line else ""
    text = (f"{platform.node() or 'host'}: {cpu_model()}, {os.cpu_count()} CPUs{mem}, "
            f"Python {platform.python_version()}")
    return text + ("; load average at the end {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if load else "")


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def fmt_s(x) -> str:
    return "n/a" if x is None else (f"{x:.2f} s" if x < 100 else f"{x:.0f} s")


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def settings_key(name: str, fields: dict) -> str:
    """A result file name that changes with every setting that changes a number."""
    blob = json.dumps(fields, sort_keys=True)
    return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def write_worker_result(label: str, name: str, work, result: str) -> int:
    """Run one worker's `work()` and write its result dict; an exception becomes that side's error row
    (reported in the table, not fatal for the other sides)."""
    try:
        res = work()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res = {label: name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    Path(result).write_text(json.dumps(res, indent=1))
    return 0 if "error" not in res else 1


def worker_env(torch_side: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The first call must include compilation: no persistent compilation cache.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    # Allocate on demand, so the peak counter says how much was needed, not how much was reserved.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if torch_side:   # the torch side imports storydiff_jax for configs and draws: keep JAX off the GPU
        env["JAX_PLATFORMS"] = "cpu"
    return env


def spawn(script: str, argv: list[str], label: str, name: str, path: Path, *, reuse: bool, torch_side: bool) -> dict:
    """Run `script` as worker `name` in a subprocess (or reuse its earlier result at `path`); its result dict."""
    if reuse and path.exists():
        res = json.loads(path.read_text())
        if "error" not in res:
            print(f"== {name}: reusing {path}", flush=True)
            res["reused"] = str(path)
            return res
    print(f"== {name}: running in a subprocess", flush=True)
    cmd = [sys.executable, str(Path(script).resolve()), *argv, "--worker", name, "--result", str(path)]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=worker_env(torch_side), check=False).returncode
    if not path.exists():
        return {label: name, "error": f"worker exited with code {rc} and wrote no result"}
    res = json.loads(path.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def shown_command(argv: list[str]) -> list[str]:
    """The command line without the bookkeeping options (--out, --results, --reuse): they change no number."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--results"):
            skip = True
            continue
        if a == "--reuse" or a.startswith(("--out=", "--results=")):
            continue
        out.append(a)
    return out
