"""The arithmetic of the metrics, on embeddings (numpy, float64): no networks here.

Published conventions (see docs/evaluation.md):
* CLIP-T: cosine between an image's and its prompt's projected CLIP embeddings. Reported raw, as
  CLIPScore (Hessel et al. 2021: `2.5 * max(cos, 0)` per image, then the mean; the ConsiStory+ papers'
  scale) and as torchmetrics' `clip_score` (`100 * cos` per image, mean, then `max(mean, 0)`).
* CLIP-I / DINO-I: mean cosine over all unordered pairs of a character's images (DreamBooth's DINO
  convention, StoryDiffusion's "character similarity").
* Face identity: Euclidean distances between 128-d dlib descriptors; < 0.6 is dlib's same-person threshold.
* Video (StoryDiffusion Table 2): `first` = mean over t >= 2 of d(f1, ft); `frames` = mean over t of
  d(ft, ft+1), with d = LPIPS or the CLIP image cosine (CLIPSIM).
"""

from __future__ import annotations

import numpy as np

FACE_SAME_PERSON = 0.6


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [N, D] and [N, D] -> [N]."""
    return np.sum(unit(a) * unit(b), axis=-1)


def pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs i < j of n items."""
    return np.triu_indices(n, k=1)


def mean_pairwise_cosine(x: np.ndarray) -> float | None:
    """Mean cosine over the unordered pairs of the rows of x [N, D]; None for fewer than two rows."""
    if len(x) < 2:
        return None
    u = unit(x)
    i, j = pair_indices(len(x))
    return float(np.mean(np.sum(u[i] * u[j], axis=-1)))


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances of the unordered pairs of the rows of x [N, D] -> [N (N - 1) / 2]."""
    x = np.asarray(x, np.float64)
    i, j = pair_indices(len(x))
    return np.linalg.norm(x[i] - x[j], axis=-1)


def clip_t_scalings(cos: np.ndarray) -> dict[str, float]:
    """Per-image prompt cosines -> the three CLIP-T numbers (raw mean, CLIPScore, torchmetrics)."""
    cos = np.asarray(cos, np.float64)
    return {"clip_t": float(cos.mean()),
            "clip_t_clipscore": float(np.mean(2.5 * np.maximum(cos, 0.0))),
            "clip_t_torchmetrics": float(max(100.0 * cos.mean(), 0.0))}


def first_and_consecutive(n_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first, others, earlier, later) frame indices: pairs (0, t) for t >= 1 and (t, t + 1)."""
    t = np.arange(1, n_frames)
    return np.zeros_like(t), t, t - 1, t
