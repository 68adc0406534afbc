"""The manual directory of a WebVid build: which videos each split has, and how a worker reads them.

Two layouts, recognised by what the folder holds:

    csv          WebVid's CSV files at the top (columns videoid, name, page_dir, duration, contentUrl; `name`
                 is the caption) and the videos on disk at `--layout`, a Python format string over the CSV's
                 columns (default "videos/{page_dir}/{videoid}.mp4", the layout of WebVid's download scripts).
                 Each CSV is a split: `*_train.csv` -> train, `*_val.csv` / `*_validation.csv` -> validation,
                 `*_test.csv` -> test; a single CSV of any other name is train.
    webdataset   what `video2dataset` writes: tar shards (00000.tar, 00001.tar, ...) at the top -> train, or in
                 split folders train/, val/ (or validation/), test/. A sample is the members that share a key:
                 KEY.mp4 (or .webm, .mkv, .mov, .avi), KEY.txt (the caption) and KEY.json (metadata: its
                 `videoid` and `page_dir` when video2dataset kept those columns; else the key is the id). The
                 shards are read as streams, one after the other, never unpacked. Other files there
                 (video2dataset's .parquet and _stats.json) are ignored; tar shards win over CSV files.

A split's input is cut into units that one worker reads start to end: a tar shard, or a run of CSV rows
(`csv_units` finds the byte offset where each run starts in one streaming pass, so a worker seeks straight
to its rows; WebVid-10M's train CSV has 10.7M of them). Every row or sample becomes an `Item` whose
`position` orders it within its split, whichever unit and worker read it: the first of two items with the
same videoid is the one that is built, in the one-machine build and in the Beam pipeline alike.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import string
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from storydiff_jax.errors import ConfigError

DEFAULT_LAYOUT = "videos/{page_dir}/{videoid}.mp4"
REQUIRED_COLUMNS = ("videoid", "name")   # plus every column the layout names
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
_SPLIT_SUFFIX = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class Unit:
    """A piece of one split's input that one worker reads start to end."""

    split: str
    kind: str                       # "csv" or "tar"
    path: str
    index: int = 0                  # tar: the shard's number in its split (orders the shards' samples)
    offset: int | None = None       # csv: byte offset of the first row (None: the file's start, header first)
    first_row: int = 0              # csv: the row `offset` points at (0: the first row after the header)
    rows: int | None = None         # rows / samples to read (None: to the end)
    header: tuple[str, ...] = ()    # csv with an offset: the column names


@dataclass(frozen=True)
class Item:
    """One video to build. `video` is a path on disk (csv), the file's bytes (tar), or None: `problem`
    then says why it is skipped without being decoded."""

    position: tuple[int, int]       # (shard, sample) or (0, row): the order within the split
    videoid: str
    caption: str
    page_dir: str
    path: str                       # how the skip report names it: the file, or SHARD.tar:KEY.mp4
    video: str | bytes | None = None
    problem: tuple[str, str] | None = None   # (reason, detail)

    def named(self) -> dict:
        return {"videoid": self.videoid, "page_dir": self.page_dir, "path": self.path}


@dataclass(frozen=True)
class ManualDir:
    path: str
    kind: str                       # "csv" or "webdataset"
    splits: dict[str, list[str]]    # split -> [its CSV] or [its tar shards, in order]
    layout: str


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


def open_manual_dir(manual_dir: str, layout: str = DEFAULT_LAYOUT) -> ManualDir:
    """The layout and splits of `manual_dir`, every CSV's header checked against the columns the build needs."""
    manual_dir = os.path.abspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise ConfigError(f"--manual-dir {manual_dir}: no such folder; download WebVid's CSVs and videos (or "
                          "video2dataset's tar shards) into it")
    shards = _tar_splits(manual_dir)
    if shards:
        return ManualDir(manual_dir, "webdataset", shards, layout)
    csvs = sorted(n for n in os.listdir(manual_dir) if n.lower().endswith(".csv")
                  and os.path.isfile(os.path.join(manual_dir, n)))
    if not csvs:
        raise ConfigError(f"--manual-dir {manual_dir}: no .csv file and no .tar shard; put WebVid's "
                          "results_*_train.csv (columns videoid, name, page_dir, duration, contentUrl) there, or "
                          "video2dataset's shards (00000.tar, ...)")
    fields = layout_fields(layout)
    needed = list(dict.fromkeys(REQUIRED_COLUMNS + tuple(fields)))
    splits: dict[str, list[str]] = {}
    for name in csvs:
        split = split_name(name, single=len(csvs) == 1)
        if split in splits:
            raise ConfigError(f"--manual-dir {manual_dir}: {os.path.basename(splits[split][0])} and {name} both "
                              f"give split {split!r}; move one of them out")
        path = os.path.join(manual_dir, name)
        splits[split] = [path]
        header = next(_csv_records(path), [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise ConfigError(f"{path}: no column {', '.join(missing)} (it has: {', '.join(header) or 'none'}); "
                              f"WebVid's CSVs have videoid, name, page_dir, duration, contentUrl"
                              + (f", and --layout {layout!r} needs {', '.join(fields)}" if fields else ""))
    return ManualDir(manual_dir, "csv", splits, layout)


def _tar_splits(manual_dir: str) -> dict[str, list[str]]:
    def tars(folder):
        return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                      if n.lower().endswith(".tar") and os.path.isfile(os.path.join(folder, n)))

    splits = {"train": tars(manual_dir)} if tars(manual_dir) else {}
    for name in sorted(os.listdir(manual_dir)):
        folder = os.path.join(manual_dir, name)
        split = _SPLIT_SUFFIX.get(name.lower())
        if split and os.path.isdir(folder) and tars(folder):
            if split in splits:
                raise ConfigError(f"--manual-dir {manual_dir}: tar shards for split {split!r} both at the top and "
                                  f"in {name}/; keep one of them")
            splits[split] = tars(folder)
    return splits


# ----------------------------------------------------------------------------------------------------
# Rows, counts and units


def count_items(md: ManualDir, split: str, limit: int | None = None) -> int:
    """Rows (samples) of a split, at most `limit` per split (for progress bars: headers only, no video read)."""
    if md.kind == "csv":
        n = sum(1 for _ in _csv_records(md.splits[split][0])) - 1
    else:
        n = sum(_count_samples(p) for p in md.splits[split])
    return max(0, n if limit is None else min(n, limit))


def units(md: ManualDir, split: str, limit: int | None = None, rows_per_unit: int | None = None) -> list[Unit]:
    """The split's input as units: one per tar shard; a CSV whole (rows_per_unit None) or in runs of
    `rows_per_unit` rows (one streaming pass over the CSV to find where each run starts)."""
    if md.kind == "webdataset":
        out, left = [], limit
        for i, path in enumerate(md.splits[split]):
            if left is None:
                out.append(Unit(split, "tar", path, index=i))
                continue
            n = min(_count_samples(path), left)
            if n:
                out.append(Unit(split, "tar", path, index=i, rows=n))
            left -= n
            if not left:
                break
        return out
    path = md.splits[split][0]
    if rows_per_unit is None:
        return [Unit(split, "csv", path, rows=limit)]
    header, starts = csv_run_offsets(path, rows_per_unit, limit)
    total = starts[-1][1] if starts else 0
    return [Unit(split, "csv", path, offset=offset, first_row=row, rows=min(rows_per_unit, total - row),
                 header=tuple(header)) for offset, row in starts[:-1]]


def csv_run_offsets(path: str, rows_per_unit: int, limit: int | None = None):
    """(header, [(byte offset, row), ...]): where every `rows_per_unit`-th row starts, and last the end
    (offset, row count). Rows may hold quoted newlines: the offsets are record boundaries as `csv` reads them."""
    consumed = 0
    with open(path, "rb") as f:
        def lines():
            nonlocal consumed
            for line in f:
                consumed += len(line)
                yield line.decode("utf-8")

        try:
            reader = csv.reader(lines())
            header = [h.strip() for h in next(reader, [])]
            starts, row = [], 0
            while limit is None or row < limit:
                offset = consumed
                if next(reader, None) is None:
                    break
                if row % rows_per_unit == 0:
                    starts.append((offset, row))
                row += 1
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ConfigError(f"{path}: cannot be read as a CSV ({_first_line(e)}); re-download it") from None
    return header, starts + [(consumed, row)]


def _csv_records(path: str, offset: int | None = None) -> Iterator[list[str]]:
    """The CSV's records (the header first, stripped; from `offset`: rows only), read lazily."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if offset is not None:
                f.seek(offset)
            for i, record in enumerate(csv.reader(f)):
                yield [h.strip() for h in record] if i == 0 and offset is None else record
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot be read as a CSV ({_first_line(e)}); re-download it") from None


def _first_line(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Reading a unit


def read_unit(unit: Unit, manual_dir: str, layout: str) -> Iterator[Item]:
    """The unit's items in order (CSV rows with the video's path; tar samples with the video's bytes)."""
    yield from (_tar_items if unit.kind == "tar" else _csv_items)(unit, manual_dir, layout)


def _csv_items(unit: Unit, manual_dir: str, layout: str) -> Iterator[Item]:
    records = _csv_records(unit.path, unit.offset)
    header = list(unit.header) if unit.offset is not None else next(records, [])
    for n, record in enumerate(records):
        if unit.rows is not None and n >= unit.rows:
            break
        row = dict(zip(header, record))
        values = {k: (row.get(k) or "").strip() for k in header}
        path = os.path.join(manual_dir, layout.format(**values))
        yield Item((unit.index, unit.first_row + n), values["videoid"], row.get("name") or "",
                   values.get("page_dir", ""), path, video=path)


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar, read as a stream (a sample's members are
    adjacent; the key is the member's path up to the first dot of its file name, as webdataset has it)."""
    with tarfile.open(path, mode="r|*") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            if "." not in base.lstrip("."):
                continue
            stem, ext = base.split(".", 1)
            if key is not None and posixpath.join(folder, stem) != key:
                yield key, files
                files = {}
            key = posixpath.join(folder, stem)
            files[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield key, files


def _count_samples(path: str) -> int:
    """Samples in a tar shard from its headers alone (members are skipped, not read); a damaged shard counts
    what precedes the damage plus one (the report's entry for it)."""
    keys, last = 0, None
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                folder, base = posixpath.split(member.name)
                if member.isfile() and "." in base.lstrip("."):
                    key = posixpath.join(folder, base.split(".", 1)[0])
                    keys += key != last
                    last = key
    except (OSError, EOFError, tarfile.TarError):
        return keys + 1
    return keys


def _tar_items(unit: Unit, manual_dir: str, layout: str) -> Iterator[Item]:
    n = 0
    try:
        for key, files in _tar_samples(unit.path):
            if unit.rows is not None and n >= unit.rows:
                return
            yield _sample_item(unit, n, key, files)
            n += 1
    except (OSError, EOFError, tarfile.TarError) as e:   # a truncated or damaged shard: what came before stays
        yield Item((unit.index, n), "", "", "", unit.path,
                   problem=("corrupt", f"the tar shard breaks after {n} samples ({_first_line(e)})"))


def _sample_item(unit: Unit, n: int, key: str, files: dict[str, bytes]) -> Item:
    ext = next((e for e in VIDEO_EXTENSIONS if e in files), None)
    name = f"{unit.path}:{key}.{ext or 'mp4'}"
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
        meta = meta if isinstance(meta, dict) else {}
    except ValueError:
        return Item((unit.index, n), key, "", "", name, problem=("corrupt", f"{key}.json is not JSON"))
    videoid = str(meta.get("videoid") or key).strip()
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace").strip()
    else:
        caption = str(meta.get("caption") or meta.get("name") or "")
    if ext is None:
        return Item((unit.index, n), videoid, caption, str(meta.get("page_dir") or ""), name,
                    problem=("missing", f"no video ({', '.join(VIDEO_EXTENSIONS)}) in the sample"))
    return Item((unit.index, n), videoid, caption, str(meta.get("page_dir") or ""), name, video=files[ext])


def video_file(video: str | bytes):
    """What PyAV opens: the path, or the bytes as a file."""
    return io.BytesIO(video) if isinstance(video, bytes) else video
