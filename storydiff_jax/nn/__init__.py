"""Building blocks shared by the networks in `storydiff_jax.models`."""

from .attention import Attention, dot_product_attention
from .embeddings import TimestepEmbedding, sinusoidal_embedding
from .norms import GroupNorm, LayerNorm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv
from .transformer import BasicTransformerBlock, FeedForward, Transformer2D

__all__ = ["Attention", "dot_product_attention", "TimestepEmbedding", "sinusoidal_embedding", "GroupNorm",
           "LayerNorm", "Downsample2D", "ResnetBlock2D", "Upsample2D", "conv", "BasicTransformerBlock",
           "FeedForward", "Transformer2D"]
