"""Meshes and shardings: panels and training batches split over a `data` axis, parameters replicated.

Everything here also runs on one device (a 1-device mesh), so code paths are the same on a laptop,
a GPU box and a TPU pod slice. Tests use 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX starts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, axis name `data`."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_memory(mesh: Mesh) -> NamedSharding:
    """Replicated, in the hosts' pinned memory: for large buffers (character banks) read one slice a step."""
    return NamedSharding(mesh, P(), memory_kind="pinned_host")


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 0) -> jax.Array:
    """Pad `axis` with copies of its last entry up to a multiple of `multiple` (sharding needs it)."""
    n = x.shape[axis]
    extra = (-n) % multiple
    if not extra:
        return x
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    return jnp.concatenate([x] + [last] * extra, axis=axis)


def put_batch(x, mesh: Mesh):
    """Place an array sharded over `data` along axis 0 (its size must be a multiple of the mesh size)."""
    return jax.device_put(x, batch_sharded(mesh))


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
