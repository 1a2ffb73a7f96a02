#!/usr/bin/env bash
# Train the built-in tiny SDXL-family model (src/sdxl/data/builtin_*.safetensors) from nothing, on CPU (or a GPU if
# torch sees one). Several hours on 2 CPU cores. Outputs: data/, runs/builtin/, src/sdxl/data/builtin_*.
#   1. the procedural shapes data sets (sdxl.training.shapes): 4,000 + 20,000 + 20,000 training images (the last
#      with its "small" images rendered at 1/3 .. 1/10 of their size), 500 held out;
#   2. the VAE (sdxl.training.train_vae) in stages; the last trains on whole images with an edge loss, and also
#      writes init checkpoints that hold it with a random tiny U-Net and random tiny CLIPs;
#   3. the base U-Net + both tiny CLIP text encoders (configs/builtin_base.toml);
#   4. the refiner U-Net on the low-noise end, with the base's text encoder frozen (configs/builtin_refiner.toml);
#   5. a VAE stage that keeps strong blur (vae7), and both U-Nets fine-tuned onto its latents with the blurrier data
#      (configs/builtin_*_blur.toml), so that a small original_size shows as blur in pixels;
#   6. float16 export into the package, and the evaluation (scripts/eval_builtin.py: all 168 prompts, measured).
# Usage (from the repository root): scripts/train_builtin.sh [BASE_STEPS] [REFINER_STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# One thread: the models are tiny, and on a shared 2-core machine more threads than free cores is many times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
BASE_STEPS=${1:-5000}
REFINER_STEPS=${2:-4000}

$PY -m sdxl.training.shapes data/shapes64 --n 4000 --resolution 64 --seed 0
$PY -m sdxl.training.shapes data/shapes64_20k --n 20000 --resolution 64 --seed 10
$PY -m sdxl.training.shapes data/shapes64_val --n 500 --resolution 64 --seed 1
$PY -m sdxl.training.shapes data/shapes64_blur --n 20000 --resolution 64 --seed 11 --small-fraction 0.3 \
    --small-factor 3,10
# VAE: 2000 steps at lr 2e-3 and 2500 at 1e-3 on 32x32 crops; two decoder-only stages (the second with the edge
# loss); then 2000 steps of the whole VAE on whole images with the edge loss (cosine decay in each stage).
$PY -m sdxl.training.train_vae runs/builtin/vae --data data/shapes64 --steps 2000 --lr 2e-3 --eval-data data/shapes64_val
$PY -m sdxl.training.train_vae runs/builtin/vae2 --init-from runs/builtin/vae/vae.safetensors --data data/shapes64 \
    --steps 2500 --lr 1e-3 --seed 1 --eval-data data/shapes64_val
$PY -m sdxl.training.train_vae runs/builtin/vae3 --init-from runs/builtin/vae2/vae.safetensors --decoder-only \
    --data data/shapes64 --steps 2000 --lr 5e-4 --seed 2 --eval-data data/shapes64_val
$PY -m sdxl.training.train_vae runs/builtin/vae4 --init-from runs/builtin/vae3/vae.safetensors --decoder-only \
    --data data/shapes64 --steps 1500 --lr 5e-4 --seed 3 --edge-weight 1.0
$PY -m sdxl.training.train_vae runs/builtin/vae5 --init-from runs/builtin/vae4/vae.safetensors \
    --data data/shapes64_20k --steps 2000 --batch-size 8 --crop 0 --lr 1e-3 --seed 5 --edge-weight 1.0
# The U-Net trains on vae5's latents; this last decoder-only stage (same latents) ran beside it.
$PY -m sdxl.training.train_vae runs/builtin/vae6 --init-from runs/builtin/vae5/vae.safetensors --decoder-only \
    --data data/shapes64_20k --steps 2500 --batch-size 8 --crop 0 --lr 5e-4 --seed 6 --edge-weight 1.0 \
    --eval-data data/shapes64_val

# Base: U-Net + text encoders on the VAE's latents, 4000 steps at lr 1e-3, then (resumed: same optimizer state and
# data order) at lr 1e-4 up to BASE_STEPS; the annealed weights (model.safetensors) beat the EMA ones (decay 0.999
# still averages in the high-lr steps). The refiner below ran beside it, from the base's step-1000 checkpoint.
$PY -m sdxl train configs/builtin_base.toml --steps 4000
$PY -m sdxl train configs/builtin_base.toml --resume latest --lr 1e-4 --steps "$BASE_STEPS"
BASE=runs/builtin/base/checkpoints/$(cat runs/builtin/base/latest.txt)/model.safetensors
# Refiner: a random tiny refiner U-Net with the base's bigG-architecture text encoder as it was at step 1000.
$PY scripts/export_builtin.py runs/builtin/vae5/init_refiner.safetensors runs/builtin/refiner_init.safetensors \
    --text-encoder-2-from runs/builtin/base/checkpoints/step_0001000/model.safetensors \
    --vae runs/builtin/vae6/vae.safetensors --dtype fp32
$PY -m sdxl train configs/builtin_refiner.toml --steps "$REFINER_STEPS"
REFINER=runs/builtin/refiner/checkpoints/$(cat runs/builtin/refiner/latest.txt)/model_ema.safetensors

# The VAE so far decodes every edge alike (scripts/vae_blur_check.py): the whole VAE trains on, keeping its scaling
# factor, data with much blurrier "small" images; then both U-Nets (and the base's text encoders) fine-tune onto its
# latents: the base 1500 steps at 2e-4 and 500 at 5e-5, the refiner 1000 steps at 2e-4 (EMA).
$PY -m sdxl.training.train_vae runs/builtin/vae7 --init-from runs/builtin/vae6/vae.safetensors --keep-scaling \
    --data data/shapes64_blur --steps 2500 --batch-size 8 --crop 0 --lr 5e-4 --seed 7 --edge-weight 1.0 \
    --eval-data data/shapes64_val
$PY scripts/export_builtin.py "$BASE" runs/builtin/base_vae7.safetensors --vae runs/builtin/vae7/vae.safetensors \
    --dtype fp32
$PY scripts/export_builtin.py "$REFINER" runs/builtin/refiner_vae7.safetensors \
    --vae runs/builtin/vae7/vae.safetensors --dtype fp32
$PY -m sdxl train configs/builtin_base_blur.toml --steps 1500
$PY -m sdxl train configs/builtin_base_blur.toml --resume latest --lr 5e-5 --steps 2000
$PY -m sdxl train configs/builtin_refiner_blur.toml
BASE=runs/builtin/base_blur/checkpoints/$(cat runs/builtin/base_blur/latest.txt)/model.safetensors
REFINER=runs/builtin/refiner_blur/checkpoints/$(cat runs/builtin/refiner_blur/latest.txt)/model_ema.safetensors

$PY scripts/export_builtin.py "$BASE" src/sdxl/data/builtin_base.safetensors --recommend-cfg 3
$PY scripts/export_builtin.py "$REFINER" src/sdxl/data/builtin_refiner.safetensors --recommend-cfg 3
$PY scripts/eval_builtin.py builtin --n 168 --out runs/builtin/eval_base
$PY scripts/eval_builtin.py builtin --refiner builtin-refiner --n 168 --out runs/builtin/eval_refiner
