"""The input pipeline against the train step: clips/s one host's loader delivers, and the clips/s one accelerator's
train step consumes, so that the CPU cores each accelerator needs can be read off.

    python bench/input.py [--videos 24] [--frames 16] [--resolution 256] [--stride 4] [--workers 0,1,2]
        [--batch 4] [--preset video] [--mfu 0.4] [--devices "NVIDIA H100,TPU v5p,TPU v5e,TPU v6e"]
        [--out docs/bench_train.md]

1. A WebVid-like copy, made here: --videos H.264 mp4 files at WebVid's size (596x336, 25 fps, 150 frames,
   x264 CRF 23, 4:2:0, as stock web video is), each a slow camera pan and zoom over one of scikit-image's
   sample photographs with a little sensor noise, and a WebVid CSV.
2. `build-webvid` of that copy in each frame format (raw; jpeg q95; h264 CRF 15): build time per video, bytes
   per clip (the frames as stored: zlib'd tensor, JPEGs, H.264 stream), PSNR against the raw build, and the
   WebVid-10M total (10.7 M clips) each implies.
3. CPU per clip: one record read (array_record), decoded and prepared (PrepareClip: frame check, tokenizer)
   in one thread, as a loader worker does it; the CPU time of that thread.
4. The loader: clips/s out of `train.data.make_loader` (batches of --batch) for each format and --workers
   count (grain worker processes; 0: grain's read threads in this process), over --window-s seconds after
   the first batch and --warmup-s more; and the same for a feature cache in the compact (bf16) layout with
   the --preset model's shapes at --frames x --resolution (random values: the loader's cost depends on the
   bytes only).
5. The step: FLOPs per clip of the raw step (frozen encoders inside) and of the cached step at --preset,
   --frames, --resolution, bf16, batch 1, from XLA's cost analysis of the lowered programs (abstract weights:
   nothing is allocated, compiled or run; bench/train.py's compiled count of the raw step agrees within 0.3%),
   and the clips/s one device consumes at --mfu of its dense bf16 peak (`train.loop.PEAK_TFLOPS`).

Cores per accelerator = step clips/s x CPU seconds per clip. The CPU numbers are this machine's; the data
sits in the page cache (storage bandwidth is not measured: the bytes/s each accelerator needs are printed
instead). Real WebVid footage compresses differently from these pans; the
sizes are the synthetic copy's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

# The repository first (bench/train.py must not shadow the `train` package), bench/ last (harness): grain's
# worker processes start from this same path list.
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, _ROOT)] + [str(_HERE)]

from harness import machine, shown_command  # noqa: E402

WEBVID_CLIPS = 10_700_000          # WebVid-10M's train split
FORMATS = (("raw", None), ("jpeg", 95), ("h264", 15))


# --------------------------------------------------------------------------------------------------
# 1. A WebVid-like copy


def photographs() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "stereo_motorcycle"):
        image = getattr(data, name)()
        out.append(np.ascontiguousarray((image[0] if isinstance(image, tuple) else image)[..., :3]))
    return out


def pan_video(photo: np.ndarray, seed: int, frames: int = 150, size=(596, 336)) -> np.ndarray:
    """A camera pan and zoom over `photo`: a crop window of the video's aspect moving along a line while it
    shrinks or grows, resized to `size`, plus Gaussian sensor noise (sigma 2 levels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    aspect = size[0] / size[1]
    base = Image.fromarray(photo)
    crop_w0 = min(w, h * aspect) * rng.uniform(0.55, 0.75)
    zoom = rng.uniform(-0.25, 0.25)
    start, end = rng.uniform(0.0, 1.0, 2), rng.uniform(0.0, 1.0, 2)
    out = np.empty((frames, size[1], size[0], 3), np.uint8)
    for t in range(frames):
        a = t / (frames - 1)
        cw = crop_w0 * (1 + zoom * a)
        ch = cw / aspect
        cx = (start[0] + (end[0] - start[0]) * a) * (w - cw) + cw / 2
        cy = (start[1] + (end[1] - start[1]) * a) * (h - ch) + ch / 2
        frame = base.resize(size, Image.BILINEAR, box=(cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2))
        noisy = np.asarray(frame, np.float32) + rng.normal(0, 2, (size[1], size[0], 3))
        out[t] = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    return out


def write_mp4(frames: np.ndarray, path: str, crf: int = 23, fps: int = 25) -> None:
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_copy(folder: str, videos: int) -> str:
    import csv

    photos = photographs()
    os.makedirs(os.path.join(folder, "videos", "000001_000100"), exist_ok=True)
    with open(os.path.join(folder, "results_bench_train.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir", "duration", "contentUrl"])
        for i in range(videos):
            vid = f"{1000 + i}"
            write_mp4(pan_video(photos[i % len(photos)], seed=i), os.path.join(folder, "videos", "000001_000100",
                                                                              f"{vid}.mp4"))
            w.writerow([vid, f"a slow pan over photograph {i % len(photos)}, take {i // len(photos)}",
                        "000001_000100", "PT00H00M06S", ""])
    return folder


# --------------------------------------------------------------------------------------------------
# 2-4. Builds, bytes, decode, the loader


def build_all(manual: str, data: str, args) -> dict:
    from train.webvid import build

    out = {}
    for fmt, quality in FORMATS:
        t0 = time.perf_counter()
        summary = build(manual, data, frames=args.frames, resolution=args.resolution, stride=args.stride,
                        frames_format=fmt, quality=quality, overwrite=True, progress=False)
        took = time.perf_counter() - t0
        assert summary["built"] == args.videos, summary["skipped"][:3]
        out[fmt] = {"folder": summary["path"], "build_s_per_video": took / args.videos}
    return out


def stored_bytes(folder: str) -> list[int]:
    """The frames of every train record as they are stored (the raw tensor as TFDS's zlib encoding holds it)."""
    import tensorflow_datasets as tfds

    from train.clip_codec import FrameCodec
    from train.webvid import _read_summary

    codec = FrameCodec.from_summary(_read_summary(folder))
    records = tfds.builder_from_directory(folder).as_data_source(split="train")
    sizes = []
    for i in range(len(records)):
        value = records[i][codec.field]
        if codec.format == "raw":
            sizes.append(len(zlib.compress(np.ascontiguousarray(value).tobytes())))
        else:
            sizes.append(sum(len(bytes(v)) for v in np.atleast_1d(value)))
    return sizes


def _prepare(args, prepared: bool):
    from storydiff_jax.models.clip_text import load_tokenizer
    from storydiff_jax.pipelines.components import preset_tokenizer_dir
    from train.data import PrepareClip

    tokenizer = load_tokenizer(preset_tokenizer_dir("<|endoftext|>"))
    return tokenizer, (lambda r: r) if prepared else PrepareClip(args.frames, args.resolution, tokenizer)


def cpu_ms(source, args, prepared: bool = False, repeat: int = 2) -> float:
    """Median milliseconds per clip of one record made into a training example in one thread (read, decode,
    prepare: what a loader worker does per clip), best of `repeat` passes over every clip."""
    _, prepare = _prepare(args, prepared)
    best = []
    for i in range(len(source)):
        times = []
        for _ in range(repeat):
            t0 = time.thread_time()
            prepare(source[i])
            times.append(time.thread_time() - t0)
        best.append(min(times))
    return 1e3 * float(np.median(best))


def loader_rate(source, args, workers: int, prepared: bool = False) -> dict:
    """clips/s out of make_loader over a --window-s window, after --warmup-s of consuming (worker start-up,
    and whatever grain's read threads buffered meanwhile, drained)."""
    from train.data import make_loader

    tokenizer, _ = _prepare(args, prepared)
    t0 = time.perf_counter()
    it = iter(make_loader(source, per_host_batch=args.batch, seed=0, num_frames=args.frames,
                          resolution=args.resolution, tokenizer=tokenizer, prepared=prepared, workers=workers))
    next(it)
    first_s = time.perf_counter() - t0
    while time.perf_counter() - t0 < first_s + args.warmup_s:
        next(it)
    t1, clips = time.perf_counter(), 0
    while time.perf_counter() - t1 < args.window_s:
        clips += len(next(it)["id"])
    took = time.perf_counter() - t1
    del it
    return {"clips_per_s": clips / took, "first_batch_s": first_s}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# --------------------------------------------------------------------------------------------------
# 5. The step: FLOPs per clip, raw and cached


def _bench_train():
    """bench/train.py as a module named so that it cannot shadow the `train` package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", _HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_flops(args) -> dict:
    """XLA cost analysis of the lowered raw and cached train steps (batch 1, bf16), abstract weights; and the
    shapes of the cached features."""
    import jax
    import jax.numpy as jnp

    from storydiff_jax.models.clip_text import load_tokenizer
    from storydiff_jax.pipelines.components import preset_tokenizer_dir
    from storydiff_jax.pipelines.video_components import load_video_config
    from train.config import TrainConfig
    from train.step import FROZEN_ONLY, Trainer

    abstract_split = _bench_train().abstract_split

    cfg = TrainConfig(model=args.preset, data_dir="-", batch_size=1, frames=args.frames, resolution=args.resolution,
                      dtype="bfloat16", warmup=0, schedule="constant")
    trainable, frozen, config = abstract_split(load_video_config(args.preset), cfg)
    trainer = Trainer.build(cfg, config, load_tokenizer(preset_tokenizer_dir("<|endoftext|>")))
    state = jax.eval_shape(trainer.init_state, trainable)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    raw = {"frames": jax.ShapeDtypeStruct((1, args.frames, args.resolution, args.resolution, 3), jnp.uint8),
           "input_ids": jax.ShapeDtypeStruct((1, 77), jnp.int32)}
    feats = jax.eval_shape(trainer.encode_features, frozen, raw)
    cached_frozen = {k: v for k, v in frozen.items() if k not in FROZEN_ONLY}
    cached_frozen["features"] = jax.eval_shape(trainer.constant_features, frozen)
    cached = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16) for k, v in feats.items()}   # the compact layout
    out = {"feature_shapes": {k: list(v.shape[1:]) for k, v in feats.items()}}
    for name, (fz, batch) in {"raw": (frozen, raw), "cached": (cached_frozen, cached)}.items():
        t0 = time.perf_counter()
        lowered = jax.jit(trainer.step_fn).lower(state, fz, batch, lr)
        out[name] = {"flops": float(lowered.cost_analysis()["flops"]), "lower_s": time.perf_counter() - t0}
    return out


def fake_cache(folder: str, clips: int, shapes: dict, frames: int, resolution: int) -> str:
    """A compact (bf16) feature cache of `clips` rows of random values in the layout cache-features writes
    (one shard), read by the same FeatureCache as a real one."""
    import json

    from train import features

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for key in features.PER_CLIP:
        shape = [clips, *shapes[key]]
        a = np.lib.format.open_memmap(os.path.join(folder, features.shard_name(key, 0, 1)), mode="w+",
                                      dtype=np.uint16, shape=tuple(shape))
        for i in range(clips):
            a[i] = rng.integers(0x3e00, 0x4000, shape[1:], dtype=np.uint16)   # bf16 bits of values in [0.125, 2)
        a.flush()
        del a
        arrays[key] = {"shape": shape, "dtype": "bfloat16"}
    ids = np.asarray([f"clip-{i}" for i in range(clips)])
    np.save(os.path.join(folder, features.shard_name("ids", 0, 1)), ids)
    np.save(os.path.join(folder, "ids.npy"), ids)
    for key, shape in (("uncond_image", [1, *shapes["image_feats"][1:]]), ("empty_text", shapes["text_states"])):
        np.save(os.path.join(folder, f"{key}.npy"), np.zeros(shape, np.uint16))
        arrays[key] = {"shape": shape, "dtype": "bfloat16"}
    manifest = {"format": features.FORMAT, "version": features.VERSION, "frames": frames, "resolution": resolution,
                "model": {"name": "bench", "dtype": "bfloat16", "fingerprint": "-"},
                "dataset": {"data_dir": "-", "clips": clips, "ids_hash": "-"}, "storage": "bfloat16",
                "shard_size": clips, "shards": 1, "arrays": arrays}
    with open(os.path.join(folder, features.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return folder


# --------------------------------------------------------------------------------------------------
# The run and the report


def measure(args, work: str) -> dict:
    from train.features import FeatureCache
    from train.webvid import WebVidSource

    res = {"machine": machine(load=True)}
    t0 = time.perf_counter()
    manual = os.path.join(work, "manual")
    videos = os.path.join(manual, "videos", "000001_000100")
    if not (os.path.isdir(videos) and len(os.listdir(videos)) == args.videos):   # --keep: made once
        make_copy(manual, args.videos)
        print(f"copy of {args.videos} videos made in {time.perf_counter() - t0:.0f} s", flush=True)
    builds = build_all(manual, os.path.join(work, "data"), args)
    raw_source = WebVidSource(builds["raw"]["folder"])
    raw_frames = [raw_source[i]["frames"] for i in range(len(raw_source))]
    for fmt, _ in FORMATS:
        b = builds[fmt]
        source = WebVidSource(b["folder"])
        sizes = stored_bytes(b["folder"])
        b["bytes_per_clip"] = float(np.mean(sizes))
        b["file_bytes_per_clip"] = sum(os.path.getsize(os.path.join(b["folder"], n)) for n in os.listdir(b["folder"])
                                       if ".array_record" in n) / len(source)
        b["psnr_min"] = min(psnr(source[i]["frames"], raw_frames[i]) for i in range(len(source)))
        b["cpu_ms"] = cpu_ms(source, args)
        b["loader"] = {w: loader_rate(source, args, w) for w in args.workers}
        print(f"{fmt}: {b['bytes_per_clip'] / 1e3:.0f} kB/clip, PSNR >= {b['psnr_min']:.1f} dB, CPU "
              f"{b['cpu_ms']:.1f} ms/clip, loader " + ", ".join(f"{w} workers {r['clips_per_s']:.1f} clips/s"
                                                                  for w, r in b["loader"].items()), flush=True)
    res["builds"] = builds
    flops = step_flops(args)
    res["step"] = flops
    cache = FeatureCache(fake_cache(os.path.join(work, "cache"), args.cache_clips, flops["feature_shapes"],
                                    args.frames, args.resolution))
    res["cache"] = {"bytes_per_clip": cache.bytes_per_clip(), "float32_bytes_per_clip": 2 * cache.bytes_per_clip(),
                    "cpu_ms": cpu_ms(cache, args, prepared=True),
                    "loader": {w: loader_rate(cache, args, w, prepared=True) for w in args.workers}}
    print(f"feature cache: {cache.bytes_per_clip() / 1e6:.2f} MB/clip, loader "
          + ", ".join(f"{w} workers {r['clips_per_s']:.1f} clips/s" for w, r in res["cache"]["loader"].items()))
    return res


def report(args, argv, res: dict) -> str:
    from train.loop import peak_tflops

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [f"## Input pipeline vs train step, {args.preset}, {args.frames} frames at {args.resolution}², "
           f"stride {args.stride} ({now})", "",
           f"Command: `python {' '.join(shlex.quote(a) for a in ['bench/input.py', *shown_command(argv)])}`", "",
           f"Machine (the loader side): {res['machine']}.", "",
           f"Data: {args.videos} synthetic WebVid-like videos (596x336, 150 frames, x264 CRF 23: slow pans and zooms "
           "over scikit-image's sample photographs with sensor noise), built with `build-webvid` in each format; "
           "the feature cache has the model's per-clip shapes in the compact bf16 layout (random values). CPU ms / "
           "clip: one record read, decoded and prepared in one thread (that thread's CPU time), median over clips. "
           f"Loader: `make_loader`, batches of {args.batch}, clips/s over {args.window_s:.0f} s after the first "
           f"batch and {args.warmup_s:.0f} s more (grain's worker start-up apart), data in the page cache.", "",
           "| source | stored bytes / clip | WebVid-10M total | PSNR vs raw (min) | build s / video | "
           "CPU ms / clip | "
           + " | ".join(f"loader clips/s, {w} worker{'s' if w != 1 else ''}" for w in args.workers) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(args.workers)]
    for fmt, quality in FORMATS:
        b = res["builds"][fmt]
        name = fmt + ("" if quality is None else f" ({'q' if fmt == 'jpeg' else 'CRF '}{quality})")
        out.append(f"| build, {name} | {b['bytes_per_clip'] / 1e3:.0f} kB | "
                   f"{b['bytes_per_clip'] * WEBVID_CLIPS / 1e12:.2f} TB | "
                   f"{'lossless' if fmt == 'raw' else format(b['psnr_min'], '.1f') + ' dB'} | "
                   f"{b['build_s_per_video']:.2f} | {b['cpu_ms']:.1f} | "
                   + " | ".join(f"{b['loader'][w]['clips_per_s']:.1f}" for w in args.workers) + " |")
    c = res["cache"]
    out.append(f"| feature cache, bf16 (float32: {c['float32_bytes_per_clip'] / 1e6:.2f} MB) | "
               f"{c['bytes_per_clip'] / 1e6:.2f} MB | {c['bytes_per_clip'] * WEBVID_CLIPS / 1e12:.1f} TB | "
               f"bf16 | — | {c['cpu_ms']:.2f} | "
               + " | ".join(f"{c['loader'][w]['clips_per_s']:.1f}" for w in args.workers) + " |")
    raw_tf, cached_tf = res["step"]["raw"]["flops"] / 1e12, res["step"]["cached"]["flops"] / 1e12
    out += ["", f"Step FLOPs per clip ({args.preset}, bf16, XLA's cost analysis of the lowered step): raw "
            f"{raw_tf:.2f} TFLOP (encoders inside), cached {cached_tf:.2f} TFLOP ({cached_tf / raw_tf:.0%}).", ""]
    cpu = {fmt: res["builds"][fmt]["cpu_ms"] for fmt, _ in FORMATS}
    cpu["cache"] = c["cpu_ms"]
    head = f"| device (dense bf16 peak) | step clips/s at {args.mfu:.0%} MFU: raw / cached | "
    head += " | ".join(f"cores for {k}" for k in cpu) + " | input MB/s: h264 / cache |"
    out += [head, "|---|---|" + "---|" * len(cpu) + "---|"]
    for device in args.devices:
        peak = peak_tflops(device)
        if peak is None:
            continue
        rate_raw, rate_cached = peak * args.mfu / raw_tf, peak * args.mfu / cached_tf
        cores = [(rate_cached if k == "cache" else rate_raw) * ms / 1e3 for k, ms in cpu.items()]
        out.append(f"| {device} ({peak:.0f} TFLOP/s) | {rate_raw:.1f} / {rate_cached:.1f} | "
                   + " | ".join(f"{x:.2g}" for x in cores)
                   + f" | {rate_raw * res['builds']['h264']['bytes_per_clip'] / 1e6:.1f} / "
                     f"{rate_cached * c['bytes_per_clip'] / 1e6:.0f} |")
    out += ["", "Cores per device = the step's clips/s x CPU seconds per clip (one thread, this machine's cores); "
            "the cached step is fed from the feature cache, the raw step from a build. Input MB/s: what one device "
            "reads from storage at that rate.", ""]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--workers", default="0,1,2", help="grain worker counts to time (0: in this process)")
    p.add_argument("--batch", type=int, default=4, help="clips per loader batch")
    p.add_argument("--warmup-s", type=float, default=3.0, help="seconds of loading before the timing (after the "
                                                                 "first batch)")
    p.add_argument("--window-s", type=float, default=15.0, help="seconds of loading timed")
    p.add_argument("--cache-clips", type=int, default=64, help="rows of the synthetic feature cache")
    p.add_argument("--preset", default="video", choices=["video", "tiny-video"])
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step is assumed to reach")
    p.add_argument("--devices", default="NVIDIA H100,TPU v5p,TPU v5e,TPU v6e",
                   help="device kinds for the consumption rows (names of train.loop.PEAK_TFLOPS)")
    p.add_argument("--keep", type=Path, help="keep the copy, builds and cache in this folder (a later run with the "
                                             "same folder and --videos reuses the copy)")
    p.add_argument("--out", type=Path, help="append the report (markdown) to this file")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        res = measure(args, str(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-input-") as work:
            res = measure(args, work)
    text = report(args, argv, res)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
