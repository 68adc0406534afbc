"""PyTorch state dicts -> our flat parameter dicts, checked against the model's expected shapes.

The target model's attribute tree mirrors the PyTorch module tree, so each key maps by renaming its
leaf: `weight` becomes `kernel` (Linear: transposed; Conv: OIHW -> HWIO), `scale` (norms) or
`embedding` (embedding tables). Everything is done one tensor at a time so a caller that streams
tensors from disk never holds more than the output plus one tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np

from storydiff_jax.errors import CheckpointError
from storydiff_jax.params import from_torch_layout

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _to_flax(key: str, arr: np.ndarray, target: str, want: tuple) -> np.ndarray:
    """Apply the layout change implied by the target leaf, then check the shape."""
    arr = from_torch_layout(arr, target.rsplit(".", 1)[-1], want)
    if tuple(arr.shape) != tuple(want):
        raise CheckpointError(f"shape mismatch for {key}: expected {tuple(want)} (as {target}), got "
                              f"{tuple(arr.shape)}; the checkpoint does not match the config")
    return arr


def target_for(key: str, expected: Mapping[str, jax.ShapeDtypeStruct]) -> str | None:
    """Our dotted path for a PyTorch key, or None if the model has no such parameter."""
    if key in expected:
        return key
    stem, _, leaf = key.rpartition(".")
    if leaf == "weight":
        for name in _WEIGHT_LEAVES:
            cand = f"{stem}.{name}"
            if cand in expected:
                return cand
    return None


def convert_tensors(tensors: Iterable[tuple[str, np.ndarray]], expected: Mapping[str, jax.ShapeDtypeStruct], *,
                    what: str, dtype=None, ignore: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Map (torch key, array) pairs onto `expected`; raise one clear error on any mismatch.

    ignore: key suffixes/prefixes that are buffers, not parameters (e.g. `position_ids`).
    dtype: numpy dtype to store floating parameters in (None keeps the source dtype).
    """
    out: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    for key, arr in tensors:
        if any(key.endswith(s) or key.startswith(s) for s in ignore if s):
            continue
        target = target_for(key, expected)
        if target is None:
            unexpected.append(key)
            continue
        arr = _to_flax(key, np.asarray(arr), target, expected[target].shape)
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype)
        out[target] = np.ascontiguousarray(arr)
    missing = sorted(set(expected) - set(out))
    if unexpected:
        raise CheckpointError(f"{what}: {len(unexpected)} unexpected keys in the checkpoint (e.g. "
                              f"{', '.join(sorted(unexpected)[:3])}); is it the right kind of model?")
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} parameters missing from the checkpoint (e.g. "
                              f"{', '.join(missing[:3])}); is it complete and of this architecture?")
    return out


def renamed(tensors: Iterable[tuple[str, np.ndarray]], rename) -> Iterator[tuple[str, np.ndarray]]:
    """Apply `rename(key, arr) -> iterable of (key, arr)` to a tensor stream (split fused tensors, etc.)."""
    for key, arr in tensors:
        yield from rename(key, arr)
