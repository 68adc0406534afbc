"""Compiled cost of a ControlNet on the full-size U-Net: FLOPs of one denoising step, no weights, no execution.

    python bench/controlnet_cost.py [--preset sdxl] [--size 1024] [--compile] [--out docs/bench_story.md]

One classifier-free-guided denoising step (U-Net on [uncond, cond], bf16, abstract weights: nothing is
allocated) is lowered (`jax.jit(...).lower(...)`) four ways: plain; with one full ControlNet (its residuals
fed to the U-Net, the ControlNet on both CFG rows as diffusers runs it); with the ControlNet in guess mode
(conditional row only); with a ControlNet-Union given one image. Reported: `cost_analysis()["flops"]` of
each lowered program and the ratio to the plain step. Target (issue 18): <= 1.45x for one full ControlNet
at SDXL 1024² (its down + mid half is ~40% of a U-Net). `--compile` also compiles each program and reports
its temporary memory (minutes per program on CPU).

The ControlNet is called directly here (`models.controlnet`), not through `pipelines.control`'s windowed
`lax.cond`, so that the count is the step's arithmetic while the ControlNet is active.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from storydiff_jax.models.controlnet import PRESETS as CONTROLNET_PRESETS  # noqa: E402
from storydiff_jax.models.controlnet import controlnet_class  # noqa: E402
from storydiff_jax.models.unet import PRESETS, UNet2DConditionModel  # noqa: E402

VARIANTS = ("plain", "controlnet", "guess mode", "union")


def step_calls(preset: str = "sdxl", size: int = 1024, dtype=jnp.bfloat16) -> dict:
    """{variant: (fn, args)}: one CFG denoising step of each variant on abstract weights."""
    cfg = PRESETS[preset]
    spec = jax.ShapeDtypeStruct
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    unet_graph, unet_state = nnx.split(unet)
    nets = {}
    for name, key in (("controlnet", preset), ("union", f"{preset}-union")):
        if key in CONTROLNET_PRESETS:
            ncfg = CONTROLNET_PRESETS[key]
            nets[name] = nnx.split(nnx.eval_shape(lambda c=ncfg: controlnet_class(c)(c, dtype=dtype,
                                                                                       rngs=nnx.Rngs(0))))
    side = size // 8
    x = spec((1, side, side, cfg.in_channels), dtype)
    ctx = spec((2, 77, cfg.cross_attention_dim), dtype)
    image = spec((1, size, size, 3), dtype)
    added = {"text_embeds": spec((2, cfg.text_embeds_dim), dtype), "time_ids": spec((1, 6), jnp.float32)} \
        if cfg.is_sdxl else {}

    def cond_half(added):
        return {k: (v[1:] if v.shape[0] == 2 else v) for k, v in added.items()}

    def step(unet_state, x, ctx, added, control=None):
        xin = jnp.concatenate([x, x])
        out = nnx.merge(unet_graph, unet_state)(xin, jnp.float32(500), ctx, control=control, **added)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2)
        return uncond + 5.0 * (cond - uncond)

    def plain(unet_state, x, ctx, added, image):
        return step(unet_state, x, ctx, added)

    def controlled(name, guess_mode):
        graph, _ = nets[name]

        def fn(unet_state, net_state, x, ctx, added, image):
            net = nnx.merge(graph, net_state)
            if guess_mode:       # the conditional row only; zeros for the unconditional one
                res = net(x, jnp.float32(500), ctx[1:], image, guess_mode=True, **cond_half(added))
                res = jax.tree.map(lambda r: jnp.concatenate([jnp.zeros_like(r), r]), res)
            else:
                xin, both = jnp.concatenate([x, x]), jnp.concatenate([image, image])
                extra = (([both], [3]) if name == "union" else (both,))
                res = net(xin, jnp.float32(500), ctx, *extra, **added)
            return step(unet_state, x, ctx, added, res)
        return fn

    calls = {"plain": (plain, (unet_state, x, ctx, added, image))}
    for variant, name, guess in (("controlnet", "controlnet", False), ("guess mode", "controlnet", True),
                                 ("union", "union", False)):
        if name in nets:
            calls[variant] = (controlled(name, guess), (unet_state, nets[name][1], x, ctx, added, image))
    return calls


def measure(preset: str = "sdxl", size: int = 1024, compile_: bool = False) -> dict:
    out = {"preset": preset, "size": size, "flops": {}, "temp": {}, "lower_s": {}}
    for variant, (fn, args) in step_calls(preset, size).items():
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        out["flops"][variant] = lowered.cost_analysis()["flops"]
        out["lower_s"][variant] = time.perf_counter() - t0
        if compile_:
            out["temp"][variant] = lowered.compile().memory_analysis().temp_size_in_bytes
        print(f"{variant}: {out['flops'][variant] / 1e12:.2f} TFLOP ({out['lower_s'][variant]:.0f} s)", flush=True)
    return out


def report(r: dict, command: str) -> str:
    plain = r["flops"]["plain"]
    lines = [
        f"## ControlNet cost per denoising step ({datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()})", "",
        f"Command: `{command}`  ",
        f"Backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; {r['preset']} "
        f"U-Net, bf16 abstract weights, {r['size']}², one CFG step (U-Net batch 2), lowered only.", "",
        "| step | TFLOP (lowered) | ratio to plain |" + (" temp GiB |" if r["temp"] else ""),
        "| --- | ---: | ---: |" + (" ---: |" if r["temp"] else "")]
    names = {"plain": "plain U-Net", "controlnet": "+ one full ControlNet (both CFG rows; target ≤ 1.45)",
             "guess mode": "+ one ControlNet, guess mode (conditional row only)",
             "union": "+ ControlNet-Union, one image (both CFG rows)"}
    for variant, flops in r["flops"].items():
        temp = f" {r['temp'][variant] / 2 ** 30:.2f} |" if r["temp"] else ""
        lines.append(f"| {names[variant]} | {flops / 1e12:.2f} | {flops / plain:.3f} |{temp}")
    lines += ["", "TFLOP: `jax.jit(step).lower(...).cost_analysis()['flops']`, XLA's count of the program's "
              "arithmetic before backend passes (device-independent). The ControlNet is called directly, as "
              "while it is active; outside its start/end window `pipelines.control` skips it (`lax.cond`), so "
              "those steps cost the plain step.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sdxl", choices=sorted(k for k in PRESETS if k in CONTROLNET_PRESETS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--compile", action="store_true", help="also compile each program: temporary memory")
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args(argv)
    r = measure(args.preset, args.size, args.compile)
    text = report(r, "python bench/controlnet_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
