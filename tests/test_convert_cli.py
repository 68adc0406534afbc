"""End to end: `python -m convert pipeline` (the real CLI, as a subprocess) -> `storydiff_jax.load_pipeline`.

Fixtures are tiny random-weight pipelines in the real on-disk format, written by diffusers'
`save_pretrained`: a StableDiffusionXLPipeline (tiny-sdxl U-Net / VAE presets, transformers CLIPTextModel
+ CLIPTextModelWithProjection with the real 49408-token vocabulary, CLIP tokenizers built by
`write_clip_tokenizer`, EulerDiscreteScheduler) and a StableDiffusionPipeline (tiny-sd15, no safety
checker, PNDMScheduler). transformers 5 saves tokenizers as `tokenizer.json`; the SD1.5 folder's
`tokenizer/` is then replaced by the hub layout (vocab.json + merges.txt) so both layouts are copied.
Every parameter is perturbed (random init leaves zeros, ones).

All CLI runs (conversions and error cases) are launched once, at module start, two at a time in the
background (each pays ~2-5 s of JAX start-up), and the tests wait for the ones they need.

Tolerances:
- fp32 parity (U-Net, VAE decode/encode, both text encoders): max |ours - torch| <= 1e-4 * max(1, max |torch|).
- bf16 (`--dtype bfloat16`): the stored parameters must equal the fp32 conversion rounded to bf16
  exactly; loaded into a float32 pipeline, U-Net output and pooled text embedding are within
  BF16_TOL[...] * max(1, max |torch fp32|) (bf16 keeps 8 mantissa bits: ~2e-3 relative per weight, accumulated
  over the network's depth); the bounds are ~4x the measured errors (see BF16_TOL).
- single file vs diffusers folder: converted parameters bit-identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diffusers
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_single_file import _originals, _single_file

import storydiff_jax
from storydiff_jax import checkpoints
from storydiff_jax.errors import CheckpointError
from storydiff_jax.models import unet as unet_lib
from storydiff_jax.models import vae as vae_lib
from storydiff_jax.models.clip_text import load_tokenizer, tokenize
from storydiff_jax.pipelines.components import PRESETS
from storydiff_jax.tokenizer_files import write_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
# max abs error / max(1, max|ref|) of the bf16-stored parameters, measured (2 CPU cores): U-Net 0.0081 (0.0182 of
# 2.25), text encoder 2 pooled 0.0036 (0.0137 of 3.83); bounds ~4x.
BF16_TOL = {"unet": 3e-2, "pooled": 1.5e-2}
PROMPTS = ["a photo of a cat", "", "A lighthouse keeper's CAT, watercolor -- 1890s!!! café naïve 東京",
           " ".join(["a very long prompt that has to be truncated"] * 12)]   # > 77 tokens

# --------------------------------------------------------------------------------------------------
# Tiny diffusers pipelines on disk
# --------------------------------------------------------------------------------------------------


def _hf_text_config(cfg) -> transformers.CLIPTextConfig:
    d = cfg.to_dict()
    d.pop("with_projection")    # ours; transformers picks the class instead
    return transformers.CLIPTextConfig(**d)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _build_pipeline(arch: str, folder: Path, tok_root: Path):
    torch.manual_seed({"sdxl": 0, "sd15": 1}[arch])
    preset = PRESETS[f"tiny-{arch}"]
    unet_cfg = unet_lib.PRESETS[f"tiny-{arch}"].to_dict()
    unet_cfg.pop("_class_name")
    unet = _perturb(diffusers.UNet2DConditionModel(**unet_cfg))
    vae = _perturb(diffusers.AutoencoderKL(**vae_lib.PRESETS[f"tiny-{arch}"].to_dict()))
    te = _perturb(transformers.CLIPTextModel(_hf_text_config(preset.text_encoder)))
    tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_root / "eot"))
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if arch == "sdxl":
        te2 = _perturb(transformers.CLIPTextModelWithProjection(_hf_text_config(preset.text_encoder_2)))
        tok2 = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_root / "bang", pad_token="!"))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(**schedule, timestep_spacing="leading"))
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
            scheduler=diffusers.PNDMScheduler(**schedule, skip_prk_steps=True))
    pipe.save_pretrained(folder)
    if arch == "sd15":   # the hub's tokenizer layout (vocab.json + merges.txt + special_tokens_map.json)
        shutil.rmtree(folder / "tokenizer")
        shutil.copytree(tok_root / "eot", folder / "tokenizer")
    return pipe


# --------------------------------------------------------------------------------------------------
# The CLI, run in the background
# --------------------------------------------------------------------------------------------------

class _CLI:
    """`python -m convert pipeline ARGS` subprocesses, two at a time, started as soon as submitted."""

    def __init__(self, workers: int = 2):
        self.pool = ThreadPoolExecutor(workers)
        self.jobs = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    # Conversion is host work, but it initialises a JAX backend: on a GPU machine each of the
                    # concurrent runs would claim (and log about) the GPU.
                    "JAX_PLATFORMS": "cpu"}

    def submit(self, name: str, *args, progress: bool = False):
        cmd = [sys.executable, "-m", "convert", "pipeline", *map(str, args)] + ([] if progress else ["--no-progress"])
        self.jobs[name] = self.pool.submit(subprocess.run, cmd, cwd=ROOT, env=self.env, capture_output=True,
                                           text=True, timeout=600)

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self.jobs[name].result()

    def ok(self, name: str) -> subprocess.CompletedProcess:
        run = self[name]
        assert run.returncode == 0, f"{name}: exit {run.returncode}\n{run.stderr}"
        return run


def _leftovers(dst: Path) -> list[str]:
    """Temporary folders a conversion into `dst` may have left beside it."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial-"))


def _edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _edit_tensors(path: Path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _error_cases(root: Path, sdxl: Path, sd15: Path) -> dict[str, tuple[Path, list[str]]]:
    """{case: (SRC, regexes the one-line error must match)}; each SRC broken in one way."""
    cases = {}
    cases["src-missing"] = (root / "no-such-model", [r"no such file or folder", r"no-such-model"])

    pickled = root / "model.ckpt"
    pickled.write_bytes(b"PK\x03\x04 a pickled checkpoint")
    cases["not-safetensors"] = (pickled, [r"only \.safetensors", r"model\.ckpt"])

    src = root / "arch-diffusers"
    shutil.copytree(sdxl, src)
    _edit_json(src / "unet" / "config.json", addition_embed_type="text")
    cases["unknown-arch-diffusers"] = (src, [r"unknown architecture", r"addition_embed_type='text'",
                                             r"supported: sd15, sdxl"])

    src = root / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8),
               "some.unrelated.tensor": torch.randn(3)}, src)
    cases["unknown-arch-single-file"] = (src, [r"unrecognised single-file checkpoint",
                                               r"supported architectures: sd15 .* sdxl"])

    src = root / "missing"
    shutil.copytree(sd15, src)
    dropped = "mid_block.attentions.0.proj_in.bias"
    _edit_tensors(src / "unet" / "diffusion_pytorch_model.safetensors",
                  lambda t: (t.pop("conv_in.weight"), t.pop(dropped)))
    cases["missing-keys"] = (src, [r"unet\b.*2 parameters missing", r"conv_in\.(weight|kernel)", re.escape(dropped)])

    # In the VAE, the second component: the U-Net's parameters are already written when it fails.
    src = root / "unexpected"
    shutil.copytree(sdxl, src)
    _edit_tensors(src / "vae" / "diffusion_pytorch_model.safetensors",
                  lambda t: t.update({"decoder.mid_block.adapter.weight": torch.zeros(3)}))
    cases["unexpected-keys"] = (src, [r"vae\b.*1 unexpected key", r"decoder\.mid_block\.adapter\.weight"])

    src = root / "shape"
    shutil.copytree(sdxl, src)
    _edit_json(src / "unet" / "config.json", cross_attention_dim=48)    # the text encoders still give 64
    cases["shape-mismatch"] = (src, [r"shape mismatch for \S*attn2\.to_k\.weight", r"expected \(48, 64\)",
                                     r"got \(64, 64\)"])

    src = root / "truncated"
    shutil.copytree(sd15, src)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    cases["truncated"] = (src, [r"unet/diffusion_pytorch_model\.safetensors", r"truncated or corrupt"])

    src = root / "garbage.safetensors"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    cases["corrupt-single-file"] = (src, [r"garbage\.safetensors", r"not a readable \.safetensors file"])
    return cases


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_cli")
    w = types.SimpleNamespace()
    w.root, w.out = root, root / "out"
    w.sdxl_dir, w.sd15_dir = root / "sdxl-diffusers", root / "sd15-diffusers"
    w.sdxl = _build_pipeline("sdxl", w.sdxl_dir, root / "tokenizers")
    cli = w.cli = _CLI()
    # Conversions the parity tests need go first.
    w.dst = {name: w.out / name for name in ("sdxl", "sd15", "sdxl-bf16", "sdxl-single")}
    cli.submit("sdxl", "--src", w.sdxl_dir, "--dst", w.dst["sdxl"])
    w.sd15 = _build_pipeline("sd15", w.sd15_dir, root / "tokenizers")
    cli.submit("sd15", "--src", w.sd15_dir, "--dst", w.dst["sd15"])

    # SGM-keyed single file of the same SDXL weights (with the non-parameter extras real files carry).
    models = {"unet": w.sdxl.unet, "vae": w.sdxl.vae, "text_encoder": w.sdxl.text_encoder,
              "text_encoder_2": w.sdxl.text_encoder_2}
    ckpt = _single_file("sdxl", models, _originals(models))
    w.single = root / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, w.single)
    cli.submit("sdxl-single", "--src", w.single, "--dst", w.dst["sdxl-single"], "--config", w.sdxl_dir)

    # bf16, written over an existing folder with --overwrite.
    w.dst["sdxl-bf16"].mkdir(parents=True)
    (w.dst["sdxl-bf16"] / "stale.txt").write_text("replaced by --overwrite")
    cli.submit("sdxl-bf16", "--src", w.sdxl_dir, "--dst", w.dst["sdxl-bf16"], "--dtype", "bfloat16", "--overwrite")

    (root / "broken").mkdir()
    w.errors = _error_cases(root / "broken", w.sdxl_dir, w.sd15_dir)
    for case, (src, _) in w.errors.items():
        cli.submit(case, "--src", src, "--dst", root / "err" / case / "dst")
    existing = root / "err" / "dst-exists" / "dst"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("must survive")
    cli.submit("dst-exists", "--src", w.sd15_dir, "--dst", existing)
    # With the progress bar on (the default): the error must still be a line of its own.
    cli.submit("progress-error", "--src", root / "broken" / "missing", "--dst", root / "err" / "progress" / "dst",
               progress=True)
    yield w
    cli.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def sdxl(work):
    work.cli.ok("sdxl")
    return storydiff_jax.load_pipeline(str(work.dst["sdxl"]))


@pytest.fixture(scope="module")
def sd15(work):
    work.cli.ok("sd15")
    return storydiff_jax.load_pipeline(str(work.dst["sd15"]))


# --------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------


def _check_close(ours, ref, what, tol=TOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max()
    bound = tol * max(1.0, np.abs(ref).max())
    print(f"{what}: max abs err {err:.3g} (bound {bound:.3g}, max|ref| {np.abs(ref).max():.3g})")
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _nhwc(a: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _nchw(a) -> np.ndarray:
    return np.asarray(a, np.float32).transpose(0, 3, 1, 2)


def _unet_inputs(unet_cfg, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, unet_cfg.in_channels, 16, 16)).astype(np.float32)
    t = np.array([999, 421], np.int64)
    ctx = rng.standard_normal((2, 77, unet_cfg.cross_attention_dim)).astype(np.float32)
    extra = {}
    if unet_cfg.is_sdxl:
        extra["text_embeds"] = rng.standard_normal((2, unet_cfg.text_embeds_dim)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (2, 1))
    return x, t, ctx, extra


def _torch_unet(unet, x, t, ctx, extra):
    kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in extra.items()}} if extra else {}
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kwargs).sample.numpy()


def _jax_unet(unet, x, t, ctx, extra):
    return _nchw(unet(_nhwc(x), jnp.asarray(t), jnp.asarray(ctx), **{k: jnp.asarray(v) for k, v in extra.items()}))


def _compare_pipeline(comps, pipe, name):
    assert comps.config.arch == name
    # U-Net
    x, t, ctx, extra = _unet_inputs(comps.config.unet)
    _check_close(_jax_unet(comps.unet, x, t, ctx, extra), _torch_unet(pipe.unet, x, t, ctx, extra), f"{name} unet")
    # VAE: decode (and encode, for the encoder half of the weights)
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1, 4, 8, 6)).astype(np.float32)
    img = rng.uniform(-1, 1, (1, 3, 64, 48)).astype(np.float32)
    with torch.no_grad():
        ref_dec = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
        ref_mean = pipe.vae.encode(torch.from_numpy(img)).latent_dist.mean.numpy()
    _check_close(_nchw(comps.vae.decode(_nhwc(z))), ref_dec, f"{name} vae decode")
    _check_close(_nchw(comps.vae.encode(_nhwc(img))[0]), ref_mean, f"{name} vae encode mean")
    # Tokenizers (ours, from the converted folder) and text encoders on their ids
    pairs = [(comps.tokenizer, comps.text_encoder, pipe.tokenizer, pipe.text_encoder)]
    if name == "sdxl":
        pairs.append((comps.tokenizer_2, comps.text_encoder_2, pipe.tokenizer_2, pipe.text_encoder_2))
    for i, (tok, enc, ref_tok, ref_enc) in enumerate(pairs):
        ids = tokenize(tok, PROMPTS)
        ref_ids = ref_tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(ids, np.asarray(ref_ids), err_msg=f"{name} tokenizer {i + 1}")
        with torch.no_grad():
            ref = ref_enc(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        pooled = ref.text_embeds if hasattr(ref, "text_embeds") else ref.pooler_output
        out = enc(jnp.asarray(ids))
        _check_close(out.last_hidden_state, ref.last_hidden_state.numpy(), f"{name} text encoder {i + 1} last")
        _check_close(out.penultimate, ref.hidden_states[-2].numpy(), f"{name} text encoder {i + 1} penultimate")
        _check_close(out.pooled, pooled.numpy(), f"{name} text encoder {i + 1} pooled")


def test_sdxl_folder_converts_and_matches_torch(work, sdxl):
    index = json.loads((work.dst["sdxl"] / "model_index.json").read_text())
    assert (index["format"], index["arch"], index["dtype"]) == ("storydiff-jax", "sdxl", "float32")
    assert index["components"] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    assert _leftovers(work.dst["sdxl"]) == []
    assert sdxl.config.scheduler.sampler == "euler"
    _compare_pipeline(sdxl, work.sdxl, "sdxl")


def test_sd15_folder_converts_and_matches_torch(work, sd15):
    index = json.loads((work.dst["sd15"] / "model_index.json").read_text())
    assert (index["arch"], index["components"]) == ("sd15", ["unet", "vae", "text_encoder"])
    assert sd15.text_encoder_2 is None and sd15.tokenizer_2 is None
    assert sd15.config.scheduler.sampler == "ddim"   # PNDM is sampled with DDIM
    _compare_pipeline(sd15, work.sd15, "sd15")


def test_bfloat16_params_load_and_run(work):
    work.cli.ok("sdxl")
    work.cli.ok("sdxl-bf16")
    dst = work.dst["sdxl-bf16"]
    assert not (dst / "stale.txt").exists()     # --overwrite replaced the folder
    assert json.loads((dst / "model_index.json").read_text())["dtype"] == "bfloat16"
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        half = checkpoints.load_params(str(dst / comp / "params"))
        full = checkpoints.load_params(str(work.dst["sdxl"] / comp / "params"))
        assert sorted(half) == sorted(full)
        for k, v in half.items():
            assert v.dtype == ml_dtypes.bfloat16, f"{comp} {k}: {v.dtype}"
            np.testing.assert_array_equal(v, full[k].astype(ml_dtypes.bfloat16), err_msg=f"{comp} {k}")
    # Loaded into the default float32 pipeline (bf16 compute is covered by test_clip_text): the error is
    # the parameters' rounding only. (Also keeps the eagerly compiled float32 ops of the test above.)
    comps = storydiff_jax.load_pipeline(str(dst))
    assert comps.unet.conv_in.kernel.get_value().dtype == jnp.float32
    x, t, ctx, extra = _unet_inputs(comps.config.unet)
    _check_close(_jax_unet(comps.unet, x, t, ctx, extra), _torch_unet(work.sdxl.unet, x, t, ctx, extra),
                 "sdxl bf16 unet", tol=BF16_TOL["unet"])
    ids = tokenize(comps.tokenizer_2, PROMPTS)
    with torch.no_grad():
        ref = work.sdxl.text_encoder_2(torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy()
    _check_close(comps.text_encoder_2(jnp.asarray(ids)).pooled, ref, "sdxl bf16 text encoder 2 pooled",
                 tol=BF16_TOL["pooled"])


def test_single_file_converts_to_the_same_params(work):
    work.cli.ok("sdxl")
    work.cli.ok("sdxl-single")
    single, folder = work.dst["sdxl-single"], work.dst["sdxl"]
    a, b = (json.loads((d / "model_index.json").read_text()) for d in (single, folder))
    assert a["source"].endswith("tiny-sdxl.safetensors")
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
    for comp in a["components"]:
        assert json.loads((single / comp / "config.json").read_text()) == \
            json.loads((folder / comp / "config.json").read_text()), comp
        got = checkpoints.load_params(str(single / comp / "params"))
        want = checkpoints.load_params(str(folder / comp / "params"))
        assert sorted(got) == sorted(want), comp
        for k in want:
            assert got[k].dtype == want[k].dtype == np.float32, (comp, k)
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{comp} {k}")
    assert json.loads((single / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    # Single files carry no tokenizer: the ones built from the shipped BPE merges give the same ids.
    for tok in ("tokenizer", "tokenizer_2"):
        np.testing.assert_array_equal(tokenize(load_tokenizer(str(single / tok)), PROMPTS),
                                      tokenize(load_tokenizer(str(folder / tok)), PROMPTS), err_msg=tok)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

ERROR_CASES = ["src-missing", "not-safetensors", "unknown-arch-diffusers", "unknown-arch-single-file",
               "missing-keys", "unexpected-keys", "shape-mismatch", "truncated", "corrupt-single-file"]


def _check_one_line_error(run: subprocess.CompletedProcess, patterns, what):
    assert run.returncode not in (0, None), f"{what}: exit code 0\n{run.stdout}"
    assert "Traceback" not in run.stderr, f"{what}: traceback\n{run.stderr}"
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: stderr is not one error line:\n{run.stderr}"
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{what}: {pattern!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", ERROR_CASES)
def test_cli_errors(work, case):
    _, patterns = work.errors[case]
    _check_one_line_error(work.cli[case], patterns, case)
    dst = work.root / "err" / case / "dst"
    assert not dst.exists(), f"{case}: {dst} was created"
    assert not dst.parent.exists() or _leftovers(dst) == [], f"{case}: temporary folders left: {_leftovers(dst)}"


def test_cli_refuses_existing_dst(work):
    _check_one_line_error(work.cli["dst-exists"], [r"already exists", r"--overwrite"], "dst-exists")
    dst = work.root / "err" / "dst-exists" / "dst"
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]     # untouched
    assert _leftovers(dst) == []


def test_cli_error_with_progress_bar_is_its_own_line(work):
    run = work.cli["progress-error"]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.split("\n") if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), repr(run.stderr)
    assert not (work.root / "err" / "progress" / "dst").exists()


# --------------------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------------------

def test_load_pipeline_rejects_unconverted_and_missing_folders(work):
    with pytest.raises(CheckpointError, match=r"PyTorch/diffusers folder, not a converted one.*python -m convert"):
        storydiff_jax.load_pipeline(str(work.sdxl_dir))
    with pytest.raises(CheckpointError, match=r"neither a converted folder nor a preset.*python -m convert"):
        storydiff_jax.load_pipeline(str(work.root / "nowhere"))
    with pytest.raises(CheckpointError, match=r"not a converted storydiff-jax folder"):
        storydiff_jax.load_pipeline(str(work.root / "broken"))     # a folder, but no model_index.json
