"""Writing a run's outputs so that they appear whole or not at all, with the permissions of any other file.

Everything is staged under a temporary name beside its destination and renamed into place when complete.
The staging folders and files are made like a plain `mkdir`/`open` makes them (mode 0o777 / 0o666 less the
umask), not like `tempfile.mkdtemp`/`mkstemp` (always private, 0o700 / 0o600): the rename keeps the mode,
and a finished run folder or video must be as readable as the user's other files.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


def staging_dir(parent: str, prefix: str) -> str:
    """A new empty folder `parent/prefix<random>`, with the umask's permissions."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def staging_file(parent: str, prefix: str, suffix: str = "") -> tuple[int, str]:
    """A new empty file `parent/prefix<random>suffix` open for writing: (descriptor, path), like
    `tempfile.mkstemp` but with the umask's permissions."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4) + suffix)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


@contextmanager
def staged_folder(dst: str) -> Iterator[str]:
    """Yield an empty temporary folder beside `dst`; when the block completes it replaces `dst` (an existing
    `dst` is removed first), when the block raises it is deleted. Readers never see a half-written `dst`."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_dir(parent, f".{os.path.basename(dst)}.partial-")
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
    fd, tmp = staging_file(parent, f".{os.path.basename(dst)}.partial-", os.path.splitext(dst)[1])
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
