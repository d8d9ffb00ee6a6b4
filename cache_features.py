"""Run the frozen Stage 1 once over a split and store its token features for `main_train_stage2.py --feature_cache`.

    torchrun --nproc_per_node=8 cache_features.py --output /data/tvl_cache --splits train val --cache_views 4 \
        --stage1_checkpoint tvl_enc_vittiny.pth --datasets_dir /data/tvl --datasets ssvtp hct

Stage 1 is frozen, so for a fixed input its features never change: Stage 2 then pays the encoder forward (a ViT-L-14
is ~162 GFLOPs per image) and the JPEG decoding once instead of every epoch. Per split, view 0 is the input without
augmentation and views 1..N (`--cache_views N`, train split only) are the training augmentation of epochs 1..N of
data_stage2 (each a function of (seed, view, index)). Layout (see data_stage2.py, "feature cache"):

    DIR/<split>/shard_<k>/{<m>_tokens.npy float16, <m>_global.npy float32, text_padding.npy bool, index.npy}
    DIR/<split>/meta.json     written last: Stage 1 fingerprint, shapes, dtypes, split, sample ids, views, args

Shard k always holds samples [k * shard_size, (k + 1) * shard_size), whatever the number of ranks (rank r does
shards r, r + W, ...), so the cache does not depend on the world size. Each shard is written to a temporary folder
and renamed when complete, and meta.json appears only when every shard exists: a killed run is completed by rerunning
the same command (finished shards are skipped) and a partial cache is never mistaken for a complete one.
Storage: float16 tokens are ~0.5 MB per view per sample for ViT-L-14 vision (257 x 1024), ~0.1 MB text and tactile.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import util.dist as dist
from data_stage2 import (CACHE_FORMAT, DataError, add_data_args, build_dataset, cache_data_flags, resolve_recipe)
from stage1 import Stage1Error, add_stage1_args, build_stage1
from util.checkpoint import atomic_write, fsync_dir
from util.misc import MODALITIES, autocast, in_canonical_order, to_device

# What makes two caches of a split hold the same thing; a rerun into an unfinished cache must agree on all of it.
PLAN_KEYS = ("format", "split", "stage1_fingerprint", "active_modalities", "data_flags", "seed", "views",
             "shard_size", "num_samples", "sample_ids", "precision")


def get_args_parser():
    p = argparse.ArgumentParser("Cache frozen Stage 1 token features", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="cache folder (DIR/<split>/...); pass it to --feature_cache")
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
    args = parser.parse_args(argv)
    if args.cache_views < 0 or args.shard_size < 1 or args.batch_size < 1:
        parser.error("--cache_views must be >= 0, --shard_size and --batch_size >= 1")
    dist.resolve_device_args(parser, args)
    args.active_modality_names = in_canonical_order(args.active_modality_names)
    return args


def write_json_atomic(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def make_plan(args, split, stage1, plain):
    views = 1 + (args.cache_views if split == "train" else 0)
    n = len(plain)
    return {"format": CACHE_FORMAT, "split": split, "stage1_fingerprint": stage1.fingerprint,
            "active_modalities": list(args.active_modality_names), "data_flags": cache_data_flags(args),
            "seed": args.seed, "views": views, "shard_size": args.shard_size, "num_samples": n,
            "num_shards": math.ceil(n / args.shard_size), "sample_ids": plain.sample_ids, "precision": args.precision}


def check_plan(old, plan, path):
    diff = [k for k in PLAN_KEYS if old.get(k) != plan[k]]
    if diff:
        raise DataError(f"{path}: this cache was started with other settings ({', '.join(diff)} differ); "
                        f"rerun with the same flags to complete it, or use another --output")


class ShardKeys(torch.utils.data.Sampler):
    """(view, index) keys of samples [lo, hi), set before each pass. Sampling runs in the main process, so one
    persistent loader per dataset serves every shard and view: workers are forked once (main_train_stage2's
    make_loader says why that matters)."""

    def __init__(self):
        self.view, self.lo, self.hi = 0, 0, 0

    def __iter__(self):
        return iter([(self.view, i) for i in range(self.lo, self.hi)])

    def __len__(self):
        return self.hi - self.lo


def make_loaders(args, device, datasets):
    """{view kind: (DataLoader, ShardKeys)} for the plain and the augmented dataset."""
    loaders = {}
    for name, ds in datasets.items():
        if ds is not None:
            keys = ShardKeys()
            loaders[name] = (DataLoader(ds, batch_size=args.batch_size, sampler=keys, num_workers=args.num_workers,
                                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0),
                             keys)
    return loaders


def cache_split(args, stage1, split, device):
    """Caches one split: this rank's missing shards, then (rank 0, after a barrier) meta.json."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tok, active = stage1.tokenizer, args.active_modality_names
    plain = build_dataset(args, split, tok, active, args.seed, augment=False)
    plan = make_plan(args, split, stage1, plain)
    aug = build_dataset(args, split, tok, active, args.seed, augment=True) if plan["views"] > 1 else None
    out = os.path.join(args.output, split)
    meta_path, plan_path = os.path.join(out, "meta.json"), os.path.join(out, "plan.json")
    for path in (meta_path, plan_path):  # an earlier run (complete, or killed midway) must have planned the same
        if os.path.isfile(path):
            with open(path) as f:
                check_plan(json.load(f), plan, path)
    if os.path.isfile(meta_path):
        if dist.is_main():
            print(f"cache: {out} is complete already ({plan['num_samples']} samples)")
        return
    dist.barrier()
    if dist.is_main():
        os.makedirs(out, exist_ok=True)
        write_json_atomic(plan, plan_path)
    dist.barrier()

    t0, done, skipped = time.time(), 0, 0
    loaders = make_loaders(args, device, {"plain": plain, "aug": aug})
    error = None
    try:
        for k in range(rank, plan["num_shards"], world):
            if os.path.isdir(os.path.join(out, f"shard_{k:05d}")):
                skipped += 1  # renamed into place only once complete
                continue
            write_shard(args, stage1, loaders, plan, out, k, device)
            done += 1
    except DataError as e:
        error = e
    dist.raise_together(error, DataError(f"{out}: another rank failed to write its shards (see its error); "
                                         f"rerun to complete the cache"))
    print(f"cache: rank {rank}: {split}: wrote {done} shard(s), skipped {skipped} finished one(s) "
          f"in {time.time() - t0:.1f}s", flush=True)
    dist.barrier()
    if dist.is_main():
        missing = [k for k in range(plan["num_shards"]) if not os.path.isdir(os.path.join(out, f"shard_{k:05d}"))]
        if missing:
            raise DataError(f"{out}: shards {missing[:5]} are missing after every rank finished; rerun to complete")
        write_json_atomic(dict(plan, arrays=array_specs(os.path.join(out, "shard_00000")),
                               feature_dims=stage1.feature_dims, embed_dim=stage1.embed_dim,
                               captions=plain.captions, args={k: v for k, v in vars(args).items()}), meta_path)
        os.remove(plan_path)
        print(f"cache: {out} complete: {plan['num_samples']} samples x {plan['views']} view(s) in "
              f"{plan['num_shards']} shard(s)", flush=True)
    dist.barrier()


def array_specs(folder):
    """{name: {"shape": per-sample shape, "dtype"}} read from the .npy headers of one shard (no data read)."""
    specs = {}
    for f in sorted(os.listdir(folder)):
        a = np.load(os.path.join(folder, f), mmap_mode="r")
        specs[f[:-4]] = {"shape": list(a.shape[2:] if a.ndim > 1 else ()), "dtype": str(a.dtype)}
    return specs


def write_shard(args, stage1, loaders, plan, out, k, device):
    """Samples [lo, hi) for every view into a temporary folder, fsync'ed, then renamed to shard_<k>."""
    lo, hi = k * plan["shard_size"], min(plan["num_samples"], (k + 1) * plan["shard_size"])
    final, tmp = os.path.join(out, f"shard_{k:05d}"), os.path.join(out, f".tmp_shard_{k:05d}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    os.makedirs(tmp)
    arrays = {}

    def put(name, v, rows, x, dtype):
        # x: (b, ...) on the device -> rows of the (V, n_k, ...) array, created at the first batch
        if name not in arrays:
            arrays[name] = np.lib.format.open_memmap(os.path.join(tmp, name + ".npy"), mode="w+", dtype=dtype,
                                                     shape=(plan["views"], hi - lo) + tuple(x.shape[1:]))
        x = x.to(torch.float16 if dtype == np.float16 else x.dtype).cpu()
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise DataError(f"{final}: {name} of samples {lo}..{hi - 1} is not finite in {np.dtype(dtype).name} "
                            f"(encoder output out of half-precision range?)")
        arrays[name][v, rows] = x.numpy()

    for v in range(plan["views"]):
        loader, keys = loaders["plain" if v == 0 else "aug"]
        keys.view, keys.lo, keys.hi = v, lo, hi  # view v = the training augmentation of epoch v
        for batch in loader:
            rows = (batch.pop("index") - lo).numpy()
            with autocast(device, args.precision):
                feats = stage1(to_device(batch, device))
            for m in args.active_modality_names:
                put(f"{m}_tokens", v, rows, feats["tokens"][m], np.float16)
                put(f"{m}_global", v, rows, feats["global"][m].float(), np.float32)
            if "text" in feats["padding_mask"]:
                put("text_padding", v, rows, feats["padding_mask"]["text"], np.bool_)
    np.save(os.path.join(tmp, "index.npy"), np.arange(lo, hi, dtype=np.int64))
    for a in arrays.values():
        a.flush()
    arrays.clear()
    for f in os.listdir(tmp):
        with open(os.path.join(tmp, f), "rb+") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, final)  # the shard exists only once every byte of it is on disk
    fsync_dir(out)


def run(args):
    _, _, device = dist.init_distributed(args.device)
    stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                          active_modalities=args.active_modality_names).to(device)
    resolve_recipe(args, stage1)  # Stage 1's data recipe, before any dataset is built
    for split in args.splits:
        cache_split(args, stage1, split, device)


def main(argv=None):
    return dist.run_entry_point(run, parse_args(argv), [((Stage1Error, DataError), 2, "error")])


if __name__ == "__main__":
    sys.exit(main())
