"""Progress of long sampling loops: one bar at a time, fed from inside jitted programs.

A jitted `lax.scan` cannot call tqdm itself; each loop iteration calls `tick_from_jit(i)`, which goes
through `jax.debug.callback` to the host. Besides the console bar, a `listener(phase, done, total)` can be
set (a UI's progress widget); it sees the same ticks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax


class Progress:
    bar = None
    phase: str = ""
    done: int = 0
    total: int = 0
    listener: Callable[[str, int, int], None] | None = None

    @classmethod
    def start(cls, enabled: bool, total: int, desc: str) -> None:
        cls.close()
        cls.phase, cls.done, cls.total = desc, 0, total
        if enabled:
            from tqdm import tqdm

            cls.bar = tqdm(total=total, desc=desc, unit="step", leave=True)
        if cls.listener is not None:
            cls.listener(desc, 0, total)

    @classmethod
    def tick(cls, *_) -> None:
        cls.done += 1
        if cls.bar is not None:
            cls.bar.update(1)
        if cls.listener is not None:
            cls.listener(cls.phase, cls.done, cls.total)

    @classmethod
    def close(cls) -> None:
        if cls.bar is not None:
            cls.bar.close()
        cls.bar = None


def tick_from_jit(i) -> None:
    """Call inside a jitted loop body: one tick per iteration, on the host."""
    jax.debug.callback(Progress.tick, i)
