"""One transition video, ours vs diffusers' AnimateDiffPipeline, side by side: time, frames/s, peak memory.

    python bench/transition.py [--preset video] [--height 512] [--width 512] [--frames 16] [--steps 25] \\
        [--guidance 7.5] [--sides ours,torch] [--dtype auto|bfloat16|float16|float32] \\
        [--torch-dtype auto|float16|float32] [--repeat 1] [--torch-threads N] [--out docs/bench_transition.md]

Both sides render one transition (start frame -> end frame) with the same work:
  ours  - `TransitionPipeline` on preset --preset (random weights): CLIP ViT-H-14 image encoder +
          IP-Adapter-Plus Resampler for both frames, the Semantic Motion Predictor (`smp="predict"`: one
          16-token set per frame), the CLIP text encoder, the video U-Net (SD1.5 + AnimateDiff v2 motion
          modules + IP-Adapter decoupled cross-attention) for --steps DDIM steps with classifier-free
          guidance (one jitted lax.scan), VAE decode of every frame. `anchor=False`: the end frames are
          not held to the input pictures, so both sides do the same denoising work;
  torch - diffusers' `AnimateDiffPipeline`: a random `UNet2DConditionModel` of the same config +
          a random `MotionAdapter` (v2 layout: mid-block module, table of 32) -> `UNetMotionModel`, random
          VAE and CLIP text encoder, a random `CLIPVisionModelWithProjection` of the same size as
          `image_encoder`, and a random IP-Adapter-Plus written by this script in the ORIGINAL
          tencent-ailab format ({"image_proj", "ip_adapter"} .bin) and loaded with `load_ip_adapter`;
          `ip_adapter_image=` the start frame, `DDIMScheduler` from the same config (linear betas
          0.00085-0.012, leading, steps_offset 1), same frames, size, steps and guidance.
Deliberate differences: ours encodes both pictures and runs the SMP (a few ms; diffusers has no SMP, it
gives every frame the start frame's tokens); ours decodes --decode-batch frames per VAE call, diffusers
all frames at once (its decode_chunk_size 16). Different random weights and RNGs: same work, not the same
pixels.

Each side runs in its own subprocess (so the peak-memory counters belong to it alone): build the models,
then render the transition 1 + --repeat times with the same shapes. The first call includes JAX's
compilation (torch: cuDNN autotuning, allocator growth) and is reported apart; the time per video is the
fastest later call. frames/s = frames / time per video.

Peak memory: GPU - JAX `jax.devices()[0].memory_stats()['peak_bytes_in_use']` vs
`torch.cuda.max_memory_allocated()` (each process's allocator peak, weights included); CPU - the peak RSS
of each process (the only like-for-like number there).

Targets (GPU, preset video, 512x512, 16 frames, 25 steps): ours >= 2x torch's frames/s at <= 1/2 its peak
memory. On a CPU, a functional check with tiny models:

    python bench/transition.py --preset tiny-video --height 64 --width 64 --frames 4 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    ROOT,
    cpu_model,
    fmt_bytes,
    fmt_s,
    machine,
    peak_rss_bytes,
    ratio,
    settings_key,
    shown_command,
    spawn,
    write_worker_result,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIDES = ("ours", "torch")
PROMPT = "a red fox walks through a snowy forest, soft morning light"
NEGATIVE = "blurry, low quality"
TARGET = ("GPU, preset video, 512x512, 16 frames, 25 steps: ours >= 2x torch's frames/s at <= 1/2 its "
          "peak memory")
REAL_COMMAND = "python bench/transition.py --preset video --height 512 --width 512 --frames 16 --steps 25 " \
               "--out docs/bench_transition.md"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def pictures(height: int, width: int):
    """Deterministic start/end pictures: a bright disc moving across a colour gradient (uint8 HWC)."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for k, (cx, cy, hue) in enumerate(((0.25, 0.4, 0.0), (0.75, 0.6, 1.0))):
        img = np.stack([x / width, y / height, np.full_like(x, 0.3 + 0.4 * hue)], -1) * 180
        disc = ((x - cx * width) ** 2 + (y - cy * height) ** 2) < (0.15 * min(height, width)) ** 2
        img[disc] = (240, 200 - 120 * k, 60 + 150 * k)
        out.append(img.astype(np.uint8))
    return out


def _settings_key(args, side: str) -> str:
    fields = {k: getattr(args, k) for k in ("preset", "height", "width", "frames", "steps", "guidance", "dtype",
                                            "torch_dtype", "seed", "repeat", "decode_batch")}
    fields["side"] = side
    if side == "torch":
        fields["torch_threads"] = args.torch_threads
    return settings_key(side, fields)


# --------------------------------------------------------------------------------------------------
# Workers (one side per process)
# --------------------------------------------------------------------------------------------------

def ours_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from storydiff_jax.pipelines.transition import TransitionOptions, TransitionPipeline

    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if gpu else "float32")
    t0 = time.perf_counter()
    pipe = TransitionPipeline.from_pretrained(args.preset, dtype=getattr(jnp, dtype), seed=args.seed)
    jax.block_until_ready(pipe._states)
    build_s = time.perf_counter() - t0
    start, end = pictures(args.height, args.width)
    options = TransitionOptions(prompt=PROMPT, negative=NEGATIVE, frames=args.frames, steps=args.steps,
                                guidance=args.guidance, smp="predict", seed=args.seed, height=args.height,
                                width=args.width, anchor=False, decode_batch=args.decode_batch)
    runs, infos = [], []
    for i in range(1 + args.repeat):
        t0 = time.perf_counter()
        result = pipe(start, end, options, progress=False)   # returns host uint8 frames: all work is done
        runs.append(time.perf_counter() - t0)
        infos.append(result.info["timings"])
        print(f"[ours] run {i + 1}: {runs[-1]:.2f} s {result.info['timings']}", flush=True)
    best = min(range(1, len(runs)), key=lambda k: runs[k])
    res = {"side": "ours", "framework": "jax", "backend": dev.platform,
           "device": dev.device_kind if gpu else cpu_model(),
           "versions": f"jax {jax.__version__}, flax {importlib.import_module('flax').__version__}",
           "dtype": dtype, "build_s": build_s, "first_s": runs[0], "runs_s": runs[1:], "video_s": runs[best],
           "phases_s": infos[best], "frames": int(result.frames.shape[0]), "peak_rss": peak_rss_bytes()}
    stats = None
    with contextlib.suppress(Exception):   # backends without allocator statistics
        stats = dev.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        res["peak_device"] = int(stats["peak_bytes_in_use"])
    pix = np.asarray(result.frames, np.float32)
    res["pixels"] = {"mean": float(pix.mean()), "std": float(pix.std())}
    return res


def _clip_text_config(cfg):
    from transformers import CLIPTextConfig

    d = {k: v for k, v in cfg.to_dict().items() if k != "with_projection"}
    return CLIPTextConfig(**d)


def _ip_adapter_plus_file(folder: Path, unet, proj_cfg, seed: int) -> str:
    """A random IP-Adapter-Plus in the ORIGINAL format: {"image_proj": Resampler, "ip_adapter": layers}.

    The ip layers are numbered as diffusers' loader (and the original IP-Adapter code) count them: the
    k-th cross-attention processor of the U-Net (motion modules and self-attention skipped) reads key
    2k+1. Widths follow the same rule as the loader (the block's channel count).
    """
    import torch

    g = torch.Generator().manual_seed(seed + 11)
    h, inner, ffn = proj_cfg.hidden_dim, proj_cfg.heads * proj_cfg.dim_head, proj_cfg.hidden_dim * proj_cfg.ffn_ratio

    def lin(out, inp):
        return torch.randn(out, inp, generator=g) * inp ** -0.5

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)

    proj = {"latents": torch.randn(1, proj_cfg.num_queries, h, generator=g) * h ** -0.5,
            "proj_in.weight": lin(h, proj_cfg.embed_dim), "proj_in.bias": torch.zeros(h),
            "proj_out.weight": lin(proj_cfg.output_dim, h), "proj_out.bias": torch.zeros(proj_cfg.output_dim)}
    proj["norm_out.weight"], proj["norm_out.bias"] = norm(proj_cfg.output_dim)
    for i in range(proj_cfg.depth):
        for n in (f"layers.{i}.0.norm1", f"layers.{i}.0.norm2", f"layers.{i}.1.0"):
            proj[f"{n}.weight"], proj[f"{n}.bias"] = norm(h)
        proj[f"layers.{i}.0.to_q.weight"] = lin(inner, h)
        proj[f"layers.{i}.0.to_kv.weight"] = lin(2 * inner, h)
        proj[f"layers.{i}.0.to_out.weight"] = lin(h, inner)
        proj[f"layers.{i}.1.1.weight"] = lin(ffn, h)
        proj[f"layers.{i}.1.3.weight"] = lin(h, ffn)

    cfg = unet.config
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            width = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            width = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            width = cfg.block_out_channels[int(name[len("down_blocks.")])]
        for p in ("to_k_ip", "to_v_ip"):
            layers[f"{key}.{p}.weight"] = lin(width, cfg.cross_attention_dim)
        key += 2
    path = folder / "ip-adapter-plus_sd15.bin"
    torch.save({"image_proj": proj, "ip_adapter": layers}, path)
    return path.name


def build_torch_pipeline(preset: str, device: str, dtype, seed: int):
    """diffusers' AnimateDiffPipeline + IP-Adapter-Plus at the sizes of our preset, random weights."""
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from storydiff_jax.pipelines.video_components import PRESETS
    from storydiff_jax.tokenizer_files import EOS, write_clip_tokenizer

    cfg = PRESETS[preset]
    ucfg, mcfg = cfg.unet.unet, cfg.unet.motion
    torch.manual_seed(seed)
    with torch.device(device):        # random init on the GPU is fast; on CPU this is the host anyway
        d = ucfg.to_dict()
        d.pop("_class_name")
        unet2d = UNet2DConditionModel(**d)
        adapter = MotionAdapter(block_out_channels=tuple(ucfg.block_out_channels),
                                motion_layers_per_block=ucfg.layers_per_block,
                                motion_num_attention_heads=mcfg.num_heads, motion_norm_num_groups=mcfg.norm_groups,
                                motion_max_seq_length=mcfg.max_frames, use_motion_mid_block=True)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        del unet2d
        vae = AutoencoderKL.from_config(cfg.vae.to_dict())
        text_encoder = CLIPTextModel(_clip_text_config(cfg.text_encoder))
        vision = {k: v for k, v in cfg.image_encoder.to_dict().items()}
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    size = cfg.image_encoder.image_size
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tok_dir = Path(tempfile.mkdtemp(prefix="bench-transition-tokenizer-"))
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tok_dir, pad_token=EOS)))
    scheduler = DDIMScheduler.from_config(cfg.scheduler.to_dict())
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=scheduler, feature_extractor=feature_extractor,
                               image_encoder=image_encoder)
    ip_dir = Path(tempfile.mkdtemp(prefix="bench-transition-ip-"))
    name = _ip_adapter_plus_file(ip_dir, pipe.unet, cfg.image_proj, seed)
    pipe.load_ip_adapter(str(ip_dir), subfolder="", weight_name=name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    ip_layers = sum(type(p).__name__.startswith("IPAdapter") for p in pipe.unet.attn_processors.values())
    if ip_layers < 1:
        raise RuntimeError("load_ip_adapter installed no IP-Adapter attention processor")
    # The adapter's weights now live in the U-Net; drop the separate copy so it does not count twice.
    pipe.motion_adapter = None
    del adapter
    pipe = pipe.to(device=device, dtype=dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    pipe.ip_layers = ip_layers
    return pipe


def torch_worker(args) -> dict:
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.set_grad_enabled(False)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = args.torch_dtype if args.torch_dtype != "auto" else ("float16" if cuda else "float32")
    dtype = getattr(torch, name)
    t0 = time.perf_counter()
    pipe = build_torch_pipeline(args.preset, device, dtype, args.seed)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated() if cuda else None
    start, _ = pictures(args.height, args.width)
    runs, frames = [], None
    for i in range(1 + args.repeat):
        t0 = time.perf_counter()
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=args.frames, height=args.height,
                   width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   ip_adapter_image=Image.fromarray(start), output_type="np",
                   generator=torch.Generator(device).manual_seed(args.seed))
        if cuda:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
        frames = out.frames[0]                # float [F, H, W, 3] in [0, 1], on the host
        print(f"[torch] run {i + 1}: {runs[-1]:.2f} s", flush=True)
    best = min(range(1, len(runs)), key=lambda k: runs[k])
    res = {"side": "torch", "framework": "torch", "backend": "gpu" if cuda else "cpu",
           "device": torch.cuda.get_device_name(0) if cuda else cpu_model(),
           "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
           "dtype": name, "build_s": build_s, "first_s": runs[0], "runs_s": runs[1:], "video_s": runs[best],
           "frames": int(frames.shape[0]), "peak_rss": peak_rss_bytes(), "threads": torch.get_num_threads(),
           "ip_layers": pipe.ip_layers}
    if cuda:
        res["peak_device"] = int(torch.cuda.max_memory_allocated())
        res["weights_device"] = int(weights)
    pix = np.asarray(frames, np.float32) * 255
    res["pixels"] = {"mean": float(pix.mean()), "std": float(pix.std())}
    return res


def run_worker(args) -> int:
    work = (lambda: torch_worker(args)) if args.worker == "torch" else (lambda: ours_worker(args))
    return write_worker_result("side", args.worker, work, args.result)


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def _mem(res: dict, gpu: bool):
    """The bytes compared: the device allocator's peak on GPU, the process's peak RSS on CPU."""
    return res.get("peak_device") if gpu else res.get("peak_rss")


def table(args, results: dict, gpu: bool) -> str:
    ref = results.get("torch")
    ref = None if ref is None or "error" in ref else ref
    lines = ["| side | dtype | first call (compile / warm-up + run) | per video | frames/s | phases | "
             f"peak memory ({'device' if gpu else 'RSS'}) | speed ours / torch | memory torch / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side in args.sides:
        r = results.get(side)
        if r is None:
            continue
        label = {"ours": f"ours (TransitionPipeline, {args.preset})",
                 "torch": "diffusers AnimateDiffPipeline + IP-Adapter-Plus"}[side]
        if "error" in r:
            lines.append(f"| {label} | | failed: {r['error']} | | | | | | |")
            continue
        fps = r["frames"] / r["video_s"]
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r.get("phases_s", {}).items()) or "-"
        if side == "torch" or ref is None:
            tr = mr = "1 (reference)" if side == "torch" else "n/a"
        else:
            t = ratio(ref["video_s"], r["video_s"])
            m = ratio(_mem(ref, gpu), _mem(r, gpu))
            tr = "n/a" if t is None else f"**{t:.2f}x**"
            mr = "n/a" if m is None else f"**{m:.2f}x**"
        lines.append(f"| {label} | {r['dtype']} | {fmt_s(r['first_s'])} | {fmt_s(r['video_s'])} | {fps:.2f} | "
                     f"{phases} | {fmt_bytes(_mem(r, gpu))} | {tr} | {mr} |")
    return "\n".join(lines)


def report(args, argv, results: dict) -> str:
    ok = [r for r in results.values() if "error" not in r]
    gpu = bool(ok) and all(r.get("backend") == "gpu" for r in ok)
    functional = args.preset.startswith("tiny-") or not gpu
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = "CPU / tiny functional run — NOT the target measurement" if functional else "GPU measurement"
    out = [(f"## Transition benchmark, {args.preset} {args.height}x{args.width}, {args.frames} frames, "
            f"{args.steps} DDIM steps, guidance {args.guidance} — {title} ({now})"), ""]
    if functional:
        what = f"{'tiny ' if args.preset.startswith('tiny-') else ''}random-weight models{'' if gpu else ', CPU'}"
        out += [(f"> **Functional run only** ({what}): it shows the benchmark runs end to end on both sides; its "
                 "times and ratios say nothing about the targets. The real measurement: `bash bench/run_gpu.sh "
                 f"transition` on a GPU machine (`{REAL_COMMAND}`)."), ""]
    out += [f"Command: `python {' '.join(shlex.quote(a) for a in ['bench/transition.py', *shown_command(argv)])}`", ""]
    reused = sorted({str(Path(r["reused"]).parent) for r in results.values() if r.get("reused")})
    if reused:
        which = ", ".join(s for s, r in results.items() if r.get("reused"))
        out += [f"(Results of {which} taken from earlier runs with the same settings, kept in "
                f"{', '.join(reused)}.)", ""]
    devices = "; ".join(f"{r['side']}: {r.get('backend')} {r.get('device')} ({r.get('versions')}"
                        + (f", {r['threads']} thread(s)" if r.get("threads") and not gpu else "") + ")" for r in ok)
    out += [f"Machine: {machine(load=True)}. {devices}", ""]
    out.append(table(args, results, gpu))
    out.append("")
    memory = ("device allocator peaks (JAX peak_bytes_in_use vs torch max_memory_allocated), weights included"
              if gpu else "peak RSS of each side process (weights, activations, framework)")
    out.append("Per video: the fastest call after the first (one call = image encoding, SMP, text encoding, "
               f"{args.steps} denoising steps with CFG over {args.frames} frames, VAE decode, frames on the host); "
               "the first call includes JAX compilation (torch: warm-up). Ratios > 1 mean ours is faster / "
               f"smaller. Memory: {memory}.")
    out.append(f"Target: {TARGET}. Same work on both sides except: ours runs the Semantic Motion Predictor "
               "(a few ms; diffusers has none: every frame gets the start frame's image tokens) and encodes "
               "both pictures; ours has anchor=False here (its default holds the end frames to the input "
               f"pictures); ours decodes {args.decode_batch} frames per VAE call, diffusers "
               f"{min(16, args.frames)}.")
    for r in ok:
        if r.get("ip_layers"):
            out.append(f"diffusers side: IP-Adapter-Plus image branch in {r['ip_layers']} cross-attention layers "
                       "(loaded from the original-format .bin written by the script); its MotionAdapter copy is "
                       "dropped after `from_unet2d`, so only the U-Net's weights count.")
        if r.get("weights_device"):
            out.append(f"torch weights on the device: {fmt_bytes(r['weights_device'])}.")
    bad = [r["side"] for r in ok if r.get("pixels", {}).get("std", 1.0) == 0.0
           or r.get("pixels", {}).get("mean") != r.get("pixels", {}).get("mean")]
    if bad:
        out.append(f"Note: constant or NaN frames from {', '.join(bad)} (random weights; the timing is still "
                   "the full work).")
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="video", choices=["video", "tiny-video"],
                   help="video: real SD1.5 + AnimateDiff v2 + ViT-H-14 + IP-Adapter-Plus + SMP sizes; "
                   "tiny-video: a CPU functional check")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of ours,torch")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="our dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--torch-dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="diffusers' dtype (auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--decode-batch", type=int, default=4, help="ours: frames per VAE decode call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="timed calls after the first (the fastest is reported)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads for diffusers (0: torch's default); on a busy shared CPU try 1")
    p.add_argument("--out", type=Path, help="append the report (markdown) to this file")
    p.add_argument("--results", type=Path, help="keep each side's result JSON in this folder")
    p.add_argument("--reuse", action="store_true", help="take stored results (--results) of identical settings")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in args.sides if s not in SIDES]
    if bad:
        p.error(f"unknown side(s) {', '.join(bad)}; choose from {', '.join(SIDES)}")
    if args.repeat < 1:
        p.error("--repeat must be >= 1 (the first call includes compilation)")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    # Settings this model cannot render fail here, in one line, before any subprocess starts.
    from storydiff_jax.errors import ConfigError
    from storydiff_jax.pipelines.transition import TransitionOptions, check_options
    from storydiff_jax.pipelines.video_components import PRESETS
    try:
        check_options(PRESETS[args.preset], TransitionOptions(frames=args.frames, steps=args.steps,
                                                              height=args.height, width=args.width,
                                                              guidance=args.guidance))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    sides = list(args.sides)
    if "torch" in sides and not (importlib.util.find_spec("torch") and importlib.util.find_spec("diffusers")):
        print("torch/diffusers not importable: skipping the diffusers side", file=sys.stderr)
        sides.remove("torch")
        args.sides = sides
    results_dir = args.results or Path(tempfile.mkdtemp(prefix="bench-transition-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    results = {side: spawn(__file__, argv, "side", side, results_dir / f"{_settings_key(args, side)}.json",
                         reuse=args.reuse, torch_side=side == "torch") for side in sides}
    text = report(args, argv, results)
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(("\n" if args.out.exists() and args.out.stat().st_size else "") + text)
        print(f"appended to {args.out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
