"""`python -m convert`: PyTorch checkpoints -> storydiff-jax converted folders.

    python -m convert pipeline --src PATH --dst DIR [--dtype float32|bfloat16|float16]
    python -m convert video --sd15 PATH --motion-module PATH --image-encoder PATH --ip-adapter PATH
                            [--smp DIR] --dst DIR [--dtype ...]
    python -m convert photomaker --src photomaker-v1.bin|photomaker-v2.bin|FILE.safetensors --dst DIR
    python -m convert controlnet --src DIR|FILE --dst DIR [--config FILE] [--dtype ...]

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
               "  python -m convert video --sd15 ./stable-diffusion-v1-5 --motion-module ./mm_sd_v15_v2.ckpt \\\n"
               "      --image-encoder ./IP-Adapter/models/image_encoder --ip-adapter ./ip-adapter-plus_sd15.bin "
               "--dst ./video-jax\n"
               "  python -m convert photomaker --src ./photomaker-v1.bin --dst ./photomaker-jax\n"
               "  python -m convert controlnet --src ./controlnet-canny-sdxl-1.0 --dst ./canny-sdxl-jax\n"
               "  python -m convert controlnet --src ./control_v11p_sd15_openpose.pth --dst ./pose-sd15-jax\n"
               "then: python -m infer.story --model ./sdxl-jax --story examples/lighthouse_keepers.txt --out out/\n"
               "      python -m infer.transition --model ./video-jax --start a.png --end b.png --out walk.mp4")
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
    video = sub.add_parser(
        "video", help="a transition-video model: SD1.5 + AnimateDiff v2 + OpenCLIP ViT-H-14 + IP-Adapter-Plus [+ SMP]",
        description="Convert the parts of a transition-video model into one folder for `python -m infer.transition`.")
    video.add_argument("--sd15", required=True, metavar="PATH",
                       help="SD1.5 diffusers folder or single .safetensors file (U-Net, VAE, text encoder)")
    video.add_argument("--motion-module", required=True, metavar="PATH",
                       help="AnimateDiff v2 motion modules: mm_sd_v15_v2.ckpt (or .safetensors), or a diffusers "
                            "MotionAdapter folder")
    video.add_argument("--image-encoder", required=True, metavar="PATH",
                       help="OpenCLIP ViT-H-14: an open_clip state dict file, or the HF CLIPVisionModelWithProjection "
                            "folder (IP-Adapter's models/image_encoder)")
    video.add_argument("--ip-adapter", required=True, metavar="PATH",
                       help="IP-Adapter-Plus SD1.5 weights (ip-adapter-plus_sd15.bin or .safetensors)")
    video.add_argument("--smp", metavar="DIR", help="a trained Semantic Motion Predictor (the smp/ folder written by "
                       "`python -m train export`); without it the folder works with plain interpolation")
    video.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    video.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype to store floating parameters in (default: float32)")
    video.add_argument("--config", default=None, metavar="DIR",
                       help="single-file --sd15 only: a diffusers-layout folder of config.json files to use")
    video.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    video.add_argument("--no-progress", action="store_true", help="no progress bar")
    photomaker = sub.add_parser(
        "photomaker", help="a PhotoMaker v1/v2 file (ID encoder + its SDXL LoRA) for reference photos",
        description="Convert a PhotoMaker file: the ID encoder becomes a converted folder, its LoRA is kept as "
                    "lora_weights.safetensors beside it and merged into the SDXL it is used with, at load time.")
    photomaker.add_argument("--src", required=True, metavar="FILE",
                            help="photomaker-v1.bin / photomaker-v2.bin (pickled {id_encoder, lora_weights}, read "
                                 "with weights_only) or a .safetensors with id_encoder. / lora_weights. keys")
    photomaker.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    photomaker.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                            help="dtype to store the ID encoder's floating parameters in (default: float32)")
    photomaker.add_argument("--trigger-word", default="img", metavar="WORD",
                            help="the word that follows a character's class word in prompts (default: img, the "
                                 "word PhotoMaker was trained with)")
    photomaker.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    control = sub.add_parser(
        "controlnet", help="a ControlNet or ControlNet-Union (SD1.5 or SDXL)",
        description="Convert a ControlNet: a diffusers folder (ControlNetModel or xinsir's ControlNetUnionModel), "
                    "an original lllyasviel SD1.5 file (.pth/.safetensors, LDM names, optionally under "
                    "control_model.), or a single file in diffusers names (how SDXL ControlNets ship: full, mid and "
                    "small variants are told apart by their tensor shapes). Control-LoRA files are not supported.")
    control.add_argument("--src", required=True, metavar="DIR|FILE", help="ControlNet folder or file")
    control.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    control.add_argument("--config", default=None, metavar="FILE",
                         help="a diffusers ControlNet config.json (or its folder) describing --src: needed for single "
                              "files whose layout is neither SD1.5 (LDM names) nor SDXL-like (diffusers names)")
    control.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="dtype to store floating parameters in (default: float32)")
    control.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    control.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def work():
        if args.command == "pipeline":
            from .pipeline import convert_pipeline

            convert_pipeline(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                             config_dir=args.config, progress=not args.no_progress)
        elif args.command == "video":
            from .video import convert_video

            convert_video(sd15=args.sd15, motion_module=args.motion_module, image_encoder=args.image_encoder,
                          ip_adapter=args.ip_adapter, smp=args.smp, dst=args.dst, dtype=args.dtype,
                          overwrite=args.overwrite, config_dir=args.config, progress=not args.no_progress)
        elif args.command == "photomaker":
            from .photomaker import convert_photomaker

            convert_photomaker(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                               trigger_word=args.trigger_word)
        elif args.command == "controlnet":
            from .controlnet import convert_controlnet

            convert_controlnet(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, config=args.config,
                               progress=not args.no_progress)

    return run_command(work, interrupted="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
