"""Multi-head attention: one function with pluggable backends, the `Attention` layer, and
`attention_with_lengths`, the form every Consistent Self-Attention schedule runs in (each row's own tokens
and the compacted extra tokens it may see, with a valid key length per row; see `storydiff_jax.consistent`,
whose hooks replace the layer's self-attention call and use its projections).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Linear

_HALF = (jnp.float16, jnp.bfloat16)


def _backend_for(q: jax.Array, backend: str) -> str:
    """`auto` picks cuDNN's fused kernel where it applies (GPU, half precision, head dim % 8 == 0)."""
    if backend != "auto":
        return backend
    head_dim = q.shape[-1]
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and q.dtype in _HALF and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, mask=None, *, backend: str = "auto", logits_budget: int | None = None
                          ) -> jax.Array:
    """Scaled dot-product attention on [batch, tokens, heads, head_dim] arrays.

    mask: optional boolean array broadcastable to [batch, heads, q_tokens, kv_tokens]; True = attend.
    Scale is head_dim ** -0.5 as in every reference network here. Softmax runs in float32 on the XLA
    path so half-precision inputs do not overflow.
    logits_budget: on the XLA path, the most float32 logits one piece of the computation may hold (None:
    no limit). Larger problems go through in query blocks that fit, each block a checkpoint: its logits
    and probabilities are recomputed in the backward pass instead of kept (training's `--remat`: at 512²
    one SD1.5 self-attention over 16 frames would otherwise hold 8 GiB of logits). Every query row's
    softmax still sees all keys, so the values are those of the one-piece computation.
    """
    impl = _backend_for(q, backend)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    scale = q.shape[-1] ** -0.5

    def attend(q, mask):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    b, lq, h, _ = q.shape
    per_query = b * h * k.shape[1]
    if logits_budget is None or lq * per_query <= logits_budget or (mask is not None and mask.shape[-2] != 1):
        return attend(q, mask)
    block = max(1, logits_budget // per_query)
    n_blocks = -(-lq // block)
    qp = jnp.pad(q, ((0, 0), (0, n_blocks * block - lq), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(qp.reshape(b, n_blocks, block, *q.shape[2:]), 1, 0)
    out = jax.lax.map(jax.checkpoint(lambda qb: attend(qb, mask)), blocks)
    return jnp.moveaxis(out, 0, 1).reshape(b, n_blocks * block, *out.shape[3:])[:, :lq]


# Logit elements (float32) one query block of the XLA path may hold: 2**26 = 256 MiB. Queries are
# processed in blocks that fit, so CSA's longer key lists never materialise whole logit tensors.
LOGITS_BUDGET = 2 ** 26


def attention_with_lengths(q, k, v, kv_lengths, *, backend: str = "auto", logits_budget: int | None = None,
                           own: int = 0):
    """Attention where row b of the batch sees only its first `kv_lengths[b]` keys.

    q: [B, Lq, H, D]; k, v: [B, S, H, D]; kv_lengths: int [B] in [1, S]. This is the shape every
    Consistent Self-Attention schedule is written in (own tokens first, then the compacted tokens of the
    other images, padded to a static S), so one static program serves every selection and coin flip.

    backend "auto": cuDNN's fused flash kernel through `jax.nn.dot_product_attention(...,
    key_value_seq_lengths=...)` on GPU in fp16/bf16; elsewhere ("xla") an exact softmax computed in
    query blocks of at most `logits_budget` (default: the module's LOGITS_BUDGET, read at trace time)
    float32 logits; "xla-fused": jax's own XLA implementation of the same call (whole logits; for checks).
    own: the first `own` keys (every row's own tokens) are multiplied apart from the rest, so a row that
    uses only them gives plain attention's numbers bit for bit on the XLA path.
    """
    impl = _backend_for(q, backend)
    kv_lengths = kv_lengths.astype(jnp.int32)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths, implementation="cudnn")
    if impl == "xla-fused":
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths, implementation="xla")
    b, lq, h, d = q.shape
    s = k.shape[1]
    budget = LOGITS_BUDGET if logits_budget is None else logits_budget
    block = max(1, min(lq, budget // max(1, b * h * s)))
    live = (jnp.arange(s)[None, :] < kv_lengths[:, None])[:, None, None, :]       # [B, 1, 1, S]

    def one_block(qb):
        # Own keys and the rest in separate products: XLA's CPU GEMMs round by problem shape, and this
        # keeps a row without extra keys bit-identical to plain attention whatever the padded length.
        parts = [k[:, :own], k[:, own:]] if own else [k]
        logits = jnp.concatenate([jnp.einsum("bqhd,bkhd->bhqk", qb, part, preferred_element_type=jnp.float32)
                                  for part in parts], axis=-1) * d ** -0.5
        weights = jax.nn.softmax(jnp.where(live, logits, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights[..., :own], v[:, :own]) if own else 0
        return out + jnp.einsum("bhqk,bkhd->bqhd", weights[..., own:], v[:, own:])

    if block == lq:
        return one_block(q)
    # A loop (lax.map) over query blocks: XLA then keeps one block's logits alive (unrolled blocks were
    # scheduled side by side and kept most of them). Its cost analysis counts the loop body once, so
    # FLOP measurements use an unlimited budget (see bench/csa_cost.py); the arithmetic is the same.
    n_blocks = -(-lq // block)
    qp = jnp.pad(q, ((0, 0), (0, n_blocks * block - lq), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(qp.reshape(b, n_blocks, block, h, d), 1, 0)
    out = jnp.moveaxis(jax.lax.map(one_block, blocks), 0, 1).reshape(b, n_blocks * block, h, d)
    return out[:, :lq]


class Attention(nnx.Module):
    """diffusers-style attention: to_q/to_k/to_v projections, heads, to_out.0 output projection.

    Self-attention when `context` is None, cross-attention otherwise. `logits_budget` (None unless
    `nn.remat.set_remat` sets it for training) bounds the logits held at once (`dot_product_attention`).
    """

    logits_budget = None

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = Linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.to_k = Linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.to_v = Linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        # A list so parameter paths read `to_out.0.*` exactly like the PyTorch state dict.
        self.to_out = nnx.List([Linear(inner, query_dim, use_bias=out_bias, dtype=dtype, param_dtype=dtype,
                                       rngs=rngs)])

    def split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.dim_head)

    def attend(self, x: jax.Array, kv_source: jax.Array, mask=None, *, backend: str = "auto") -> jax.Array:
        """Queries from `x` [B, L, C]; keys/values projected from `kv_source` [B, S, C']."""
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(kv_source))
        v = self.split_heads(self.to_v(kv_source))
        out = dot_product_attention(q, k, v, mask, backend=backend, logits_budget=self.logits_budget)
        return self.to_out[0](out.reshape(*out.shape[:-2], -1))

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, backend: str = "auto") -> jax.Array:
        """x: [B, L, C]. context: cross-attention tokens [B, S, C'] (None: self-attention)."""
        return self.attend(x, x if context is None else context, backend=backend)


class DecoupledCrossAttention(Attention):
    """IP-Adapter's decoupled cross-attention: text attention + `scale` x attention over image tokens.

    The image branch has its own key/value projections (`to_k_ip`, `to_v_ip`, no bias) but shares the
    query and the output projection: out = to_out(attn(Q, K_text, V_text) + scale * attn(Q, K_ip, V_ip)),
    two separate softmaxes. With `image_context=None` (or scale 0) it is exactly the plain layer.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(query_dim, heads, dim_head, cross_attention_dim=cross_attention_dim, dtype=dtype, rngs=rngs)
        inner = heads * dim_head
        self.to_k_ip = Linear(cross_attention_dim, inner, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.to_v_ip = Linear(cross_attention_dim, inner, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, image_context: jax.Array | None = None,
                 ip_scale=1.0, backend: str = "auto", **_) -> jax.Array:
        """x [B, L, C]; context: text tokens [B, S, C']; image_context: image tokens [B, N, C']."""
        if image_context is None:
            return super().__call__(x, context, backend=backend)
        q = self.split_heads(self.to_q(x))
        text = dot_product_attention(q, self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context)),
                                     backend=backend)
        image_context = image_context.astype(x.dtype)
        image = dot_product_attention(q, self.split_heads(self.to_k_ip(image_context)),
                                      self.split_heads(self.to_v_ip(image_context)), backend=backend)
        out = text + jnp.asarray(ip_scale, text.dtype) * image
        return self.to_out[0](out.reshape(*out.shape[:-2], -1))
