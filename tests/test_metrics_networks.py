"""Parity of the evaluation networks and metric formulas with their PyTorch references.

* CLIP (models/clip.py via convert/metrics.py): image and text features vs transformers'
  `CLIPModel.get_image_features / get_text_features`, from the `save_pretrained` folder and from the same
  weights in open_clip's layout. Tolerance: max abs error <= 1e-4 * max(1, max |ref|).
* CLIP-T vs torchmetrics' `clip_score` on the same tiny CLIP. torchmetrics 1.9 normalises what
  `get_image_features` returns, which transformers 5 made an output object (AttributeError: no `norm`):
  the reference model here is a CLIPModel whose feature methods return the projected tensor, as
  transformers 4 did; everything else (CLIPProcessor preprocessing, 100*cos, mean, clamp) is torchmetrics'
  own code. Per image and mean to 1e-4 relative; CLIPScore's 2.5*max(cos, 0) vs its formula on the torch
  features.
* LPIPS (models/lpips.py) vs `TorchLPIPS` (tests/metric_models.py) from torchvision-/lpips-layout files:
  <= 1e-5 * max(1, max |ref|); identical frames give exactly 0.
* DINOv2 CLS at 224 px (position embeddings resized from the 37 x 37 grid) vs transformers'
  `Dinov2Model(...).pooler_output`, and its preprocessing vs `BitImageProcessor`: <= 1e-4.
* DINO v1 (models/dino_vit.py, a transformers ViTModel folder such as facebook/dino-vits16) CLS vs
  `ViTModel(...).last_hidden_state[:, 0]` at the trained 224 px and at 256 px (`interpolate_pos_encoding`):
  <= 1e-4 * max(1, max |ref|); its preprocessing vs the folder's `ViTImageProcessor` <= 1e-6. `load_dino`
  tells the two kinds apart by config.json and refuses other folders in one line naming both.
* Video metrics on synthetic clips with a known drift: LPIPS-first/-frames grow and CLIPSIM-first/-frames
  fall as the drift grows; a still clip scores LPIPS 0 and CLIPSIM 1.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from metric_models import (
    DINO_V1_PREPROCESSOR,
    TorchLPIPS,
    lpips_folder,
    open_clip_state_dict,
    random_images,
    save_safetensors,
    tiny_clip_folder,
    tiny_dino_vit_folder,
    tiny_dinov2_folder,
)

from convert.metrics import convert_clip, load_clip, load_dino, load_lpips
from storydiff_jax.errors import CheckpointError
from storydiff_jax.metrics import ClipEmbedder, DinoEmbedder, LpipsScorer
from storydiff_jax.metrics.similarity import clip_t_scalings, cosines
from storydiff_jax.metrics.video import score_frames
from storydiff_jax.models.clip_text import CLIPTextModel, tokenize
from storydiff_jax.models.dino_vit import DinoViTModel
from storydiff_jax.models.dinov2 import Dinov2Model

PROMPTS = ["a photo of a red fox in the snow", "an old lighthouse keeper reading by a lamp",
           "a teapot on a wooden table", "a small robot walking through a city at night"]


def _check_close(ours, ref, what, rel):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = float(np.abs(ours - ref).max())
    tol = rel * max(1.0, float(np.abs(ref).max()))
    print(f"{what}: max abs err {err:.3g} (tol {tol:.3g})")
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    ref = tiny_clip_folder(folder)
    loaded = load_clip(folder)
    return ref, folder, loaded, ClipEmbedder(loaded.model, loaded.tokenizer, loaded.preprocessing)


@pytest.fixture(scope="module")
def images():
    return random_images(4, 96, 128, seed=0)   # non-square: the resize and crop both matter


def _torch_features(ref, pixels, ids):
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        txt = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return img.pooler_output.numpy(), txt.pooler_output.numpy()


def test_clip_features_transformers_folder(clip, images):
    ref, _, loaded, embedder = clip
    assert loaded.source == "transformers" and loaded.preprocessing.crop == 224
    pixels = loaded.preprocessing(list(images))
    ids = tokenize(loaded.tokenizer, PROMPTS)
    ref_img, ref_txt = _torch_features(ref, pixels, ids)
    _check_close(embedder.images(images), ref_img, "CLIP image features (HF folder)", 1e-4)
    _check_close(embedder.texts(PROMPTS), ref_txt, "CLIP text features (HF folder)", 1e-4)


def test_clip_features_open_clip_file(clip, images, tmp_path):
    ref, _, loaded, embedder = clip
    path = tmp_path / "open_clip_model.safetensors"
    save_safetensors(open_clip_state_dict(ref), path)
    config, params, layout, _ = convert_clip(path, hidden_act="quick_gelu", vision_heads=4)
    assert layout == "open_clip" and config.text.num_attention_heads == 2
    # Same weights, same config: the converted parameters equal the HF folder's bit for bit, so the
    # features do too (the HF path is compared with transformers above).
    _, hf_params, _, _ = convert_clip(clip[1])
    assert set(params) == set(hf_params)
    for k in params:
        np.testing.assert_array_equal(params[k], hf_params[k], err_msg=k)
    # The one config difference: open_clip pools at argmax(ids) (legacy eos id 2), transformers 5 at the first
    # end-of-text token; for CLIP's tokenizer (end-of-text is the largest id) both pick the same position.
    hf = loaded.model.config
    assert config.vision == hf.vision
    assert dataclasses.replace(config.text, eos_token_id=hf.text.eos_token_id, bos_token_id=hf.text.bos_token_id) \
        == hf.text
    ids = tokenize(loaded.tokenizer, PROMPTS)
    legacy = CLIPTextModel(config.text, rngs=nnx.Rngs(0)).pool_positions(ids)
    np.testing.assert_array_equal(legacy, loaded.model.text.pool_positions(ids))
    with pytest.raises(CheckpointError, match="vision"):   # width 32 is no known open_clip model: heads needed
        convert_clip(path, hidden_act="quick_gelu")


def test_clip_t_matches_torchmetrics(clip, images):
    tm = pytest.importorskip("torchmetrics.functional.multimodal.clip_score")
    ref, folder, loaded, embedder = clip

    class FeatureTensors(transformers.CLIPModel):
        """transformers 4's return type for the two feature methods (torchmetrics 1.9 expects a tensor)."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    model = FeatureTensors.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(),
                                           tokenizer=transformers.CLIPTokenizer.from_pretrained(folder))
    as_torch = [torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images]
    # Pair each image with the prompt it scores highest with, so the clamped mean is not trivially 0.
    per_pair, _ = tm._clip_score_update([im for im in as_torch for _ in PROMPTS], PROMPTS * len(images), model,
                                        processor)
    best = per_pair.reshape(len(images), len(PROMPTS)).argmax(1).tolist()
    captions = [PROMPTS[b] for b in best]
    ref_scores, _ = tm._clip_score_update(as_torch, captions, model, processor)
    ref_mean = float(tm.clip_score(as_torch, captions, model_name_or_path=lambda: (model, processor)))
    assert ref_mean > 0, "the pairing should give a positive mean cosine (otherwise the clamp hides everything)"

    cos = cosines(embedder.images(images), embedder.texts(captions))
    _check_close(100 * cos, ref_scores.detach().numpy(), "CLIP-T per image vs torchmetrics (100 cos)", 1e-4)
    ours = clip_t_scalings(cos)
    _check_close(ours["clip_t_torchmetrics"], ref_mean, "CLIP-T vs torchmetrics clip_score", 1e-4)
    # CLIPScore (Hessel et al.): 2.5 * max(cos, 0) per image, then the mean, from the torch features.
    ref_img, ref_txt = _torch_features(ref, loaded.preprocessing(list(images)), tokenize(loaded.tokenizer, captions))
    ref_cos = np.sum(ref_img * ref_txt, 1) / np.linalg.norm(ref_img, axis=1) / np.linalg.norm(ref_txt, axis=1)
    _check_close(ours["clip_t_clipscore"], np.mean(2.5 * np.maximum(ref_cos, 0)), "CLIPScore 2.5*max(cos,0)", 1e-4)
    _check_close(ours["clip_t"], ref_cos.mean(), "CLIP-T raw cosine", 1e-4)


@pytest.fixture(scope="module")
def lpips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    ref = lpips_folder(folder)
    return ref, folder, LpipsScorer(load_lpips(folder))


def test_lpips_matches_pytorch(lpips):
    ref, _, scorer = lpips
    a = random_images(3, 64, 80, seed=1)
    b = random_images(3, 64, 80, seed=2)
    to_torch = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)  # noqa: E731
    with torch.no_grad():
        want = ref(to_torch(a), to_torch(b)).numpy()
    feats = scorer.features(np.concatenate([a, b]))
    got = scorer.distances(feats, [0, 1, 2], [3, 4, 5])
    _check_close(got, want, "LPIPS vs PyTorch statement", 1e-5)
    assert np.all(want > 0)
    same = scorer.distances(feats, [0, 1], [0, 1])
    assert np.all(same == 0.0), f"LPIPS of identical frames: {same}"


def test_lpips_whole_module_state_dict(lpips, tmp_path):
    """A saved `lpips.LPIPS` state dict (net.sliceK.N.*, lin*, scaling_layer buffers) converts to the same."""
    ref, folder, scorer = lpips
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    sd = {f"net.slice{slices[int(k.split('.')[0])]}.{k}": v for k, v in ref.features.state_dict().items()}
    sd.update({f"lin{k}.model.1.weight": lin.weight.detach() for k, lin in enumerate(ref.lins)})
    sd["scaling_layer.shift"] = torch.tensor(TorchLPIPS.SHIFT).view(1, 3, 1, 1)
    sd["scaling_layer.scale"] = torch.tensor(TorchLPIPS.SCALE).view(1, 3, 1, 1)
    (tmp_path / "whole").mkdir()
    torch.save(sd, tmp_path / "whole" / "lpips_alex.pth")
    ours = nnx.state(load_lpips(tmp_path / "whole"), nnx.Param)
    theirs = nnx.state(scorer.model, nnx.Param)
    for (p, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(theirs)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_lpips_missing_heads_is_one_line(lpips, tmp_path):
    _, folder, _ = lpips
    (tmp_path / "trunk_only").mkdir()
    (tmp_path / "trunk_only" / "alexnet.pth").write_bytes((folder / "alexnet-owt-7be5be79.pth").read_bytes())
    with pytest.raises(CheckpointError, match="linear heads") as e:
        load_lpips(tmp_path / "trunk_only")
    assert "\n" not in str(e.value)


def test_dinov2_cls_matches_transformers(tmp_path):
    folder = tmp_path / "dinov2"
    ref = tiny_dinov2_folder(folder)
    loaded = load_dino(folder)   # recognised by config.json's model_type
    model, pre = loaded.model, loaded.preprocessing
    assert loaded.kind == "dinov2" and isinstance(model, Dinov2Model)
    assert (pre.resize, pre.crop, pre.keep_aspect) == (256, 224, True)
    images = random_images(3, 300, 260, seed=4)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                               do_convert_rgb=True, image_mean=list(pre.mean), image_std=list(pre.std),
                                               resample=3)
    ref_pixels = processor(list(images), return_tensors="np")["pixel_values"]
    pixels = pre(list(images))
    _check_close(pixels, ref_pixels.transpose(0, 2, 3, 1), "DINOv2 preprocessing vs BitImageProcessor", 1e-4)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(ref_pixels)).pooler_output.numpy()
    got = DinoEmbedder(model, pre).images(images)
    _check_close(got, want, "DINOv2 CLS at 224 px (37x37 -> 16x16 position embeddings)", 1e-4)


def test_dino_v1_cls_matches_transformers(tmp_path):
    """DINO v1 (ViTModel) CLS of the final layernorm at the config's 224 px and at 256 px (position embeddings
    resized: transformers' interpolate_pos_encoding=True), after the folder's own ViTImageProcessor."""
    folder = tmp_path / "dino_v1"
    ref = tiny_dino_vit_folder(folder)
    loaded = load_dino(folder)
    assert loaded.kind == "dino-v1 ViT" and isinstance(loaded.model, DinoViTModel)
    pre = loaded.preprocessing
    assert (pre.resize, pre.crop, pre.resample, pre.keep_aspect) == (224, 224, "bilinear", False)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__.startswith("ViTImageProcessor")
    images = random_images(3, 300, 260, seed=8)   # non-square: the squash (no aspect ratio kept) matters
    for size in (224, 256):
        ours_pre = dataclasses.replace(pre, resize=size, crop=size)
        ref_pixels = processor(list(images), size={"height": size, "width": size}, return_tensors="np")["pixel_values"]
        _check_close(ours_pre(list(images)), ref_pixels.transpose(0, 2, 3, 1),
                     f"DINO v1 preprocessing vs ViTImageProcessor at {size} px", 1e-6)
        with torch.no_grad():
            want = ref(pixel_values=torch.from_numpy(ref_pixels),
                       interpolate_pos_encoding=size != 224).last_hidden_state[:, 0].numpy()
        got = DinoEmbedder(loaded.model, ours_pre).images(images)
        _check_close(got, want, f"DINO v1 CLS at {size} px ({size // 16}x{size // 16} patches, trained 14x14)", 1e-4)
    # The torchvision-style protocol (shortest side 256, centre crop 224, ImageNet statistics), written into
    # the folder's file, is read as ViTImageProcessor reads it.
    edited = {**DINO_V1_PREPROCESSOR, "size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 224,
              "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(edited))
    pre = load_dino(folder).preprocessing
    assert (pre.resize, pre.crop, pre.resample, pre.keep_aspect) == (256, 224, "bicubic", True)
    ref_pixels = transformers.AutoImageProcessor.from_pretrained(folder)(list(images), return_tensors="np")
    _check_close(pre(list(images)), ref_pixels["pixel_values"].transpose(0, 2, 3, 1),
                 "DINO v1 preprocessing, shortest side 256 + crop 224, vs ViTImageProcessor", 1e-6)


def test_dino_wrong_folder_is_one_line(clip, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, says in ((clip[1], "config.json says 'clip'"), (tmp_path / "empty", "has no config.json")):
        with pytest.raises(CheckpointError, match=says) as e:
            load_dino(folder)
        message = str(e.value)
        assert "\n" not in message and "Dinov2Model" in message and "ViTModel" in message, message


def _drifting_clip(drift: float, frames: int = 5) -> np.ndarray:
    """A still picture plus a noise pattern growing by `drift` (in 0..255 units) per frame."""
    base = random_images(1, 64, 64, seed=5)[0].astype(np.float64)
    pattern = np.random.default_rng(6).standard_normal(base.shape)
    return np.stack([np.clip(base + t * drift * pattern, 0, 255).round().astype(np.uint8) for t in range(frames)])


def test_video_metrics_monotone_in_drift(clip, lpips):
    embedder = clip[3]
    scorer = lpips[2]
    scores = [score_frames(_drifting_clip(d), clip=embedder, lpips=scorer) for d in (0.0, 4.0, 12.0, 30.0)]
    for key in ("lpips_first", "lpips_frames", "clipsim_first", "clipsim_frames"):
        print(key, [round(s[key], 5) for s in scores])
    still = scores[0]
    assert still["lpips_first"] == 0 and still["lpips_frames"] == 0
    assert still["clipsim_first"] == pytest.approx(1, abs=1e-6)
    assert still["clipsim_frames"] == pytest.approx(1, abs=1e-6)
    for key, sign in (("lpips_first", 1), ("lpips_frames", 1), ("clipsim_first", -1), ("clipsim_frames", -1)):
        values = [sign * s[key] for s in scores]
        assert all(a < b for a, b in zip(values, values[1:])), f"{key} is not monotone in the drift: {values}"
    # Frames drift away from the first one: LPIPS-first (f1 vs ft, t up to 4 steps apart) > LPIPS-frames.
    assert scores[-1]["lpips_first"] > scores[-1]["lpips_frames"]
