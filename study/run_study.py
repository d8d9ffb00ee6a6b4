"""Does FluxTalk do what it claims? Train Stage 2 under several objectives and seeds on data with known factors,
and measure retrieval, prefix ordering and what each register token holds, on the representation users get.

    python study/run_study.py --quick --output /tmp/study     # 4-8 min on a shared 2-core CPU: the headline arms
    python study/run_study.py                                 # the full study (~25 min), into study/results/
    python study/run_study.py --sources cache:/data/tvl_cache --stage1_checkpoint tvl_enc_vitb.pth \\
        --clip_model ViT-L-14 --clip_pretrained datacomp_xl_s13b_b90k \\
        --arms mission nd0 objective_separate separate_noorder --seeds 3 --epochs 20 --device cuda

Claims tested: nested dropout (or a loss over every prefix) orders the register tokens, so a prefix is a usable
embedding, at little cost to the pooled one; the overlapping tokens align what the modalities share; the
complementary token keeps what only its modality sees. The issue's hypotheses 1-6 are tested by the arms below;
every objective weight is fixed a priori at 1 (nothing was tuned).

Sources, each a main_train_stage2 feature cache (so a run trains in seconds on a CPU):
  latent     token features written from known latents (study/latent_tokens.py): shared, modality-specific (also
             in Stage 1's global embedding) and nuisance (tokens only); the train split holds 2 augmented views
             (fresh token noise and token dropout) that every arm trains on and the view objective contrasts;
  tvl        the synthetic TVL-format dataset of tools/make_synthetic_tvl.py through the tiny frozen Stage 1 of
             tools/make_tiny_stage1.py, with a narrow embedding (TVL_FLAGS: why in RESULTS.md);
  cache:DIR  a user's own feature cache (cache_features.py) with their Stage 1 flags: no factors are known there,
             so only what needs none is measured: pooled / first-token R@1, the prefix curve, and TVL's metrics
             with Stage 1 beside them (main_train_stage2 --eval_only, on val and on test where the cache has it).
Every arm is trained through main_train_stage2.main() from the cache, once per seed; its last checkpoint is loaded
into the register module and run over the cached val (and plain train view, for the probes) features with every
token kept. The untrained register module of the same seed and arm (the weights its training starts from) and
Stage 1's global embedding are measured the same way, as controls.

Measurements (probe scores: R² or accuracy, study/probes.py; "own specific": a modality's specific factors read
from that modality's tokens):
  aligned        the L2-normalised mean of the overlapping tokens: the embedding users retrieve with;
  unique_gain    own specific score of [aligned, complementary] minus that of [aligned, the same seed and arm's
                 complementary token at initialisation]: what training put in the complementary token beyond the
                 aligned embedding, against the control;
  specific_gain  own specific score of the complementary token minus that of the aligned embedding;
  selectivity    the complementary token's score on shared factors; the aligned embedding's on specific ones;
  ordering       first-token R@1 of an objective minus that of its no-ordering control (mission -> nd0,
                 separate -> separate_noorder, prefix_all -> nd0); pooled_cost: pooled R@1 of the control minus
                 the objective's. A control whose first token is within FLAT_POINTS of its pooled R@1 means one
                 token suffices: ordering is then reported untestable, not failed.
  training length  the default objective and the best arm (the largest unique_gain among arms whose pooled R@1 is
                 at most COST_POINTS below the mission's, chosen from the main runs before the length runs start)
                 retrained at each of --lengths epochs (latent source).

Writes to --output: results.json (every number of every run), RESULTS.md (mean ± std over seeds, population
std; the decision and hypothesis tables computed from the numbers), prefix_<source>.png, probes_<source>.png,
lengths.png. Before the last stdout line come `study(mission): ...` and `study(separate): ...`, the same numbers
for each objective preset; the last line is
    study: ordering_gain=<m> ordering_std=<s> pooled_cost=<m> unique_gain=<m> unique_std=<s> specific_gain=<m> specific_std=<s> seeds=<n>
for main_train_stage2's default --objective, on the latent source (the first source given without it; nan where
the source has no factors), R@1 in points, std over seeds.
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import cache_features  # noqa: E402
import main_train_stage2 as train  # noqa: E402
from data_stage2 import DataError  # noqa: E402
from feature_cache import load_cache_meta  # noqa: E402
from loss_stage2 import prefix_curve, recall_at_k  # noqa: E402
from stage1 import build_stage1  # noqa: E402
from study.latent_tokens import VIEW_TOKEN_DROP, make_latent_cache, resolved_args  # noqa: E402
from study.probes import probe  # noqa: E402
from study.report import PRESETS, best_arm, headlines, plot, source_file, summary_line, write_report  # noqa: E402
from util.misc import modality_pairs, pair_name  # noqa: E402

MODALITIES = ["vision", "tactile"]  # of the synthetic sources: text adds no factor of its own there, only run time
LATENT_VIEWS = 2  # augmented views of the latent train split (the view objective needs two)

MISSION = ["--objective", "mission"]  # dropped for a trainer without --objective: its only loss is the mission's
SEPARATE_PRESET = ["--objective", "separate"]  # separate pathway, partner residual 1, all prefixes, nested dropout 0
PARTNER = ["--complementary_residual_source", "partner", "--complementary_residual_weight", "1"]
PATHWAY = ["--complementary_pathway", "separate"]
# (name, what it changes, training flags); every weight fixed a priori at 1.
ARMS = [
    ("mission", "the mission's exact loss (`--objective mission`): nested dropout 0.5, L2 + diversity at 0.01",
     MISSION),
    ("nd0", "mission, nested dropout 0 (its no-ordering control)", MISSION + ["--nested_dropout_rate", "0"]),
    ("residual", "mission + own residual (stop-gradient own aligned embedding + complementary -> own Stage 1 "
     "global), weight 1", MISSION + ["--complementary_residual_weight", "1"]),
    ("difference", "mission + DSN batch-level difference loss, weight 1 (H2)",
     MISSION + ["--complementary_difference_weight", "1"]),
    ("partner", "mission + cross-modal residual (stop-gradient partner aligned embedding + complementary -> own "
     "Stage 1 global), weight 1 (H3)", MISSION + PARTNER),
    ("view", "mission + contrastive between two augmented views of the complementary token, weight 1 (H3)",
     MISSION + ["--complementary_view_weight", "1"]),
    ("separate", "mission with a complementary pathway of its own (H5)", MISSION + PATHWAY),
    ("separate_partner", "separate pathway + cross-modal residual, weight 1 (H5)", MISSION + PATHWAY + PARTNER),
    ("prefix_all", "mission with the contrastive loss averaged over every prefix k = 1..K_o, nested dropout 0 (H4)",
     MISSION + ["--contrastive_prefixes", "all", "--nested_dropout_rate", "0"]),
    ("objective_separate", "`--objective separate`: separate pathway, cross-modal residual 1, all prefixes, "
     "nested dropout 0", SEPARATE_PRESET),
    ("separate_noorder", "`--objective separate --contrastive_prefixes full` (its no-ordering control)",
     SEPARATE_PRESET + ["--contrastive_prefixes", "full"]),
]
DEFAULT_ALIAS = "default"  # --arms default: the arm of main_train_stage2's default --objective (no flags)
# The image-derived source's long contexts (197 tactile tokens) make a step ~3x a latent one: it runs the arms
# the headline claims need.
TVL_ARMS = ("mission", "nd0", "objective_separate", "separate_noorder")
QUICK_ARMS = ("mission", "nd0", "objective_separate", "separate_noorder")  # the two summary lines' arms
# Why this width: RESULTS.md, hypothesis 6 (chosen by whether the no-ordering curve is flat, before any arm ran).
TVL_FLAGS = ["--embed_dim", "8"]
LATENT_NOTE = (f"Every arm trains on the {LATENT_VIEWS} augmented views of the train split (fresh token noise, each "
               f"context token dropped with probability {VIEW_TOKEN_DROP:g}: study/latent_tokens.py), as a "
               f"cache_features.py cache with augmented views is read; probes and retrieval read the plain view.")
TVL_NOTE = ("Setting (hypothesis 6): a narrow embedding, `--embed_dim 8` instead of the tiny Stage 1's 64, chosen by "
            "the ceiling criterion alone before any arm of the study ran. In a pilot on this data (nested dropout 0, "
            "5 epochs, seeds 0-1) the first token's R@1 was 0.9 points below the pooled embedding's at width 64 (flat: "
            "one token suffices, ordering untestable), 6.8 below at 8 and 2.6 below at 4; 8 is the widest tried whose "
            "no-ordering curve is not flat. (The pilot also ran nested dropout 0.5; the rule does not read it.)")
# Sizes: latent (train, val) samples, tvl (SSVTP, HCT) samples generated, epochs per source, the training-length
# axis; "smoke" only checks the plumbing (tests).
# --quick runs the full study's headline arms at the full size (so, on the same CPU, the very same runs): fewer
# arms, not smaller runs, is what keeps its numbers as informative as the full study's.
SIZES = {
    "full": dict(latent=(3072, 1024), tvl=(1000, 1000), epochs={"latent": 8, "tvl": 5}, seeds=3, lengths=(4, 24)),
    "quick": dict(latent=(3072, 1024), tvl=(1000, 1000), epochs={"latent": 8, "tvl": 5}, seeds=3, lengths=()),
    "smoke": dict(latent=(128, 64), tvl=(60, 60), epochs={"latent": 1, "tvl": 1}, seeds=2, lengths=(2,)),
}
# A register width of 64 instead of the mission's 256 keeps a run at seconds on a CPU; everything else is the
# mission's default (K = 4 tokens, 3 overlapping, depth 2, nested dropout 0.5 from the first step, reg 0.01).
TRAIN_FLAGS = ["--batch_size", "64", "--lr", "2e-3", "--warmup_epochs", "1", "--num_workers", "0",
               "--print_freq", "1000", "--register_width", "64"]
CACHE_TRAIN_FLAGS = ["--num_workers", "0", "--print_freq", "1000"]  # a user's cache: the trainer's recipe
CACHE_EPOCHS = 20


def source_spec(value):
    if value in ("latent", "tvl") or (value.startswith("cache:") and os.path.isdir(value[len("cache:"):])):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: latent, tvl, or cache:DIR with DIR a cache_features.py folder")


def get_args_parser():
    p = argparse.ArgumentParser("FluxTalk study", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "study", "results"), help="results folder")
    p.add_argument("--work_dir", default=None, help="data, caches and checkpoints (default: OUTPUT/work)")
    p.add_argument("--quick", action="store_true",
                   help=f"latent source, arms {', '.join(QUICK_ARMS)}, no length axis, unless told otherwise")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing only")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 3, smoke 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run, every source (default: by size)")
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="epochs of the training-length axis, besides --epochs (default: by size; none: off)")
    p.add_argument("--rewrite_report", action="store_true",
                   help="only rewrite RESULTS.md and the plots from OUTPUT/results.json (no training)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared CPU, spinning OpenMP threads made steps ~30x slower)")
    p.add_argument("--sources", nargs="+", default=None, type=source_spec,
                   help="latent, tvl, cache:DIR (default: latent tvl; --quick: latent)")
    p.add_argument("--arms", nargs="+", default=None, choices=[a[0] for a in ARMS] + [DEFAULT_ALIAS],
                   help="default: all available (--quick: the headline arms)")
    p.add_argument("--device", default="cpu", help="training and embedding device (cuda on a GPU box)")
    g = p.add_argument_group("cache:DIR sources (passed to training)")
    for flag in ("--stage1_checkpoint", "--clip_model", "--clip_pretrained", "--tactile_model"):
        g.add_argument(flag, default=None, help=f"main_train_stage2 {flag}")
    g.add_argument("--train_args", default="", help="more main_train_stage2 flags, one string (e.g. "
                   "'--batch_size 256 --datasets ssvtp')")
    return p


# ------------------------------------------------------------------------------------------------ data + Stage 1

def quiet(fn, log_path):
    """Runs fn() with stdout/stderr appended to log_path (each training run prints per-epoch lines)."""
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn()


def tiny_stage1(work):
    from tools.make_tiny_stage1 import make_tiny_stage1
    ckpt, clip = make_tiny_stage1(os.path.join(work, "stage1"), seed=0)
    flags = ["--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained", clip]
    return flags, build_stage1(ckpt, "fluxtalk-tiny", clip, active_modalities=MODALITIES)


def user_stage1(a, mods):
    """The Stage 1 flags and model of a cache:DIR source, from the study's pass-through flags."""
    flags = [x for f in ("stage1_checkpoint", "clip_model", "clip_pretrained", "tactile_model")
             if getattr(a, f) is not None for x in (f"--{f}", getattr(a, f))]
    args = train.parse_args(["--feature_cache", "unused", "--active_modality_names", *mods] + flags)
    return flags, build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                               active_modalities=mods)


def prepare_source(source, work, size, stage1_flags, stage1):
    """-> {"cache", "mods", "kinds": {factor: kind}, "classes": {factor: count}, "samples": {id: {factor: value}},
    "flags": training flags of the source}."""
    spec = {"mods": MODALITIES, "flags": TRAIN_FLAGS + (TVL_FLAGS if source == "tvl" else []),
            "stage1_flags": stage1_flags}
    cache = os.path.join(work, f"cache_{source}_{'_'.join(map(str, size[source]))}")
    log = os.path.join(work, f"prepare_{source}.log")
    if source == "latent":
        cache += f"_v{LATENT_VIEWS}"
        if not os.path.isfile(os.path.join(cache, "val", "meta.json")):
            args = train.parse_args(base_flags(dict(spec, cache=cache), "unused", 0, 1))
            make_latent_cache(cache, stage1, args, *size["latent"], seed=0, views=LATENT_VIEWS)
        with open(os.path.join(cache, "factors.json")) as f:
            info = json.load(f)
        return dict(spec, cache=cache, kinds=info["factors"], classes=info["classes"], samples=info["samples"])
    from tools.make_synthetic_tvl import FACTOR_INFO, MATERIALS, make_synthetic_tvl
    data = os.path.join(work, f"tvl_data_{'_'.join(map(str, size['tvl']))}")
    if not os.path.isfile(os.path.join(data, "hct", "factors.json")):
        make_synthetic_tvl(data, *size["tvl"], seed=0)
    code = quiet(lambda: cache_features.main(
        ["--output", cache, "--splits", "train", "val", "--datasets_dir", data, "--num_workers", "0",
         "--device", "cpu", "--active_modality_names", *MODALITIES] + stage1_flags), log)
    if code:
        raise RuntimeError(f"cache_features failed (exit {code}); see {log}")
    samples = {}
    for subset in ("ssvtp", "hct"):
        with open(os.path.join(data, subset, "factors.json")) as f:
            samples.update(json.load(f)["samples"])
    kinds = {k: "shared" if "," in seen else "specific" for k, seen in FACTOR_INFO.items()}
    return dict(spec, cache=cache, kinds=kinds, classes={"material": len(MATERIALS)}, samples=samples)


def prepare_user_cache(source, a):
    """A cache:DIR source: its modalities from the cache, no factors, the user's Stage 1 and training flags."""
    cache = source[len("cache:"):]
    mods = load_cache_meta(cache, "train")["active_modalities"]
    stage1_flags, stage1 = user_stage1(a, mods)
    spec = {"cache": cache, "mods": mods, "kinds": {}, "classes": {}, "samples": {},
            "flags": CACHE_TRAIN_FLAGS + shlex.split(a.train_args), "stage1_flags": stage1_flags,
            "eval_splits": [s for s in ("val", "test") if os.path.isfile(os.path.join(cache, s, "meta.json"))]}
    return spec, stage1


# --------------------------------------------------------------------------------------------------- training

def run_args(argv, stage1):
    """The args a training run with argv holds once it has resolved Stage 1's data recipe."""
    return resolved_args(train.parse_args(argv), stage1)


def base_flags(spec, out_dir, seed, epochs):
    return ["--feature_cache", spec["cache"], "--output_dir", out_dir, "--seed", str(seed), "--epochs", str(epochs),
            "--active_modality_names", *spec["mods"]] + spec["flags"] + spec["stage1_flags"]


def trainer_options():
    return {s for a in train.get_args_parser()._actions for s in a.option_strings}


def default_objective():
    """main_train_stage2's default --objective (a trainer without the flag computes the mission's loss)."""
    return train.get_args_parser().get_default("objective") or "mission"


def arm_flags(flags, known):
    """The arm's flags as this trainer takes them, or None when it lacks one."""
    if "--objective" not in known and flags[:2] == MISSION:
        flags = flags[2:]
    return flags if all(f in known for f in flags if f.startswith("--")) else None


def available_arms(wanted):
    """[(name, description, flags)] of the wanted arms (all when None) whose flags this main_train_stage2 knows,
    and the names of the others (reported as skipped). `default` names the default objective's arm."""
    wanted = None if wanted is None else {PRESETS[default_objective()][0] if w == DEFAULT_ALIAS else w
                                          for w in wanted}
    known = trainer_options()
    arms, skipped = [], []
    for name, desc, flags in ARMS:
        if wanted is not None and name not in wanted:
            continue
        ok = arm_flags(flags, known)
        if ok is None:
            skipped.append(name)
        else:
            arms.append((name, desc, ok))
    return arms, skipped


def run_failed(what, code, out_dir):
    """RuntimeError quoting the trainer's one-line error from the run's stdout.txt."""
    log = os.path.join(out_dir, "stdout.txt")
    with open(log) as f:
        errors = [line for line in f.read().splitlines() if line.startswith(("error:", "stopped:"))]
    return RuntimeError(f"{what} failed (exit {code}): {errors[-1] if errors else 'see ' + log}")


def train_run(argv, out_dir, stage1):
    """Trains one run in this process (afresh: an old out_dir is removed); -> (args, seconds)."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    t0 = time.time()
    code = quiet(lambda: train.main(argv), os.path.join(out_dir, "stdout.txt"))
    if code:
        raise run_failed(f"training {out_dir}", code, out_dir)
    return run_args(argv, stage1), time.time() - t0


def tvl_metrics(argv, out_dir, splits):
    """{split: eval_<split>.json} of main_train_stage2 --eval_only on the run's last checkpoint (Stage 2 and
    Stage 1's own numbers on the same samples and captions)."""
    out = {}
    for split in splits:
        code = quiet(lambda: train.main(argv + ["--eval_only", "--resume", os.path.join(out_dir, "checkpoint.pth"),
                                                "--eval_split", split]), os.path.join(out_dir, "stdout.txt"))
        if code:
            raise run_failed(f"--eval_only {split} of {out_dir}", code, out_dir)
        with open(os.path.join(out_dir, f"eval_{split}.json")) as f:
            out[split] = json.load(f)
    return out


# ------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed(registers, args, stage1, split, device="cpu"):
    """Register tokens {m: (N, K, E)} (every token kept, eval mode, the plain view of the train split), Stage 1
    globals {m: (N, E)}, sample ids."""
    plain = argparse.Namespace(**{**vars(args), "no_augment": True})
    ds = quiet(lambda: train.build_split(plain, split, stage1), os.devnull)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)
    registers.eval().to(device)
    mods = list(args.active_modality_names)
    regs, glob = {m: [] for m in mods}, {m: [] for m in mods}
    for batch in loader:
        tokens = {m: t.to(device).float() for m, t in batch["tokens"].items()}
        padding = {m: t.to(device) for m, t in batch["padding_mask"].items()} if "padding_mask" in batch else None
        n = next(iter(tokens.values())).shape[0]
        keep = torch.ones(n, registers.num_tokens, dtype=torch.bool, device=device)
        out = registers(tokens, padding, keep=keep)
        for m in mods:
            regs[m].append(out["registers"][m].float().cpu())
            glob[m].append(batch["global"][m].float())
    return {m: torch.cat(v) for m, v in regs.items()}, {m: torch.cat(v) for m, v in glob.items()}, ds.sample_ids


def representations(reg, k_o, comp_init=None):
    """{name: (N, F) numpy} of one modality's (N, K, E) register tokens: what the probes read. comp_init: (N, F_c)
    the complementary token(s) of the same samples from the untrained module, for the unique-gain control."""
    pooled = reg[:, :k_o].mean(1)
    aligned = F.normalize(pooled, dim=-1)  # what users retrieve with
    comp = reg[:, k_o:].flatten(1)
    reps = {"aligned": aligned, "overlapping": pooled, "complementary": comp,
            "aligned+complementary": torch.cat([aligned, comp], 1)}
    if comp_init is not None:
        reps["aligned+complementary(init)"] = torch.cat([aligned, comp_init], 1)
    reps.update({f"token{k}": reg[:, k] for k in range(reg.shape[1])})
    return {k: v.numpy() for k, v in reps.items()}


def factor_targets(ids, samples, kinds, classes):
    """{factor: (values (N,) or (N, T), valid bool (N,))}: samples without a value (no contact) are left out."""
    out = {}
    for f in kinds:
        vals = [samples[i].get(f) for i in ids]
        valid = np.array([v is not None and v != -1 for v in vals])
        first = next(v for v in vals if v is not None)
        fill = 0 if f in classes else ([0.0] * len(first) if isinstance(first, list) else 0.0)
        out[f] = (np.array([v if ok else fill for v, ok in zip(vals, valid)]), valid)
    return out


def probe_table(reps_train, reps_val, y_train, y_val, classes):
    """{representation: {factor: score}} for every representation and factor."""
    table = {}
    for name in reps_train:
        row = {}
        for f, (yt, vt) in y_train.items():
            yv, vv = y_val[f]
            row[f] = probe("class" if f in classes else "continuous", reps_train[name][vt], yt[vt],
                           reps_val[name][vv], yv[vv], classes.get(f))
        table[name] = row
    return table


def retrieval(regs, k_o):
    """Per pair and direction: Recall@1 of the aligned embedding, and the prefix curve k = 1..K."""
    out = {}
    for a, b in modality_pairs(list(regs)):
        sim = F.normalize(regs[a][:, :k_o].mean(1), dim=-1) @ F.normalize(regs[b][:, :k_o].mean(1), dim=-1).T
        curve = prefix_curve(regs[a], regs[b], regs[a].shape[1])  # every token, complementary ones too
        out[pair_name(a, b)] = {"r1": {"a2b": recall_at_k(sim, (1,))[1], "b2a": recall_at_k(sim.T, (1,))[1]},
                                "prefix": curve, "pair": [a, b]}
    return out


def mean_prefix(ret):
    """R@1 for k = 1..K, mean over pairs and directions."""
    return np.mean([p["prefix"][d] for p in ret.values() for d in ("a2b", "b2a")], axis=0).tolist()


def probe_mean(probes, kinds, rep, kind, base=None):
    """Mean probe score of representation `rep` (minus that of `base`) over the factors of `kind`: shared factors
    on every modality's tokens, specific / nuisance ones on their own modality's; nan when there are none."""
    vals = [probes[m][rep][f] - (probes[m][base][f] if base else 0.0) for m in probes for f, k in kinds.items()
            if k == kind and (kind == "shared" or f.startswith(m + "_")) and rep in probes[m]
            and (base is None or base in probes[m])]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(run, kinds, k_o):
    """The per-run numbers every table reads: {metric: value} (probe metrics only where factors are known)."""
    s = {"pooled": float(np.mean([v for p in run["retrieval"].values() for v in p["r1"].values()])),
         "first": run["prefix_mean"][0], "overlapping_k": run["prefix_mean"][k_o - 1], "all_k": run["prefix_mean"][-1],
         "norm_ratio": float(np.mean([n[k_o:] for n in run["norms"].values()]) /
                             np.mean([n[:k_o] for n in run["norms"].values()]))}
    return {**s, **probe_summary(run["probes"], kinds)} if kinds else s


def probe_summary(p, kinds):
    """The probe numbers of one run ({modality: {representation: {factor: score}}})."""
    return dict(unique_gain=probe_mean(p, kinds, "aligned+complementary", "specific", "aligned+complementary(init)"),
                specific_gain=probe_mean(p, kinds, "complementary", "specific", "aligned"),
                raw_gap=probe_mean(p, kinds, "complementary", "specific", "overlapping"),
                comp_specific=probe_mean(p, kinds, "complementary", "specific"),
                aligned_specific=probe_mean(p, kinds, "aligned", "specific"),
                overlap_specific=probe_mean(p, kinds, "overlapping", "specific"),
                comp_shared=probe_mean(p, kinds, "complementary", "shared"),
                aligned_shared=probe_mean(p, kinds, "aligned", "shared"),
                comp_nuisance=probe_mean(p, kinds, "complementary", "nuisance"),
                aligned_nuisance=probe_mean(p, kinds, "aligned", "nuisance"))


def evaluate_module(registers, args, stage1, spec, targets, device, init_comp=None):
    """Every measurement of one register module (trained or not). init_comp: {split: {m: (N, F_c)}}."""
    k_o = args.num_overlapping_tokens
    regs_va, _, _ = embed(registers, args, stage1, "val", device)
    ret = retrieval(regs_va, k_o)
    run = {"retrieval": ret, "prefix_mean": mean_prefix(ret),
           "norms": {m: [float(n) for n in r.norm(dim=-1).mean(0)] for m, r in regs_va.items()}}
    if spec["kinds"]:
        regs_tr, _, _ = embed(registers, args, stage1, "train", device)
        init = {s: init_comp[s] if init_comp else {m: None for m in regs_va} for s in ("train", "val")}
        run["probes"] = {m: probe_table(representations(regs_tr[m], k_o, init["train"][m]),
                                        representations(regs_va[m], k_o, init["val"][m]),
                                        targets["train"], targets["val"], spec["classes"]) for m in regs_va}
    run["summary"] = summarise(run, spec["kinds"], k_o)
    return run


def load_trained(args, stage1, out_dir):
    model = train.build_model(args, stage1)
    ckpt = torch.load(os.path.join(out_dir, "checkpoint.pth"), map_location="cpu", weights_only=True)
    model.registers.load_state_dict(ckpt["model"])
    return model.registers


def initial_module(args):
    """The register module a run with these args starts from: main_train_stage2.run seeds, builds Stage 1 (whose
    random initialisation before loading draws from the same generator), then the model; so do we."""
    train.seed_everything(args.seed)
    stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                          active_modalities=args.active_modality_names)
    return train.build_model(args, stage1).registers


def initial_complementary(args, stage1, device):
    """{split: {m: (N, F_c)}}: the complementary token(s) of the run's untrained module (the unique-gain control)."""
    registers, k_o = initial_module(args), args.num_overlapping_tokens
    return {s: {m: r[:, k_o:].flatten(1) for m, r in embed(registers, args, stage1, s, device)[0].items()}
            for s in ("train", "val")}


def stage1_controls(args, stage1, spec, targets, device):
    """What Stage 1's global embedding holds (probes) and retrieves (Recall@1 per pair), train/val as the runs."""
    registers = train.build_model(args, stage1).registers  # any module: embed() returns the globals beside
    _, glob_va, _ = embed(registers, args, stage1, "val", device)
    r1 = {}
    for a, b in modality_pairs(list(glob_va)):
        sim = F.normalize(glob_va[a], dim=-1) @ F.normalize(glob_va[b], dim=-1).T
        r1[pair_name(a, b)] = {"a2b": recall_at_k(sim, (1,))[1], "b2a": recall_at_k(sim.T, (1,))[1]}
    out = {"r1": r1}
    if spec["kinds"]:
        _, glob_tr, _ = embed(registers, args, stage1, "train", device)
        out["probes"] = {m: probe_table({"stage1_global": glob_tr[m].numpy()}, {"stage1_global": glob_va[m].numpy()},
                                        targets["train"], targets["val"], spec["classes"])["stage1_global"]
                         for m in glob_va}
    return out


# -------------------------------------------------------------------------------------------------------- main

def train_and_measure(source, name, flags, spec, stage1, work, seed, epochs, device):
    """One arm, one seed, one length: train, then every measurement (and TVL's metrics on a user's cache)."""
    out_dir = os.path.join(work, "runs", source_file(source), name, f"e{epochs}_seed{seed}")
    argv = base_flags(spec, out_dir, seed, epochs) + flags
    args, seconds = train_run(argv, out_dir, stage1)
    init = initial_complementary(args, stage1, device) if spec["kinds"] else None
    run = evaluate_module(load_trained(args, stage1, out_dir), args, stage1, spec, spec["targets"], device, init)
    if spec.get("eval_splits"):
        run["tvl"] = tvl_metrics(argv, out_dir, spec["eval_splits"])
    run.update(seed=seed, epochs=epochs, train_seconds=seconds, argv=argv)
    s = run["summary"]
    print(f"{source} {name} seed {seed} ({epochs} ep): R@1 {s['pooled']:.1f}, first token {s['first']:.1f}"
          + (f", unique_gain {s['unique_gain']:+.3f}, specific_gain {s['specific_gain']:+.3f}" if spec["kinds"] else "")
          + f" ({seconds:.0f}s)", flush=True)
    return run


def run_source(source, spec, stage1, work, epochs, seeds, arms, device):
    args0 = run_args(base_flags(spec, os.path.join(work, "unused"), 0, epochs), stage1)
    ids = {s: quiet(lambda s=s: train.build_split(args0, s, stage1), os.devnull).sample_ids for s in ("train", "val")}
    spec["targets"] = ({s: factor_targets(ids[s], spec["samples"], spec["kinds"], spec["classes"]) for s in ids}
                       if spec["kinds"] else None)
    src = {"kinds": spec["kinds"], "classes": spec["classes"], "num_train": len(ids["train"]),
           "num_val": len(ids["val"]), "num_tokens": args0.num_register_tokens,
           "num_overlapping": args0.num_overlapping_tokens, "epochs": epochs,
           "flags": spec["flags"],
           "stage1": stage1_controls(args0, stage1, spec, spec["targets"], device), "arms": {}, "init": [],
           "note": {"tvl": TVL_NOTE, "latent": LATENT_NOTE}.get(source)}
    for seed in range(seeds if spec["kinds"] else 0):
        args = run_args(base_flags(spec, os.path.join(work, "unused"), seed, epochs), stage1)
        src["init"].append(evaluate_module(initial_module(args), args, stage1, spec, spec["targets"], device))
    for name, desc, flags in arms:
        src["arms"][name] = {"description": desc, "flags": flags, "runs": [
            train_and_measure(source, name, flags, spec, stage1, work, seed, epochs, device) for seed in range(seeds)]}
    return src


def run_lengths(source, src, spec, stage1, work, lengths, seeds, arms, default_arm, device):
    """The training-length axis: the mission, the default objective's arm and the best arm (best_arm's rule, on
    the main runs) at each length; the main runs stand for their own length."""
    best = best_arm(src, default_arm)
    flags = {name: f for name, _, f in arms}
    names = [a for a in dict.fromkeys(["mission", default_arm, best]) if a in src["arms"]]
    runs = {a: {str(e): src["arms"][a]["runs"] if e == src["epochs"] else
                [train_and_measure(source, a, flags[a], spec, stage1, work, seed, e, device) for seed in range(seeds)]
                for e in sorted(set(lengths) | {src["epochs"]})} for a in names}
    src["lengths"] = {"best": best, "runs": runs}


def run_sources(results, sources, size, epochs, seeds, lengths, arms, default, work, a):
    """Every source's runs into results["sources"]."""
    tiny = tiny_stage1(work) if any(s in ("latent", "tvl") for s in sources) else None
    for source in sources:
        if source.startswith("cache:"):
            spec, stage1 = prepare_user_cache(source, a)
        else:
            spec = prepare_source(source, work, size, tiny[0], tiny[1])
            stage1 = tiny[1]
        spec["flags"] = spec["flags"] + ["--device", a.device]
        source_arms = [x for x in arms if source != "tvl" or x[0] in TVL_ARMS]
        src = results["sources"][source] = run_source(source, spec, stage1, work, epochs[source], seeds,
                                                      source_arms, a.device)
        if source == "latent" and lengths:
            run_lengths(source, src, spec, stage1, work, lengths, seeds, source_arms, PRESETS[default][0], a.device)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    parser = get_args_parser()
    a = parser.parse_args(argv)
    if a.rewrite_report:
        with open(os.path.join(a.output, "results.json")) as f:
            results = json.load(f)
        write_report(results, a.output)
        plot(results, a.output)
        return 0
    t0 = time.time()
    size_name = "smoke" if a.smoke else "quick" if a.quick else "full"
    size = SIZES[size_name]
    seeds = a.seeds or size["seeds"]
    sources = a.sources or (["latent"] if a.quick and not a.smoke else ["latent", "tvl"])
    epochs = {s: a.epochs or size["epochs"].get(s, CACHE_EPOCHS) for s in sources}
    lengths = size["lengths"] if a.lengths is None else a.lengths
    arms, skipped = available_arms(a.arms or (QUICK_ARMS if a.quick else None))
    default = default_objective()
    missing = [n for n in PRESETS[default] if n not in [x[0] for x in arms]]
    if missing:
        return fail(f"--arms must include {' and '.join(PRESETS[default])} (the summary line compares the default "
                    f"objective, {default}, with its no-ordering control); missing or unknown to main_train_stage2: "
                    f"{', '.join(missing)}")
    if any(s.startswith("cache:") for s in sources) and not a.stage1_checkpoint:
        return fail("--sources cache:DIR needs --stage1_checkpoint (and --clip_model/--clip_pretrained) of the "
                    "Stage 1 that made the cache")
    if skipped:
        print(f"study: skipping arms whose flags main_train_stage2 lacks: {', '.join(skipped)}")
    torch.set_num_threads(a.threads)
    out = a.output
    work = a.work_dir or os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    results = {"command": " ".join(["python study/run_study.py"] + (argv if argv is not None else sys.argv[1:])),
               "size": size_name, "seeds": seeds, "epochs": epochs, "lengths": list(lengths), "threads": a.threads,
               "device": a.device, "default_objective": default, "skipped_arms": skipped, "sources": {}}
    try:
        run_sources(results, sources, size, epochs, seeds, lengths, arms, default, work, a)
    except DataError as e:  # a cache:DIR that is no cache
        return fail(str(e))
    except RuntimeError as e:  # a run that failed: the trainer's line
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["headline_source"] = "latent" if "latent" in sources else sources[0]
    results["wall_time_s"] = time.time() - t0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, out)
    plot(results, out)
    heads = headlines(results["sources"][results["headline_source"]])
    for preset in PRESETS:
        print(summary_line(f"study({preset})", heads[preset]))
    for source, src in results["sources"].items():
        for h in filter(None, headlines(src).values()):
            if h["flat"]:
                print(f"study: {source}, {h['arm']}: ordering untestable: one token suffices")
    print(summary_line("study", heads[default]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
