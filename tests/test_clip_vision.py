"""Parity of storydiff_jax.models.clip_vision.CLIPVisionModel with transformers'
CLIPVisionModelWithProjection, its converter (convert/clip_vision.py, transformers and open_clip layouts)
and storydiff_jax.images.clip_preprocess against transformers' CLIPImageProcessor.

The reference is a tiny random-weight model with the real input geometry (224 px, patch 14: 257 tokens),
exact GELU like ViT-H-14, every parameter perturbed (norms away from 1/0), saved with `save_pretrained`.
The open_clip file is the same model re-keyed here, independently of the converter's key map.
Tolerance (fp32): max abs error <= 1e-4 * max(1, max |reference|).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from convert.clip_vision import OPEN_CLIP_HEADS, convert_clip_vision, expected_params, load_clip_vision
from storydiff_jax.errors import CheckpointError, ConfigError
from storydiff_jax.images import CLIP_MEAN, CLIP_STD, clip_preprocess, load_image
from storydiff_jax.models.clip_vision import PRESETS, CLIPVisionConfig, CLIPVisionModel
from storydiff_jax.params import build_with_params

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=224,
            patch_size=14, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5)


def _check_close(ours, ref, what, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = np.abs(ours - ref).max()
    tol = rel * max(1.0, np.abs(ref).max())
    print(f"{what}: max abs err {err:.3g} (tol {tol:.3g}, max|ref| {np.abs(ref).max():.3g})")
    assert err <= tol, f"{what}: max abs error {err} > {tol}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, its save_pretrained folder)."""
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorms start at 1 / 0: randomise so a swapped scale/bias shows
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("image_encoder")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ref_outputs(reference, pixels):
    model, _ = reference
    with torch.no_grad():
        out = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    pooled = model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
    return dict(last_hidden_state=out.last_hidden_state.numpy(), penultimate=out.hidden_states[-2].numpy(),
                pooled=pooled.detach().numpy(), image_embeds=out.image_embeds.numpy())


def _compare(model, pixels, ref, name):
    out = model(jnp.asarray(pixels))
    for field in ("penultimate", "last_hidden_state", "pooled", "image_embeds"):
        _check_close(getattr(out, field), ref[field], f"{name} {field}")


def _open_clip_state_dict(folder) -> dict[str, np.ndarray]:
    """The reference re-keyed the way open_clip names a VisionTransformer (written here, not imported from the
    converter): fused q/k/v `in_proj`, `proj` = visual_projection.weight.T, plus a text tower to be ignored."""
    hf = load_file(folder / "model.safetensors")
    sd = {"visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
          "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
          "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
          "visual.proj": np.ascontiguousarray(hf["visual_projection.weight"].T)}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for leaf in ("weight", "bias"):
            sd[f"visual.{ours}.{leaf}"] = hf[f"vision_model.{theirs}.{leaf}"]
    for i in range(TINY["num_hidden_layers"]):
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            sd[dst + f"attn.in_proj_{leaf}"] = np.concatenate(
                [hf[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"], axis=0)
            for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                 ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
                sd[dst + f"{ours}.{leaf}"] = hf[src + f"{theirs}.{leaf}"]
    rng = np.random.default_rng(3)
    sd.update({"token_embedding.weight": rng.standard_normal((50, 32), np.float32),
               "transformer.resblocks.0.ln_1.weight": np.ones(32, np.float32),
               "text_projection": rng.standard_normal((32, 16), np.float32),
               "logit_scale": np.array(4.6, np.float32)})
    return sd


# ----------------------------------------------------------------------------------------------------
# Config


def test_config_from_dict_and_presets(reference):
    _, folder = reference
    d = json.loads((folder / "config.json").read_text())
    cfg = CLIPVisionConfig.from_dict(d)
    assert cfg == PRESETS["tiny-vit"]
    assert CLIPVisionConfig.from_dict({"vision_config": d, "text_config": {}}) == cfg   # full CLIPModel config
    assert CLIPVisionConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["num_hidden_layers"] == 3 and cfg.to_dict()["num_attention_heads"] == 2
    # to_dict is a valid transformers config: it rebuilds the same reference architecture.
    hf = transformers.CLIPVisionConfig(**PRESETS["vit-h-14"].to_dict())
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size, hf.projection_dim,
            hf.hidden_act) == (1280, 32, 16, 5120, 1024, "gelu")
    # Full-size preset: same parameter count as transformers' model (built on the meta device, no memory).
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(hf)
    ref_count = sum(p.numel() for p in ref.parameters())
    ours = sum(int(np.prod(s.shape)) for s in expected_params(PRESETS["vit-h-14"]).values())
    print(f"vit-h-14 parameters: ours {ours}, transformers {ref_count}")
    assert ours == ref_count
    assert PRESETS["vit-h-14"].head_dim == 80 and PRESETS["vit-h-14"].num_tokens == 257


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="relu"):
        CLIPVisionConfig.from_dict({**TINY, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="heads"):
        CLIPVisionConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="patch_size"):
        CLIPVisionConfig(image_size=225)


# ----------------------------------------------------------------------------------------------------
# Parity


def test_parity_transformers_folder(reference, pixels, ref_outputs):
    _, folder = reference
    model = load_clip_vision(folder)
    assert model.config == PRESETS["tiny-vit"]
    _compare(model, pixels, ref_outputs, "transformers folder")


def test_parity_open_clip_layout(reference, pixels, ref_outputs, tmp_path):
    _, folder = reference
    _, hf_params = convert_clip_vision(folder)
    sd = _open_clip_state_dict(folder)
    save_file(sd, tmp_path / "open_clip.safetensors")
    # A pickled open_clip training checkpoint: nested under "state_dict", DDP's "module." prefix.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}},
               tmp_path / "epoch_3.pt")
    for name in ("open_clip.safetensors", "epoch_3.pt"):
        config, params = convert_clip_vision(tmp_path / name, heads=2)
        assert config == PRESETS["tiny-vit"], name
        assert params.keys() == hf_params.keys()
        for k in params:
            np.testing.assert_array_equal(params[k], hf_params[k], err_msg=f"{name}: {k}")
    model = load_clip_vision(tmp_path / "open_clip.safetensors", heads=2)
    _compare(model, pixels, ref_outputs, "open_clip layout")


def test_parity_with_open_clip_itself(tmp_path):
    open_clip = pytest.importorskip(
        "open_clip", reason="open_clip is an optional extra (it needs torchvision, which breaks this env's "
                            "transformers); the open_clip layout is covered by test_parity_open_clip_layout")
    torch.manual_seed(0)
    ref = open_clip.model.VisionTransformer(image_size=224, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=4.0,
                                            output_dim=16).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file({f"visual.{k}": v.contiguous().numpy() for k, v in ref.state_dict().items()},
              tmp_path / "vit.safetensors")
    model = load_clip_vision(tmp_path / "vit.safetensors", heads=2)
    x = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    _check_close(model(jnp.asarray(x)).image_embeds, want, "open_clip image_embeds")


def test_full_clip_model_folder(pixels, tmp_path):
    """A full transformers CLIPModel folder: nested vision_config, the projection size at the top level (here
    unlike the vision_config default), text-tower keys skipped."""
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=24, intermediate_size=30, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config={k: v for k, v in TINY.items() if k != "projection_dim"}, projection_dim=12)
    ref = transformers.CLIPModel(config).eval()
    ref.save_pretrained(tmp_path)
    model = load_clip_vision(tmp_path)
    assert model.config.projection_dim == 12 and model.config.num_layers == TINY["num_hidden_layers"]
    with torch.no_grad():
        pooled = ref.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).pooler_output
        want = ref.visual_projection(pooled).numpy()
    _check_close(model(jnp.asarray(pixels)).image_embeds, want, "CLIPModel folder image_embeds")


def test_bare_transformers_file_derives_config(reference, tmp_path):
    """model.safetensors without its config.json: the config comes from the shapes (+ heads, activation)."""
    _, folder = reference
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config, _ = convert_clip_vision(tmp_path / "model.safetensors", heads=2)
    assert config == PRESETS["tiny-vit"]


# bfloat16 vs the fp32 reference, bound on max abs error / max(1, max|ref|), ~4x the measured (2 CPU cores):
# penultimate 0.0103 (0.0501 of 4.88), image_embeds 0.0065 (0.0135 of 2.07).
BF16_REL = {"penultimate": 4e-2, "image_embeds": 2.5e-2}


def test_half_precision_runs_close(reference, pixels, ref_outputs):
    """bfloat16 weights and activations (8-bit mantissa) vs the fp32 reference, per output (BF16_REL)."""
    _, folder = reference
    config, params = convert_clip_vision(folder, dtype=jnp.bfloat16)
    model = build_with_params(lambda: CLIPVisionModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), params)
    out = model(jnp.asarray(pixels))
    assert out.penultimate.dtype == jnp.bfloat16
    for field, rel in BF16_REL.items():
        _check_close(getattr(out, field), ref_outputs[field], f"bf16 {field}", rel=rel)


def test_wrong_pixel_shape_is_a_config_error(reference):
    _, folder = reference
    model = load_clip_vision(folder)
    with pytest.raises(ConfigError, match="NHWC"):
        model(jnp.zeros((1, 3, 224, 224)))


# ----------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_matches_clip_image_processor():
    """Against transformers' CLIPImageProcessor with IP-Adapter's (default) settings.

    Without torchvision, transformers runs its PIL backend: the same PIL bicubic resize, floor-centred crop and
    float arithmetic as ours, so the measured difference is 0.0. The tolerance 1e-6 (a few float32 ulps of values
    up to ~2.2) only allows for a reordered float operation; a wrong size, crop offset or resampler is off by
    > 1e-3 (one uint8 level is 1/255/0.26 = 0.015 here). transformers' default torchvision backend (not
    installable here) resizes tensors with torch's antialiased bicubic, which is not bit-identical to PIL.
    """
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                                resample=3, do_center_crop=True)
    rng = np.random.default_rng(0)
    # Wide, tall, square, upscaled, barely larger than the crop; 303x1000 resizes to 224x739, an odd margin
    # of 515 whose floor half (257) differs from torchvision's round (258): catches an open_clip-style crop.
    sizes = [(300, 451), (640, 225), (224, 224), (100, 333), (257, 223), (303, 1000), (225, 226), (480, 853)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    worst = 0.0
    for (h, w), arr in zip(sizes, images):
        ours = clip_preprocess([Image.fromarray(arr)])
        ref = processor(images=[Image.fromarray(arr)], return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (1, 224, 224, 3)
        err = float(np.abs(ours - ref).max())
        worst = max(worst, err)
        assert err <= 1e-6, f"{h}x{w}: max abs diff {err}"
    print(f"clip_preprocess vs CLIPImageProcessor (PIL backend): max abs diff {worst:.3g} over {len(sizes)} images")
    # uint8 arrays, PIL images and RGBA/greyscale inputs give the same pixels.
    np.testing.assert_array_equal(clip_preprocess(images[:2]),
                                  clip_preprocess([Image.fromarray(a) for a in images[:2]]))
    rgba = np.concatenate([images[0], np.full(images[0].shape[:2] + (1,), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(clip_preprocess(Image.fromarray(rgba)), clip_preprocess(images[0]))
    grey = images[1][..., 0]
    np.testing.assert_array_equal(clip_preprocess([grey]), clip_preprocess([np.repeat(grey[..., None], 3, -1)]))
    # Batched array input, other sizes; a uniform grey image normalises to ((v / 255) - mean) / std exactly.
    batch = clip_preprocess(np.full((2, 50, 80, 3), 128, np.uint8), size=32)
    assert batch.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(batch[0, 0, 0], (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), rtol=1e-6)


def test_preprocess_and_load_image_errors(tmp_path):
    with pytest.raises(ConfigError, match="uint8"):
        clip_preprocess([np.zeros((30, 30, 3), np.float32)])
    with pytest.raises(ConfigError, match="HWC"):
        clip_preprocess([np.zeros((3, 30, 30, 2), np.uint8)])
    with pytest.raises(ConfigError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_image(tmp_path / "notes.png")
    Image.fromarray(np.zeros((8, 9, 4), np.uint8), "RGBA").save(tmp_path / "ok.png")
    im = load_image(tmp_path / "ok.png")
    assert im.mode == "RGB" and im.size == (9, 8)


# ----------------------------------------------------------------------------------------------------
# Conversion errors


def test_missing_source_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_clip_vision(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        convert_clip_vision(tmp_path / "empty")


def test_other_network_file_says_what_it_is(tmp_path):
    z = np.zeros((4, 4), np.float32)
    save_file({"down_blocks.0.resnets.0.conv1.weight": z, "time_embedding.linear_1.weight": z},
              tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a CLIP vision encoder: it looks like a U-Net"):
        convert_clip_vision(tmp_path / "unet.safetensors")
    save_file({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": z}, tmp_path / "mm.safetensors")
    with pytest.raises(CheckpointError, match="AnimateDiff motion modules"):
        convert_clip_vision(tmp_path / "mm.safetensors")


def test_truncated_and_mismatched_files_are_checkpoint_errors(reference, tmp_path):
    _, folder = reference
    data = (folder / "model.safetensors").read_bytes()
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_clip_vision(bad)
    (tmp_path / "short.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch"):
        convert_clip_vision(tmp_path / "short.bin")
    # config.json that does not fit the weights: the shape mismatch names the key.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes(data)
    (wrong / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                   "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.mlp\.fc1"):
        convert_clip_vision(wrong)


def test_open_clip_key_and_head_errors(reference, tmp_path):
    _, folder = reference
    sd = _open_clip_state_dict(folder)
    save_file(sd, tmp_path / "ok.safetensors")
    assert 32 not in OPEN_CLIP_HEADS
    with pytest.raises(CheckpointError, match="heads="):
        convert_clip_vision(tmp_path / "ok.safetensors")
    extra = {**sd, "visual.attn_pool.query": np.zeros((4, 32), np.float32)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*visual\.attn_pool\.query"):
        convert_clip_vision(tmp_path / "extra.safetensors", heads=2)
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.mlp.c_proj.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.fc2"):
        convert_clip_vision(tmp_path / "missing.safetensors", heads=2)
