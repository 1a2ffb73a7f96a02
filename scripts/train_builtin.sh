#!/usr/bin/env bash
# Train the built-in tiny SDXL-family model from nothing, on CPU (or a GPU if torch sees one):
#   1. the procedural shapes data set (4000 training images at ~64x64, 500 held-out),
#   2. the VAE (sdxl.training.train_vae; also writes init checkpoints holding it),
#   3. the base U-Net + both tiny CLIP text encoders (configs/builtin_base.toml) on that VAE,
#   4. a decoder-only VAE fine-tune, a float16 export, and an evaluation: all 168 prompts, 64x64, measure() of each image (scripts/eval_builtin.py).
# Usage (from the repository root): scripts/train_builtin.sh        outputs: data/, runs/builtin/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

$PY -m sdxl.training.shapes data/shapes64 --n 4000 --resolution 64 --seed 0
$PY -m sdxl.training.shapes data/shapes64_val --n 500 --resolution 64 --seed 1
# VAE in two stages (2000 steps at lr 2e-3, then 2500 more at 1e-3 with a new data seed; cosine decay each).
$PY -m sdxl.training.train_vae runs/builtin/vae --data data/shapes64 --steps 2000 --lr 2e-3 \
    --eval-data data/shapes64_val
$PY -m sdxl.training.train_vae runs/builtin/vae2 --init-from runs/builtin/vae/vae.safetensors --data data/shapes64 \
    --steps 2500 --lr 1e-3 --seed 1 --eval-data data/shapes64_val
$PY -m sdxl train configs/builtin_base.toml
# Third VAE stage, decoder only (the latents the U-Net learnt stay the same): sharper corners.
# (scripts/train_builtin.sh ran it concurrently with the U-Net training; the order does not matter.)
$PY -m sdxl.training.train_vae runs/builtin/vae3 --init-from runs/builtin/vae2/vae.safetensors --decoder-only \
    --data data/shapes64 --steps 2000 --lr 5e-4 --seed 2 --eval-data data/shapes64_val
CKPT=runs/builtin/base/checkpoints/$(cat runs/builtin/base/latest.txt)
$PY scripts/export_builtin.py "$CKPT/model_ema.safetensors" runs/builtin/base_fp16.safetensors \
    --vae runs/builtin/vae3/vae.safetensors
$PY scripts/eval_builtin.py runs/builtin/base_fp16.safetensors --n 168 --out runs/builtin/eval_base
