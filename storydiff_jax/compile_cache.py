"""Compile once per machine, not once per run: JAX's persistent compilation cache for the command-line tools.

JAX can keep every compiled program on disk, keyed by the program, its compile options, the devices and
the JAX/XLA versions; a later process that builds the same program loads it instead of compiling it. The
CLIs (`infer.story`, `infer.transition`, `infer.app`, `train`) turn it on at start, in a per-user folder:

    --compile-cache DIR    keep the programs in DIR
    --compile-cache off    compile everything afresh (nothing is read or written)
    (unset)                $JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/storydiff-jax/jax
                           (~/.cache/storydiff-jax/jax)

Only programs without host callbacks can be stored (JAX's rule): the sampling programs report progress
from the step loop around them, not from inside (see `pipelines.base.run_steps`). Programs that compile in
under MIN_COMPILE_S are not worth a file. The folder is bounded to MAX_BYTES, least recently used first
out (which needs the `filelock` package, also what keeps concurrent processes from writing one entry twice).
JAX's own variables (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, JAX_COMPILATION_CACHE_MAX_SIZE) win where set.
Measured effect: docs/compile_cache.md.
"""

from __future__ import annotations

import argparse
import os

from .errors import ConfigError

OFF = "off"
MIN_COMPILE_S = 0.5
MAX_BYTES = 8 * 2**30
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"     # the file names of JAX's cache entries (jax._src.lru_cache)


def default_folder() -> str:
    """$JAX_COMPILATION_CACHE_DIR (JAX's own variable) when set, else the per-user cache folder."""
    jax_own = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if jax_own:
        return jax_own
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "storydiff-jax", "jax")


def add_argument(parser: argparse.ArgumentParser) -> None:
    shown = default_folder().replace(os.path.expanduser("~"), "~")
    parser.add_argument("--compile-cache", metavar="DIR|off", default=None,
                        help="keep compiled programs in DIR, so the next run with the same settings starts at once; "
                             f"'off' compiles afresh (default: {shown})")


def enable(setting: str | None) -> str | None:
    """Turn JAX's persistent compilation cache on in `setting` (None: `default_folder()`), or leave it off for
    'off'. Call before anything is compiled. Returns the folder used, or None when off."""
    import jax

    if setting is not None and setting.strip().lower() == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = os.path.abspath(os.path.expanduser(setting or default_folder()))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--compile-cache {folder}: cannot create it ({e.strerror}); pass a writable folder or "
                          "--compile-cache off") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--compile-cache {folder} is not writable; pass a writable folder or --compile-cache off")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # JAX's own environment variables, where set, keep their say (the test suite lowers the threshold).
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and _has_filelock() and _every_entry_timed(folder):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder


def _every_entry_timed(folder: str) -> bool:
    """Whether every program in `folder` has the access-time file that JAX's size bound keeps beside it. A folder
    that processes without the bound also write to (JAX_COMPILATION_CACHE_DIR set for other JAX work, or our
    test suite's in-process programs) holds entries without one; with the bound on, JAX's eviction then fails on
    every write (a warning, and the program is not cached). Such a folder is left unbounded, as those processes
    leave it."""
    names = set(os.listdir(folder))
    return all(name[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX in names for name in names if name.endswith(_CACHE_SUFFIX))


def _has_filelock() -> bool:
    """JAX needs the `filelock` package to bound the folder's size (and then locks its writes)."""
    try:
        import filelock  # noqa: F401
    except ImportError:
        return False
    return True
