"""Small helpers shared by every module: the modalities and the pairs the loss compares, autocast, batch moves."""
import itertools
from contextlib import nullcontext

import torch

MODALITIES = ("vision", "tactile", "text")  # TVL's names


def in_canonical_order(names):
    """Distinct modality names in MODALITIES order, whatever order the flags gave them in."""
    return sorted(set(names), key=MODALITIES.index)


def modality_pairs(active):
    """All unordered pairs of active modalities, each sorted by name: [("tactile", "vision"), ...]."""
    return [tuple(sorted(p)) for p in itertools.combinations(sorted(active), 2)]


def pair_name(a, b):
    """Key used in logs and metrics for a pair, names sorted: pair_name("vision", "tactile") == "tactile_vision"."""
    return "_".join(sorted((a, b)))


def headline_keys(args):
    """<split>_mean_r1 (the evaluation split's, e.g. val_mean_r1), then each pair's mean Recall@1: the numbers a person
    reads first."""
    pairs = [pair_name(a, b) for a, b in modality_pairs(args.active_modality_names)]
    return [f"{args.eval_split}_{name}" for name in ["mean_r1"] + [f"{p}_r1" for p in pairs]]


def autocast(device, precision):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch, device):
    """Moves a (possibly nested) batch dict of tensors to `device` without blocking the host."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if torch.is_tensor(batch) else batch
