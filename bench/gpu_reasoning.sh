#!/usr/bin/env bash
# Device check: direct vs hrm vs trm on 9x9 minimal sudoku at equal parameter count and equal wall-clock,
# on one GPU. Budget: data ~1 min (16 processes), 3 runs x 2 min, evaluation: under 8 minutes on one H100.
# Results (table + JSON) go to stdout and $OUT/gpu_reasoning.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" bench/reasoning.py --n 9 --train 1000 --test 200 --minutes 2 --seeds 1 --device cuda --clock wall --threads 16 \
  --set d_model=256 --set n_heads=8 --set batch_size=256 --set lr=1e-3 --set warmup_steps=200 \
  --set eval_batch_size=512 --json "$OUT/gpu_reasoning.json" "$@"
