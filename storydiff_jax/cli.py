"""What every command-line entry point shares: errors as one line on stderr, no traceback, exit codes; the
compute dtype flag."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import StoryDiffError


def run_command(work: Callable[[], object], *, interrupted: str) -> int:
    """Run `work()`: 0 on success, 2 with `error: ...` for our errors, 130 with `interrupted` on Ctrl-C."""
    try:
        work()
    except StoryDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


DTYPES = ("float32", "bfloat16", "float16")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")


def compute_dtype(name: str | None):
    """The jnp dtype named by --dtype; unset: bfloat16 on an accelerator, float32 on CPU."""
    import jax
    import jax.numpy as jnp

    return getattr(jnp, name or ("bfloat16" if jax.default_backend() != "cpu" else "float32"))
