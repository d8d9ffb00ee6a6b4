"""The feature cache: Stage 1 token features computed once, so Stage 2 trains without the frozen encoders.

Stage 1 is frozen, so for a fixed input its features never change: training from the cache pays the encoder
forward (a ViT-L-14 is ~162 GFLOPs per image) and the JPEG decoding once instead of every epoch. The writer is
`cache_split` (run over the splits by cache_features.py, the command line); the reader is `build_cached_dataset`
(what main_train_stage2.py --feature_cache uses).

Format ("fluxtalk-feature-cache-1"). Per split, with V views (view 0 = the input without augmentation; view
v >= 1 = data_stage2's training augmentation of epoch v, a function of (seed, v, index); train split only,
`--cache_views V-1`):

    DIR/<split>/shard_<k>/<m>_tokens.npy   float16 (V, n_k, N_m, C_m)  Stage 1 token features of modality m
                          <m>_global.npy   float32 (V, n_k, E)         Stage 1 global embeddings
                          text_padding.npy bool    (V, n_k, N_text)    True = padded position (text only)
                          index.npy        int64   (n_k,)              dataset index of each row
    DIR/<split>/meta.json  written last: format, split, Stage 1 fingerprint, active modalities, data flags,
                           seed, views, shard_size, num_samples, num_shards, sample ids, precision, array
                           shapes and dtypes, feature dims, captions, the creation args

Shard k always holds samples [k * shard_size, (k + 1) * shard_size), whatever the number of ranks (rank r writes
shards r, r + W, ...), so the cache does not depend on the world size. Each shard is written to a temporary folder
(.tmp_shard_<k>) and renamed when complete, and meta.json appears only when every shard exists (plan.json holds
the settings meanwhile): a killed run is completed by rerunning the same command (finished shards are skipped),
and a partial cache is never mistaken for a complete one. The reader refuses a cache made with another Stage 1,
without an active modality, or of another split or captions (other data flags or sample ids).

Which view an epoch reads: CachedFeatureDataset. Storage: float16 tokens are ~0.5 MB per view per sample for
ViT-L-14 vision (257 x 1024), ~0.1 MB text and tactile.
"""
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import util.dist as dist
from data_stage2 import (RECIPE_DEFAULTS, SUBSETS, DataError, build_dataset, epoch_and_index, item_seed, pop_bad,
                         raise_bad_files, recipe_of)
from util.checkpoint import fsync_dir, write_json
from util.misc import autocast, to_device


# ----------------------------------------------------------------------------- reader

CACHE_FORMAT = "fluxtalk-feature-cache-1"
# Flags that change which samples a split holds or what its captions say, so what the cache holds.
CACHE_DATA_FLAGS = ("datasets", "tactile_background") + tuple(RECIPE_DEFAULTS)
CACHE_VIEW_STREAM = 3  # item_seed stream of the per-epoch view choice (0..2 are the modalities' augmentation)
CACHE_VIEW2_STREAM = 4  # and of the second view's (two_views)


def cache_data_flags(args, split):
    flags = {**{k: getattr(args, k, None) for k in CACHE_DATA_FLAGS}, **recipe_of(args)}
    flags["eval_captions"] = args.eval_captions if split != "train" else None  # val/test captions only
    if flags["subtract_background"] is None:
        flags["tactile_background"] = None  # unused without subtraction
    flags["datasets"] = [s for s in SUBSETS if s in args.datasets]  # the order of the flag does not matter
    return flags


def load_cache_meta(root, split):
    path = os.path.join(root, split, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"--feature_cache {root}: no {split}/meta.json: the {split} split was never cached or its "
                        f"cache_features.py run did not finish (rerun it with the same flags to complete it)")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:  # meta.json is written atomically, so this is damage from outside
        raise DataError(f"--feature_cache {root}: {split}/meta.json is unreadable ({e}); rebuild the cache") from None
    if not isinstance(meta, dict):
        raise DataError(f"--feature_cache {root}: {split}/meta.json is not a cache index; rebuild the cache")
    return meta


def check_cache_meta(meta, root, split, fingerprint, active_modalities, args, sample_ids=None):
    """DataError (one line naming the cache and what differs) unless the cache fits this run."""
    where = f"--feature_cache {root} ({split})"
    if meta.get("format") != CACHE_FORMAT or meta.get("split") != split:
        raise DataError(f"{where}: meta.json is not a {CACHE_FORMAT} cache of split '{split}' "
                        f"(format {meta.get('format')!r}, split {meta.get('split')!r})")
    if meta["stage1_fingerprint"] != fingerprint:
        raise DataError(f"{where}: made with another Stage 1 (fingerprint {meta['stage1_fingerprint'][:12]} != "
                        f"{fingerprint[:12]} of --stage1_checkpoint/--clip_pretrained); rebuild it with cache_features.py")
    missing = [m for m in active_modalities if m not in meta["active_modalities"]]
    if missing:
        raise DataError(f"{where}: holds modalities {meta['active_modalities']}, not {missing} of "
                        f"--active_modality_names; rebuild it with those modalities")
    flags = cache_data_flags(args, split)
    diff = [f"--{k} {meta['data_flags'].get(k)!r} (cache) vs {v!r}" for k, v in flags.items()
            if meta["data_flags"].get(k) != v]
    if diff:
        raise DataError(f"{where}: another split or captions: {'; '.join(diff)}")
    if sample_ids is not None and sample_ids != meta["sample_ids"]:
        cached = meta["sample_ids"]
        first = next((i for i, (a, b) in enumerate(zip(cached, sample_ids)) if a != b), min(len(cached), len(sample_ids)))
        raise DataError(f"{where}: another split: {len(cached)} cached samples vs {len(sample_ids)} under "
                        f"--datasets_dir, first difference at index {first} "
                        f"({cached[first] if first < len(cached) else None!r} vs "
                        f"{sample_ids[first] if first < len(sample_ids) else None!r})")


class CachedFeatureDataset(Dataset):
    """A cached split: item i -> {"tokens": {m: float16 (N_m, C_m)}, "padding_mask": {"text": bool (N,)},
    "global": {m: float32 (E,)}, "index": i}, read from memory-mapped shards (no decoding, no encoder).

    Views: without augmentation (val/test, --no_augment) always view 0. With augmentation, epoch e reads
    view 1 + item_seed(seed, e, i) % (V - 1) of sample i: one of the augmented views, never the plain one
    (online augmented training never sees an un-augmented input either); a cache without augmented views
    gives view 0. two_views (the view contrastive term; needs V - 1 >= 2): the item also holds, under "view2", the
    tokens / padding_mask / global of another augmented view of the same sample, drawn among the remaining ones."""

    def __init__(self, root, split, meta, active_modalities, seed, augment, two_views=False):
        self.dir = os.path.join(root, split)
        self.active = tuple(active_modalities)
        self.seed, self.augment, self.two_views = seed, augment, two_views
        self.num_views, self.shard_size = meta["views"], meta["shard_size"]
        self.sample_ids = meta["sample_ids"]
        self.captions = meta.get("captions") if "text" in self.active else None
        self._shards = {}  # shard k -> {array name: np.memmap}, opened lazily in each process

    def __getstate__(self):  # DataLoader workers open their own maps (a pickled memmap would copy the data)
        return {**self.__dict__, "_shards": {}}

    def __len__(self):
        return len(self.sample_ids)

    def view(self, index, epoch=0):
        if not self.augment or self.num_views == 1:
            return 0
        return 1 + item_seed(self.seed, epoch, index, CACHE_VIEW_STREAM) % (self.num_views - 1)

    def second_view(self, index, epoch=0):
        """An augmented view other than view(index, epoch), uniform among the V - 2 others."""
        shift = 1 + item_seed(self.seed, epoch, index, CACHE_VIEW2_STREAM) % (self.num_views - 2)
        return 1 + (self.view(index, epoch) - 1 + shift) % (self.num_views - 1)

    def _shard(self, k):
        if k not in self._shards:
            folder = os.path.join(self.dir, f"shard_{k:05d}")
            names = [f"{m}_{kind}" for m in self.active for kind in ("tokens", "global")]
            names += ["text_padding"] if "text" in self.active else []
            self._shards[k] = {n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r") for n in names}
        return self._shards[k]

    def __getitem__(self, key):
        epoch, index = epoch_and_index(key)
        out = self.read(index, self.view(index, epoch))
        if self.two_views:
            out["view2"] = self.read(index, self.second_view(index, epoch))
        out["index"] = index
        return out

    def read(self, index, v):
        """View v of sample `index`: {"tokens", "global"[, "padding_mask"]}."""
        k, j = divmod(index, self.shard_size)
        a = self._shard(k)
        out = {"tokens": {m: torch.from_numpy(np.array(a[f"{m}_tokens"][v, j])) for m in self.active},
               "global": {m: torch.from_numpy(np.array(a[f"{m}_global"][v, j])) for m in self.active}}
        if "text" in self.active:
            out["padding_mask"] = {"text": torch.from_numpy(np.array(a["text_padding"][v, j]))}
        return out


def build_cached_dataset(args, split, stage1, seed):
    """The CachedFeatureDataset of `split` under args.feature_cache, refused (DataError) when it was made with
    another Stage 1, without an active modality, or from another split. With --datasets_dir the cached sample
    ids must equal the ones the flags give (listing files only, no decoding); without it that check is skipped."""
    root, active = args.feature_cache, args.active_modality_names
    meta = load_cache_meta(root, split)
    ids = None
    if args.datasets_dir:
        ids = build_dataset(args, split, stage1.tokenizer, active, seed, augment=False).sample_ids
    check_cache_meta(meta, root, split, stage1.fingerprint, active, args, ids)
    augment = split == "train" and not args.no_augment
    two_views = split == "train" and getattr(args, "complementary_view_weight", 0) > 0
    ds = CachedFeatureDataset(root, split, meta, active, seed, augment, two_views)
    if two_views and ds.num_views - 1 < 2:
        raise DataError(f"--complementary_view_weight {args.complementary_view_weight} needs two augmented views per "
                        f"sample: --feature_cache {root} ({split}) has {ds.num_views - 1} (rebuild it with "
                        f"cache_features.py --cache_views 2 or more)")
    if augment and ds.num_views == 1:
        print(f"data: {root} ({split}) has no augmented views (cache_features.py --cache_views 0): training "
              f"without augmentation")
    print(f"data: {split}: {len(ds)} cached samples from {root} ({ds.num_views} view(s), augment={augment})")
    return ds


# ----------------------------------------------------------------------------- writer

# What makes two caches of a split hold the same thing; a rerun into an unfinished cache must agree on all of it.
PLAN_KEYS = ("format", "split", "stage1_fingerprint", "active_modalities", "data_flags", "seed", "views",
             "shard_size", "num_samples", "sample_ids", "precision")


def make_plan(args, split, stage1, plain):
    views = 1 + (args.cache_views if split == "train" else 0)
    n = len(plain)
    return {"format": CACHE_FORMAT, "split": split, "stage1_fingerprint": stage1.fingerprint,
            "active_modalities": list(args.active_modality_names), "data_flags": cache_data_flags(args, split),
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
            loader = DataLoader(ds, batch_size=args.batch_size, sampler=keys, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
            loaders[name] = (dist.tracked_loader(loader), keys)
    return loaders


def cache_split(args, stage1, split, device):
    """Caches one split: this rank's missing shards, then (rank 0, after a barrier) meta.json."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tok, active = stage1.tokenizer, args.active_modality_names
    # Bad files are collected, not fatal at the first: one report of all of them, then exit 2 (nothing bad is cached).
    plain = build_dataset(args, split, tok, active, args.seed, augment=False, tolerate_bad=True)
    raise_bad_files(plain.bad_files, f"{split} (nothing cached)")  # missing files change the sample list: stop now
    plan = make_plan(args, split, stage1, plain)
    aug = build_dataset(args, split, tok, active, args.seed, augment=True, tolerate_bad=True) \
        if plan["views"] > 1 else None
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
        write_json(plan, plan_path, indent=1)
    dist.barrier()

    t0, done, skipped = time.time(), 0, 0
    loaders = make_loaders(args, device, {"plain": plain, "aug": aug})
    error, bad = None, []
    try:
        for k in range(rank, plan["num_shards"], world):
            if os.path.isdir(os.path.join(out, f"shard_{k:05d}")):
                skipped += 1  # renamed into place only once complete
                continue
            done += write_shard(args, stage1, loaders, plan, out, k, device, bad)
    except DataError as e:
        error = e
    dist.raise_together(error, DataError(f"{out}: another rank failed to write its shards (see its error); "
                                         f"rerun to complete the cache"))
    raise_bad_files(bad, f"{split} (their shards were not written; rerun once they are fixed)")
    print(f"cache: rank {rank}: {split}: wrote {done} shard(s), skipped {skipped} finished one(s) "
          f"in {time.time() - t0:.1f}s", flush=True)
    dist.barrier()
    if dist.is_main():
        missing = [k for k in range(plan["num_shards"]) if not os.path.isdir(os.path.join(out, f"shard_{k:05d}"))]
        if missing:
            raise DataError(f"{out}: shards {missing[:5]} are missing after every rank finished; rerun to complete")
        write_json(dict(plan, arrays=array_specs(os.path.join(out, "shard_00000")),
                        feature_dims=stage1.feature_dims, embed_dim=stage1.embed_dim,
                        captions=plain.captions, args={k: v for k, v in vars(args).items()}), meta_path, indent=1)
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


def write_shard(args, stage1, loaders, plan, out, k, device, bad):
    """Samples [lo, hi) for every view into a temporary folder, fsync'ed, then renamed to shard_<k>. A shard holding a
    bad sample is read to the end (its bad samples appended to `bad`) but never renamed. Returns 1 if written."""
    lo, hi = k * plan["shard_size"], min(plan["num_samples"], (k + 1) * plan["shard_size"])
    final, tmp = os.path.join(out, f"shard_{k:05d}"), os.path.join(out, f".tmp_shard_{k:05d}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    os.makedirs(tmp)
    arrays, n_bad = {}, len(bad)

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
            found = pop_bad(batch)
            if found:  # the shard will not be written: skip the encoder, keep reading for more bad samples
                bad += found
                continue
            rows = (batch.pop("index") - lo).numpy()
            with autocast(device, args.precision):
                feats = stage1(to_device(batch, device))
            for m in args.active_modality_names:
                put(f"{m}_tokens", v, rows, feats["tokens"][m], np.float16)
                put(f"{m}_global", v, rows, feats["global"][m].float(), np.float32)
            if "text" in feats["padding_mask"]:
                put("text_padding", v, rows, feats["padding_mask"]["text"], np.bool_)
    if len(bad) > n_bad:
        shutil.rmtree(tmp)
        return 0
    np.save(os.path.join(tmp, "index.npy"), np.arange(lo, hi, dtype=np.int64))
    for a in arrays.values():
        a.flush()
    arrays.clear()
    for f in os.listdir(tmp):
        with open(os.path.join(tmp, f), "rb+") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, final)  # the shard exists only once every byte of it is on disk
    fsync_dir(out)
    return 1
