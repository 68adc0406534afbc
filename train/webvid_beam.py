"""`build-webvid --beam-runner`: the build's per-video work as an Apache Beam pipeline, through TFDS's Beam support.

TFDS builds a split with Beam when the builder's split generator is a `beam.PTransform` (TFDS then runs one
pipeline for all splits, with the runner and options of `tfds.download.DownloadConfig`, and writes the
records with its own Beam writer: encode, shuffle by key hash, array_record shards). This module gives that
transform for one split:

    units ─Create─▶ Reshuffle ─▶ read each unit, ClipWork per item ──▶ (videoid, (item, result))
        │                                                          └─▶ items that cannot be read: skipped
        ─GroupByKey(videoid)─▶ the first by input position is built (or skipped for its own reason);
                               the others are duplicates ─▶ skipped
        ─▶ (videoid, example) to TFDS's writer;  count of examples ─▶ STAGING/beam-skipped/<split>.built
        skipped entries (a side output) ─▶ STAGING/beam-skipped/<split>.skipped*.jsonl ─▶ webvid_build.json

A unit is a tar shard or a run of CSV rows (train/webvid_input.py), so a worker streams its own videos
and no video bytes go through a shuffle. The examples are the ones the one-machine build gives: the same
`ClipWork`, the same rule for repeated videoids (the first in input order wins). Counters
`webvid:<split>_built` and `webvid:<split>_skipped_<reason>` show progress in the runner's monitoring.

Workers need this package (DirectRunner: the same machine; Dataflow, Flink, Spark: storydiff-jax[train]
in the worker image, or `--beam-options "--requirements_file=... / --sdk_container_image=..."`) and
must see `--manual-dir` and `--data-dir` at the same paths (a shared filesystem or a bucket mounted with
gcsfuse).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import apache_beam as beam

from .webvid import BuildReport, ClipWork, skip_entry
from .webvid_input import ManualDir, Unit, read_unit

SKIPPED = "skipped"
NAMESPACE = "webvid"


def _counter(name: str):
    return beam.metrics.Metrics.counter(NAMESPACE, name)


def _sample_unit(unit: Unit, manual_dir: str, layout: str, work: ClipWork):
    """Worker: every item of the unit through ClipWork, keyed by videoid (no decoding for an empty id:
    such an item is skipped whatever it holds)."""
    for item in read_unit(unit, manual_dir, layout):
        if item.problem is not None:
            _counter(f"{unit.split}_skipped_{item.problem[0]}").inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, skip_entry(item, *item.problem))
            continue
        result = work(item) if item.videoid else None
        yield item.videoid, (dataclasses.replace(item, video=None), result)   # the bytes stay here


def _first_of_videoid(keyed, split: str, work: ClipWork):
    """The items of one videoid: the first in input order is built (or skipped for its own reason), the
    rest are duplicates, as in the one-machine build."""
    videoid, values = keyed
    for k, (item, result) in enumerate(sorted(values, key=lambda v: v[0].position)):
        if k == 0 and videoid and result[0] == "ok":
            _counter(f"{split}_built").inc()
            yield videoid, work.example(item, result)
            continue
        if k == 0 and videoid:
            reason, detail = result[1], result[2]
        else:
            reason, detail = "duplicate", "videoid repeats in this split" if videoid else "empty videoid"
        _counter(f"{split}_skipped_{reason}").inc()
        yield beam.pvalue.TaggedOutput(SKIPPED, skip_entry(item, reason, detail))


class BuildSplit(beam.PTransform):
    def __init__(self, split: str, units: list[Unit], md: ManualDir, work: ClipWork, side_dir: str):
        super().__init__()
        self.split, self.units, self.md, self.work, self.side_dir = split, units, md, work, side_dir

    def expand(self, root):
        read = (root
                | "units" >> beam.Create(self.units)
                | "spread" >> beam.Reshuffle()
                | "sample" >> beam.FlatMap(_sample_unit, self.md.path, self.md.layout, self.work)
                .with_outputs(SKIPPED, main="keyed"))
        first = (read.keyed
                 | "by_videoid" >> beam.GroupByKey()
                 | "first" >> beam.FlatMap(_first_of_videoid, self.split, self.work).with_outputs(SKIPPED,
                                                                                                main="examples"))
        _ = ((read[SKIPPED], first[SKIPPED])
             | "skipped" >> beam.Flatten()
             | "skipped_json" >> beam.Map(json.dumps, sort_keys=True)
             | "skipped_write" >> beam.io.WriteToText(os.path.join(self.side_dir, f"{self.split}.skipped"),
                                                      file_name_suffix=".jsonl"))
        _ = (first.examples
             | "count" >> beam.combiners.Count.Globally()
             | "count_write" >> beam.io.WriteToText(os.path.join(self.side_dir, f"{self.split}.built"),
                                                    shard_name_template=""))
        return first.examples


def build_split(split: str, units: list[Unit], md: ManualDir, work: ClipWork, side_dir: str) -> BuildSplit:
    return BuildSplit(split, units, md, work, side_dir)


def collect_reports(pipeline_result, side_dir: str, splits: list[str]) -> dict[str, BuildReport]:
    """{split: BuildReport} from what the pipeline wrote beside the records (read back by the launcher)."""
    del pipeline_result   # the counters are for monitoring; the side output is what every runner keeps
    reports = {}
    for split in splits:
        skipped = []
        for path in sorted(glob.glob(os.path.join(side_dir, f"{split}.skipped*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                skipped += [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(side_dir, f"{split}.built")) as f:
            built = int(f.read().strip() or 0)
        reports[split] = BuildReport(built=built, skipped=skipped)
    return reports
