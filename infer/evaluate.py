"""`python -m infer.evaluate`: measure stories and transitions with the published consistency metrics.

    python -m infer.evaluate story out/story --clip ./clip-vit-large-patch14 [--dino ./dino-vits16] [--faces]
    python -m infer.evaluate video out/walk.mp4 --clip ./clip-vit-large-patch14 --lpips ./lpips-alex
    python -m infer.evaluate benchmark --model ./sdxl-jax --prompts examples/benchmark.yaml --out out/bench \\
        --clip ./clip-vit-base-patch32 --modes csa,plain
    python -m infer.evaluate compare out/bench-a out/bench-b out/story/metrics.json

Each command's options are one `storydiff_jax.options` dataclass below (default, help and checks in one
place); the flags are generated from it. The metric networks are read from the user's own files on every run (see
convert/metrics.py); nothing has to be converted first. docs/evaluation.md defines every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from storydiff_jax.errors import ConfigError
from storydiff_jax.options import Options, option

_CLIP_HELP = ("CLIP model: a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14; "
              "openai/clip-vit-base-patch32 for ConsiStory+ numbers) or an open_clip weights file")
_DINO_HELP = ("DINO model: a DINO v1 transformers ViTModel folder (facebook/dino-vits16: DreamBooth's DINO-I, as "
              "published) or a Dinov2Model folder (e.g. facebook/dinov2-small) -> DINO-I")
_CLIP_ACT_HELP = ("activation of an open_clip file (its config is not stored): gelu for LAION weights (default), "
                  "quick_gelu for OpenAI's")


def _check_clip_act(o) -> None:
    """--clip-act only describes an open_clip --clip file (each command with CLIP metrics checks it)."""
    if o.clip_act and not o.clip:
        raise ConfigError("--clip-act applies to the --clip model; pass --clip too or drop it")


@dataclass(frozen=True, kw_only=True)
class StoryEvalOptions(Options):
    run_dir: str = option(help="a story run folder written by `python -m infer.story` (its --out)", positional=True,
                          metavar="RUN_DIR")
    clip: str | None = option(None, _CLIP_HELP + " -> CLIP-T, CLIP-I", metavar="PATH")
    clip_act: str | None = option(None, _CLIP_ACT_HELP, choices=("gelu", "quick_gelu"))
    dino: str | None = option(None, _DINO_HELP, metavar="DIR")
    faces: bool = option(False, "face identity of human characters with dlib (needs the face-metrics extra)")
    masks: str | None = option(None, "folder of NN.png subject masks (white = subject), one per single-character "
                             "panel: CLIP-I and DINO-I then see the subject on noise", metavar="DIR")
    out: str | None = option(None, "metrics file to write (default: RUN_DIR/metrics.json)", metavar="FILE")

    def __post_init__(self):
        if not (self.clip or self.dino or self.faces):
            raise ConfigError("no metric chosen: pass --clip PATH (CLIP-T, CLIP-I), --dino DIR (DINO-I) and/or "
                              "--faces")
        _check_clip_act(self)


@dataclass(frozen=True, kw_only=True)
class VideoEvalOptions(Options):
    path: str = option(help="a clip (.mp4, .gif, a folder of frame_NNNN.png) or a folder of clips", positional=True,
                       metavar="PATH")
    clip: str | None = option(None, _CLIP_HELP + " -> CLIPSIM-first, CLIPSIM-frames", metavar="PATH")
    clip_act: str | None = option(None, _CLIP_ACT_HELP, choices=("gelu", "quick_gelu"))
    lpips: str | None = option(None, "folder with torchvision's AlexNet weights (alexnet-owt-7be5be79.pth) and the "
                             "lpips package's weights/v0.1/alex.pth -> LPIPS-first, LPIPS-frames", metavar="DIR")
    out: str | None = option(None, "metrics file to write (default: CLIP.metrics.json beside a clip file, "
                           "PATH/metrics.json for a folder)", metavar="FILE")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self):
        if not (self.clip or self.lpips):
            raise ConfigError("no metric chosen: pass --clip PATH (CLIPSIM) and/or --lpips DIR (LPIPS)")
        _check_clip_act(self)


@dataclass(frozen=True)
class BenchmarkMode:
    help: str
    story_flags: Callable  # (BenchmarkOptions, BenchmarkEntry) -> extra `infer.story` flags


# How each mode generates an entry: extra `python -m infer.story` flags on top of the shared settings. The
# extension point for new comparisons: a PhotoMaker mode would add an entry here whose flags pass the entry's
# reference photos (`--photomaker DIR --ref NAME=...`, which infer.story takes) once prompt files carry photos.
BENCHMARK_MODES: dict[str, BenchmarkMode] = {
    "csa": BenchmarkMode("Consistent Self-Attention, official id-bank write/read (--sa32/--sa64)",
                         lambda o, e: ["--mode", "bank", "--sa32", str(o.sa32), "--sa64", str(o.sa64)]),
    "plain": BenchmarkMode("CSA off: sampling rates 0, so no token is shared in the write or read phase and every "
                           "panel runs plain self-attention (the paper's baseline; same seeds, same noise)",
                           lambda o, e: ["--mode", "bank", "--sa32", "0", "--sa64", "0"]),
    "window": BenchmarkMode("the paper's Algorithm 1: sliding windows of 4 panels (--sa32/--sa64)",
                            lambda o, e: ["--mode", "window", "--sa32", str(o.sa32), "--sa64", str(o.sa64)]),
}


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated whole numbers, got {text!r}; e.g. --{name} 0,1") from None
    if not values:
        raise ConfigError(f"--{name} is empty; e.g. --{name} 42")
    return values


@dataclass(frozen=True, kw_only=True)
class BenchmarkOptions(Options):
    prompts: str = option(help="prompt file in the ConsiStory+ YAML layout (e.g. examples/benchmark.yaml)",
                          metavar="FILE")
    out: str = option(help="benchmark folder: runs/, results.json, results.md, charts/ (reused to resume)",
                      metavar="DIR")
    model: str | None = option(None, "converted model folder (`python -m convert pipeline`)", metavar="DIR")
    preset: str | None = option(None, "random-weight model preset instead of --model (plumbing runs: numbers mean "
                              "nothing)")
    modes: str = option("csa,plain", "comma-separated modes, each entry generated in every one: "
                      + "; ".join(f"{k}: {m.help}" for k, m in BENCHMARK_MODES.items()))
    seeds: str = option("42", "comma-separated seeds, the same for every mode (ConsiStory+ uses 42)")
    limit: int | None = option(None, "only the first N entries of the prompt file", metavar="N")
    steps: int | None = option(None, "denoising steps (default: infer.story's: 35; 8 on tiny presets)")
    height: int | None = option(None, "image height (default: infer.story's: 768; 128 on tiny presets)")
    width: int | None = option(None, "image width (default: infer.story's: 768; 128 on tiny presets)")
    guidance: float = option(5.0, "classifier-free guidance scale")
    id_length: int | None = option(None, "id panels per entry (default: 4, or the most the entry allows)")
    sa32: float = option(0.5, "csa/window modes: token sampling rate at 1/32 resolution")
    sa64: float = option(0.5, "csa/window modes: token sampling rate at other resolutions")
    style: str = option("none", "infer.story style template (the prompt file's own style phrase is always used)")
    sampler: str = option("ddim", "sampler", choices=("ddim", "euler"))
    dtype: str | None = option(None, "generation dtype (default: bfloat16 on GPU/TPU, float32 on CPU)",
                             choices=("float32", "bfloat16", "float16"))
    clip: str | None = option(None, _CLIP_HELP + " -> CLIP-T, CLIP-I", metavar="PATH")
    clip_act: str | None = option(None, _CLIP_ACT_HELP, choices=("gelu", "quick_gelu"))
    dino: str | None = option(None, _DINO_HELP, metavar="DIR")
    faces: bool = option(False, "face identity with dlib (human subjects; needs the face-metrics extra)")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self):
        if bool(self.model) == bool(self.preset):
            raise ConfigError("pass exactly one of --model CONVERTED_DIR or --preset NAME (e.g. tiny-sdxl for a "
                              "plumbing run)")
        if self.preset:
            from storydiff_jax.pipelines.components import PRESETS

            if self.preset not in PRESETS:
                raise ConfigError(f"unknown preset {self.preset!r}; use one of {', '.join(sorted(PRESETS))}")
        if not (self.clip or self.dino or self.faces):
            raise ConfigError("no metric chosen: pass --clip PATH (CLIP-T, CLIP-I), --dino DIR and/or --faces")
        _check_clip_act(self)
        unknown = [m for m in self.mode_list if m not in BENCHMARK_MODES]
        if unknown:
            raise ConfigError(f"unknown mode {unknown[0]!r}; use some of {', '.join(BENCHMARK_MODES)} (e.g. --modes "
                              "csa,plain)")
        if len(set(self.mode_list)) != len(self.mode_list) or len(set(self.seed_list)) != len(self.seed_list):
            raise ConfigError("--modes and --seeds must not repeat a value")
        for name in ("limit", "steps", "height", "width", "id_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not (0 <= self.sa32 <= 1 and 0 <= self.sa64 <= 1):
            raise ConfigError("--sa32 and --sa64 are sampling rates: use values in [0, 1]")

    @property
    def mode_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.modes.split(",") if m.strip())

    @property
    def seed_list(self) -> tuple[int, ...]:
        return _int_list(self.seeds, "seeds")


@dataclass(frozen=True, kw_only=True)
class CompareOptions(Options):
    runs: tuple[str, ...] = option(help="story run folders, metrics.json files (story or video) or benchmark folders "
                                   "(one column per mode)", positional=True, metavar="RUN")
    out: str | None = option(None, "also write the table to this Markdown file", metavar="FILE")


# ---------------------------------------------------------------------------------------------------- helpers


def _write_json(path: str, data) -> None:
    from storydiff_jax.outputs import staged_file

    with staged_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def _write_text(path: str, text: str) -> None:
    from storydiff_jax.outputs import staged_file

    with staged_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _measured_with(models: dict) -> str:
    """One line naming the networks behind the numbers (e.g. which DINO: DINOv2 and DINO v1 differ)."""
    return "measured with " + "; ".join(f"{k} {v}" for k, v in models.items())


def load_networks(o, log=print) -> dict:
    """The metric networks an options object names (fields clip, clip_act, dino, faces, lpips), as embedders.
    Keys: clip, dino, faces, lpips (those requested); each embedder's `name` records its source (the DINO's
    with its kind first, "dinov2: PATH" or "dino-v1 ViT: PATH": the two give different DINO-I)."""
    from storydiff_jax.metrics import ClipEmbedder

    nets = {}
    t0 = time.perf_counter()
    if getattr(o, "clip", None):
        from convert.metrics import load_clip

        loaded = load_clip(o.clip, hidden_act=o.clip_act)
        nets["clip"] = ClipEmbedder(loaded.model, loaded.tokenizer, loaded.preprocessing,
                                    name=os.path.abspath(o.clip))
    if getattr(o, "dino", None):
        from convert.metrics import load_dino
        from storydiff_jax.metrics import DinoEmbedder

        dino = load_dino(o.dino)
        nets["dino"] = DinoEmbedder(dino.model, dino.preprocessing, name=f"{dino.kind}: {os.path.abspath(o.dino)}")
    if getattr(o, "lpips", None):
        from convert.metrics import load_lpips
        from storydiff_jax.metrics import LpipsScorer

        nets["lpips"] = LpipsScorer(load_lpips(o.lpips), name=os.path.abspath(o.lpips))
    if getattr(o, "faces", False):
        from storydiff_jax.metrics import FaceEmbedder

        nets["faces"] = FaceEmbedder()
    log(f"metric networks loaded in {time.perf_counter() - t0:.1f} s: {', '.join(nets)}")
    return nets


# ---------------------------------------------------------------------------------------------------- story


def run_story(o: StoryEvalOptions, log=print, *, networks: dict | None = None) -> dict:
    """Score a run folder, write its metrics file, print the table; returns the metrics."""
    from storydiff_jax.metrics.report import summary_table
    from storydiff_jax.metrics.story import read_run

    read_run(o.run_dir)                  # a wrong folder fails before any network is loaded
    if o.masks and not os.path.isdir(o.masks):
        raise ConfigError(f"masks folder {o.masks} does not exist; pass a folder with one NN.png per panel")
    from storydiff_jax.metrics import score_story

    nets = networks if networks is not None else load_networks(o, log)
    result = score_story(o.run_dir, clip=nets.get("clip"), dino=nets.get("dino"), faces=nets.get("faces"),
                         masks_dir=o.masks)
    out = o.out or os.path.join(o.run_dir, "metrics.json")
    _write_json(out, result)
    log(summary_table(result["summary"]))
    log(_measured_with(result["models"]))
    for name, c in result["characters"].items():
        values = ", ".join(f"{k} {v:.4f}" for k, v in c.items() if isinstance(v, float))
        log(f"  [{name}] {len(c['panels'])} solo panels{': ' + values if values else ''}")
    log(f"wrote {out}")
    return result


# ---------------------------------------------------------------------------------------------------- video


def run_video(o: VideoEvalOptions, log=print, *, networks: dict | None = None) -> dict:
    """Score one clip or a folder of clips, write the metrics file, print the table; returns the metrics."""
    from storydiff_jax.metrics.report import summary_table
    from storydiff_jax.metrics.video import find_clips, score_videos

    clips = find_clips(o.path)
    nets = networks if networks is not None else load_networks(o, log)
    result = score_videos(o.path, clip=nets.get("clip"), lpips=nets.get("lpips"), progress=not o.quiet)
    if o.out:
        out = o.out
    elif os.path.isfile(o.path):
        out = os.path.splitext(o.path)[0] + ".metrics.json"
    else:
        out = os.path.join(o.path, "metrics.json")
    _write_json(out, result)
    log(summary_table(result["summary"]) + f"\n(mean over {len(clips)} clip{'s' * (len(clips) > 1)}; "
        f"{_measured_with(result['models'])})")
    log(f"wrote {out}")
    return result


# ---------------------------------------------------------------------------------------------------- benchmark


def _generation_settings(o: BenchmarkOptions, dtype: str) -> dict:
    """What makes two benchmark folders' images comparable (checked when a folder is resumed)."""
    return {"model": os.path.abspath(o.model) if o.model else o.preset, "steps": o.steps, "height": o.height,
            "width": o.width, "guidance": o.guidance, "id_length": o.id_length, "sa32": o.sa32, "sa64": o.sa64,
            "style": o.style, "sampler": o.sampler, "dtype": dtype}


def _story_args(o: BenchmarkOptions, entry, mode: str, seed: int, run_dir: str, dtype: str):
    """The `python -m infer.story` arguments of one benchmark run (its own parser, so its checks apply)."""
    from infer import story as story_cli

    flags = ["--story", os.path.abspath(o.prompts), "--out", run_dir, "--seed", str(seed), "--style", o.style,
             "--guidance", str(o.guidance), "--sampler", o.sampler, "--dtype", dtype, "--quiet"]
    flags += ["--model", o.model] if o.model else ["--preset", o.preset]
    for name in ("steps", "height", "width", "id_length"):
        if getattr(o, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(o, name))]
    flags += BENCHMARK_MODES[mode].story_flags(o, entry)
    return story_cli.build_parser().parse_args(flags)


def run_benchmark(o: BenchmarkOptions, log=print, *, networks: dict | None = None, pipe=None) -> dict:
    """Generate every (entry, seed, mode) with infer.story's run-folder writer, score each, write the reports.

    Resumable: a run folder that exists was completed (infer.story writes folders atomically) and is not
    generated again; one whose metrics.json was computed with the same networks is not scored again.
    networks / pipe: already loaded metric networks (`load_networks`) and StoryPipeline for `o.model` /
    `o.preset`, to reuse them (and their compiled programs) across calls; loaded here when None.
    """
    from storydiff_jax.metrics.prompts import read_prompts

    entries = read_prompts(o.prompts)[: o.limit]
    seeds = o.seed_list
    out = os.path.abspath(o.out)
    import jax

    dtype = o.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if pipe is not None:
        dtype = jax.numpy.dtype(pipe.components.dtype).name
    settings = _generation_settings(o, dtype)
    stories = {e.id: e.story_text() for e in entries}
    manifest_path = os.path.join(out, "benchmark.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            before = json.load(f)
        generation = before.get("generation", {})
        changed = [k for k in settings if generation.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"{o.out} holds a benchmark generated with other settings ({k} "
                              f"{generation.get(k)!r}, now {settings[k]!r}); pass another --out to compare them "
                              "side by side")
        edited = [i for i, text in before.get("stories", {}).items() if i in stories and stories[i] != text]
        if edited:
            raise ConfigError(f"entry {edited[0]} of {o.prompts} changed since {o.out} generated it; pass another "
                              "--out (or remove its runs/ folder)")
        stories = {**before.get("stories", {}), **stories}
    nets = networks if networks is not None else load_networks(o, log)
    _write_json(manifest_path, {"generation": settings, "prompts": os.path.abspath(o.prompts), "stories": stories})

    from storydiff_jax.metrics import score_story

    jobs = [(e, seed, mode) for e in entries for seed in seeds for mode in o.mode_list]
    models = {k: e.name for k, e in nets.items() if k in ("clip", "dino", "faces")}
    runs, counts = [], {"generated": 0, "scored": 0, "kept": 0}
    bar = None
    if not o.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="benchmark", unit="run")
    log_line = bar.write if bar is not None else log
    try:
        for entry, seed, mode in jobs:
            rel = os.path.join("runs", entry.id, f"{mode}-seed{seed}")
            run_dir = os.path.join(out, rel)
            if bar is not None:
                bar.set_postfix_str(f"{entry.id} {mode} seed {seed}")
            metrics_path = os.path.join(run_dir, "metrics.json")
            result = None
            if os.path.isfile(metrics_path):
                with open(metrics_path, encoding="utf-8") as f:
                    result = json.load(f)
                if result.get("models") != models or result.get("masks") is not None:
                    result = None
            if result is not None:
                counts["kept"] += 1
            else:
                if not os.path.isfile(os.path.join(run_dir, "story.json")):
                    if pipe is None:
                        pipe = _load_pipeline(o, dtype, log_line)
                    _generate(_story_args(o, entry, mode, seed, run_dir, dtype), entry, pipe)
                    counts["generated"] += 1
                result = score_story(run_dir, clip=nets.get("clip"), dino=nets.get("dino"), faces=nets.get("faces"))
                _write_json(metrics_path, result)
                counts["scored"] += 1
            runs.append({"entry": entry.id, "domain": entry.domain, "subject": entry.subject, "mode": mode,
                         "seed": seed, "dir": rel, "summary": result["summary"]})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    results = _write_reports(o, out, runs, settings, models)
    log(results["table"])
    log(f"{len(runs)} runs ({counts['generated']} generated, {counts['scored']} scored, {counts['kept']} kept from an "
        f"earlier run); wrote {os.path.join(out, 'results.json')}, results.md and charts/")
    return {**results, "counts": counts}


def _load_pipeline(o: BenchmarkOptions, dtype: str, log):
    import jax.numpy as jnp

    from storydiff_jax.pipelines import StoryPipeline

    source = o.model or o.preset
    if not o.model:
        log(f"--preset {source}: random weights, the pictures are noise and the scores only test the plumbing")
    return StoryPipeline.from_pretrained(source, dtype=getattr(jnp, dtype))


def _generate(args, entry, pipe) -> None:
    """One run folder through infer.story's own writer (story.json, panels/, pages/)."""
    from infer import story as story_cli

    story_cli.run(args, log=lambda msg: None, text=entry.story_text(), pipe=pipe)


def _write_reports(o: BenchmarkOptions, out: str, runs: list[dict], settings: dict, models: dict) -> dict:
    from storydiff_jax.metrics.report import METRICS, aggregate, bar_chart, compare_table, grouped_table

    by_mode = aggregate(runs, "mode")
    table = grouped_table(by_mode)
    means = [(mode, {k: v["mean"] for k, v in stats.items()}) for mode, stats in by_mode.items()]
    md = [f"# Benchmark: {os.path.basename(o.prompts)}", "",
          f"{len({r['entry'] for r in runs})} entries x {len(o.seed_list)} seed(s) x {len(o.mode_list)} modes; "
          f"model {settings['model']}; " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "model"), "",
          _measured_with(models).capitalize() + ".", "",
          "## Mean ± standard deviation over runs", "", table, "",
          f"## Means side by side (differences to {means[0][0]}; ▲ better, ▼ worse)", "", compare_table(means), ""]
    results = {"settings": settings, "models": models, "prompts": os.path.abspath(o.prompts),
               "modes": list(o.mode_list), "seeds": list(o.seed_list), "by_mode": by_mode, "runs": runs}
    _write_json(os.path.join(out, "results.json"), results)
    _write_text(os.path.join(out, "results.md"), "\n".join(md))
    charts = os.path.join(out, "charts")
    os.makedirs(charts, exist_ok=True)
    metrics = list(dict.fromkeys(k for stats in by_mode.values() for k in stats))
    from storydiff_jax.outputs import staged_file

    for metric in metrics:
        with staged_file(os.path.join(charts, f"{metric}.png")) as tmp:
            label = METRICS[metric].label if metric in METRICS else metric
            bar_chart(by_mode, metric, tmp, title=f"{label} by mode ({os.path.basename(o.prompts)})")
    return {"table": table, "results": results, "charts": [f"charts/{m}.png" for m in metrics]}


# ---------------------------------------------------------------------------------------------------- compare


def _columns(path: str) -> list[tuple[str, dict, dict]]:
    """One table column per run: a run folder or metrics file -> (name, its summary, the networks it was
    measured with); a benchmark -> one per mode."""
    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        for candidate in ("results.json", "metrics.json"):
            if os.path.isfile(os.path.join(path, candidate)):
                file = os.path.join(path, candidate)
                break
        else:
            raise ConfigError(f"{path} holds neither metrics.json nor results.json; score it first with "
                              "`python -m infer.evaluate story|video|benchmark`")
    elif os.path.isfile(path):
        file, name = path, os.path.splitext(name)[0]
    else:
        raise ConfigError(f"{path}: no such file or folder")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file} cannot be read as JSON ({e})") from None
    models = data.get("models") if isinstance(data, dict) and isinstance(data.get("models"), dict) else {}
    if isinstance(data, dict) and isinstance(data.get("by_mode"), dict):
        return [(f"{name}: {mode}", {k: v["mean"] for k, v in stats.items()}, models)
                for mode, stats in data["by_mode"].items()]
    if isinstance(data, dict) and isinstance(data.get("summary"), dict):
        return [(name, data["summary"], models)]
    raise ConfigError(f"{file} is not a metrics.json or results.json written by infer.evaluate")


def run_compare(o: CompareOptions, log=print) -> str:
    from storydiff_jax.metrics.report import compare_table

    columns = [(path, *column) for path in o.runs for column in _columns(path)]
    names = [name for _, name, _, _ in columns]
    # Same folder names in different places: name those columns by their path instead.
    table = compare_table([(name if names.count(name) == 1 else f"{path} ({name})", summary)
                           for path, name, summary, _ in columns], [models for *_, models in columns])
    if o.out:
        _write_text(o.out, table + "\n")
    log(table)
    return table


# ---------------------------------------------------------------------------------------------------- CLI

COMMANDS = {
    "story": (StoryEvalOptions, run_story, "CLIP-T, CLIP-I, DINO-I and face identity of a story run folder",
              "the metrics file was not written"),
    "video": (VideoEvalOptions, run_video, "LPIPS-first/-frames and CLIPSIM-first/-frames of transition clips",
              "the metrics file was not written"),
    "benchmark": (BenchmarkOptions, run_benchmark, "generate a prompt set in several modes (CSA vs plain) with the "
                  "same seeds and score it", "finished runs are kept in OUT/runs: run the same command to resume"),
    "compare": (CompareOptions, run_compare, "metric tables side by side, differences marked", "nothing was written"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infer.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure subject consistency of stories (CLIP-T, CLIP-I, DINO-I, face identity), smoothness of "
                    "transition videos (LPIPS, CLIPSIM), run a CSA-vs-plain benchmark, compare results. Metric "
                    "networks are read from your own files each run (nothing to convert). See docs/evaluation.md.",
        epilog="examples:\n" + __doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_text, _) in COMMANDS.items():
        cls.add_arguments(sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls, work, _, interrupted = COMMANDS[args.command]
    from storydiff_jax.cli import run_command

    def go():
        work(cls.from_args(args))

    return run_command(go, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
