"""The feature cache (`python -m train cache-features`, `smp --features`) on the micro model
(tests/train_model.py): 16x16, 4 frames, one CPU device, all in this process; no train step is compiled here.

  * the cached step is the same computation as the raw step: the conditioning it builds from the cache
    equals the in-step encoders' for the same batch and key, and it feeds the same `loss`; a cached loader
    gives the same clips at every step as a raw one;
  * the cache is deterministic and all-or-nothing; a cache of other frames / resolution / dtype / model /
    dataset is refused in one line, exit 2, before any workdir exists.

`--features` runs train, checkpoint and resume in tests/test_train.py (its reference run is one).
"""

import json
import os
import shutil
import time

import numpy as np
import pytest
from train_model import model_args, write_clips, write_micro_model

SEED = 0   # with drop probabilities 0.5, step 0 drops the caption of one clip of two and keeps the other's
RUN = dict(frames=4, resolution=16, batch_size=2, lr=3e-3, warmup=0, schedule="constant", seed=SEED,
           text_drop=0.5, image_drop=0.5, save_every=2, log_every=1)
STEPS = 4


def _cache_args(data, out, model, **over):
    args = ["cache-features", "--data-dir", str(data), "--out", str(out), *model_args(model), "--quiet",
            "--frames", "4", "--resolution", "16", "--batch-size", "3"]   # 3: the last call of 8 clips is padded
    for k, v in over.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _smp_args(data, cache, workdir, model, **over):
    s = {**RUN, "steps": STEPS, **over}
    args = ["smp", "--data-dir", str(data), "--features", str(cache), "--workdir", str(workdir), *model_args(model),
            "--quiet"]
    for k, v in s.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _files(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from train.__main__ import main

    root = tmp_path_factory.mktemp("features")
    model = write_micro_model(root / "model")
    data = write_clips(root / "clips")
    t0 = time.perf_counter()
    assert main(_cache_args(data, root / "cache", model)) == 0
    t_cache = time.perf_counter() - t0
    assert main(_cache_args(data, root / "cache-again", model)) == 0
    print(f"cache-features of 8 clips: {t_cache:.1f}s (first, with the encoders' compile)")
    return {"root": root, "data": data, "model": model, "cache": str(root / "cache")}


def test_cache_files_deterministic_and_described(setup):
    a, b = _files(setup["cache"]), _files(str(setup["root"] / "cache-again"))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "two runs wrote different bytes"
    m = json.loads(a["manifest.json"])
    assert (m["frames"], m["resolution"], m["model"]["dtype"], m["dataset"]["clips"]) == (4, 16, "float32", 8)
    arrays = m["arrays"]
    assert arrays["latent_mean"]["shape"] == [8, 4, 8, 8, 4]           # 16 px / 2 (the micro model's VAE)
    assert arrays["image_feats"]["shape"] == [8, 2, 5, 16]             # CLIP at 28 px, patch 14: 4 + 1 tokens
    assert arrays["text_states"]["shape"] == [8, 77, 16]
    assert arrays["uncond_image"]["shape"][0] == 1 and len(arrays["empty_text"]["shape"]) == 2
    ids = np.load(os.path.join(setup["cache"], "ids.npy"))
    assert ids.tolist() == [f"clip-{i:03d}" for i in range(8)]
    assert not [n for n in os.listdir(setup["root"]) if n.startswith(".")]   # no staging folder left behind


def test_cached_step_equals_raw_step(setup):
    """Same clips at every step from a raw and a cached loader; for the same batch and key, the conditioning
    of the raw step (encoders in the program) and of the cached step (features from the cache) agree."""
    import jax

    from storydiff_jax.pipelines.video_components import load_video_components
    from storydiff_jax.sharding import make_mesh
    from train.config import TrainConfig
    from train.data import make_loader, open_source
    from train.features import open_features
    from train.step import Trainer, global_batch, split_params

    cfg = TrainConfig(model=setup["model"], data_dir=setup["data"], features=setup["cache"], steps=STEPS, **RUN)
    comp = load_video_components(setup["model"])
    trainable, frozen, config = split_params(comp, cfg, smp_from_model=True)
    trainer = Trainer.build(cfg, config, comp.tokenizer)
    source = open_source(cfg.data_dir)
    cache = open_features(cfg, source)
    cache.check_model(cfg, comp)
    args = dict(per_host_batch=2, seed=SEED, num_frames=4, resolution=16, tokenizer=comp.tokenizer)
    raw, cached = iter(make_loader(source, **args)), iter(make_loader(cache, prepared=True, **args))
    batches = [(next(raw), next(cached)) for _ in range(STEPS)]
    # The same clips at every step (the same seeded shuffle over the same indices: row i is record i).
    assert [r["id"].tolist() for r, _ in batches] == [c["id"].tolist() for _, c in batches]
    raw_local, cached_local = batches[0]
    mesh = make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])

    # The conditioning alone (small programs): cached vs in-step encoders, same key.
    key = jax.random.key(7)
    cond_raw = jax.jit(trainer.conditioning)(frozen, global_batch(raw_local, mesh), key)
    cond_cached = jax.jit(trainer.cached_conditioning)(cache.frozen(frozen), global_batch(cached_local, mesh), key)
    cond_err = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
                for a, b in zip(cond_raw, cond_cached)]
    print(f"conditioning, cached vs in-step (max |diff| / max |x|): latents {cond_err[0]:.1e}, image features "
          f"{cond_err[1]:.1e}, text states {cond_err[2]:.1e}")
    assert max(cond_err) < 1e-5

    # The two steps differ only in where `cond` comes from: `loss_and_grads` feeds either conditioning to the
    # same `loss`, so equal conditioning is an equal step (tests/test_train.py trains the cached step,
    # tests/test_train_multihost.py the raw one). The cached step gets no encoder weights at all:
    assert not set(cache.frozen(frozen)) & {"vae", "image_encoder", "text_encoder"}


def test_mismatched_cache_is_refused(setup, tmp_path, capsys):
    from train.__main__ import main

    other = write_clips(tmp_path / "other", n=6)
    tampered = tmp_path / "tampered"
    shutil.copytree(setup["cache"], tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 16
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    data, cache, model = setup["data"], setup["cache"], setup["model"]
    rerun = "rerun `python -m train cache-features"
    cases = {
        "frames": (_smp_args(data, cache, tmp_path / "w1", model, frames=3),
                   "cached features are for --frames 4 --resolution 16, this run has --frames 3 --resolution 16"),
        "resolution": (_smp_args(data, cache, tmp_path / "w2", model, resolution=64),
                       "this run has --frames 4 --resolution 64"),
        "dtype": (_smp_args(data, cache, tmp_path / "w3", model, dtype="bfloat16"),
                  "computed in float32, this run has --dtype bfloat16"),
        "dataset": (_smp_args(other, cache, tmp_path / "w4", model), "(8 clips, ids"),
        "model": (_smp_args(data, tampered, tmp_path / "w5", model),
                  f"cached features are of model {os.path.abspath(model)} (encoders 0000000000000000), this run's "
                  f"--model {model} has"),
        "no cache": (_smp_args(data, tmp_path / "nowhere", tmp_path / "w6", model), "no such folder"),
        "not a cache": (_smp_args(data, data, tmp_path / "w7", model), "no readable manifest.json"),
    }
    for name, (args, message) in cases.items():
        capsys.readouterr()
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
        if name not in ("no cache", "not a cache"):
            assert rerun in err, (name, err)
    assert sorted(os.listdir(tmp_path)) == ["other", "tampered"]   # no workdir was created


def test_cache_command_is_all_or_nothing(setup, tmp_path, capsys):
    from train.__main__ import main
    from train.data import write_clip_folder

    rng = np.random.default_rng(1)
    clips = [{"id": f"c{i}", "frames": rng.integers(0, 256, (4 if i < 5 else 2, 16, 16, 3), np.uint8),
              "caption": "x"} for i in range(6)]   # the last clip is too short: found after a batch is written
    bad = write_clip_folder(str(tmp_path / "bad"), clips)
    capsys.readouterr()
    assert main(_cache_args(bad, tmp_path / "out", setup["model"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clip c5: 2 frames, the run needs 4" in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad"]    # neither the cache nor its staging folder
    # An existing cache is refused without --overwrite.
    assert main(_cache_args(setup["data"], setup["cache"], setup["model"])) == 2
    assert "exists; choose a new folder or pass --overwrite" in capsys.readouterr().err
