#!/usr/bin/env bash
# One command for a lent GPU: CUDA device tests, Stage 2 online vs cached speed and MFU on the ViT-L-14 shapes,
# the data loader on TVL-size JPEGs; a table, raw numbers in gpu_check.json, and a last `gpu_check:` line.
#   bash bench/gpu_check.sh [--json PATH]     # one CUDA GPU, time box 8 minutes
#   bash bench/gpu_check.sh --dry-run         # CPU, tiny shapes: checks this script where no GPU is
# The budget is enforced step by step inside; the outer timeout is the hard stop.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=TERM --kill-after=10 490 python bench/gpu_check.py "$@"
