"""End to end through `python -m infer.evaluate` on random-weight tiny models (numbers are plumbing only).

One tiny-sdxl StoryPipeline (64 px, 2 steps) and one set of metric networks serve every test of the module:
* `infer.story` (its own `run`, the CLI's entry point) writes a one-character run folder;
  `evaluate story` scores it: metrics.json holds every metric, and CLIP-T / CLIP-I equal a test statement
  of their formulas on transformers' CLIP features of the same panels (<= 1e-4);
* `evaluate video` scores an mp4 and a frames folder; `compare` puts runs side by side;
* `benchmark` generates 2 entries x 2 modes (csa, plain) with the same seed: runs, results.json, results.md
  and a PNG per metric; rerun, it generates nothing (and scores again only what a new network needs);
* `evaluate story --dino` with a DINO v1 ViTModel folder: DINO-I equals the formula on transformers' CLS
  features; `compare` marks DINO-I of the two DINO kinds as not comparable;
* errors (run folder without story.json, a CLIP or DINO folder of another kind, missing LPIPS heads) exit 2
  with one line through the real CLI in subprocesses, writing nothing.
The benchmark's settings match the story run's (1 character, id length 2, seed 42), so its csa runs reuse
the compiled write/read programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from metric_models import lpips_folder, tiny_clip_folder, tiny_dino_vit_folder, tiny_dinov2_folder

from infer import evaluate
from infer import story as story_cli
from storydiff_jax import consistent as csa
from storydiff_jax.images import load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = ["--steps", "2", "--height", "64", "--width", "64", "--id-length", "2"]
STORY = """[Mia] a woman with short red hair and a green coat

[Mia] reads a book in a library
[Mia] rides a bicycle in a park
[Mia] drinks tea by a window # Rain again.
[Mia] waves from a hill
"""
PROMPTS = """people:
  - style: "A photo of"
    subject: "an old fisherman with a white beard"
    concept_token: ["fisherman"]
    settings: ["mending a net", "steering a boat", "drinking tea"]
objects:
  - style: "A drawing of"
    subject: "a blue teapot"
    concept_token: teapot
    settings: ["on a table", "on a shelf", "in the grass"]
  - style: "A photo of"
    subject: "a red bicycle"
    settings: ["by a lake", "in the snow", "on a road"]
"""


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_nets")
    clip_ref = tiny_clip_folder(root / "clip")
    tiny_dinov2_folder(root / "dino")
    dino_v1_ref = tiny_dino_vit_folder(root / "dino_v1")
    lpips_folder(root / "lpips")
    options = evaluate.StoryEvalOptions(run_dir=".", clip=str(root / "clip"), dino=str(root / "dino"), faces=True)
    loaded = evaluate.load_networks(options, log=lambda m: None)
    return {"root": root, "clip_ref": clip_ref, "dino_v1_ref": dino_v1_ref, "loaded": loaded}


@pytest.fixture(scope="module")
def pipe():
    from storydiff_jax.pipelines import StoryPipeline

    return StoryPipeline.from_pretrained("tiny-sdxl")


@pytest.fixture(scope="module")
def story_run(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("story")
    (root / "story.txt").write_text(STORY)
    args = story_cli.build_parser().parse_args(["--preset", "tiny-sdxl", "--story", str(root / "story.txt"),
                                                "--out", str(root / "run"), "--seed", "42", "--quiet", *GEN])
    return story_cli.run(args, log=lambda m: None, pipe=pipe)


def test_story_metrics(story_run, nets, capsys):
    n = nets["root"]
    assert evaluate.main(["story", story_run, "--clip", str(n / "clip"), "--dino", str(n / "dino"), "--faces"]) == 0
    printed = capsys.readouterr().out
    assert "| CLIP-I (character similarity) |" in printed and "metrics.json" in printed
    saved = json.loads(open(os.path.join(story_run, "metrics.json")).read())
    assert set(saved["summary"]) == {"clip_t", "clip_t_clipscore", "clip_t_torchmetrics", "clip_i", "dino_i",
                                     "face_found", "face_distance", "face_same"}
    assert saved["characters"]["Mia"]["panels"] == [0, 1, 2, 3]
    assert saved["summary"]["face_found"] == 0.0 and saved["summary"]["face_distance"] is None  # noise: no face
    assert all(-1 <= saved["summary"][k] <= 1 for k in ("clip_t", "clip_i", "dino_i"))

    # The formulas, stated here on transformers' features of the same panels.
    manifest = json.loads(open(os.path.join(story_run, "story.json")).read())
    images = [np.asarray(load_image(os.path.join(story_run, p["file"]))) for p in manifest["panels"]]
    clip = nets["loaded"]["clip"]
    ref = nets["clip_ref"]
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=torch.from_numpy(
            clip.preprocessing(images).transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
        ids = clip.tokenizer([p["prompt"] for p in manifest["panels"]])
        txt = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    cos = np.sum(img * txt, axis=1)
    pairs = [img[i] @ img[j] for i in range(4) for j in range(i + 1, 4)]
    s = saved["summary"]
    assert s["clip_t"] == pytest.approx(cos.mean(), abs=1e-4)
    assert s["clip_t_clipscore"] == pytest.approx(np.mean(2.5 * np.maximum(cos, 0)), abs=1e-4)
    assert s["clip_t_torchmetrics"] == pytest.approx(max(100 * cos.mean(), 0), abs=1e-2)
    assert s["clip_i"] == pytest.approx(np.mean(pairs), abs=1e-4)
    assert manifest["panels"][2]["prompt"] == "a woman with short red hair and a green coat drinks tea by a window"


def test_story_dino_v1(story_run, nets, tmp_path):
    """--dino takes a DINO v1 ViTModel folder too: DINO-I equals mean pairwise cosine of transformers' CLS
    features of the same panels; metrics.json records the kind, and compare marks DINO-I measured with the
    two kinds as not comparable."""
    n = nets["root"]
    v1_file = tmp_path / "v1.json"
    assert evaluate.main(["story", story_run, "--dino", str(n / "dino_v1"), "--out", str(v1_file)]) == 0
    v1 = json.loads(v1_file.read_text())
    assert v1["models"] == {"dino": f"dino-v1 ViT: {n / 'dino_v1'}"} and set(v1["summary"]) == {"dino_i"}
    import transformers

    manifest = json.loads(open(os.path.join(story_run, "story.json")).read())
    images = [np.asarray(load_image(os.path.join(story_run, p["file"]))) for p in manifest["panels"]]
    pixels = transformers.AutoImageProcessor.from_pretrained(n / "dino_v1")(images[:4], return_tensors="pt")
    with torch.no_grad():
        cls = nets["dino_v1_ref"](**pixels).last_hidden_state[:, 0].numpy()
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    assert v1["summary"]["dino_i"] == pytest.approx(np.mean([cls[i] @ cls[j] for i in range(4) for j in range(i)]),
                                                    abs=1e-4)

    v2_file = tmp_path / "v2.json"
    v2 = evaluate.run_story(evaluate.StoryEvalOptions(run_dir=story_run, dino="d", out=str(v2_file)),
                            log=lambda m: None, networks={"dino": nets["loaded"]["dino"]})
    assert v2["models"]["dino"].startswith("dinov2: ")
    table = evaluate.run_compare(evaluate.CompareOptions(runs=[str(v2_file), str(v1_file)]), log=lambda m: None)
    row = next(line for line in table.splitlines() if line.startswith("| DINO-I |"))
    assert row.endswith(" † |") and "▲" not in row and "▼" not in row and "**" not in row, table
    note = table.splitlines()[-1]
    assert note.startswith("† DINO-I") and "v2: dinov2: " in note and "v1: dino-v1 ViT: " in note, table


def test_story_masks(story_run, nets, tmp_path):
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        m = np.zeros((64, 64), np.uint8)
        m[16:48, 16:48] = 255
        Image.fromarray(m).save(masks / f"{i:02d}.png")
    options = evaluate.StoryEvalOptions(run_dir=story_run, clip="c", masks=str(masks), out=str(tmp_path / "m.json"))
    masked = evaluate.run_story(options, log=lambda m: None, networks={"clip": nets["loaded"]["clip"]})
    plain = json.loads(open(os.path.join(story_run, "metrics.json")).read())
    # Noise backgrounds change the character embeddings (CLIP-I), not the prompt scores (CLIP-T).
    assert masked["masks"] == str(masks) and masked["summary"]["clip_i"] != plain["summary"]["clip_i"]
    assert masked["summary"]["clip_t"] == pytest.approx(plain["summary"]["clip_t"], abs=1e-6)
    (masks / "03.png").unlink()
    with pytest.raises(evaluate.ConfigError, match="03.png"):
        evaluate.run_story(options, log=lambda m: None, networks={"clip": nets["loaded"]["clip"]})


def test_video_metrics(nets, tmp_path):
    from storydiff_jax.video_io import write_video

    n = nets["root"]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 64, 64, 3)).astype(np.int16)
    drift = np.clip(base + np.arange(6)[:, None, None, None] * rng.integers(-12, 13, (1, 64, 64, 3)), 0, 255)
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(drift.astype(np.uint8), clips / "drift.mp4")
    write_video(np.repeat(base.astype(np.uint8), 4, axis=0), str(clips / "still") + "/")
    assert evaluate.main(["video", str(clips), "--clip", str(n / "clip"), "--lpips", str(n / "lpips"), "--quiet"]) == 0
    result = json.loads((clips / "metrics.json").read_text())
    rows = {r["clip"]: r for r in result["clips"]}
    assert set(rows) == {"drift.mp4", "still"} and rows["drift.mp4"]["frames"] == 6
    assert rows["still"]["lpips_first"] == 0 and rows["still"]["clipsim_frames"] == pytest.approx(1, abs=1e-6)
    assert rows["drift.mp4"]["lpips_first"] > rows["drift.mp4"]["lpips_frames"] > 0
    assert result["summary"]["lpips_first"] == pytest.approx(rows["drift.mp4"]["lpips_first"] / 2)
    # One clip file: its metrics land beside it.
    assert evaluate.main(["video", str(clips / "drift.mp4"), "--lpips", str(n / "lpips"), "--quiet"]) == 0
    assert json.loads((clips / "drift.metrics.json").read_text())["summary"]["lpips_first"] == pytest.approx(
        rows["drift.mp4"]["lpips_first"], abs=1e-6)


def test_plain_mode_disables_csa():
    """sa32 = sa64 = 0 selects no token: the write phase adds no key from the other id images and the banks
    hold nothing valid, so read panels see only their own tokens, which `attention_with_lengths` computes
    as plain attention (bit for bit in the read phase: tests/test_consistent.py::test_read_nc_panel_is_plain)."""
    settings = csa.CSASettings(sa32=0.0, sa64=0.0)
    for s in csa.draw_write_schedules(42, 2, 4, 10, [4, 4, 16, 16], (64, 64), settings):
        assert not any(v.any() for v in s.valid.values())
        assert not any(v.any() for v in s.others_len.values())


@pytest.fixture(scope="module")
def bench(tmp_path_factory, nets, pipe):
    root = tmp_path_factory.mktemp("bench")
    (root / "prompts.yaml").write_text(PROMPTS)
    options = evaluate.BenchmarkOptions(preset="tiny-sdxl", prompts=str(root / "prompts.yaml"), out=str(root / "out"),
                                        limit=2, steps=2, height=64, width=64, id_length=2, clip="c", quiet=True)
    clip_only = {"clip": nets["loaded"]["clip"]}
    first = evaluate.run_benchmark(options, log=lambda m: None, networks=clip_only, pipe=pipe)
    return root, options, first, clip_only


def test_benchmark_outputs(bench):
    root, options, first, _ = bench
    out = root / "out"
    assert first["counts"] == {"generated": 4, "scored": 4, "kept": 0}
    results = json.loads((out / "results.json").read_text())
    assert [(r["entry"], r["mode"]) for r in results["runs"]] == [
        ("people-000", "csa"), ("people-000", "plain"), ("objects-000", "csa"), ("objects-000", "plain")]
    assert set(results["by_mode"]) == {"csa", "plain"}
    assert results["by_mode"]["csa"]["clip_i"]["n"] == 2
    for r in results["runs"]:
        manifest = json.loads((out / r["dir"] / "story.json").read_text())
        assert manifest["seed"] == 42 and len(manifest["panels"]) == 3
        assert manifest["settings"]["sa32"] == (0.5 if r["mode"] == "csa" else 0.0)
    story = json.loads((out / "runs/people-000/csa-seed42/story.json").read_text())
    assert story["panels"][1]["prompt"] == "A photo of an old fisherman with a white beard steering a boat"
    md = (out / "results.md").read_text()
    assert "| csa |" in md and "| plain |" in md and any(mark in md for mark in ("▲", "▼", "(=)"))
    for metric in ("clip_t", "clip_t_clipscore", "clip_t_torchmetrics", "clip_i"):
        png = out / "charts" / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*partial*")]


def test_benchmark_resumes(bench, nets, pipe, monkeypatch):
    root, options, first, clip_only = bench
    out = root / "out"
    panel = out / "runs/objects-000/plain-seed42/panels/00.png"
    stamp = panel.stat().st_mtime_ns

    def no_generation(*args):
        raise AssertionError("a resumed benchmark generated a run again")

    monkeypatch.setattr(evaluate, "_generate", no_generation)
    again = evaluate.run_benchmark(options, log=lambda m: None, networks=clip_only, pipe=pipe)
    assert again["counts"] == {"generated": 0, "scored": 0, "kept": 4}
    # A new network (DINO-I) scores every run again, from the panels already there.
    with_dino = evaluate.BenchmarkOptions(**{**vars(options), "dino": "d"})
    both = {**clip_only, "dino": nets["loaded"]["dino"]}
    third = evaluate.run_benchmark(with_dino, log=lambda m: None, networks=both, pipe=pipe)
    assert third["counts"] == {"generated": 0, "scored": 4, "kept": 0}
    assert "dino_i" in json.loads((out / "results.json").read_text())["by_mode"]["plain"]
    assert panel.stat().st_mtime_ns == stamp
    # Other generation settings in the same folder are refused (one line), nothing regenerated.
    with pytest.raises(evaluate.ConfigError, match="steps"):
        evaluate.run_benchmark(evaluate.BenchmarkOptions(**{**vars(options), "steps": 3}), log=lambda m: None,
                               networks=clip_only, pipe=pipe)
    # So is an entry whose prompts were edited since its runs were generated.
    edited = root / "edited.yaml"
    edited.write_text(PROMPTS.replace("steering a boat", "rowing a boat"))
    with pytest.raises(evaluate.ConfigError, match="entry people-000 .* changed"):
        evaluate.run_benchmark(evaluate.BenchmarkOptions(**{**vars(options), "prompts": str(edited)}),
                               log=lambda m: None, networks=clip_only, pipe=pipe)


def test_compare(bench, story_run, tmp_path):
    root = bench[0]
    lines = []
    table_file = tmp_path / "cmp.md"
    table = evaluate.run_compare(evaluate.CompareOptions(runs=[str(root / "out"), story_run], out=str(table_file)),
                                 log=lines.append)
    header = table.splitlines()[0]
    assert header == "| metric | out: csa | out: plain | run |"
    assert table_file.read_text().strip() == table and lines == [table]
    assert any(mark in table for mark in ("▲", "▼", "(=)")) and "**" in table
    # The benchmark and the story were measured with the same networks (results.json / metrics.json "models").
    models = json.loads((root / "out" / "results.json").read_text())["models"]
    assert set(models) == {"clip", "dino"} and models["dino"].startswith("dinov2: ")
    assert "†" not in table, table


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "infer.evaluate", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_errors_one_line_nothing_written(story_run, nets, tmp_path):
    n = nets["root"]
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "heads_missing").mkdir()
    (tmp_path / "heads_missing" / "alexnet.pth").write_bytes((n / "lpips" / "alexnet-owt-7be5be79.pth").read_bytes())
    clip_file = tmp_path / "clip.gif"
    from storydiff_jax.video_io import write_video

    write_video(np.zeros((3, 64, 64, 3), np.uint8), clip_file)
    cases = {   # started together: each is mostly interpreter and JAX start-up
        "no story.json": (_cli("story", str(tmp_path / "not_a_run"), "--clip", str(n / "clip")),
                          tmp_path / "not_a_run" / "metrics.json"),
        "is not a CLIP model": (_cli("story", story_run, "--clip", str(n / "dino"), "--out", str(tmp_path / "m.json")),
                                tmp_path / "m.json"),
        "is not a DINO model": (_cli("story", story_run, "--dino", str(n / "clip"), "--out", str(tmp_path / "d.json")),
                                tmp_path / "d.json"),
        "no LPIPS linear heads": (_cli("video", str(clip_file), "--lpips", str(tmp_path / "heads_missing")),
                                  tmp_path / "clip.metrics.json"),
        "no metric chosen": (_cli("story", story_run), tmp_path / "none.json"),
    }
    for expected, (proc, never_written) in cases.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{expected}: exit {proc.returncode}\n{err[-2000:]}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err[-2000:]
        assert not never_written.exists()
    assert not [p for p in tmp_path.rglob("*partial*")]


def test_prompt_files(tmp_path):
    from storydiff_jax.metrics.prompts import read_prompts
    from storydiff_jax.story import parse_story

    entries = read_prompts(os.path.join(ROOT, "examples", "benchmark.yaml"))
    assert len(entries) == 10 and {e.domain for e in entries} == {"people", "animals", "objects"}
    assert all(len(e.settings) == 5 for e in entries) and len({e.id for e in entries}) == 10
    story = parse_story(entries[4].story_text(), id_length=None)
    assert list(story.characters) == ["fox"] and len(story.panels) == 5 and story.id_length == 4
    assert story.panels[0].prompt == "A photo of a small red fox with a white-tipped tail curled up asleep in the snow"
    # Story syntax in a prompt cannot turn into tags or captions.
    (tmp_path / "odd.yaml").write_text('d:\n  - {style: "", subject: "a [cat] #1", settings: ["on a [mat] # x"]}\n')
    odd = read_prompts(str(tmp_path / "odd.yaml"))[0]
    assert odd.token == "1" and parse_story(odd.story_text(), id_length=1).panels[0].prompt == "a cat 1 on a mat x"
    bad = {"not_yaml": "a: [1, 2", "no_settings": "d:\n  - {subject: cat}\n", "flat": "- just a list\n"}
    for name, text in bad.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        with pytest.raises(evaluate.ConfigError) as e:
            read_prompts(str(tmp_path / f"{name}.yaml"))
        assert "\n" not in str(e.value) and f"{name}.yaml" in str(e.value)


def test_options_checks():
    for kwargs, message in (({"prompts": "p", "out": "o", "clip": "c"}, "exactly one of --model"),
                            ({"prompts": "p", "out": "o", "preset": "tiny-sdxl"}, "no metric chosen"),
                            ({"prompts": "p", "out": "o", "preset": "tiny-sdxl", "clip": "c", "modes": "csa,photo"},
                             "unknown mode 'photo'"),
                            ({"prompts": "p", "out": "o", "preset": "tiny-sdxl", "clip": "c", "seeds": "1,x"},
                             "--seeds takes comma-separated whole numbers")):
        with pytest.raises(evaluate.ConfigError, match=message):
            evaluate.BenchmarkOptions(**kwargs)
