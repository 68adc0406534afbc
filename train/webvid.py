"""WebVid as a TFDS dataset (`webvid`, manual download, array_record) and its training data source.

Building (`python -m train build-webvid`, or `build(...)`):

    --manual-dir DIR   WebVid's CSV files and the videos on disk at `--layout`, or video2dataset's webdataset
                       tar shards (train/webvid_input.py says how each layout is read and split).
    --data-dir OUT     the build lands in OUT/webvid/l{L}_r{R}_s{S}[_{format}]/1.0.0/ (one folder per setting,
                       so builds of other frame counts / resolutions / strides / frame formats never collide).

Each example is one clip per video: L frames `stride` apart, taken from the middle of the video (titles and
fades sit at the ends), every frame resized so its short side is R (bicubic, antialiased) and centre-cropped
to R x R; plus the caption and the ids. The frames are stored as `--frames-format` says (train/clip_codec.py:
H.264 by default, JPEG per frame, or lossless raw), always as plain bytes or zlib'd tensors, never as
`tfds.features.Video` / `Image`: building and reading then need no TensorFlow.

The per-video work (`ClipWork`: decode, sample, resize, encode) runs in this process, in `--workers`
spawned processes, or, with `--beam-runner`, as an Apache Beam pipeline through TFDS's own Beam support
(train/webvid_beam.py): the same examples from any of them.

Videos that are missing, that PyAV cannot decode (corrupt, truncated, no video stream), that are shorter
than (L - 1) * stride + 1 frames, or whose videoid repeats within a split are skipped; they are counted and
named in `webvid_build.json` next to the records (also printed). A build that produced nothing, or that was
interrupted, leaves nothing behind: it is written beside its final place and renamed into it at the end.

Reading: `WebVidSource` (what `train.data.open_source` returns for such a folder) reads the records with
`tfds.builder_from_directory(...).as_data_source()` (TFDS #5665: `tfds.data_source(name, data_dir=...)` can
miss local array_record builds), decodes the frames in whatever process reads them, and gives the
ClipSource records {"id", "frames", "caption"}. It never imports TensorFlow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from storydiff_jax.errors import ConfigError

from .clip_codec import DEFAULT_FORMAT, FrameCodec
from .webvid_input import DEFAULT_LAYOUT, Item, ManualDir, count_items, open_manual_dir, read_unit, units, video_file

NAME = "webvid"
BUILD_VERSION = "1.0.0"
SUMMARY = "webvid_build.json"            # written next to the records; also how a build folder is recognised
SUMMARY_FORMAT = "storydiff-webvid"
REASONS = ("missing", "corrupt", "too_short", "duplicate")
BEAM_ROWS_PER_UNIT = 2000                # CSV rows per Beam element (a tar shard is one element)
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")
_OPEN_LOCK = threading.Lock()


def config_name(frames: int, resolution: int, stride: int, codec: FrameCodec | None = None) -> str:
    return f"l{frames}_r{resolution}_s{stride}" + (codec or FrameCodec("raw")).suffix


def check_settings(frames: int, resolution: int, stride: int) -> None:
    for flag, value, low in (("--frames", frames, 2), ("--resolution", resolution, 8), ("--stride", stride, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{flag} {value!r}: must be an integer >= {low}")


# ----------------------------------------------------------------------------------------------------
# One video -> one clip


class Skip(Exception):
    """A video that is not built; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def clip_span(frames: int, stride: int) -> int:
    """Source frames one clip covers."""
    return (frames - 1) * stride + 1


def clip_start(total: int, frames: int, stride: int) -> int:
    """First source frame of the clip: the span centred in the video."""
    return (total - clip_span(frames, stride)) // 2


def fit_square(frame: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [R, R, 3]: short side to R (bicubic, antialiased), centre crop."""
    from PIL import Image

    from storydiff_jax.images import center_crop, resize_short_side

    return np.ascontiguousarray(center_crop(np.asarray(resize_short_side(Image.fromarray(frame), resolution)),
                                            resolution))


def _first_line(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip().splitlines()
    return text[0] if text else type(e).__name__


def sample_clip(video: str | bytes, frames: int, stride: int, resolution: int) -> tuple[np.ndarray, int, int]:
    """(uint8 [L, R, R, 3], first source frame, source frame count) of a video (a path, or the file's bytes);
    raises Skip."""
    import av

    if isinstance(video, str) and not os.path.isfile(video):
        raise Skip("missing", "no such file")
    span = clip_span(frames, stride)
    try:
        with av.open(video_file(video)) as container:
            if not container.streams.video:
                raise Skip("corrupt", "no video stream")
            stream = container.streams.video[0]
            total = stream.frames
            if total <= 0:   # no frame count in the header: count the packets (no decoding)
                total = sum(1 for p in container.demux(stream) if p.size)
                container.seek(0)
            if total < span:
                raise Skip("too_short", f"{total} frames, a clip of {frames} frames at stride {stride} needs {span}")
            start = clip_start(total, frames, stride)
            stream.thread_type = "AUTO"   # frame threads: same pixels, faster on long videos
            wanted = {start + k * stride for k in range(frames)}
            clip, decoded = [], 0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    clip.append(fit_square(frame.to_ndarray(format="rgb24"), resolution))
                    if len(clip) == frames:
                        break
    except Skip:
        raise
    except Exception as e:   # FFmpeg reports damaged files with many exception types
        raise Skip("corrupt", _first_line(e)) from None
    if len(clip) < frames:
        raise Skip("corrupt", f"decoding stopped after {decoded} of the {total} frames the header promises "
                              "(truncated)")
    return np.stack(clip), start, total


@dataclass(frozen=True)
class ClipWork:
    """The per-video work of a build, the same in every worker and runner: decode the video, sample the
    clip, resize and crop, encode the frames. Returns ("ok", stored frames, start, total) or
    ("skip", reason, detail); a small frozen value, so it pickles into worker processes and Beam workers."""

    frames: int
    stride: int
    resolution: int
    codec: FrameCodec

    def __call__(self, item: Item) -> tuple:
        if item.problem is not None:
            return ("skip", *item.problem)
        try:
            clip, start, total = sample_clip(item.video, self.frames, self.stride, self.resolution)
        except Skip as s:
            return ("skip", s.reason, s.detail)
        return ("ok", self.codec.encode(clip), start, total)

    def example(self, item: Item, result: tuple) -> dict:
        _, stored, start, total = result
        return {self.codec.field: stored, "caption": item.caption, "videoid": item.videoid,
                "page_dir": item.page_dir, "start_frame": start, "source_frames": total}


def skip_entry(item: Item, reason: str, detail: str) -> dict:
    """A skip report entry; `_position` orders the report (removed when the summary is written)."""
    return {**item.named(), "reason": reason, "detail": detail, "_position": list(item.position)}


def _ordered_map(fn, items: Iterable, workers: int) -> Iterator[tuple]:
    """(item, fn(item)) in order; with workers > 1 in spawned processes, at most 4 tasks per worker in flight
    (items are read lazily: a 10M-row CSV never sits in memory)."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold threads (TFDS, PyAV) that a forked child would inherit mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 4 * workers:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()


# ----------------------------------------------------------------------------------------------------
# The TFDS builder


@dataclass
class BuildReport:
    built: int = 0
    skipped: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.built + len(self.skipped)


@functools.cache
def builder_class():
    """The `webvid` GeneratorBasedBuilder (made on first use: importing this module stays cheap)."""
    import dataclasses

    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class WebVidConfig(tfds.core.BuilderConfig):
        frames: int = 16
        resolution: int = 256
        stride: int = 4
        frames_format: str = DEFAULT_FORMAT
        quality: int | None = None

    class WebVid(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # skip_registration: TFDS's own catalog has an unrelated `webvid` builder (JPEG frames through
        # tfds.features.Video, which needs TensorFlow); ours is only ever used through this class.
        name = NAME
        VERSION = tfds.core.Version(BUILD_VERSION)
        RELEASE_NOTES = {BUILD_VERSION: "L frames at stride S from the middle of each video, R x R; frames raw "
                                        "(zlib uint8 tensor), JPEG per frame or one H.264 stream."}
        BUILDER_CONFIGS = [WebVidConfig(name=config_name(16, 256, 4, FrameCodec()), description="AnimateDiff's "
                                        "setting")]
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Put WebVid's CSVs (results_*_train.csv, results_*_val.csv) in the manual dir and the videos under it "
            f"at the layout (default {DEFAULT_LAYOUT}), or video2dataset's tar shards.")

        def __init__(self, *, layout: str = DEFAULT_LAYOUT, limit: int | None = None, workers: int = 1,
                     progress: bool = True, beam_side_dir: str | None = None, **kwargs):
            self.layout, self.limit, self.workers, self.progress = layout, limit, workers, progress
            self.beam_side_dir = beam_side_dir   # set: the splits are Beam transforms; skip reports land there
            self.reports: dict[str, BuildReport] = {}
            self.manual: ManualDir | None = None
            self.failure: ConfigError | None = None   # what stopped the build, as our one-line error
            super().__init__(**kwargs)

        @property
        def work(self) -> ClipWork:
            c = self.builder_config
            return ClipWork(c.frames, c.stride, c.resolution, FrameCodec(c.frames_format, c.quality))

        def _info(self):
            c, codec = self.builder_config, self.work.codec
            return tfds.core.DatasetInfo(
                builder=self,
                description="WebVid clips for training StoryDiffusion's Semantic Motion Predictor.",
                features=tfds.features.FeaturesDict({
                    codec.field: codec.feature(c.frames, c.resolution),
                    "caption": tfds.features.Text(),
                    "videoid": tfds.features.Text(),
                    "page_dir": tfds.features.Text(),
                    "start_frame": tfds.features.Scalar(dtype=np.int32, doc="first source frame of the clip"),
                    "source_frames": tfds.features.Scalar(dtype=np.int32, doc="frames of the source video"),
                }),
                homepage="https://m-bain.github.io/webvid-dataset/",
            )

        # TFDS locates a builder's source file only to find URL checksums (we download nothing); for a
        # builder inside a package its lookup imports `importlib_resources`, which TFDS 4.9.10 does not
        # install.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        # TFDS prints its own banners to stdout; the CLI prints one summary instead.
        def _log_download_bytes(self):
            pass

        def _log_download_done(self):
            pass

        def _split_generators(self, dl_manager):
            md = self.manual = open_manual_dir(os.fspath(dl_manager.manual_dir), self.layout)
            if self.beam_side_dir is not None:
                from .webvid_beam import build_split

                return {split: build_split(split, units(md, split, self.limit, BEAM_ROWS_PER_UNIT), md, self.work,
                                           self.beam_side_dir) for split in md.splits}
            sizes = {split: count_items(md, split, self.limit) for split in md.splits}
            # TFDS cannot write an empty split, so a split that builds nothing fails the build: the small
            # splits go first, so that a broken validation CSV fails before hours of training videos.
            return {split: self._generate_examples(split, md, sizes[split]) for split in sorted(md.splits,
                                                                                               key=sizes.get)}

        def _generate_examples(self, split: str, md: ManualDir, rows: int):
            report = self.reports.setdefault(split, BuildReport())
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=rows, desc=f"webvid {split}", unit="video", leave=True)
            seen = set()

            def unique_items():
                for unit in units(md, split, self.limit):
                    for item in read_unit(unit, md.path, md.layout):
                        if item.problem is not None:   # skipped for its own reason, whatever its id
                            yield item
                            continue
                        if item.videoid and item.videoid not in seen:
                            seen.add(item.videoid)
                            yield item
                            continue
                        report.skipped.append(skip_entry(item, "duplicate", "videoid repeats in this split"
                                                         if item.videoid else "empty videoid"))
                        if bar is not None:
                            bar.update(1)

            work = self.work
            try:
                for item, result in _ordered_map(work, unique_items(), self.workers):
                    if bar is not None:
                        bar.update(1)
                    if result[0] == "skip":
                        report.skipped.append(skip_entry(item, result[1], result[2]))
                        continue
                    report.built += 1
                    if bar is not None:
                        bar.set_postfix(built=report.built, skipped=len(report.skipped), refresh=False)
                    yield item.videoid, work.example(item, result)
            except ConfigError as e:   # a CSV that breaks mid-way
                self.failure = e
                raise
            finally:
                if bar is not None:
                    bar.close()
            self._check_built(split, md)

        def _check_built(self, split: str, md: ManualDir):
            report = self.reports.get(split) or BuildReport()
            if report.built == 0:
                self.failure = ConfigError(
                    f"nothing buildable in --manual-dir {md.path}"
                    + (f" for split {split!r} ({_split_input(md, split)})" if split != "train" else "")
                    + f": {_nothing_built(report)}; check "
                    + (f"--layout {self.layout!r} and " if md.kind == "csv" else "") + "the videos")
                raise self.failure   # TFDS re-raises it wrapped; _prepare raises self.failure itself

        def _process_pipeline_result(self, pipeline_result):
            """After the Beam pipeline: the skip reports (its side output) and built counts (its counters)."""
            from .webvid_beam import collect_reports

            md = self.manual
            self.reports = collect_reports(pipeline_result, self.beam_side_dir, list(md.splits))
            for split in sorted(md.splits, key=lambda s: self.reports[s].rows):
                self._check_built(split, md)

    return WebVid


def _split_input(md: ManualDir, split: str) -> str:
    paths = md.splits[split]
    return os.path.basename(paths[0]) if md.kind == "csv" else f"{len(paths)} tar shards"


def build_dir(data_dir: str, frames: int, resolution: int, stride: int, codec: FrameCodec | None = None) -> str:
    return os.path.join(os.path.abspath(data_dir), NAME, config_name(frames, resolution, stride, codec),
                        BUILD_VERSION)


def build(manual_dir: str, data_dir: str, *, frames: int = 16, resolution: int = 256, stride: int = 4,
          frames_format: str = DEFAULT_FORMAT, quality: int | None = None, layout: str = DEFAULT_LAYOUT,
          limit: int | None = None, workers: int = 1, beam_runner: str | None = None, beam_options: str = "",
          overwrite: bool = False, progress: bool = True) -> dict:
    """Build the `webvid` dataset; returns the summary (also written as `webvid_build.json` in the build).

    All or nothing: records are written in a temporary folder beside the final one, which replaces it only
    when every split built at least one example. Input problems are one-line ConfigErrors raised before
    anything is written. `beam_runner` (e.g. "DirectRunner", "DataflowRunner") runs the per-video work as an
    Apache Beam pipeline with `beam_options` (its command-line flags as one string).
    """
    check_settings(frames, resolution, stride)
    codec = FrameCodec(frames_format, quality)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1 (or leave it out to build every row)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    if beam_runner:
        if workers > 1:
            raise ConfigError(f"--workers {workers} with --beam-runner: the runner decides the workers; e.g. "
                              "--beam-options '--direct_num_workers=4 --direct_running_mode=multi_processing'")
        _check_beam(beam_runner, beam_options)
    elif beam_options:
        raise ConfigError("--beam-options needs --beam-runner (e.g. --beam-runner DirectRunner); add it")
    # Checked here too (headers, one row): input errors come before anything is created.
    md = open_manual_dir(manual_dir, layout)
    if not any(next(read_unit(u, md.path, layout), None) for s in md.splits for u in units(md, s, limit)):
        raise ConfigError(f"--manual-dir {md.path}: the {'CSVs' if md.kind == 'csv' else 'tar shards'} have no "
                          "rows; nothing to build")
    final = build_dir(data_dir, frames, resolution, stride, codec)
    name = config_name(frames, resolution, stride, codec)
    if os.path.exists(final) and not overwrite:
        raise ConfigError(f"--data-dir {data_dir}: already holds a {name} build ({final}); pass --overwrite to "
                          "rebuild it, or another --data-dir")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir}: exists and is not a folder; choose another --data-dir")

    from storydiff_jax.outputs import staged_folder

    created = [d for d in (os.path.dirname(os.path.dirname(final)), os.path.dirname(final)) if not os.path.exists(d)]
    settings = dict(frames=frames, resolution=resolution, stride=stride, frames_format=codec.describe(),
                    layout=layout, limit=limit, manual_dir=md.path, input=md.kind,
                    runner=beam_runner or ("local" if workers == 1 else f"local, {workers} workers"))
    try:
        with staged_folder(final) as tmp:
            summary = _prepare(tmp, settings, codec, workers, progress, beam_runner, beam_options)
    except BaseException:
        for d in reversed(created):   # a failed first build leaves no empty webvid/<config> folders either
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    summary["path"] = final
    return summary


def _check_beam(beam_runner: str, beam_options: str) -> None:
    try:
        from apache_beam.runners.runner import create_runner
    except ImportError:
        raise ConfigError("--beam-runner needs Apache Beam: pip install 'storydiff-jax[beam]' (or apache-beam), "
                          "or build without --beam-runner") from None
    try:
        create_runner(beam_runner)
    except ValueError as e:
        raise ConfigError(f"--beam-runner {beam_runner}: {_first_line(e)}") from None
    try:
        shlex.split(beam_options)
    except ValueError as e:
        raise ConfigError(f"--beam-options {beam_options!r}: not a command line ({e}); quote it like a shell "
                          "would") from None


def _prepare(tmp: str, settings: dict, codec: FrameCodec, workers: int, progress: bool, beam_runner: str | None,
             beam_options: str) -> dict:
    """Run TFDS's download_and_prepare into `tmp` and flatten its version folder into `tmp`; the summary."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()   # our own bar counts videos; TFDS's would count records and shards again
    cls = builder_class()
    dims = {k: settings[k] for k in ("frames", "resolution", "stride")}
    name = config_name(**dims, codec=codec)
    # TFDS refuses a new config object named like one of BUILDER_CONFIGS: reuse that one.
    config = next((c for c in cls.BUILDER_CONFIGS if c.name == name), None) or type(cls.BUILDER_CONFIGS[0])(
        name=name, **dims, frames_format=codec.format, quality=codec.quality)
    side_dir = os.path.join(tmp, "beam-skipped") if beam_runner else None
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)   # TFDS warns that a config not in BUILDER_CONFIGS is "custom": ours all are
    try:
        builder = cls(config=config, data_dir=tmp, file_format="array_record", layout=settings["layout"],
                      limit=settings["limit"], workers=workers, progress=progress, beam_side_dir=side_dir)
    finally:
        absl.setLevel(level)
    download_config = tfds.download.DownloadConfig(manual_dir=settings["manual_dir"])
    if beam_runner:
        from apache_beam.options.pipeline_options import PipelineOptions

        download_config = tfds.download.DownloadConfig(manual_dir=settings["manual_dir"], beam_runner=beam_runner,
                                                       beam_options=PipelineOptions(shlex.split(beam_options)))
    try:
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"), download_config=download_config)
    except Exception as e:
        # TFDS's Beam writer refuses an empty split inside the pipeline, before the skip reports are back.
        empty = re.search(r"generated examples is 0 for split (\S+?)\.? This", str(e)) if beam_runner else None
        if builder.failure is None and empty:
            md = builder.manual
            raise ConfigError(f"nothing buildable in --manual-dir {md.path} for split {empty.group(1)!r} "
                              f"({_split_input(md, empty.group(1))}): the pipeline skipped every video of it; a "
                              "build without --beam-runner (--limit N for a quick look) names them") from None
        if builder.failure is None:
            raise
        raise builder.failure from None
    summary = _summary(builder.reports, settings)
    # TFDS wrote tmp/webvid/<config>/<version>/; that folder's files become the build folder.
    made = os.fspath(builder.data_dir)
    for name in os.listdir(made):
        os.replace(os.path.join(made, name), os.path.join(tmp, name))
    for name in (NAME, "downloads", "beam-skipped"):
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    with open(os.path.join(tmp, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _summary(reports: dict, settings: dict) -> dict:
    splits, skipped = {}, []
    for split, r in sorted(reports.items(), key=lambda kv: (kv[0] != "train", kv[0])):
        counts = Counter(s["reason"] for s in r.skipped)
        splits[split] = {"rows": r.rows, "built": r.built, "skipped": {k: counts[k] for k in REASONS if counts[k]}}
        # In the order of the input, whichever worker or runner met them first.
        skipped += [{"split": split, **{k: v for k, v in s.items() if k != "_position"}}
                    for s in sorted(r.skipped, key=lambda s: s["_position"])]
    dims = {k: settings[k] for k in ("frames", "resolution", "stride")}
    codec = FrameCodec(settings["frames_format"]["format"], settings["frames_format"].get("quality"))
    return {"format": SUMMARY_FORMAT, "version": 1, "name": NAME, "config": config_name(**dims, codec=codec),
            **settings, "sampling": "middle", "rows": sum(s["rows"] for s in splits.values()),
            "built": sum(s["built"] for s in splits.values()), "splits": splits, "skipped": skipped}


def _nothing_built(report: BuildReport) -> str:
    """'N missing, M corrupt of K videos skipped (e.g. PATH: reason, detail)' for an empty split."""
    counts = Counter(s["reason"] for s in report.skipped)
    first = min(report.skipped, key=lambda s: s["_position"]) if report.skipped else None
    return (", ".join(f"{counts[k]} {k}" for k in REASONS if counts[k]) or "none") + f" of {report.rows} videos " \
        f"skipped (e.g. " + (f"{first['path']}: {first['reason']}, {first['detail']}" if first else "no rows") + ")"


def format_summary(summary: dict, names: int = 20) -> str:
    """The build's summary as text: counts per split, then the skipped videos by reason (first `names` each)."""
    codec = FrameCodec.from_summary(summary)
    stored = codec.format + ("" if codec.quality is None else f" {'q' if codec.format == 'jpeg' else 'crf '}"
                                                               f"{codec.quality}")
    lines = [f"built {summary['built']} of {summary['rows']} videos into {summary.get('path', '')} "
             f"({summary['config']}: {summary['frames']} frames at stride {summary['stride']}, "
             f"{summary['resolution']}x{summary['resolution']}, {stored} frames)"]
    for split, s in summary["splits"].items():
        skipped = ", ".join(f"{n} {k}" for k, n in s["skipped"].items()) or "none"
        lines.append(f"  {split}: {s['built']} built of {s['rows']}; skipped: {skipped}")
    for reason in REASONS:
        those = [s for s in summary["skipped"] if s["reason"] == reason]
        if not those:
            continue
        lines.append(f"skipped, {reason} ({len(those)}):")
        lines += [f"  {s['split']} {s['videoid']}: {s['path']} ({s['detail']})" for s in those[:names]]
        if len(those) > names:
            lines.append(f"  ... {len(those) - names} more in {SUMMARY}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Reading


def _read_summary(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, SUMMARY)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("format") == SUMMARY_FORMAT else None


def find_builds(data_dir: str) -> list[str]:
    """WebVid build folders at or below `data_dir`: the build itself (…/webvid/<config>/<version>), a
    dataset folder (…/webvid) or a TFDS data dir holding `webvid/`."""
    data_dir = os.path.abspath(data_dir)
    if _read_summary(data_dir) is not None:
        return [data_dir]
    found = []
    for root in (data_dir, os.path.join(data_dir, NAME)):
        if not os.path.isdir(root):
            continue
        for config in sorted(os.listdir(root)):
            cdir = os.path.join(root, config)
            if not os.path.isdir(cdir) or config.startswith("."):
                continue
            for version in sorted(os.listdir(cdir)):
                vdir = os.path.join(cdir, version)
                if _VERSION_DIR.match(version) and _read_summary(vdir) is not None:
                    found.append(vdir)
    return found


def is_build(data_dir: str) -> bool:
    return bool(find_builds(data_dir))


def choose_build(data_dir: str, frames: int | None = None, resolution: int | None = None) -> str:
    """The one build under `data_dir` (several: the one matching frames/resolution, when that is unique)."""
    builds = find_builds(data_dir)
    if not builds:
        raise ConfigError(f"--data-dir {data_dir}: no WebVid build ({SUMMARY}) found; build one with "
                          "`python -m train build-webvid`")
    if len(builds) > 1 and frames is not None and resolution is not None:
        matching = [b for b in builds if (s := _read_summary(b))["frames"] == frames and s["resolution"] == resolution]
        builds = matching or builds
    if len(builds) > 1:
        names = ", ".join(os.path.relpath(b, data_dir) for b in builds)
        raise ConfigError(f"--data-dir {data_dir}: holds several WebVid builds ({names}); pass one of those "
                          "folders as --data-dir")
    return builds[0]


class WebVidSource:
    """A `webvid` build's split as a ClipSource: {"id": videoid, "frames": uint8 [L, R, R, 3], "caption"}.

    Records are read through TFDS's array_record data source (no TensorFlow), opened on first access, so
    the source pickles cheaply into grain worker processes, where the frames are then decoded (JPEG, H.264)
    too.
    """

    def __init__(self, data_dir: str, *, split: str = "train", frames: int | None = None,
                 resolution: int | None = None):
        self.folder = choose_build(data_dir, frames, resolution)
        summary = _read_summary(self.folder)
        self.frames, self.resolution, self.stride = summary["frames"], summary["resolution"], summary["stride"]
        self.codec = FrameCodec.from_summary(summary)   # builds older than frame formats are raw
        if frames is not None or resolution is not None:
            self.check_run(frames if frames is not None else self.frames,
                           resolution if resolution is not None else self.resolution)
        built = {k: v["built"] for k, v in summary["splits"].items() if v["built"]}
        if split not in built:
            raise ConfigError(f"--data-dir {data_dir}: the WebVid build has no {split!r} split (it has: "
                              f"{', '.join(built) or 'none'}); rebuild with a *_{split}.csv")
        self.split, self.summary = split, summary
        self._records = None

    def check_run(self, frames: int, resolution: int) -> None:
        if (frames, resolution) != (self.frames, self.resolution):
            raise ConfigError(
                f"--frames {frames} --resolution {resolution} differ from the WebVid build's {self.frames} frames at "
                f"{self.resolution}x{self.resolution} ({self.folder}); train with --frames {self.frames} --resolution "
                f"{self.resolution}, or build with `python -m train build-webvid --frames {frames} --resolution "
                f"{resolution}`")

    @property
    def records(self):
        # grain's read threads in a fresh worker process all arrive here first: one opens the records while
        # the others wait (concurrent first imports of TFDS deadlock on Python's import locks).
        with _OPEN_LOCK:
            if self._records is None:
                import tensorflow_datasets as tfds

                self._records = tfds.builder_from_directory(self.folder).as_data_source(split=self.split)
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[int(index)]
        frames = self.codec.decode(r[self.codec.field], self.frames, self.resolution)
        return {"id": _text(r["videoid"]), "frames": frames, "caption": _text(r["caption"]),
                "page_dir": _text(r["page_dir"])}

    def fingerprint(self) -> str:
        """Identity of this split's records without reading them: the build's summary (settings, counts,
        the skipped videos) and the names and sizes of the build's files (a rebuild from other inputs
        changes them; an identical rebuild is byte-identical)."""
        files = sorted((name, os.path.getsize(os.path.join(self.folder, name))) for name in os.listdir(self.folder)
                       if os.path.isfile(os.path.join(self.folder, name)))
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps([self.split, self.summary, files], sort_keys=True).encode())
        return h.hexdigest()

    def __getstate__(self):
        return {**self.__dict__, "_records": None}

    def __repr__(self) -> str:
        return f"WebVidSource({self.folder!r}, split={self.split!r})"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
