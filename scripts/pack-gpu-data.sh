#!/usr/bin/env bash
# Pack what scripts/train-lite-gpu.sh reads into runs/gpu-data/ (ignored by git; named in the device
# call's carry list): the 400 BSDS500 training photos as they are (JPEG, 29 MB; random crops are
# made on the device), and the centre 256x256 crops of the 24 held-out Kodak images (PNG, 3.5 MB),
# the very pixels that validation scores, so the figures match a validation on the full images.
# Usage: scripts/pack-gpu-data.sh [TRAINDATA]   (default ../shared/traindata; PYTHON: a Python with
# Pillow, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/traindata}"
dest=runs/gpu-data
py="${PYTHON:-.venv/bin/python}"

rm -rf "$dest"
mkdir -p "$dest/bsds500" "$dest/kodak-val"
cp "$src"/bsds500/*.jpg "$dest/bsds500/"
"$py" - "$src/kodak" "$dest/kodak-val" <<'PY'
import sys
from pathlib import Path

from PIL import Image

CROP = 256  # configs/lite.toml's data.val_crop; the centre crop as validation takes it
source, dest = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(source.glob("*.png")):
    with Image.open(path) as im:
        top, left = (im.height - CROP) // 2, (im.width - CROP) // 2
        im.convert("RGB").crop((left, top, left + CROP, top + CROP)).save(dest / path.name, optimize=True)
PY
echo "$(find "$dest/bsds500" -name '*.jpg' | wc -l) training photos, $(find "$dest/kodak-val" -name '*.png' | wc -l) validation crops: $(du -sh "$dest" | cut -f1) in $dest"
