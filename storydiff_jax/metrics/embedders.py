"""The metric networks as jitted functions over fixed-size batches of host arrays.

Every call pads its inputs to a multiple of `batch` rows (repeating the last one) and runs one compiled
program per network and input size, whatever the number of panels, prompts or frames: on a CPU the
compile costs more than the tiny models' work, and a story of 9 panels must not compile again after one
of 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from ..errors import ConfigError
from ..images import ImagePreprocessing
from ..models.clip import CLIPModel
from ..models.clip_text import tokenize
from ..models.dinov2 import DinoBackbone
from ..models.lpips import LPIPS, MIN_SIDE

BATCH = 8


class Batched:
    """`method` of `model`, jitted, applied to numpy inputs in padded batches; returns numpy (or a list of
    numpy arrays when the method returns a list)."""

    def __init__(self, model: nnx.Module, method: str, batch: int = BATCH):
        graph, state = nnx.split(model)
        self._state = state

        def run(state, *xs):
            # Full float32 matmuls on every backend (TPUs and TF32 GPUs default to less): a metric must not
            # move with the accelerator it was computed on.
            with jax.default_matmul_precision("highest"):
                return getattr(nnx.merge(graph, state), method)(*xs)

        self._fn = jax.jit(run)
        self.batch = batch

    def __call__(self, *xs) -> np.ndarray | list[np.ndarray]:
        """Each argument an array or a list of arrays (pytrees) sharing the leading (row) axis."""
        n = len(jax.tree.leaves(xs)[0])
        outs = []
        for start in range(0, n, self.batch):
            rows = slice(start, start + self.batch)
            chunk = jax.tree.map(lambda x, rows=rows: _pad(np.asarray(x[rows]), self.batch), xs)
            got = min(self.batch, n - start)
            outs.append(jax.tree.map(lambda y, got=got: np.asarray(y)[:got], self._fn(self._state, *chunk)))
        return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


class ClipEmbedder:
    """CLIP's projected image and text embeddings (unnormalised, like transformers' get_*_features)."""

    def __init__(self, model: CLIPModel, tokenizer, preprocessing: ImagePreprocessing, *, name: str = "clip"):
        self.model, self.tokenizer, self.preprocessing, self.name = model, tokenizer, preprocessing, name
        self._images = Batched(model, "image_features")
        self._texts = Batched(model, "text_features")

    def images(self, images: Sequence) -> np.ndarray:
        """uint8 [H, W, 3] images (or PIL) -> float32 [N, projection_dim]."""
        return self._images(self.preprocessing(list(images)))

    def texts(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> float32 [N, projection_dim]; longer prompts are cut at the text tower's 77 positions."""
        ids = tokenize(self.tokenizer, list(prompts), self.model.config.text.max_position_embeddings)
        return self._texts(ids)


class DinoEmbedder:
    """DINO CLS embeddings (the DINO-I features) of DINOv2 or DINO v1 (models/dino_vit.py). `name` says
    which (metrics.json records it: DINO-I of the two kinds are different numbers)."""

    def __init__(self, model: DinoBackbone, preprocessing: ImagePreprocessing, *, name: str = "dino"):
        self.model, self.preprocessing, self.name = model, preprocessing, name
        self._cls = Batched(model, "cls_embedding")

    def images(self, images: Sequence) -> np.ndarray:
        return self._cls(self.preprocessing(list(images)))


class LpipsScorer:
    """LPIPS between frames: each frame through AlexNet once, then any pairs of them."""

    def __init__(self, model: LPIPS, *, name: str = "lpips-alex-v0.1"):
        self.model, self.name = model, name
        self._features = Batched(model, "features")
        self._distance = Batched(model, "distance")

    def features(self, frames: np.ndarray) -> list[np.ndarray]:
        """uint8 [T, H, W, 3] -> per tap [T, h, w, C] normalised features."""
        frames = np.asarray(frames)
        if min(frames.shape[1:3]) < MIN_SIDE:
            raise ConfigError(f"LPIPS: frames of {frames.shape[2]}x{frames.shape[1]} px are too small for AlexNet; "
                              f"use frames of at least {MIN_SIDE} px per side")
        return self._features(frames.astype(np.float32) / 127.5 - 1.0)

    def distances(self, features: list[np.ndarray], first: Sequence[int], second: Sequence[int]) -> np.ndarray:
        """[P] LPIPS between frames first[p] and second[p] (indices into `features`)."""
        a = [f[np.asarray(first)] for f in features]
        b = [f[np.asarray(second)] for f in features]
        return self._distance(a, b)
