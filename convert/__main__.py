"""`python -m convert`: PyTorch checkpoints -> storydiff-jax converted folders.

    python -m convert pipeline --src PATH --dst DIR [--dtype float32|bfloat16|float16]

PATH is a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/[, text_encoder_2/],
tokenizer*/) or a single-file SD1.5/SDXL checkpoint (.safetensors with LDM/SGM key names, as civitai
models ship). The architecture is detected from the files.
"""

from __future__ import annotations

import argparse
import os
import sys

# Conversion is host work: keep JAX off any accelerator (it would reserve its memory for nothing).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from storydiff_jax.cli import run_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert PyTorch checkpoints into storydiff-jax folders (configs as JSON, parameters with "
                    "orbax, tokenizer files). Output is written under a temporary name and renamed when "
                    "complete, so an interrupted conversion never leaves a folder that loads.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m convert pipeline --src ./stable-diffusion-xl-base-1.0 --dst ./sdxl-jax\n"
               "  python -m convert pipeline --src ./juggernautXL.safetensors --dst ./jugg-jax --dtype bfloat16\n"
               "then: python -m infer.story --model ./sdxl-jax --story examples/lighthouse_keepers.txt --out out/")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipe = sub.add_parser("pipeline", help="an SD1.5 or SDXL text-to-image model (diffusers folder or single file)",
                          description="Convert an SD1.5 or SDXL model: a diffusers pipeline folder or a single "
                                      ".safetensors checkpoint with LDM/SGM key names.")
    pipe.add_argument("--src", required=True, help="diffusers pipeline folder, or single-file .safetensors checkpoint")
    pipe.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    pipe.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="dtype to store floating parameters in (default: float32)")
    pipe.add_argument("--config", default=None, metavar="DIR",
                      help="single files only: a diffusers-layout folder of config.json files to use instead of the "
                           "shipped SD1.5/SDXL configs (for fine-tunes with another topology)")
    pipe.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    pipe.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def work():
        if args.command == "pipeline":
            from .pipeline import convert_pipeline

            convert_pipeline(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                             config_dir=args.config, progress=not args.no_progress)

    return run_command(work, interrupted="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
