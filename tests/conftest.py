import os
import sys

# Tests import the repository's packages (storydiff_jax, convert, infer) from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Parity needs full float32 matmuls; the default on some backends is reduced precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
