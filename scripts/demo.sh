#!/usr/bin/env bash
# The embedded demo: synthetic TVL-format data + a tiny Stage 1, CPU, about a minute.
set -euo pipefail
python main_train_stage2.py --demo "$@"
