"""Evaluation: how consistent a story is and how smooth a transition is, with the published metrics.

* `story.score_story`: CLIP-T (three scalings), CLIP-I, DINO-I and face identity of a run folder;
* `video.score_videos`: LPIPS-first/-frames and CLIPSIM-first/-frames of clips;
* `embedders`: the networks (models/clip.py, models/dinov2.py or dino_vit.py, models/lpips.py; dlib in
  `faces`) as batched jitted functions; `similarity`: the arithmetic; `report`: names, directions, tables,
  charts; `prompts`: ConsiStory+-layout benchmark files.
The command line is `python -m infer.evaluate`; weights come from the user's files through
`convert/metrics.py`. docs/evaluation.md says which published number uses which model and scaling.

The names below are imported on first use, so checking a command's inputs does not start JAX.
"""

import importlib

_EXPORTS = {"ClipEmbedder": "embedders", "DinoEmbedder": "embedders", "LpipsScorer": "embedders",
            "FaceEmbedder": "faces", "BenchmarkEntry": "prompts", "read_prompts": "prompts",
            "score_story": "story", "score_videos": "video"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
