"""Window mode (the paper's Algorithm 1, in chunks) at the program level: flat memory and the sharded mesh.

* The compiled window program's temporary buffers (XLA's own memory analysis) for 8 and 32 panels in
  chunks of 8: inputs and outputs (latents, text contexts) grow with the panel count by nature and are
  not temporaries; the chunk loop keeps everything else flat.
Numerics of Algorithm 1 itself: tests/test_csa_window.py; 8 devices = 1: tests/test_csa_devices.py.
"""


import jax
import jax.numpy as jnp
import pytest

from storydiff_jax import consistent as csa
from storydiff_jax.models.unet import FreeU
from storydiff_jax.pipelines import StoryPipeline
from storydiff_jax.pipelines.story import Conditioning
from storydiff_jax.schedulers import make_sampler

# The tiny programs are not worth LLVM's expensive passes (compilation dominates on CPU).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def pipe():
    return StoryPipeline.from_pretrained("tiny-sdxl")


def _temp_bytes(pipe, panels, window=3, chunk=8, steps=2, side=64):
    cfg = pipe.config
    sampler = make_sampler("ddim", cfg.scheduler, steps)
    h = w = side // cfg.vae.downscale
    layer_tokens = csa.csa_layers(cfg.unet, (h, w))
    run = pipe._window_program(sampler, layer_tokens, FreeU(), window, chunk, (side, side), csa.CSASettings())
    chunks = panels // chunk
    spec = jax.ShapeDtypeStruct
    args = (pipe._unet_state,
            spec((chunks, chunk, h, w, 4), jnp.float32),
            Conditioning(spec((chunks, 2 * chunk, 77, cfg.unet.cross_attention_dim), jnp.float32),
                         spec((chunks, 2 * chunk, cfg.unet.text_embeds_dim), jnp.float32)),
            spec((1, 6), jnp.float32), spec((), jnp.float32),
            spec((chunks, chunk, 2), jnp.bool_), spec((), jnp.int32), jax.random.key(0))
    return run.lower(*args).compile(FAST).memory_analysis().temp_size_in_bytes


def test_window_memory_is_flat_in_panels(pipe):
    small, large = _temp_bytes(pipe, 8), _temp_bytes(pipe, 32)
    print(f"window temp bytes (window 3, chunk 8): 8 panels {small}, 32 panels {large}")
    # 4x the panels: temporaries may not grow beyond a small constant (loop bookkeeping).
    assert large <= small * 1.05 + 64 * 1024, (small, large)
