"""Parameters as flat {dotted.path: array} dicts, and the bridge to NNX modules.

Our modules mirror the PyTorch reference's attribute names, so a parameter's dotted path here is the
PyTorch state-dict key with the leaf renamed (`weight` -> `kernel`/`scale`/`embedding`). That keeps
conversion a mechanical, checkable mapping instead of a hand-written table per network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import CheckpointError

M = TypeVar("M", bound=nnx.Module)


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def from_torch_layout(arr, leaf: str, want: tuple):
    """A PyTorch weight `arr` in our layout for a parameter whose leaf is `leaf` and whose shape is `want`.

    Kernels change layout (Conv OIHW -> HWIO, Linear [out, in] -> [in, out], and a 1x1 conv stored where we
    use a Linear or the reverse, as SD's `proj_in`/`proj_out` differ between versions); other leaves keep it.
    The caller checks the resulting shape. Works on numpy and jax arrays alike.
    """
    if leaf == "kernel":
        if arr.ndim == 4 and len(want) == 4:
            return arr.transpose(2, 3, 1, 0)          # OIHW -> HWIO
        if arr.ndim == 4 and len(want) == 2 and arr.shape[2:] == (1, 1):
            return arr[:, :, 0, 0].T                  # 1x1 conv stored where we use a Linear
        if arr.ndim == 2 and len(want) == 4 and tuple(want[:2]) == (1, 1):
            return arr.T[None, None]                  # Linear stored where we use a 1x1 conv
        if arr.ndim == 2:
            return arr.T                              # Linear: [out, in] -> [in, out]
    return arr


def abstract_params(build: Callable[[], nnx.Module]) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted path: shape/dtype} of every parameter the module `build()` would create, without allocating."""
    model = nnx.eval_shape(build)
    return {path_str(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def module_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The module's parameters as a flat {dotted path: array} dict."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def build_with_params(build: Callable[[], M], params: Mapping[str, np.ndarray | jax.Array], *,
                      dtype=None, what: str = "model") -> M:
    """Build a module abstractly and fill it from `params` (flat dict). Every parameter must be present.

    dtype: cast floating parameters to this dtype (None keeps what was stored).
    """
    model = nnx.eval_shape(build)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(state)
    wanted = {path_str(p) for p, _ in flat}
    missing = sorted(wanted - set(params))
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} parameters missing from the checkpoint (e.g. "
                              f"{', '.join(missing[:3])}); was it converted for another architecture?")
    leaves = []
    for p, v in flat:
        key = path_str(p)
        arr = params[key]
        want = v.get_value().shape
        if tuple(arr.shape) != tuple(want):
            raise CheckpointError(f"{what}: parameter {key} has shape {tuple(arr.shape)}, the config expects "
                                  f"{tuple(want)}; the checkpoint does not match this config")
        arr = jnp.asarray(arr)
        if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(dtype)
        leaves.append((p, v.replace(arr)))
    new_state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, new_state, rest)
