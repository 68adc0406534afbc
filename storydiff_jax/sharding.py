"""Meshes and shardings, for inference and training alike.

Two mesh axes, named once here:

  DATA  panels, windows and training clips are split over it (each device its own examples);
  FSDP  large arrays (weights, optimizer moments) are split over it, and the training batch too, so a
        `data x fsdp` mesh trains like a `data` mesh of the same size while each device holds only
        1/fsdp of every large array (ZeRO-3 / fully sharded data parallel: XLA gathers a weight where
        it is used).

Everything here also runs on one device (a 1-device mesh), so code paths are the same on a laptop,
a GPU box and a TPU pod slice. Tests use 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX starts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .errors import ConfigError

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)     # a training batch is split over both axes


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, axis name `data`."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), (DATA,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_memory(mesh: Mesh) -> NamedSharding:
    """Replicated, in the hosts' pinned memory: for large buffers (character banks) read one slice a step."""
    return NamedSharding(mesh, P(), memory_kind="pinned_host")


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


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


def put_sharded(tree, shardings):
    """Place every leaf of `tree` with the sharding at the same place in `shardings`."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


# ----------------------------------------------------------------------------------------------------
# The training mesh: data x fsdp


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """"data=auto" | "data=8" | "data=2,fsdp=4" -> {"data": d, "fsdp": f} with d * f == n_devices."""
    sizes: dict[str, int | str] = {DATA: "auto", FSDP: 1}
    for part in filter(None, spec.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value:
            raise ConfigError(f"--mesh {spec!r}: expected e.g. {DATA}=8 or {DATA}=2,{FSDP}=4 (axes: {DATA}, {FSDP})")
        if value != "auto":
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ConfigError(f"--mesh {spec!r}: {name}={value} is not a whole number or auto") from None
            if sizes[name] < 1:
                raise ConfigError(f"--mesh {spec!r}: {name} must be >= 1")
    if sizes[FSDP] == "auto":
        raise ConfigError(f"--mesh {spec!r}: give {FSDP} a size ({DATA} may be auto)")
    if sizes[DATA] == "auto":
        if n_devices % sizes[FSDP]:
            raise ConfigError(f"--mesh {spec!r}: {FSDP}={sizes[FSDP]} does not divide the {n_devices} devices")
        sizes[DATA] = n_devices // sizes[FSDP]
    return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    """The 2-D (data, fsdp) mesh of `parse_mesh`'s sizes over all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = sizes[DATA] * sizes[FSDP]
    if n != len(devices):
        raise ConfigError(f"--mesh {DATA}={sizes[DATA]},{FSDP}={sizes[FSDP]} needs {n} devices, there are "
                          f"{len(devices)}")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((sizes[DATA], sizes[FSDP]), (DATA, FSDP), devices=devices, axis_types=(auto, auto))


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Large arrays shard their biggest `fsdp`-divisible axis over `fsdp`; the rest are replicated.

    Shape-based, so parameters and their Adam moments get the same layout.
    """
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    axes = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in axes:
        if shape[i] % fsdp == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, min_size: int):
    """`param_spec` for every array of `tree`, on `mesh`."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A training batch: axis 0 split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))
