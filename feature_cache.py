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
                          checksums.json   {file name: sha256} of the files above, written with the shard
    DIR/<split>/meta.json  written last: format, split, Stage 1 fingerprint, active modalities, data flags,
                           seed, views, shard_size, num_samples, num_shards, sample ids, precision, array
                           shapes and dtypes, feature dims, captions, the creation args and command line

Shard k always holds samples [k * shard_size, (k + 1) * shard_size), whatever the number of ranks (rank r writes
shards r, r + W, ...), so the cache does not depend on the world size. Each shard is written to a temporary folder
(.tmp_shard_<k>) and renamed when complete, and meta.json appears only when every shard exists (plan.json holds
the settings meanwhile): a killed run is completed by rerunning the same command (finished shards are skipped),
and a partial cache is never mistaken for a complete one. The reader refuses a cache made with another Stage 1,
without an active modality, or of another split or captions (other data flags or sample ids).

Damage. Opening a cache checks every shard's files against meta.json (existence, .npy header shape and dtype, file
size: no data read) and refuses in one line naming the shard and the command that rebuilds it. The checksums are read
by `cache_features.py --verify` only (every byte of every shard); `--repair` rewrites the shards that fail it (and
rerunning the same command rewrites any deleted shard). Caches written before checksums.json existed still open;
--verify says which shards it could only check by size. Disk space: the writer checks the free space against
what remains to write before it starts, and reserves each file's blocks (posix_fallocate) before writing through
its memory map, so a full disk is an ordinary error naming the file (a memory-mapped write to a full filesystem
would be a SIGBUS); the shard being written is removed, the finished ones are kept.

Which view an epoch reads: CachedFeatureDataset. Storage: float16 tokens are ~0.5 MB per view per sample for
ViT-L-14 vision (257 x 1024), ~0.1 MB text and tactile.
"""
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

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


CHECKSUMS = "checksums.json"  # in each shard: {file name: sha256 hex digest}, written with the shard


def shard_name(k):
    return f"shard_{k:05d}"


def reader_arrays(active):
    """Names of the arrays a reader of modalities `active` opens in each shard."""
    names = [f"{m}_{kind}" for m in active for kind in ("tokens", "global")]
    return names + (["text_padding"] if "text" in active else [])


def npy_problem(path, shape, dtype):
    """None when `path` is an .npy file of exactly `shape` and `dtype` and of the size they give (header and file size
    only, no data read); else what is wrong, in a few words."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, _, got_dtype = read(f)
            expected = f.tell() + math.prod(shape) * np.dtype(dtype).itemsize
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"not a readable .npy file ({e})"
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype):
        return f"holds {got_dtype} {tuple(got_shape)}, expected {np.dtype(dtype)} {tuple(shape)}"
    if size != expected:
        return f"{size} bytes, expected {expected} ({'truncated' if size < expected else 'too long'})"
    return None


def cached_arrays(split_dir, meta):
    """{array name: per-sample spec} of a split: meta.json's "arrays", or shard 0's headers for a cache index written
    without them (study/'s caches)."""
    shard0 = os.path.join(split_dir, shard_name(0))
    return meta.get("arrays") or (array_specs(shard0) if os.path.isdir(shard0) else {})


def shard_problems(folder, meta, k, names):
    """["file: problem"] of shard k's arrays `names` (None: all; cheap: npy_problem), ["missing"] when the folder is."""
    if not os.path.isdir(folder):
        return ["missing"]
    n = min(meta["shard_size"], meta["num_samples"] - k * meta["shard_size"])
    arrays = cached_arrays(os.path.dirname(folder), meta)
    problems = []
    for name in names or arrays:
        spec = arrays.get(name)
        if spec is None:
            problems.append(f"{name}.npy: missing")
            continue
        shape = (n,) if name == "index" else (meta["views"], n, *spec["shape"])
        problem = npy_problem(os.path.join(folder, name + ".npy"), shape, spec["dtype"])
        problems += [f"{name}.npy: {problem}"] if problem else []
    return problems


def rebuild_hint(meta):
    """How to rebuild damaged shards of a cache: its own command line (meta.json) with --repair."""
    if meta.get("command"):
        return f"rebuild them with: {meta['command']} --repair"
    return "rebuild them by rerunning the cache_features.py command that made the cache with --repair"


def check_shards(root, split, meta, names):
    """DataError (one line naming the first damaged shard and the rebuild command) unless every shard of the split
    holds arrays `names` of the shapes, dtypes and sizes meta.json says."""
    bad = [(k, p) for k in range(meta["num_shards"])
           if (p := shard_problems(os.path.join(root, split, shard_name(k)), meta, k, names))]
    if bad:
        (k, problems), more = bad[0], f" (and {len(bad) - 1} more damaged shard(s))" if len(bad) > 1 else ""
        raise DataError(f"--feature_cache {root}: {split}/{shard_name(k)} is damaged ({'; '.join(problems)}){more}; "
                        f"{rebuild_hint(meta)}")


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_shard(folder, meta, k):
    """(problems, has_checksums): every file of shard k read in full against its checksums.json, besides the cheap
    checks of shard_problems."""
    problems = shard_problems(folder, meta, k, None)  # every array
    path = os.path.join(folder, CHECKSUMS)
    if problems == ["missing"] or not os.path.isfile(path):
        return problems, False
    try:
        with open(path) as f:
            sums = json.load(f)
    except (OSError, ValueError) as e:
        return problems + [f"{CHECKSUMS}: unreadable ({e})"], True
    for name, digest in sums.items():
        if os.path.isfile(os.path.join(folder, name)) and file_sha256(os.path.join(folder, name)) != digest:
            problems.append(f"{name}: contents differ from its checksum")
    return problems, True


def verify_cache(root):
    """cache_features.py --verify: every shard of every split under root, read in full. Prints one line per damaged
    shard; DataError (exit 2) when there is one."""
    splits = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "meta.json"))) \
        if os.path.isdir(root) else []
    if not splits:
        raise DataError(f"--output {root}: no cached split (no <split>/meta.json) to verify")
    bad, meta = 0, None
    for split in splits:
        meta = load_cache_meta(root, split)
        unsummed = 0
        for k in range(meta["num_shards"]):
            problems, summed = verify_shard(os.path.join(root, split, shard_name(k)), meta, k)
            unsummed += not summed and problems != ["missing"]
            if problems:
                bad += 1
                print(f"damaged: {os.path.join(root, split, shard_name(k))}: {'; '.join(problems)}", flush=True)
        note = f"; {unsummed} shard(s) have no checksums (written before they were recorded): checked by size " \
               f"and header only" if unsummed else ""
        print(f"verify: {root}/{split}: {meta['num_shards']} shard(s) read{note}", flush=True)
    if bad:
        raise DataError(f"--output {root}: {bad} damaged shard(s), listed above; {rebuild_hint(meta)} (or delete "
                        f"them and rerun it)")
    print(f"verify: {root}: every shard matches", flush=True)


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
            folder = os.path.join(self.dir, shard_name(k))
            self._shards[k] = {n: np.load(os.path.join(folder, n + ".npy"), mmap_mode="r")
                               for n in reader_arrays(self.active)}
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


def cache_token_counts(root, active, splits=("train", "val", "test")):
    """{m: N_m} of the cached tokens: the first of `splits` the cache holds gives them (a cache's splits come from one
    Stage 1, so they agree; build_cached_dataset refuses one that does not)."""
    split = next((s for s in splits if os.path.isfile(os.path.join(root, s, "meta.json"))), splits[0])
    arrays = cached_arrays(os.path.join(root, split), load_cache_meta(root, split))
    return {m: arrays[f"{m}_tokens"]["shape"][0] for m in active}


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
    check_shards(root, split, meta, reader_arrays(active))  # sizes and headers: a damaged shard is named now
    if getattr(args, "complementary_token_weight", 0) > 0 and args.complementary_token_target == "tokens":
        counts, first = cache_token_counts(root, active, (split,)), cache_token_counts(root, active)
        if counts != first:  # the per-position decoder was built for the first split's positions
            raise DataError(f"--feature_cache {root} ({split}): token positions {counts} differ from the cache's other "
                            f"splits {first}; rebuild it with cache_features.py")
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


class CacheWriteError(DataError):
    """Writing the cache failed (a full disk, ...): one line naming the file, exit 2; finished shards are kept."""


def write_error(e, where):
    """CacheWriteError of an OSError met while writing the cache (at `where`, when the error names no file)."""
    return CacheWriteError(f"{e.filename or where}: {e.strerror or e} while writing the cache; the finished "
                           f"shards are kept: free space and rerun the same command to complete it")


def on_rank0(fn, where):
    """fn() on rank 0 while the other ranks wait; its DataError (an OSError as CacheWriteError) raised on every rank."""
    error = None
    if dist.is_main():
        try:
            fn()
        except DataError as e:
            error = e
        except OSError as e:
            error = write_error(e, where)
    dist.raise_together(error, CacheWriteError(f"{where}: rank 0 failed (see its error)"))


def cache_split(args, stage1, split, device):
    """Caches one split: with --repair the damaged shards removed first, the free space checked against what remains
    to write, this rank's missing shards, then (rank 0, after a barrier) meta.json."""
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
    if args.repair and os.path.isfile(meta_path):
        remove_damaged(out, load_cache_meta(args.output, split), range(rank, plan["num_shards"], world))
    dist.barrier()
    missing = [k for k in range(plan["num_shards"]) if not os.path.isdir(os.path.join(out, shard_name(k)))]
    if os.path.isfile(meta_path) and not missing:
        if dist.is_main():
            print(f"cache: {out} is complete already ({plan['num_samples']} samples)")
        return

    def start():
        os.makedirs(out, exist_ok=True)
        if not args.skip_space_check:
            check_space(out, plan, missing, sample_specs(args, stage1, plain, device))
        if not os.path.isfile(meta_path):
            write_json(plan, plan_path, indent=1)
    on_rank0(start, out)

    t0, done, skipped = time.time(), 0, 0
    loaders = make_loaders(args, device, {"plain": plain, "aug": aug})
    error, bad = None, []
    try:
        for k in range(rank, plan["num_shards"], world):
            if k not in missing:
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

    def finish():
        left = [k for k in range(plan["num_shards"]) if not os.path.isdir(os.path.join(out, shard_name(k)))]
        if left:
            raise DataError(f"{out}: shards {left[:5]} are missing after every rank finished; rerun to complete")
        write_json(dict(plan, arrays=array_specs(os.path.join(out, shard_name(0))),
                        feature_dims=stage1.feature_dims, embed_dim=stage1.embed_dim, captions=plain.captions,
                        command=getattr(args, "command", None), args={k: v for k, v in vars(args).items()}),
                   meta_path, indent=1)
        if os.path.isfile(plan_path):
            os.remove(plan_path)
        print(f"cache: {out} complete: {plan['num_samples']} samples x {plan['views']} view(s) in "
              f"{plan['num_shards']} shard(s)", flush=True)
    on_rank0(finish, out)


def remove_damaged(out, meta, shards):
    """--repair: shards (of this rank) that fail verify_shard are removed, so that they are written again."""
    for k in shards:
        folder = os.path.join(out, shard_name(k))
        problems, _ = verify_shard(folder, meta, k)
        if problems and problems != ["missing"]:
            print(f"cache: --repair: rewriting {folder} ({'; '.join(problems)})", flush=True)
            shutil.rmtree(folder)


def feature_arrays(feats, active):
    """[(array name, (b, ...) tensor, numpy dtype)]: what a shard stores of a batch of Stage 1 features."""
    out = []
    for m in active:
        out += [(f"{m}_tokens", feats["tokens"][m], np.float16),
                (f"{m}_global", feats["global"][m].float(), np.float32)]
    if "text" in feats["padding_mask"]:
        out.append(("text_padding", feats["padding_mask"]["text"], np.bool_))
    return out


@torch.no_grad()
def sample_specs(args, stage1, plain, device):
    """{array name: (per-sample shape, dtype)}, from the first sample through the encoders."""
    batch = default_collate([plain[0]])
    pop_bad(batch)
    batch.pop("index")
    with autocast(device, args.precision):
        feats = stage1(to_device(batch, device))
    return {name: (tuple(x.shape[1:]), dtype) for name, x, dtype in feature_arrays(feats, args.active_modality_names)}


def check_space(out, plan, missing, specs):
    """Prints the planned size; DataError when the filesystem has less free space than the missing shards need."""
    per_view = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs.values())  # one sample
    rows = [min(plan["shard_size"], plan["num_samples"] - k * plan["shard_size"]) for k in range(plan["num_shards"])]
    header = 128 * (len(specs) + 1) + 4096  # .npy headers, index.npy header, checksums.json (at most)
    need = [plan["views"] * n * per_view + n * 8 + header for n in rows]  # bytes of each shard
    todo, free = sum(need[k] for k in missing), shutil.disk_usage(out).free
    print(f"cache: {out}: {plan['num_samples']} samples x {plan['views']} view(s) x {per_view:,} bytes = "
          f"{sum(need) / 1e9:.3f} GB planned, {todo / 1e9:.3f} GB ({todo:,} bytes) of {len(missing)} shard(s) still "
          f"to write, {free:,} bytes free", flush=True)
    if todo > free:
        raise DataError(f"--output {out}: not enough free space: {todo:,} bytes still to write, {free:,} bytes free "
                        f"on its filesystem; free space or choose another --output (--skip_space_check writes anyway)")


def array_specs(folder):
    """{name: {"shape": per-sample shape, "dtype"}} read from the .npy headers of one shard (no data read)."""
    specs = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".npy"):
            a = np.load(os.path.join(folder, f), mmap_mode="r")
            specs[f[:-4]] = {"shape": list(a.shape[2:] if a.ndim > 1 else ()), "dtype": str(a.dtype)}
    return specs


def allocate_npy(path, shape, dtype):
    """A writable memory map of a new .npy file whose blocks are all reserved on disk first (posix_fallocate): a full
    disk is an OSError here, never a SIGBUS later, when the map is written."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # what np.lib.format.open_memmap writes
        offset = f.tell()
        try:
            os.posix_fallocate(f.fileno(), 0, offset + math.prod(shape) * np.dtype(dtype).itemsize)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None  # name the file
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


def write_shard(args, stage1, loaders, plan, out, k, device, bad):
    """Shard k through a temporary folder (fill_shard), renamed to shard_<k> once every byte of it is on disk. A
    shard holding a bad sample is read to the end (its bad samples appended to `bad`) but never renamed. A failed
    write (a full disk) removes the temporary folder: CacheWriteError. Returns 1 if written."""
    final, tmp = os.path.join(out, shard_name(k)), os.path.join(out, f".tmp_{shard_name(k)}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    try:
        os.makedirs(tmp)
        if not fill_shard(args, stage1, loaders, plan, tmp, final, k, device, bad):
            shutil.rmtree(tmp)
            return 0
        sums = {}
        for f in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, f), "rb+") as fh:
                os.fsync(fh.fileno())
            sums[f] = file_sha256(os.path.join(tmp, f))
        write_json(sums, os.path.join(tmp, CHECKSUMS), indent=1)
        os.rename(tmp, final)  # the shard exists only once every byte of it is on disk
        fsync_dir(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # its space back; a rerun writes the shard again
        raise write_error(e, tmp) from None
    return 1


def fill_shard(args, stage1, loaders, plan, tmp, final, k, device, bad):
    """Samples [lo, hi) of every view into the arrays of folder `tmp`; False when a bad sample was met."""
    lo, hi = k * plan["shard_size"], min(plan["num_samples"], (k + 1) * plan["shard_size"])
    arrays, n_bad = {}, len(bad)

    def put(name, v, rows, x, dtype):
        # x: (b, ...) on the device -> rows of the (V, n_k, ...) array, created at the first batch
        if name not in arrays:
            arrays[name] = allocate_npy(os.path.join(tmp, name + ".npy"), (plan["views"], hi - lo) + tuple(x.shape[1:]),
                                        dtype)
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
            for name, x, dtype in feature_arrays(feats, args.active_modality_names):
                put(name, v, rows, x, dtype)
    if len(bad) > n_bad:
        return False
    np.save(os.path.join(tmp, "index.npy"), np.arange(lo, hi, dtype=np.int64))
    for a in arrays.values():
        a.flush()
    return True
