"""Writing a run's outputs so that they appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def staged_folder(dst: str) -> Iterator[str]:
    """Yield an empty temporary folder beside `dst`; when the block completes it replaces `dst` (an existing
    `dst` is removed first), when the block raises it is deleted. Readers never see a half-written `dst`."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(dst: str) -> Iterator[str]:
    """Yield a temporary file path beside `dst` (same extension); when the block completes it replaces `dst`,
    when the block raises it is deleted. Readers see the old file or the new one, never half of one."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.partial-", suffix=os.path.splitext(dst)[1],
                               dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
