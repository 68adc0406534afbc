"""What every command-line entry point shares: errors as one line on stderr, no traceback, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import StoryDiffError


def run_command(work: Callable[[], object], *, interrupted: str) -> int:
    """Run `work()`: 0 on success, 2 with `error: ...` for our errors, 130 with `interrupted` on Ctrl-C."""
    try:
        work()
    except StoryDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0
