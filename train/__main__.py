"""`python -m train`: train the Semantic Motion Predictor (+ IP-Adapter image branch, motion modules); export."""

from __future__ import annotations

import argparse
import signal
import sys

from storydiff_jax import compile_cache
from storydiff_jax.cli import run_command

from .config import TrainConfig

DESCRIPTION = """\
Train the transition-video model's Semantic Motion Predictor together with IP-Adapter-Plus's image projection
and to_k_ip/to_v_ip layers and the AnimateDiff motion modules (--freeze-motion keeps those fixed); the SD1.5
U-Net, VAE, text encoder and CLIP image encoder stay frozen. Loss: epsilon-prediction MSE over all frames,
with text and image-token dropout for classifier-free guidance; AdamW, warmup + cosine/constant schedule,
global-norm clipping; batches sharded over a `data` (+ `fsdp`) mesh; orbax checkpoints (params, optimizer,
step, RNG and the data iterator) that resume exactly, also after SIGKILL; SIGTERM saves before exiting.

commands:
  smp     train (or resume, when --workdir holds this run) on a clip folder or a WebVid build
  export  write a run's newest checkpoint as a converted video folder for `python -m infer.transition --model`
  build-webvid  the WebVid TFDS builder: WebVid's CSVs + videos -> array_record clips of L frames at R x R
  cache-features  the frozen encoders' outputs of a dataset, computed once (smp --features reads them)

Data: a WebVid build (build-webvid; read through TFDS's array_record source, no TensorFlow needed), or a clip
folder (index.json + one .npz of uint8 [T, H, W, 3] frames per clip, from train.data.write_clip_folder)."""


def _model_args(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="CONVERTED_DIR", help="folder written by `python -m convert video`")
    src.add_argument("--preset", choices=("tiny-video", "video"), help="random-weight model of that shape")


def _distributed_args(p):
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() (from the cluster's environment, or the "
                        "three options below); run the same command on every host (docs/training.md)")
    p.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)


def _start_distributed(args) -> None:
    from storydiff_jax.errors import ConfigError

    from .loop import init_distributed

    if args.distributed:
        init_distributed(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise ConfigError("--coordinator / --num-processes / --process-id need --distributed; add it")


def _smp_parser(sub):
    p = sub.add_parser("smp", help="train the SMP (+ image projection, IP layers, motion modules)",
                       description="Train or resume a run. All settings except --mesh, --remat, --save-every, "
                                   "--keep, --log-every must match when resuming in the same --workdir.")
    p.add_argument("--workdir", required=True, help="checkpoints, logs and TensorBoard events of this run")
    _model_args(p)
    TrainConfig.add_arguments(p)
    _distributed_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar; metrics as log lines")
    compile_cache.add_argument(p)
    return p


def _webvid_parser(sub):
    from .clip_codec import DEFAULT_FORMAT, DEFAULT_H264_CRF, DEFAULT_JPEG_QUALITY, FORMATS
    from .webvid_input import DEFAULT_LAYOUT

    p = sub.add_parser("build-webvid", help="WebVid videos -> TFDS `webvid` dataset (array_record)",
                       description="Build the `webvid` TFDS dataset: one clip per video, --frames frames --stride "
                                   "apart from the middle of the video, short side resized to --resolution and "
                                   "centre-cropped, stored as --frames-format. Input: WebVid's CSVs + videos, or "
                                   "video2dataset's webdataset tar shards. Missing, corrupt and too-short videos are "
                                   "skipped and named in the summary (printed, and webvid_build.json next to the "
                                   "records). The build goes to DATA_DIR/webvid/l<L>_r<R>_s<S>[_<format>]/1.0.0 and "
                                   "appears only when complete. --beam-runner runs it as an Apache Beam pipeline "
                                   "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PortableRunner, ...).")
    p.add_argument("--manual-dir", required=True,
                   help="WebVid's CSV files (videoid, name, page_dir, duration, contentUrl) and the videos, or "
                        "video2dataset's tar shards (00000.tar, ...; or in train/, val/, test/ folders)")
    p.add_argument("--data-dir", required=True, help="TFDS data dir the build is written under")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (L)")
    p.add_argument("--resolution", type=int, default=256, help="square frame side (R)")
    p.add_argument("--stride", type=int, default=4, help="source frames between clip frames (AnimateDiff: 4)")
    p.add_argument("--frames-format", choices=FORMATS, default=DEFAULT_FORMAT,
                   help=f"how frames are stored (default {DEFAULT_FORMAT}): h264 = the clip as one H.264 stream, "
                        "jpeg = a JPEG per frame, raw = lossless uint8 (about 30x and 5x the bytes of h264 and jpeg; "
                        "docs/training.md)")
    p.add_argument("--jpeg-quality", type=int, help=f"JPEG quality 1-100 (default {DEFAULT_JPEG_QUALITY})")
    p.add_argument("--h264-crf", type=int, help=f"H.264 constant rate factor 0-51, lower is better (default "
                                                f"{DEFAULT_H264_CRF})")
    p.add_argument("--layout", default=DEFAULT_LAYOUT,
                   help=f"video path under --manual-dir, a format string over CSV columns (default {DEFAULT_LAYOUT})")
    p.add_argument("--limit", type=int, help="build only the first N rows of each CSV (samples of each split)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (output is the same for any number)")
    p.add_argument("--beam-runner", metavar="RUNNER",
                   help="run the build as an Apache Beam pipeline on RUNNER (needs storydiff-jax[beam])")
    p.add_argument("--beam-options", default="", metavar="FLAGS",
                   help="the runner's pipeline options as one string, written with '=' since it starts with --: "
                        "--beam-options='--direct_num_workers=4 --direct_running_mode=multi_processing' or "
                        "--beam-options='--project=P --region=R --temp_location=gs://...'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing build of the same settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _features_parser(sub):
    from .features import DEFAULT_SHARD_SIZE

    p = sub.add_parser("cache-features", help="the frozen encoders' outputs of a dataset, for `smp --features`",
                       description="Compute once what the train step's frozen encoders give for each clip: the VAE "
                                   "posterior's mean and log-variance of every frame, the CLIP penultimate states of "
                                   "the first and last frames, the caption's text states (plus the zero image's and "
                                   "the empty caption's), in shards of --shard-size clips, stored in the --dtype "
                                   "(bfloat16: half the bytes). `smp --features OUT` then trains on them; it checks "
                                   "that frames, resolution, dtype, model and dataset match. OUT is complete once its "
                                   "manifest.json exists; a stopped run keeps its finished shards and the same "
                                   "command resumes. With --distributed every host writes its share of the shards.")
    p.add_argument("--out", required=True, metavar="CACHE_DIR")
    _model_args(p)
    TrainConfig.add_arguments(p, only=("data_dir", "frames", "resolution", "dtype", "batch_size"), help={
        "data_dir": "clip folder or WebVid build", "frames": "frames per clip (L), as the training run",
        "resolution": "square frame side, as the training run", "dtype": "as the training run",
        "batch_size": "clips per encoder call (over this host's devices)"})
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"clips per shard (default {DEFAULT_SHARD_SIZE}): the unit a resumed or multi-host run "
                        "skips or shares out")
    _distributed_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CACHE_DIR (or an unfinished one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    compile_cache.add_argument(p)
    return p


def _cache_features(args) -> int:
    def work():
        from .features import write_features

        compile_cache.enable(args.compile_cache)
        _start_distributed(args)
        cfg = run_config(args)
        write_features(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet, shard_size=args.shard_size)

    return run_command(work, interrupted="cache-features stopped; the finished shards are kept: the same command "
                                         "resumes")


def _build_webvid(args) -> int:
    def work():
        from storydiff_jax.errors import ConfigError

        from .webvid import build, format_summary

        for flag, value, fmt in (("--jpeg-quality", args.jpeg_quality, "jpeg"), ("--h264-crf", args.h264_crf, "h264")):
            if value is not None and args.frames_format != fmt:
                raise ConfigError(f"{flag} applies to --frames-format {fmt}, this build is --frames-format "
                                  f"{args.frames_format}; drop it or change the format")
        quality = args.jpeg_quality if args.frames_format == "jpeg" else args.h264_crf
        summary = build(args.manual_dir, args.data_dir, frames=args.frames, resolution=args.resolution,
                        stride=args.stride, frames_format=args.frames_format, quality=quality, layout=args.layout,
                        limit=args.limit, workers=args.workers, beam_runner=args.beam_runner,
                        beam_options=args.beam_options, overwrite=args.overwrite, progress=not args.quiet)
        print(format_summary(summary))

    # A scheduler's SIGTERM stops the build as Ctrl-C does: the staged records are removed, nothing is left.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run_command(work, interrupted="build stopped; nothing was written")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{smp,export,build-webvid,cache-features}")
    _smp_parser(sub)
    _webvid_parser(sub)
    _features_parser(sub)
    e = sub.add_parser("export", help="newest checkpoint of a run -> converted video folder",
                       description="Write the trained SMP / image projection / IP layers / motion modules with the "
                                   "run's frozen parts as a folder that `python -m infer.transition --model` reads.")
    e.add_argument("--workdir", required=True)
    e.add_argument("--dst", required=True, metavar="MODEL_DIR")
    e.add_argument("--overwrite", action="store_true")
    return parser


def run_config(args) -> TrainConfig:
    """The TrainConfig of a parsed `smp` or `cache-features` command line (checked by TrainConfig itself)."""
    return TrainConfig.from_args(args, defaults={"model": args.model or args.preset or "tiny-video"})


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "build-webvid":
        return _build_webvid(args)
    if args.command == "cache-features":
        return _cache_features(args)
    if args.command == "export":
        from .export import export

        return run_command(lambda: export(args.workdir, args.dst, overwrite=args.overwrite),
                           interrupted="export stopped; nothing was written")

    def work():
        from .loop import train

        compile_cache.enable(args.compile_cache)
        _start_distributed(args)
        cfg = run_config(args)
        summary = train(cfg, args.workdir, progress=not args.quiet)
        if summary["preempted"]:
            raise SystemExit(143)   # 128 + SIGTERM: the scheduler sees a preempted, resumable run
        m = summary["metrics"]
        print(f"trained to step {summary['step']} in {args.workdir}"
              + (f": loss {m['loss']:.5f}" if m else "") + f"; export with `python -m train export --workdir "
              f"{args.workdir} --dst MODEL_DIR`")

    return run_command(work, interrupted="training stopped; resume from the last checkpoint with the same command")


if __name__ == "__main__":
    sys.exit(main())
