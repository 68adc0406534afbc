"""PhotoMaker: `python -m convert photomaker` on tiny files in the real on-disk layouts, the ID encoders (v1, v2)
and the trigger-word prompt encoding against PyTorch statements (tests/reference_photomaker.py).

The text side is a tiny SDXL pair of transformers text encoders (the real 49408-token vocabulary and CLIP
tokenizers, "img" added as a special token as the official pipeline does), converted into ours.
Tolerance (fp32): max |ours - torch| <= 1e-4 * max(1, max |torch|).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from reference_photomaker import (
    FACE_DIM,
    build_id_encoder,
    official_trigger_encoding,
    photomaker_lora,
    write_photomaker_file,
)
from safetensors.numpy import load_file
from safetensors.torch import save_file

from convert.__main__ import main as convert_main
from convert.clip_text import add_text_model_prefix, expected_params
from convert.state_dict import convert_tensors, renamed
from storydiff_jax.errors import ConfigError
from storydiff_jax.models.clip_text import CLIPTextModel
from storydiff_jax.models.photomaker import PRESETS as PM_PRESETS
from storydiff_jax.params import build_with_params
from storydiff_jax.pipelines import identity as idl
from storydiff_jax.pipelines.components import PRESETS, Components
from storydiff_jax.tokenizer import CLIPTokenizer
from storydiff_jax.tokenizer_files import write_clip_tokenizer

TOL = 1e-4
PROMPT = "a photo of a woman img, wearing a red coat, standing in the rain"


def _check_close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err, bound = np.abs(ours - ref).max(), TOL * max(1.0, np.abs(ref).max())
    print(f"{what}: max abs err {err:.3g} (bound {bound:.3g})")
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Torch references, PhotoMaker files in both layouts, converted with the CLI."""
    root = tmp_path_factory.mktemp("photomaker")
    refs, folders, loras = {}, {}, photomaker_lora()
    for version in (1, 2):
        refs[version] = build_id_encoder(version, seed=version)
        # v1 as photomaker-v1.bin (a pickled dict), v2 in the safetensors form (the same names as prefixes)
        src = write_photomaker_file(root / ("photomaker-v1.bin" if version == 1 else "photomaker-v2.safetensors"),
                                    refs[version], loras)
        folders[version] = root / f"pm-v{version}"
        assert convert_main(["photomaker", "--src", str(src), "--dst", str(folders[version])]) == 0
    return dict(root=root, refs=refs, folders=folders, loras=loras)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Tiny SDXL text side: torch encoders + tokenizers with the trigger added, and ours converted from them."""
    root = tmp_path_factory.mktemp("tokenizers")
    preset = PRESETS["tiny-sdxl"]
    torch.manual_seed(7)
    refs, ours, toks, ref_toks = [], [], [], []
    for cfg, cls, pad in ((preset.text_encoder, transformers.CLIPTextModel, "<|endoftext|>"),
                          (preset.text_encoder_2, transformers.CLIPTextModelWithProjection, "!")):
        d = cfg.to_dict()
        d.pop("with_projection")
        ref = cls(transformers.CLIPTextConfig(**d)).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        params = convert_tensors(renamed(((k, v.numpy()) for k, v in ref.state_dict().items()), add_text_model_prefix),
                                 expected_params(cfg), what="te", ignore=("position_ids",))
        ours.append(build_with_params(lambda cfg=cfg: CLIPTextModel(cfg, rngs=nnx.Rngs(0)), params))
        folder = write_clip_tokenizer(root / f"tok{len(refs)}", pad_token=pad)
        toks.append(CLIPTokenizer.from_folder(folder))
        ref_tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
        ref_tok.add_tokens(["img"], special_tokens=True)
        ref_toks.append(ref_tok)
        refs.append(ref)
    components = Components(preset, None, None, ours[0], ours[1], toks[0], toks[1], "test")
    return dict(refs=refs, ref_toks=ref_toks, components=components)


def _pixels(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 224, 224, 3)).astype(np.float32)


def _faces(n, seed=0):
    return np.random.default_rng(seed + 100).standard_normal((n, FACE_DIM)).astype(np.float32)


def _torch_ids(ref, version, pixels, faces):
    with torch.no_grad():
        return ref.id_embeds(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                             torch.from_numpy(faces) if version == 2 else None)


# --------------------------------------------------------------------------------------------------
# Conversion and the ID encoders


@pytest.mark.parametrize("version", [1, 2])
def test_converted_folder_and_id_encoder_parity(work, version):
    folder = work["folders"][version]
    index = json.loads((folder / "model_index.json").read_text())
    assert (index["arch"], index["photomaker_version"], index["trigger_word"]) == ("photomaker", version, "img")
    kept = load_file(str(folder / index["lora"]))
    assert sorted(kept) == sorted(work["loras"])
    for k, v in work["loras"].items():
        np.testing.assert_array_equal(kept[k], v.numpy())
    pm = idl.PhotoMaker.load(str(folder))
    assert pm.config == PM_PRESETS[f"tiny-v{version}"]     # read off the shapes with PhotoMaker's fixed rules
    pixels, faces = _pixels(3), _faces(3)
    ours = pm.encoder.id_embeds(jnp.asarray(pixels), jnp.asarray(faces) if version == 2 else None)
    ref = _torch_ids(work["refs"][version], version, pixels, faces)
    assert ours.shape == (3, version, 64)   # v1: one token per photo, v2: two
    _check_close(ours, ref.numpy(), f"v{version} id embeds")


def _not_written(dst):
    return not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial")]


def test_convert_errors(work, capsys, tmp_path):
    other = tmp_path / "other.bin"
    torch.save({"unet.conv_in.weight": torch.zeros(2, 2)}, other)
    wrong_keys = tmp_path / "wrong.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(wrong_keys))
    junk = tmp_path / "junk.bin"
    junk.write_text("not a pickle")
    cases = [(other, "not a PhotoMaker file"), (wrong_keys, "not a PhotoMaker file"), (junk, "not a loadable"),
             (tmp_path / "missing.bin", "no such file")]
    for src, words in cases:
        dst = tmp_path / f"out-{src.stem}"
        assert convert_main(["photomaker", "--src", str(src), "--dst", str(dst)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err, err
        assert _not_written(dst)


# --------------------------------------------------------------------------------------------------
# Trigger-word prompt encoding


def _official(text, version, n_photos, pixels, faces, ref_encoder):
    """Official fused + text-only encodings of PROMPT (StoryDiffusion's utils/pipeline.py, restated)."""
    toks, refs = text["ref_toks"], text["refs"]
    trigger = toks[1].convert_tokens_to_ids("img")
    tokens = version * n_photos
    embeds, pooled, mask, ids = official_trigger_encoding(toks, refs, PROMPT, tokens, trigger)
    id_embeds = _torch_ids(ref_encoder, version, pixels, faces)
    with torch.no_grad():
        fused = ref_encoder.fuse_module(embeds, id_embeds, mask)
    # text only: tokens without specials, the trigger removed, decoded, then SDXL's usual encode_prompt
    plain = toks[0].encode(PROMPT, add_special_tokens=False)
    plain.remove(trigger)
    text_only = toks[0].decode(plain)
    ctx, text_pooled = [], None
    for tok, enc in zip(toks, refs):
        tids = tok(text_only, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc(tids, output_hidden_states=True)
        ctx.append(out.hidden_states[-2])
        text_pooled = out[0]
    return dict(fused=fused.numpy(), pooled=pooled.numpy(), mask=mask.numpy()[0], ids=ids,
                text=torch.cat(ctx, -1).numpy(), text_pooled=text_pooled.numpy())


@pytest.mark.parametrize("version", [1, 2])
def test_trigger_encoding_matches_official(work, text, version):
    pm = idl.PhotoMaker.load(str(work["folders"][version]))
    encoder = idl.IdentityEncoder(text["components"], pm)
    results = {}
    for n in (1, 3):
        pixels, faces = _pixels(n, seed=n), _faces(n, seed=n)
        results[n] = (encoder.identity_tokens(pixels, faces if version == 2 else None),
                      _official(text, version, n, pixels, faces, work["refs"][version]))
    out = encoder.encode([PROMPT, PROMPT], [["w1"], ["w3"]], {"w1": results[1][0], "w3": results[3][0]})
    for row, n in enumerate((1, 3)):
        ref = results[n][1]
        for k, tok in enumerate((text["components"].tokenizer, text["components"].tokenizer_2)):
            tp = idl.expand_triggers(tok, PROMPT, [version * n])
            np.testing.assert_array_equal(tp.ids, ref["ids"][k], err_msg=f"tokenizer {k + 1} ids")
        np.testing.assert_array_equal(np.flatnonzero(ref["mask"]), tp.positions[0])
        _check_close(out.fused_context[row], ref["fused"][0], f"v{version} {n} photos fused context")
        _check_close(out.fused_pooled[row], ref["pooled"][0], f"v{version} {n} photos fused pooled")
        _check_close(out.text_context[row], ref["text"][0], f"v{version} {n} photos text-only context")
        _check_close(out.text_pooled[row], ref["text_pooled"][0], f"v{version} {n} photos text-only pooled")


def test_several_characters_in_one_prompt(work, text):
    """Ours beyond the official: each trigger's class positions take its own character's identity."""
    pm = idl.PhotoMaker.load(str(work["folders"][1]))
    encoder = idl.IdentityEncoder(text["components"], pm)
    descriptions = {"Ann": "a woman img with red hair", "Bob": "a man img in a suit", "Cat": "a tabby cat"}
    prompt = "watercolor, a woman img with red hair meets a man img in a suit and a dog img"
    owners = idl.trigger_owners(prompt, descriptions)
    assert owners == ["Ann", "Bob", None]
    ann, bob = encoder.identity_tokens(_pixels(2, 5)), encoder.identity_tokens(_pixels(3, 6))
    out = encoder.encode([prompt, prompt], [owners, owners], {"Ann": ann, "Bob": bob})
    tok2 = text["components"].tokenizer_2
    tp = idl.expand_triggers(tok2, prompt, [2, 3, 0])
    assert [len(p) for p in tp.positions] == [2, 3, 0]
    words = [tok2.encode(w)[0] for w in ("woman", "man", "dog")]
    for ps, word in zip(tp.positions[:2], words):
        assert all(tp.ids[p] == word for p in ps)
    assert list(tp.ids).count(words[2]) == 1   # an unowned trigger is removed, its class word kept once
    # the torch statement on our expanded ids: fuse each character's positions with its own tokens
    ids = [idl.expand_triggers(t, prompt, [2, 3, 0]).ids for t in (text["components"].tokenizer, tok2)]
    with torch.no_grad():
        outs = [enc(torch.from_numpy(i[None].astype(np.int64)), output_hidden_states=True)
                for enc, i in zip(text["refs"], ids)]
        ctx = torch.cat([o.hidden_states[-2] for o in outs], -1)
        mask = torch.zeros(1, 77, dtype=torch.bool)
        mask[0, list(tp.positions[0] + tp.positions[1])] = True
        tokens = torch.from_numpy(np.concatenate([np.asarray(ann), np.asarray(bob)]))
        ref = work["refs"][1].fuse_module(ctx, tokens, mask)
    _check_close(out.fused_context[0], ref[0].numpy(), "two characters fused context")
    _check_close(out.fused_pooled[0], outs[1][0][0].numpy(), "two characters pooled")


def test_trigger_rules_and_errors(text):
    tok = text["components"].tokenizer
    assert (idl.start_merge_step(20, 35), idl.start_merge_step(100, 50), idl.start_merge_step(0, 9)) == (7, 30, 0)
    with pytest.raises(ConfigError, match="0..100"):
        idl.start_merge_step(120, 10)
    with pytest.raises(ConfigError, match="2 trigger words"):
        idl.expand_triggers(tok, "a man img and a woman img", [1])
    with pytest.raises(ConfigError, match="must follow a class word"):
        idl.expand_triggers(tok, "img a man", [1])
    with pytest.raises(ConfigError, match="past token 77"):
        idl.expand_triggers(tok, " ".join(["word"] * 70) + " man img", [8])
    idl.check_description("Ann", "a woman img, red hair", has_photos=True)
    for desc, photos, words in (("a woman, red hair", True, "no trigger word"),
                                ("a woman img img", True, "occurs 2 times"),
                                ("a woman img", False, "no photos")):
        with pytest.raises(ConfigError, match=words):
            idl.check_description("Ann", desc, has_photos=photos)


def test_photos_and_face_embeddings(tmp_path):
    from PIL import Image

    Image.new("RGB", (80, 120), (200, 10, 10)).save(tmp_path / "ok.png")
    Image.new("RGB", (40, 300)).save(tmp_path / "small.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert idl.load_photos([tmp_path / "ok.png"]).shape == (1, 224, 224, 3)
    for name, words in (("small.png", "at least 64 pixels"), ("broken.jpg", "cannot be read"),
                        ("missing.png", "not found")):
        with pytest.raises(ConfigError, match=words):
            idl.load_photos([tmp_path / name])
    embeds = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    embeds[1] = np.nan                                 # no face found in photo 2
    np.save(tmp_path / "faces.npy", embeds)
    loaded = idl.load_face_embeds(tmp_path / "faces.npy", 3)
    warnings = []
    keep, kept = idl.photos_with_faces(["a.jpg", "b.jpg", "c.jpg"], loaded, warn=warnings.append)
    assert keep == [0, 2] and np.array_equal(kept, embeds[[0, 2]])
    assert len(warnings) == 1 and "b.jpg" in warnings[0]
    with pytest.raises(ConfigError, match="expected float"):
        idl.load_face_embeds(tmp_path / "faces.npy", 2)
    with pytest.raises(ConfigError, match="no face found in any"):
        idl.photos_with_faces(["b.jpg"], embeds[1:2])
    np.save(tmp_path / "ints.npy", np.zeros((1, 512), np.int64))
    with pytest.raises(ConfigError, match="expected float"):
        idl.load_face_embeds(tmp_path / "ints.npy", 1)
    assert os.path.exists(tmp_path / "faces.npy")


def test_kept_lora_merges_into_sdxl(work):
    """The converted folder's LoRA (PhotoMaker's processor names) merges into an SDXL at load: W += up @ down."""
    from storydiff_jax.lora import apply_loras
    from storydiff_jax.params import module_params
    from storydiff_jax.pipelines.components import load_components

    pm = idl.PhotoMaker.load(str(work["folders"][1]))
    base = load_components("tiny-sdxl")
    merged = module_params(apply_loras(base, [(pm.lora_path, 1.0)]).unet)
    before = module_params(base.unet)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(merged[k]))}
    assert len(changed) == 8
    loras = work["loras"]
    for key in loras:
        if not key.endswith("down.weight"):
            continue
        attn, proj = key.removeprefix("unet.").split(".processor.")
        proj = proj.split("_lora")[0]
        param = f"{attn}.{'to_out.0' if proj == 'to_out' else proj}.kernel"
        up = loras[key.replace("down.weight", "up.weight")].numpy()
        want = np.asarray(before[param]) + (up @ loras[key].numpy()).T
        _check_close(merged[param], want, param)


def test_encoder_input_errors(work, text):
    import dataclasses

    pm2 = idl.PhotoMaker.load(str(work["folders"][2]))
    encoder = idl.IdentityEncoder(text["components"], pm2)
    with pytest.raises(ConfigError, match="--face-model DIR .*--face-embeds FILE.npy"):
        encoder.identity_tokens(_pixels(1))
    sd15 = dataclasses.replace(text["components"], text_encoder_2=None)
    with pytest.raises(ConfigError, match="SDXL models only"):
        idl.IdentityEncoder(sd15, pm2)
