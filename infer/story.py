"""`python -m infer.story`: a story script in, consistent comic panels and pages out.

Example (random-weight tiny model, runs on a laptop CPU in about a minute):
    python -m infer.story --story examples/lighthouse_keepers.txt --out out/story

With a converted checkpoint (see `python -m convert pipeline --help`):
    python -m infer.story --model ./sdxl-jax --story my_story.txt --out out/my_story --style comic-book
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
  ("id panels"); every other panel then reuses their stored attention tokens."""


def build_parser() -> argparse.ArgumentParser:
    from storydiff_jax.pipelines.components import PRESETS
    from storydiff_jax.story import style_names
    from storydiff_jax.story.comic import LAYOUTS

    p = argparse.ArgumentParser(
        prog="python -m infer.story",
        description="Generate subject-consistent comic panels and pages from a story script with Consistent "
                    "Self-Attention (StoryDiffusion) on an SDXL or SD1.5 model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=STORY_FORMAT + "\n\noutputs: DIR/panels/NN.png, DIR/pages/NN.png, DIR/story.json (settings, seed, "
               "model, timings).\nThe folder is written under a temporary name and renamed when complete.")
    p.add_argument("--story", required=True, help="story script (see format below)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="CONVERTED_DIR", help="folder written by `python -m convert pipeline`")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random-weight model of that shape (default: "
                     "tiny-sdxl when no --model is given)")
    p.add_argument("--style", default="none", help=f"style template: {', '.join(style_names())} (default: none)")
    p.add_argument("--negative", default="", help="extra negative prompt (added to the style's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 35; 8 on tiny presets)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5.0)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 32 (default: 768; "
                   "128 on tiny presets)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 32 (default: 768; "
                   "128 on tiny presets)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same panels (default: 0)")
    p.add_argument("--id-length", type=int, default=None, help="id panels per character (default: 4, or the "
                   "most the story allows)")
    p.add_argument("--sa32", type=float, default=0.5, help="token sampling rate at 1/32 resolution (default 0.5)")
    p.add_argument("--sa64", type=float, default=0.5, help="token sampling rate at other resolutions (default 0.5)")
    p.add_argument("--mode", choices=["bank", "window"], default="bank",
                   help="bank: official id-panel write/read (default); window: the paper's sliding-window batch "
                        "mode for long stories (memory independent of the number of panels)")
    p.add_argument("--window", type=int, default=4, help="panels per window in --mode window (default: 4)")
    p.add_argument("--chunk", type=int, default=None, help="--mode window: panels denoised together, the last "
                   "window-1 carried to the next chunk (default: all panels)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="four-panel", help="comic page layout")
    p.add_argument("--font", default=None, help="TrueType font for captions (default: Pillow's built-in font)")
    p.add_argument("--sampler", choices=["ddim", "euler"], default="ddim", help="sampler (default: ddim, as the "
                   "official StoryDiffusion)")
    p.add_argument("--no-freeu", action="store_true",
                   help="turn FreeU off (on by default: s1 0.6 s2 0.4 b1 1.1 b2 1.2)")
    p.add_argument("--read-batch", type=int, default=None, help="panels denoised together in the read phase "
                   "(default: 4; rounded up to a multiple of the device count)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--bank-offload", action="store_true", help="keep character banks in host memory and stream each "
                   "step's tokens to the accelerator (long stories / large images on small GPUs)")
    p.add_argument("--save-bank", metavar="FILE", help="save the characters' banks to FILE (.npz)")
    p.add_argument("--load-bank", metavar="FILE", help="reuse characters from a saved bank instead of generating "
                   "their id panels again (same model, size, steps and sampler)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _write_outputs(tmp: str, result, manifest: dict) -> None:
    os.makedirs(os.path.join(tmp, "panels"))
    os.makedirs(os.path.join(tmp, "pages"))
    for i, img in enumerate(result.panels):
        img.save(os.path.join(tmp, "panels", f"{i:02d}.png"))
    for i, img in enumerate(result.pages):
        img.save(os.path.join(tmp, "pages", f"{i:02d}.png"))
    with open(os.path.join(tmp, "story.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def model_defaults(source: str) -> dict:
    """The defaults that depend on the model (also shown by the web app): tiny presets get small, fast ones."""
    tiny = source.startswith("tiny-")
    return {"steps": 8 if tiny else 35, "height": 128 if tiny else 768, "width": 128 if tiny else 768}


def _default(value, default):
    """An option left unset takes the model's default; an explicit 0 stays 0 (and is refused by the checks)."""
    return default if value is None else value


def run(args: argparse.Namespace, log=print, *, text: str | None = None, pipe=None) -> str:
    """Generate the story of `args` and write its run folder (`args.out`); returns the folder.

    text: the story itself instead of reading `args.story`; pipe: an already loaded StoryPipeline for
    `args.model`/`args.preset` (the web app loads its model once and runs every request through here).
    """
    import jax
    import jax.numpy as jnp

    from storydiff_jax.errors import ConfigError
    from storydiff_jax.outputs import staged_folder
    from storydiff_jax.pipelines import StoryOptions, StoryPipeline
    from storydiff_jax.pipelines.bank import CharacterBank
    from storydiff_jax.story import parse_story

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise ConfigError(f"{args.out} already exists; choose another --out or pass --overwrite")
    if text is None:
        try:
            with open(args.story, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the story file {args.story}: {e.strerror}") from None
    source = args.model or args.preset or "tiny-sdxl"
    bank = CharacterBank.load(args.load_bank) if args.load_bank else None
    # Parse first: a malformed story fails before any model is loaded.
    story = parse_story(text, id_length=args.id_length, known_characters=set(bank.characters) if bank else ())
    if not args.model:
        log(f"no --model given: using the random-weight preset {source!r} (shapes only, the pictures are noise); "
            "convert a real checkpoint with `python -m convert pipeline` for real panels")
    if args.id_length is None and story.id_panels:
        log(f"id_length {story.id_length} (each character's first {story.id_length} solo panels are its id panels)")
    if bank is not None:
        for name, description in bank.characters.items():
            if name in story.characters and story.characters[name].description != description:
                raise ConfigError(f"character [{name}] is described differently than in the bank {args.load_bank}; "
                                  "use the same description or drop --load-bank")
    if args.save_bank and args.mode != "bank":   # checked before generating: window mode keeps no bank
        raise ConfigError("--save-bank needs --mode bank (window mode keeps no bank)")
    on_accel = jax.default_backend() != "cpu"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[
        args.dtype or ("bfloat16" if on_accel else "float32")]
    if pipe is not None:
        dtype = pipe.components.dtype
    defaults = model_defaults(source)
    options = StoryOptions(
        style=args.style, negative=args.negative, steps=_default(args.steps, defaults["steps"]),
        guidance=args.guidance, height=_default(args.height, defaults["height"]),
        width=_default(args.width, defaults["width"]), seed=args.seed,
        id_length=story.id_length, sa32=args.sa32, sa64=args.sa64, mode=args.mode, window=args.window,
        chunk=getattr(args, "chunk", None), layout=args.layout, sampler=args.sampler, freeu=not args.no_freeu,
        read_batch=args.read_batch,
        font=args.font, bank_offload=args.bank_offload)
    t0 = time.perf_counter()
    if pipe is None:
        pipe = StoryPipeline.from_pretrained(source, dtype=dtype)
    load_s = time.perf_counter() - t0
    from storydiff_jax.story import apply_style

    apply_style(options.style, "", "")  # unknown style: fail before generating anything
    result = pipe(story, options, bank=bank, progress=not args.quiet)
    manifest = {
        "model": pipe.components.source,
        "arch": pipe.config.arch,
        "dtype": jnp.dtype(dtype).name,
        "devices": [str(d) for d in pipe.mesh.devices.flat],
        "settings": {k: v for k, v in vars(options).items()},
        "seed": options.seed,
        "id_length": story.id_length,
        "id_panels": story.id_panels,
        "loaded_bank": args.load_bank,
        "panels": [{"file": f"panels/{p.index:02d}.png", "prompt": p.prompt, "caption": p.caption,
                    "characters": list(p.characters), "line": p.line} for p in story.panels],
        "pages": [f"pages/{i:02d}.png" for i in range(len(result.pages))],
        "timings": {"load_s": load_s, **result.info["timings"]},
    }
    with staged_folder(out) as tmp:
        _write_outputs(tmp, result, manifest)
        if args.save_bank:
            result.bank.save(args.save_bank)
    log(f"wrote {len(result.panels)} panels to {os.path.join(out, 'panels')} and {len(result.pages)} pages to "
        f"{os.path.join(out, 'pages')}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storydiff_jax.cli import run_command

    return run_command(lambda: run(args), interrupted="no output folder was written")


if __name__ == "__main__":
    sys.exit(main())
