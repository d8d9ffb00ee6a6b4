"""Embeddings from a trained Stage 2 model: for retrieval, or to feed a language model.

    from embed_stage2 import load_stage2, embed
    model, args = load_stage2("output_dir/run/checkpoint-best.pth")        # its Stage 1 too, from the stored args
    out = embed(model, batch, k=1)      # batch: {"vision": (B, 3, 224, 224), "tactile": ..., "text": (B, 77)}
    out["embedding"]["tactile"]         # (B, E) L2-normalised mean of the first k overlapping tokens
    out["registers"]["tactile"]         # (B, K, E) every register token, raw

    python embed_stage2.py --checkpoint output_dir/run/checkpoint-best.pth --split test --k 3 --output test.npz

The .npz holds `sample_ids` and `index` (N,), and per modality m `m` (N, E) and `m_registers` (N, K, E), rows in
dataset order. `k` is the nested-dropout prefix: how many overlapping tokens to pool (default all K_o of them).
"""
import argparse
import os
import sys

import numpy as np
import torch

import util.dist as dist
from data_stage2 import BadSamples, DataError
from engine_stage2 import compute_embeddings, pooled
from main_train_stage2 import build_model, build_split, make_loader, run_args
from stage1 import Stage1Error, build_stage1
from util.checkpoint import CheckpointError, RunFiles, load_run_checkpoint
from util.misc import to_device


def load_stage2(checkpoint, device="cpu", **overrides):
    """A trained Stage 2 checkpoint and the Stage 1 it was trained on -> (FluxTalk in eval mode, run args).

    The Stage 1 files, model shape and data flags come from the checkpoint's stored args; `overrides` replace
    some of them (e.g. stage1_checkpoint=..., datasets_dir=... when the files moved). Another Stage 1 than the
    one it was trained on is refused (CheckpointError)."""
    stored = load_run_checkpoint(checkpoint, "--checkpoint")
    args = argparse.Namespace(**{**run_args(stored["args"]), **overrides})
    args.device_obj = torch.device(device)
    stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                          active_modalities=args.active_modality_names)
    model = build_model(args, stage1)
    RunFiles(args, model, None, None, stage1.fingerprint).load(checkpoint, stored)  # refuses another Stage 1 or shape
    return model.to(args.device_obj).eval(), args


@torch.no_grad()
def embed(model, batch, k=None):
    """One batch (raw inputs, or Stage 1 features from the feature cache) -> {"embedding": {m: (B, E)} the
    L2-normalised mean of the first k overlapping tokens (default: all K_o), "registers": {m: (B, K, E)}}."""
    model.eval()
    k = k or model.unwrapped_registers.num_overlapping
    device = next(model.unwrapped_registers.parameters()).device
    regs = model(to_device(batch, device))["registers"]
    return {"embedding": {m: pooled(r.float(), k) for m, r in regs.items()}, "registers": regs}


def embed_split(model, args, split, k=None):
    """A whole split -> {"index": (N,), "sample_ids": [N], "embedding": {m: (N, E)}, "registers": {m: (N, K, E)}},
    computed exactly as the evaluation computes them (rank-gathered under torchrun, dataset order)."""
    k = k or args.num_overlapping_tokens
    dataset = build_split(args, split, model.stage1)
    loader = make_loader(dataset, args, train=False, bad=BadSamples(args.max_bad_samples))
    emb = compute_embeddings(model, loader, args)
    return {"index": emb["index"], "sample_ids": [dataset.sample_ids[i] for i in emb["index"].tolist()],
            "embedding": {m: pooled(r, k) for m, r in emb["registers"].items()}, "registers": emb["registers"]}


def save_npz(path, result):
    arrays = {"sample_ids": np.array(result["sample_ids"]), "index": result["index"].numpy()}
    for m, e in result["embedding"].items():
        arrays[m] = e.numpy().astype(np.float32)
        arrays[f"{m}_registers"] = result["registers"][m].numpy().astype(np.float32)
    np.savez(path, **arrays)


def get_args_parser():
    p = argparse.ArgumentParser("Write a split's Stage 2 embeddings to one .npz",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Stage 2 checkpoint (checkpoint-best.pth, ...)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="never augmented")
    p.add_argument("--k", default=None, type=int, help="overlapping tokens to pool (default: all K_o)")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument("--datasets_dir", default=None, help="override the run's --datasets_dir")
    p.add_argument("--feature_cache", default=None, help="read the split from this feature cache instead")
    p.add_argument("--batch_size", default=None, type=int, help="override the run's --batch_size")
    p.add_argument("--num_workers", default=None, type=int, help="override the run's --num_workers")
    dist.add_device_args(p)
    return p


def run(cli):
    overrides = {k: v for k, v in vars(cli).items()
                 if k in ("datasets_dir", "feature_cache", "batch_size", "num_workers") and v is not None}
    _, _, device = dist.init_distributed(cli.device)
    model, args = load_stage2(cli.checkpoint, device, precision=cli.precision, **overrides)
    if cli.k is not None and not 1 <= cli.k <= args.num_overlapping_tokens:
        raise CheckpointError(f"--k {cli.k}: must be in 1..{args.num_overlapping_tokens} (the run's overlapping tokens)")
    result = embed_split(model, args, cli.split, cli.k)
    if dist.is_main():
        os.makedirs(os.path.dirname(os.path.abspath(cli.output)), exist_ok=True)
        save_npz(cli.output, result)
        shapes = ", ".join(f"{m} {tuple(e.shape)}" for m, e in result["embedding"].items())
        print(f"embed: {cli.split}: {len(result['index'])} samples ({shapes}) -> {cli.output}")


def main(argv=None):
    parser = get_args_parser()
    cli = parser.parse_args(argv)
    dist.resolve_device_args(parser, cli)
    return dist.run_entry_point(run, cli, [((Stage1Error, DataError, CheckpointError), 2, "error")])


if __name__ == "__main__":
    sys.exit(main())
