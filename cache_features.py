"""Run the frozen Stage 1 once over the splits and store its token features for `main_train_stage2.py --feature_cache`.

    torchrun --nproc_per_node=8 cache_features.py --output /data/tvl_cache --splits train val --cache_views 4 \
        --stage1_checkpoint tvl_enc_vittiny.pth --datasets_dir /data/tvl --datasets ssvtp hct

    python cache_features.py --verify --output /data/tvl_cache   # read every shard against its checksums (exit 0/2)

The cache's format, resumption (rerun the same command to complete a killed run), damage checks and what training
checks against it: feature_cache.py. One run per --output folder at a time (a second one exits 2 naming the holder).
"""
import argparse
import shlex
import sys

import util.dist as dist
from data_stage2 import DataError, add_data_args, resolve_recipe
from feature_cache import cache_split, verify_cache
from stage1 import Stage1Error, add_stage1_args, build_stage1
from util.checkpoint import CheckpointError, folder_lock
from util.misc import MODALITIES, in_canonical_order


def get_args_parser():
    p = argparse.ArgumentParser("Cache frozen Stage 1 token features", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="cache folder (DIR/<split>/...); pass it to --feature_cache")
    p.add_argument("--verify", action="store_true",
                   help="only read every shard of every split under --output against its checksums and list the "
                        "damaged ones (exit 2; 0 when all match); nothing else is needed or written")
    p.add_argument("--repair", action="store_true",
                   help="verify the shards of an existing cache first (every byte read) and rewrite the damaged ones")
    p.add_argument("--skip_space_check", action="store_true",
                   help="write even when the filesystem has less free space than the cache still needs (a full "
                        "disk then ends the run with an error naming the file; rerun to complete)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val", "test"])
    p.add_argument("--cache_views", default=0, type=int,
                   help="augmented views of the train split besides the plain view 0 (val/test: view 0 only)")
    p.add_argument("--shard_size", default=1024, type=int, help="samples per shard (the unit of resumption)")
    p.add_argument("--batch_size", default=64, type=int, help="encoder batch size per rank")
    p.add_argument("--active_modality_names", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    p.add_argument("--seed", default=0, type=int, help="the training seed whose augmentations the views reproduce")
    dist.add_device_args(p)  # --precision: the encoders' precision
    add_data_args(p)
    add_stage1_args(p)
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # stored in meta.json: the command that rebuilds a damaged shard (with --repair)
    args.command = shlex.join(["python", "cache_features.py", *[a for a in argv if a != "--repair"]])
    if args.cache_views < 0 or args.shard_size < 1 or args.batch_size < 1:
        parser.error("--cache_views must be >= 0, --shard_size and --batch_size >= 1")
    dist.resolve_device_args(parser, args)
    args.active_modality_names = in_canonical_order(args.active_modality_names)
    return args


def run(args):
    if args.verify:
        return verify_cache(args.output)
    _, _, device = dist.init_distributed(args.device)
    with folder_lock(args.output, "--output"):  # before anything is written: one writer per cache
        build_and_cache(args, device)


def build_and_cache(args, device):
    stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                          active_modalities=args.active_modality_names).to(device)
    resolve_recipe(args, stage1)  # Stage 1's data recipe, before any dataset is built
    for split in args.splits:
        cache_split(args, stage1, split, device)


def main(argv=None):
    return dist.run_entry_point(run, parse_args(argv), [((Stage1Error, DataError, CheckpointError), 2, "error")])


if __name__ == "__main__":
    sys.exit(main())
