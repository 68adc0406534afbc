import os
import sys

# Tests import the repository's packages (storydiff_jax, convert, infer) from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Parity needs full float32 matmuls; the default on some backends is reduced precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Reuse compiled XLA programs across the tests and the CLI subprocesses they start (same shapes,
# same programs): compilation dominates the tiny models' run time on CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"storydiff-jax-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# XLA's CPU backend spends most of a tiny model's compile time in LLVM's optimisation passes; at level 0
# the suite's CPU time drops by ~30% (measured on tests/test_story_pipeline.py: 133 s -> 93 s of CPU).
# Only the machine code's speed changes, not the HLO: parity tolerances and the compiled programs' FLOP and
# memory analyses are unaffected. Subprocesses inherit it; tests that start them with more devices add
# theirs through `xla_flags()`.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` fake CPU devices, keeping the suite's other flags."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


def cpu_env(devices: int, **extra: str) -> dict:
    """The environment of a subprocess on `devices` fake CPU devices (the suite's flags kept), plus `extra`."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}


# Two pytest workers share two cores: torch's own thread pool (one thread per core in each worker)
# oversubscribes them and made the tiny reference models' matmuls ~40x slower (15.6 ms vs 0.38 ms).
try:
    import torch

    torch.set_num_threads(1)
except ImportError:   # tests that need torch import it themselves and say so
    pass
