#!/usr/bin/env bash
# FluxTalk Stage 2 on all GPUs of this node (NGPUS), or on several nodes (NNODES > 1: run this on every node with
# the same MASTER_ADDR/MASTER_PORT; torchrun's c10d rendezvous does the rest).
#   NGPUS=8 bash scripts/train_tvl_multigpu.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPUS=8 bash scripts/train_tvl_multigpu.sh   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NGPUS=8 bash scripts/train_tvl_multigpu.sh   # on node1
# --batch_size is per GPU; the lr scales with the effective batch (--blr * batch * GPUs / 256).
# Extra arguments are appended to the training flags (a later flag wins); keep --output_dir in OUT.
#
# Preemption: SIGTERM or SIGUSR1 to this script is passed on to torchrun as SIGTERM, which every torchrun version
# forwards to its workers; each worker finishes its step, writes $OUT/checkpoint.pth and exits 75. torchrun itself
# then exits 1 (it re-raises the signal as an error and drops the workers' codes), so this script exits 75 instead
# when it was signalled and the checkpoint was written after the signal: a scheduler's requeue-on-75 resubmits the
# same command, which resumes (--resume auto). For a SIGUSR1 sent to torchrun directly, PET_SIGNALS_TO_HANDLE adds
# it to the signals torchrun forwards (by default torchrun dies of it and leaves its workers running, in their own
# sessions). STOP_TIMEOUT: how long torchrun waits for the workers to save before it SIGKILLs them. Both are
# environment variables rather than torchrun flags so that a torchrun without these options still starts.
# LAUNCHER (e.g. srun) goes in front of torchrun, and STOP_SIGNAL (default TERM) is the signal passed on to it: srun
# answers a SIGTERM by killing its tasks (SIGKILL) but passes a SIGUSR1 on to every process of its step, so
# scripts/slurm_train.sbatch sets LAUNCHER=srun STOP_SIGNAL=USR1.
set -uo pipefail
STAGE1=${STAGE1:-./checkpoints/tvl_enc_vittiny.pth}
DATA=${DATA:-/data/tvl}
OUT=${OUT:-./output_dir/flux_talk_variant_multigpu}
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
NNODES=${NNODES:-1}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export PET_SHUTDOWN_TIMEOUT=${STOP_TIMEOUT:-100}
STOP_SIGNAL=${STOP_SIGNAL:-TERM}

if [ "$NNODES" -gt 1 ]; then
    # c10d assigns the ranks (torchrun ignores --node_rank with it): several nodes may share one command line
    LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
            --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-fluxtalk}")
else
    LAUNCH=(--standalone)
fi
marker=$(mktemp)
pid=""
trap 'rm -f "$marker"' EXIT
stopped=""
stop() {  # forward once: a second signal would interrupt torchrun while it waits for the workers to save
    if [ -z "$stopped" ]; then
        stopped=$1
        touch "$marker"
        [ -n "$pid" ] && kill -s "$STOP_SIGNAL" "$pid" 2>/dev/null
    fi
}
trap 'stop TERM' TERM
trap 'stop USR1' USR1

${LAUNCHER:-} torchrun "${LAUNCH[@]}" --nproc_per_node="$NGPUS" main_train_stage2.py --stage1_checkpoint "$STAGE1" \
    --batch_size 64 --epochs 100 --num_register_tokens 4 --num_overlapping_tokens 3 \
    --output_dir "$OUT" \
    --datasets_dir "$DATA" --datasets ssvtp hct --num_workers 8 --resume auto "$@" &
pid=$!
[ -n "$stopped" ] && kill -s "$STOP_SIGNAL" "$pid" 2>/dev/null  # signalled before torchrun started

rc=0
wait "$pid" || rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do  # wait was interrupted by a trapped signal
    rc=0
    wait "$pid" || rc=$?
done
if [ -n "$stopped" ] && [ "$rc" -ne 0 ] && [ "$OUT/checkpoint.pth" -nt "$marker" ]; then
    echo "train_tvl_multigpu.sh: stopped by SIG$stopped, $OUT/checkpoint.pth written; exit 75 (resubmit to resume)" >&2
    exit 75
fi
exit "$rc"
