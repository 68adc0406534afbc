"""Consistency metrics of a story run folder (what `python -m infer.story` writes).

The folder's `story.json` lists each panel's file, its prompt (the panel text with every `[Name]`
replaced by the character's description, before any style template) and the characters it shows.

* CLIP-T: each panel against its own prompt (all panels, [NC] included).
* CLIP-I / DINO-I / face identity: per character, over the panels that show it *alone* (a panel with two
  characters would compare one character's face with another's), then the mean over the characters
  that have at least two such panels (one panel has no pair to compare).
* masks (`masks_dir`, optional): `NN.png` per panel, white = subject. For CLIP-I and DINO-I the
  background is replaced by uniform noise (seeded per panel), so a shared backdrop does not pass for a
  shared identity (1Prompt1Story's protocol). CLIP-T and faces see the whole panel.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..images import load_image
from .similarity import FACE_SAME_PERSON, clip_t_scalings, cosines, mean_pairwise_cosine, pairwise_distances


def read_run(run_dir: str) -> dict[str, Any]:
    """story.json of a run folder, checked: every panel has a file and a prompt, and the files exist."""
    path = os.path.join(run_dir, "story.json")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir} is not a folder; pass the --out folder of `python -m infer.story`")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} has no story.json; pass a folder written by `python -m infer.story` "
                          "(its --out)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); generate the run again") from None
    panels = manifest.get("panels") if isinstance(manifest, dict) else None
    if not isinstance(panels, list) or not panels or not all(
            isinstance(p, dict) and isinstance(p.get("file"), str) and isinstance(p.get("prompt"), str)
            for p in panels):
        raise ConfigError(f"{path} lists no panels with file and prompt; it is not an infer.story manifest")
    missing = [p["file"] for p in panels if not os.path.isfile(os.path.join(run_dir, p["file"]))]
    if missing:
        raise ConfigError(f"{run_dir}: {len(missing)} panel files listed in story.json are missing (e.g. "
                          f"{missing[0]}); the run folder is incomplete: generate it again")
    return manifest


def solo_panels(panels: list[dict]) -> dict[str, list[int]]:
    """Character name -> indices of the panels that show it and no one else (story order)."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(panels):
        chars = p.get("characters") or []
        if len(chars) == 1:
            out.setdefault(chars[0], []).append(i)
    return out


def _masked(image: np.ndarray, mask_path: str, seed: int) -> np.ndarray:
    """Background (mask < 128) replaced by uniform noise; the mask is resized (nearest) to the image."""
    with Image.open(mask_path) as m:
        mask = m.convert("L")
        if mask.size != (image.shape[1], image.shape[0]):
            mask = mask.resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST)
        keep = np.asarray(mask) >= 128
    noise = np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8)
    return np.where(keep[..., None], image, noise)


def _character_images(images, panels, solo, masks_dir):
    """Images used for CLIP-I / DINO-I: the panels, masked when `masks_dir` is given."""
    if masks_dir is None:
        return images
    if not os.path.isdir(masks_dir):
        raise ConfigError(f"masks folder {masks_dir} does not exist; pass a folder with one NN.png per panel")
    needed = sorted({i for idx in solo.values() for i in idx})
    paths = {i: os.path.join(masks_dir, os.path.basename(panels[i]["file"])) for i in needed}
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"masks folder {masks_dir} lacks {len(missing)} masks (e.g. {missing[0]}); it needs one "
                          "per single-character panel, named like the panel file")
    out = list(images)
    for i, path in paths.items():
        out[i] = _masked(images[i], path, seed=i)
    return out


def score_story(run_dir: str, *, clip=None, dino=None, faces=None, masks_dir: str | None = None) -> dict[str, Any]:
    """The metrics of one run folder. clip: a `ClipEmbedder` (CLIP-T, CLIP-I), dino: a `DinoEmbedder`
    (DINO-I), faces: a `FaceEmbedder` (face identity); at least one. Returns the metrics.json content."""
    if clip is None and dino is None and faces is None:
        raise ConfigError("no metric to compute: pass a CLIP model (CLIP-T, CLIP-I), a DINO model (DINO-I) "
                          "and/or faces")
    manifest = read_run(run_dir)
    panels = manifest["panels"]
    images = [np.asarray(load_image(os.path.join(run_dir, p["file"]))) for p in panels]
    solo = solo_panels(panels)
    chars: dict[str, dict[str, Any]] = {name: {"panels": idx} for name, idx in solo.items()}
    per_panel: list[dict[str, Any]] = [{"file": p["file"], "characters": p.get("characters") or []} for p in panels]
    summary: dict[str, Any] = {}
    subject_images = (_character_images(images, panels, solo, masks_dir)
                      if clip is not None or dino is not None else images)

    for name, embedder in (("clip", clip), ("dino", dino)):
        if embedder is None:
            continue
        if name == "clip":
            cos = cosines(clip.images(images), clip.texts([p["prompt"] for p in panels]))
            for row, c in zip(per_panel, cos):
                row["clip_t"] = float(c)
            summary.update(clip_t_scalings(cos))
        key = "clip_i" if name == "clip" else "dino_i"
        needed = sorted({i for idx in solo.values() for i in idx})
        if needed:
            emb = dict(zip(needed, embedder.images([subject_images[i] for i in needed])))
            for cname, idx in solo.items():
                chars[cname][key] = mean_pairwise_cosine(np.stack([emb[i] for i in idx]))
        summary[key] = _mean([c.get(key) for c in chars.values()])

    if faces is not None:
        for cname, idx in solo.items():
            found = {i: faces.describe(images[i]) for i in idx}
            for i, d in found.items():
                per_panel[i]["face_found"] = d is not None
            desc = [d for d in found.values() if d is not None]
            dist = pairwise_distances(np.stack(desc)) if len(desc) >= 2 else np.zeros(0)
            chars[cname]["face_found"] = len(desc) / len(idx)
            chars[cname]["face_distance"] = float(dist.mean()) if dist.size else None
            chars[cname]["face_same"] = float(np.mean(dist < FACE_SAME_PERSON)) if dist.size else None
        for key in ("face_found", "face_distance", "face_same"):
            summary[key] = _mean([c.get(key) for c in chars.values()])

    return {
        "kind": "story",
        "run": os.path.abspath(run_dir),
        "models": {k: e.name for k, e in (("clip", clip), ("dino", dino), ("faces", faces)) if e is not None},
        "masks": os.path.abspath(masks_dir) if masks_dir else None,
        "summary": summary,
        "characters": chars,
        "panels": per_panel,
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
