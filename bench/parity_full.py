"""Full-size parity and timing: our Flax U-Net / VAE vs diffusers' with the same random weights.

For each `--arch` (sd15, sdxl, video), builds the REAL-size diffusers UNet2DConditionModel and AutoencoderKL from
our presets' configs with random weights (zero/constant-initialised layers perturbed so they count),
converts their state dicts to our parameters in memory (`convert.state_dict.convert_tensors`, one tensor
at a time, no files), builds our models with `build_with_params`, and runs one U-Net forward, one VAE
decode and one VAE encode in both frameworks on identical inputs. Prints a markdown table per arch (one
row per network): errors against the PyTorch fp32 reference, wall times, dtype and device.

`--arch video`: the transition stage's video U-Net (SD1.5 + AnimateDiff v2 motion modules + IP-Adapter's
decoupled cross-attention) vs diffusers' `UNetMotionModel.from_unet2d(UNet2DConditionModel, MotionAdapter)`
with IP-Adapter processors (`IPAdapterAttnProcessor2_0`, random to_k_ip/to_v_ip, 16 tokens per frame,
scale 1) in every cross-attention: one forward of `--video-batch` video(s) of `--frames` frames at
`--size` (default 64 = 512 px). Our motion modules run diffusers' numerics here (GroupNorm statistics
across frames, `per_frame_norm=False`). The VAE is SD1.5's (the sd15 rows).

  .venv/bin/python bench/parity_full.py                         # sd15 + sdxl, fp32, defaults
  .venv/bin/python bench/parity_full.py --arch sd15 --out docs/parity.md
  .venv/bin/python bench/parity_full.py --arch sdxl --size 64 --skip-vae --dtype bfloat16
  .venv/bin/python bench/parity_full.py --arch video --frames 16 --size 32    # what fits a 24 GB CPU machine

Memory: the PyTorch model lives only until its output is computed; its state dict is then consumed
tensor by tensor (each converted to numpy, then dropped from torch), and the numpy dict is consumed the
same way while our model is built. Peak host memory is therefore about one fp32 copy of the network plus
one tensor plus activations, never two full copies (glibc's mmap threshold is pinned so freed tensors
really leave the process). SDXL's U-Net is 2.57 B parameters (10.3 GB fp32), so
before building a network the script compares that estimate with the available memory and skips the
network with a clear message when it would not fit (`--force` tries anyway).

The reference is always PyTorch fp32 (TF32 disabled on GPU). The JAX side runs in `--dtype`; in fp32 its
matmul/conv precision is `--jax-precision` (default `highest`, so GPU runs do not use TF32 and the
errors measure the implementation, not the tensor cores).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# torch and JAX share the GPU: do not let JAX grab 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:      # not glibc: the allocator tweaks below are skipped
        return None


_LIBC = _glibc()
if _LIBC is not None:
    # glibc raises its mmap threshold after each large free, so later large arrays come from the heap and
    # freed ones stay in RSS: the one-tensor-at-a-time hand-over would still peak near two copies. A fixed
    # threshold keeps every tensor >= 1 MiB in its own mapping, returned to the OS when freed.
    _LIBC.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD

LATENT_SIDE = {"sd15": 64, "sdxl": 128, "video": 64}
GIB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["sd15", "sdxl", "video"], action="append",
                   help="architecture(s) to check; repeat for several (default: sd15, sdxl and video)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="JAX-side dtype (the PyTorch reference is always fp32)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto: torch uses CUDA when it sees one, JAX its default backend")
    p.add_argument("--size", type=int, default=None,
                   help="latent side (default 64 for sd15, 128 for sdxl); the VAE image side is 8x this")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one CFG pair); the VAE runs batch 1")
    p.add_argument("--vae-batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=16, help="video: frames per video (AnimateDiff v2: 16)")
    p.add_argument("--video-batch", type=int, default=1, help="video: videos per U-Net call")
    p.add_argument("--video-preset", choices=["video", "tiny-video"], default="video",
                   help="video: the real-size preset, or tiny-video for a seconds-long check of the script")
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per framework (the fastest is reported: other load only adds time)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before timing, per framework (JAX's compile is timed separately)")
    p.add_argument("--jax-precision", choices=["default", "high", "highest"], default="highest",
                   help="jax_default_matmul_precision for the JAX side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="run networks even when the memory check says they won't fit")
    p.add_argument("--out", type=Path, help="append the tables (with the command line and machine info) to this file")
    args = p.parse_args(argv)
    args.arch = args.arch or ["sd15", "sdxl", "video"]
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from convert.state_dict import convert_tensors  # noqa: E402
from storydiff_jax.models import unet as unet_mod  # noqa: E402
from storydiff_jax.models import vae as vae_mod  # noqa: E402
from storydiff_jax.models import video_unet as video_mod  # noqa: E402
from storydiff_jax.params import abstract_params, build_with_params  # noqa: E402

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------------------------- helpers

def log(msg: str):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"[{time.strftime('%H:%M:%S')} peak RSS {rss:5.1f} GiB] {msg}", flush=True)


def free_memory():
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class ConsumingDict(dict):
    """A dict whose `[]` removes the item: `build_with_params` then frees each numpy array once it is on device."""

    def __getitem__(self, key):
        return self.pop(key)


def consume_state_dict(sd: dict):
    """Yield (key, fp32 numpy) from a torch state dict, dropping each tensor from it as we go."""
    for key in list(sd):
        t = sd.pop(key)
        arr = t.detach().to("cpu", torch.float32).numpy()
        del t
        yield key, arr


def perturb_constant_parameters(model: torch.nn.Module, seed: int):
    """Zero-/constant-initialised parameters (norm scales and biases, zero-init projections) get random
    values at their layer's natural scale, so a swapped scale/bias or a skipped layer shows in the output."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() and not bool((flat == flat[0]).all()):
                continue
            if p.ndim >= 2:   # a zero-initialised weight: give it the default fan-in scale
                scale = (p[0].numel()) ** -0.5
                noise = torch.randn(p.shape, generator=gen) * scale
            elif name.endswith("weight"):   # norm scale (1): 1 +- 0.1
                noise = torch.randn(p.shape, generator=gen) * 0.1
            else:                             # a zero bias
                noise = torch.randn(p.shape, generator=gen) * 0.1
            p.add_(noise.to(p.device))


def error_stats(ours: np.ndarray, ref: np.ndarray) -> dict:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    finite = np.isfinite(ours)
    n_bad = int(ours.size - finite.sum())
    diff = np.abs(ours - ref)                      # inf/nan where ours overflowed (float16)
    ref_max = float(np.abs(ref).max())
    max_abs = float(diff.max()) if not n_bad else float("inf")
    return {"max_abs": max_abs, "rel": max_abs / max(ref_max, 1e-30),
            "mean_abs": float(diff[finite].mean()) if finite.any() else float("nan"),   # over finite values
            "ref_max": ref_max, "non_finite": n_bad}


def torch_time(fn, *, warmup: int, repeats: int, cuda: bool):
    out = None
    for _ in range(warmup):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, float(min(times)) if times else float("nan")


def jax_time(fn, args, *, warmup: int, repeats: int):
    """Compile `fn` ahead of time (timed), then warm up and time the compiled executable."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return out, compile_s, float(min(times)) if times else float("nan")


def params_gib(build) -> float:
    return sum(int(np.prod(s.shape)) * 4 for s in abstract_params(build).values()) / GIB


def fits(what: str, need_gib: float, args, torch_dev: str, jax_on_gpu: bool) -> bool:
    """Whether `need_gib` (one fp32 copy + transient + activations) fits in host (and GPU) memory now."""
    if args.force:
        return True
    # On CPU everything is on the host; on GPU the numpy copy in transit between the two still is.
    avail = mem_available_gib()
    if need_gib > avail:
        log(f"SKIP {what}: needs about {need_gib:.1f} GiB of host memory, {avail:.1f} GiB available "
            f"(run it on a machine with more memory, or pass --force to try anyway)")
        return False
    if torch_dev == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if need_gib > free / GIB:
            log(f"SKIP {what}: needs about {need_gib:.1f} GiB of GPU memory, {free / GIB:.1f} GiB free")
            return False
    return True


# --------------------------------------------------------------------------------------------- networks

def convert_and_build(sd: dict, expected: dict, build, *, what: str, np_dtype):
    """torch state dict -> (consumed) numpy params -> (consumed) our module; returns (graphdef, state)."""
    t0 = time.perf_counter()
    params = ConsumingDict(convert_tensors(consume_state_dict(sd), expected, what=what, dtype=np_dtype))
    free_memory()
    log(f"{what}: converted {len(params)} tensors in {time.perf_counter() - t0:.1f} s")
    model = build_with_params(build, params, what=what)
    assert not params, "build_with_params left parameters unused"
    del params
    graphdef, state = nnx.split(model)
    del model
    free_memory()
    return graphdef, state


def run_unet(arch: str, args, env) -> dict | None:
    config = unet_mod.PRESETS[arch]
    side, b = args.size or LATENT_SIDE[arch], args.batch
    dtype = JNP_DTYPES[args.dtype]
    what = f"{arch} U-Net"
    build32 = lambda: unet_mod.UNet2DConditionModel(config, rngs=nnx.Rngs(0))  # noqa: E731
    gib = params_gib(build32)
    # One fp32 copy (+10% for the tensor in transit and small buffers) + 0.5 GiB of runtime + activations,
    # dominated by the attention logits/weights of the first attention level (~6 float32 copies live in
    # XLA's CPU buffers). Measured peak RSS on CPU: sd15 b2 64x64 7.5 GiB, sdxl b2 64x64 11.0, sdxl b1 128x128 13.5.
    level = next(i for i, t in enumerate(config.down_block_types) if t.startswith("CrossAttn"))
    tokens = (side // 2 ** level) ** 2
    need = 1.1 * gib + 0.5 + 6 * b * config.num_attention_heads[level] * tokens ** 2 * 4 / GIB
    if not fits(what, need, args, env["torch_dev"], env["jax_gpu"]):
        return {"network": f"U-Net ({arch})", "skipped": f"needs ~{need:.0f} GiB host memory"}

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((b, config.in_channels, side, side)).astype(np.float32)
    ctx = rng.standard_normal((b, 77, config.cross_attention_dim)).astype(np.float32)
    t = np.array([999, 421, 650, 20][:b] + [500] * max(0, b - 4), np.int64)
    extra = {}
    if config.is_sdxl:
        res = side * 8
        extra["text_embeds"] = rng.standard_normal((b, config.text_embeds_dim)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[res, res, 0, 0, res, res]], np.float32), (b, 1))

    # ---- PyTorch reference
    log(f"{what}: building diffusers model ({gib:.2f} GiB fp32)")
    torch.manual_seed(args.seed)
    d = config.to_dict()
    d.pop("_class_name")
    dev = env["torch_dev"]
    from diffusers import UNet2DConditionModel as TorchUNet
    model = TorchUNet(**d).eval()
    perturb_constant_parameters(model, args.seed)
    model = model.to(dev)
    tx, tt, tc = (torch.from_numpy(a).to(dev) for a in (x, t, ctx))
    kw = {"added_cond_kwargs": {k: torch.from_numpy(v).to(dev) for k, v in extra.items()}} if extra else {}
    log(f"{what}: PyTorch forward, latent {b}x{config.in_channels}x{side}x{side}")
    with torch.no_grad():
        # F821 here is a ruff false positive: the lambda runs before the `del` below (astral-sh/ruff#20753)
        ref, torch_s = torch_time(lambda: model(tx, tt, tc, **kw).sample, warmup=args.warmup,  # noqa: F821
                                  repeats=args.repeats, cuda=dev == "cuda")
    ref = ref.float().cpu().numpy()
    sd = model.state_dict()
    del model, tx, tt, tc, kw
    free_memory()
    log(f"{what}: PyTorch {torch_s:.2f} s/call")

    # ---- ours
    graphdef, state = convert_and_build(
        sd, abstract_params(build32),
        lambda: unet_mod.UNet2DConditionModel(config, dtype=dtype, rngs=nnx.Rngs(0)), what=what, np_dtype=dtype)
    del sd
    log(f"{what}: built Flax model in {args.dtype}; compiling")

    def forward(state, x, t, ctx, extra):
        return nnx.merge(graphdef, state)(x, t, ctx, **extra)

    jargs = (state, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx),
             {k: jnp.asarray(v) for k, v in extra.items()})
    out, compile_s, jax_s = jax_time(forward, jargs, warmup=args.warmup, repeats=args.repeats)
    out = np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)
    del state, jargs
    free_memory()
    log(f"{what}: JAX compile {compile_s:.1f} s, {jax_s:.2f} s/call")
    return {"network": f"U-Net ({arch})", "shape": f"{b}x{config.in_channels}x{side}x{side}",
            **error_stats(out, ref), "torch_s": torch_s, "jax_s": jax_s, "compile_s": compile_s}


IP_TOKENS = 16      # IP-Adapter-Plus: 16 image tokens per frame


def _install_ip_processors(model, seed: int) -> int:
    """IP-Adapter's image branch in every cross-attention of a diffusers UNetMotionModel (random weights at
    a scale where the branch visibly changes the output); returns how many layers got one."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    gen = torch.Generator(device="cpu").manual_seed(seed + 5)
    procs, n = {}, 0
    for name, proc in model.attn_processors.items():
        if not name.endswith("attn2.processor") or ".motion_modules." in name:   # motion attn2 is self-attention
            procs[name] = proc
            continue
        attn = model.get_submodule(name[:-len(".processor")])
        ip = IPAdapterAttnProcessor2_0(attn.to_q.out_features, attn.to_k.in_features, num_tokens=(IP_TOKENS,),
                                       scale=1.0)
        with torch.no_grad():
            for lin in (*ip.to_k_ip, *ip.to_v_ip):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * lin.weight.shape[1] ** -0.5)
        procs[name] = ip
        n += 1
    model.set_attn_processor(procs)
    return n


def video_state_dict_tensors(sd: dict):
    """A diffusers UNetMotionModel state dict (with IP-Adapter processors) -> (our key, fp32 numpy), consumed.

    Spatial keys are SD1.5's (the generic rename applies); motion-module keys are renamed to the original
    AnimateDiff layout our modules mirror and their stored positional tables checked against the formula
    and dropped (convert/motion.py's own steps); `attn2.processor.to_k_ip.0.weight` -> `attn2.to_k_ip.weight`.
    """
    import re

    from convert.motion import _checked_tables, _diffusers_to_ours

    for key, arr in _checked_tables(consume_state_dict(sd), "diffusers UNetMotionModel"):
        key = re.sub(r"\.processor\.(to_[kv]_ip)\.0\.weight$", r".\1.weight", _diffusers_to_ours(key))
        yield key, arr


def run_video_unet(args, env) -> dict | None:
    import dataclasses

    base = video_mod.PRESETS[args.video_preset]
    # diffusers' MotionAdapter normalises across frames; ours defaults to the original per-frame statistics.
    config = dataclasses.replace(base, motion=dataclasses.replace(base.motion, per_frame_norm=False),
                                 ip_adapter=True)
    ucfg, mcfg = config.unet, config.motion
    side = args.size or (LATENT_SIDE["video"] if args.video_preset == "video" else 16)
    b, f = args.video_batch, args.frames
    dtype = JNP_DTYPES[args.dtype]
    what = f"video U-Net ({args.video_preset})"
    build32 = lambda: video_mod.VideoUNet(config, rngs=nnx.Rngs(0))  # noqa: E731
    gib = params_gib(build32)
    # As run_unet: one fp32 copy + runtime + the first attention level's logits, here over b*f images.
    level = next(i for i, t in enumerate(ucfg.down_block_types) if t.startswith("CrossAttn"))
    tokens = (side // 2 ** level) ** 2
    need = 1.1 * gib + 0.5 + 6 * b * f * ucfg.num_attention_heads[level] * tokens ** 2 * 4 / GIB
    if not fits(what, need, args, env["torch_dev"], env["jax_gpu"]):
        return {"network": f"U-Net + motion + IP ({args.video_preset})",
                "skipped": f"{b}x{f} frames at {side}x{side} need ~{need:.0f} GiB host memory (try --frames 4 "
                           "--size 32)"}

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((b, f, ucfg.in_channels, side, side)).astype(np.float32)     # [B, F, C, h, w]
    ctx = rng.standard_normal((b, 77, ucfg.cross_attention_dim)).astype(np.float32)
    ip = rng.standard_normal((b, f, IP_TOKENS, ucfg.cross_attention_dim)).astype(np.float32)
    t = np.array([999, 421, 650, 20][:b] + [500] * max(0, b - 4), np.int64)

    # ---- PyTorch reference
    log(f"{what}: building diffusers UNetMotionModel ({gib:.2f} GiB fp32)")
    torch.manual_seed(args.seed)
    from diffusers import MotionAdapter, UNetMotionModel
    from diffusers import UNet2DConditionModel as TorchUNet
    d = ucfg.to_dict()
    d.pop("_class_name")
    unet2d = TorchUNet(**d).eval()
    adapter = MotionAdapter(block_out_channels=tuple(ucfg.block_out_channels),
                            motion_layers_per_block=ucfg.layers_per_block, motion_num_attention_heads=mcfg.num_heads,
                            motion_norm_num_groups=mcfg.norm_groups, motion_max_seq_length=mcfg.max_frames,
                            use_motion_mid_block=True)
    model = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    del unet2d, adapter
    free_memory()
    # Zero-initialised proj_out of every motion module would make the motion modules identities: perturb.
    perturb_constant_parameters(model, args.seed)
    n_ip = _install_ip_processors(model, args.seed)
    dev = env["torch_dev"]
    model = model.to(dev)
    # diffusers: sample [B, C, F, h, w]; text repeated per frame; IP tokens frame-major ((b f) order).
    tx = torch.from_numpy(x.transpose(0, 2, 1, 3, 4)).to(dev)
    tt = torch.from_numpy(t).to(dev)
    tc = torch.from_numpy(np.repeat(ctx, f, axis=0)).to(dev)
    tip = torch.from_numpy(ip.reshape(b * f, IP_TOKENS, -1)).to(dev)
    log(f"{what}: PyTorch forward, {b} video(s) x {f} frames x {ucfg.in_channels}x{side}x{side}, "
        f"IP-Adapter in {n_ip} layers")
    with torch.no_grad():
        # F821 here is a ruff false positive: the lambda runs before the `del` below (astral-sh/ruff#20753)
        ref, torch_s = torch_time(lambda: model(tx, tt, (tc, [tip])).sample, warmup=args.warmup,  # noqa: F821
                                  repeats=args.repeats, cuda=dev == "cuda")
    ref = ref.float().cpu().numpy().transpose(0, 2, 1, 3, 4)                           # [B, F, C, h, w]
    sd = model.state_dict()
    del model, tx, tt, tc, tip
    free_memory()
    log(f"{what}: PyTorch {torch_s:.2f} s/call")

    # ---- ours
    expected = abstract_params(build32)
    t0 = time.perf_counter()
    params = ConsumingDict(convert_tensors(video_state_dict_tensors(sd), expected, what=what, dtype=dtype))
    del sd
    free_memory()
    log(f"{what}: converted {len(params)} tensors in {time.perf_counter() - t0:.1f} s")
    model = build_with_params(lambda: video_mod.VideoUNet(config, dtype=dtype, rngs=nnx.Rngs(0)), params, what=what)
    assert not params, "build_with_params left parameters unused"
    del params
    graphdef, state = nnx.split(model)
    del model
    free_memory()
    log(f"{what}: built Flax model in {args.dtype}; compiling")

    def forward(state, x, t, ctx, ip):
        return nnx.merge(graphdef, state)(x, t, ctx, image_tokens=ip, ip_scale=1.0)

    jargs = (state, jnp.asarray(x.transpose(0, 1, 3, 4, 2)), jnp.asarray(t), jnp.asarray(ctx),
             jnp.asarray(ip).astype(dtype))
    out, compile_s, jax_s = jax_time(forward, jargs, warmup=args.warmup, repeats=args.repeats)
    out = np.asarray(out.astype(jnp.float32)).transpose(0, 1, 4, 2, 3)                # [B, F, C, h, w]
    del state, jargs
    free_memory()
    log(f"{what}: JAX compile {compile_s:.1f} s, {jax_s:.2f} s/call")
    return {"network": f"U-Net + motion modules + IP-Adapter ({args.video_preset})",
            "shape": f"{b}x{f}x{ucfg.in_channels}x{side}x{side} (+ {f}x{IP_TOKENS} image tokens)",
            **error_stats(out, ref), "torch_s": torch_s, "jax_s": jax_s, "compile_s": compile_s}


def run_vae(arch: str, args, env) -> list[dict]:
    config = vae_mod.PRESETS[arch]
    side, b = args.size or LATENT_SIDE[arch], args.vae_batch
    img = side * config.downscale
    dtype = JNP_DTYPES[args.dtype]
    what = f"{arch} VAE"
    build32 = lambda: vae_mod.AutoencoderKL(config, rngs=nnx.Rngs(0))  # noqa: E731
    gib = params_gib(build32)
    # The weights are small; the 1024x1024 activations are not (decoder: ~4 x [b, 128, H, W] fp32 live).
    act_gib = 6 * b * 128 * img * img * 4 / GIB + (b * (side * side) ** 2 * 4 / GIB)
    if not fits(what, 2 * gib + act_gib, args, env["torch_dev"], env["jax_gpu"]):
        return [{"network": f"VAE ({arch})", "skipped": "not enough memory"}]

    rng = np.random.default_rng(args.seed + 7)
    z = rng.standard_normal((b, config.latent_channels, side, side)).astype(np.float32)
    image = rng.uniform(-1, 1, (b, config.in_channels, img, img)).astype(np.float32)

    log(f"{what}: building diffusers model ({gib:.2f} GiB fp32)")
    torch.manual_seed(args.seed)
    dev = env["torch_dev"]
    from diffusers import AutoencoderKL as TorchVAE
    model = TorchVAE(**config.to_dict()).eval()
    perturb_constant_parameters(model, args.seed)
    model = model.to(dev)
    tz, timg = torch.from_numpy(z).to(dev), torch.from_numpy(image).to(dev)
    cuda = dev == "cuda"
    with torch.no_grad():
        log(f"{what}: PyTorch decode {b}x{config.latent_channels}x{side}x{side}")
        # F821 here is a ruff false positive: the lambda runs before the `del` below (astral-sh/ruff#20753)
        ref_dec, torch_dec_s = torch_time(lambda: model.decode(tz).sample, warmup=args.warmup,  # noqa: F821
                                          repeats=args.repeats, cuda=cuda)
        ref_dec = ref_dec.cpu().numpy()
        log(f"{what}: PyTorch encode {b}x{config.in_channels}x{img}x{img}")

        def encode():
            dist = model.encode(timg).latent_dist  # noqa: F821  (run before the `del` below; astral-sh/ruff#20753)
            return torch.cat([dist.mean, dist.logvar], dim=1)
        ref_enc, torch_enc_s = torch_time(encode, warmup=args.warmup, repeats=args.repeats, cuda=cuda)
        ref_enc = ref_enc.cpu().numpy()
    sd = model.state_dict()
    del model, tz, timg
    free_memory()

    graphdef, state = convert_and_build(
        sd, abstract_params(build32), lambda: vae_mod.AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)),
        what=what, np_dtype=dtype)
    del sd

    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z)

    def encode_j(state, x):
        mean, logvar = nnx.merge(graphdef, state).encode(x)
        return jnp.concatenate([mean, logvar], axis=-1)

    rows = []
    log(f"{what}: JAX decode")
    out, c_s, j_s = jax_time(decode, (state, jnp.asarray(z.transpose(0, 2, 3, 1))), warmup=args.warmup,
                             repeats=args.repeats)
    out = np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)
    rows.append({"network": f"VAE decode ({arch})", "shape": f"{b}x{config.latent_channels}x{side}x{side}",
                 **error_stats(out, ref_dec), "torch_s": torch_dec_s, "jax_s": j_s, "compile_s": c_s})
    del out
    free_memory()
    log(f"{what}: JAX encode")
    out, c_s, j_s = jax_time(encode_j, (state, jnp.asarray(image.transpose(0, 2, 3, 1))), warmup=args.warmup,
                             repeats=args.repeats)
    out = np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)
    rows.append({"network": f"VAE encode ({arch}; mean+logvar)", "shape": f"{b}x{config.in_channels}x{img}x{img}",
                 **error_stats(out, ref_enc), "torch_s": torch_enc_s, "jax_s": j_s, "compile_s": c_s})
    del state, out
    free_memory()
    return rows


# --------------------------------------------------------------------------------------------- report

def machine_info(env) -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    parts = [f"{cpu_model()}, {os.cpu_count()} CPU cores, {total:.0f} GiB RAM"]
    if env["torch_dev"] == "cuda":
        parts.append(f"torch GPU: {torch.cuda.get_device_name(0)}")
    if env["jax_gpu"]:
        parts.append(f"JAX GPU: {jax.devices()[0].device_kind}")
    import diffusers
    import flax
    parts.append("load average at the start {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    parts.append(f"torch {torch.__version__}, diffusers {diffusers.__version__}, jax {jax.__version__}, "
                 f"flax {flax.__version__}")
    return "; ".join(parts)


def fmt_s(v: float) -> str:
    return "n/a" if v != v else (f"{v:.3f}" if v < 1 else f"{v:.2f}")


def table(arch: str, rows: list[dict], args, env) -> str:
    dev = f"torch {env['torch_dev']} / JAX {env['jax_dev']}"
    prec = args.jax_precision if args.dtype == "float32" else "-"
    lines = [f"**{arch}** (JAX dtype {args.dtype}, JAX fp32 matmul precision {prec}; reference: PyTorch fp32; "
             f"best of {args.repeats} timed call(s) after {args.warmup} warm-up)", "",
             "| network | input | max abs err | max abs err / max\\|ref\\| | mean abs err | max\\|ref\\| "
             "| PyTorch s | JAX s | JAX compile s | dtype | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['network']} | skipped: {r['skipped']} | | | | | | | | {args.dtype} | {dev} |")
            continue
        bad = f" ({r['non_finite']} non-finite values)" if r["non_finite"] else ""
        lines.append(f"| {r['network']} | {r['shape']} | {r['max_abs']:.3g}{bad} | {r['rel']:.3g} | "
                     f"{r['mean_abs']:.3g} | {r['ref_max']:.3g} | {fmt_s(r['torch_s'])} | {fmt_s(r['jax_s'])} | "
                     f"{fmt_s(r['compile_s'])} | {args.dtype} | {dev} |")
    return "\n".join(lines)


def main(args):
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", args.jax_precision)
    want_gpu = args.device != "cpu"
    torch_dev = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
    jax_gpu = want_gpu and jax.default_backend() == "gpu"
    if args.device == "gpu" and not (torch_dev == "cuda" and jax_gpu):
        raise SystemExit(f"--device gpu: torch sees CUDA: {torch.cuda.is_available()}, JAX backend: "
                         f"{jax.default_backend()}; install CUDA builds of both (jax[cuda12], torch+cu12x)")
    env = {"torch_dev": torch_dev, "jax_gpu": jax_gpu, "jax_dev": jax.default_backend()}
    info = machine_info(env)
    log(f"machine: {info}")

    tables = []
    for arch in args.arch:
        rows = []
        if arch == "video":          # the video stage's VAE is SD1.5's: see the sd15 rows
            if not args.skip_unet:
                rows.append(run_video_unet(args, env))
                free_memory()
            tables.append(table(arch, rows, args, env))
            print("\n" + tables[-1] + "\n", flush=True)
            continue
        if not args.skip_unet:
            rows.append(run_unet(arch, args, env))
            free_memory()
        if not args.skip_vae:
            rows.extend(run_vae(arch, args, env))
            free_memory()
        tables.append(table(arch, rows, args, env))
        print("\n" + tables[-1] + "\n", flush=True)

    if args.out:
        cmd = shlex.join([".venv/bin/python", "bench/parity_full.py", *sys.argv[1:]])
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
        load = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        block = (f"\n### `{cmd}`\n\n{stamp}; {info}; load average at the end {load}; "
                 f"peak host RSS {peak:.1f} GiB\n\n"
                 + "\n\n".join(tables) + "\n")
        with open(args.out, "a") as f:
            f.write(block)
        log(f"appended to {args.out}")


if __name__ == "__main__":
    main(ARGS)
