"""Progress of one run: a console bar per phase and/or a listener (a UI's progress widget).

Each run makes its own `Progress` and hands it to its phases; nothing is shared between runs (two
requests in one process, or a library user's own loop, never see each other's bars). The ticks come
from the host loop that calls the denoising programs one step at a time (`pipelines.base.run_steps`):
the programs themselves carry no host callback, which is what lets JAX's persistent compilation cache
keep them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, int, int], None]   # (phase, done, total)


class Progress:
    """bars: draw a tqdm bar per phase; listener: called with (phase, done, total) at each phase start and tick."""

    def __init__(self, bars: bool = False, listener: Listener | None = None):
        self.bars = bars
        self.listener = listener
        self.desc, self.done, self.total = "", 0, 0
        self._bar = None

    @property
    def watched(self) -> bool:
        """Somebody follows the steps: the step loop then waits for each step to report it."""
        return self.bars or self.listener is not None

    @contextmanager
    def phase(self, desc: str, total: int) -> Iterator[Progress]:
        """A phase of `total` ticks; its bar closes when the block ends (also on an error)."""
        self.desc, self.done, self.total = desc, 0, total
        if self.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", leave=True)
        if self.listener is not None:
            self.listener(desc, 0, total)
        try:
            yield self
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self.listener is not None:
            self.listener(self.desc, self.done, self.total)


def as_progress(progress: bool | Progress) -> Progress:
    """The pipelines' `progress=` argument: True/False (console bars or none) or a run's own Progress."""
    return progress if isinstance(progress, Progress) else Progress(bars=bool(progress))
