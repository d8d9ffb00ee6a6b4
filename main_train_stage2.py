"""FluxTalk Stage 2 training: register tokens on top of frozen TVL Stage 1 encoders.

    torchrun --nproc_per_node=1 main_train_stage2.py --stage1_checkpoint tvl_enc_vittiny.pth \
        --batch_size 64 --epochs 100 --num_register_tokens 4 --num_overlapping_tokens 3 \
        --nested_dropout_rate 0.5 --complementary_reg_weight 0.01 --output_dir ./output_dir/flux_talk_variant \
        --datasets_dir /data/tvl --datasets ssvtp hct

    python main_train_stage2.py --demo        # synthetic TVL data + a tiny Stage 1, CPU, about a minute

Exit codes: 0 done, 2 bad input (one line on stderr naming the flag/file/key), 75 stopped by SIGTERM/SIGUSR1
after writing checkpoint.pth (resume with --resume auto), 1 anything else.
"""
import argparse
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import util.dist as dist
from data_stage2 import DataError, add_data_args, build_cached_dataset, build_dataset
from engine_stage2 import NonFiniteLoss, evaluate, log_eval, train_one_epoch
from loss_stage2 import Stage2Loss
from stage1 import Stage1Error, add_stage1_args, build_stage1
from tvl_stage2 import FluxTalk, RegisterModule
from util.checkpoint import (CheckpointError, CheckpointWriteError, append_line, atomic_write, load_torch_file,
                              remove_stale_temp_files, rng_state, save_atomic, set_rng_state)
from util.misc import MODALITIES, in_canonical_order, modality_pairs, pair_name

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", i.e. resume


# ----------------------------------------------------------------------------------------------------- flags

def rate_in_unit_interval(value):
    r = float(value)
    if not 0.0 <= r < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return r


def positive_int(value):
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def non_negative_float(value):
    v = float(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return v


def get_args_parser():
    p = argparse.ArgumentParser("FluxTalk Stage 2 training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--demo", action="store_true",
                   help="synthetic TVL-format data + a tiny Stage 1 under output_dir (made once), CPU, a few epochs")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, args.json, TensorBoard")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    g.add_argument("--seed", default=0, type=int, help="base seed; each rank adds its rank")
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' (output_dir/checkpoint.pth "
                                                "if present)")
    g.add_argument("--eval_only", action="store_true", help="evaluate the --resume checkpoint and exit")
    dist.add_device_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the register module")
    g.add_argument("--save_every", default=0, type=int, help="also keep checkpoint-<epoch>.pth every N epochs (0: off)")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help="write checkpoint.pth every N optimizer steps mid-epoch too (0: only at epoch ends)")
    g.add_argument("--print_freq", default=20, type=positive_int, help="log (TensorBoard, stdout) every N optimizer steps")
    g.add_argument("--feature_cache", default=None,
                   help="train and evaluate from this cache_features.py folder: no encoder forward, no image decoding")

    g = p.add_argument_group("model")
    g.add_argument("--active_modality_names", nargs="+", default=list(MODALITIES), choices=MODALITIES,
                   help="modalities to align (two or more); loss pairs are all unordered pairs")
    g.add_argument("--num_register_tokens", default=4, type=positive_int, help="K register tokens")
    g.add_argument("--num_overlapping_tokens", default=3, type=positive_int,
                   help="K_o of them are overlapping (aligned); the rest are complementary")
    g.add_argument("--register_width", default=256, type=positive_int, help="width D of the register blocks")
    g.add_argument("--register_depth", default=2, type=positive_int, help="register blocks")
    g.add_argument("--register_heads", default=4, type=positive_int, help="attention heads")
    g.add_argument("--mlp_ratio", default=4.0, type=float, help="MLP hidden = ratio * width")
    g.add_argument("--attn_dropout", default=0.0, type=rate_in_unit_interval, help="attention dropout (training)")
    g.add_argument("--embed_dim", default=None, type=positive_int, help="output dim E (default: Stage 1 joint dim)")
    g.add_argument("--nested_dropout_rate", default=0.5, type=rate_in_unit_interval,
                   help="final nested dropout rate r in [0, 1): P(token k dropped) = r k / (K-1)")
    g.add_argument("--nested_dropout_ramp_epochs", default=None, type=float,
                   help="epochs of the linear 0 -> rate ramp (default: all epochs)")
    g.add_argument("--complementary_reg_weight", default=0.01, type=non_negative_float,
                   help="weight of the complementary L2 + diversity terms")
    g.add_argument("--complementary_recon_weight", default=0.0, type=non_negative_float,
                   help="weight of the Stage 1 global-embedding reconstruction term (0: off)")
    g.add_argument("--complementary_reg_terms", nargs="+", default=["l2", "diversity"], choices=["l2", "diversity"],
                   help="which complementary regularisers --complementary_reg_weight applies")
    g.add_argument("--complementary_l2", default="sum", choices=["sum", "mean"],
                   help="complementary L2 term: squared norm (sum, grows with the width) or divided by the width")
    g.add_argument("--complementary_residual_weight", default=0.0, type=non_negative_float,
                   help="weight of the residual term: decode the Stage 1 global embedding from the stop-gradient "
                        "overlapping embedding + the complementary token, so only the latter can add what the "
                        "former lacks (0: off)")
    g.add_argument("--text_threshold", default=0.9, type=float,
                   help="TVL text accuracy: a hit when the retrieved caption's Stage 1 text embedding has cosine "
                        "above this with the true caption's")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", default=64, type=positive_int, help="per-GPU batch size")
    g.add_argument("--epochs", default=100, type=positive_int)
    g.add_argument("--accum_iter", default=1, type=positive_int, help="gradient accumulation steps")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, help="base lr, scaled by effective batch / 256")
    g.add_argument("--min_lr", default=1e-6, type=float, help="cosine floor")
    g.add_argument("--warmup_epochs", default=5, type=float, help="linear lr warmup")
    g.add_argument("--weight_decay", default=0.05, type=float,
                   help="AdamW weight decay (not on norms, biases, register tokens, logit scale)")
    g.add_argument("--clip_grad", default=None, type=float, help="max grad norm (default: no clipping)")

    add_data_args(p)
    add_stage1_args(p)
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if len(set(args.active_modality_names)) < 2:
        parser.error("--active_modality_names: need two or more distinct modalities")
    if args.num_overlapping_tokens >= args.num_register_tokens:
        parser.error(f"--num_overlapping_tokens ({args.num_overlapping_tokens}) must be < --num_register_tokens "
                     f"({args.num_register_tokens}): the rest are the complementary tokens")
    if args.register_width % args.register_heads:
        parser.error(f"--register_width ({args.register_width}) must be divisible by --register_heads "
                     f"({args.register_heads})")
    if args.eval_only and not args.resume:
        parser.error("--eval_only needs --resume PATH (or auto)")
    if args.demo:
        apply_demo_defaults(args, parser)
    elif args.stage1_checkpoint is None:  # also with --feature_cache: its fingerprint must match the cache's
        parser.error("--stage1_checkpoint is required (or use --demo)")
    dist.resolve_device_args(parser, args)  # after the demo defaults, which pick the CPU
    if args.nested_dropout_ramp_epochs is None:
        args.nested_dropout_ramp_epochs = float(args.epochs)
    args.active_modality_names = in_canonical_order(args.active_modality_names)
    return args


# ------------------------------------------------------------------------------------------------------ demo

DEMO = dict(epochs=8, batch_size=32, lr=2e-3, warmup_epochs=1, num_workers=2, print_freq=5, nested_dropout_rate=0.5,
            device="cpu")


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


def prepare_demo(args):
    """Rank 0 writes the synthetic dataset and the tiny Stage 1 (once; reused when present)."""
    if dist.is_main():
        from tools.make_synthetic_tvl import make_synthetic_tvl
        from tools.make_tiny_stage1 import make_tiny_stage1
        make_synthetic_tvl(args.datasets_dir, n_ssvtp=240, n_hct=240, seed=0)
        make_tiny_stage1(os.path.dirname(args.stage1_checkpoint), seed=0)
    dist.barrier()


# ----------------------------------------------------------------------------------------------- checkpoints

def checkpoint_state(model, optimizer, scaler, args, stage1_fingerprint, epoch, next_step, global_step, best,
                     partial=None):
    """Everything a resume needs; only what trains (the register module), never the frozen Stage 1.
    `partial`: the epoch's running loss sums at a mid-epoch save, so the resumed epoch logs the same averages."""
    return {
        "model": model.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "next_step": next_step,  # batches of `epoch` already consumed (== steps_per_epoch: epoch finished)
        "global_step": global_step,
        "best_val_mean_r1": best,
        "args": {k: v for k, v in vars(args).items() if k != "device_obj"},
        "rng": rng_state(),  # rank 0's
        "rng_ranks": dist.all_gather_object(rng_state()),  # every rank's (attention dropout draws differ per rank)
        "stage1_fingerprint": stage1_fingerprint,
        "partial": partial,
    }


def resolve_resume(args):
    if args.resume == "auto":
        path = os.path.join(args.output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    return args.resume or None


def load_resume(path, model, optimizer, scaler, stage1_fingerprint):
    """Loads a checkpoint into model/optimizer/scaler; refuses another Stage 1 or another model shape."""
    ckpt = load_torch_file(path, flag="--resume")
    missing = [k for k in ("model", "optimizer", "epoch", "next_step", "global_step", "args", "stage1_fingerprint") if
               not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a FluxTalk Stage 2 checkpoint (missing key(s) {', '.join(missing)})")
    if ckpt["stage1_fingerprint"] != stage1_fingerprint:
        raise CheckpointError(f"{path}: was trained on another Stage 1 (fingerprint {ckpt['stage1_fingerprint'][:12]}"
                              f" != {stage1_fingerprint[:12]} of --stage1_checkpoint/--clip_pretrained); refusing")
    module = model.unwrapped_registers
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ckpt["model"].items()
           if k in own and v.shape != own[k].shape]
    bad += [f"{k} (missing here)" for k in ckpt["model"] if k not in own]
    bad += [f"{k} (missing in checkpoint)" for k in own if k not in ckpt["model"]]
    if bad:
        raise CheckpointError(f"{path}: model shape does not match the flags ({'; '.join(bad[:4])}); resume with "
                              f"the flags of that run (see its args)")
    module.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt


# ------------------------------------------------------------------------------------------------ building

def param_groups(module, weight_decay):
    """No weight decay on norms, biases, register tokens or the logit scale (as MAE/OpenCLIP)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name in ("register_tokens", "logit_scale")
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EpochSampler(torch.utils.data.Sampler):
    """This rank's DistributedSampler order of an epoch as (epoch, index) keys, minus the first `skip` of them
    (mid-epoch resume). The epoch travels with each key, so persistent loader workers (forked once per run)
    augment for the right epoch: data_stage2's datasets take (epoch, index) keys."""

    def __init__(self, sampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(self.sampler)[self.skip:]])

    def __len__(self):
        return len(self.sampler) - self.skip


def make_loader(dataset, args, train):
    rank, world = dist.get_rank(), dist.get_world_size()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=args.seed,
                                 drop_last=train)
    # An explicit generator: the loader must not draw from the global RNG, which a resumed run restores.
    # Persistent workers: forked once per run, not once per epoch. Besides the start-up time this saves, forking
    # while the last epoch's queue feeder threads are still exiting can deadlock the child in CPython 3.11's
    # after-fork cleanup (seen on a 2-rank CPU run).
    return DataLoader(dataset, batch_size=args.batch_size, sampler=EpochSampler(sampler) if train else sampler,
                      num_workers=args.num_workers, pin_memory=args.device_obj.type == "cuda", drop_last=train,
                      generator=torch.Generator().manual_seed(args.seed), persistent_workers=args.num_workers > 0,
                      worker_init_fn=dist.ignore_stop_signals)


def build_split(args, split, stage1):
    if args.feature_cache:  # refused (DataError) when made with another Stage 1, modalities or split
        return build_cached_dataset(args, split, stage1, args.seed)
    return build_dataset(args, split, stage1.tokenizer, args.active_modality_names, args.seed)


def build_model(args, stage1):
    embed_dim = args.embed_dim or stage1.embed_dim
    targets = {m: stage1.embed_dim for m in args.active_modality_names}  # decoders predict Stage 1 globals
    registers = RegisterModule(
        feature_dims=stage1.feature_dims, embed_dim=embed_dim, num_tokens=args.num_register_tokens,
        num_overlapping=args.num_overlapping_tokens, width=args.register_width, depth=args.register_depth,
        num_heads=args.register_heads, mlp_ratio=args.mlp_ratio, attn_dropout=args.attn_dropout,
        logit_scale_init=stage1.logit_scale,
        recon_dims=targets if args.complementary_recon_weight else None,
        residual_dims=targets if args.complementary_residual_weight else None)
    return FluxTalk(stage1, registers)


def build_criterion(args):
    return Stage2Loss(args.num_overlapping_tokens, args.complementary_reg_weight, args.complementary_recon_weight,
                      args.complementary_reg_terms, args.complementary_l2, args.complementary_residual_weight)


# --------------------------------------------------------------------------------------------------- logging

def open_writer(args, purge_step):
    """TensorBoard on rank 0. purge_step drops events a crashed run logged past the resume point."""
    if not dist.is_main():
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=args.log_dir, purge_step=purge_step)


def trim_log(path, start_epoch):
    """Drop log.txt lines of epochs >= start_epoch (they will be re-run), so no epoch appears twice."""
    if not dist.is_main() or not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", -1) < start_epoch]
    atomic_write(path, lambda f: f.writelines(lines), mode="w")


def headline_keys(args):
    """val_mean_r1, then each pair's mean Recall@1: the numbers a person reads first."""
    return ["val_mean_r1"] + [f"val_{pair_name(a, b)}_r1" for a, b in modality_pairs(args.active_modality_names)]


def print_metrics(title, metrics, args):
    if dist.is_main():
        print(title + "  " + "  ".join(f"{k[4:]}={metrics[k]:.2f}" for k in headline_keys(args)), flush=True)


# ------------------------------------------------------------------------------------------------------ main

class StopFlag:
    """Set by SIGTERM / SIGUSR1 (what SLURM and most schedulers send before a kill); read after each step."""

    def __init__(self):
        self.signum = None

    def install(self):
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.signum = signum

    def __call__(self):
        return self.signum is not None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(args):
    """One process group, this rank's device, the absolute lr, the demo inputs, rank-offset seeds."""
    rank, world_size, device = dist.init_distributed(args.device)
    args.device_obj, args.world_size = device, world_size
    args.log_dir = args.log_dir or args.output_dir
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
    if args.demo:
        prepare_demo(args)
    seed_everything(args.seed + rank)


def resume_position(path, model, optimizer, scaler, stage1_fingerprint):
    """Loads `path` (see load_resume), restores this rank's RNG states and returns where training continues:
    {"epoch", "next_step", "global_step", "best", "partial"}."""
    ckpt = load_resume(path, model, optimizer, scaler, stage1_fingerprint)
    ranks = ckpt.get("rng_ranks") or []  # per rank; rank 0's alone when the world size changed
    set_rng_state(ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else ckpt["rng"])
    pos = {"epoch": ckpt["epoch"], "next_step": ckpt["next_step"], "global_step": ckpt["global_step"],
           "best": ckpt.get("best_val_mean_r1", -1.0), "partial": ckpt.get("partial"),
           "layout": (ckpt["args"].get("world_size"), ckpt["args"].get("batch_size"))}
    if dist.is_main():
        print(f"resumed from {path}: epoch {pos['epoch']}, step {pos['next_step']}, best val_mean_r1 "
              f"{pos['best']:.2f}")
    return pos


def eval_only(model, val_loader, args, resume, pos):
    """--eval_only: metrics printed, appended to log.txt and TensorBoard; no checkpoint is written."""
    metrics, artifacts = evaluate(model, val_loader, args)
    print_metrics(f"eval ({resume})", metrics, args)
    if dist.is_main():
        os.makedirs(args.output_dir, exist_ok=True)
        append_line(os.path.join(args.output_dir, "log.txt"),
                    json.dumps({"epoch": pos["epoch"], "eval_only": True, "checkpoint": resume, **metrics}))
        writer = open_writer(args, None)
        log_eval(writer, metrics, artifacts, pos["global_step"])
        writer.close()
    return metrics


def wrap_for_training(model, args):
    """Compiles (in place, so state dict keys and attributes stay those of the module) and DDP-wraps only the
    register module: the frozen Stage 1 never receives gradients."""
    if args.compile:
        model.registers.compile()
    if args.world_size > 1:
        device = args.device_obj
        model.registers = DistributedDataParallel(
            model.registers, device_ids=[device.index] if device.type == "cuda" else None)


def start_output_dir(args, pos, resumed):
    """args.json, stale temp files gone, log.txt and TensorBoard cut back to where this run starts.

    output_dir describes this run: a resume drops what it will re-run, a fresh start drops an older run's lines
    and (purge_step=0) its TensorBoard events. Events at the checkpoint's own global_step (its last train/ line, and
    the val/ ones of an epoch-end checkpoint) were written before it and are not re-run: keep them (+1).
    """
    if dist.is_main():
        os.makedirs(args.output_dir, exist_ok=True)
        remove_stale_temp_files(args.output_dir)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "device_obj"}, f, indent=2, default=str)
        trim_log(os.path.join(args.output_dir, "log.txt"), pos["epoch"])
    return open_writer(args, pos["global_step"] + 1 if resumed else 0)


def write_checkpoint(ckpt, names, args, writer):
    """Rank 0 writes `ckpt` under each name (atomically); every rank raises together if that failed."""
    error = None
    if dist.is_main():
        if writer is not None:
            writer.flush()  # TensorBoard up to this step survives a kill -9 (a resume purges only later steps)
        try:
            for name in names:
                save_atomic(ckpt, os.path.join(args.output_dir, name))
        except CheckpointWriteError as e:
            error = e
    dist.raise_together(error, CheckpointWriteError(f"{os.path.join(args.output_dir, names[0])}: rank 0 failed to "
                                                    f"write the checkpoint (see its error)"))


def epoch_log_line(epoch, train_stats, metrics, global_step, best, seconds):
    return json.dumps({"epoch": epoch, "train_loss": train_stats.get("loss"), "global_step": global_step,
                       **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"}, **metrics,
                       "best_val_mean_r1": best, "epoch_time_s": seconds})


def run(args):
    setup(args)
    stop = StopFlag()
    stop.install()
    stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                          active_modalities=args.active_modality_names)
    model = build_model(args, stage1)
    # From the cache Stage 1 only supplies its fingerprint, dims and tokenizer: leave it on the CPU.
    (model.registers if args.feature_cache else model).to(args.device_obj)
    criterion = build_criterion(args)
    val_loader = make_loader(build_split(args, "val", stage1), args, train=False)
    optimizer = torch.optim.AdamW(param_groups(model.registers, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(args.device_obj.type, enabled=args.precision == "amp_fp16")

    resume = resolve_resume(args)
    pos = {"epoch": 0, "next_step": 0, "global_step": 0, "best": -1.0, "partial": None}
    if resume:
        pos = resume_position(resume, model, optimizer, scaler, stage1.fingerprint)
    elif args.eval_only:
        raise CheckpointError(f"--eval_only --resume auto: no checkpoint.pth in {args.output_dir}")
    elif os.path.isfile(os.path.join(args.output_dir, "checkpoint.pth")) and not args.demo:
        # never overwrite another run's checkpoints and logs by accident (the demo always starts over)
        raise CheckpointError(f"--output_dir {args.output_dir} already holds a run (checkpoint.pth): pass --resume "
                              f"auto to continue it, or choose another --output_dir")
    if args.eval_only:
        return eval_only(model, val_loader, args, resume, pos)

    train_set = build_split(args, "train", stage1)
    train_loader = make_loader(train_set, args, train=True)
    steps_per_epoch = len(train_loader.sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"--batch_size {args.batch_size} x {args.world_size} rank(s) is larger than the training "
                        f"split ({len(train_set)} samples)")
    if pos["next_step"] >= steps_per_epoch:  # resumed from an epoch-end checkpoint
        pos.update(epoch=pos["epoch"] + 1, next_step=0, partial=None)
    elif pos["next_step"] and pos["layout"] != (args.world_size, args.batch_size):
        # next_step counts this rank's batches: with another split of the epoch it would repeat or skip samples
        raise CheckpointError(f"{resume}: stopped mid-epoch with {pos['layout'][0]} rank(s) x --batch_size "
                              f"{pos['layout'][1]}; resume it with the same, or from an epoch-end checkpoint")
    wrap_for_training(model, args)
    if dist.is_main():
        print(f"{len(train_set)} train / {len(val_loader.dataset)} val samples, {args.world_size} rank(s) on "
              f"{args.device_obj}, {steps_per_epoch} steps/epoch, lr {args.lr:.3g}, precision {args.precision}")
    writer = start_output_dir(args, pos, resumed=resume is not None)
    state = {"global_step": pos["global_step"]}
    if pos["next_step"]:
        state["partial"] = pos["partial"]
    best = pos["best"]

    def save(names, epoch, next_step):
        ckpt = checkpoint_state(model, optimizer, scaler, args, stage1.fingerprint, epoch, next_step,
                                state["global_step"], best, state.pop("partial", None))
        write_checkpoint(ckpt, names, args, writer)

    before = after = None
    if args.demo and not resume:
        before, _ = evaluate(model, val_loader, args)
        print_metrics("before training:", before, args)
    start_step = pos["next_step"]
    for epoch in range(pos["epoch"], args.epochs):
        t0 = time.time()
        train_loader.sampler.set_epoch(epoch, skip=start_step * args.batch_size)
        train_stats, status = train_one_epoch(
            model, criterion, train_loader, optimizer, scaler, epoch, start_step, steps_per_epoch, args, state,
            writer, save_fn=lambda e, s: save(["checkpoint.pth"], e, s), stop_requested=stop)
        if status == "stopped":
            raise preempted(stop, writer, epoch, state, args)
        start_step = 0
        metrics, artifacts = evaluate(model, val_loader, args)
        after = metrics
        print_metrics(f"epoch {epoch}:", metrics, args)
        is_best = metrics["val_mean_r1"] > best
        best = max(best, metrics["val_mean_r1"])
        if dist.is_main():
            log_eval(writer, metrics, artifacts, state["global_step"])
            # before the checkpoint: a crash in between re-runs the epoch, and the resume trims this line
            append_line(os.path.join(args.output_dir, "log.txt"),
                        epoch_log_line(epoch, train_stats, metrics, state["global_step"], best, time.time() - t0))
        names = ["checkpoint.pth"] + (["checkpoint-best.pth"] if is_best else [])
        if args.save_every and (epoch + 1) % args.save_every == 0:
            names.append(f"checkpoint-{epoch}.pth")
        save(names, epoch, steps_per_epoch)
        if epoch + 1 < args.epochs and dist.any_rank(stop()):  # signalled in the epoch's last step or its eval
            raise preempted(stop, writer, epoch, state, args)

    if writer is not None:
        writer.close()
    if args.demo and dist.is_main() and after is not None:
        print_demo_summary(before, after, args)
    return after


class Preempted(Exception):
    pass


def preempted(stop, writer, epoch, state, args):
    """The exception that ends a run stopped by a signal, once checkpoint.pth holds its state."""
    if writer is not None:
        writer.close()
    name = signal.Signals(stop.signum).name if stop.signum else "a stop request on another rank"
    return Preempted(f"caught {name} at epoch {epoch} step {state['global_step']}: wrote "
                     f"{os.path.join(args.output_dir, 'checkpoint.pth')}; resume with --resume auto")


def print_demo_summary(before, after, args):
    print(f"\n{'metric':<32}{'before':>10}{'after':>10}")
    for k in headline_keys(args):
        b = before.get(k, float("nan")) if before else float("nan")
        print(f"{k:<32}{b:>10.2f}{after[k]:>10.2f}")
    chance = 100.0 / after["val_num_samples"]
    b = before["val_mean_r1"] if before else float("nan")
    print(f"demo: val_mean_r1 before={b:.2f} after={after['val_mean_r1']:.2f} chance={chance:.2f}", flush=True)


def main(argv=None):
    return dist.run_entry_point(run, parse_args(argv), [
        (CheckpointWriteError, 1, "error"),  # the input was fine; the previous checkpoint.pth is intact
        ((Stage1Error, DataError, CheckpointError), EXIT_BAD_INPUT, "error"),
        (Preempted, EXIT_PREEMPTED, "stopped"),
        (NonFiniteLoss, 1, "error"),
    ])


if __name__ == "__main__":
    sys.exit(main())
