#!/usr/bin/env bash
# The CUDA-marked tests on a machine with a GPU, where ../shared does not travel.
#
#   bash scripts/cuda-tests.sh prepare   # here: copy the parity fixtures the tests need (24 MB)
#                                        # into .cuda-fixtures/ (ignored by git)
#   bash scripts/cuda-tests.sh run       # there: run them; the output goes to $OUT/cuda-tests.txt
#                                        # when $OUT is set
#
# With the device tool: run(command="bash scripts/cuda-tests.sh run", carry=[".cuda-fixtures"]).
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures=.cuda-fixtures

case "${1:-}" in
prepare)
    rm -rf "$fixtures"
    for name in sr-tiny inpaint-tiny face-tiny; do
        mkdir -p "$fixtures/parity/$name"
        cp ../shared/reference/parity/"$name"/{case.json,unet.safetensors,autoencoder.safetensors,tensors.safetensors} \
            "$fixtures/parity/$name/"
    done
    du -sh "$fixtures"
    ;;
run)
    log="${OUT:-.}/cuda-tests.txt"
    python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$log"
    RESSHIFT_REFERENCE="$PWD/$fixtures" PYTHONPATH=src python3 -m pytest -q -rs -p no:cacheprovider \
        -m cuda tests/test_cuda.py 2>&1 | tee -a "$log"
    ;;
*)
    echo "usage: bash scripts/cuda-tests.sh prepare|run" >&2
    exit 2
    ;;
esac
