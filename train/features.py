"""`python -m train cache-features`: the frozen encoders' outputs, computed once per clip, on one host or many.

The train step spends most of its forward pass on frozen networks whose outputs never change for a given
clip: the VAE encoder over every frame, CLIP vision over the first and last frames, the text encoder over
the caption. The cache stores what those networks give, *before anything is drawn at random*, in shards
of `--shard-size` clips (shard k holds rows k * size ... (k + 1) * size - 1 of the dataset):

    FOLDER/plan.json                               written first: what the cache is of (settings, model and
                                                   dataset identity, storage, shard size and count)
    FOLDER/latent_mean-00000-of-00003.npy          [n, L, h, w, C]  VAE posterior mean of every frame
    FOLDER/latent_logvar-00000-of-00003.npy        [n, L, h, w, C]  ... and its log-variance (clamped as in encode)
    FOLDER/image_feats-00000-of-00003.npy          [n, 2, T, D]     CLIP penultimate states of the first, last frame
    FOLDER/text_states-00000-of-00003.npy          [n, 77, W]       text-encoder states of the caption
    FOLDER/ids-00000-of-00003.npy                  [n]              the clip ids; renamed into place last: the
    ...                                                             shard is complete when it exists
    FOLDER/uncond_image.npy, empty_text.npy        [1, T, D], [77, W]: the all-zero image's and ""'s states
    FOLDER/ids.npy                                 [N] every id, in the source's order
    FOLDER/manifest.json                           written last: the cache is complete (the join of the shards)

These are exactly the arrays `Trainer.cached_conditioning` reads, nothing else (the encoders' outputs
before the posterior sample and the dropouts, which the step draws itself). Row i is the source's record i,
so a cached run with the same seed sees the same clips at every step as a raw run. Moments, not latents:
the raw step draws a fresh posterior sample each step with its own key, and the cached step does the same
from the moments with the same key and formula (tests/test_train_features.py compares the conditioning).

Storage follows the run's compute dtype: float32 for `--dtype float32` (exact: the cached step is the raw
step's computation), bfloat16 for `--dtype bfloat16` (the compact layout, half the bytes: the CLIP and text
states are bf16 outputs already, so they are exact; the VAE moments, which the VAE computes in float32,
are rounded to bf16, and the step samples from them in float32). bf16 is stored as its 16 bits (`uint16`
in the .npy); the manifest says so.

Several hosts (`--distributed`, or `--process-id/--num-processes` through jax.distributed): process i of n
writes the shards k with k % n == i; the process that completes the last shard joins them (constants,
ids.npy, manifest.json). A run that stops (Ctrl-C, SIGKILL, a lost host) leaves its finished shards; the
same command again skips them and writes the rest, on any number of hosts. A cache is byte-identical
whichever hosts wrote which shards.

A run given `--features FOLDER` checks the manifest against its own frames, resolution, compute dtype,
model (a hash of the frozen encoders' weights and configs and of the tokenizer) and dataset (clip count
and a hash of the ids) and refuses with one line naming both sides and the command that rebuilds it.
Plain `.npy` files read by offset (no memory maps, no open files kept: millions of clips in thousands of
shards, random access from grain's worker processes); caches of the earlier single-folder layout
(version 1) still read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np

from storydiff_jax.errors import ConfigError, StoryDiffError

from .config import TrainConfig
from .data import ClipSource, PrepareClip, open_source
from .step import CACHED_BATCH, FROZEN_ONLY, all_values

FORMAT = "storydiff-features"
VERSION = 2
MANIFEST = "manifest.json"
PLAN = "plan.json"
PER_CLIP = CACHED_BATCH                    # the batch keys of a cached step
CONSTANTS = ("uncond_image", "empty_text")
DEFAULT_SHARD_SIZE = 4096


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


def shard_name(key: str, k: int, shards: int) -> str:
    return f"{key}-{k:05d}-of-{shards:05d}.npy"


def storage_dtype(cfg: TrainConfig) -> str:
    return "bfloat16" if cfg.dtype == "bfloat16" else "float32"


def _to_storage(x, storage: str) -> np.ndarray:
    if storage == "bfloat16":
        import ml_dtypes

        return np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(x, np.float32)


def _save(folder: str, name: str, array: np.ndarray) -> None:
    """np.save under a temporary name, then renamed: a reader (or another host) never sees half a file."""
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, os.path.join(folder, name))


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _prepare_out(out: str, plan: dict, overwrite: bool, first: bool) -> bool:
    """Check `out` against the plan (every process, the same answer); the first process clears it (with
    --overwrite) and writes the plan. True: this call created the folder."""
    manifest, theirs = _read_json(os.path.join(out, MANIFEST)), _read_json(os.path.join(out, PLAN))
    exists = os.path.exists(out) and (not os.path.isdir(out) or bool(os.listdir(out)))
    resumable = manifest is None and theirs == plan
    if exists and not resumable and not overwrite:
        if manifest is not None or theirs is None:
            raise ConfigError(f"--out {out} exists; choose a new folder or pass --overwrite to replace it")
        diff = sorted(k for k in set(plan) | set(theirs) if plan.get(k) != theirs.get(k))
        raise ConfigError(f"--out {out} holds an unfinished cache of other settings ({', '.join(diff)} differ); rerun "
                          "that cache's command to finish it, or pass --overwrite to start this one")
    if not first:
        return False
    created = not os.path.exists(out)
    if exists and not resumable:   # --overwrite
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        created = True
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, PLAN), plan)
    return created


def write_features(cfg: TrainConfig, out: str, *, overwrite: bool = False, progress: bool = True, log=print,
                   shard_size: int = DEFAULT_SHARD_SIZE, on_shard=None) -> dict | None:
    """Compute the cache of `cfg.data_dir` for `cfg` (model, frames, resolution, dtype; batch_size clips per
    jitted call, sharded over this process's devices) into `out`: this process's shards (all of them in a
    one-process run), then, if no shard is missing any more, the join. Returns the manifest, or None when
    other processes still have shards to write. Resumes an unfinished cache of the same plan.

    Several processes: call `jax.distributed.initialize` first; process i writes the shards k % n == i.
    `on_shard(k)` is called after each shard this process wrote (progress, tests).
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from storydiff_jax.pipelines.video_components import load_video_components, load_video_config
    from storydiff_jax.sharding import DATA, FSDP, make_mesh, put_sharded

    from .step import Trainer, check_settings, split_params

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size!r}: must be a whole number of clips >= 1")
    source = open_source(cfg.data_dir, frames=cfg.frames, resolution=cfg.resolution)
    config = load_video_config(cfg.model)
    check_settings(cfg, config)
    if os.path.abspath(out) == os.path.abspath(cfg.data_dir):
        raise ConfigError(f"--out {out} is the data folder itself; choose another folder")
    components = load_video_components(cfg.model)
    n = len(source)
    shards = -(-n // shard_size)
    storage = storage_dtype(cfg)
    plan = {"format": FORMAT, "version": VERSION, "frames": cfg.frames, "resolution": cfg.resolution,
            "model": {"name": cfg.model if model_flag(cfg.model).startswith("--preset") else
                      os.path.abspath(cfg.model), "dtype": cfg.dtype, "fingerprint": model_fingerprint(components)},
            "dataset": {"data_dir": os.path.abspath(cfg.data_dir), **dataset_identity(source)},
            "storage": storage, "shard_size": shard_size, "shards": shards}
    index, count = jax.process_index(), jax.process_count()
    created = _prepare_out(out, plan, overwrite, first=index == 0)
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("cache-features: plan written")
        _prepare_out(out, plan, overwrite=False, first=False)   # every host sees process 0's plan

    _, frozen, config = split_params(components, cfg, smp_from_model=False, only=FROZEN_ONLY)
    trainer = Trainer.build(cfg, config, components.tokenizer)
    devices = jax.local_devices()
    per_call = -(-cfg.batch_size // len(devices)) * len(devices)   # every device gets the same share
    mesh = make_mesh({DATA: len(devices), FSDP: 1}, devices)
    replicated = NamedSharding(mesh, P())
    frozen = put_sharded(frozen, jax.tree.map(lambda _: replicated, frozen))
    # Kept with the trainer's programs: a later cache of the same shapes in this process reuses them.
    encode = trainer.programs.setdefault("encode_features", jax.jit(trainer.encode_features))
    prepare = PrepareClip(cfg.frames, cfg.resolution, components.tokenizer)

    def complete(k):
        return os.path.exists(os.path.join(out, shard_name("ids", k, shards)))

    mine = [k for k in range(shards) if k % count == index]
    todo = [k for k in mine if not complete(k)]
    if len(todo) < len(mine):
        log(f"resuming {out}: {len(mine) - len(todo)} of this process's {len(mine)} shards are done already")
    from tqdm import tqdm

    bar = tqdm(total=sum(min(n, (k + 1) * shard_size) - k * shard_size for k in todo), desc="cache features",
               unit="clip", disable=not progress, dynamic_ncols=True)
    try:
        for k in todo:
            _write_shard(out, k, shards, range(k * shard_size, min(n, (k + 1) * shard_size)), source, prepare,
                         encode, frozen, mesh, per_call, storage, bar)
            if on_shard is not None:
                on_shard(k)
    except StoryDiffError:
        if created and count == 1:   # bad data: nothing to resume (the data must change); leave nothing
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        bar.close()
    if not all(complete(k) for k in range(shards)):
        log(f"wrote this process's {len(mine)} shards of {out}; the process that writes the last of the "
            f"{shards} finishes the cache")
        return None
    constants = trainer.programs.setdefault("constant_features", jax.jit(trainer.constant_features))
    manifest = _join(out, plan, jax.device_get(constants(frozen)))
    per_clip = sum(np.prod(v["shape"][1:]) * np.dtype(np.uint16 if storage == "bfloat16" else np.float32).itemsize
                   for k, v in manifest["arrays"].items() if k in PER_CLIP)
    log(f"cached features of {n} clips ({cfg.frames} frames, {cfg.resolution}px, {cfg.model}, {cfg.dtype}; "
        f"{per_clip / 1024:.1f} KiB per clip in {storage}, {shards} shards) in {out}")
    return manifest


def _write_shard(out, k, shards, rows, source, prepare, encode, frozen, mesh, per_call, storage, bar):
    """Rows `rows` through the encoders into shard k: arrays under temporary names, renamed when all are
    written, the ids last (the shard's completion mark)."""
    import jax

    from .step import global_batch

    tmp = {key: os.path.join(out, f".{shard_name(key, k, shards)}.partial") for key in PER_CLIP}
    arrays: dict[str, np.ndarray] = {}
    ids: list[str] = []
    try:
        for start in range(rows.start, rows.stop, per_call):
            records = [prepare(source[i]) for i in range(start, min(rows.stop, start + per_call))]
            ids += [str(r["id"]) for r in records]
            m = len(records)
            records += records[-1:] * (per_call - m)   # pad the last call: one program shape
            local = {key: np.stack([r[key] for r in records]) for key in ("frames", "input_ids")}
            feats = jax.device_get(encode(frozen, global_batch(local, mesh)))
            for key in PER_CLIP:
                value = _to_storage(feats[key][:m], storage)
                if key not in arrays:
                    arrays[key] = np.lib.format.open_memmap(tmp[key], mode="w+", dtype=value.dtype,
                                                            shape=(len(rows), *value.shape[1:]))
                arrays[key][start - rows.start:start - rows.start + m] = value
            bar.update(m)
        for a in arrays.values():
            a.flush()
        arrays.clear()   # close the memory maps before the files are renamed
        for key in PER_CLIP:
            os.replace(tmp[key], os.path.join(out, shard_name(key, k, shards)))
        _save(out, shard_name("ids", k, shards), np.asarray(ids, dtype=str))
    finally:
        arrays.clear()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)


def _join(out: str, plan: dict, constants: dict) -> dict:
    """The constants, every id, and the manifest (written last); by whichever process completed the cache
    (two of them at once write the same bytes)."""
    shards, storage = plan["shards"], plan["storage"]
    dtypes, shapes = {}, {}
    for key in CONSTANTS:
        dtypes[key], shapes[key] = str(constants[key].dtype), list(constants[key].shape)
        _save(out, f"{key}.npy", _to_storage(constants[key], storage))
    ids = np.concatenate([np.load(os.path.join(out, shard_name("ids", k, shards))) for k in range(shards)])
    _save(out, "ids.npy", ids)
    for key in PER_CLIP:
        specs = [_npy_spec(os.path.join(out, shard_name(key, k, shards))) for k in range(shards)]
        shapes[key] = [sum(s[1] for s in specs), *specs[0][2]]
    dtypes.update(_output_dtypes(plan))
    manifest = {**plan, "arrays": {key: {"shape": shapes[key], "dtype": dtypes[key]} for key in (*PER_CLIP,
                                                                                                  *CONSTANTS)}}
    _write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _output_dtypes(plan: dict) -> dict:
    """The dtypes the encoders give (what the step is fed): the VAE keeps float32 whatever the compute
    dtype (its config forces it), CLIP and the text encoder compute in the run's dtype."""
    compute = "bfloat16" if plan["model"]["dtype"] == "bfloat16" else "float32"
    return {"latent_mean": "float32", "latent_logvar": "float32", "image_feats": compute, "text_states": compute}


# ----------------------------------------------------------------------------------------------------
# Reading


def _npy_spec(path: str) -> tuple[int, int, tuple[int, ...], np.dtype]:
    """(data offset, rows, row shape, dtype) of an .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f"{path}: Fortran order")
        return f.tell(), shape[0], tuple(shape[1:]), dtype


def _read_row(spec: tuple, j: int) -> np.ndarray:
    path, offset, shape, dtype = spec
    size = int(np.prod(shape)) * dtype.itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset + j * size)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ConfigError(f"{path}: row {j} is cut short; the cache is damaged: rebuild it with "
                          "`python -m train cache-features`")
    return np.frombuffer(data, dtype).reshape(shape)


class FeatureCache:
    """A cache folder as a random-access source: cache[i] -> {"id", latent_mean, latent_logvar,
    image_feats, text_states} (what `Trainer.cached_conditioning` takes: bf16 as stored in a compact cache,
    else at the encoders' dtypes); read with `data.make_loader(cache, ..., prepared=True)`: the same seeded
    shuffle over the same indices as a raw run, so the same clips at every step."""

    def __init__(self, folder: str):
        manifest = _read_json(os.path.join(folder, MANIFEST))
        if manifest is None:
            plan = _read_json(os.path.join(folder, PLAN))
            if plan is not None and plan.get("format") == FORMAT:
                raise ConfigError(f"--features {folder}: the cache is unfinished (shards still missing); rerun its "
                                  "`python -m train cache-features` command to finish it")
            raise ConfigError(f"--features {folder}: no readable {MANIFEST}; write a cache with "
                              "`python -m train cache-features`")
        if manifest.get("format") != FORMAT or manifest.get("version") not in (1, VERSION):
            raise ConfigError(f"--features {folder}: not a {FORMAT} v1/v{VERSION} cache (format "
                              f"{manifest.get('format')!r} v{manifest.get('version')}); rebuild it with "
                              "`python -m train cache-features`")
        self.folder, self.manifest = folder, manifest
        self.dtypes = {k: _np_dtype(v["dtype"]) for k, v in manifest["arrays"].items()}
        self.storage = manifest.get("storage", "float32")   # version 1: float32 in one file per array
        version1 = manifest["version"] == 1
        shards = 1 if version1 else manifest["shards"]
        try:
            # Headers parsed here, in one thread (numpy's header parser is not thread-safe, see data._NPZ_LOCK);
            # rows are then read by offset.
            self.files = {k: [(os.path.join(folder, f"{k}.npy" if version1 else shard_name(k, s, shards)),
                               *_npy_spec(os.path.join(folder, f"{k}.npy" if version1 else
                                                       shard_name(k, s, shards)))) for s in range(shards)]
                          for k in PER_CLIP}
            self.constants = {k: self._stored(np.load(os.path.join(folder, f"{k}.npy")), k) for k in CONSTANTS}
            self.ids = np.load(os.path.join(folder, "ids.npy"), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"--features {folder}: the cache is incomplete ({e}); rebuild it with "
                              "`python -m train cache-features`") from None
        rows = [f[2] for f in self.files[PER_CLIP[0]]]
        self.starts = np.cumsum([0, *rows]).tolist()
        for k, files in self.files.items():
            shape = [self.starts[-1], *files[0][3]]
            if [f[2] for f in files] != rows or shape != manifest["arrays"][k]["shape"] or len(self.ids) != shape[0]:
                raise ConfigError(f"--features {folder}: {k} has shape {shape} in shards of {[f[2] for f in files]} "
                                  f"rows, the manifest says {manifest['arrays'][k]['shape']}; rebuild it with "
                                  "`python -m train cache-features`")
        # (path, offset, row shape, dtype as stored) per shard and array.
        self.specs = {k: [(f[0], f[1], f[3], f[4]) for f in files] for k, files in self.files.items()}

    def _stored(self, value: np.ndarray, key: str) -> np.ndarray:
        """bf16 bits as bf16 (a compact cache, fed to the step as they are); float32 at the encoder's dtype."""
        if self.storage == "bfloat16":
            import ml_dtypes

            return value.view(ml_dtypes.bfloat16)
        return value.astype(self.dtypes[key])

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"feature cache row {i} of {len(self)}")
        s = bisect.bisect_right(self.starts, i) - 1
        return {"id": np.asarray(str(self.ids[i])),
                **{k: self._stored(_read_row(specs[s], i - self.starts[s]), k) for k, specs in self.specs.items()}}

    def bytes_per_clip(self) -> int:
        return sum(int(np.prod(specs[0][2])) * specs[0][3].itemsize for specs in self.specs.values())

    def __getstate__(self):
        return {**self.__dict__, "ids": None, "_ids_path": os.path.join(self.folder, "ids.npy")}

    def __setstate__(self, state):
        path = state.pop("_ids_path")
        self.__dict__.update(state)
        self.ids = np.load(path, mmap_mode="r")

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
