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
