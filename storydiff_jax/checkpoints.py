"""Converted pipelines on disk: configs as JSON, parameters with orbax, tokenizer files.

Layout of a converted folder:

    DIR/model_index.json            {"format": "storydiff-jax", "version": 1, "arch": "sdxl", ...}
    DIR/<component>/config.json     the component's config (diffusers/transformers field names)
    DIR/<component>/params/         orbax checkpoint of the flat parameter dict (nested by dots)
    DIR/tokenizer[_2]/              CLIP tokenizer files
    DIR/scheduler/scheduler_config.json

A folder is written under a temporary name beside DIR and renamed at the end, so an interrupted
conversion never leaves a DIR that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np

from .errors import CheckpointError
from .outputs import staging_dir

FORMAT = "storydiff-jax"
FORMAT_VERSION = 1


def nest(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = np.asarray(value)
    return flat


def save_params(path: str, flat: Mapping[str, np.ndarray]) -> None:
    """Save synchronously, without orbax's defensive copy of every host array.

    The caller does not touch `flat` until the save returns, so the copy (one more full U-Net in
    memory) buys nothing; dropping it takes a full SDXL conversion from 13.8 to 10.2 GiB peak
    (docs/conversion.md). Freed memory is handed back to the OS afterwards.
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.ArrayHandler()),
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    try:
        checkpointer.save(os.path.abspath(path), args=ocp.args.PyTreeSave(nest(flat)))
    finally:
        checkpointer.close()
    release_memory()


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def load_params(path: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: parameters not found; the converted folder is incomplete, convert again")
    try:
        tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    except Exception as e:
        raise CheckpointError(f"{path}: parameters cannot be read ({str(e).splitlines()[0][:200]}); "
                              "convert the checkpoint again") from None
    return _flatten(tree)


class PipelineWriter:
    """Write a converted pipeline into a temporary folder; `commit()` renames it to its final name.

    Used as a context manager: leaving the block by an exception deletes the temporary folder.
    """

    def __init__(self, dst: str, *, overwrite: bool = False):
        self.dst = os.path.abspath(dst)
        if os.path.exists(self.dst) and not os.path.isdir(self.dst):
            raise CheckpointError(f"{dst} exists and is not a folder; choose another --dst")
        if os.path.exists(self.dst) and not overwrite:
            raise CheckpointError(f"{dst} already exists; choose another --dst or pass --overwrite")
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.tmp = staging_dir(parent, f".{os.path.basename(self.dst)}.partial-")
        self.overwrite = overwrite

    def __enter__(self) -> PipelineWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *parts: str) -> str:
        p = os.path.join(self.tmp, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def write_json(self, relpath: str, data: dict) -> None:
        with open(self.path(relpath), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)

    def write_params(self, component: str, flat: Mapping[str, np.ndarray]) -> None:
        save_params(self.path(component, "params"), flat)

    def copy_dir(self, src: str, relpath: str) -> None:
        shutil.copytree(src, self.path(relpath), dirs_exist_ok=True)

    def commit(self, index: dict) -> str:
        """Write model_index.json last, then move the folder into place."""
        self.write_json("model_index.json", {"format": FORMAT, "version": FORMAT_VERSION, **index})
        if os.path.exists(self.dst):
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
        return self.dst


def read_index(folder: str) -> dict:
    """The model_index.json of a converted folder, with a clear error for anything else."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder; convert a checkpoint with `python -m convert pipeline`")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        raise CheckpointError(f"{folder}: not a converted storydiff-jax folder (no readable model_index.json); "
                              "convert it with `python -m convert pipeline --src ... --dst ...`") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: this is a PyTorch/diffusers folder, not a converted one; convert it first "
                              "with `python -m convert pipeline --src ... --dst ...`")
    if index.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: written by a newer storydiff-jax (format {index['version']}); upgrade")
    return index


def read_json(folder: str, relpath: str) -> dict:
    try:
        with open(os.path.join(folder, relpath)) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise CheckpointError(f"{folder}: {relpath} is missing or unreadable; convert the checkpoint again") from None
