"""FluxTalk Stage 2 training: register tokens on top of frozen TVL Stage 1 encoders.

    torchrun --nproc_per_node=1 main_train_stage2.py --stage1_checkpoint tvl_enc_vittiny.pth \
        --batch_size 64 --epochs 100 --num_register_tokens 4 --num_overlapping_tokens 3 \
        --output_dir ./output_dir/flux_talk_variant \
        --datasets_dir /data/tvl --datasets ssvtp hct

    python main_train_stage2.py --demo        # tools/demo.py: synthetic TVL data + a tiny Stage 1, CPU, under a minute
    python main_train_stage2.py --check_data --datasets_dir /data/tvl   # list every missing/unreadable file, exit

Exit codes: 0 done, 2 bad input (one line on stderr naming the flag/file/key), 75 stopped by SIGTERM/SIGUSR1
after writing checkpoint.pth (resume with --resume auto), 1 anything else.
"""
import argparse
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import util.dist as dist
from data_stage2 import (BadSamples, DataError, GuardedLoader, add_data_args, build_dataset, check_data,
                         given_recipe, resolve_recipe)
from engine_stage2 import NonFiniteLoss, evaluate, log_baseline, log_eval, train_one_epoch
from feature_cache import build_cached_dataset, cache_token_counts
from loss_stage2 import Stage2Loss
from stage1 import Stage1Error, add_stage1_args, build_stage1
from tvl_stage2 import FluxTalk, RegisterModule
from util.checkpoint import CheckpointError, CheckpointWriteError, Preempted, RunFiles, folder_lock
from util.misc import MODALITIES, headline_keys, in_canonical_order

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", i.e. resume


# ----------------------------------------------------------------------------------------------------- flags

def in_range(cast, low, below=None):
    """An argparse type: cast(value), refused unless low <= value (< below, when given)."""
    def parse(value):
        v = cast(value)
        if v < low or (below is not None and v >= below):
            bound = f"in [{low}, {below})" if below is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return v
    parse.__name__ = cast.__name__  # argparse names the type in its "invalid <type> value" message
    return parse


rate_in_unit_interval = in_range(float, 0, 1)
positive_int, non_negative_int, non_negative_float = in_range(int, 1), in_range(int, 0), in_range(float, 0)


def get_args_parser():
    p = argparse.ArgumentParser("FluxTalk Stage 2 training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--demo", action="store_true",
                   help="hand over to tools/demo.py: synthetic TVL-format data + a tiny Stage 1 under output_dir "
                        "(default ./output_dir/demo, made once), then this trainer on CPU for a few epochs with "
                        "--eval_at_start and a table of the metrics before and after; other flags given with it "
                        "pass through and win")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, args.json, TensorBoard")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    g.add_argument("--seed", default=0, type=int, help="base seed; each rank adds its rank")
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' (output_dir/checkpoint.pth "
                                                "if present)")
    g.add_argument("--eval_only", action="store_true",
                   help="evaluate the --resume checkpoint and exit (writes eval_<split>.json, Stage 1 beside Stage 2); "
                        "the Stage 1, model and data flags are the checkpoint's")
    g.add_argument("--eval_at_start", action="store_true",
                   help="evaluate once before training (before the first epoch, or where a resumed run continues): "
                        "printed, written to log.txt as a line with eval_at_start: true, and to TensorBoard")
    g.add_argument("--eval_split", default="val", choices=["val", "test"],
                   help="split of the periodic evaluation and --eval_only; test (each subset's test.csv) is the "
                        "only split that never overlaps Stage 1's training data, val selects checkpoints")
    dist.add_device_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the register module")
    g.add_argument("--save_every", default=0, type=int, help="also keep checkpoint-<epoch>.pth every N epochs (0: off)")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help="write checkpoint.pth every N optimizer steps mid-epoch too (0: only at epoch ends)")
    g.add_argument("--print_freq", default=20, type=positive_int, help="log (TensorBoard, stdout) every N optimizer steps")
    g.add_argument("--feature_cache", default=None,
                   help="train and evaluate from this cache_features.py folder: no encoder forward, no image decoding")
    g.add_argument("--check_data", action="store_true",
                   help="decode every train/val sample once, list every missing or unreadable file, exit (0: all "
                        "fine, 2: bad files); trains nothing")
    g.add_argument("--max_bad_samples", default=0, type=non_negative_int,
                   help="skip (replace by the next readable sample) and count up to N bad samples, each named once "
                        "in the log; stop when there are more. 0: stop at the first")

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
    g.add_argument("--nested_dropout_ramp_epochs", default=0.0, type=non_negative_float,
                   help="optional linear ramp of the rate from 0 over this many epochs of training time (0: the "
                        "full --nested_dropout_rate from the first step)")
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
    g.add_argument("--complementary_residual_source", default="own", choices=["own", "partner"],
                   help="the shared embedding the residual and token terms' decoders read: the modality's own, or "
                        "(partner) each other modality's, averaged over them: the partner never saw the modality's "
                        "specific factors, so only its complementary token can supply them")
    g.add_argument("--complementary_token_weight", default=0.0, type=non_negative_float,
                   help="weight of the token-level residual: decode the modality's own frozen Stage 1 context tokens "
                        "(not its global embedding, which a contrastively trained encoder may have stripped of what "
                        "only it sees) from the stop-gradient shared embedding (--complementary_residual_source) + "
                        "the complementary token, as the residual term's decoder reads them (0: off)")
    g.add_argument("--complementary_token_target", default="pooled", choices=["pooled", "tokens"],
                   help="the token term's target: pooled = the mean of the context tokens over their non-padded "
                        "positions, centred over the global batch (a linear decoder); tokens = every token, centred "
                        "per position (a small MAE-style decoder with one learned query per context position)")
    g.add_argument("--complementary_token_loss", default="cosine", choices=["cosine", "infonce"],
                   help="the token term's loss: cosine = 1 - cos(prediction, centred target), in [0, 2] at every "
                        "width; infonce (pooled only) = symmetric InfoNCE over the batch at the view term's fixed "
                        "temperature 0.1 (FactorCL/CPC-style conditional InfoNCE)")
    g.add_argument("--complementary_difference_weight", default=0.0, type=non_negative_float,
                   help="weight of Domain Separation Networks' batch-level difference term: the mean squared "
                        "correlation over the batch between the (detached) shared embedding and the complementary "
                        "token (0: off)")
    g.add_argument("--complementary_view_weight", default=0.0, type=non_negative_float,
                   help="weight of the view contrastive term (FactorCL): InfoNCE between the complementary tokens of "
                        "two augmented views of each sample; training then reads two views (a --feature_cache needs "
                        "cache_features.py --cache_views 2 or more) (0: off)")
    g.add_argument("--complementary_pathway", default="shared", choices=["shared", "separate"],
                   help="separate: the complementary tokens get their own tokens, blocks, norm and head and read a "
                        "stop-gradient copy of the context, so no complementary objective changes the overlapping "
                        "tokens")
    g.add_argument("--contrastive_prefixes", default="full", choices=["full", "all"],
                   help="all: the contrastive loss is the mean of its values on the first k overlapping tokens, "
                        "k = 1..K_o (Matryoshka Representation Learning), an ordering without nested dropout")
    # The default is the study's decision (study/results/RESULTS.md, README "Does it work?"): by the rule of issue 22,
    # fixed before its runs, only objectives whose complementary signal does not come from Stage 1's global embedding
    # kept touch's own information when touch's global embedding had shed it; among them the InfoNCE token form had
    # the largest worst case. `separate` and `mission` reproduce the earlier losses exactly.
    g.add_argument("--objective", default="tokens", choices=["mission", "separate", "tokens", "custom"],
                   help="preset of the objective flags above (an explicit flag still wins): tokens = separate "
                        "complementary pathway + token-level residual (pooled target, InfoNCE, partner source, weight "
                        "1) + all-prefix contrastive loss, nested dropout 0, L2 + diversity at 0.01 (the default, "
                        "chosen by the study); separate = the same with the partner residual on Stage 1's global "
                        "embedding (weight 1) in place of the token term (the default before: it fails for a modality "
                        "whose global embedding shed what only it sees); mission = the original loss (shared "
                        "pathway, nested dropout 0.5, reg weight 0.01 on L2 (sum) + diversity, full contrastive, no "
                        "other term); custom = no preset, each flag's own default (the mission's values)")

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


# --objective presets: argparse defaults, so an explicit flag still overrides them.
MISSION = dict(complementary_pathway="shared", complementary_reg_weight=0.01,
               complementary_reg_terms=["l2", "diversity"], complementary_l2="sum", complementary_recon_weight=0.0,
               complementary_residual_weight=0.0, complementary_residual_source="own",
               complementary_difference_weight=0.0, complementary_view_weight=0.0, contrastive_prefixes="full",
               nested_dropout_rate=0.5, complementary_token_weight=0.0, complementary_token_target="pooled",
               complementary_token_loss="cosine")
SEPARATE = dict(MISSION, complementary_pathway="separate", complementary_residual_weight=1.0,
                complementary_residual_source="partner", contrastive_prefixes="all", nested_dropout_rate=0.0)
PRESETS = {"mission": MISSION, "custom": {}, "separate": SEPARATE,
           "tokens": dict(SEPARATE, complementary_residual_weight=0.0, complementary_token_weight=1.0,
                          complementary_token_loss="infonce")}


def parse_args(argv=None):
    parser = get_args_parser()
    preset, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[preset.objective])
    args = parser.parse_args(argv)
    if len(set(args.active_modality_names)) < 2:
        parser.error("--active_modality_names: need two or more distinct modalities")
    if args.num_overlapping_tokens >= args.num_register_tokens:
        parser.error(f"--num_overlapping_tokens ({args.num_overlapping_tokens}) must be < --num_register_tokens "
                     f"({args.num_register_tokens}): the rest are the complementary tokens")
    if args.register_width % args.register_heads:
        parser.error(f"--register_width ({args.register_width}) must be divisible by --register_heads "
                     f"({args.register_heads})")
    if args.complementary_pathway == "separate" and not complementary_objective(args):
        parser.error("--complementary_pathway separate: no complementary objective is on (--complementary_reg_weight, "
                     "_recon_weight, _residual_weight, _difference_weight, _view_weight, _token_weight all 0): its "
                     "pathway would train on nothing")
    if args.complementary_token_loss == "infonce" and args.complementary_token_target == "tokens":
        parser.error("--complementary_token_loss infonce (the tokens preset's) needs --complementary_token_target "
                     "pooled (one target vector per sample to contrast); with --complementary_token_target tokens "
                     "pass --complementary_token_loss cosine")
    if args.complementary_view_weight > 0 and args.no_augment:
        parser.error("--complementary_view_weight needs two different augmented views of each sample: not with "
                     "--no_augment")
    if args.eval_only and not args.resume:
        parser.error("--eval_only needs --resume PATH (or auto)")
    if args.eval_only:  # the other flags come from the checkpoint (use_run_args); these must agree with it
        args.given_flags = given_flags(argv)
    if args.check_data and args.feature_cache:
        parser.error("--check_data reads --datasets_dir; a --feature_cache run decodes no files")
    if args.stage1_checkpoint is None and not (args.check_data or args.eval_only):  # --feature_cache: fingerprint
        parser.error("--stage1_checkpoint is required (or use --demo)")
    dist.resolve_device_args(parser, args)
    args.active_modality_names = in_canonical_order(args.active_modality_names)
    return args


def given_flags(argv):
    """The names of the flags on the command line, not those whose value differs from a default (which --objective
    changes, and which may be given too): parsed again into a namespace that holds a marker for each, as argparse sets
    a default only where the namespace has no value."""
    parser, unset = get_args_parser(), object()
    parsed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    return sorted(k for k, v in vars(parsed).items() if v is not unset)


def run_args(stored):
    """{flag: value} a run trained with, from its checkpoint's stored args. A run from before a flag existed trained
    with its default then: the parser's defaults fill what it lacks, and the objective flags (added with the presets,
    when the mission's loss was the only one) take the mission's."""
    return {**vars(get_args_parser().parse_args([])), "objective": "mission", **MISSION, **stored}


# --eval_only evaluates what the run trained: its checkpoint's args define the Stage 1, the model and the data. From the
# command line (default included) only where and how this evaluation runs ...
EVAL_OWN = ("output_dir", "log_dir", "resume", "eval_only", "device", "precision", "check_data", "compile", "demo",
            "eval_at_start")
# ... and, when given, where the data is now, which split and how it is read.
EVAL_OVERRIDES = ("datasets_dir", "feature_cache", "eval_split", "batch_size", "num_workers", "max_bad_samples",
                  "print_freq")


def use_run_args(args):
    """--eval_only: args becomes the --resume checkpoint's stored args, but for EVAL_OWN and the EVAL_OVERRIDES given.
    Another flag given must agree with the checkpoint, else CheckpointError naming both values."""
    given = vars(args).pop("given_flags")
    path, stored = RunFiles.stored_args(args)
    stored = run_args(stored)
    mine = {**vars(args), **given_recipe(args)}  # recipe flags as stored (--subtract_background none is None)
    for k in given:
        if k not in EVAL_OWN + EVAL_OVERRIDES and mine[k] != stored.get(k):
            raise CheckpointError(f"--{k} {as_flag(getattr(args, k))}: the checkpoint {path} was trained with "
                                  f"{as_flag(stored.get(k))}; --eval_only takes the Stage 1, model and data flags "
                                  f"from it: drop the flag")
    here = [k for k in EVAL_OWN if hasattr(args, k)] + [k for k in given if k in EVAL_OVERRIDES]
    vars(args).update({**stored, **{k: getattr(args, k) for k in here}})


def as_flag(value):
    """A flag's value as written on a command line."""
    return " ".join(map(str, value)) if isinstance(value, list) else value


def complementary_objective(args):
    """Whether any loss term trains the complementary tokens."""
    return any(getattr(args, f"complementary_{t}_weight") > 0
               for t in ("reg", "recon", "residual", "difference", "view", "token"))


# ------------------------------------------------------------------------------------------------ building

def param_groups(module, weight_decay):
    """No weight decay on norms, biases, register tokens (both pathways'), the token decoders' queries and slot
    embeddings (learned tokens too) or the logit scale (as MAE/OpenCLIP)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name in ("register_tokens", "comp_tokens", "logit_scale") or (
            name.startswith("token_decoder.") and name.endswith((".queries", ".slots")))
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


def make_loader(dataset, args, train, bad):
    rank, world = dist.get_rank(), dist.get_world_size()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=args.seed,
                                 drop_last=train)
    # An explicit generator: the loader must not draw from the global RNG, which a resumed run restores.
    # Persistent workers: forked once per run, not once per epoch. Besides the start-up time this saves, forking
    # while the last epoch's queue feeder threads are still exiting can deadlock the child in CPython 3.11's
    # after-fork cleanup (seen on a 2-rank CPU run).
    # Guarded: a bad file stops every rank together, and `bad` (BadSamples) counts the ones --max_bad_samples skips.
    return GuardedLoader(DataLoader(
        dataset, batch_size=args.batch_size, sampler=EpochSampler(sampler) if train else sampler,
        num_workers=args.num_workers, pin_memory=args.device_obj.type == "cuda", drop_last=train,
        generator=torch.Generator().manual_seed(args.seed), persistent_workers=args.num_workers > 0,
        worker_init_fn=dist.ignore_stop_signals), bad)


def build_split(args, split, stage1):
    if args.feature_cache:  # refused (DataError) when made with another Stage 1, modalities or split
        return build_cached_dataset(args, split, stage1, args.seed)
    return build_dataset(args, split, stage1.tokenizer, args.active_modality_names, args.seed,
                         tolerate_bad=args.max_bad_samples > 0)


def make_train_loader(args, stage1, bad):
    """The training loader and its optimizer steps per epoch (a split smaller than one global batch is refused)."""
    loader = make_loader(build_split(args, "train", stage1), args, train=True, bad=bad)
    steps_per_epoch = len(loader.sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"--batch_size {args.batch_size} x {args.world_size} rank(s) is larger than the training "
                        f"split ({len(loader.dataset)} samples)")
    return loader, steps_per_epoch


def build_model(args, stage1):
    embed_dim = args.embed_dim or stage1.embed_dim
    per_position = args.complementary_token_weight and args.complementary_token_target == "tokens"
    counts = input_token_counts(args, stage1) if per_position else None
    unknown = [m for m, n in (counts or {}).items() if n is None]
    if unknown:
        raise Stage1Error(f"--complementary_token_target tokens: the {unknown} encoder's token count is unknown before "
                          f"a forward (--tactile_model {stage1.tactile_model} has no patch embedding); use "
                          f"--complementary_token_target pooled")
    targets = {m: stage1.embed_dim for m in args.active_modality_names}  # decoders predict Stage 1 globals
    registers = RegisterModule(
        feature_dims=stage1.feature_dims, embed_dim=embed_dim, num_tokens=args.num_register_tokens,
        num_overlapping=args.num_overlapping_tokens, width=args.register_width, depth=args.register_depth,
        num_heads=args.register_heads, mlp_ratio=args.mlp_ratio, attn_dropout=args.attn_dropout,
        logit_scale_init=stage1.logit_scale,
        recon_dims=targets if args.complementary_recon_weight else None,
        residual_dims=targets if args.complementary_residual_weight else None,
        complementary_pathway=args.complementary_pathway, residual_source=args.complementary_residual_source,
        token_dims=stage1.feature_dims if args.complementary_token_weight else None,
        token_target=args.complementary_token_target, token_counts=counts)
    return FluxTalk(stage1, registers)


def input_token_counts(args, stage1):
    """{m: N_m} of the context tokens the run reads: the feature cache's (a cache of study/latent_tokens.py writes its
    own number of positions), else Stage 1's. The per-position token decoder has one query per position."""
    if args.feature_cache:
        return cache_token_counts(args.feature_cache, args.active_modality_names)
    return stage1.token_counts


def build_criterion(args):
    return Stage2Loss(args.num_overlapping_tokens, args.complementary_reg_weight, args.complementary_recon_weight,
                      args.complementary_reg_terms, args.complementary_l2, args.complementary_residual_weight,
                      args.contrastive_prefixes, args.complementary_difference_weight, args.complementary_view_weight,
                      args.complementary_token_weight, args.complementary_token_target, args.complementary_token_loss)


# --------------------------------------------------------------------------------------------------- logging

def print_metrics(title, metrics, args):
    if dist.is_main():
        start = len(args.eval_split) + 1
        print(title + "  " + "  ".join(f"{k[start:]}={metrics[k]:.2f}" for k in headline_keys(args)), flush=True)


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
    """One process group, this rank's device, the absolute lr, rank-offset seeds."""
    rank, world_size, device = dist.init_distributed(args.device)
    args.device_obj, args.world_size = device, world_size
    args.log_dir = args.log_dir or args.output_dir
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
    seed_everything(args.seed + rank)


def eval_only(model, eval_loader, args, files, state):
    """--eval_only: Stage 2 and Stage 1 side by side, printed and written to eval_<split>.json; the Stage 2 metrics
    also to log.txt and TensorBoard. No checkpoint is written."""
    metrics, artifacts = logged_evaluation(model, eval_loader, args, files, state, files.open_writer(None),
                                           f"eval ({files.resume_path})", eval_only=True, checkpoint=files.resume_path)
    files.close()
    report = {"split": args.eval_split, "n": int(artifacts["stage2"]["num_samples"]), "captions": args.eval_captions,
              "checkpoint": files.resume_path, "stage2": artifacts["stage2"], "stage1": artifacts["stage1"]}
    path, error = files.path(f"eval_{args.eval_split}.json"), None
    if dist.is_main():
        try:
            files.write_json(os.path.basename(path), report)
            print(side_by_side(report))
        except OSError as e:
            error = CheckpointWriteError(f"{path}: writing failed ({e})")
    # Also what keeps the ranks together until here: a rank that tore the process group down while rank 0 was still
    # writing was seen to abort in gloo's threads (SIGABRT) under torchrun.
    dist.raise_together(error, CheckpointWriteError(f"{path}: rank 0 failed to write it (see its error)"))
    return metrics


def logged_evaluation(model, eval_loader, args, files, state, writer, title, **line):
    """One evaluation outside the epoch loop (--eval_only, --eval_at_start): printed under `title`, a log.txt line
    (the epoch, `line`, the metrics) and TensorBoard at the step training is at. -> (metrics, artifacts)."""
    metrics, artifacts = evaluate(model, eval_loader, args)
    print_metrics(title, metrics, args)
    files.log({"epoch": state.epoch, **line, **metrics})
    log_eval(writer, metrics, artifacts, state.global_step)
    return metrics, artifacts


def side_by_side(report):
    """The eval_<split>.json numbers as a table: every metric Stage 1 has, with Stage 2 beside it."""
    rows = [f"{report['split']} split, {report['n']} samples, {report['captions']} captions",
            f"{'metric':<44}{'stage1':>10}{'stage2':>10}"]
    rows += [f"{k:<44}{v:>10.2f}{report['stage2'][k]:>10.2f}" for k, v in report["stage1"].items()]
    return "\n".join(rows)


def note_eval_split(args, stage1):
    """Says, once, when the evaluation split overlaps what Stage 1 trained on."""
    if (dist.is_main() and args.eval_split == "val" and "hct" in args.datasets
            and getattr(stage1.train_args, "use_not_contact", False)):
        print("note: Stage 1 was trained with --use_not_contact, so most HCT validation samples were in its training "
              "split; --eval_split test gives the clean number")


def wrap_for_training(model, args):
    """Compiles (in place, so state dict keys and attributes stay those of the module) and DDP-wraps only the
    register module: the frozen Stage 1 never receives gradients."""
    if args.compile:
        model.registers.compile()
    if args.world_size > 1:
        device = args.device_obj
        model.registers = DistributedDataParallel(
            model.registers, device_ids=[device.index] if device.type == "cuda" else None)


def log_epoch(files, args, state, train_stats, metrics, artifacts, seconds):
    """The epoch's evaluation in TensorBoard and its log.txt line, with the bad samples skipped so far
    (train/bad_samples, train_bad_samples). The first epoch also carries Stage 1's own numbers on the same split and
    captions (baseline_stage1), logged once: the reference line of every curve. Called before the checkpoint: a
    crash in between re-runs the epoch, and the resume trims the line."""
    log_eval(files.writer, metrics, artifacts, state.global_step)
    if files.writer is not None:
        files.writer.add_scalar("train/bad_samples", len(state.bad_samples), state.global_step)
    line = {"epoch": state.epoch, "train_loss": train_stats.get("loss"), "global_step": state.global_step,
            **{f"train_{k}": v for k, v in train_stats.items() if k != "loss"},
            "train_bad_samples": len(state.bad_samples), **metrics,
            f"best_{args.eval_split}_mean_r1": state.best, "epoch_time_s": seconds}
    if state.epoch == 0:
        log_baseline(files.writer, artifacts["stage1"], args.eval_split)
        line["baseline_stage1"] = artifacts["stage1"]
    files.log(line)


def run(args):
    """The run holds --output_dir's lock for its whole life, taken before anything is written there (a second launch
    into it ends at once, exit 2); --check_data writes nothing and takes none."""
    dist.init_distributed(args.device)  # the process group first: rank 0 alone takes the lock
    with nullcontext() if args.check_data else folder_lock(args.output_dir, "--output_dir"):
        return run_locked(args)


def run_locked(args):
    if args.eval_only:
        use_run_args(args)
    setup(args)
    if args.check_data:
        return check_data(args, ("train", "val"), args.active_modality_names)
    stop = StopFlag()
    stop.install()
    stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                          active_modalities=args.active_modality_names)
    resolve_recipe(args, stage1)  # Stage 1's data recipe, before any dataset is built or args.json written
    model = build_model(args, stage1)
    # From the cache Stage 1 only supplies its fingerprint, dims and tokenizer: leave it on the CPU.
    (model.registers if args.feature_cache else model).to(args.device_obj)
    criterion = build_criterion(args)
    optimizer = torch.optim.AdamW(param_groups(model.registers, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(args.device_obj.type, enabled=args.precision == "amp_fp16")

    files = RunFiles(args, model, optimizer, scaler, stage1.fingerprint)
    state = files.resume()  # refuses a bad --resume file, or an output_dir that holds another run
    bad = BadSamples(args.max_bad_samples, state.bad_samples)  # counts into the state, so checkpoints hold it
    eval_loader = make_loader(build_split(args, args.eval_split, stage1), args, train=False, bad=bad)
    if args.eval_only:
        return eval_only(model, eval_loader, args, files, state)
    train_loader, steps_per_epoch = make_train_loader(args, stage1, bad)
    files.continue_at(state, steps_per_epoch)
    wrap_for_training(model, args)
    if dist.is_main():
        print(f"{len(train_loader.dataset)} train / {len(eval_loader.dataset)} {args.eval_split} samples, "
              f"{args.world_size} rank(s) on {args.device_obj}, {steps_per_epoch} steps/epoch, lr {args.lr:.3g}, "
              f"precision {args.precision}")
    note_eval_split(args, stage1)
    files.start(state)

    if args.eval_at_start:  # the weights training starts from: a fresh run's initialisation, or the resumed ones
        logged_evaluation(model, eval_loader, args, files, state, files.writer, "before training:", eval_at_start=True,
                          global_step=state.global_step)
    after = None
    for epoch in range(state.epoch, args.epochs):
        t0 = time.time()
        train_loader.sampler.set_epoch(epoch, skip=state.next_step * args.batch_size)
        train_stats, status = train_one_epoch(model, criterion, train_loader, optimizer, scaler, state,
                                              steps_per_epoch, args, files.writer, files.save, stop)
        if status == "stopped":
            raise files.preempted(stop.signum, state)
        after, artifacts = evaluate(model, eval_loader, args)
        print_metrics(f"epoch {epoch}:", after, args)
        is_best = state.update_best(after[f"{args.eval_split}_mean_r1"])
        log_epoch(files, args, state, train_stats, after, artifacts, time.time() - t0)
        files.save_epoch_end(state, is_best)
        if epoch + 1 < args.epochs and dist.any_rank(stop()):  # signalled in the epoch's last step or its eval
            raise files.preempted(stop.signum, state)
        state.next_epoch()
    files.close()
    return after


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:  # the demo writes its inputs, then calls this main() with its own flags and the others given
        from tools.demo import main as demo
        return demo([a for a in argv if a != "--demo"])
    return dist.run_entry_point(run, parse_args(argv), [
        (CheckpointWriteError, 1, "error"),  # the input was fine; the previous checkpoint.pth is intact
        ((Stage1Error, DataError, CheckpointError), EXIT_BAD_INPUT, "error"),
        (Preempted, EXIT_PREEMPTED, "stopped"),
        (NonFiniteLoss, 1, "error"),
    ])


if __name__ == "__main__":
    sys.exit(main())
