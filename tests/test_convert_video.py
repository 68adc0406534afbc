"""End to end: `python -m convert video` (the real CLI, as a subprocess) on tiny random-weight parts in
their real on-disk formats -> `load_video_components` -> `python -m infer.transition --model`.

Parts, each as its authors ship it:
- SD1.5: a diffusers StableDiffusionPipeline folder (tiny-sd15 topology; built by test_convert_cli);
- motion modules: AnimateDiff's original `mm_sd_v15_v2.ckpt` layout (a torch pickle), made from a random
  diffusers MotionAdapter by test_motion's key map;
- image encoder: a transformers CLIPVisionModelWithProjection folder (IP-Adapter's `image_encoder/`);
- IP-Adapter-Plus: the original `.bin` layout ({"image_proj": ..., "ip_adapter": ...}).
The numerical parity of each network is in its own test file; here: the converted folder holds exactly
the parameters each converter gives (bit-identical), with or without a trained SMP, the folder runs through
infer.transition, and every broken input is a one-line error with nothing left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from test_clip_vision import TINY as TINY_VISION
from test_convert_cli import _build_pipeline, _perturb
from test_ip_adapter import _original_image_proj, _original_ip_layers
from test_motion import _drop_mid, _save, _to_original

from convert.clip_vision import convert_clip_vision
from convert.ip_adapter import convert_ip_adapter
from convert.motion import convert_motion_module
from convert.unet import convert_unet
from storydiff_jax import checkpoints
from storydiff_jax.models import ip_adapter as ip_lib
from storydiff_jax.models.smp import PRESETS as SMP_PRESETS
from storydiff_jax.models.smp import smp_init_params
from storydiff_jax.models.unet import PRESETS as UNET_PRESETS
from storydiff_jax.params import module_params
from storydiff_jax.pipelines.video_components import load_video_components

ROOT = Path(__file__).resolve().parent.parent
UNET = UNET_PRESETS["tiny-sd15"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _run(module: str, *args) -> subprocess.Popen:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _parts(root: Path) -> types.SimpleNamespace:
    p = types.SimpleNamespace(root=root)
    p.sd15 = root / "sd15"
    pipe = p.pipe = _build_pipeline("sd15", p.sd15, root / "tokenizers")

    torch.manual_seed(3)
    adapter = p.adapter = _perturb(diffusers.MotionAdapter(
        block_out_channels=UNET.block_out_channels, motion_layers_per_block=UNET.layers_per_block,
        motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True))
    original = _to_original(adapter.state_dict())
    p.motion = Path(_save(original, root / "mm_sd_v15_v2.ckpt"))
    p.motion_v1 = Path(_save(_drop_mid(original), root / "mm_v1_like.ckpt"))

    vision = _perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION)))
    p.vision = root / "image_encoder"
    vision.save_pretrained(p.vision)

    gen = torch.Generator().manual_seed(4)
    # Depth 4, like the real file: diffusers' IP-Adapter-Plus loader always builds 4 Resampler layers, and
    # tests/test_pipeline_parity.py loads this file into diffusers' AnimateDiffPipeline.
    proj_cfg = ip_lib.ResamplerConfig(embed_dim=TINY_VISION["hidden_size"], hidden_dim=32,
                                      output_dim=UNET.cross_attention_dim, depth=4, dim_head=64, heads=2,
                                      num_queries=16, ffn_ratio=4)
    p.ip = root / "ip-adapter-plus_sd15.bin"
    torch.save({"image_proj": _original_image_proj(proj_cfg, gen), "ip_adapter": _original_ip_layers(pipe.unet, gen)},
               p.ip)
    p.ip_plain = root / "ip-adapter_sd15.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(64, 16), "proj.bias": torch.zeros(64),
                               "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)},
                "ip_adapter": _original_ip_layers(pipe.unet, gen)}, p.ip_plain)

    # A trained SMP as `python -m train export` writes it: smp/config.json + smp/params (orbax).
    import dataclasses

    smp_cfg = dataclasses.replace(SMP_PRESETS["tiny"], token_dim=UNET.cross_attention_dim, num_tokens=16)
    p.smp = root / "smp"
    p.smp_params = smp_init_params(smp_cfg, seed=5)
    p.smp_params = {k: v + 0.01 for k, v in p.smp_params.items()}   # not the zero-init: it must be carried over
    checkpoints.save_params(str(p.smp / "params"), p.smp_params)
    (p.smp / "config.json").write_text(json.dumps(smp_cfg.to_dict()))
    return p


def _convert_args(p, dst, **swap):
    args = {"--sd15": p.sd15, "--motion-module": p.motion, "--image-encoder": p.vision, "--ip-adapter": p.ip,
            "--dst": dst, **swap}
    return [x for k, v in args.items() if v is not None for x in (k, v)] + ["--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_video")
    p = _parts(root)
    pool = ThreadPoolExecutor(2)
    out = root / "out"
    jobs = {
        "plain": pool.submit(_run, "convert", "video", *_convert_args(p, out / "video")),
        "smp": pool.submit(_run, "convert", "video", *_convert_args(p, out / "video-smp", **{"--smp": p.smp})),
    }
    (out / "exists").mkdir(parents=True)
    (out / "exists" / "keep.txt").write_text("must survive")
    errors = {
        "v1-motion": (dict(**{"--motion-module": p.motion_v1}), r"without a mid block .*needs AnimateDiff v2"),
        "plain-ip-adapter": (dict(**{"--ip-adapter": p.ip_plain}), r"Plus"),
        "unet-as-image-encoder": (
            dict(**{"--image-encoder": p.sd15 / "unet" / "diffusion_pytorch_model.safetensors"}), r"U-Net"),
        "missing-part": (dict(**{"--ip-adapter": root / "nope.bin"}), r"--ip-adapter .*nope\.bin: no such file"),
        "video-as-sd15": (dict(**{"--sd15": p.vision}), r"model_index\.json"),
        "dst-exists": (dict(**{"--dst": out / "exists"}), r"already exists"),
    }
    for case, (swap, _) in errors.items():
        dst = swap.pop("--dst", out / "err" / case)
        jobs[case] = pool.submit(_run, "convert", "video", *_convert_args(p, dst, **swap))
    yield types.SimpleNamespace(parts=p, out=out, jobs=jobs, errors=errors)
    pool.shutdown(wait=True, cancel_futures=True)


def _ok(work, name):
    run = work.jobs[name].result()
    assert run.returncode == 0, f"{name}: exit {run.returncode}\n{run.stderr[-3000:]}"
    return run


def test_converted_folder_holds_each_converters_params(work):
    p = work.parts
    run = _ok(work, "plain")
    assert "no trained Semantic Motion Predictor" in run.stdout
    dst = work.out / "video"
    index = json.loads((dst / "model_index.json").read_text())
    assert index["arch"] == "sd15-video" and index["smp_trained"] is False and "smp" not in index["components"]
    comps = load_video_components(str(dst))
    assert comps.smp is None and comps.config.unet.motion.max_frames == 32

    expected_unet = {**convert_unet(str(p.sd15 / "unet"), UNET), **convert_motion_module(str(p.motion), UNET)[1],
                     **convert_ip_adapter(p.ip, UNET)[2]}
    _, proj, _ = convert_ip_adapter(p.ip, UNET)
    _, vision = convert_clip_vision(str(p.vision))
    for name, model, expected in (("unet", comps.unet, expected_unet), ("image_proj", comps.image_proj, proj),
                                  ("image_encoder", comps.image_encoder, vision)):
        ours = module_params(model)
        assert set(ours) == set(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(ours[key]), value, err_msg=f"{name}: {key}")


def test_smp_folder_is_carried_over(work):
    _ok(work, "smp")
    comps = load_video_components(str(work.out / "video-smp"))
    ours = module_params(comps.smp)
    assert set(ours) == set(work.parts.smp_params)
    for key, value in work.parts.smp_params.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), value, err_msg=key)


def test_infer_transition_runs_on_the_converted_folder(work, tmp_path):
    _ok(work, "plain")
    rng = np.random.default_rng(0)
    from PIL import Image

    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "v.gif"
    run = _run("infer.transition", "--model", work.out / "video", "--start", tmp_path / "a.png", "--end",
               tmp_path / "b.png", "--out", out, "--frames", "3", "--steps", "1", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "plain token interpolation" in run.stdout
    from storydiff_jax.video_io import read_video

    assert read_video(str(out)).shape == (3, 64, 64, 3)
    # Asking for the SMP that the folder does not have is an error, before anything is rendered.
    run = _run("infer.transition", "--model", work.out / "video", "--start", tmp_path / "a.png", "--end",
               tmp_path / "b.png", "--out", tmp_path / "w.gif", "--smp", "predict", "--quiet")
    assert run.returncode == 2 and "no trained Semantic Motion Predictor" in run.stderr
    assert not (tmp_path / "w.gif").exists()


ERRORS = ["v1-motion", "plain-ip-adapter", "unet-as-image-encoder", "missing-part", "video-as-sd15", "dst-exists"]


@pytest.mark.parametrize("case", ERRORS)
def test_errors_one_line_nothing_left(work, case):
    import re

    run = work.jobs[case].result()
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(work.errors[case][1], lines[0]), lines[0]
    if case == "dst-exists":
        assert (work.out / "exists" / "keep.txt").read_text() == "must survive"
    else:
        err = work.out / "err"
        assert not (err / case).exists()
        assert not [n for n in os.listdir(err) if n.startswith(f".{case}.partial-")] if err.exists() else True
