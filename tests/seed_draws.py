"""The random draws of a few keys, for the test that a key gives the same draw in every process.

    python tests/seed_draws.py DATASETS_DIR OUT.pt   (repo root on PYTHONPATH) writes what draws() returns.
"""
import argparse
import random
import sys

import torch

import data_stage2 as D
from engine_stage2 import step_seed
from tvl_stage2 import nested_dropout_mask

ITEM_KEYS = [(0, 0), (2, 5), (3, 41), (1, 61)]  # (epoch, index): SSVTP and HCT items
STEP_KEYS = [(3, 0, 0), (3, 17, 1), (4, 17, 1)]  # (seed, micro_step, rank)


def draws(datasets_dir):
    """Augmented train items (text as its caption: an identity tokenizer) and nested-dropout keep masks."""
    random.random(), torch.rand(1)  # the global RNGs are in another state in each process: they must not matter
    args = D.add_data_args(argparse.ArgumentParser()).parse_args(["--datasets_dir", datasets_dir])
    ds = D.build_dataset(args, "train", lambda texts: texts, ("vision", "tactile", "text"), seed=7)
    assert ds.augment
    items = [ds[key] for key in ITEM_KEYS]
    keeps = [nested_dropout_mask(16, 4, 0.5, generator=torch.Generator().manual_seed(step_seed(*key)))
             for key in STEP_KEYS]
    return {"vision": torch.stack([it["vision"] for it in items]),
            "tactile": torch.stack([it["tactile"] for it in items]),
            "text": [it["text"] for it in items], "keep": torch.stack(keeps)}


if __name__ == "__main__":
    torch.save(draws(sys.argv[1]), sys.argv[2])
