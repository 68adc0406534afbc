#!/usr/bin/env bash
# Every benchmark of bench/ on a GPU machine; results are appended to docs/*.md.
#
#   bash bench/run_gpu.sh            # all of them (story, transition, parity, convert, train)
#   bash bench/run_gpu.sh story      # one of: story | story-bank | story-window | story-torch | story-scaling
#                                    #         | story-ref | transition | parity | parity-video | csa | controlnet
#                                    #         | story-control | convert | train
#
# `story` runs the three story modes and the window scaling, then writes the table. The story-* steps run
# one part each (handy under a per-command time limit) and keep their result in out/bench/story/; a
# following `story` reuses them (same settings) instead of running them again.
#
# Needs a GPU build of JAX (jax[cuda12]) and of PyTorch in $PYTHON's environment (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # bench/story.py measures peaks; the other scripts share the GPU with torch

STORY_ARGS=(--preset sdxl --height 768 --width 768 --steps 35 --panels 8 --id-length 4 --characters 1
            --window 4 --results out/bench/story --reuse)

story()         { "$PY" bench/story.py "${STORY_ARGS[@]}" --window-scaling --out docs/bench_story.md; }
story_part()    { "$PY" bench/story.py "${STORY_ARGS[@]}" --modes "$1"; }
story_scaling() { "$PY" bench/story.py "${STORY_ARGS[@]}" --modes "" --window-scaling; }
# A 4-panel story (2 characters) with reference photos (PhotoMaker v1) vs the same story text only, bank mode;
# plus its compile-only FLOPs. Target: photo / text <= 1.10 per story.
story_ref()     { "$PY" bench/story.py --preset sdxl --height 768 --width 768 --steps 35 --panels 4 --id-length 1 \
                      --characters 2 --ref --results out/bench/story-ref --reuse --out docs/bench_story.md; }
# One transition video (video preset, 512x512, 16 frames, 25 steps), ours vs diffusers AnimateDiffPipeline.
transition()    { "$PY" bench/transition.py --preset video --height 512 --width 512 --frames 16 --steps 25 \
                      --out docs/bench_transition.md; }
parity()        { "$PY" bench/parity_full.py --out docs/parity.md; }   # sd15, sdxl and the video U-Net
# CSA write call on full-size SDXL, compile only: FLOPs and temp memory, CSA vs plain (runs on CPU too).
csa()           { "$PY" bench/csa_cost.py --preset sdxl --size 1024 --ids 4 --out docs/bench_csa.md; }
# One SDXL 1024² denoising step with a ControlNet vs plain, lowered only: FLOPs ratio (runs on CPU too).
controlnet()    { "$PY" bench/controlnet_cost.py --preset sdxl --size 1024 --out docs/bench_story.md; }
# A story (bank mode, SDXL 1024², 8 panels) with one ControlNet posing every panel vs plain: the story programs'
# FLOPs per step and, on the GPU, the time.
story_control() { "$PY" bench/story.py --preset sdxl --height 1024 --width 1024 --steps 35 --panels 8 --id-length 4 \
                      --characters 1 --modes "" --control --out docs/bench_story.md; }
parity_video()  { "$PY" bench/parity_full.py --arch video --out docs/parity.md; }
# The SMP train step at real size (video preset, 16 frames, bf16, 256² and 512²): step time, examples/s, MFU.
# TRAIN_ARGS adds options, e.g. TRAIN_ARGS="--batch-per-device 2" or "--remat none" (the fastest step where memory allows).
train()         { "$PY" bench/train.py --preset video --resolutions 256,512 --frames 16 --dtype bfloat16 \
                      ${TRAIN_ARGS:-} --out docs/bench_train.md; }
convert() {
  {
    echo
    echo "## convert memory ($(date '+%Y-%m-%d %H:%M'), $(hostname))"
    echo
    echo "Command: \`python bench/convert_memory.py --dtype float16\`"
    echo
    "$PY" bench/convert_memory.py --dtype float16
  } | tee -a docs/bench_convert_memory.md
}

case "${1:-all}" in
  story) story ;;
  story-bank) story_part bank ;;
  story-window) story_part window ;;
  story-torch) story_part torch ;;
  story-scaling) story_scaling ;;
  story-ref) story_ref ;;
  transition) transition ;;
  parity) parity ;;
  parity-video) parity_video ;;
  csa) csa ;;
  controlnet) controlnet ;;
  story-control) story_control ;;
  convert) convert ;;
  train) train ;;
  all) story; story_ref; story_control; transition; parity; convert; train ;;
  *) echo "usage: bash bench/run_gpu.sh [all|story|story-bank|story-window|story-torch|story-scaling|story-ref|transition|parity|parity-video|csa|controlnet|story-control|convert|train]" >&2
     exit 2 ;;
esac
