#!/usr/bin/env bash
# The CPU recipe of the bundled `lite` weights: five runs of `resshift train configs/lite.toml`, each
# from the previous run's EMA weights with a fresh schedule. configs/lite.toml holds the model and the
# last run's degradation; the earlier runs differ by the overrides below: kappa 0.2 and a blurrier
# degradation (runs 1-2), Pillow's JPEG and an aligned first resize (runs 1-4), fewer and narrower
# first resizes (runs 3-4), lr 2e-4 (runs 2-3), the L1 loss at lr 1e-4 (runs 4-5). About 3 h on 2
# cores (73, 40, 15, 22 and 25 minutes). The shipped weights (runs/lite-5/lite.safetensors) were
# made with the UNet's earlier initialisation (PyTorch's defaults; now upstream's zeroed output
# layers), so a run from scratch today starts elsewhere and ends with other weights (docs/lite.md).
# Extra arguments go to every run (e.g. train.device=cuda); scripts/train-lite-gpu.sh is the recipe
# for one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
train=(".venv/bin/resshift" train configs/lite.toml)

clean=(data.realesrgan.jpeg=pillow data.realesrgan.resize_by_factor=false)
first=(
    "${clean[@]}"
    model.diffusion.kappa=0.2
    "data.realesrgan.blur_sigma=[0.2, 1.2]"
    "data.realesrgan.resize_probs=[0.2, 0.7, 0.1]"
    "data.realesrgan.resize_range=[0.6, 1.5]"
    data.realesrgan.second_order_prob=0.25
    data.realesrgan.final_sinc_prob=0.15
    "data.realesrgan.noise_range=[1.0, 30.0]"
    "data.realesrgan.poisson_scale_range=[0.05, 3.0]"
)
fitted=("${clean[@]}" "data.realesrgan.resize_probs=[0.1, 0.3, 0.6]" "data.realesrgan.resize_range=[0.8, 1.2]")
fine=(optim.lr=2e-4 optim.warmup_steps=100)
l1=(train.loss=l1 optim.lr=1e-4 optim.warmup_steps=100 train.steps=1500)

"${train[@]}" "${first[@]}" output_dir=runs/lite-1 "$@"
"${train[@]}" "${first[@]}" "${fine[@]}" --init runs/lite-1/lite.safetensors output_dir=runs/lite-2 \
    train.steps=2500 "$@"
"${train[@]}" "${fitted[@]}" "${fine[@]}" --init runs/lite-2/lite.safetensors output_dir=runs/lite-3 \
    train.steps=1000 "$@"
"${train[@]}" "${fitted[@]}" "${l1[@]}" --init runs/lite-3/lite.safetensors output_dir=runs/lite-4 "$@"
"${train[@]}" "${l1[@]}" --init runs/lite-4/lite.safetensors output_dir=runs/lite-5 "$@"
