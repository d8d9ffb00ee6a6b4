#!/usr/bin/env bash
# FluxTalk Stage 2 on the real TVL data, one GPU. Edit the paths, keep the rest as the reference recipe.
#   bash scripts/train_tvl.sh [extra flags...]
set -euo pipefail
STAGE1=${STAGE1:-./checkpoints/tvl_enc_vittiny.pth}
DATA=${DATA:-/data/tvl}
OUT=${OUT:-./output_dir/flux_talk_variant}

torchrun --nproc_per_node=1 main_train_stage2.py --stage1_checkpoint "$STAGE1" \
    --batch_size 64 --epochs 100 --num_register_tokens 4 --num_overlapping_tokens 3 \
    --output_dir "$OUT" \
    --datasets_dir "$DATA" --datasets ssvtp hct --resume auto "$@"
