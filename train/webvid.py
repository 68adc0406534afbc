"""WebVid as a TFDS dataset (`webvid`, manual download, array_record) and its training data source.

Building (`python -m train build-webvid`, or `build(...)`):

    --manual-dir DIR   the CSV files WebVid publishes (columns videoid, name, page_dir, duration, contentUrl;
                       `name` is the caption) at the top of DIR, and the videos on disk under DIR at
                       `--layout` (a Python format string over the CSV's columns, default
                       "videos/{page_dir}/{videoid}.mp4").
    --data-dir OUT     the build lands in OUT/webvid/l{L}_r{R}_s{S}/1.0.0/ (one folder per setting, so builds
                       of other frame counts / resolutions / strides never collide).

Splits come from the CSV names: `*_train.csv` -> "train", `*_val.csv` / `*_validation.csv` -> "validation",
`*_test.csv` -> "test"; a single CSV of any other name is "train"; several others are named after their
file (lower case, non-alphanumerics -> "_").

Each example is one clip per video: L frames `stride` apart, taken from the middle of the video (titles and
fades sit at the ends), every frame resized so its short side is R (bicubic, antialiased) and centre-cropped
to R x R; plus the caption and the ids. Frames are stored losslessly as a zlib-compressed uint8 tensor
(`tfds.features.Tensor`, not `tfds.features.Video`): building and reading then need no TensorFlow.

Videos that are missing, that PyAV cannot decode (corrupt, truncated, no video stream), that are shorter
than (L - 1) * stride + 1 frames, or whose videoid repeats within a split are skipped; they are counted and
named in `webvid_build.json` next to the records (also printed). A build that produced nothing, or that was
interrupted, leaves nothing behind: it is written beside its final place and renamed into it at the end.

Reading: `WebVidSource` (what `train.data.open_source` returns for such a folder) reads the records with
`tfds.builder_from_directory(...).as_data_source()` (TFDS #5665: `tfds.data_source(name, data_dir=...)` can
miss local array_record builds) and gives the ClipSource records {"id", "frames", "caption"}. It never
imports TensorFlow.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import string
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from storydiff_jax.errors import ConfigError

NAME = "webvid"
BUILD_VERSION = "1.0.0"
SUMMARY = "webvid_build.json"            # written next to the records; also how a build folder is recognised
SUMMARY_FORMAT = "storydiff-webvid"
DEFAULT_LAYOUT = "videos/{page_dir}/{videoid}.mp4"
REQUIRED_COLUMNS = ("videoid", "name")   # plus every column the layout names
REASONS = ("missing", "corrupt", "too_short", "duplicate")
_SPLIT_SUFFIX = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


def config_name(frames: int, resolution: int, stride: int) -> str:
    return f"l{frames}_r{resolution}_s{stride}"


def check_settings(frames: int, resolution: int, stride: int) -> None:
    for flag, value, low in (("--frames", frames, 2), ("--resolution", resolution, 8), ("--stride", stride, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{flag} {value!r}: must be an integer >= {low}")


# ----------------------------------------------------------------------------------------------------
# The manual directory: CSVs -> rows per split


def split_name(csv_name: str, single: bool) -> str:
    stem = os.path.splitext(csv_name)[0].lower()
    suffix = stem.rsplit("_", 1)[-1]
    if suffix in _SPLIT_SUFFIX and "_" in stem:
        return _SPLIT_SUFFIX[suffix]
    return "train" if single else re.sub(r"[^a-z0-9]+", "_", stem).strip("_") or "train"


def layout_fields(layout: str) -> list[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(layout) if f is not None]
    except ValueError as e:
        raise ConfigError(f"--layout {layout!r}: not a format string ({e}); e.g. {DEFAULT_LAYOUT!r}") from None
    if not fields or any(not f.isidentifier() for f in fields):
        raise ConfigError(f"--layout {layout!r}: name CSV columns in braces, e.g. {DEFAULT_LAYOUT!r}")
    return fields


def csv_splits(manual_dir: str, layout: str) -> dict[str, str]:
    """{split: CSV path} of `manual_dir`, each CSV's header checked against the columns the build needs."""
    if not os.path.isdir(manual_dir):
        raise ConfigError(f"--manual-dir {manual_dir}: no such folder; download WebVid's CSVs and videos into it")
    csvs = sorted(n for n in os.listdir(manual_dir) if n.lower().endswith(".csv")
                  and os.path.isfile(os.path.join(manual_dir, n)))
    if not csvs:
        raise ConfigError(f"--manual-dir {manual_dir}: no .csv file; put WebVid's results_*_train.csv (columns "
                          "videoid, name, page_dir, duration, contentUrl) there")
    fields = layout_fields(layout)
    needed = list(dict.fromkeys(REQUIRED_COLUMNS + tuple(fields)))
    splits: dict[str, str] = {}
    for name in csvs:
        split = split_name(name, single=len(csvs) == 1)
        if split in splits:
            raise ConfigError(f"--manual-dir {manual_dir}: {os.path.basename(splits[split])} and {name} both give "
                              f"split {split!r}; move one of them out")
        path = splits[split] = os.path.join(manual_dir, name)
        header = next(_csv_records(path), [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise ConfigError(f"{path}: no column {', '.join(missing)} (it has: {', '.join(header) or 'none'}); "
                              f"WebVid's CSVs have videoid, name, page_dir, duration, contentUrl"
                              + (f", and --layout {layout!r} needs {', '.join(fields)}" if fields else ""))
    return splits


def _csv_records(path: str) -> Iterator[list[str]]:
    """The CSV's records (the header first, stripped), read lazily: WebVid-10M's train CSV has 10.7M rows."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for i, record in enumerate(reader):
                yield [h.strip() for h in record] if i == 0 else record
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot be read as a CSV ({_first_line(e)}); re-download it") from None


def csv_rows(path: str, manual_dir: str, layout: str, limit: int | None = None) -> Iterator[dict]:
    """{"videoid", "page_dir", "caption", "path"} per row of a CSV checked by `csv_splits`, in file order."""
    records = _csv_records(path)
    header = next(records, [])
    for n, record in enumerate(records):
        if limit is not None and n >= limit:
            break
        row = dict(zip(header, record))
        values = {k: (row.get(k) or "").strip() for k in header}
        yield {"videoid": values["videoid"], "page_dir": values.get("page_dir", ""), "caption": row.get("name") or "",
               "path": os.path.join(manual_dir, layout.format(**values))}


def count_rows(path: str, limit: int | None = None) -> int:
    n = sum(1 for _ in _csv_records(path)) - 1
    return max(0, n if limit is None else min(n, limit))


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


def sample_clip(path: str, frames: int, stride: int, resolution: int) -> tuple[np.ndarray, int, int]:
    """(uint8 [L, R, R, 3], first source frame, source frame count) of the video at `path`; raises Skip."""
    import av

    if not os.path.isfile(path):
        raise Skip("missing", "no such file")
    span = clip_span(frames, stride)
    try:
        with av.open(path) as container:
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


def _sample_row(row: dict, frames: int, stride: int, resolution: int):
    """Worker-side: ("ok", clip, start, total) or ("skip", reason, detail)."""
    try:
        clip, start, total = sample_clip(row["path"], frames, stride, resolution)
    except Skip as s:
        return ("skip", s.reason, s.detail)
    return ("ok", clip, start, total)


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
    rows: int = 0
    built: int = 0
    skipped: list = None

    def __post_init__(self):
        self.skipped = [] if self.skipped is None else self.skipped


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

    class WebVid(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # skip_registration: TFDS's own catalog has an unrelated `webvid` builder (JPEG frames through
        # tfds.features.Video, which needs TensorFlow); ours is only ever used through this class.
        name = NAME
        VERSION = tfds.core.Version(BUILD_VERSION)
        RELEASE_NOTES = {BUILD_VERSION: "L frames at stride S from the middle of each video, R x R, "
                                        "zlib uint8 tensor."}
        BUILDER_CONFIGS = [WebVidConfig(name=config_name(16, 256, 4), description="AnimateDiff's setting")]
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Put WebVid's CSVs (results_*_train.csv, results_*_val.csv) in the manual dir and the videos under it "
            f"at the layout (default {DEFAULT_LAYOUT}).")

        def __init__(self, *, layout: str = DEFAULT_LAYOUT, limit: int | None = None, workers: int = 1,
                     progress: bool = True, **kwargs):
            self.layout, self.limit, self.workers, self.progress = layout, limit, workers, progress
            self.reports: dict[str, BuildReport] = {}
            self.failure: ConfigError | None = None   # what stopped the build, as our one-line error
            super().__init__(**kwargs)

        def _info(self):
            c = self.builder_config
            return tfds.core.DatasetInfo(
                builder=self,
                description="WebVid clips for training StoryDiffusion's Semantic Motion Predictor.",
                features=tfds.features.FeaturesDict({
                    "frames": tfds.features.Tensor(shape=(c.frames, c.resolution, c.resolution, 3), dtype=np.uint8,
                                                   encoding=tfds.features.Encoding.ZLIB),
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
            manual_dir = os.fspath(dl_manager.manual_dir)
            splits = csv_splits(manual_dir, self.layout)
            sizes = {split: count_rows(path, self.limit) for split, path in splits.items()}
            # TFDS cannot write an empty split, so a split that builds nothing fails the build: the small
            # splits go first, so that a broken validation CSV fails before hours of training videos.
            return {split: self._generate_examples(split, manual_dir, splits[split], sizes[split])
                    for split in sorted(splits, key=sizes.get)}

        def _generate_examples(self, split, manual_dir, path, rows):
            c = self.builder_config
            report = self.reports.setdefault(split, BuildReport(rows=rows))
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=rows, desc=f"webvid {split}", unit="video", leave=True)
            seen = set()

            def unique_rows():
                for row in csv_rows(path, manual_dir, self.layout, self.limit):
                    if row["videoid"] and row["videoid"] not in seen:
                        seen.add(row["videoid"])
                        yield row
                        continue
                    report.skipped.append({**_named(row), "reason": "duplicate", "detail":
                                           "videoid repeats in this split" if row["videoid"] else "empty videoid"})
                    if bar is not None:
                        bar.update(1)

            sample = functools.partial(_sample_row, frames=c.frames, stride=c.stride, resolution=c.resolution)
            try:
                for row, result in _ordered_map(sample, unique_rows(), self.workers):
                    if bar is not None:
                        bar.update(1)
                    if result[0] == "skip":
                        report.skipped.append({**_named(row), "reason": result[1], "detail": result[2]})
                        continue
                    report.built += 1
                    if bar is not None:
                        bar.set_postfix(built=report.built, skipped=len(report.skipped), refresh=False)
                    _, clip, start, total = result
                    yield row["videoid"], {"frames": clip, "caption": row["caption"], "videoid": row["videoid"],
                                           "page_dir": row["page_dir"], "start_frame": start, "source_frames": total}
            except ConfigError as e:   # a CSV that breaks mid-way
                self.failure = e
                raise
            finally:
                if bar is not None:
                    bar.close()
            if report.built == 0:
                self.failure = ConfigError(
                    f"nothing buildable in --manual-dir {manual_dir}"
                    + (f" for split {split!r} ({os.path.basename(path)})" if split != "train" else "")
                    + f": {_nothing_built(report)}; check --layout {self.layout!r} and the videos")
                raise self.failure   # TFDS re-raises it wrapped; _prepare raises self.failure itself

    return WebVid


def _named(row: dict) -> dict:
    return {"videoid": row["videoid"], "page_dir": row["page_dir"], "path": row["path"]}


def build_dir(data_dir: str, frames: int, resolution: int, stride: int) -> str:
    return os.path.join(os.path.abspath(data_dir), NAME, config_name(frames, resolution, stride), BUILD_VERSION)


def build(manual_dir: str, data_dir: str, *, frames: int = 16, resolution: int = 256, stride: int = 4,
          layout: str = DEFAULT_LAYOUT, limit: int | None = None, workers: int = 1, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Build the `webvid` dataset; returns the summary (also written as `webvid_build.json` in the build).

    All or nothing: records are written in a temporary folder beside the final one, which replaces it only
    when at least one example was built. Input problems are one-line ConfigErrors raised before anything is
    written.
    """
    check_settings(frames, resolution, stride)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1 (or leave it out to build every row)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be >= 1")
    manual_dir = os.path.abspath(manual_dir)
    # Checked here too (headers, one row): input errors come before anything is created.
    splits = csv_splits(manual_dir, layout)
    if not any(next(csv_rows(p, manual_dir, layout), None) for p in splits.values()):
        raise ConfigError(f"--manual-dir {manual_dir}: the CSVs have no rows; nothing to build")
    final = build_dir(data_dir, frames, resolution, stride)
    if os.path.exists(final) and not overwrite:
        raise ConfigError(f"--data-dir {data_dir}: already holds a {config_name(frames, resolution, stride)} build "
                          f"({final}); pass --overwrite to rebuild it, or another --data-dir")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir}: exists and is not a folder; choose another --data-dir")

    from storydiff_jax.outputs import staged_folder

    created = [d for d in (os.path.dirname(os.path.dirname(final)), os.path.dirname(final)) if not os.path.exists(d)]
    settings = dict(frames=frames, resolution=resolution, stride=stride, layout=layout, limit=limit,
                    manual_dir=manual_dir)
    try:
        with staged_folder(final) as tmp:
            summary = _prepare(tmp, settings, workers, progress)
    except BaseException:
        for d in reversed(created):   # a failed first build leaves no empty webvid/<config> folders either
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    summary["path"] = final
    return summary


def _prepare(tmp: str, settings: dict, workers: int, progress: bool) -> dict:
    """Run TFDS's download_and_prepare into `tmp` and flatten its version folder into `tmp`; the summary."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()   # our own bar counts videos; TFDS's would count records and shards again
    cls = builder_class()
    dims = {k: settings[k] for k in ("frames", "resolution", "stride")}
    name = config_name(**dims)
    # TFDS refuses a new config object named like one of BUILDER_CONFIGS: reuse that one.
    config = next((c for c in cls.BUILDER_CONFIGS if c.name == name), None) or type(cls.BUILDER_CONFIGS[0])(
        name=name, **dims)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)   # TFDS warns that a config not in BUILDER_CONFIGS is "custom": ours all are
    try:
        builder = cls(config=config, data_dir=tmp, file_format="array_record", layout=settings["layout"],
                      limit=settings["limit"], workers=workers, progress=progress)
    finally:
        absl.setLevel(level)
    try:
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"),
                                     download_config=tfds.download.DownloadConfig(manual_dir=settings["manual_dir"]))
    except Exception:
        if builder.failure is None:
            raise
        raise builder.failure from None
    summary = _summary(builder.reports, settings)
    # TFDS wrote tmp/webvid/<config>/<version>/; that folder's files become the build folder.
    made = os.fspath(builder.data_dir)
    for name in os.listdir(made):
        os.replace(os.path.join(made, name), os.path.join(tmp, name))
    for name in (NAME, "downloads"):
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    with open(os.path.join(tmp, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _summary(reports: dict, settings: dict) -> dict:
    splits, skipped = {}, []
    for split, r in sorted(reports.items(), key=lambda kv: (kv[0] != "train", kv[0])):
        counts = Counter(s["reason"] for s in r.skipped)
        splits[split] = {"rows": r.rows, "built": r.built, "skipped": {k: counts[k] for k in REASONS if counts[k]}}
        skipped += [{"split": split, **s} for s in r.skipped]
    dims = {k: settings[k] for k in ("frames", "resolution", "stride")}
    return {"format": SUMMARY_FORMAT, "version": 1, "name": NAME, "config": config_name(**dims), **settings,
            "sampling": "middle", "rows": sum(s["rows"] for s in splits.values()),
            "built": sum(s["built"] for s in splits.values()), "splits": splits, "skipped": skipped}


def _nothing_built(report: BuildReport) -> str:
    """'N missing, M corrupt of K videos skipped (e.g. PATH: reason, detail)' for an empty split."""
    counts = Counter(s["reason"] for s in report.skipped)
    first = report.skipped[0] if report.skipped else None
    return (", ".join(f"{counts[k]} {k}" for k in REASONS if counts[k]) or "none") + f" of {report.rows} videos " \
        f"skipped (e.g. " + (f"{first['path']}: {first['reason']}, {first['detail']}" if first else "no rows") + ")"


def format_summary(summary: dict, names: int = 20) -> str:
    """The build's summary as text: counts per split, then the skipped videos by reason (first `names` each)."""
    lines = [f"built {summary['built']} of {summary['rows']} videos into {summary.get('path', '')} "
             f"({summary['config']}: {summary['frames']} frames at stride {summary['stride']}, "
             f"{summary['resolution']}x{summary['resolution']})"]
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
    the source pickles cheaply into grain worker processes.
    """

    def __init__(self, data_dir: str, *, split: str = "train", frames: int | None = None,
                 resolution: int | None = None):
        self.folder = choose_build(data_dir, frames, resolution)
        summary = _read_summary(self.folder)
        self.frames, self.resolution, self.stride = summary["frames"], summary["resolution"], summary["stride"]
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
        if self._records is None:
            import tensorflow_datasets as tfds

            self._records = tfds.builder_from_directory(self.folder).as_data_source(split=self.split)
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[int(index)]
        return {"id": _text(r["videoid"]), "frames": r["frames"], "caption": _text(r["caption"]),
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
