"""What the story and transition pipelines share: a device mesh holding the models' replicated states, the
compiled-program cache, LoRA files merged into those states, the host loop over denoising steps, and decoded
images to uint8.

Programs are built by pure builder methods and cached under the builder and every argument it was built
with (`self._program(self._window_program, sampler, layout, ...)`), so a cache key can never name fewer
settings than the program depends on. Builders take only hashable arguments (frozen dataclasses, tuples,
numbers); arrays are arguments of the compiled program itself.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..sharding import data_mesh, put_replicated, replicated
from .progress import Progress


def to_uint8(images: jax.Array) -> jax.Array:
    """Decoded images in [-1, 1] -> uint8, rounded to nearest."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = the block's wall time in seconds."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def run_steps(program: Callable, state, carry: tuple, inputs: tuple, num_steps: int, progress: Progress) -> tuple:
    """Run a denoising program over all `num_steps` steps and return its final carry.

    Every denoising program has the form `program(state, *carry, *inputs, steps=...) -> carry`: a `lax.scan`
    over the step indices it is given (all of them when called without), starting from the latents in
    `carry`. Here it is called once per step: one compiled program serves every step, every step count and
    every run with these shapes, whether watched or not, and the progress ticks from this loop as each step
    completes (unwatched, the calls are queued without waiting). A program may not call back into Python
    if JAX's persistent compilation cache is to keep it (JAX never stores programs with host callbacks):
    that is why the ticks come from here. One step per call computes the same numbers as all steps in one
    call (the same step body: `make story`'s panels are byte-identical either way).
    """
    for i in range(num_steps):
        out = program(state, *carry, *inputs, steps=np.array([i], np.int32))
        carry = out if isinstance(out, tuple) else (out,)
        if progress.watched:
            jax.block_until_ready(carry)
            progress.tick()
    return carry


class Pipeline:
    """A mesh over `devices` (all by default; panels and frames shard over its `data` axis), the models'
    states replicated on it, and the compiled programs built so far."""

    def __init__(self, devices=None):
        self.mesh = data_mesh(devices)
        self.n_devices = self.mesh.devices.size
        self._programs: dict = {}
        self._merged: tuple = ((), None)     # (LoRA set, its placed states): the last set a run asked for

    def _place(self, model: nnx.Module):
        """(graph, state replicated over the mesh) of a model: programs take the state as an argument. An abstract
        model (`load_components(..., abstract=True)`) keeps shapes only: its programs can be compiled, not run."""
        graph, state = nnx.split(model)
        if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
            everywhere = replicated(self.mesh)
            return graph, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), state)
        return graph, put_replicated(state, self.mesh)

    def _program(self, builder: Callable, *args):
        """The program `builder(*args)` returns, built once per (builder, args)."""
        key = (builder.__name__, *args)
        if key not in self._programs:
            self._programs[key] = builder(*args)
        return self._programs[key]

    def _lora_states(self, components, loras: Sequence[tuple[str, float]], placed: dict[str, tuple], *,
                     inside: dict[str, str] | None = None, **lora_kw) -> dict | None:
        """{name: state} of the models in `placed` ({name: (graph, base state)}, as `_place` made them) with `loras`
        ([(path, scale)]) merged into `components`' weights, or None without LoRAs (the base states serve).

        The last set asked for is kept, so runs with the same files (same paths, sizes, modification times and
        scales) merge once; another set replaces it (one merged copy at a time). The merge starts from the
        placed states: weights no LoRA touches stay the same device arrays. The merged models have the base
        models' graphs, so every compiled program serves both. inside: {name: attribute} where the placed module
        wraps the components' model (the story's `ControlledUNet` holds the U-Net as `.unet` beside its
        ControlNets, which no LoRA touches)."""
        from ..lora import apply_loras

        key = tuple((os.path.abspath(path), *_stamp(path), float(scale)) for path, scale in loras)
        if not key:
            return None
        if self._merged[0] != key:
            self._merged = ((), None)        # free the previous set before merging the next
            inside = inside or {}
            modules = {name: nnx.merge(*gs) for name, gs in placed.items()}
            base = dataclasses.replace(components, **{name: getattr(m, inside[name]) if name in inside else m
                                                      for name, m in modules.items()})
            merged = apply_loras(base, list(loras), **lora_kw)
            states = {}
            for name, module in modules.items():
                if name in inside:
                    setattr(module, inside[name], getattr(merged, name))
                else:
                    module = getattr(merged, name)
                states[name] = self._place(module)[1]
            self._merged = (key, states)
        return self._merged[1]


def _stamp(path: str) -> tuple[int, int]:
    """(size, modification time) of a file, or (-1, -1) when it is missing (apply_loras then says so)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns
