"""Evaluation: how consistent a story is and how smooth a transition is, with the published metrics.

* `story.score_story`: CLIP-T (three scalings), CLIP-I, DINO-I and face identity of a run folder;
* `video.score_videos`: LPIPS-first/-frames and CLIPSIM-first/-frames of clips;
* `embedders`: the networks (models/clip.py, models/dinov2.py, models/lpips.py; dlib in `faces`) as
  batched jitted functions; `similarity`: the arithmetic; `report`: names, directions, tables, charts;
  `prompts`: ConsiStory+-layout benchmark files.
The command line is `python -m infer.evaluate`; weights come from the user's files through
`convert/metrics.py`. docs/evaluation.md says which published number uses which model and scaling.
"""

from .embedders import ClipEmbedder, DinoEmbedder, LpipsScorer
from .prompts import BenchmarkEntry, read_prompts
from .story import score_story
from .video import score_videos

__all__ = ["ClipEmbedder", "DinoEmbedder", "LpipsScorer", "BenchmarkEntry", "read_prompts", "score_story",
           "score_videos"]
