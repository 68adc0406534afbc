"""The full CLIP model (image and text towers with their projections), as the evaluation metrics use it.

transformers' `CLIPModel` is the two towers side by side plus a projection each; we compose our own
towers (`clip_text.CLIPTextModel` with its projection, `clip_vision.CLIPVisionModel`) instead of
re-stating them. On disk the towers' keys sit at the top level (`text_model.*`, `text_projection`,
`vision_model.*`, `visual_projection`); here they sit under `text.` and `vision.`, which
`convert/metrics.py` adds when it reads a folder.

Both feature calls return the *projected* embeddings, unnormalised, like transformers'
`get_image_features` / `get_text_features`: the metrics normalise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from storydiff_jax.errors import ConfigError

from .clip_text import CLIPTextConfig, CLIPTextModel
from .clip_vision import CLIPVisionConfig, CLIPVisionModel

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (ViT-B/32): what a config.json means when it
# leaves a key out. Ours default to other models (CLIP-L text, ViT-H vision), so they are filled in first.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, eos_token_id=49407, pad_token_id=1, bos_token_id=49406)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig
    vision: CLIPVisionConfig

    def __post_init__(self):
        if not self.text.with_projection:
            raise ConfigError("CLIP model: the text tower needs its projection (with_projection=True)")
        if self.text.projection_dim != self.vision.projection_dim:
            raise ConfigError(f"CLIP model: text projection {self.text.projection_dim} and image projection "
                              f"{self.vision.projection_dim} differ; both towers must embed into one space")

    @property
    def projection_dim(self) -> int:
        return self.vision.projection_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """A transformers `CLIPModel` config.json (text_config + vision_config + projection_dim), or our
        own `to_dict` output ({"text": ..., "vision": ...})."""
        if "text" in d and "vision" in d:
            return cls(CLIPTextConfig.from_dict(d["text"]), CLIPVisionConfig.from_dict(d["vision"]))
        if not isinstance(d.get("text_config"), dict) or not isinstance(d.get("vision_config"), dict):
            raise ConfigError("CLIP model: the config has no text_config and vision_config; it is not a "
                              "transformers CLIPModel config")
        # The top-level projection_dim is the one CLIPModel builds both projections with (the towers'
        # own projection_dim entries are unused there).
        proj = d.get("projection_dim") or 512
        text = {**_HF_TEXT_DEFAULTS, **{k: v for k, v in d["text_config"].items() if v is not None},
                "projection_dim": proj, "with_projection": True}
        vision = {**_HF_VISION_DEFAULTS, **{k: v for k, v in d["vision_config"].items() if v is not None},
                  "projection_dim": proj}
        return cls(CLIPTextConfig.from_dict(text), CLIPVisionConfig.from_dict(vision))

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text.to_dict(), "vision": self.vision.to_dict()}


PRESETS: dict[str, CLIPConfig] = {
    # Tiny, for tests: the real 224 px / patch 32 geometry of ViT-B/32 (50 tokens), quick_gelu like OpenAI's.
    "tiny-clip": CLIPConfig(
        CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=16, with_projection=True),
        CLIPVisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, patch_size=32,
                         projection_dim=16, hidden_act="quick_gelu")),
}


class CLIPModel(nnx.Module):
    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text = CLIPTextModel(config.text, dtype=dtype, rngs=rngs)
        self.vision = CLIPVisionModel(config.vision, dtype=dtype, rngs=rngs)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """[B, size, size, 3] CLIP-normalised pixels (`images.clip_preprocess`) -> [B, projection_dim]."""
        return self.vision(pixels).image_embeds

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """[B, L] token ids (`clip_text.tokenize`, L <= 77) -> [B, projection_dim]."""
        return self.text(input_ids).pooled

