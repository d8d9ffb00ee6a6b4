"""Loader throughput (samples/s) on a synthetic TVL set, at 0 and 2 DataLoader workers (not a test).

    python bench/bench_loader.py [--n 300] [--batch_size 32] [--epochs 2] [--no_augment]

Prints one line per worker count and the ratio, so later changes to data_stage2 can be compared. The main
process runs with one intra-op thread, as DataLoader workers do (tiny images: more threads only add overhead).
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_stage2 as D  # noqa: E402
from tools.make_synthetic_tvl import make_synthetic_tvl  # noqa: E402


def throughput(ds, workers, batch_size, epochs):
    n = 0
    t = time.perf_counter()
    for epoch in range(epochs):
        keys = [(epoch, i) for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).tolist()]
        for b in DataLoader(ds, batch_size=batch_size, num_workers=workers, sampler=keys):
            n += len(b["index"])
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="SSVTP and HCT samples each")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no_augment", action="store_true")
    a = p.parse_args()
    import open_clip
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        make_synthetic_tvl(root, n_ssvtp=a.n, n_hct=a.n, seed=0)
        args = D.add_data_args(argparse.ArgumentParser()).parse_args(
            ["--datasets_dir", root] + (["--no_augment"] if a.no_augment else []))
        ds = D.build_dataset(args, "train", open_clip.get_tokenizer("ViT-L-14"), D.STREAMS, seed=0)
        rates = {w: throughput(ds, w, a.batch_size, a.epochs) for w in (0, 2)}
    for w, r in rates.items():
        print(f"loader num_workers={w}: {r:8.1f} samples/s ({len(ds)} samples x {a.epochs} epochs, "
              f"augment={ds.augment}, vision+tactile+text, {os.cpu_count()} CPUs)")
    print(f"ratio workers=2 / workers=0: {rates[2] / rates[0]:.2f}")


if __name__ == "__main__":
    main()
