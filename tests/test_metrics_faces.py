"""Face identity with dlib's real pretrained models (the `face-metrics` extra: dlib-bin + face-recognition-models).

A real photo (scikit-image's `astronaut.png`, shipped in its wheel) must be found, its descriptor must
match itself flipped and resized (Euclidean distance < 0.4, well under dlib's 0.6 same-person threshold;
measured 0.19 and 0.22), and noise must report "no face". Then the story metric on a folder of those
pictures: every face found, distances equal to the pairwise ones, all pairs "same person".
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib", reason="the face-metrics extra is not installed: "
                                          "pip install 'storydiff-jax[face-metrics]'")
skimage = pytest.importorskip("skimage", reason="scikit-image (the test photo) is not installed")

from storydiff_jax.metrics.faces import FaceEmbedder  # noqa: E402
from storydiff_jax.metrics.similarity import pairwise_distances  # noqa: E402
from storydiff_jax.metrics.story import score_story  # noqa: E402


@pytest.fixture(scope="module")
def faces():
    try:
        return FaceEmbedder()
    except Exception as e:  # the models package missing or broken: say so instead of failing obscurely
        pytest.skip(f"dlib's face models are not usable here: {e}")


@pytest.fixture(scope="module")
def photo():
    path = os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")
    return np.asarray(Image.open(path).convert("RGB"))


def test_real_face_found_and_stable(faces, photo):
    d = faces.describe(photo)
    assert d is not None and d.shape == (128,)
    flipped = faces.describe(photo[:, ::-1])
    small = faces.describe(np.asarray(Image.fromarray(photo).resize((256, 256), Image.Resampling.BICUBIC)))
    dist = {"flip": float(np.linalg.norm(d - flipped)), "resize": float(np.linalg.norm(d - small))}
    print(f"\nastronaut descriptor distances: {dist}")
    assert all(v < 0.4 for v in dist.values()), dist
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert faces.describe(noise) is None


def test_story_face_identity(faces, photo, tmp_path):
    variants = [photo, photo[:, ::-1], np.asarray(Image.fromarray(photo).resize((320, 320))),
                np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)]
    (tmp_path / "panels").mkdir()
    panels = []
    for i, img in enumerate(variants):
        Image.fromarray(img).save(tmp_path / "panels" / f"{i:02d}.png")
        panels.append({"file": f"panels/{i:02d}.png", "prompt": "an astronaut", "characters": ["Eileen"]})
    (tmp_path / "story.json").write_text(json.dumps({"panels": panels}))
    result = score_story(str(tmp_path), faces=faces)
    c = result["characters"]["Eileen"]
    assert c["face_found"] == 0.75 and [p["face_found"] for p in result["panels"]] == [True, True, True, False]
    want = pairwise_distances(np.stack([faces.describe(v) for v in variants[:3]]))
    assert c["face_distance"] == pytest.approx(want.mean(), abs=1e-9) and c["face_same"] == 1.0
    assert result["summary"]["face_distance"] == c["face_distance"] and "clip_t" not in result["summary"]
