"""Training clips: the data-source interface, a simple on-disk source, and the grain input pipeline.

A data source is anything with random access (grain's `RandomAccessDataSource` protocol):

    len(source) -> int
    source[i]   -> {"id": str, "frames": uint8 [T, H, W, 3], "caption": str}

`ClipFolderSource` reads a folder of `.npz` clips plus `index.json` (what the tests and small
experiments write with `write_clip_folder`). `open_source` also opens a WebVid TFDS build (array_record,
`python -m train build-webvid`) as a `train.webvid.WebVidSource` giving the same records, read without
TensorFlow.

The pipeline (`make_loader`) is grain's DataLoader: an `IndexSampler` shuffled with a seed, sharded by
JAX process (`ShardByJaxProcess`), endless epochs, per-host batches, read (and a WebVid build's JPEG / H.264
frames decoded) by grain's threads in this process or by `workers` grain processes. Its iterator's state is
saved in the checkpoints, so a resumed run continues with exactly the next example.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from storydiff_jax.errors import ConfigError

INDEX = "index.json"
# grain reads records from a thread pool; numpy parses .npy headers with ast.literal_eval, which CPython
# 3.11 cannot run in several threads at once ("AST constructor recursion depth mismatch"). Clips are
# small: reading them one at a time costs nothing next to the train step.
_NPZ_LOCK = threading.Lock()
FORMAT = "storydiff-clips"
VERSION = 1


@runtime_checkable
class ClipSource(Protocol):
    """What a training data source gives (ClipFolderSource, webvid.WebVidSource, features.FeatureCache)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


class ClipFolderSource:
    """DIR/index.json {"format": "storydiff-clips", "clips": [{"id", "file", "caption"}, ...]} and one
    `.npz` per clip holding `frames` uint8 [T, H, W, 3]. Clips are read lazily, one per __getitem__."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise ConfigError(f"--data-dir {folder}: no such folder; write clips with train.data.write_clip_folder "
                              "or build WebVid with `python -m train build-webvid`")
        path = os.path.join(folder, INDEX)
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError):
            raise ConfigError(f"--data-dir {folder}: no readable {INDEX}; it is not a clip folder (write one with "
                              "train.data.write_clip_folder)") from None
        if index.get("format") != FORMAT:
            raise ConfigError(f"--data-dir {folder}: {INDEX} is not a {FORMAT!r} index")
        self.folder = os.path.abspath(folder)
        self.clips = list(index.get("clips", []))
        if not self.clips:
            raise ConfigError(f"--data-dir {folder}: the dataset is empty (no clips in {INDEX}); add clips first")
        self.ids = [c["id"] for c in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        entry = self.clips[int(index)]
        path = os.path.join(self.folder, entry["file"])
        try:
            with _NPZ_LOCK, np.load(path) as z:
                frames = z["frames"]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{path}: clip {entry['id']!r} cannot be read ({e}); rewrite the clip folder") from None
        return {"id": entry["id"], "frames": frames, "caption": entry.get("caption", "")}

    def __repr__(self) -> str:
        return f"ClipFolderSource({self.folder!r}, {len(self)} clips)"


def write_clip_folder(folder: str, clips: Iterable[Mapping]) -> str:
    """Write clips ({"id", "frames" uint8 [T, H, W, 3], "caption"}) as a `ClipFolderSource` folder."""
    os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
    entries = []
    for clip in clips:
        frames = np.asarray(clip["frames"])
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ConfigError(f"clip {clip['id']!r}: frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                              f"{frames.shape}")
        name = "clips/" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(clip["id"])) + ".npz"
        np.savez(os.path.join(folder, name), frames=frames)
        entries.append({"id": str(clip["id"]), "file": name, "caption": str(clip.get("caption", ""))})
    tmp = os.path.join(folder, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "clips": entries}, f, indent=1)
    os.replace(tmp, os.path.join(folder, INDEX))   # the index appears only once every clip is written
    return folder


def open_source(data_dir: str, *, frames: int | None = None, resolution: int | None = None) -> ClipSource:
    """The data source of --data-dir: a WebVid TFDS build (found by its `webvid_build.json`, see
    train/webvid.py) or a clip folder. A WebVid build's clips have one frame count and resolution: a run
    of others (`frames`, `resolution`) is refused here, before anything is written."""
    from . import webvid

    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir}: no such folder; build WebVid into it (`python -m train "
                          "build-webvid`) or write a clip folder (train.data.write_clip_folder)")
    if not os.path.exists(os.path.join(data_dir, INDEX)):
        if webvid.is_build(data_dir):
            return webvid.WebVidSource(data_dir, frames=frames, resolution=resolution)
        raise ConfigError(f"--data-dir {data_dir}: neither a WebVid build ({webvid.SUMMARY}) nor a clip folder "
                          f"({INDEX}); build one with `python -m train build-webvid` or write one with "
                          "train.data.write_clip_folder")
    return ClipFolderSource(data_dir)


# ----------------------------------------------------------------------------------------------------
# Per-example transform and the loader


def fit_frames(frames: np.ndarray, num_frames: int, resolution: int, what: str) -> np.ndarray:
    """The first `num_frames` frames, each scaled to cover resolution^2 (bicubic) and centre-cropped."""
    from storydiff_jax.pipelines.transition import fit_image

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(f"clip {what}: frames of shape {frames.shape}, expected [T, H, W, 3]")
    if frames.shape[0] < num_frames:
        raise ConfigError(f"clip {what}: {frames.shape[0]} frames, the run needs {num_frames}; use --frames "
                          f"{frames.shape[0]} or longer clips")
    frames = frames[:num_frames]
    if frames.shape[1:3] == (resolution, resolution):
        return np.ascontiguousarray(frames, np.uint8)
    return np.stack([fit_image(f, resolution, resolution) for f in frames])


class PrepareClip:
    """grain map: a source record -> {"id" str, "frames" [L, R, R, 3] uint8, "input_ids" int32 [77]}.

    The string id travels with the example (batched into a numpy string array) so that the loop can log
    exactly which examples each step consumed.
    """

    def __init__(self, num_frames: int, resolution: int, tokenizer):
        self.num_frames, self.resolution, self.tokenizer = num_frames, resolution, tokenizer

    def __call__(self, record: dict) -> dict:
        from storydiff_jax.models.clip_text import tokenize

        return {"frames": fit_frames(np.asarray(record["frames"]), self.num_frames, self.resolution, record["id"]),
                "input_ids": tokenize(self.tokenizer, [record["caption"]])[0].astype(np.int32),
                "id": np.asarray(str(record["id"]))}


def make_loader(source: ClipSource, *, per_host_batch: int, seed: int, num_frames: int, resolution: int,
                tokenizer, shard: tuple[int, int] | None = None,
                prepared: bool = False, workers: int = 0):
    """grain DataLoader: seeded shuffle, endless epochs, one shard per JAX process, per-host batches.

    Its iterator (`iter(loader)`) has get_state/set_state and is saved with the model
    (`grain.checkpoint.CheckpointSave`), so a resumed run continues with exactly the next example.
    `shard=(i, n)`: read shard i of n whatever this process is (what process i of an n-process run reads;
    a one-process run can so assemble the global batches of a multi-host run).
    `prepared`: the records are training examples already (a feature cache, train/features.py): batched
    as they are, over the same shuffled indices.
    `workers`: grain worker processes that read, decode (a WebVid build's JPEG / H.264 frames) and batch
    the records; 0 reads in this process. The batches are the same for any number (grain keeps the order).
    """
    import grain

    if len(source) == 0:
        raise ConfigError("the dataset is empty; add clips first")
    if shard is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    else:
        shard = grain.sharding.ShardOptions(shard_index=shard[0], shard_count=shard[1], drop_remainder=True)
    sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=True, num_epochs=None, seed=seed)
    prepare = PrepareClip(num_frames, resolution, tokenizer)
    if workers:
        from absl import flags

        # grain's worker pool reads its absl flags; a program not started by absl.app has parsed none, and
        # then every flag read raises. Their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()

    class Prepare(grain.transforms.Map):
        def map(self, record):
            return prepare(record)

    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[*([] if prepared else [Prepare()]),
                                        grain.transforms.Batch(per_host_batch, drop_remainder=True)],
                            worker_count=workers)
