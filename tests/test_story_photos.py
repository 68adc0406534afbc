"""Photo mode end to end (issue 16): reference photos through PhotoMaker, and LoRA files, in the story pipeline.

Tiny SDXL preset at 64 px and 3 steps (the pictures are noise; every phase runs for real). A tiny PhotoMaker v1
file in its real on-disk layout (`photomaker-v1.bin`, a pickled dict) is converted by `python -m convert
photomaker`. The story has three characters, Ana (photo from --ref), Bo (photo from a `<ref: ...>` marker) and Cy
(no photo), a panel naming Ana and Bo, and an [NC] panel.

What could fail here: identity fusion reaching panels it should not (Cy's, [NC]), or not reaching those it should;
the text-only/fused switch (style strength 100 never fuses, so it must equal text mode with the PhotoMaker's LoRA
given as --lora); determinism; banks mixing modes; 8 devices vs 1; v2's face inputs; the one-line errors.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags
from PIL import Image
from reference_photomaker import FACE_DIM, build_id_encoder, photomaker_lora, write_photomaker_file
from safetensors.numpy import save_file

from convert.__main__ import main as convert_main
from infer.story import main as story_main
from storydiff_jax.errors import ConfigError
from storydiff_jax.pipelines import StoryOptions, StoryPipeline
from storydiff_jax.story import parse_story

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = """[Ana] a woman img with a red coat
[Bo] a man img in a green hat <ref: bo.png>
[Cy] a grey cat

[Ana] reads a book #Monday.
[Bo] walks in the rain
[Cy] sleeps on a sofa
[Ana] and [Bo] meet at the station #Tuesday.
[NC] a train at night
[Ana] laughs
[Cy] jumps
"""
# The same story in text mode: triggers and the marker removed.
TEXT_STORY = STORY.replace(" img", "").replace(" <ref: bo.png>", "")
WITH_IDENTITY = [0, 1, 3, 5]     # panels naming Ana or Bo
TEXT_ONLY = [2, 4, 6]            # Cy's panels, the [NC] panel
# read_batch 1: the shapes of the 1-device run in test_eight_devices_match_one (its programs come from the cache).
BASE = dict(steps=3, height=64, width=64, id_length=1, read_batch=1)
WINDOW = dict(steps=3, height=64, width=64, id_length=1, mode="window", window=2, chunk=2)


def _photo(path, seed, size=(80, 96)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The converted PhotoMakers (v1 from the .bin, v2 from the safetensors form), photos, the story file and a
    LoRA of our own (PEFT names: a U-Net and a text-encoder projection)."""
    root = tmp_path_factory.mktemp("photos")
    for version, name in ((1, "photomaker-v1.bin"), (2, "photomaker-v2.safetensors")):
        src = write_photomaker_file(root / name, build_id_encoder(version, seed=version), photomaker_lora())
        assert convert_main(["photomaker", "--src", str(src), "--dst", str(root / f"pm{version}")]) == 0
    _photo(root / "ana.png", 0)
    _photo(root / "bo.png", 1)
    (root / "story.txt").write_text(STORY)
    rng = np.random.default_rng(5)
    lora = {}
    for key, n in (("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 64),
                   ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32)):
        lora[f"{key}.lora_A.weight"] = (rng.standard_normal((4, n)) * 0.1).astype(np.float32)
        lora[f"{key}.lora_B.weight"] = (rng.standard_normal((n, 4)) * 0.1).astype(np.float32)
    save_file(lora, str(root / "extra.safetensors"))
    return root


@pytest.fixture(scope="module")
def pipe():
    return StoryPipeline.from_pretrained("tiny-sdxl")


def photo_options(work, **kw):
    return StoryOptions(**{**BASE, "photomaker": str(work / "pm1"), "refs": (f"Ana={work / 'ana.png'}",), **kw})


def story(work, text=STORY):
    return parse_story(text, id_length=1, photo_dir=str(work))


def per_panel_change(a, b):
    return np.abs(a.latents - b.latents).reshape(len(a.latents), -1).max(-1)


@pytest.fixture(scope="module")
def bank_runs(work, pipe):
    a = pipe(story(work), photo_options(work), progress=False)
    again = pipe(story(work), photo_options(work), progress=False)
    never = pipe(story(work), photo_options(work, style_strength=100.0), progress=False)
    return a, again, never


def test_photo_story_fuses_identities_exactly_where_named(bank_runs, work):
    a, again, never = bank_runs
    assert a.info["photos"] == {"Ana": [str(work / "ana.png")], "Bo": [str(work / "bo.png")]}
    assert a.info["start_merge_step"] == 0       # min(int(20 / 100 * 3), 30): step 0 text only, then fused
    assert np.array_equal(a.latents, again.latents), "same seed, same panels"
    # Style strength 100 never reaches the fused encoding: panels naming Ana or Bo change, Cy's and [NC] do not.
    change = per_panel_change(a, never)
    print(f"\nstyle strength 20 vs 100, max |latent change| per panel: {np.array2string(change, precision=3)}")
    assert np.all(change[WITH_IDENTITY] > 1e-3), change
    assert np.all(change[TEXT_ONLY] == 0), change
    assert list(a.bank.characters) == ["Ana", "Bo", "Cy"]
    meta = a.bank.meta
    assert meta["photomaker"].startswith("v1 ") and meta["loras"] == []
    assert sorted(meta["photos"]) == ["Ana", "Bo"] and all(len(v) == 1 for v in meta["photos"].values())


def test_banks_refuse_to_mix_modes_loras_and_photos(bank_runs, work, pipe):
    first, bank = bank_runs[0], bank_runs[0].bank
    # The same photos, PhotoMaker and LoRAs: the bank serves, the characters need no id panels, and every read
    # panel (Ana and Bo fused from their photos again) equals the run that wrote it.
    known = parse_story(STORY, id_length=1, known_characters=set(bank.characters), photo_dir=str(work))
    second = pipe(known, photo_options(work), bank=bank, progress=False)
    assert second.story.id_panels == {}
    read = first.story.read_panels()
    assert read == [3, 4, 5, 6] and np.array_equal(second.latents[read], first.latents[read])
    text = parse_story(TEXT_STORY, id_length=1)
    with pytest.raises(ConfigError, match=r"made with PhotoMaker v1 .*this run uses text mode"):
        pipe(text, StoryOptions(**BASE), bank=bank, progress=False)
    with pytest.raises(ConfigError, match="made with LoRAs none, this run uses extra.safetensors:0.5"):
        pipe(story(work), photo_options(work, loras=(f"{work / 'extra.safetensors'}:0.5",)), bank=bank,
             progress=False)
    with pytest.raises(ConfigError, match=r"character \[Ana\] of the loaded bank was made from other reference"):
        pipe(story(work), photo_options(work, refs=(f"Ana={work / 'bo.png'}",)), bank=bank, progress=False)


def test_window_mode_and_style_strength_100_is_text_mode_with_the_photomaker_lora(work, pipe):
    """Window mode in chunks of 2 (carried tokens). Style strength 100 with 3 steps never fuses: the panels equal
    the text-mode story (triggers removed) with the PhotoMaker's LoRA given as --lora, bit for bit (the text-only
    rows go through text mode's encoding program)."""
    fused = pipe(story(work), photo_options(work, **WINDOW), progress=False)
    never = pipe(story(work), photo_options(work, **WINDOW, style_strength=100.0), progress=False)
    text = pipe(TEXT_STORY, StoryOptions(**WINDOW, loras=(str(work / "pm1" / "lora_weights.safetensors"),)),
                progress=False)
    assert np.array_equal(never.latents, text.latents)
    change = per_panel_change(fused, never)
    print(f"\nwindow mode, style strength 20 vs 100, max |latent change| per panel: "
          f"{np.array2string(change, precision=3)}")
    # Window 2 relates panel 3 (Ana and Bo) to its neighbours only where they share a character: Cy's panels and
    # [NC] never take part in a window with Ana or Bo, so they stay bit for bit.
    assert np.all(change[WITH_IDENTITY] > 1e-3) and np.all(change[TEXT_ONLY] == 0), change
    # The PhotoMaker's LoRA is merged in photo mode: text mode without it differs.
    plain = pipe(TEXT_STORY, StoryOptions(**WINDOW), progress=False)
    assert not np.array_equal(plain.latents, text.latents)


def test_v2_face_embeddings_and_a_photo_without_a_face(work, pipe, tmp_path):
    """PhotoMaker v2 with --face-embeds: a photo whose row is NaN (no face) is left out of both inputs, with a
    warning naming it: the panels equal those of a run given only the photos with a face."""
    faceless = _photo(tmp_path / "back.png", 7)
    embeds = np.random.default_rng(3).standard_normal((2, FACE_DIM)).astype(np.float32)
    both = embeds.copy()
    both[1] = np.nan
    np.save(tmp_path / "ana2.npy", both)
    np.save(tmp_path / "ana1.npy", embeds[:1])
    np.save(tmp_path / "bo.npy", embeds[1:])
    pm2 = str(work / "pm2")
    warnings = []
    two = pipe(story(work), photo_options(work, photomaker=pm2, refs=(f"Ana={work / 'ana.png'},{faceless}",),
                                          face_embeds=(f"Ana={tmp_path / 'ana2.npy'}", f"Bo={tmp_path / 'bo.npy'}")),
               progress=False, log=warnings.append)
    one = pipe(story(work), photo_options(work, photomaker=pm2,
                                          face_embeds=(f"Ana={tmp_path / 'ana1.npy'}", f"Bo={tmp_path / 'bo.npy'}")),
               progress=False)
    assert warnings == [f"warning: no face found in reference photo {faceless}; it is left out"]
    assert two.info["photos"]["Ana"] == [str(work / "ana.png")]
    assert np.array_equal(two.latents, one.latents)
    with pytest.raises(ConfigError, match="v2 needs face embeddings: pass --face-model DIR .* or --face-embeds"):
        pipe(story(work), photo_options(work, photomaker=pm2), progress=False)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "infer.story", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_eight_devices_match_one(work, tmp_path):
    """The CLI in photo mode (--photomaker, --ref, a <ref: ...> marker, --lora, --save-bank): panels sharded over 8
    fake CPU devices equal the 1-device panels; the saved bank records what it was made with. (ControlNets on 8
    devices: tests/test_csa_devices.py; the CLI's control outputs: tests/test_app.py through the CLI's run().
    A ControlNet here would cost ~40 s: the 1-device run could no longer reuse this file's compiled programs.)

    The denoised latents are equal bit for bit (measured through the API in two processes); the decoded pixels may
    differ by one level in a few places: XLA's CPU convolutions split their sums over the Eigen thread pool,
    which an 8-device process divides differently (with --xla_cpu_multi_thread_eigen=false the PNGs are equal
    byte for byte). A sharding mistake changes whole panels."""
    outs = []
    # Same per-device shapes in both runs (one read panel per device and call): XLA's CPU GEMMs block
    # their sums by problem size, so equal bytes need equal per-device problems.
    for n in (1, 8):
        out = tmp_path / f"out{n}"
        proc = cli("--story", str(work / "story.txt"), "--out", str(out), "--photomaker", str(work / "pm1"),
                   "--ref", f"Ana={work / 'ana.png'}", "--lora", f"{work / 'extra.safetensors'}:0.5",
                   "--save-bank", str(tmp_path / f"bank{n}.npz"), "--read-batch", str(n),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in BASE.items() if k != "read_batch"], "--quiet",
                   env={"XLA_FLAGS": xla_flags(n)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "photo mode: PhotoMaker v1 ([Ana] 1 photo, [Bo] 1 photo); identity fused after step 0" in proc.stdout
        manifest = json.loads((out / "story.json").read_text())
        assert len(manifest["devices"]) == n
        assert manifest["photo_mode"]["photos"] == {"Ana": [str(work / "ana.png")], "Bo": [str(work / "bo.png")]}
        assert manifest["settings"]["loras"] == [f"{work / 'extra.safetensors'}:0.5"]
        outs.append(out)
    for i in range(7):
        a, b = (np.asarray(Image.open(out / "panels" / f"{i:02d}.png"), np.int16) for out in outs)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, f"panel {i} differs between 1 and 8 devices"
    from storydiff_jax.pipelines.bank import CharacterBank

    meta = CharacterBank.load(str(tmp_path / "bank1.npz")).meta
    assert meta["photomaker"].startswith("v1 ") and meta["loras"][0][0::2] == ["extra.safetensors", 0.5]


ERRORS = {   # case: (story text, flags replaced or added (None drops one), words of the one-line error)
    "no trigger": (STORY.replace("a woman img", "a woman"), {}, "description has no trigger word 'img'"),
    "two triggers": (STORY.replace("a woman img", "a woman img and img"), {}, "occurs 2 times"),
    "trigger without photos": (STORY.replace("a grey cat", "a grey cat img"), {}, r"\[Cy\] has the trigger word"),
    "unknown character": (STORY, {"--ref": "Zed={ana}"}, r"the story has no character \[Zed\]"),
    "photos twice": (STORY, {"--ref": "Bo={ana}"}, "photos both in the story file"),
    "marker in a panel": (STORY + "[Ana] smiles <ref: ana.png>\n", {}, "belongs on a character's line"),
    "unreadable photo": (STORY, {"--ref": "Ana={junk}"}, "junk.png cannot be read"),
    "too small photo": (STORY, {"--ref": "Ana={small}"}, "is 32x32 pixels; use a photo at least 64"),
    "v2 without face input": (STORY, {"--photomaker": "{pm2}"}, "pass --face-model DIR .* or --face-embeds"),
    "not a photomaker": (STORY, {"--photomaker": "{tmp}"}, "is not a converted PhotoMaker folder"),
    "ref without photomaker": (TEXT_STORY, {"--photomaker": None}, "--ref needs photo mode: pass --photomaker"),
    "LoHa": (STORY, {"--lora": "{loha}"}, "LoHa .* not supported"),
    "SD1.5 LoRA": (STORY, {"--lora": "{sd15}"}, "is an SD15 LoRA .* this model is SDXL"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line_and_write_nothing(work, tmp_path, capsys, case):
    text, flags, words = ERRORS[case]
    (tmp_path / "junk.png").write_bytes(b"not a picture at all")
    _photo(tmp_path / "small.png", 2, size=(32, 32))
    (tmp_path / "bo.png").write_bytes((work / "bo.png").read_bytes())      # the marker's photo, beside the story
    (tmp_path / "s.txt").write_text(text)
    save_file({"lora_unet_up_blocks_0_attentions_0_proj_in.hada_w1_a": np.zeros((4, 4), np.float32)},
              str(tmp_path / "loha.safetensors"))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"   # SD1.5's first block
    save_file({f"{key}.lora_down.weight": np.zeros((4, 32), np.float32),
               f"{key}.lora_up.weight": np.zeros((32, 4), np.float32)}, str(tmp_path / "sd15.safetensors"))
    paths = dict(ana=work / "ana.png", junk=tmp_path / "junk.png", small=tmp_path / "small.png", pm2=work / "pm2",
                 tmp=tmp_path, loha=tmp_path / "loha.safetensors", sd15=tmp_path / "sd15.safetensors")
    given = {"--photomaker": str(work / "pm1"), "--ref": f"Ana={work / 'ana.png'}"}
    given.update({k: None if v is None else v.format(**paths) for k, v in flags.items()})
    argv = ["--story", str(tmp_path / "s.txt"), "--out", str(tmp_path / "out"), "--quiet",
            *[f"--{k.replace('_', '-')}={v}" for k, v in BASE.items()],
            *[f"{k}={v}" for k, v in given.items() if v is not None]]
    assert story_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(f"\n{case}: {err[0] if err else None}")
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(words, err[0]), err[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_web_app_upload_slots_and_loras(work, tmp_path):
    """infer.app with --photomaker and --lora: the story tab's upload slots (character name + photos) and an uploaded
    LoRA reach the CLI as --ref / --lora (photos copied under --out first); the story file's own photo paths are
    refused (the app never opens a path typed into the page)."""
    import gradio as gr

    from infer import app as web

    args = web.build_parser().parse_args(["--out", str(tmp_path / "app"), "--photomaker", str(work / "pm1"),
                                          "--lora", f"{work / 'extra.safetensors'}:0.5"])
    app = web.StoryApp(args, log=lambda msg: None)
    demo = web.build_ui(app)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"ref-name-1", f"ref-photos-{web.REF_SLOTS}", "style-strength", "lora-files", "lora-scale"} <= ids
    app.ready()
    bo = tmp_path / "Bo, at home.png"      # a comma in an uploaded name: the copy under --out has our own name
    bo.write_bytes((work / "bo.png").read_bytes())
    photos = web.slot_photos({"ref_name_1": "Ana", "ref_photos_1": [str(work / "ana.png")], "ref_name_2": "[Bo]",
                              "ref_photos_2": [str(bo)], "ref_name_3": "", "ref_photos_3": None})
    assert photos == {"Ana": [str(work / "ana.png")], "Bo": [str(bo)]}
    text = STORY.replace(" <ref: bo.png>", "")
    settings = {k: v for k, v in BASE.items()}
    r = app.run_story(text, settings, photos=photos, loras=[str(work / "extra.safetensors")], lora_scale=0.25,
                      log=lambda msg: None)
    m = r["manifest"]
    copied = m["photo_mode"]["photos"]
    assert sorted(copied) == ["Ana", "Bo"] and all(p.startswith(str(tmp_path / "app" / "photos")) and "," not in p
                                                    for paths in copied.values() for p in paths)
    assert m["settings"]["loras"] == [f"{work / 'extra.safetensors'}:0.5", f"{work / 'extra.safetensors'}:0.25"]
    assert len(r["panels"]) == 7
    with pytest.raises(ConfigError, match="reads no photo paths from the story"):
        app.run_story(STORY, settings, photos=photos)
    with pytest.raises(ConfigError, match="slot 2: give both the character's name and its photos"):
        web.slot_photos({"ref_name_2": "Bo", "ref_photos_2": []})
    assert isinstance(demo, gr.Blocks)
