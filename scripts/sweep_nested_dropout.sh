#!/usr/bin/env bash
# A sweep of the mission objective's --nested_dropout_rate x --complementary_reg_weight, one run after another on
# one GPU (--objective mission: the default objective orders the tokens with the all-prefix loss instead).
# With FEATURE_CACHE set (see cache_features.py) each run skips the frozen encoders and is much cheaper.
set -euo pipefail
STAGE1=${STAGE1:-./checkpoints/tvl_enc_vittiny.pth}
DATA=${DATA:-/data/tvl}
EXTRA=()
[ -n "${FEATURE_CACHE:-}" ] && EXTRA=(--feature_cache "$FEATURE_CACHE")
for rate in 0.0 0.25 0.5 0.75; do
  for reg in 0.0 0.01 0.1; do
    torchrun --nproc_per_node=1 main_train_stage2.py --stage1_checkpoint "$STAGE1" \
        --datasets_dir "$DATA" --datasets ssvtp hct --batch_size 64 --epochs 100 \
        --objective mission --nested_dropout_rate "$rate" --complementary_reg_weight "$reg" \
        --output_dir "./output_dir/sweep/ndr${rate}_reg${reg}" --resume auto "${EXTRA[@]}" "$@"
  done
done
