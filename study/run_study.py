"""Does FluxTalk do what it claims? Train Stage 2 under several objectives and seeds on data with known factors,
and measure retrieval, prefix ordering and what each register token holds, per modality, on the representation
users get.

    python study/run_study.py --quick --output /tmp/study     # <= 10 min on a shared 2-core CPU: what the summary
                                                              # lines need, on both latent sources (the same
                                                              # runs as the full study; no untrained-module rows)
    python study/run_study.py                                 # the full study, into study/results/
    python study/run_study.py --sources cache:/data/tvl_cache --stage1_checkpoint tvl_enc_vitb.pth \\
        --clip_model ViT-L-14 --clip_pretrained datacomp_xl_s13b_b90k \\
        --arms mission nd0 objective_separate separate_noorder tokens --seeds 3 --epochs 20 --device cuda

Claims tested: nested dropout (or a loss over every prefix) orders the register tokens, so a prefix is a usable
embedding, at little cost to the pooled one; the overlapping tokens align what the modalities share; the
complementary token keeps what only its modality sees, for each modality (touch first), also where Stage 1's
tactile global embedding has shed what only touch sees. Issue 17's hypotheses 1-6 and issue 22's 7 are tested by
the arms below; every objective weight is fixed a priori at 1 (nothing was tuned).

Sources, each a main_train_stage2 feature cache (so a run trains in seconds on a CPU):
  latent       token features written from known latents (study/latent_tokens.py): shared, modality-specific (also
               in Stage 1's global embedding) and nuisance (tokens only); the train split holds 2 augmented views
               (fresh token noise and token dropout) that every arm trains on and the view objective contrasts;
  latent_shed  the same tokens byte for byte, but touch's Stage 1 global embedding holds none of its specific latent
               (vision's holds all of it): what a tactile encoder trained contrastively against CLIP looks like;
  tvl          the synthetic TVL-format dataset of tools/make_synthetic_tvl.py through the tiny frozen Stage 1 of
               tools/make_tiny_stage1.py, with a narrow embedding (TVL_FLAGS: why in RESULTS.md);
  cache:DIR    a user's own feature cache (cache_features.py) with their Stage 1 flags: no factors are known there,
               so only what needs none is measured: pooled / first-token R@1, the prefix curve, content_gain and the
               Stage 1 diagnostic below, and TVL's metrics with Stage 1 beside them (main_train_stage2 --eval_only,
               on val and on test where the cache has it).
Every arm is trained through main_train_stage2.main() from the cache, once per seed; its last checkpoint is loaded
into the register module and run over the cached val (and plain train view, for the probes) features with every
token kept. The untrained register module of the same seed and arm (the weights its training starts from) and
Stage 1's global embedding are measured the same way, as controls. Arms whose flags the trainer lacks are skipped
(and listed). The full study runs issue 17's other arms (LATENT_ONLY_ARMS) on latent only, every other arm on both
latent sources, TVL_ARMS on tvl.

Measurements, each per modality m (touch first) and as the mean over modalities (probe scores: R² or accuracy,
study/probes.py; "own specific": m's specific factors read from m's tokens):
  aligned        the L2-normalised mean of the overlapping tokens: the embedding users retrieve with;
  unique_gain    own specific score of [aligned, complementary] minus that of [aligned, the same seed and arm's
                 complementary token at initialisation]: what training put in the complementary token beyond the
                 aligned embedding, against the control;
  specific_gain  own specific score of the complementary token minus that of the aligned embedding;
  selectivity    the complementary token's own specific score minus its shared score (beside: its nuisance score,
                 what a token-level target keeps too);
  content_gain   (no factors needed) the same control as unique_gain, on the modality's own Stage 1 token content:
                 the top CONTENT_K = 16 principal components of its mean-pooled (non-padded) context tokens, PCA
                 fitted on the train split's plain view, scored by the variance-weighted R² of a ridge probe.
                 Validated against unique_gain on the latent sources, and against own_gain: unique_gain's measure
                 on every factor only m sees (specific and nuisance), which is all a factor-free measure can see;
  stage1_content (no training) the content R² from [partner's Stage 1 global, own] minus from [partner's] alone:
                 whether m's global embedding holds token content the partner cannot predict, i.e. whether a
                 global-embedding target (the partner residual) has anything to teach the complementary token;
  ordering       first-token R@1 of an arm minus that of its no-ordering control (arm_roles: separate_noorder on the
                 separate pathway, nd0 on the shared one); pooled_cost: pooled R@1 of the control minus the arm's.
                 A control whose first token is within FLAT_POINTS of its pooled R@1 means one token suffices:
                 ordering is then reported untestable, not failed;
  training length  the default objective and the best arm (the largest unique_gain among arms whose pooled R@1 is
                 at most COST_POINTS below the mission's, chosen from the main runs before the length runs start)
                 retrained at each of --lengths epochs (latent source).
The decision rule (study/report.py decide(), fixed before any full run) picks the default objective from these.

Writes to --output: results.json (every number of every run, the decision, the content_gain validation),
RESULTS.md (mean ± std over seeds, population std; the decision, hypothesis and validation tables computed from
the numbers), prefix_<source>.png, probes_<source>.png, modalities.png, content_validation.png, lengths.png.
Before the last stdout line come `study(mission): ...`, `study(separate): ...`, `study(tokens): ...` (the same
numbers for each objective preset), `study(decision): ...`, one `study(content, <source>, <arm>): ...` per source
(content_gain and stage1_content per modality, for the default's arm) and `study(content_agreement): ...`; the last
line is
    study: ordering_gain=<m> ordering_std=<s> pooled_cost=<m> unique_gain=<m> unique_std=<s> unique_vision=<m>
    unique_vision_std=<s> unique_tactile=<m> unique_tactile_std=<s> unique_tactile_shed=<m>
    unique_tactile_shed_std=<s> specific_gain=<m> specific_std=<s> seeds=<n>
(one line) for main_train_stage2's default --objective, on the latent source (the first source given without it;
nan where the source has no factors): unique_gain and specific_gain the mean over modalities, unique_<m> per
modality, unique_tactile_shed touch's on latent_shed; R@1 in points, std over seeds.
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
from study.probes import pca, probe_content, probe_many  # noqa: E402
from study.report import (PRESETS, agreement_line, best_arm, content_line, content_validation, decide,  # noqa: E402
                          decision_line, headlines, modality_order, plot, preset_headline, source_file, summary_line,
                          write_report)
from util.misc import modality_pairs, pair_name  # noqa: E402

MODALITIES = ["vision", "tactile"]  # of the synthetic sources: text adds no factor of its own there, only run time
LATENT_VIEWS = 2  # augmented views of the latent train split (the view objective needs two)

MISSION = ["--objective", "mission"]  # dropped for a trainer without --objective: its only loss is the mission's
SEPARATE_PRESET = ["--objective", "separate"]  # separate pathway, partner residual 1, all prefixes, nested dropout 0
TOKENS_PRESET = ["--objective", "tokens"]  # separate with the token-level residual (pooled, InfoNCE) in its place
COSINE = ["--complementary_token_loss", "cosine"]
PARTNER = ["--complementary_residual_source", "partner", "--complementary_residual_weight", "1"]
PATHWAY = ["--complementary_pathway", "separate"]
DIFFERENCE = ["--complementary_difference_weight", "1"]
VIEW = ["--complementary_view_weight", "1"]
# (name, what it changes, training flags); every weight fixed a priori at 1.
ARMS = [
    ("mission", "the mission's exact loss (`--objective mission`): nested dropout 0.5, L2 + diversity at 0.01",
     MISSION),
    ("nd0", "mission, nested dropout 0 (its no-ordering control)", MISSION + ["--nested_dropout_rate", "0"]),
    ("residual", "mission + own residual (stop-gradient own aligned embedding + complementary -> own Stage 1 "
     "global), weight 1", MISSION + ["--complementary_residual_weight", "1"]),
    ("difference", "mission + DSN batch-level difference loss, weight 1 (H2)", MISSION + DIFFERENCE),
    ("partner", "mission + cross-modal residual (stop-gradient partner aligned embedding + complementary -> own "
     "Stage 1 global), weight 1 (H3)", MISSION + PARTNER),
    ("view", "mission + contrastive between two augmented views of the complementary token, weight 1 (H3)",
     MISSION + VIEW),
    ("separate", "mission with a complementary pathway of its own (H5)", MISSION + PATHWAY),
    ("separate_partner", "separate pathway + cross-modal residual, weight 1 (H5)", MISSION + PATHWAY + PARTNER),
    ("prefix_all", "mission with the contrastive loss averaged over every prefix k = 1..K_o, nested dropout 0 (H4)",
     MISSION + ["--contrastive_prefixes", "all", "--nested_dropout_rate", "0"]),
    ("objective_separate", "`--objective separate`: separate pathway, cross-modal residual 1, all prefixes, "
     "nested dropout 0", SEPARATE_PRESET),
    ("separate_noorder", "`--objective separate --contrastive_prefixes full` (the separate pathway's no-ordering "
     "control)", SEPARATE_PRESET + ["--contrastive_prefixes", "full"]),
    # issue 22: complementary signals that do not come from Stage 1's global embedding
    # The token arms' flags are those the study's first full run measured (then `tokens` was the cosine form); its
    # decision rule chose the InfoNCE form, which `--objective tokens` became, and the arms were renamed to match.
    ("tokens_cosine", "separate with the token-level residual (decode the own frozen context tokens, mean-pooled and "
     "centred, from [stop-gradient partner aligned, complementary]; 1 - cos) in place of the residual, weight 1",
     TOKENS_PRESET + COSINE),
    ("tokens_decoder", "tokens_cosine, every context token predicted (one learned query per position, MAE-style "
     "decoder over the 2-token memory)", TOKENS_PRESET + COSINE + ["--complementary_token_target", "tokens"]),
    ("tokens", "`--objective tokens`: tokens_cosine with a conditional InfoNCE (FactorCL/CPC-style) on the pooled "
     "target instead of the cosine", TOKENS_PRESET),
    ("tokens_difference", "tokens_cosine + the difference term, weight 1", TOKENS_PRESET + COSINE + DIFFERENCE),
    ("separate_view", "`--objective separate` + the view term, weight 1", SEPARATE_PRESET + VIEW),
    ("separate_view_difference", "`--objective separate` + the view and difference terms, weight 1 each",
     SEPARATE_PRESET + VIEW + DIFFERENCE),
    ("separate_difference", "`--objective separate` + the difference term, weight 1", SEPARATE_PRESET + DIFFERENCE),
]
DEFAULT_ALIAS = "default"  # --arms default: the arm of main_train_stage2's default --objective (no flags)
# The latent-source axis: {modality: fraction of its specific latent in its Stage 1 global embedding} (default 1).
LATENT_SOURCES = {"latent": {}, "latent_shed": {"tactile": 0.0}}
# Issue 17's arms other than the headline ones run on `latent` only (time): every other arm runs on both latent
# sources, which the decision rule needs.
LATENT_ONLY_ARMS = ("residual", "difference", "partner", "view", "separate", "separate_partner", "prefix_all")
# The image-derived source's long contexts (197 tactile tokens) make a step ~3x a latent one: it runs the arms
# the headline claims need: the presets' arms and their controls.
TVL_ARMS = ("mission", "nd0", "objective_separate", "separate_noorder", "tokens")
# Why this width: RESULTS.md, hypothesis 6 (chosen by whether the no-ordering curve is flat, before any arm ran).
TVL_FLAGS = ["--embed_dim", "8"]
LATENT_NOTE = (f"Every arm trains on the {LATENT_VIEWS} augmented views of the train split (fresh token noise, each "
               f"context token dropped with probability {VIEW_TOKEN_DROP:g}: study/latent_tokens.py), as a "
               f"cache_features.py cache with augmented views is read; probes and retrieval read the plain view.")
SHED_NOTE = ("The same tokens (byte for byte), the same arms and seeds as `latent`; only touch's Stage 1 global "
             "embedding differs: it holds none of the tactile specific latent (vision's holds all of it), as a "
             "tactile encoder trained contrastively against CLIP would. " + LATENT_NOTE)
TVL_NOTE = ("Setting (hypothesis 6): a narrow embedding, `--embed_dim 8` instead of the tiny Stage 1's 64, chosen by "
            "the ceiling criterion alone before any arm of the study ran. In a pilot on this data (nested dropout 0, "
            "5 epochs, seeds 0-1) the first token's R@1 was 0.9 points below the pooled embedding's at width 64 (flat: "
            "one token suffices, ordering untestable), 6.8 below at 8 and 2.6 below at 4; 8 is the widest tried whose "
            "no-ordering curve is not flat. (The pilot also ran nested dropout 0.5; the rule does not read it.)")
CONTENT_K = 16  # content_gain: the top principal components of the pooled Stage 1 tokens (fixed a priori)
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


def quick_plan(default):
    """The arm names of --quick (on every source it runs): what the summary lines need, by priority, as many as fit in 10 minutes on a
    shared 2-core CPU (a run is ~20 s there): the default objective's arm and control on both latent sources (the
    last line and the rule's ordering), the mission on both (the rule's pooled R@1 reference and its line's gains;
    its ordering needs nd0, which only the full study runs), then the other presets' arms (their lines)."""
    arm, control = PRESETS[default]
    others = [a for p in PRESETS if p not in (default, "mission") for a in PRESETS[p]]
    return list(dict.fromkeys([arm, control, "mission"] + others))


def size_key(source):
    """The SIZES entry a source reads (both latent sources share one)."""
    return "latent" if source in LATENT_SOURCES else source


def source_spec(value):
    if value in LATENT_SOURCES or value == "tvl" or (value.startswith("cache:")
                                                     and os.path.isdir(value[len("cache:"):])):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: {', '.join(LATENT_SOURCES)}, tvl, or cache:DIR with DIR a "
                                     f"cache_features.py folder")


def get_args_parser():
    p = argparse.ArgumentParser("FluxTalk study", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "study", "results"), help="results folder")
    p.add_argument("--work_dir", default=None, help="data, caches and checkpoints (default: OUTPUT/work)")
    p.add_argument("--quick", action="store_true",
                   help="both latent sources, the arms the summary lines need (the default objective's and its "
                        "control's first, then the mission's, then the other presets'), no length axis, unless told "
                        "otherwise")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing only")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 3, smoke 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run, every source (default: by size)")
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="epochs of the training-length axis, besides --epochs (default: by size; none: off)")
    p.add_argument("--rewrite_report", action="store_true",
                   help="no training: recompute every derived number from the raw measurements in "
                        "OUTPUT/results.json (rewritten with them), then RESULTS.md, the plots and the summary lines")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared CPU, spinning OpenMP threads made steps ~30x slower)")
    p.add_argument("--sources", nargs="+", default=None, type=source_spec,
                   help=f"{', '.join(LATENT_SOURCES)}, tvl, cache:DIR (default: {' '.join(LATENT_SOURCES)} tvl; "
                        f"--quick: {' '.join(LATENT_SOURCES)})")
    p.add_argument("--arms", nargs="+", default=None, choices=[a[0] for a in ARMS] + [DEFAULT_ALIAS],
                   help="run these on every source (tvl: those of them it runs). Default: all available on latent, "
                        f"all but {', '.join(LATENT_ONLY_ARMS)} on latent_shed, {', '.join(TVL_ARMS)} on tvl, all "
                        "on cache:DIR; --quick: what the summary lines need")
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
    cache = os.path.join(work, f"cache_{source}_{'_'.join(map(str, size[size_key(source)]))}")
    log = os.path.join(work, f"prepare_{source}.log")
    if source in LATENT_SOURCES:
        cache += f"_v{LATENT_VIEWS}"
        if not os.path.isfile(os.path.join(cache, "val", "meta.json")):
            args = train.parse_args(base_flags(dict(spec, cache=cache), "unused", 0, 1))
            make_latent_cache(cache, stage1, args, *size["latent"], seed=0, views=LATENT_VIEWS,
                              global_specific=LATENT_SOURCES[source])
        with open(os.path.join(cache, "factors.json")) as f:
            info = json.load(f)
        return dict(spec, cache=cache, kinds=info["factors"], classes=info["classes"], samples=info["samples"],
                    global_specific={m: LATENT_SOURCES[source].get(m, 1.0) for m in MODALITIES})
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
    """{flag: its choices (None: any value)} of main_train_stage2."""
    return {s: a.choices for a in train.get_args_parser()._actions for s in a.option_strings}


def default_objective():
    """main_train_stage2's default --objective (a trainer without the flag computes the mission's loss)."""
    return train.get_args_parser().get_default("objective") or "mission"


def arm_flags(flags, known):
    """The arm's flags as this trainer takes them, or None when it lacks one (or one of its values: a preset such
    as `--objective tokens` that this trainer does not know). known: trainer_options()."""
    if "--objective" not in known and flags[:2] == MISSION:
        flags = flags[2:]
    for i, f in enumerate(flags):
        if f.startswith("--") and (f not in known or (known[f] is not None and i + 1 < len(flags)
                                                      and flags[i + 1] not in map(str, known[f]))):
            return None
    return flags


def arm_roles(arms, spec):
    """{arm: (no-ordering control, twin)} of the given (available) arms, from the flags as the trainer parses them.
    An arm with neither nested dropout nor the all-prefix loss is a control (None). The control of any other arm is
    the control with the same pathway: on the separate pathway no complementary objective changes the overlapping
    tokens, so `separate_noorder` is every such arm's exact control; on the shared pathway `nd0` is the mission's
    (an arm's complementary objective also changes what its overlapping tokens compute there). twin, separate
    pathway only: the first arm with the same overlapping objective (pathway, prefixes, nested dropout), whose
    pooled and first-token R@1 the arm must equal seed by seed."""
    sig = {}
    for name, _, flags in arms:
        a = train.parse_args(base_flags(spec, "unused", 0, 1) + flags)
        sig[name] = (a.complementary_pathway, a.contrastive_prefixes, a.nested_dropout_rate)
    controls = [n for n, (_, prefixes, rate) in sig.items() if prefixes == "full" and rate == 0]
    roles = {}
    for name, (pathway, prefixes, rate) in sig.items():
        control = None if name in controls else next((c for c in controls if sig[c][0] == pathway), None)
        twin = next(n for n in sig if sig[n] == sig[name]) if pathway == "separate" else None
        roles[name] = (control, twin)
    return roles


def available_arms():
    """[(name, description, flags)] of the arms whose flags this main_train_stage2 knows, and the names of the
    others (reported as skipped where a source would run them)."""
    known = trainer_options()
    arms, skipped = [], []
    for name, desc, flags in ARMS:
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

def plain_loader(args, stage1, split):
    """A loader over the plain view of a split (val; the train split un-augmented), in sample order."""
    plain = argparse.Namespace(**{**vars(args), "no_augment": True})
    ds = quiet(lambda: train.build_split(plain, split, stage1), os.devnull)
    return torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)


@torch.no_grad()
def embed(registers, args, stage1, split, device="cpu"):
    """Register tokens {m: (N, K, E)} (every token kept, eval mode, the plain view of the split)."""
    registers.eval().to(device)
    regs = {m: [] for m in args.active_modality_names}
    for batch in plain_loader(args, stage1, split):
        tokens = {m: t.to(device).float() for m, t in batch["tokens"].items()}
        padding = {m: t.to(device) for m, t in batch["padding_mask"].items()} if "padding_mask" in batch else None
        n = next(iter(tokens.values())).shape[0]
        keep = torch.ones(n, registers.num_tokens, dtype=torch.bool, device=device)
        out = registers(tokens, padding, keep=keep)
        for m in regs:
            regs[m].append(out["registers"][m].float().cpu())
    return {m: torch.cat(v) for m, v in regs.items()}


def stage1_features(args, stage1, split):
    """Stage 1's ({m: global (N, E)}, {m: context tokens mean-pooled over their non-padded positions (N, C_m)}),
    float64 numpy, the plain view in embed()'s sample order."""
    glob, pooled = {m: [] for m in args.active_modality_names}, {m: [] for m in args.active_modality_names}
    for batch in plain_loader(args, stage1, split):
        for m in glob:
            t = batch["tokens"][m].double()  # (B, N, C)
            pad = batch.get("padding_mask", {}).get(m)  # (B, N) True = padded (text), or None
            w = torch.ones(t.shape[:2], dtype=t.dtype) if pad is None else (~pad).to(t.dtype)
            pooled[m].append((t * w[..., None]).sum(1) / w.sum(1, keepdim=True))
            glob[m].append(batch["global"][m].double())
    return ({m: torch.cat(v).numpy() for m, v in glob.items()}, {m: torch.cat(v).numpy() for m, v in pooled.items()})


def content_targets(pooled_train, pooled_val):
    """{m: {"train": (N, k), "val": (N, k)}}: the content content_gain recovers, fixed a priori: each modality's
    pooled Stage 1 tokens projected on their top k = CONTENT_K principal components (fewer where the width or the
    sample count is smaller), PCA fitted on the train split's plain view."""
    out = {}
    for m in pooled_train:
        mean, comps = pca(pooled_train[m], CONTENT_K)
        out[m] = {"train": (pooled_train[m] - mean) @ comps, "val": (pooled_val[m] - mean) @ comps}
    return out


def content_scores(reps_train, reps_val, target):
    """{representation: variance-weighted R² of the content target (study/probes.py probe_content)} for the
    representations content_gain reads."""
    return {r: probe_content(reps_train[r], target["train"], reps_val[r], target["val"])
            for r in ("aligned", "aligned+complementary", "aligned+complementary(init)") if r in reps_train}


def stage1_content(glob, content):
    """The Stage 1 diagnostic, {m: {"partner", "partner+own", "stage1_content", "k"}}: content R² of m's token
    content from a partner's Stage 1 global embedding, from [partner's, own], and the difference (each the mean over
    the partner modalities, as the trainer's partner residual averages over them): how much of its own token content
    beyond what the partner predicts m's global embedding holds. glob {split: {m: (N, E)}}."""
    out = {}
    for m, target in content.items():
        def score(mods):
            x = {s: np.concatenate([glob[s][p] for p in mods], 1) for s in ("train", "val")}
            return probe_content(x["train"], target["train"], x["val"], target["val"])
        partners = [p for p in glob["train"] if p != m]
        alone, both = np.mean([score([p]) for p in partners]), np.mean([score([p, m]) for p in partners])
        out[m] = {"partner": float(alone), "partner+own": float(both), "stage1_content": float(both - alone),
                  "k": int(target["train"].shape[1])}
    return out


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
    """{representation: {factor: score}} for every representation and factor; the factors with the same valid
    samples share each representation's standardisation and cross-validation folds (probe_many)."""
    groups = {}  # the factors with the same valid train / val samples
    for f, (_, valid) in y_train.items():
        groups.setdefault((valid.tobytes(), y_val[f][1].tobytes()), []).append(f)
    scores = {name: {} for name in reps_train}
    for factors in groups.values():
        vt, vv = y_train[factors[0]][1], y_val[factors[0]][1]
        targets = [("class" if f in classes else "continuous", y_train[f][0][vt], y_val[f][0][vv], classes.get(f))
                   for f in factors]
        for name in reps_train:
            scores[name].update(zip(factors, probe_many(reps_train[name][vt], reps_val[name][vv], targets)))
    return {name: {f: row[f] for f in y_train} for name, row in scores.items()}


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


def probe_mean(probes, kinds, rep, kind, base=None, mods=None):
    """Mean probe score of representation `rep` (minus that of `base`) over the factors of `kind` (one kind or a
    tuple of them): shared factors on every modality's tokens, specific / nuisance ones on their own modality's;
    only modalities `mods` (default: all); nan when there are none."""
    wanted = (kind,) if isinstance(kind, str) else kind
    vals = [probes[m][rep][f] - (probes[m][base][f] if base else 0.0) for m in (mods or probes)
            for f, k in kinds.items() if k in wanted and (k == "shared" or f.startswith(m + "_"))
            and rep in probes[m] and (base is None or base in probes[m])]
    return float(np.mean(vals)) if vals else float("nan")


def mean_over(values):
    """Mean of the non-nan values; nan when there are none."""
    v = [x for x in values if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


# summary statistic -> (representation, factor kind, control representation) of probe_mean, per modality
PROBE_MEANS = {"unique_gain": ("aligned+complementary", "specific", "aligned+complementary(init)"),
               # unique_gain's measure on the nuisance factors, and on every factor only m sees (specific and
               # nuisance): what a measure that knows no factors (content_gain) can tell apart at best
               "nuisance_gain": ("aligned+complementary", "nuisance", "aligned+complementary(init)"),
               "own_gain": ("aligned+complementary", ("specific", "nuisance"), "aligned+complementary(init)"),
               "specific_gain": ("complementary", "specific", "aligned"),
               "raw_gap": ("complementary", "specific", "overlapping"),
               "comp_specific": ("complementary", "specific", None), "aligned_specific": ("aligned", "specific", None),
               "overlap_specific": ("overlapping", "specific", None), "comp_shared": ("complementary", "shared", None),
               "aligned_shared": ("aligned", "shared", None), "comp_nuisance": ("complementary", "nuisance", None),
               "aligned_nuisance": ("aligned", "nuisance", None)}


def summarise(run, kinds, k_o):
    """The per-run numbers every table reads: {metric: value}; per modality m as f"{metric}_{m}" with the bare
    metric their mean (probe metrics only where factors are known)."""
    s = {"pooled": float(np.mean([v for p in run["retrieval"].values() for v in p["r1"].values()])),
         "first": run["prefix_mean"][0], "overlapping_k": run["prefix_mean"][k_o - 1], "all_k": run["prefix_mean"][-1],
         "norm_ratio": float(np.mean([n[k_o:] for n in run["norms"].values()]) /
                             np.mean([n[:k_o] for n in run["norms"].values()]))}
    s.update(content_summary(run["content"]))
    return {**s, **probe_summary(run["probes"], kinds)} if kinds else s


def content_summary(content):
    """content_gain per modality: content score of [aligned, complementary] minus that of [aligned, complementary
    at initialisation] (nan without the control: an untrained module)."""
    out = {f"content_gain_{m}": c["aligned+complementary"] - c.get("aligned+complementary(init)", float("nan"))
           for m, c in content.items()}
    return {**out, "content_gain": mean_over(out.values())}


def probe_summary(p, kinds):
    """The probe numbers of one run ({modality: {representation: {factor: score}}}): PROBE_MEANS and selectivity
    (the complementary token's own specific score minus its shared score), per modality and their mean."""
    out = {}
    for m in p:
        out.update({f"{stat}_{m}": probe_mean(p, kinds, rep, kind, base, [m])
                    for stat, (rep, kind, base) in PROBE_MEANS.items()})
        out[f"selectivity_{m}"] = out[f"comp_specific_{m}"] - out[f"comp_shared_{m}"]
    for stat in list(PROBE_MEANS) + ["selectivity"]:
        out[stat] = mean_over([out[f"{stat}_{m}"] for m in p])
    return out


def evaluate_module(registers, args, stage1, spec, device, init_comp=None):
    """Every measurement of one register module (trained or not). init_comp: {split: {m: (N, F_c)}}."""
    k_o = args.num_overlapping_tokens
    regs = {s: embed(registers, args, stage1, s, device) for s in ("val", "train")}
    ret = retrieval(regs["val"], k_o)
    run = {"retrieval": ret, "prefix_mean": mean_prefix(ret),
           "norms": {m: [float(n) for n in r.norm(dim=-1).mean(0)] for m, r in regs["val"].items()}}
    init = {s: init_comp[s] if init_comp else {m: None for m in regs[s]} for s in regs}
    reps = {s: {m: representations(r, k_o, init[s][m]) for m, r in regs[s].items()} for s in regs}
    run["content"] = {m: content_scores(reps["train"][m], reps["val"][m], spec["content"][m]) for m in reps["val"]}
    if spec["kinds"]:
        run["probes"] = {m: probe_table(reps["train"][m], reps["val"][m], spec["targets"]["train"],
                                        spec["targets"]["val"], spec["classes"]) for m in reps["val"]}
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
    """{split: {m: (N, F_c)}}: the complementary token(s) of the run's untrained module (the unique_gain and
    content_gain control)."""
    registers, k_o = initial_module(args), args.num_overlapping_tokens
    return {s: {m: r[:, k_o:].flatten(1) for m, r in embed(registers, args, stage1, s, device).items()}
            for s in ("train", "val")}


def stage1_controls(spec, feats):
    """What Stage 1's global embedding holds (probes; the content diagnostic) and retrieves (Recall@1 per pair),
    train/val as the runs. feats {split: stage1_features()}."""
    glob = {s: feats[s][0] for s in feats}
    r1 = {}
    for a, b in modality_pairs(list(glob["val"])):
        g = {m: torch.from_numpy(glob["val"][m]).float() for m in (a, b)}
        sim = F.normalize(g[a], dim=-1) @ F.normalize(g[b], dim=-1).T
        r1[pair_name(a, b)] = {"a2b": recall_at_k(sim, (1,))[1], "b2a": recall_at_k(sim.T, (1,))[1]}
    out = {"r1": r1, "content": stage1_content(glob, spec["content"])}
    if spec["kinds"]:
        out["probes"] = {m: probe_table({"stage1_global": glob["train"][m]}, {"stage1_global": glob["val"][m]},
                                        spec["targets"]["train"], spec["targets"]["val"], spec["classes"])[
                                            "stage1_global"] for m in glob["val"]}
    return out


# -------------------------------------------------------------------------------------------------------- main

def train_and_measure(source, name, flags, spec, stage1, work, seed, epochs, device):
    """One arm, one seed, one length: train, then every measurement (and TVL's metrics on a user's cache)."""
    out_dir = os.path.join(work, "runs", source_file(source), name, f"e{epochs}_seed{seed}")
    argv = base_flags(spec, out_dir, seed, epochs) + flags
    args, seconds = train_run(argv, out_dir, stage1)
    init = initial_complementary(args, stage1, device)
    run = evaluate_module(load_trained(args, stage1, out_dir), args, stage1, spec, device, init)
    if spec.get("eval_splits"):
        run["tvl"] = tvl_metrics(argv, out_dir, spec["eval_splits"])
    run.update(seed=seed, epochs=epochs, train_seconds=seconds, argv=argv)
    s, mods = run["summary"], modality_order(spec["mods"])
    gains = [k for k in ("unique_gain", "specific_gain", "content_gain") if f"{k}_{mods[0]}" in s]
    print(f"{source} {name} seed {seed} ({epochs} ep): R@1 {s['pooled']:.1f}, first token {s['first']:.1f}, "
          + ", ".join(f"{k} " + " ".join(f"{m} {s[f'{k}_{m}']:+.3f}" for m in mods) for k in gains)
          + f" ({seconds:.0f}s)", flush=True)
    return run


def run_source(source, spec, stage1, work, epochs, seeds, arms, roles, device, essential=(), init_rows=True):
    """Every arm of one source (seeds 0..seeds-1), the untrained controls and Stage 1's numbers. roles:
    arm_roles(); init_rows: also measure the untrained default module of each seed (a row of the tables, read by no
    rule; each arm's own untrained complementary token, the unique_gain and content_gain control, is always
    measured). An arm whose training fails (e.g. the trainer refuses its flags on this cache: the per-position
    token decoder needs the cache's token count to be Stage 1's) is left out of this source with the trainer's
    error line in src["failed"], printed; one of `essential` (the summary line's arms) failing ends the study."""
    args0 = run_args(base_flags(spec, os.path.join(work, "unused"), 0, epochs), stage1)
    ids = {s: quiet(lambda s=s: train.build_split(args0, s, stage1), os.devnull).sample_ids for s in ("train", "val")}
    spec["targets"] = ({s: factor_targets(ids[s], spec["samples"], spec["kinds"], spec["classes"]) for s in ids}
                       if spec["kinds"] else None)
    feats = {s: stage1_features(args0, stage1, s) for s in ("train", "val")}
    spec["content"] = content_targets(feats["train"][1], feats["val"][1])
    src = {"kinds": spec["kinds"], "classes": spec["classes"], "mods": modality_order(args0.active_modality_names),
           "num_train": len(ids["train"]), "num_val": len(ids["val"]), "num_tokens": args0.num_register_tokens,
           "num_overlapping": args0.num_overlapping_tokens, "epochs": epochs, "flags": spec["flags"],
           "global_specific": spec.get("global_specific"), "stage1": stage1_controls(spec, feats), "arms": {},
           "init": [], "failed": {},
           "note": {"tvl": TVL_NOTE, "latent": LATENT_NOTE, "latent_shed": SHED_NOTE}.get(source)}
    for seed in range(seeds if spec["kinds"] and init_rows else 0):
        args = run_args(base_flags(spec, os.path.join(work, "unused"), seed, epochs), stage1)
        src["init"].append(evaluate_module(initial_module(args), args, stage1, spec, device))
    for name, desc, flags in arms:
        control, twin = roles[name]
        try:
            runs = [train_and_measure(source, name, flags, spec, stage1, work, seed, epochs, device)
                    for seed in range(seeds)]
        except RuntimeError as e:
            if name in essential:
                raise
            src["failed"][name] = str(e)
            print(f"study: {source} {name} left out: {e}", flush=True)
            continue
        src["arms"][name] = {"description": desc, "flags": flags, "control": control, "twin": twin, "runs": runs}
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


def source_arms(source, wanted, quick, default):
    """The arm names a source runs: --arms (tvl: those of them in TVL_ARMS) or, without it, --quick's plan or the
    full study's (every arm on latent and cache:DIR, all but LATENT_ONLY_ARMS on latent_shed, TVL_ARMS on tvl)."""
    names = wanted if wanted is not None else quick_plan(default) if quick else [a[0] for a in ARMS]
    if source == "tvl":
        return [n for n in names if n in TVL_ARMS]
    if source == "latent_shed" and wanted is None:
        return [n for n in names if n not in LATENT_ONLY_ARMS]
    return list(names)


def run_sources(results, sources, size, epochs, seeds, lengths, plan, arms, default, work, a):
    """Every source's runs into results["sources"]. plan {source: arm names}; arms: every available arm."""
    tiny = tiny_stage1(work) if any(not s.startswith("cache:") for s in sources) else None
    for source in sources:
        if source.startswith("cache:"):
            spec, stage1 = prepare_user_cache(source, a)
        else:
            spec = prepare_source(source, work, size, tiny[0], tiny[1])
            stage1 = tiny[1]
        spec["flags"] = spec["flags"] + ["--device", a.device]
        run = [x for x in arms if x[0] in plan[source]]
        src = results["sources"][source] = run_source(source, spec, stage1, work, epochs[source], seeds, run,
                                                      arm_roles(arms, spec), a.device, PRESETS[default],
                                                      init_rows=not a.quick)
        if source == "latent" and lengths:
            run_lengths(source, src, spec, stage1, work, lengths, seeds, run, PRESETS[default][0], a.device)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None, setting=None):
    """setting: {"command": how the run was launched, "preamble": a paragraph for RESULTS.md} of a script that runs
    the study in another setting (study/recheck.py); both are stored in results.json."""
    parser = get_args_parser()
    a = parser.parse_args(argv)
    if a.rewrite_report:
        return rewrite_report(a.output)
    t0 = time.time()
    size_name = "smoke" if a.smoke else "quick" if a.quick else "full"
    size = SIZES[size_name]
    seeds = a.seeds or size["seeds"]
    sources = a.sources or (list(LATENT_SOURCES) if a.quick and not a.smoke else list(LATENT_SOURCES) + ["tvl"])
    epochs = {s: a.epochs or size["epochs"].get(size_key(s), CACHE_EPOCHS) for s in sources}
    lengths = size["lengths"] if a.lengths is None else a.lengths
    default = default_objective()
    wanted = None if a.arms is None else list(dict.fromkeys(PRESETS[default][0] if w == DEFAULT_ALIAS else w
                                                            for w in a.arms))
    arms, not_taken = available_arms()
    plan = {s: source_arms(s, wanted, a.quick, default) for s in sources}
    skipped = [n for n in not_taken if any(n in names for names in plan.values())]
    plan = {s: [n for n in names if n not in not_taken] for s, names in plan.items()}
    headline = "latent" if "latent" in sources else sources[0]
    missing = [n for n in PRESETS[default] if n not in plan[headline]]
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
               **(setting or {}), "size": size_name, "seeds": seeds, "epochs": epochs, "lengths": list(lengths),
               "threads": a.threads, "device": a.device, "default_objective": default, "skipped_arms": skipped,
               "sources": {}}
    try:
        run_sources(results, sources, size, epochs, seeds, lengths, plan, arms, default, work, a)
    except DataError as e:  # a cache:DIR that is no cache
        return fail(str(e))
    except RuntimeError as e:  # a run that failed: the trainer's line
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["headline_source"] = headline
    results["wall_time_s"] = time.time() - t0
    return write_outputs(results, out)


def rewrite_report(out):
    """--rewrite_report: every derived number (each run's summary, the decision, the content_gain validation)
    recomputed by this code from the raw measurements in OUT/results.json, then every output written again. No
    training."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    for src in results["sources"].values():
        lengths = src.get("lengths", {}).get("runs", {})
        for runs in [a["runs"] for a in src["arms"].values()] + [src["init"]] + [
                r for by_epochs in lengths.values() for r in by_epochs.values()]:
            for run in runs:
                run["summary"] = summarise(run, src["kinds"], src["num_overlapping"])
    return write_outputs(results, out)


def write_outputs(results, out):
    """The decision and the content_gain validation computed from the runs' summaries, then results.json (written
    whole, then renamed), RESULTS.md, the plots and the summary lines."""
    results["decision"] = decide(results)
    results["content_validation"] = content_validation(results)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    write_report(results, out)
    plot(results, out)
    print_summary(results, results["default_objective"])
    return 0


def print_summary(results, default):
    """The study's last lines: one per objective preset, ordering verdicts that are untestable, the decision, the
    factor-free measure per source (and its validation), then the default objective's line, last."""
    for preset in PRESETS:
        print(summary_line(f"study({preset})", preset_headline(results, preset)))
    for source, src in results["sources"].items():
        for h in filter(None, headlines(src).values()):
            if h["flat"]:
                print(f"study: {source}, {h['arm']}: ordering untestable: one token suffices")
    for source, src in results["sources"].items():
        for arm, error in src.get("failed", {}).items():
            print(f"study: {source}, {arm}: left out, its training failed: {error}")
    print(decision_line(results["decision"]))
    for source, src in results["sources"].items():
        print(content_line(source, src, PRESETS[default][0]))
    if results["content_validation"]["n"]:
        print(agreement_line(results["content_validation"]))
    print(summary_line("study", preset_headline(results, default)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
