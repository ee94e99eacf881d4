#!/usr/bin/env bash
# GPU check, under 5 minutes on one CUDA device: the CUDA tests, DM's speed with and without bf16 autocast, and a
# 1,000-iteration Fashion-MNIST ipc-10 DANCE distillation (factor 2, stored as uint8) with a one-model evaluation.
# Needs only the core install (torch, torchvision, numpy, safetensors, tqdm, scikit-learn): no Flower, no Avalanche.
#   bash simulations/gpu_check.sh [OUT_DIR]        (default runs/gpu_check)
# Every figure it prints is labelled "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python}
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
$py -c "import torch; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "== GPU: CUDA tests"
$py -m pytest -q --noconftest -m cuda tests/test_distill.py -p no:cacheprovider

echo "== GPU: DM speed, float32 and bf16 autocast"
$py simulations/bench_dm_speed.py --device cuda --iterations 20 --rounds 1 | sed 's/^/GPU float32 /'
$py simulations/bench_dm_speed.py --device cuda --iterations 20 --rounds 1 --amp | sed 's/^/GPU bf16 /'
$py simulations/bench_dm_speed.py --device cuda --iterations 10 --rounds 1 --methods dm idm dance | sed 's/^/GPU family /'

echo "== GPU: DANCE, Fashion-MNIST, ipc 10, factor 2, uint8, 1000 iterations, width 128, one evaluation model"
start=$(date +%s)
$py -m fedcl.cli distill --dataset fashion-mnist --method dance --ipc 10 --iterations 1000 --factor 2 \
    --storage uint8 --device cuda --seed 0 --eval-models 1 --eval-epochs 300 --out "$out/dance-fmnist-ipc10" \
    | sed 's/^/GPU /'
echo "GPU distillation + evaluation wall time: $(( $(date +%s) - start )) s"
