"""`python main_train_stage2.py --demo`: the fast path on data made here, on the CPU, in well under a minute.

Under output_dir: data/ (synthetic TVL-format data), stage1/ (a tiny random Stage 1), cache/seed<seed>/ (its features,
computed once by cache_features.py's code), all reused when present; then a short run trained from the cache, with the
retrieval metrics before and after training.
"""
import os

import cache_features
import util.dist as dist
from util.misc import headline_keys

# From the cache a step is the register module alone, so workers would only add start-up time; the inputs are not
# augmented: one encoder pass over each split is all the demo pays for Stage 1.
DEMO = dict(epochs=10, batch_size=32, lr=2e-3, warmup_epochs=1, num_workers=0, print_freq=5, register_width=128,
            device="cpu", no_augment=True)
CACHE_WORKERS = 2  # image decoding overlaps the encoder forward while caching


def apply_demo_defaults(args, parser):
    """--demo: the tiny setup, unless a flag was given explicitly on the command line."""
    for k, v in DEMO.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)
    if args.output_dir == parser.get_default("output_dir"):
        args.output_dir = "./output_dir/demo"
    args.datasets_dir = os.path.join(args.output_dir, "data")
    args.stage1_checkpoint = os.path.join(args.output_dir, "stage1", "tiny_stage1.pth")
    args.clip_model = "fluxtalk-tiny"
    args.clip_pretrained = os.path.join(args.output_dir, "stage1", "tiny_clip.pt")
    args.feature_cache = os.path.join(args.output_dir, "cache", f"seed{args.seed}")  # one cache per --seed


def cache_args(args):
    """cache_features.py's flags for the demo's data, Stage 1, modalities, seed (--use_not_contact draws its frames
    with it) and every data-recipe flag given on the command line (the cache must hold what training will read)."""
    argv = ["--output", args.feature_cache, "--splits", "train", "val", "--num_workers", str(CACHE_WORKERS),
            "--datasets", *args.datasets, "--active_modality_names", *args.active_modality_names, "--seed", str(args.seed)]
    for k in ("datasets_dir", "stage1_checkpoint", "clip_model", "clip_pretrained", "tactile_model", "device",
              "precision", "text_prompt", "percent_not_contact", "subtract_background", "tactile_background"):
        argv += [f"--{k}", str(getattr(args, k))] if getattr(args, k) is not None else []
    argv += ["--no_text_prompt"] if args.no_text_prompt else []
    for k in ("shuffle_text", "replace_synonyms", "use_not_contact", "color_jitter"):  # --flag / --no-flag / unset
        argv += [] if getattr(args, k) is None else [f"--{k}" if getattr(args, k) else f"--no-{k}"]
    return cache_features.parse_args(argv)


def prepare_demo(args):
    """Rank 0 writes the synthetic dataset and the tiny Stage 1, then all ranks cache its features (each once;
    reused when present)."""
    if dist.is_main():
        from tools.make_synthetic_tvl import make_synthetic_tvl
        from tools.make_tiny_stage1 import make_tiny_stage1
        make_synthetic_tvl(args.datasets_dir, n_ssvtp=240, n_hct=240, seed=0)
        make_tiny_stage1(os.path.dirname(args.stage1_checkpoint), seed=0)
        print("demo: the tiny Stage 1 is random on purpose (seeded, no pretrained weights): the demo shows Stage 2 "
              "learning on top of any frozen encoder")
    dist.barrier()
    cache_features.run(cache_args(args))


def print_demo_summary(before, after, args):
    """The before/after table of the headline metrics and the one-line verdict."""
    print(f"\n{'metric':<32}{'before':>10}{'after':>10}")
    for k in headline_keys(args):
        b = before.get(k, float("nan")) if before else float("nan")
        print(f"{k:<32}{b:>10.2f}{after[k]:>10.2f}")
    split = args.eval_split
    chance = 100.0 / after[f"{split}_num_samples"]
    b = before[f"{split}_mean_r1"] if before else float("nan")
    print(f"demo: {split}_mean_r1 before={b:.2f} after={after[f'{split}_mean_r1']:.2f} chance={chance:.2f}", flush=True)
