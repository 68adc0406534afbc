"""The persistent compilation cache the CLIs turn on (`storydiff_jax/compile_cache.py`): programs land in the folder,
bounded in size (JAX keeps an access-time file per program for that); a folder that processes without the bound
also use is left unbounded, so writes keep working there; 'off' writes nothing; a folder that cannot be made is a
one-line error. Each case runs in its own process (JAX sets its cache up once per process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storydiff_jax import compile_cache
from storydiff_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

_COMPILE = r"""
import sys, warnings
warnings.simplefilter("error")          # a failed cache write is a warning in JAX: make it fail the run
from storydiff_jax import compile_cache
print("FOLDER", compile_cache.enable(sys.argv[1]))
import jax, jax.numpy as jnp
print("BOUND", jax.config.jax_compilation_cache_max_size)
jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()
"""


def _compile_in(setting: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"     # cache even this tiny program
    proc = subprocess.run([sys.executable, "-c", _COMPILE, setting], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_programs_are_kept_and_a_shared_folder_stays_writable(tmp_path):
    own = tmp_path / "own"
    out = _compile_in(str(own))
    assert f"FOLDER {own}" in out and f"BOUND {compile_cache.MAX_BYTES}" in out
    entries = [n for n in os.listdir(own) if n.endswith("-cache")]
    assert entries and all(os.path.exists(own / (n[:-len("-cache")] + "-atime")) for n in entries)

    # A folder another JAX process wrote without the bound: an entry without its access-time file.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "jit_other-0123-cache").write_bytes(b"written by a process without a size bound")
    out = _compile_in(str(shared))
    assert "BOUND -1" in out
    # The same programs as in our own folder (by name: the key also hashes the cache settings), beside the other.
    written = sorted(n.rsplit("-", 2)[0] for n in os.listdir(shared) if n.endswith("-cache"))
    assert written == sorted(["jit_other"] + [n.rsplit("-", 2)[0] for n in entries])

    off = _compile_in("off")
    assert "FOLDER None" in off


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create it .* pass a writable folder or --compile-cache off"):
        compile_cache.enable(str(blocker / "cache"))
