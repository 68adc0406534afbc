"""Window mode on 8 fake CPU devices equals 1 device, with the panel batch sharded over `data`.

A subprocess (the device count is fixed when JAX starts) runs the window program as the pipeline
places its inputs (`_window_inputs`), on 1 device and on 8, with a ControlNet posing panels 0 and 4 (their
control rows travel with the chunk's panels): the compiled executable takes each chunk's panel axis
sharded over the 8 devices (input shardings and per-device shapes asserted), and the latents agree within
1e-5 * max(1, max |x|) (per-device GEMM shapes differ, so not byte for byte). The rows are also photo mode's
(issue 16): a second, early encoding that the rows of character panels use for step 0 only (the per-row switch
travels with its rows through chunks and shards), the rest never.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import cpu_env

_DEVICES_SCRIPT = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec
sys.path.insert(0, "tests")
from story_samples import STORY, pose
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
from storydiff_jax import consistent as csa
from storydiff_jax.models.unet import FreeU
from storydiff_jax.pipelines import StoryOptions, StoryPipeline
from storydiff_jax.pipelines.components import load_components
from storydiff_jax.pipelines.control import load_controlnet
from storydiff_jax.pipelines.panel_control import ControlMaps
from storydiff_jax.pipelines.story import Conditioning
from storydiff_jax.schedulers import make_sampler
from storydiff_jax.story import parse_story

comps = load_components("tiny-sdxl")
story = parse_story(STORY, id_length=2)
o = StoryOptions(steps=2, height=64, width=64, id_length=2, mode="window", window=3, chunk=8)
n = len(story.panels)
rng = np.random.default_rng(0)
ctx_all = jnp.asarray(rng.standard_normal((2 * n, 77, comps.config.unet.cross_attention_dim)), jnp.float32)
pooled_all = jnp.asarray(rng.standard_normal((2 * n, comps.config.unet.text_embeds_dim)), jnp.float32)

net = load_controlnet("tiny-sdxl")
maps = ControlMaps.prepare({0: pose(0), 4: pose(1)}, panels=n, nets=1, height=64, width=64)
# Photo mode's rows: the cond rows of panels with characters switch from the early encoding after step 0.
early_until = np.full(2 * n, -1, np.int32)
early_until[n:] = np.where([bool(p.characters) for p in story.panels], 0, -1)
rows = Conditioning(ctx_all, pooled_all, maps.panel_control(n, 1), early_context=ctx_all[::-1] * 0.5,
                    early_pooled=pooled_all[::-1], early_until=jnp.asarray(early_until))

out = {}
for d in (1, 8):
    pipe = StoryPipeline(comps, controlnets=[net], devices=jax.devices()[:d])
    sampler = make_sampler("ddim", comps.config.scheduler, o.steps)
    layers = csa.csa_layers(comps.config.unet, (8, 8))
    noise0 = jax.random.normal(jax.random.key(0), (8, 8, 4))
    story_run = dataclasses.replace(pipe.prepare_run(story, o, rows, maps=maps), noise=noise0[None])
    w, chunk, (x0, cond, chars, n_panels) = pipe._window_inputs(story_run)
    run = pipe._window_program(sampler, layers, FreeU(), w, chunk, (64, 64), o.csa())
    args = (pipe._unet_state, x0, cond, jnp.ones((1, 6)), jnp.float32(5.0), chars, n_panels, jax.random.key(1),
            story_run.control)
    compiled = run.lower(*args).compile(FAST)
    x_sharding = compiled.input_shardings[0][1]
    x = compiled(*args)
    out[d] = {"chunk": chunk, "window": w, "spec": str(x_sharding.spec),
              "input_shard": list(x0.addressable_shards[0].data.shape),
              "n_devices": len(x_sharding.device_set), "out_shard": list(x.addressable_shards[0].data.shape),
              "x": np.asarray(x)[0, :n].tolist()}
print("RESULT" + json.dumps(out))
"""


def test_window_eight_devices_match_one():
    root = Path(__file__).resolve().parent.parent
    env = cpu_env(8)
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    one, eight = res["1"], res["8"]
    # One device: a chunk of all 7 panels; eight: rounded up to 8 (one padding panel, in no valid window).
    assert one["chunk"] == 7 and eight["chunk"] == 8 and one["window"] == eight["window"] == 3
    # The compiled program takes the chunk's panel axis sharded over the 8 devices: one panel each.
    assert eight["spec"] == "P(None, 'data')" and eight["n_devices"] == 8
    assert eight["input_shard"] == [1, 1, 8, 8, 4] and eight["out_shard"] == [1, 1, 8, 8, 4]
    assert one["input_shard"] == [1, 7, 8, 8, 4]
    a, b = np.array(one["x"]), np.array(eight["x"])
    err = np.abs(a - b).max()
    print(f"window mode, 8 devices vs 1: max abs latent difference {err:.2e} (scale {np.abs(a).max():.2f})")
    assert err <= 1e-5 * max(1.0, np.abs(a).max())
