"""Outputs are staged under temporary names and renamed whole, with the permissions the user's umask gives any
other file (tempfile's mkdtemp/mkstemp make private 0o700/0o600 ones, which the rename would keep)."""

import os
import stat

import numpy as np

from infer.transition import _write
from storydiff_jax.outputs import staged_folder
from storydiff_jax.pipelines.bank import CharacterBank
from storydiff_jax.video_io import write_video


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_honour_the_umask(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    bank = CharacterBank({"Ana": "a girl"}, [np.zeros((1, 1, 2, 1, 4), np.float32)], {4: np.zeros((1, 1, 1), bool)},
                         {}, [4])
    old = os.umask(0o022)
    try:
        with staged_folder(str(tmp_path / "story")) as tmp:       # a story's run folder
            open(os.path.join(tmp, "story.json"), "w").close()
        _write(str(tmp_path / "walk.mp4"), ".mp4", frames, 8.0, {"frames": 2}, write_video)   # video + manifest
        write_video(frames, str(tmp_path / "frames") + os.sep)
        bank.save(str(tmp_path / "bank.npz"))
        assert mode(tmp_path / "story") == mode(tmp_path / "frames") == 0o755
        assert mode(tmp_path / "walk.mp4") == mode(tmp_path / "walk.json") == mode(tmp_path / "bank.npz") == 0o644
        os.umask(0o077)                                             # a private umask stays private
        with staged_folder(str(tmp_path / "private")):
            pass
        assert mode(tmp_path / "private") == 0o700
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # nothing staged is left
