"""`python -m infer.story`: a story script in, consistent comic panels and pages out.

Example (random-weight tiny model, runs on a laptop CPU in about a minute):
    python -m infer.story --story examples/lighthouse_keepers.txt --out out/story

With a converted checkpoint (see `python -m convert pipeline --help`):
    python -m infer.story --model ./sdxl-jax --story my_story.txt --out out/my_story --style comic-book

Your own characters from photos (PhotoMaker, `python -m convert photomaker`) and LoRA files:
    python -m infer.story --model ./sdxl-jax --photomaker ./photomaker-jax --ref Ana=ana1.jpg,ana2.jpg \
        --lora style.safetensors:0.8 --story my_story.txt --out out/my_story
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STORY_FORMAT = """story file format:
  [Name] description            one line per character (any number), then a blank line or ---
  [Name] walks to the sea #It was cold.
                                one line per panel; [Name] becomes the description; text after the
                                last # is the caption; [NC] = a panel without characters;
                                several names = a multi-character panel; // starts a comment
  Each character's first --id-length panels showing it alone are generated together first
  ("id panels"); every other panel then reuses their stored attention tokens.

photo mode (--photomaker DIR):
  [Ana] a woman img, red coat <ref: ana1.jpg, ana2.jpg>
                                a character with reference photos: its description holds its class word
                                followed by the trigger word "img" (once); the photos come from a <ref: ...>
                                marker on its line (paths relative to the story file) or from
                                --ref Ana=ana1.jpg,ana2.jpg. Every panel naming it takes its identity on the
                                class word after the first --style-strength percent of the steps; characters
                                without photos (no trigger word) and [NC] panels stay text only. PhotoMaker v2
                                also needs --face-model DIR or --face-embeds NAME=FILE.npy."""


def build_parser() -> argparse.ArgumentParser:
    from storydiff_jax import compile_cache
    from storydiff_jax.cli import add_dtype_argument
    from storydiff_jax.pipelines import StoryOptions
    from storydiff_jax.pipelines.components import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m infer.story",
        description="Generate subject-consistent comic panels and pages from a story script with Consistent "
                    "Self-Attention (StoryDiffusion) on an SDXL or SD1.5 model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=STORY_FORMAT + "\n\noutputs: DIR/panels/NN.png, DIR/pages/NN.png, DIR/story.json (settings, seed, "
               "model, timings), DIR/control/NN.png (the maps the ControlNets saw).\nThe folder is written under a "
               "temporary name and renamed when complete.")
    p.add_argument("--story", required=True, help="story script (see format below)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="CONVERTED_DIR", help="folder written by `python -m convert pipeline`")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-weight model of that shape (default: "
                     "tiny-sdxl when no --model is given)")
    StoryOptions.add_arguments(p.add_argument_group("story settings (written to story.json)"))
    ctl = p.add_argument_group("ControlNet: pose and structure per panel (see docs/controlnet.md)")
    ctl.add_argument("--controlnet", action="append", default=[], metavar="DIR[:SCALE]",
                     help="a ControlNet for the model's architecture: a folder from `python -m convert controlnet` "
                          "(or a preset), with its own scale (default: --control-scale); repeatable, their "
                          "residuals are summed")
    ctl.add_argument("--control", action="append", default=[], metavar="N[@K]=FILE",
                     help="control map of panel N (numbered from 0, as panels/NN.png) for ControlNet K (default 0): "
                          "an image (the map itself, or the canny preprocessor's input) or OpenPose keypoint JSON "
                          "(.json, drawn as a skeleton); repeatable. Panels without one run without ControlNet")
    ctl.add_argument("--control-dir", metavar="DIR", help="control files named by panel: 03.png, 3.json, 3@1.png "
                     "(ControlNet 1); a --control for the same panel wins")
    add_dtype_argument(p)
    p.add_argument("--save-bank", metavar="FILE", help="save the characters' banks to FILE (.npz)")
    p.add_argument("--load-bank", metavar="FILE", help="reuse characters from a saved bank instead of generating "
                   "their id panels again (same model, size, steps and sampler)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    compile_cache.add_argument(p)
    return p


def _write_outputs(tmp: str, result, manifest: dict, maps=None) -> None:
    from PIL import Image

    os.makedirs(os.path.join(tmp, "panels"))
    os.makedirs(os.path.join(tmp, "pages"))
    for i, img in enumerate(result.panels):
        img.save(os.path.join(tmp, "panels", f"{i:02d}.png"))
    for i, img in enumerate(result.pages):
        img.save(os.path.join(tmp, "pages", f"{i:02d}.png"))
    if maps is not None and maps.maps:
        # Named like --control-dir's files: the folder can be handed back to a later run.
        os.makedirs(os.path.join(tmp, "control"))
        for key, pixels in sorted(maps.maps.items()):
            Image.fromarray(pixels).save(os.path.join(tmp, "control", _control_name(key) + ".png"))
    with open(os.path.join(tmp, "story.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def _control_name(key: tuple[int, int]) -> str:
    panel, net = key
    return f"{panel:02d}" + (f"@{net}" if net else "")


def parse_controlnet_arg(text: str) -> tuple[str, float | None]:
    """`DIR` or `DIR:SCALE` (a --controlnet value) -> (DIR, SCALE or None)."""
    source, sep, scale = text.rpartition(":")
    if sep:
        try:
            return source, float(scale)
        except ValueError:
            pass                          # a colon inside the path (C:\...), no scale
    return text, None


def control_inputs(args: argparse.Namespace) -> tuple[list[tuple[str, float | None]], dict]:
    """(the --controlnet sources with their scales, {(panel, ControlNet): file} from --control-dir and --control)."""
    from storydiff_jax.pipelines.panel_control import control_dir, parse_control_arg

    nets = [parse_controlnet_arg(text) for text in args.controlnet]
    files = control_dir(args.control_dir) if args.control_dir else {}
    for text in args.control:
        key, path = parse_control_arg(text)
        files[key] = path
    return nets, files


def run(args: argparse.Namespace, log=print, *, text: str | None = None, pipe=None, listener=None) -> str:
    """Generate the story of `args` and write its run folder (`args.out`); returns the folder.

    text: the story itself instead of reading `args.story`; pipe: an already loaded StoryPipeline for
    `args.model`/`args.preset` (the web app loads its model once and runs every request through here);
    listener: called with (phase, done, total) as the run progresses (the web app's progress bar).
    """
    import dataclasses

    import jax.numpy as jnp

    from storydiff_jax.cli import compute_dtype
    from storydiff_jax.errors import ConfigError
    from storydiff_jax.lora import check_lora_files
    from storydiff_jax.outputs import staged_folder
    from storydiff_jax.pipelines import StoryOptions, StoryPipeline
    from storydiff_jax.pipelines.bank import CharacterBank
    from storydiff_jax.pipelines.components import model_arch, unet_config
    from storydiff_jax.pipelines.control import controlnet_config
    from storydiff_jax.pipelines.identity import start_merge_step
    from storydiff_jax.pipelines.panel_control import ControlMaps, union_modes
    from storydiff_jax.pipelines.progress import Progress
    from storydiff_jax.pipelines.references import plan_references
    from storydiff_jax.story import parse_story

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise ConfigError(f"{args.out} already exists; choose another --out or pass --overwrite")
    source = args.model or args.preset or "tiny-sdxl"
    # Every setting checked before anything is read or loaded; unset ones take this model's defaults.
    options = StoryOptions.from_args(args, defaults=StoryOptions.defaults(tiny=source.startswith("tiny-")))
    # <ref: ...> photo paths in a story file are read from the file's folder.
    photo_dir = os.path.dirname(os.path.abspath(args.story)) if text is None else None
    if text is None:
        try:
            with open(args.story, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the story file {args.story}: {e.strerror}") from None
    bank = CharacterBank.load(args.load_bank) if args.load_bank else None
    # Parse first: a malformed story fails before any model is loaded.
    story = parse_story(text, id_length=options.id_length, known_characters=set(bank.characters) if bank else (),
                        photo_dir=photo_dir)
    # Photos, PhotoMaker folder, face inputs and LoRA files checked before any model is loaded, too.
    plan = plan_references(story, options)
    check_lora_files(options.loras)
    if plan is not None and model_arch(source) != "sdxl":
        raise ConfigError(f"photo mode (PhotoMaker) needs an SDXL model; {source} is {model_arch(source).upper()}")
    if not args.model:
        log(f"no --model given: using the random-weight preset {source!r} (shapes only, the pictures are noise); "
            "convert a real checkpoint with `python -m convert pipeline` for real panels")
    if plan is not None:
        with_photos = ", ".join(f"[{name}] {len(paths)} photo{'s' * (len(paths) > 1)}" for name, paths in
                                plan.photos.items()) or "no character has photos"
        log(f"photo mode: PhotoMaker v{plan.version} ({with_photos}); identity fused after step "
            f"{start_merge_step(options.style_strength, options.steps)}")
    if options.id_length is None and story.id_panels:
        log(f"id_length {story.id_length} (each character's first {story.id_length} solo panels are its id panels)")
    if bank is not None:
        for name, description in bank.characters.items():
            if name in story.characters and story.characters[name].description != description:
                raise ConfigError(f"character [{name}] is described differently than in the bank {args.load_bank}; "
                                  "use the same description or drop --load-bank")
    if args.save_bank and options.mode != "bank":   # checked before generating: window mode keeps no bank
        raise ConfigError("--save-bank needs --mode bank (window mode keeps no bank)")
    # Control maps read, drawn and checked against the story and the ControlNets' configs before any model loads.
    nets, control_files = control_inputs(args)
    net_configs = [controlnet_config(net) for net, _ in nets]
    if pipe is None and nets:
        model_unet = unet_config(source)
        for (net, _), config in zip(nets, net_configs):
            config.check_fits(model_unet, what=f"ControlNet {net}")
    maps = ControlMaps.prepare(control_files, panels=len(story.panels), nets=len(nets), height=options.height,
                               width=options.width, preprocessor=options.control_preprocessor,
                               low=options.canny_low, high=options.canny_high)
    union_modes(net_configs, options.control_mode, maps)
    if nets and not maps.maps:
        log("no control images (--control, --control-dir): every panel runs without the ControlNets")
    options = dataclasses.replace(options, id_length=story.id_length)
    dtype = pipe.components.dtype if pipe is not None else compute_dtype(args.dtype)
    t0 = time.perf_counter()
    if pipe is None:
        pipe = StoryPipeline.from_pretrained(source, controlnets=[net for net, _ in nets], dtype=dtype)
    elif len(pipe.controlnets) != len(nets):
        raise ConfigError(f"the loaded pipeline has {len(pipe.controlnets)} ControlNets but {len(nets)} --controlnet "
                          "were given")
    load_s = time.perf_counter() - t0
    scales = [scale for _, scale in nets]
    result = pipe(story, options, bank=bank, controls=maps, controlnet_scales=scales,
                  progress=Progress(bars=not args.quiet, listener=listener), log=log)
    by_panel = {}
    for (panel, net), file in maps.sources.items():
        by_panel.setdefault(panel, {})[net] = file
    manifest = {
        "model": pipe.components.source,
        "arch": pipe.config.arch,
        "dtype": jnp.dtype(dtype).name,
        "devices": [str(d) for d in pipe.mesh.devices.flat],
        "settings": options.to_dict(),
        "seed": options.seed,
        "id_length": story.id_length,
        "id_panels": story.id_panels,
        "loaded_bank": args.load_bank,
        "photo_mode": None if plan is None else {
            "photomaker": os.path.abspath(plan.photomaker), "version": plan.version,
            "photos": result.info["photos"], "start_merge_step": result.info["start_merge_step"]},
        "controlnets": [{"source": net, "scale": options.control_scale if scale is None else scale}
                        for net, scale in nets],
        "panels": [{"file": f"panels/{p.index:02d}.png", "prompt": p.prompt, "caption": p.caption,
                    "characters": list(p.characters), "line": p.line,
                    **({"control": [{"controlnet": net, "source": os.path.abspath(file),
                                     "map": f"control/{_control_name((p.index, net))}.png"}
                                    for net, file in sorted(by_panel[p.index].items())]}
                       if p.index in by_panel else {})} for p in story.panels],
        "pages": [f"pages/{i:02d}.png" for i in range(len(result.pages))],
        "timings": {"load_s": load_s, **result.info["timings"]},
    }
    with staged_folder(out) as tmp:
        _write_outputs(tmp, result, manifest, maps)
        if args.save_bank:
            result.bank.save(args.save_bank)
    log(f"wrote {len(result.panels)} panels to {os.path.join(out, 'panels')} and {len(result.pages)} pages to "
        f"{os.path.join(out, 'pages')}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storydiff_jax import compile_cache
    from storydiff_jax.cli import run_command

    def work():
        compile_cache.enable(args.compile_cache)
        run(args)

    return run_command(work, interrupted="no output folder was written")


if __name__ == "__main__":
    sys.exit(main())
