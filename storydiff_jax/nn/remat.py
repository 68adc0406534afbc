"""Rematerialisation per block: what a network keeps from its forward pass for the backward pass.

Training differentiates through the whole U-Net (its motion modules and IP layers sit at every level), so
without checkpoints every intermediate of every layer lives from the forward pass to the backward pass:
norms, activations, attention probabilities. A block class opts in to checkpointing with
`@rematerialisable` on its `__call__` (the U-Net's resnets, spatial transformers and motion modules do);
`set_remat(model, mode)` turns it on for every such block of one model, so inference and the frozen
encoders never pay for it. The block then runs under `jax.checkpoint` with the mode's policy:

  none    no checkpoints: everything is kept (fastest, most memory);
  blocks  each block keeps its inputs and the outputs of its matmuls and convolutions; the cheap work
          between them (norms, activations, softmax, the attention scores' batched products) is
          recomputed in the backward pass;
  full    each block keeps only its inputs (policy `block_inputs`) and recomputes its whole forward in
          the backward pass: one more forward pass of the blocks.

With blocks and full, attention layers also compute their logits in query blocks of at most
`nn.attention.LOGITS_BUDGET` elements, recomputed in the backward pass: one self-attention over 16 frames at
512² would otherwise hold 8 GiB of float32 logits, whatever the block checkpoints keep.

Recomputation changes no value: the three modes give the same loss and gradients (to float rounding).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from ..errors import ConfigError
from .attention import LOGITS_BUDGET, Attention

REMAT_MODES = ("none", "blocks", "full")


def matmuls_and_convs(prim, *args, **params) -> bool:
    """Checkpoint policy: save weight matmuls (no batch dimensions) and convolutions, recompute the rest."""
    if prim is jax.lax.conv_general_dilated_p:
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


# Inside a checkpoint, saving nothing leaves exactly the checkpoint's own inputs: the block's inputs.
block_inputs = jax.checkpoint_policies.nothing_saveable

POLICIES = {"none": None, "blocks": matmuls_and_convs, "full": block_inputs}


def rematerialisable(call):
    """Decorate a module's `__call__`: it runs under `jax.checkpoint(policy=self.remat_policy)` when
    `set_remat` gave the module a policy, and as it is otherwise.

    The arguments are closed over rather than passed, so non-array arguments (frame counts, attention
    hooks, IP-Adapter contexts) need no special handling; `jax.checkpoint` turns the closed-over arrays
    (inputs and parameters alike) into inputs of the checkpointed computation, differentiable as usual.
    """
    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        policy = getattr(self, "remat_policy", None)
        if policy is None:
            return call(self, *args, **kwargs)
        return jax.checkpoint(lambda: call(self, *args, **kwargs), policy=policy)()

    wrapper.rematerialisable = True
    return wrapper


def set_remat(model: nnx.Module, mode: str) -> nnx.Module:
    """Give every rematerialisable block of `model` the policy of `mode` (one of REMAT_MODES), and with
    blocks or full every attention layer a logits budget (its queries then go through in blocks whose
    logits are recomputed in the backward pass, `nn.attention.dot_product_attention`); returns `model`."""
    if mode not in POLICIES:
        raise ConfigError(f"--remat {mode!r} is not one of {', '.join(REMAT_MODES)}")
    policy = POLICIES[mode]
    for _, module in model.iter_modules():
        if getattr(type(module).__call__, "rematerialisable", False):
            module.remat_policy = policy
        if isinstance(module, Attention):
            module.logits_budget = None if policy is None else LOGITS_BUDGET
    return model
