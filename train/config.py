"""The settings of one training run, and the rule that a workdir belongs to exactly one run."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn.remat import REMAT_MODES

RUN_FILE = "run.json"
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")
# Settings that may change between a run and its resumption: where it runs and how it reports, never
# what it computes.
# Rematerialisation changes what is kept in memory, not the values (equal to float rounding, like a new mesh).
RESUMABLE_CHANGES = ("mesh", "remat", "save_every", "keep", "log_every", "fsdp_min_size")


@dataclass(frozen=True)
class TrainConfig:
    model: str                      # preset name (`tiny-video`, `video`) or a `python -m convert video` folder
    data_dir: str
    features: str = ""              # a `python -m train cache-features` folder of data_dir ("": encode in-step)
    steps: int = 1000
    batch_size: int = 8             # global, over all hosts and devices
    frames: int = 16                # L: frames per clip; the SMP sees the first and last
    resolution: int = 256
    lr: float = 1e-4                # the paper's
    warmup: int = 100
    schedule: str = "cosine"        # after warmup: cosine decay to 0 at `steps`, or constant
    weight_decay: float = 1e-2
    clip_norm: float = 1.0          # global-norm gradient clipping
    text_drop: float = 0.1          # classifier-free guidance: caption -> "" with this probability
    image_drop: float = 0.1         # ... and the frames' image tokens -> the unconditional tokens
    freeze_motion: bool = False     # keep AnimateDiff's motion modules fixed
    dtype: str = "float32"          # compute dtype; trainable (master) params stay float32
    remat: str = "blocks"           # activation checkpoints in the U-Net's blocks: none | blocks | full
    seed: int = 0
    data_workers: int = 0           # grain processes reading and decoding clips (0: grain's threads, this process)
    mesh: str = "data=auto"
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    fsdp_min_size: int = 1 << 18    # params with at least this many elements shard over `fsdp`

    def __post_init__(self):
        positive = ("steps", "batch_size", "resolution", "save_every", "keep", "log_every", "fsdp_min_size")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number, got "
                                  f"{getattr(self, name)!r}")
        if self.frames < 2:
            raise ConfigError(f"--frames {self.frames}: a transition needs at least 2 frames (start and end)")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"--remat {self.remat!r} is not one of {', '.join(REMAT_MODES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("text_drop", "image_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a probability in [0, 1], got "
                                  f"{getattr(self, name)}")
        if self.clip_norm <= 0:
            raise ConfigError(f"--clip-norm must be > 0, got {self.clip_norm}")
        if isinstance(self.data_workers, bool) or not isinstance(self.data_workers, int) or self.data_workers < 0:
            raise ConfigError(f"--data-workers must be a whole number >= 0, got {self.data_workers!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The settings that define what the run computes (a resumed run must match them all)."""
        d = self.to_dict()
        for k in RESUMABLE_CHANGES:
            d.pop(k)
        if not _is_preset(self.model):
            d["model"] = os.path.abspath(self.model)
        d["data_dir"] = os.path.abspath(self.data_dir)
        # Whether (and which) cached features feed the step; None for in-step encoders, which is also what
        # run.json files written before the cache existed give.
        d["features"] = os.path.abspath(self.features) if self.features else None
        # grain batches within each worker, so the worker count is part of which clips each step sees; 0 is
        # None, what run.json files written before the option existed give.
        d["data_workers"] = self.data_workers or None
        return d


def _is_preset(model: str) -> bool:
    from storydiff_jax.pipelines.video_components import PRESETS

    return model in PRESETS


def claim_workdir(workdir: str, config: TrainConfig) -> bool:
    """Write run.json into a new workdir, or check that an existing one is this run's. True: it existed."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)["identity"]
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"--workdir {workdir}: {RUN_FILE} is unreadable; use a new --workdir") from None
        mine = config.identity()
        diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])
            raise ConfigError(f"--workdir {workdir} holds another run ({shown}); use a new --workdir or the same "
                              "settings to resume")
        return True
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"identity": config.identity(), "config": config.to_dict()}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return False


def read_run(workdir: str) -> TrainConfig:
    """The config a workdir was trained with (for export)."""
    path = os.path.join(workdir, RUN_FILE)
    try:
        with open(path) as f:
            run = json.load(f)
        d, identity = run["config"], run["identity"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"--workdir {workdir}: no readable {RUN_FILE}; is it a `python -m train smp` workdir?") \
            from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    # Paths as resolved when the run started (the identity holds them absolute): export may run elsewhere.
    d = {**d, "model": identity["model"], "data_dir": identity["data_dir"], "features": identity.get("features") or ""}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})
