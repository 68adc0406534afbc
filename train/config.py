"""The settings of one training run, and the rule that a workdir belongs to exactly one run."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from storydiff_jax.errors import ConfigError
from storydiff_jax.nn.remat import REMAT_MODES
from storydiff_jax.options import Options, option

RUN_FILE = "run.json"
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")
# Settings that may change between a run and its resumption: where it runs and how it reports, never
# what it computes.
# Rematerialisation changes what is kept in memory, not the values (equal to float rounding, like a new mesh).
RESUMABLE_CHANGES = ("mesh", "remat", "save_every", "keep", "log_every", "fsdp_min_size")


@dataclass(frozen=True)
class TrainConfig(Options):
    """One training run's settings, declared once: `python -m train smp` (and `cache-features`, a subset) generate
    their flags from these fields (`storydiff_jax.options`), `run.json` stores them, resuming compares them."""
    model: str = option(help="preset name (tiny-video, video) or a `python -m convert video` folder",
                        flag=None)   # given by --model / --preset (one of the two)
    data_dir: str = option(help="clip folder (index.json + clips/*.npz) or WebVid build")
    features: str = option("", "feature cache of --data-dir (`python -m train cache-features`): the step reads the "
                           "frozen encoders' outputs from it instead of running them", metavar="CACHE_DIR")
    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(8, "global batch, over all devices and hosts")
    frames: int = option(16, "frames per clip (L); the SMP sees the first and last")
    resolution: int = option(256, "square frame side (a multiple of the latent stride)")
    lr: float = option(1e-4, "peak learning rate (the paper's)")
    warmup: int = option(100, "linear warmup steps")
    schedule: str = option("cosine", "after warmup: cosine decay to 0 at --steps, or constant", choices=SCHEDULES)
    weight_decay: float = option(1e-2, "AdamW weight decay")
    clip_norm: float = option(1.0, "global-norm gradient clipping")
    text_drop: float = option(0.1, "probability of an empty caption (classifier-free guidance)")
    image_drop: float = option(0.1, "probability of the unconditional image tokens (classifier-free guidance)")
    freeze_motion: bool = option(False, "keep AnimateDiff's motion modules fixed (train the SMP, image projection "
                                 "and IP layers only)")
    dtype: str = option("float32", "compute dtype (trained params stay float32)", choices=DTYPES)
    remat: str = option("blocks", "activation checkpoints in the U-Net's resnets, transformers and motion modules: "
                        "none (keep everything: fastest, needs ~2x (256²) to ~5x (512²) the memory of blocks), blocks "
                        "(keep block inputs, matmul and conv outputs; recompute the rest and attention logits in "
                        "query blocks), full (keep only block inputs). The same values either way; may change when "
                        "resuming (docs/bench_train.md: what fits which chip)", choices=REMAT_MODES)
    seed: int = option(0, "seed of the initialisation, the noise and the data order")
    data_workers: int = option(0, "grain worker processes that read and decode the clips (JPEG / H.264 builds: see "
                               "bench/input.py for how many a device needs); 0 = grain's threads in this process. "
                               "Which clips a step sees depends on it, so a resumed run keeps it")
    mesh: str = option("data=auto", "device mesh, e.g. data=8 or data=2,fsdp=4 (data=auto: all devices on data)")
    save_every: int = option(500, "checkpoint every N steps", metavar="N")
    keep: int = option(3, "checkpoints kept")
    log_every: int = option(10, "metrics every N steps", metavar="N")
    fsdp_min_size: int = option(1 << 18, "arrays of at least N elements (weights, Adam moments) shard over the mesh's "
                                "fsdp axis; the rest are replicated", metavar="N", default_text="2^18")

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
