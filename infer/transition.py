"""`python -m infer.transition`: a start frame and an end frame in, the video between them out.

Example (random-weight tiny model, runs on a laptop CPU; the frames are noise but every stage runs):
    python -m infer.transition --start a.png --end b.png --out out/walk.mp4

With a converted model (see `python -m convert video --help`):
    python -m infer.transition --model ./video-jax --start a.png --end b.png --prompt "a girl walks home" \\
        --out out/walk.mp4
    python -m infer.transition --model ./video-jax --story-dir out/story --out out/story.mp4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

OUTPUTS = """outputs:
  OUT.mp4 (H.264) or OUT.gif, with OUT.json beside it (settings, seed, model, timings), or
  OUT_DIR/ holding frame_0000.png ... and transition.json. Everything is written under a temporary name
  and renamed when complete: a failed or interrupted run leaves nothing that looks finished."""


def build_parser() -> argparse.ArgumentParser:
    from storydiff_jax import compile_cache
    from storydiff_jax.cli import add_dtype_argument
    from storydiff_jax.pipelines.transition import TransitionOptions
    from storydiff_jax.pipelines.video_components import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m infer.transition",
        description="Render the transition between a start and an end frame (StoryDiffusion's transition videos): "
                    "both frames become IP-Adapter-Plus image tokens, the Semantic Motion Predictor predicts the "
                    "tokens of every frame in between, and an SD1.5 U-Net with AnimateDiff v2 motion modules "
                    "renders the frames. --story-dir turns a story folder from `python -m infer.story` into one "
                    "long video of consecutive transitions.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OUTPUTS)
    frames_in = p.add_argument_group("input frames (give --start and --end, or --story-dir)")
    frames_in.add_argument("--start", metavar="IMAGE", help="first frame (any size: scaled to cover, centre-cropped)")
    frames_in.add_argument("--end", metavar="IMAGE", help="last frame")
    frames_in.add_argument("--story-dir", metavar="DIR", help="a folder written by `python -m infer.story`: its "
                           "panels in order become consecutive transitions (prompt: each end panel's prompt)")
    p.add_argument("--out", required=True, help="OUT.mp4, OUT.gif or an output folder of PNG frames")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="CONVERTED_DIR", help="folder written by `python -m convert video`")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-weight model of that shape (default: "
                     "tiny-video when no --model is given)")
    TransitionOptions.add_arguments(p.add_argument_group("transition settings (written to the .json manifest)"))
    p.add_argument("--motion-norm", choices=["per-frame", "across-frames"], default=None,
                   help="GroupNorm statistics of the motion modules: per-frame = original AnimateDiff, what its "
                        "checkpoints were trained with (default); across-frames = diffusers' MotionAdapter")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of the mp4/gif (default: 8)")
    add_dtype_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    compile_cache.add_argument(p)
    return p


def read_story_dir(folder: str) -> tuple[list[str], list[str]]:
    """(panel image paths, panel prompts) of an infer.story output folder."""
    from storydiff_jax.errors import ConfigError

    path = os.path.join(folder, "story.json")
    if not os.path.isdir(folder):
        raise ConfigError(f"--story-dir {folder}: no such folder; pass a folder written by `python -m infer.story`")
    try:
        with open(path) as f:
            manifest = json.load(f)
        panels = manifest["panels"]
        files = [os.path.join(folder, p["file"]) for p in panels]
        prompts = [str(p.get("prompt", "")) for p in panels]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--story-dir {folder}: no readable story.json with a panel list; pass a folder written by "
                          "`python -m infer.story`") from None
    if len(files) < 2:
        raise ConfigError(f"--story-dir {folder}: {len(files)} panel(s); a transition needs at least 2")
    return files, prompts


def _output_kind(out: str) -> str:
    """'folder' for a name without extension (or ending in /), else the video extension (.mp4 / .gif)."""
    from storydiff_jax.errors import ConfigError

    ext = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
    if out.endswith(("/", os.sep)) or not ext:
        return "folder"
    if ext not in (".mp4", ".gif"):
        raise ConfigError(f"--out {out}: unknown output type {ext!r}; use .mp4, .gif or a folder name without an "
                          "extension")
    return ext


def _default_side(image, stride: int) -> tuple[int, int]:
    return max(stride, round(image.height / stride) * stride), max(stride, round(image.width / stride) * stride)


def run(args: argparse.Namespace, log=print, *, pipe=None, listener=None) -> str:
    """Render the transition(s) of `args` and write `args.out`; returns its path.

    pipe: an already loaded TransitionPipeline for `args.model`/`args.preset` (the web app loads once);
    listener: called with (phase, done, total) as each transition progresses (the web app's progress bar).
    """
    import jax.numpy as jnp
    import numpy as np

    from storydiff_jax.cli import compute_dtype
    from storydiff_jax.errors import ConfigError
    from storydiff_jax.images import load_image
    from storydiff_jax.lora import check_lora_files
    from storydiff_jax.pipelines.progress import Progress
    from storydiff_jax.pipelines.transition import TransitionOptions, TransitionPipeline, check_options, fit_image
    from storydiff_jax.pipelines.video_components import load_video_config
    from storydiff_jax.video_io import write_video

    out = os.path.abspath(args.out)
    kind = _output_kind(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise ConfigError(f"{args.out} already exists; choose another --out or pass --overwrite")
    if args.story_dir:
        if args.start or args.end:
            raise ConfigError("give either --story-dir or --start/--end, not both")
        files, prompts = read_story_dir(args.story_dir)
    elif args.start and args.end:
        files, prompts = [args.start, args.end], [args.prompt or "", args.prompt or ""]
    else:
        raise ConfigError("no input frames: give --start A.png --end B.png, or --story-dir DIR")
    # Read every picture and check every setting before loading any weights: bad input fails in a second.
    images = [load_image(f) for f in files]
    source = args.model or args.preset or "tiny-video"
    config = load_video_config(source)
    height, width = _default_side(images[0], config.latent_stride)
    # Unset settings: this model's defaults, the start frame's size, the SMP when the model has a trained one.
    defaults = {**TransitionOptions.defaults(tiny=source.startswith("tiny-")), "height": height, "width": width,
                "smp": "predict" if config.smp is not None else "none"}
    base = TransitionOptions.from_args(args, defaults=defaults)
    check_options(config, base)
    check_lora_files(base.loras)
    height, width = base.height, base.width
    if args.fps <= 0:
        raise ConfigError(f"--fps must be > 0, got {args.fps}")
    if not args.model:
        log(f"no --model given: using the random-weight preset {source!r} (shapes only, the frames are noise); "
            "convert real checkpoints with `python -m convert video` for real videos")
    if args.smp is None and config.smp is None:
        log("this model has no trained Semantic Motion Predictor: using plain token interpolation (--smp none)")
    if any(im.size != (width, height) for im in images):
        log(f"frames are scaled to cover {width}x{height} and centre-cropped")
    dtype = pipe.components.dtype if pipe is not None else compute_dtype(args.dtype)
    t0 = time.perf_counter()
    pipe = pipe or TransitionPipeline.from_pretrained(source, dtype=dtype, motion_norm=args.motion_norm)
    load_s = time.perf_counter() - t0
    progress = Progress(bars=not args.quiet, listener=listener)
    tokens, uncond = pipe.image_tokens([fit_image(im, height, width) for im in images])
    frames, transitions = [], []
    for k in range(len(images) - 1):
        options = dataclasses.replace(base, prompt=args.prompt if args.prompt is not None else prompts[k + 1])
        if len(images) > 2 and not args.quiet:
            log(f"transition {k + 1}/{len(images) - 1}: {files[k]} -> {files[k + 1]}")
        result = pipe(images[k], images[k + 1], options, progress=progress, tokens=(tokens[k:k + 2], uncond))
        # Consecutive transitions share their boundary frame: write it once.
        frames.append(result.frames if k == 0 else result.frames[1:])
        transitions.append({"start": files[k], "end": files[k + 1], "prompt": options.prompt,
                            "timings": result.info["timings"]})
    video = np.concatenate(frames)
    manifest = {
        "model": pipe.components.source,
        "dtype": jnp.dtype(dtype).name,
        "devices": [str(d) for d in pipe.mesh.devices.flat],
        "settings": {**base.to_dict(), "fps": args.fps,
                     "motion_norm": "per-frame" if pipe.config.unet.motion.per_frame_norm else "across-frames"},
        "seed": base.seed,
        "has_smp": pipe.has_smp,
        "frames": int(video.shape[0]),
        "size": [int(video.shape[1]), int(video.shape[2])],
        "transitions": transitions,
        "timings": {"load_s": load_s},
    }
    _write(out, kind, video, args.fps, manifest, write_video)
    log(f"wrote {video.shape[0]} frames ({video.shape[2]}x{video.shape[1]}) to {out}")
    return out


def _write(out: str, kind: str, video, fps: float, manifest: dict, write_video) -> None:
    """Video + manifest, both or neither: temporary names first, renamed at the end."""
    from storydiff_jax.outputs import staged_folder, staging_file

    if kind == "folder":
        with staged_folder(out) as tmp:
            frames = os.path.join(tmp, "frames")
            write_video(video, frames + os.sep, fps=fps)
            for name in os.listdir(frames):      # the PNGs sit beside the manifest, not in a subfolder
                os.replace(os.path.join(frames, name), os.path.join(tmp, name))
            os.rmdir(frames)
            with open(os.path.join(tmp, "transition.json"), "w") as f:
                json.dump(manifest, f, indent=2)
        return
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    manifest_path = os.path.splitext(out)[0] + ".json"
    fd, tmp_manifest = staging_file(parent, ".transition-", ".json.partial")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2)
        write_video(video, out, fps=fps)
        os.replace(tmp_manifest, manifest_path)
    finally:
        if os.path.exists(tmp_manifest):
            os.remove(tmp_manifest)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storydiff_jax import compile_cache
    from storydiff_jax.cli import run_command

    def work():
        compile_cache.enable(args.compile_cache)
        run(args)

    return run_command(work, interrupted="no video was written")


if __name__ == "__main__":
    sys.exit(main())
