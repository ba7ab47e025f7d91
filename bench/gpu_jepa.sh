#!/usr/bin/env bash
# JEPA on one GPU (sized for < 8 minutes on an H100): throughput of the job vs a bare loop at the
# rtx3090 preset, then short quality runs (tiny preset at 32x32 with both recipes, rtx3090 at 64x64) with the probe
# table. Run from the repository root: bash bench/gpu_jepa.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "== throughput, rtx3090 preset, batch 256 (bf16 autocast)"
timeout 150 "$PY" bench/jepa_throughput.py --preset rtx3090 --batch 256 --steps 30 --rounds 2 --threads 4
echo "== quality, tiny preset, 1 min per seed, 2 seeds, batch 256: default recipe, then the EMA recipe"
timeout 210 "$PY" bench/jepa_quality.py --preset tiny --minutes 1 --seeds 2 --batch 256 --lr 2e-3 \
  --train-size 20000 --eval-size 4000 --threads 4
timeout 210 "$PY" bench/jepa_quality.py --preset tiny --minutes 1 --seeds 2 --batch 256 --lr 2e-3 \
  --train-size 20000 --eval-size 4000 --threads 4 \
  --arch '{"regularizer": "ema", "target_centre": true, "loss": "l2", "masking": "random", "mask_ratio": 0.5}'
echo "== quality, rtx3090 preset (64x64), 1.5 min, 1 seed"
timeout 180 "$PY" bench/jepa_quality.py --preset rtx3090 --minutes 1.5 --seeds 1 --batch 256 \
  --train-size 20000 --eval-size 4000 --threads 4
