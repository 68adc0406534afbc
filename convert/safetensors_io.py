"""Reading PyTorch weight files one tensor at a time (so a full SDXL never sits in memory twice)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from storydiff_jax.errors import CheckpointError


def weights_file(folder: str, stem: str) -> str:
    """`folder/stem.safetensors`, else its `.fp16` variant; a clear error when neither exists."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    if os.path.isfile(os.path.join(folder, f"{stem}.bin")):
        raise CheckpointError(f"{folder}: only a pickled {stem}.bin is present; re-save it as safetensors "
                              "(pickle files can run code and are not loaded)")
    raise CheckpointError(f"{folder}: no {stem}.safetensors found; is this a diffusers model folder?")


def _to_numpy(tensor) -> np.ndarray:
    """bf16 / fp8 have no numpy dtype: widen them to float32 (exact), one tensor at a time."""
    import torch

    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.numpy()


def open_safetensors(path: str):
    """safe_open with corrupt/truncated files turned into a CheckpointError."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                              "it may be truncated or corrupt: download it again") from None


def iter_tensors(path: str, keys=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) for every tensor (or `keys`) of a safetensors file, loading one at a time."""
    with open_safetensors(path) as f:
        for key in (keys if keys is not None else f.keys()):
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {key} cannot be read ({str(e).splitlines()[0]}); "
                                      "the file is truncated or corrupt: download it again") from None
            yield key, _to_numpy(tensor)


def read_json(path: str | Path) -> dict:
    """A checkpoint's JSON config, with missing/corrupt files turned into a CheckpointError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is {path.parent.parent} a complete diffusers folder?") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from None
