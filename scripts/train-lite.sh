#!/usr/bin/env bash
# The recipe of the bundled `lite` weights: four runs of `resshift train configs/lite.toml`, each
# starting from the previous run's EMA weights. configs/lite.toml holds the shipped model and the
# last runs' degradation; the first two runs used kappa 0.2 and a blurrier degradation, and the
# last the L1 loss, given here as overrides. About 2 h 30 min on 2 idle CPU cores (73, 40, 15 and
# 22 minutes). The result, runs/lite-4/lite.safetensors, is src/resshift_cli/bundled/lite.safetensors
# to float rounding (the thread count and the CPU change the order of sums). Extra arguments go to
# every run (e.g. train.device=cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
train=(".venv/bin/resshift" train configs/lite.toml)

first=(
    model.diffusion.kappa=0.2
    "data.realesrgan.blur_sigma=[0.2, 1.2]"
    "data.realesrgan.resize_probs=[0.2, 0.7, 0.1]"
    "data.realesrgan.resize_range=[0.6, 1.5]"
    data.realesrgan.second_order_prob=0.25
    data.realesrgan.final_sinc_prob=0.15
    "data.realesrgan.noise_range=[1.0, 30.0]"
    "data.realesrgan.poisson_scale_range=[0.05, 3.0]"
)
fine=(optim.lr=2e-4 optim.warmup_steps=100)

"${train[@]}" "${first[@]}" output_dir=runs/lite-1 "$@"
"${train[@]}" "${first[@]}" "${fine[@]}" --init runs/lite-1/lite.safetensors output_dir=runs/lite-2 \
    train.steps=2500 "$@"
"${train[@]}" "${fine[@]}" --init runs/lite-2/lite.safetensors output_dir=runs/lite-3 train.steps=1000 "$@"
"${train[@]}" train.loss=l1 optim.lr=1e-4 optim.warmup_steps=100 --init runs/lite-3/lite.safetensors \
    output_dir=runs/lite-4 train.steps=1500 "$@"
