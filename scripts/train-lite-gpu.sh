#!/usr/bin/env bash
# Train `lite` on one CUDA GPU inside one device call (docs/lite.md, "Training on a GPU").
#
# The recipe is configs/lite.toml (its degradation, schedule shape and diffusion) with the GPU's
# overrides below: a network twice as wide (96 channels: 9.8 M parameters, 19.8 MB as fp16, the
# most that fits the bundle's 20 MB), batches of 64, the L1 loss, bf16 autocast, EMA 0.999, and as
# many steps as fit the call: a calibration run of 80 steps measures the time per step, and the
# step count that fits the rest of BUDGET is fixed in $RUN/steps (a resumed run keeps it).
# The run is stopped with SIGTERM when the budget is spent: it saves a checkpoint at that step, and
# the next call on the same (warm) machine resumes it with --resume. What comes back in $OUT:
# train.log, log.jsonl, config.toml, registry.toml and the EMA weights as fp16, split into parts
# under 16 MiB (lite.safetensors.part-*; join with cat): the final weights when the run finished,
# else those of its last checkpoint. A checkpoint of this size (~160 MB) cannot travel back, so a
# run that a fresh machine must continue starts again from the returned weights (--init).
#
# Usage: scripts/train-lite-gpu.sh [KEY=VALUE overrides]   (after scripts/pack-gpu-data.sh)
# Environment: BUDGET seconds for this call's training (default 480), STEPS (skip calibration),
# DATA (default runs/gpu-data), RUN (default runs/lite-gpu), OUT (default $RUN/out), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
budget="${BUDGET:-480}"
data="${DATA:-runs/gpu-data}"
run="${RUN:-runs/lite-gpu}"
out="${OUT:-$run/out}"
py="${PYTHON:-python3}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ ! -d "$data/bsds500" ] || [ ! -d "$data/kodak-val" ]; then
    echo "error: $data holds no packed photos; run scripts/pack-gpu-data.sh and carry $data" >&2
    exit 2
fi
mkdir -p "$out" "$run"
log="$out/train.log"
workers=$(($(nproc) > 3 ? $(nproc) - 2 : 1))
recipe=(
    "data.train=$data/bsds500" "data.val=$data/kodak-val" "data.workers=$workers"
    model.unet.model_channels=96 model.unet.swin_embed_dim=96
    train.batch_size=64 train.loss=l1 train.precision=bf16 train.weights_dtype=fp16
    optim.lr=5e-4 optim.warmup_steps=500 optim.ema_decay=0.999
    train.log_every=100 train.val_every=1000 train.checkpoint_every=1000 train.keep_checkpoints=2
)
train() { "$py" -m resshift_cli train configs/lite.toml "${recipe[@]}" "$@"; }

{
    echo "== $(date -u +%FT%TZ) budget ${budget}s, $workers data workers"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$log"

if [ -n "${STEPS:-}" ]; then
    echo "$STEPS" > "$run/steps"
elif [ ! -f "$run/steps" ]; then
    # Seconds per step from steps 20 to 80 of a throw-away run (data workers warm by then).
    rm -rf "$run/calibration"
    train output_dir="$run/calibration" train.steps=80 train.log_every=20 train.val_every=0 \
        train.checkpoint_every=80 "$@" 2>&1 | tee -a "$log"
    rate=$("$py" - "$run/calibration/log.jsonl" <<'PY'
import datetime, json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
times = {r["step"]: datetime.datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records}
print((times[80] - times[20]).total_seconds() / 60)
PY
    ) || { echo "error: the calibration run failed" | tee -a "$log"; exit 1; }
    # The rest of the budget, less a minute for start-up, validations and checkpoints.
    left=$((budget - (SECONDS - started) - 60))
    steps=$("$py" -c "print(max(100, int($left / $rate / 100) * 100))")
    echo "calibration: $rate s/step; $steps steps fit the remaining ${left}s" | tee -a "$log"
    echo "$steps" > "$run/steps"
fi
steps=$(cat "$run/steps")

resume=()
[ -d "$run/checkpoints" ] && resume=(--resume)
left=$((budget - (SECONDS - started)))
if [ "$left" -lt 30 ]; then
    echo "error: no time left for training (${left}s); raise BUDGET" | tee -a "$log"
    exit 1
fi
timeout --preserve-status -s TERM -k 60 "$left" \
    "$py" -m resshift_cli train configs/lite.toml "${recipe[@]}" output_dir="$run" \
    train.steps="$steps" "${resume[@]}" "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
case $rc in
    0) echo "finished $steps steps" | tee -a "$log" ;;
    143) echo "stopped at the budget; run this script again on the same machine to resume" | tee -a "$log" ;;
    *) echo "error: training failed (exit $rc)" | tee -a "$log" ;;
esac

# The EMA weights as fp16: the final file, else the last checkpoint's; and a registry entry for them.
"$py" - "$run" "$out" <<'PY' 2>&1 | tee -a "$log"
import hashlib
import sys
from pathlib import Path

import torch

from resshift_cli.checkpoints import compact_state_dict, read_state_dict, save_safetensors
from resshift_cli.training.config import dump_toml, load_train_config
from resshift_cli.training.trainer import latest_checkpoint

run, out = Path(sys.argv[1]), Path(sys.argv[2])
config = load_train_config(run / "config.toml")
final = run / f"{config.name}.safetensors"
checkpoint = latest_checkpoint(run)
if final.is_file():
    source, what = final, "final weights"
elif checkpoint is not None:
    source, what = checkpoint / "ema.safetensors", f"EMA weights of {checkpoint.name}"
else:
    sys.exit("no weights to return")
weights = out / f"{config.name}.safetensors"
save_safetensors(compact_state_dict(read_state_dict(source), torch.float16), weights)
diffusion = dict(config.model.diffusion)
entry = {"description": f"{what} of scripts/train-lite-gpu.sh", "task": "sr", "scale": diffusion["sf"]}
entry |= {"steps": diffusion["steps"], "path": weights.name, "unet": config.model.unet, "diffusion": diffusion}
(out / "registry.toml").write_text(dump_toml({"models": {f"{config.name}-gpu": entry}}), encoding="utf-8")
digest = hashlib.sha256(weights.read_bytes()).hexdigest()
print(f"returned the {what}: {weights.name}, {weights.stat().st_size} bytes, sha256 {digest}")
PY
cp "$run/log.jsonl" "$run/config.toml" "$out/" 2>/dev/null
if [ -f "$out/lite.safetensors" ]; then
    split -b 15000000 -d "$out/lite.safetensors" "$out/lite.safetensors.part-"
    rm "$out/lite.safetensors"
fi
ls -l "$out" | tee -a "$log"
exit "$rc"
