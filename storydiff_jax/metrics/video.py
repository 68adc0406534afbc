"""Smoothness and consistency of transition videos (StoryDiffusion, Table 2).

Per clip of frames f1 .. fT:
  LPIPS-first   = mean over t >= 2 of LPIPS(f1, ft)      CLIPSIM-first  = the same with CLIP image cosine
  LPIPS-frames  = mean over t of LPIPS(ft, ft+1)          CLIPSIM-frames = the same with CLIP image cosine
then each number averaged over the clips. Lower LPIPS and higher CLIPSIM mean a smoother, more consistent
clip (the paper's transitions: 0.3794 / 0.1635 and 0.9606 / 0.9870).

A clip is a `.mp4`, a `.gif` or a folder of `frame_NNNN.png` (what `python -m infer.transition` writes);
a folder of such clips is scored clip by clip.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..video_io import read_video
from .similarity import cosines, first_and_consecutive

VIDEO_KEYS = ("lpips_first", "lpips_frames", "clipsim_first", "clipsim_frames")
_CLIP_EXTENSIONS = (".mp4", ".gif")


def _is_frames_folder(path: str) -> bool:
    return os.path.isdir(path) and any(n.startswith("frame_") and n.endswith(".png") for n in os.listdir(path))


def find_clips(path: str) -> list[str]:
    """One clip (a file or a frames folder), or every clip directly inside a folder (sorted by name)."""
    if os.path.isfile(path) or _is_frames_folder(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such file or folder; pass a clip (.mp4, .gif, a folder of frame_NNNN.png) "
                          "or a folder of clips")
    clips = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.lower().endswith(_CLIP_EXTENSIONS) or _is_frames_folder(os.path.join(path, n)))
    if not clips:
        raise ConfigError(f"{path} holds no clips (.mp4, .gif or frame_NNNN.png folders); pass a clip or a "
                          "folder of them")
    return clips


def score_frames(frames: np.ndarray, *, clip=None, lpips=None) -> dict[str, float]:
    """uint8 [T, H, W, 3] -> the four numbers (those of the networks given)."""
    if len(frames) < 2:
        raise ConfigError(f"a clip of {len(frames)} frame(s) has no pairs to compare; it needs at least 2 frames")
    first, others, earlier, later = first_and_consecutive(len(frames))
    out: dict[str, float] = {}
    if lpips is not None:
        feats = lpips.features(frames)
        d = lpips.distances(feats, np.concatenate([first, earlier]), np.concatenate([others, later]))
        out["lpips_first"] = float(np.mean(d[: len(first)], dtype=np.float64))
        out["lpips_frames"] = float(np.mean(d[len(first):], dtype=np.float64))
    if clip is not None:
        emb = clip.images(list(frames))
        out["clipsim_first"] = float(cosines(emb[first], emb[others]).mean())
        out["clipsim_frames"] = float(cosines(emb[earlier], emb[later]).mean())
    return out


def score_videos(path: str, *, clip=None, lpips=None, progress: bool = False) -> dict[str, Any]:
    """The metrics of one clip or of every clip in a folder. Returns the metrics.json content."""
    if clip is None and lpips is None:
        raise ConfigError("no metric to compute: pass a CLIP model (CLIPSIM) and/or LPIPS weights")
    clips = find_clips(path)
    rows = []
    iterator = clips
    if progress and len(clips) > 1:
        from tqdm import tqdm

        iterator = tqdm(clips, desc="videos", unit="clip")
    for c in iterator:
        frames = read_video(c)
        rows.append({"clip": os.path.relpath(c, path) if c != path else os.path.basename(c),
                     "frames": int(len(frames)), **score_frames(frames, clip=clip, lpips=lpips)})
    summary = {k: float(np.mean([r[k] for r in rows])) for k in VIDEO_KEYS if k in rows[0]}
    return {
        "kind": "video",
        "path": os.path.abspath(path),
        "models": {k: e.name for k, e in (("clip", clip), ("lpips", lpips)) if e is not None},
        "summary": summary,
        "clips": rows,
    }
