"""Tiny random-weight metric networks in their real on-disk layouts, and PyTorch statements of LPIPS.

* CLIP: transformers `CLIPModel` (quick_gelu like OpenAI's, 224 px / patch 32 like ViT-B/32), saved with
  `save_pretrained` plus CLIP tokenizer files; `open_clip_state_dict` re-keys the same weights into
  open_clip's layout (written here from open_clip's module names, independently of convert/metrics.py).
* DINOv2: transformers `Dinov2Model` with the real trained grid (518 px, patch 14: 37 x 37), so inputs at
  224 px go through the bicubic position-embedding resize as with the real weights.
* DINO v1: transformers `ViTModel` with ViT-S/16's grid (224 px, patch 16) and facebook/dino-vits16's
  preprocessor_config.json.
* LPIPS: torchvision's AlexNet `features` layout (torchvision itself cannot be installed here: the state
  dict is written by hand with its key names and shapes) and the `lpips` package's `lin{k}.model.1.weight`
  heads, plus `TorchLPIPS`, a PyTorch statement of the network (AlexNet slices, unit-normalised channels,
  squared difference, 1x1 heads, spatial mean, sum).
Weights are perturbed away from their initial values (LayerNorms away from 1/0) so swapped parameters show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from storydiff_jax.tokenizer_files import write_clip_tokenizer

CLIP_TEXT = dict(hidden_size=128, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77)   # 2 heads = width / 64, as open_clip's text towers
CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                   patch_size=32)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=518, patch_size=14)
# DINO v1 ViT-S/16's topology (224 px, patch 16: 14 x 14, layer_norm_eps 1e-12) at a tiny width.
DINO_V1 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=224,
               patch_size=16, layer_norm_eps=1e-12)
# facebook/dino-vits16's preprocessor_config.json as published: ViTImageProcessor squashes to 224 x 224,
# bilinear, with mean = std = 0.5 (not the ImageNet statistics DINO trained with; what transformers users get).
DINO_V1_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "norm" in name:
                p.copy_(0.2 * noise)
            else:
                p.add_(scale * noise)
    return model.eval()


def tiny_clip_folder(folder) -> transformers.CLIPModel:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16)
    model = perturb(transformers.CLIPModel(config), seed=1)
    # Random towers embed into unrelated directions; where image-text cosines come out negative, CLIP-T's
    # clamps (max(cos, 0)) would hide every difference. Flip the text projection's sign so they are positive.
    with torch.no_grad():
        probe_img = model.get_image_features(pixel_values=torch.zeros(1, 3, 224, 224)).pooler_output
        probe_txt = model.get_text_features(input_ids=torch.tensor([[49406, 320, 1929, 49407]])).pooler_output
        if torch.nn.functional.cosine_similarity(probe_img, probe_txt).item() < 0:
            model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return model


def open_clip_state_dict(model: transformers.CLIPModel) -> dict[str, torch.Tensor]:
    """The CLIPModel's weights under open_clip's names (fused in_proj, `x @ proj` projections)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"logit_scale": sd["logit_scale"]}
    for tower, prefix, enc in (("visual.", "vision_model.", "visual.transformer.resblocks."),
                               ("", "text_model.", "transformer.resblocks.")):
        config = model.config.vision_config if tower else model.config.text_config
        n_layers = config.num_hidden_layers
        for i in range(n_layers):
            src = f"{prefix}encoder.layers.{i}."
            dst = f"{enc}{i}."
            for leaf in ("weight", "bias"):
                out[dst + f"attn.in_proj_{leaf}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
                out[dst + f"attn.out_proj.{leaf}"] = sd[src + f"self_attn.out_proj.{leaf}"]
                out[dst + f"ln_1.{leaf}"] = sd[src + f"layer_norm1.{leaf}"]
                out[dst + f"ln_2.{leaf}"] = sd[src + f"layer_norm2.{leaf}"]
                out[dst + f"mlp.c_fc.{leaf}"] = sd[src + f"mlp.fc1.{leaf}"]
                out[dst + f"mlp.c_proj.{leaf}"] = sd[src + f"mlp.fc2.{leaf}"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for leaf in ("weight", "bias"):
            out[f"visual.{ours}.{leaf}"] = sd[f"vision_model.{theirs}.{leaf}"]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    for leaf in ("weight", "bias"):
        out[f"ln_final.{leaf}"] = sd[f"text_model.final_layer_norm.{leaf}"]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)   # a buffer open_clip saves
    return {k: v.contiguous() for k, v in out.items()}


def tiny_dinov2_folder(folder) -> transformers.Dinov2Model:
    torch.manual_seed(0)
    model = perturb(transformers.Dinov2Model(transformers.Dinov2Config(**DINO)), seed=2)
    with torch.no_grad():   # layer scales start at 1: make them differ per channel
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.5, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def tiny_dino_vit_folder(folder) -> transformers.ViTModel:
    """A DINO v1 folder as facebook/dino-vits16 ships it: ViTModel weights (the unused pooler included), its
    config.json and preprocessor_config.json."""
    torch.manual_seed(0)
    model = perturb(transformers.ViTModel(transformers.ViTConfig(**DINO_V1)), seed=7)
    model.save_pretrained(folder)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(DINO_V1_PREPROCESSOR))
    return model


# ------------------------------------------------------------------------------------------------ LPIPS

ALEXNET_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
                 (10, 256, 256, 3, 1, 1))
TAP_CHANNELS = (64, 192, 384, 256, 256)


def alexnet_features() -> torch.nn.Sequential:
    """torchvision's `alexnet().features`, module for module (indices 0..12)."""
    layers: list[torch.nn.Module] = []
    for i, cin, cout, k, s, p in ALEXNET_CONVS:
        while len(layers) < i:
            layers.append(torch.nn.MaxPool2d(3, 2))
        layers += [torch.nn.Conv2d(cin, cout, k, s, p), torch.nn.ReLU()]
    layers.append(torch.nn.MaxPool2d(3, 2))
    return torch.nn.Sequential(*layers)


class TorchLPIPS(torch.nn.Module):
    """LPIPS v0.1 (AlexNet) as the `lpips` package computes it, inputs in [-1, 1] NCHW."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)

    def taps(self, x):
        x = (x - torch.tensor(self.SHIFT).view(1, 3, 1, 1)) / torch.tensor(self.SCALE).view(1, 3, 1, 1)
        # The package's slices: features[0:2], [2:5], [5:8], [8:10], [10:12]; each ends at a ReLU.
        out = []
        for lo, hi in ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)):
            x = self.features[lo:hi](x)
            out.append(x)
        return out

    def forward(self, x, y):
        total = 0
        for lin, a, b in zip(self.lins, self.taps(x), self.taps(y)):
            na = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
            nb = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(2, 3), keepdim=True)
        return total[:, 0, 0, 0]


def lpips_folder(folder, seed: int = 3) -> TorchLPIPS:
    """A folder with `alexnet-owt-7be5be79.pth` (torchvision layout) and `alex.pth` (lpips heads)."""
    torch.manual_seed(seed)
    ref = TorchLPIPS().eval()
    with torch.no_grad():
        for lin in ref.lins:   # the trained heads are non-negative (lpips clamps them)
            lin.weight.uniform_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    trunk = {f"features.{k}": v.clone() for k, v in ref.features.state_dict().items()}
    # torchvision's file also holds the classifier (skipped by the converter); a few of its real keys.
    trunk["classifier.4.bias"] = torch.zeros(4096)
    trunk["classifier.6.bias"] = torch.zeros(1000)
    torch.save(trunk, folder / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{k}.model.1.weight": lin.weight.detach().clone() for k, lin in enumerate(ref.lins)},
               folder / "alex.pth")
    return ref


def save_safetensors(tensors: dict[str, torch.Tensor], path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def random_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [n, h, w, 3] smooth random images (blurred noise: closer to pictures than white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, max(2, h // 8), max(2, w // 8), 3)).astype(np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.Resampling.BICUBIC)) for s in small])
