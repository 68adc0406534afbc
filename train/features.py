"""`python -m train cache-features`: the frozen encoders' outputs, computed once per clip.

The train step spends most of its forward pass on frozen networks whose outputs never change for a given
clip: the VAE encoder over every frame, CLIP vision over the first and last frames, the text encoder over
the caption. The cache stores what those networks give, *before anything is drawn at random*:

    FOLDER/manifest.json          format, version, frames, resolution, model and dataset identity, arrays
    FOLDER/latent_mean.npy        float32 [N, L, h, w, C]   VAE posterior mean of every frame (unscaled)
    FOLDER/latent_logvar.npy      float32 [N, L, h, w, C]   ... and its log-variance (clamped as in encode)
    FOLDER/image_feats.npy        float32 [N, 2, T, D]      CLIP penultimate states of the first, last frame
    FOLDER/text_states.npy        float32 [N, 77, W]        text-encoder states of the caption
    FOLDER/uncond_image.npy       float32 [1, T, D]         CLIP states of the all-zero image (constant)
    FOLDER/empty_text.npy         float32 [77, W]           text states of "" (constant)
    FOLDER/ids.npy                str [N]                   the clip ids, in the source's order

Row i is the source's record i, so a cached run with the same seed sees the same clips at every step as a
raw run. Moments, not latents: the raw step draws a fresh posterior sample each step with its own key, and
`Trainer.cached_conditioning` does the same from the moments with the same key and formula, so the cached
step is the same computation (tests/test_train_features.py compares the conditioning both build). Values are
stored as float32 (exact for bfloat16 encoders too); the manifest records the encoders' output dtypes and
the reader casts back to them.

A run given `--features FOLDER` checks the manifest against its own frames, resolution, compute dtype,
model (a hash of the frozen encoders' weights and configs and of the tokenizer) and dataset (clip count
and a hash of the ids) and refuses with one line naming both sides and the command that rebuilds it.
Plain `.npy` files, memory-mapped: random access for grain, no extra dependency.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from storydiff_jax.errors import ConfigError

from .config import TrainConfig
from .data import ClipSource, PrepareClip, open_source
from .step import CACHED_BATCH, FROZEN_ONLY, all_values

FORMAT = "storydiff-features"
VERSION = 1
MANIFEST = "manifest.json"
PER_CLIP = CACHED_BATCH                    # the batch keys of a cached step
CONSTANTS = ("uncond_image", "empty_text")


# ----------------------------------------------------------------------------------------------------
# Identities


def _digest(h) -> str:
    return h.hexdigest()[:16]


def model_fingerprint(components) -> str:
    """Hash of everything the cached values depend on in the model: the frozen encoders' configs and
    weights and the tokenizer's vocabulary and merges (float32 weights: a few seconds at SD1.5 size)."""
    import dataclasses

    h = hashlib.blake2b(digest_size=16)
    for name in FROZEN_ONLY:
        h.update(json.dumps([name, dataclasses.asdict(components.config.component_config(name))], sort_keys=True,
                            default=str).encode())
        for path, value in sorted(all_values(getattr(components, name)).items()):
            value = np.ascontiguousarray(np.asarray(value))
            h.update(f"{path}:{value.dtype}:{value.shape}".encode())
            h.update(value.tobytes())
    tok = components.tokenizer
    vocab = sorted(getattr(tok, "vocab", {}).items())
    merges = sorted(getattr(tok, "ranks", {}).items(), key=lambda kv: kv[1])
    h.update(json.dumps([vocab, merges, [getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")]]).encode())
    return _digest(h)


def source_ids(source: ClipSource) -> list[str]:
    """The clip ids in the source's order (sources that list them say so with `ids`; others are read)."""
    ids = getattr(source, "ids", None)
    if ids is None:
        ids = [source[i]["id"] for i in range(len(source))]
    return [str(i) for i in ids]


def dataset_identity(source: ClipSource) -> dict:
    """Clip count and a hash identifying the dataset: the source's own `fingerprint()` when it has one (a
    WebVid build: its build summary, so a run never reads millions of records to check its cache), else a
    hash of the ids in order."""
    fingerprint = getattr(source, "fingerprint", None)
    if fingerprint is not None:
        return {"clips": len(source), "ids_hash": fingerprint()}
    h = hashlib.blake2b(digest_size=16)
    for i in source_ids(source):
        h.update(i.encode() + b"\n")
    return {"clips": len(source), "ids_hash": _digest(h)}


def model_flag(model: str) -> str:
    from storydiff_jax.pipelines.video_components import PRESETS

    return f"--preset {model}" if model in PRESETS else f"--model {model}"


def rebuild_command(cfg: TrainConfig, folder: str) -> str:
    return (f"python -m train cache-features --data-dir {cfg.data_dir} --out {folder} {model_flag(cfg.model)} "
            f"--frames {cfg.frames} --resolution {cfg.resolution} --dtype {cfg.dtype}")


# ----------------------------------------------------------------------------------------------------
# Writing


def write_features(cfg: TrainConfig, out: str, *, overwrite: bool = False, progress: bool = True,
                   log=print) -> dict:
    """Compute the cache of `cfg.data_dir` for `cfg` (model, frames, resolution, dtype; batch_size clips per
    jitted call, sharded over this process's devices) into `out`, all or nothing. Returns the manifest."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from storydiff_jax.outputs import staged_folder
    from storydiff_jax.pipelines.video_components import load_video_components, load_video_config
    from storydiff_jax.sharding import DATA, FSDP, make_mesh, put_sharded

    from .step import Trainer, check_settings, global_batch, split_params

    source = open_source(cfg.data_dir, frames=cfg.frames, resolution=cfg.resolution)
    config = load_video_config(cfg.model)
    check_settings(cfg, config)
    if os.path.exists(out) and not overwrite:
        raise ConfigError(f"--out {out} exists; choose a new folder or pass --overwrite to replace it")
    if os.path.abspath(out) == os.path.abspath(cfg.data_dir):
        raise ConfigError(f"--out {out} is the data folder itself; choose another folder")
    components = load_video_components(cfg.model)
    fingerprint = model_fingerprint(components)
    _, frozen, config = split_params(components, cfg, smp_from_model=False, only=FROZEN_ONLY)
    trainer = Trainer.build(cfg, config, components.tokenizer)
    devices = jax.local_devices()
    per_call = -(-cfg.batch_size // len(devices)) * len(devices)   # every device gets the same share
    mesh = make_mesh({DATA: len(devices), FSDP: 1}, devices)
    replicated = NamedSharding(mesh, P())
    frozen = put_sharded(frozen, jax.tree.map(lambda _: replicated, frozen))
    # Kept with the trainer's programs: a later cache of the same shapes in this process reuses them.
    encode = trainer.programs.setdefault("encode_features", jax.jit(trainer.encode_features))
    constants = trainer.programs.setdefault("constant_features", jax.jit(trainer.constant_features))
    prepare = PrepareClip(cfg.frames, cfg.resolution, components.tokenizer)
    n = len(source)
    ids: list[str] = []
    dtypes: dict[str, str] = {}
    from tqdm import tqdm

    with staged_folder(out) as tmp:
        arrays: dict[str, np.ndarray] = {}
        bar = tqdm(total=n, desc="cache features", unit="clip", disable=not progress, dynamic_ncols=True)
        try:
            for start in range(0, n, per_call):
                records = [prepare(source[i]) for i in range(start, min(n, start + per_call))]
                ids += [str(r["id"]) for r in records]
                records += records[-1:] * (per_call - len(records))   # pad the last call: one program shape
                local = {k: np.stack([r[k] for r in records]) for k in ("frames", "input_ids")}
                feats = jax.device_get(encode(frozen, global_batch(local, mesh)))
                m = min(n - start, per_call)
                for k in PER_CLIP:
                    if k not in arrays:
                        dtypes[k] = str(feats[k].dtype)
                        arrays[k] = np.lib.format.open_memmap(os.path.join(tmp, f"{k}.npy"), mode="w+",
                                                              dtype=np.float32, shape=(n, *feats[k].shape[1:]))
                    arrays[k][start:start + m] = np.asarray(feats[k][:m], np.float32)
                bar.update(m)
        finally:
            bar.close()
        for a in arrays.values():
            a.flush()
        shapes = {k: list(a.shape) for k, a in arrays.items()}
        arrays.clear()   # close the memory maps before the folder is renamed
        consts = jax.device_get(constants(frozen))
        for k in CONSTANTS:
            dtypes[k] = str(consts[k].dtype)
            shapes[k] = list(consts[k].shape)
            np.save(os.path.join(tmp, f"{k}.npy"), np.asarray(consts[k], np.float32))
        np.save(os.path.join(tmp, "ids.npy"), np.asarray(ids, dtype=str))
        manifest = {"format": FORMAT, "version": VERSION, "frames": cfg.frames, "resolution": cfg.resolution,
                    "model": {"name": cfg.model if model_flag(cfg.model).startswith("--preset") else
                              os.path.abspath(cfg.model), "dtype": cfg.dtype, "fingerprint": fingerprint},
                    "dataset": {"data_dir": os.path.abspath(cfg.data_dir), **dataset_identity(source)},
                    "arrays": {k: {"shape": shapes[k], "dtype": dtypes[k]} for k in (*PER_CLIP, *CONSTANTS)}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
    log(f"cached features of {n} clips ({cfg.frames} frames, {cfg.resolution}px, {cfg.model}, {cfg.dtype}) in {out}")
    return manifest


# ----------------------------------------------------------------------------------------------------
# Reading


class FeatureCache:
    """A cache folder as a random-access source: cache[i] -> {"id", latent_mean, latent_logvar,
    image_feats, text_states} at the encoders' dtypes (what `Trainer.cached_conditioning` takes); read
    with `data.make_loader(cache, ..., prepared=True)`: the same seeded shuffle over the same indices as a
    raw run, so the same clips at every step."""

    def __init__(self, folder: str):
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            raise ConfigError(f"--features {folder}: no readable {MANIFEST}; write a cache with "
                              "`python -m train cache-features`") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ConfigError(f"--features {folder}: not a {FORMAT} v{VERSION} cache (format "
                              f"{manifest.get('format')!r} v{manifest.get('version')}); rebuild it with "
                              "`python -m train cache-features`")
        self.folder, self.manifest = folder, manifest
        self.dtypes = {k: _np_dtype(v["dtype"]) for k, v in manifest["arrays"].items()}
        try:
            # Opened here, in one thread: numpy's header parsing is not thread-safe (see data._NPZ_LOCK).
            self.arrays = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in PER_CLIP}
            self.constants = {k: np.load(os.path.join(folder, f"{k}.npy")).astype(self.dtypes[k]) for k in CONSTANTS}
            self.ids = [str(i) for i in np.load(os.path.join(folder, "ids.npy"))]
        except (OSError, ValueError) as e:
            raise ConfigError(f"--features {folder}: the cache is incomplete ({e}); rebuild it with "
                              "`python -m train cache-features`") from None
        for k, a in self.arrays.items():
            if list(a.shape) != manifest["arrays"][k]["shape"] or len(a) != len(self.ids):
                raise ConfigError(f"--features {folder}: {k}.npy has shape {list(a.shape)}, the manifest says "
                                  f"{manifest['arrays'][k]['shape']}; rebuild it with "
                                  "`python -m train cache-features`")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        return {"id": np.asarray(self.ids[i]),
                **{k: np.asarray(a[i]).astype(self.dtypes[k]) for k, a in self.arrays.items()}}

    def __repr__(self) -> str:
        # grain checks a resumed iterator's source by its repr: it must not depend on the object's address.
        return f"FeatureCache({os.path.abspath(self.folder)!r}, {len(self)} clips)"

    # -- checks against a run (one line each: both values and the fix) --

    def check_run(self, cfg: TrainConfig, source: ClipSource) -> None:
        """Frames, resolution, compute dtype and dataset; cheap, before the model is loaded."""
        m, fix = self.manifest, f"rerun `{rebuild_command(cfg, self.folder)}`"
        if (m["frames"], m["resolution"]) != (cfg.frames, cfg.resolution):
            raise ConfigError(f"--features {self.folder}: cached features are for --frames {m['frames']} "
                              f"--resolution {m['resolution']}, this run has --frames {cfg.frames} --resolution "
                              f"{cfg.resolution}; {fix} or use the cache's settings")
        if m["model"]["dtype"] != cfg.dtype:
            raise ConfigError(f"--features {self.folder}: cached features were computed in {m['model']['dtype']}, "
                              f"this run has --dtype {cfg.dtype}; {fix}")
        mine, theirs = dataset_identity(source), m["dataset"]
        if (mine["clips"], mine["ids_hash"]) != (theirs["clips"], theirs["ids_hash"]):
            raise ConfigError(f"--features {self.folder}: cached features are of {theirs['data_dir']} "
                              f"({theirs['clips']} clips, ids {theirs['ids_hash']}), --data-dir {cfg.data_dir} "
                              f"has {mine['clips']} clips (ids {mine['ids_hash']}); {fix}")

    def check_model(self, cfg: TrainConfig, components) -> None:
        theirs, mine = self.manifest["model"], model_fingerprint(components)
        if theirs["fingerprint"] != mine:
            raise ConfigError(f"--features {self.folder}: cached features are of model {theirs['name']} (encoders "
                              f"{theirs['fingerprint']}), this run's {model_flag(cfg.model)} has encoders {mine}; "
                              f"rerun `{rebuild_command(cfg, self.folder)}`")

    # -- what the run uses --

    def frozen(self, frozen: dict) -> dict:
        """The run's frozen params without the encoders (never put on the devices), plus the constants."""
        out = {k: v for k, v in frozen.items() if k not in FROZEN_ONLY}
        out["features"] = dict(self.constants)
        return out

def _np_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))


def open_features(cfg: TrainConfig, source: ClipSource | None = None) -> FeatureCache:
    """The cache of `cfg.features`, checked against the run's frames, resolution, dtype and dataset."""
    if not os.path.isdir(cfg.features):
        raise ConfigError(f"--features {cfg.features}: no such folder; write it with "
                          f"`{rebuild_command(cfg, cfg.features)}`")
    cache = FeatureCache(cfg.features)
    if source is None:
        source = open_source(cfg.data_dir, frames=cfg.frames, resolution=cfg.resolution)
    cache.check_run(cfg, source)
    return cache
