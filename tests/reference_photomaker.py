"""PyTorch statements of PhotoMaker (TencentARC/PhotoMaker `photomaker/model.py`, `model_v2.py`, and the
`encode_prompt_with_trigger_word` of its SDXL pipeline as StoryDiffusion's `utils/pipeline.py` copies it),
written here from their published structure, for parity tests. Tiny widths, the real topology.

- ID encoder v1: transformers' CLIPVisionModelWithProjection + `visual_projection_2` (no bias) +
  `fuse_module` (mlp1 on [prompt ; id] without residual, + prompt, mlp2 with residual, LayerNorm).
- v2: the same + `qformer_perceiver`: token_proj (Linear, GELU, Linear) -> reshape to tokens -> LayerNorm,
  then IP-Adapter-FaceID's perceiver resampler (proj_in, [attention over (features ; latents), feed-forward]
  x depth, proj_out, norm_out) reading the CLIP last hidden state; output = tokens + resampler output.
"""

from __future__ import annotations

import math

import torch
import transformers
from torch import nn

# The tiny tower of storydiff_jax.models.photomaker.PRESETS["tiny-v*"]: PhotoMaker's 16 heads and quick_gelu.
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=16, image_size=224,
                   patch_size=14, projection_dim=16, hidden_act="quick_gelu")
PROJECTION_2 = 48           # 16 + 48 = 64: the tiny SDXL's text width
FACE_DIM = 24
NUM_TOKENS = 2
PERCEIVER_HEADS = 1         # PhotoMaker: width // 128, at least 1 at tiny widths
PERCEIVER_DIM_HEAD = 64


class MLP(nn.Module):
    def __init__(self, d_in, d_out, hidden, residual):
        super().__init__()
        self.layernorm, self.fc1, self.fc2 = nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)
        self.residual = residual

    def forward(self, x):
        y = self.fc2(nn.functional.gelu(self.fc1(self.layernorm(x))))
        return x + y if self.residual else y


class FuseModule(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp1, self.mlp2 = MLP(2 * dim, dim, dim, False), MLP(dim, dim, dim, True)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, prompt_embeds, id_embeds, class_tokens_mask):
        """The official masked scatter: the k-th True position takes the k-th identity token."""
        flat = prompt_embeds.reshape(-1, prompt_embeds.shape[-1]).clone()
        mask = class_tokens_mask.reshape(-1)
        ids = id_embeds.reshape(-1, id_embeds.shape[-1])[:int(mask.sum())]
        x = self.mlp1(torch.cat([flat[mask], ids], -1)) + flat[mask]
        flat[mask] = self.layer_norm(self.mlp2(x))
        return flat.reshape(prompt_embeds.shape)


class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], 1)).chunk(2, -1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        w = (q * math.sqrt(self.scale)) @ (k * math.sqrt(self.scale)).transpose(-1, -2)
        out = w.softmax(-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim, mult):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, embedding_dim, ff_mult):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(embedding_dim, dim), nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, dim_head, heads),
                                                    feed_forward(dim, ff_mult)]) for _ in range(depth)])

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
    def __init__(self, id_dim, dim, num_tokens, embedding_dim, ratio=4):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.token_proj = nn.Sequential(nn.Linear(id_dim, id_dim * ratio), nn.GELU(),
                                        nn.Linear(id_dim * ratio, dim * num_tokens))
        self.token_norm = nn.LayerNorm(dim)
        self.perceiver_resampler = FacePerceiverResampler(dim, 4, PERCEIVER_DIM_HEAD, PERCEIVER_HEADS, embedding_dim,
                                                          4)

    def forward(self, x, last_hidden_state):
        x = self.token_norm(self.token_proj(x).reshape(-1, self.num_tokens, self.dim))
        return x + self.perceiver_resampler(x, last_hidden_state)


class IDEncoder(transformers.CLIPVisionModelWithProjection):
    """PhotoMakerIDEncoder (v1) / PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken (v2) at tiny widths."""

    def __init__(self, version):
        super().__init__(transformers.CLIPVisionConfig(**TINY_VISION))
        self.version = version
        dim = TINY_VISION["projection_dim"] + PROJECTION_2
        self.visual_projection_2 = nn.Linear(TINY_VISION["hidden_size"], PROJECTION_2, bias=False)
        self.fuse_module = FuseModule(dim)
        if version == 2:
            self.qformer_perceiver = QFormerPerceiver(FACE_DIM, dim, NUM_TOKENS, TINY_VISION["hidden_size"])

    def id_embeds(self, pixels, face_embeds=None):
        """pixels [N, 3, 224, 224] -> [N, tokens, dim], as the official forward computes them."""
        out = self.vision_model(pixels)
        if self.version == 1:
            pooled = out[1]
            return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], -1)[:, None]
        return self.qformer_perceiver(face_embeds, out[0])


def build_id_encoder(version: int, seed: int = 0) -> IDEncoder:
    """A random-weight encoder with every parameter perturbed (norms away from 1 / 0, biases away from 0)."""
    torch.manual_seed(seed)
    model = IDEncoder(version).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def official_trigger_encoding(tokenizers, text_encoders, prompt, num_id_images, trigger_id):
    """`encode_prompt_with_trigger_word` for one prompt (restated): (prompt_embeds [1, 77, D], pooled,
    class_tokens_mask [1, 77], the expanded ids of each tokenizer)."""
    embeds, all_ids = [], []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer.encode(prompt)
        clean, class_index = [], []
        for token in input_ids:
            if token == trigger_id:
                class_index.append(len(clean) - 1)
            else:
                clean.append(token)
        assert len(class_index) == 1
        k = class_index[0]
        clean = clean[:k] + [clean[k]] * num_id_images + clean[k + 1:]
        max_len = tokenizer.model_max_length
        clean = clean[:max_len] if len(clean) > max_len else clean + [tokenizer.pad_token_id] * (max_len - len(clean))
        mask = torch.tensor([[k <= i < k + num_id_images for i in range(len(clean))]])
        ids = torch.tensor([clean])
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
        all_ids.append(clean)
    return torch.cat(embeds, -1), pooled, mask, all_ids


def photomaker_lora(seed: int = 3) -> dict[str, torch.Tensor]:
    """A LoRA in PhotoMaker's layout (diffusers' old processor names) for the tiny SDXL U-Net's first up block."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for attn in ("attn1", "attn2"):
        base = f"unet.up_blocks.0.attentions.0.transformer_blocks.0.{attn}.processor"
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            out[f"{base}.{proj}_lora.down.weight"] = torch.randn(4, 64, generator=g) * 0.1
            out[f"{base}.{proj}_lora.up.weight"] = torch.randn(64, 4, generator=g) * 0.1
    return out


def write_photomaker_file(path, encoder: IDEncoder, lora: dict[str, torch.Tensor]):
    """A PhotoMaker checkpoint in its real on-disk layout: `.bin` = a pickled {"id_encoder": state dict,
    "lora_weights": LoRA}, `.safetensors` = the same tensors under `id_encoder.` / `lora_weights.` prefixes."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    if str(path).endswith(".bin"):
        torch.save({"id_encoder": state, "lora_weights": lora}, path)
    else:
        save_file({**{f"id_encoder.{k}": v for k, v in state.items()},
                   **{f"lora_weights.{k}": v for k, v in lora.items()}}, str(path))
    return path
