"""What each metric is called, which way is better, what was published, and how results are shown:
Markdown tables (one run, several runs side by side, a benchmark by mode) and bar charts (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Metric:
    label: str
    higher_is_better: bool
    published: str = ""          # a reference number and where it comes from (docs/evaluation.md)
    network: str = ""            # its key in metrics.json's "models": values from other networks do not compare


METRICS: dict[str, Metric] = {
    "clip_t": Metric("CLIP-T (cosine)", True, network="clip"),
    "clip_t_clipscore": Metric("CLIP-T, CLIPScore 2.5*max(cos,0)", True,
                               "StoryDiffusion 0.6586 (paper Table 1, model unstated); 0.8877 on ConsiStory+ "
                               "(ViT-B/32, aggregator)", "clip"),
    "clip_t_torchmetrics": Metric("CLIP-T, torchmetrics 100*cos", True, network="clip"),
    "clip_i": Metric("CLIP-I (character similarity)", True, "StoryDiffusion 0.8950 (paper Table 1)", "clip"),
    "dino_i": Metric("DINO-I", True, network="dino"),
    "face_found": Metric("faces found (share of panels)", True, network="faces"),
    "face_distance": Metric("face descriptor distance", False, "< 0.6: same person (dlib)", "faces"),
    "face_same": Metric("face pairs under 0.6 (share)", True, network="faces"),
    "lpips_first": Metric("LPIPS-first", False, "StoryDiffusion 0.3794 (paper Table 2)", "lpips"),
    "lpips_frames": Metric("LPIPS-frames", False, "StoryDiffusion 0.1635 (paper Table 2)", "lpips"),
    "clipsim_first": Metric("CLIPSIM-first", True, "StoryDiffusion 0.9606 (paper Table 2)", "clip"),
    "clipsim_frames": Metric("CLIPSIM-frames", True, "StoryDiffusion 0.9870 (paper Table 2)", "clip"),
}


def _ordered(keys) -> list[str]:
    keys = set(keys)
    return [k for k in METRICS if k in keys] + sorted(keys - set(METRICS))


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def summary_table(summary: dict[str, Any]) -> str:
    """| metric | value | published | for one run's summary."""
    lines = ["| metric | value | published (reference) |", "| --- | ---: | --- |"]
    for k in _ordered(summary):
        m = METRICS.get(k, Metric(k, True))
        lines.append(f"| {m.label} | {_fmt(summary[k])} | {m.published} |")
    return "\n".join(lines)


def compare_table(columns: Sequence[tuple[str, dict[str, Any]]],
                  models: Sequence[dict[str, str]] | None = None) -> str:
    """Metric rows, one column per run. Each later column shows its difference to the first (▲ better,
    ▼ worse by the metric's direction, = same to 4 decimals); the best value of a row is in bold (ties: all).

    models: per column, the networks it was measured with (metrics.json's "models"). A value measured with
    another network than the first column's (another CLIP, DINOv2 against DINO v1, ...) is not comparable:
    it is marked † instead of a difference, is never bold, and a note under the table names the networks."""
    if not columns:
        raise ConfigError("nothing to compare: pass at least one run")
    models = list(models) if models is not None else [{} for _ in columns]
    keys = _ordered({k for _, s in columns for k in s})
    header = "| metric | " + " | ".join(name for name, _ in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * len(columns)]
    notes = []
    for k in keys:
        m = METRICS.get(k, Metric(k, True))
        values = [s.get(k) for _, s in columns]
        nets = [mod.get(m.network) if m.network else None for mod in models]
        # Only values measured with the first column's network compare (unrecorded networks are trusted).
        other = [i > 0 and None not in (nets[0], nets[i]) and nets[i] != nets[0] for i in range(len(values))]
        present = [v for v, o in zip(values, other) if v is not None and not o]
        best = (max(present) if m.higher_is_better else min(present)) if len(present) > 1 else None
        if any(o and v is not None for o, v in zip(other, values)):
            notes.append(f"† {m.label}: measured with different {m.network.upper()} networks, not comparable ("
                         + "; ".join(f"{name}: {net}" for (name, _), net, v in zip(columns, nets, values)
                                     if v is not None and net is not None) + ")")
        cells = []
        for i, v in enumerate(values):
            cell = _fmt(v)
            if v is not None and best is not None and v == best and not other[i]:
                cell = f"**{cell}**"
            base = values[0]
            if other[i] and v is not None:
                cell += " †"
            elif i > 0 and v is not None and base is not None:
                delta = v - base
                if round(delta, 4) == 0:
                    cell += " (=)"
                else:
                    better = (delta > 0) == m.higher_is_better
                    cell += f" ({delta:+.4f} {'▲' if better else '▼'})"
            cells.append(cell)
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def aggregate(runs: Sequence[dict[str, Any]], group: str) -> dict[str, dict[str, dict[str, float]]]:
    """{group value: {metric: {mean, std, n}}} over runs (each {group: ..., "summary": {...}})."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(r[group] for r in runs):
        rows = [r["summary"] for r in runs if r[group] == name]
        stats = {}
        for k in _ordered({k for s in rows for k in s}):
            vals = [s[k] for s in rows if s.get(k) is not None]
            if vals:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
                stats[k] = {"mean": mean, "std": std, "n": len(vals)}
        out[name] = stats
    return out


def grouped_table(stats: dict[str, dict[str, dict[str, float]]], what: str = "mode") -> str:
    """Rows = groups (modes), columns = metrics, cells mean ± std (n runs)."""
    keys = _ordered({k for s in stats.values() for k in s})
    lines = [f"| {what} | " + " | ".join(METRICS.get(k, Metric(k, True)).label for k in keys) + " |",
             "| --- |" + " ---: |" * len(keys)]
    for name, s in stats.items():
        cells = [f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f} (n={s[k]['n']})" if k in s else "n/a" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(stats: dict[str, dict[str, dict[str, float]]], metric: str, path: str, title: str = "") -> None:
    """One PNG: a bar per group (mode) with its mean and a ± std error bar, values written on the bars."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("bar charts need matplotlib: pip install 'storydiff-jax[eval]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [n for n in stats if metric in stats[n]]
    means = [stats[n][metric]["mean"] for n in names]
    stds = [stats[n][metric]["std"] for n in names]
    m = METRICS.get(metric, Metric(metric, True))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.6), dpi=100)
    try:
        bars = ax.bar(names, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in means], padding=2, fontsize=8)
        ax.set_ylabel(m.label + (" (higher is better)" if m.higher_is_better else " (lower is better)"), fontsize=8)
        ax.set_title(title or m.label, fontsize=10)
        ax.margins(y=0.15)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
