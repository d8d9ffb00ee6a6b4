#!/usr/bin/env bash
# FluxTalk Stage 2 on all GPUs of this node (NGPUS), or on several nodes (NNODES > 1: run this on every node with
# the same MASTER_ADDR/MASTER_PORT; torchrun's c10d rendezvous does the rest).
#   NGPUS=8 bash scripts/train_tvl_multigpu.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPUS=8 bash scripts/train_tvl_multigpu.sh   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NGPUS=8 bash scripts/train_tvl_multigpu.sh   # on node1
# --batch_size is per GPU; the lr scales with the effective batch (--blr * batch * GPUs / 256).
set -euo pipefail
STAGE1=${STAGE1:-./checkpoints/tvl_enc_vittiny.pth}
DATA=${DATA:-/data/tvl}
OUT=${OUT:-./output_dir/flux_talk_variant_multigpu}
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
NNODES=${NNODES:-1}

if [ "$NNODES" -gt 1 ]; then
    LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d
            --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-fluxtalk}")
else
    LAUNCH=(--standalone)
fi
torchrun "${LAUNCH[@]}" --nproc_per_node="$NGPUS" main_train_stage2.py --stage1_checkpoint "$STAGE1" \
    --batch_size 64 --epochs 100 --num_register_tokens 4 --num_overlapping_tokens 3 \
    --nested_dropout_rate 0.5 --complementary_reg_weight 0.01 --output_dir "$OUT" \
    --datasets_dir "$DATA" --datasets ssvtp hct --num_workers 8 --resume auto "$@"
