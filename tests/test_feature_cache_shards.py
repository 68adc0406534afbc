"""The sharded, compact feature cache (`python -m train cache-features --shard-size --distributed`), tiny-video
preset, 64x64, 4 frames, 5 clips in shards of 2 (the last holds one), --dtype bfloat16 (the compact layout).

  * two processes (`--distributed`, jax.distributed over localhost, one CPU device each) write the same cache
    as one process, byte for byte, every file;
  * a run stopped after its first shard (and a shard file half-written, as a SIGKILL leaves it) resumes
    with the same command: the finished shard is not redone, the result equals the uninterrupted cache;
    an unfinished cache is refused by readers, and by a run of other settings;
  * the compact layout holds exactly what the cached step reads, in bf16: the CLIP and text states bit-equal
    to the encoders' bf16 outputs, the VAE moments within bf16 rounding of their float32 values, half the
    bytes of float32 storage, and the cached step's conditioning from them within bf16 rounding of the one
    from float32 moments; a cache of the earlier single-folder layout (version 1) still reads.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cpu_env
from test_train import write_clips
from test_train_features import _files  # every file of a folder: {name: bytes}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPS, SHARD = 5, 2


def _args(data, out, *extra):
    return ["cache-features", "--data-dir", str(data), "--out", str(out), "--preset", "tiny-video", "--quiet",
            "--frames", "4", "--resolution", "64", "--batch-size", "2", "--shard-size", str(SHARD), "--dtype",
            "bfloat16", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from train.__main__ import main

    root = tmp_path_factory.mktemp("shards")
    data = write_clips(root / "clips", n=CLIPS)
    t0 = time.perf_counter()
    assert main(_args(data, root / "one")) == 0
    print(f"\none process: {time.perf_counter() - t0:.1f} s (the encoders' compile included)")
    return {"root": root, "data": data, "one": str(root / "one")}


def test_two_processes_write_the_one_process_cache(setup):
    root = setup["root"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "train", *_args(setup["data"], root / "two"), "--distributed",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    print(f"two processes: {time.perf_counter() - t0:.1f} s")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    said = " ".join(out for out, _ in outs)
    # Process 0 writes shards 0 and 2, process 1 shard 1; whichever finishes last joins them.
    assert said.count("cached features of 5 clips") >= 1 and "3 shards" in said
    one, two = _files(setup["one"]), _files(str(root / "two"))
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one), \
        [k for k in one if one[k] != two.get(k)]
    assert sum(name.startswith("ids-") for name in one) == 3 and "manifest.json" in one


def test_a_stopped_run_resumes_without_redoing_finished_shards(setup, tmp_path, capsys):
    from train.__main__ import main
    from train.config import TrainConfig
    from train.features import FeatureCache, write_features

    out = tmp_path / "stopped"
    cfg = TrainConfig(model="tiny-video", data_dir=setup["data"], frames=4, resolution=64, batch_size=2,
                      dtype="bfloat16")

    def stop(k):
        raise KeyboardInterrupt   # as Ctrl-C after the first shard

    with pytest.raises(KeyboardInterrupt):
        write_features(cfg, str(out), progress=False, shard_size=SHARD, on_shard=stop)
    names = sorted(os.listdir(out))
    assert "manifest.json" not in names and [n for n in names if n.startswith("ids-")] == ["ids-00000-of-00003.npy"]
    with pytest.raises(Exception, match="the cache is unfinished"):
        FeatureCache(str(out))
    # Another plan is refused on an unfinished cache; a half-written shard file (a SIGKILL) is overwritten.
    capsys.readouterr()
    assert main(_args(setup["data"], out)[:-4] + ["--shard-size", "3", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished cache of other settings (shard_size, shards differ)" in err, err
    (out / ".latent_mean-00001-of-00003.npy.partial").write_bytes(b"half a shard")
    first = {n: os.stat(out / n) for n in os.listdir(out) if "-00000-of-" in n}
    assert main(_args(setup["data"], out)) == 0
    said = capsys.readouterr().out
    assert "resuming" in said and "1 of this process's 3 shards are done already" in said, said
    again = {n: os.stat(out / n) for n in first}
    assert all((a.st_ino, a.st_mtime_ns) == (b.st_ino, b.st_mtime_ns) for a, b in zip(first.values(),
                                                                                     again.values()))
    one, resumed = _files(setup["one"]), _files(str(out))
    assert one.keys() == resumed.keys() and all(one[k] == resumed[k] for k in one)   # no partial file left


def test_compact_cache_is_what_the_step_reads(setup, tmp_path):
    import jax
    import ml_dtypes

    from storydiff_jax.pipelines.video_components import load_video_components
    from storydiff_jax.sharding import make_mesh
    from train.config import TrainConfig
    from train.data import PrepareClip, open_source
    from train.features import FeatureCache, shard_name
    from train.step import FROZEN_ONLY, Trainer, global_batch, split_params

    cache = FeatureCache(setup["one"])
    manifest = cache.manifest
    assert manifest["storage"] == "bfloat16" and len(cache) == CLIPS
    f32_bytes = sum(4 * np.prod(v["shape"][1:]) for k, v in manifest["arrays"].items() if k in cache.specs)
    print(f"compact: {cache.bytes_per_clip()} bytes per clip, float32 storage {f32_bytes}")
    assert cache.bytes_per_clip() * 2 == f32_bytes

    # The encoders again, on the first two clips (the same program as the cache run: same shapes).
    cfg = TrainConfig(model="tiny-video", data_dir=setup["data"], frames=4, resolution=64, batch_size=2,
                      dtype="bfloat16")
    comp = load_video_components("tiny-video")
    _, frozen, config = split_params(comp, cfg, smp_from_model=False, only=FROZEN_ONLY)
    trainer = Trainer.build(cfg, config, comp.tokenizer)
    mesh = make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    prepare, source = PrepareClip(4, 64, comp.tokenizer), open_source(setup["data"])
    raw = {k: np.stack([prepare(source[i])[k] for i in range(2)]) for k in ("frames", "input_ids")}
    encode = trainer.programs.setdefault("encode_features", jax.jit(trainer.encode_features))
    feats = jax.device_get(encode(frozen, global_batch(raw, mesh)))
    rows = [cache[i] for i in range(2)]
    cached = {k: np.stack([r[k] for r in rows]) for k in feats}
    for k in ("image_feats", "text_states"):   # bf16 outputs of bf16 encoders: stored exactly
        assert feats[k].dtype == ml_dtypes.bfloat16 and np.array_equal(cached[k].view(np.uint16),
                                                                       np.asarray(feats[k]).view(np.uint16)), k
    for k in ("latent_mean", "latent_logvar"):   # the float32 VAE's moments, rounded to bf16
        exact = np.asarray(feats[k], np.float32)
        err = np.max(np.abs(cached[k].astype(np.float32) - exact) / np.maximum(np.abs(exact), 1e-30))
        print(f"{k}: largest relative rounding {err:.2e} (bf16 rounds to 8 significant bits: <= 2^-8 = {2 ** -8:.2e})")
        assert feats[k].dtype == np.float32 and err <= 2 ** -8

    # The cached step's conditioning from the compact rows vs from the float32 moments, same key.
    cond = jax.jit(trainer.cached_conditioning)
    key, consts = jax.random.key(3), cache.frozen(frozen)
    with_compact = cond(consts, global_batch(cached, mesh), key)
    with_f32 = cond(consts, global_batch({**cached, **{k: np.asarray(feats[k], np.float32) for k in
                                                     ("latent_mean", "latent_logvar")}}, mesh), key)
    a, b = np.asarray(with_compact[0]), np.asarray(with_f32[0])
    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    print(f"latents from compact vs float32 moments: max |diff| / max |latent| = {rel:.1e}")
    assert a.dtype == np.float32 and rel < 2 ** -7
    for x, y in zip(with_compact[1:], with_f32[1:]):
        assert np.array_equal(np.asarray(x), np.asarray(y))   # image and text conditioning: the same arrays

    # A version-1 cache (one float32 file per array, as written before shards) reads the same rows.
    old = tmp_path / "v1"
    old.mkdir()
    for k in cache.specs:
        parts = [np.load(os.path.join(setup["one"], shard_name(k, s, 3))).view(ml_dtypes.bfloat16) for s in range(3)]
        np.save(old / f"{k}.npy", np.concatenate(parts).astype(np.float32))
    for k in ("uncond_image", "empty_text"):
        np.save(old / f"{k}.npy", cache.constants[k].astype(np.float32))
    shutil.copy(os.path.join(setup["one"], "ids.npy"), old / "ids.npy")
    v1 = {k: v for k, v in manifest.items() if k not in ("storage", "shard_size", "shards")}
    (old / "manifest.json").write_text(json.dumps({**v1, "version": 1}))
    older = FeatureCache(str(old))
    for i in (0, CLIPS - 1):
        a, b = cache[i], older[i]
        assert a["id"] == b["id"] and all(np.array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32))
                                          for k in cache.specs)
