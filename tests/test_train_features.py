"""The feature cache (`python -m train cache-features`, `smp --features`) on the tiny-video preset: 64x64, 4
frames, batch 2, one CPU device, all in this process (the raw and the cached train step are each compiled
once; the CLI runs reuse the cached one).

  * the cached step is the same computation as the raw step: the conditioning it builds from the cache
    equals the in-step encoders' for the same batch and key, and it feeds the same `loss`;
  * a `--features` run trains, checkpoints, and resumes to bit-identical params, on the same clips per step
    as a raw run;
  * the cache is deterministic and all-or-nothing; a cache of other frames / resolution / dtype / model /
    dataset is refused in one line, exit 2, before any workdir exists.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest
from test_train import write_clips

SEED = 0   # with drop probabilities 0.5, step 0 drops the caption of one clip of two and keeps the other's
RUN = dict(frames=4, resolution=64, batch_size=2, lr=3e-3, warmup=0, schedule="constant", seed=SEED,
           text_drop=0.5, image_drop=0.5, save_every=2, log_every=1)
STEPS = 4


def _cache_args(data, out, **over):
    args = ["cache-features", "--data-dir", str(data), "--out", str(out), "--preset", "tiny-video", "--quiet",
            "--frames", "4", "--resolution", "64", "--batch-size", "3"]   # 3: the last call of 8 clips is padded
    for k, v in over.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _smp_args(data, cache, workdir, **over):
    s = {**RUN, "steps": STEPS, **over}
    args = ["smp", "--data-dir", str(data), "--features", str(cache), "--workdir", str(workdir), "--preset",
            "tiny-video", "--quiet"]
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
    data = write_clips(root / "clips")
    t0 = time.perf_counter()
    assert main(_cache_args(data, root / "cache")) == 0
    t_cache = time.perf_counter() - t0
    assert main(_cache_args(data, root / "cache-again")) == 0
    print(f"cache-features of 8 clips: {t_cache:.1f}s (first, with the encoders' compile)")
    return {"root": root, "data": data, "cache": str(root / "cache")}


def test_cache_files_deterministic_and_described(setup):
    a, b = _files(setup["cache"]), _files(str(setup["root"] / "cache-again"))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "two runs wrote different bytes"
    m = json.loads(a["manifest.json"])
    assert (m["frames"], m["resolution"], m["model"]["dtype"], m["dataset"]["clips"]) == (4, 64, "float32", 8)
    arrays = m["arrays"]
    assert arrays["latent_mean"]["shape"] == [8, 4, 8, 8, 4]           # 64 px / 8 (the VAE)
    assert arrays["image_feats"]["shape"][:2] == [8, 2] and arrays["text_states"]["shape"][:2] == [8, 77]
    assert arrays["uncond_image"]["shape"][0] == 1 and len(arrays["empty_text"]["shape"]) == 2
    ids = np.load(os.path.join(setup["cache"], "ids.npy"))
    assert ids.tolist() == [f"clip-{i:03d}" for i in range(8)]
    assert not [n for n in os.listdir(setup["root"]) if n.startswith(".")]   # no staging folder left behind


def test_cached_step_equals_raw_step(setup):
    """Same batch (the loaders' first batch: the same clips) and key: the conditioning of the raw step
    (encoders in the program) and of the cached step (features from the cache) agree."""
    import jax

    from storydiff_jax.pipelines.video_components import load_video_components
    from storydiff_jax.sharding import make_mesh
    from train.config import TrainConfig
    from train.data import make_loader, open_source
    from train.features import open_features
    from train.step import Trainer, global_batch, split_params

    cfg = TrainConfig(model="tiny-video", data_dir=setup["data"], features=setup["cache"], steps=STEPS, **RUN)
    comp = load_video_components("tiny-video")
    trainable, frozen, config = split_params(comp, cfg, smp_from_model=False)
    trainer = Trainer.build(cfg, config, comp.tokenizer)
    source = open_source(cfg.data_dir)
    cache = open_features(cfg, source)
    cache.check_model(cfg, comp)
    args = dict(per_host_batch=2, seed=SEED, num_frames=4, resolution=64, tokenizer=comp.tokenizer)
    raw_local = next(iter(make_loader(source, **args)))
    cached_local = next(iter(make_loader(cache, **{**args, "prepared": True})))
    assert raw_local["id"].tolist() == cached_local["id"].tolist()
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
    # same `loss`, so equal conditioning is an equal step (compiling the raw step too would double this file's
    # time; tests/test_train.py compiles and checks that one). The cached step gets no encoder weights at all:
    assert not set(cache.frozen(frozen)) & {"vae", "image_encoder", "text_encoder"}


def test_features_run_trains_and_resumes(setup, capsys):
    """4 steps, checkpoints every 2; then the newest checkpoint is removed (as if killed after step 2's
    save) and the same command resumes at step 2 and reaches the same params at step 4."""
    from storydiff_jax.models.clip_text import load_tokenizer
    from storydiff_jax.pipelines.components import preset_tokenizer_dir
    from train.__main__ import main
    from train.data import make_loader, open_source
    from train.loop import read_example_log, read_state
    from train.step import flatten

    work = setup["root"] / "run"
    args = _smp_args(setup["data"], setup["cache"], work)
    t0 = time.perf_counter()
    assert main(args) == 0, capsys.readouterr().err
    first_s = time.perf_counter() - t0
    out = capsys.readouterr().out
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert sorted(os.listdir(work / "checkpoints"), key=int) == ["2", "4"]
    run = json.loads((work / "run.json").read_text())
    assert run["identity"]["features"] == os.path.abspath(setup["cache"])
    params = {k: np.asarray(v) for k, v in flatten(read_state(str(work), STEPS)["params"]).items()}
    log = read_example_log(str(work / "examples-p0.log"))

    shutil.rmtree(work / "checkpoints" / str(STEPS))
    t0 = time.perf_counter()
    assert main(args) == 0, capsys.readouterr().err
    resume_s = time.perf_counter() - t0
    assert f"resumed {work} at step 2" in capsys.readouterr().out
    again = {k: np.asarray(v) for k, v in flatten(read_state(str(work), STEPS)["params"]).items()}
    same = [k for k in params if np.array_equal(params[k], again[k])]
    print(f"--features run: {STEPS} steps in {first_s:.1f}s, losses {np.round(losses, 4).tolist()}; resumed at step "
          f"2 in {resume_s:.1f}s: {len(same)}/{len(params)} param arrays bit-identical at step {STEPS}")
    assert len(same) == len(params)
    assert read_example_log(str(work / "examples-p0.log")) == log
    # The cached run consumed exactly the clips a raw run with the same seed consumes.
    tokenizer = load_tokenizer(preset_tokenizer_dir("<|endoftext|>"))   # the tiny-video preset's
    raw = iter(make_loader(open_source(setup["data"]), per_host_batch=2, seed=SEED, num_frames=4, resolution=64,
                           tokenizer=tokenizer))
    assert [ids for _, ids in log] == [next(raw)["id"].tolist() for _ in range(STEPS)]


def test_mismatched_cache_is_refused(setup, tmp_path, capsys):
    from train.__main__ import main

    other = write_clips(tmp_path / "other", n=6)
    tampered = tmp_path / "tampered"
    shutil.copytree(setup["cache"], tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 16
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    data, cache = setup["data"], setup["cache"]
    rerun = "rerun `python -m train cache-features"
    cases = {
        "frames": (_smp_args(data, cache, tmp_path / "w1", frames=3),
                   "cached features are for --frames 4 --resolution 64, this run has --frames 3 --resolution 64"),
        "resolution": (_smp_args(data, cache, tmp_path / "w2", resolution=128),
                       "this run has --frames 4 --resolution 128"),
        "dtype": (_smp_args(data, cache, tmp_path / "w3", dtype="bfloat16"),
                  "computed in float32, this run has --dtype bfloat16"),
        "dataset": (_smp_args(other, cache, tmp_path / "w4"), "(8 clips, ids"),
        "model": (_smp_args(data, tampered, tmp_path / "w5"), "cached features are of model tiny-video (encoders "
                                                             "0000000000000000), this run's --preset tiny-video has"),
        "no cache": (_smp_args(data, tmp_path / "nowhere", tmp_path / "w6"), "no such folder"),
        "not a cache": (_smp_args(data, data, tmp_path / "w7"), "no readable manifest.json"),
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
    clips = [{"id": f"c{i}", "frames": rng.integers(0, 256, (4 if i < 5 else 2, 64, 64, 3), np.uint8),
              "caption": "x"} for i in range(6)]   # the last clip is too short: found after a batch is written
    bad = write_clip_folder(str(tmp_path / "bad"), clips)
    capsys.readouterr()
    assert main(_cache_args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clip c5: 2 frames, the run needs 4" in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad"]    # neither the cache nor its staging folder
    assert main(_cache_args(setup["data"], setup["cache"])) == 2   # exists: refused without --overwrite
    assert "exists; choose a new folder or pass --overwrite" in capsys.readouterr().err
