#!/usr/bin/env bash
# One-GPU benchmark of the whole path on 4-digit captchas, synthesis included:
# generate with the project's generate job (embedded Redis + SQLite, a cpu worker
# process per core), train on one CUDA GPU with the GPU path (bf16 autocast,
# channels_last, pinned memory, DataLoader workers, cudnn.benchmark), and print
# training samples/s and the wall time at which val seq_acc first reached 0.99.
#
#   bench/gpu.sh [--images 100000] [--epochs 10] [--batch-size 128] [--compile]
#
# Needs the repository with its .venv (pip install -e '.[worker,dev]'); no services.
# Meant to finish in under 5 minutes on one current GPU with 8+ cores; it stops at
# 290 s whatever happens. Exits 2 with "no CUDA device" where torch sees no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "bench/gpu.sh: no .venv/bin/python here ($(pwd)); create the venv first" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is false); nothing measured" >&2
  exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
exec timeout --signal=INT --kill-after=10 290 "$PY" bench/gpu.py --device cuda "$@"
