"""Does FluxTalk do what it claims? Train Stage 2 under several objectives and seeds on data with known factors,
and measure retrieval, prefix ordering and what each register token holds.

    python study/run_study.py --quick --output /tmp/study     # minutes on a laptop CPU
    python study/run_study.py                                 # the full study, into study/results/

Claims tested: nested dropout orders the register tokens (a prefix is a usable embedding); the overlapping tokens
align what the modalities share; the complementary token keeps what is specific to one modality.

Two data sources, both as main_train_stage2 feature caches (so each run trains in seconds on a CPU):
  tvl     the synthetic TVL-format dataset of tools/make_synthetic_tvl.py, through the tiny frozen Stage 1 of
          tools/make_tiny_stage1.py (its factors.json holds each sample's factors);
  latent  token features written directly from known latents (study/latent_tokens.py): shared, modality-specific
          (also in Stage 1's global embedding) and nuisance (in the tokens only).
Every arm is trained through main_train_stage2.main() from the cache, once per seed; its last checkpoint is loaded
into the register module and run over the cached val (and train, for the probes) features with every token kept.
The untrained register module of the same seed (the weights training starts from) and Stage 1's global embedding
are probed the same way, as controls.

Writes to --output: results.json (every number of every run), RESULTS.md (mean ± std over seeds),
prefix_<source>.png, probes_<source>.png. The last stdout line is
    study: ordering_gain=<mean> ordering_std=<std> specific_gain=<mean> specific_std=<std> seeds=<n>
ordering_gain: Recall@1 in points (mean over pairs and both directions) from the first register token alone,
nested dropout 0.5 minus none; specific_gain: probe score of the complementary token minus that of the pooled
overlapping tokens, averaged over the modality-specific factors, for the default objective; both on the latent
source, std over seeds.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

import cache_features  # noqa: E402
import main_train_stage2 as train  # noqa: E402
from loss_stage2 import masked_mean, prefix_curve, recall_at_k  # noqa: E402
from stage1 import build_stage1  # noqa: E402
from study.latent_tokens import make_latent_cache, resolved_args  # noqa: E402
from study.probes import probe  # noqa: E402
from util.misc import modality_pairs, pair_name  # noqa: E402

MODALITIES = ["vision", "tactile"]  # text adds no factor of its own in either source, only run time
HEADLINE_SOURCE = "latent"  # exact ground truth: specific and nuisance factors are told apart
DEFAULT_ARM, NO_DROPOUT_ARM = "default", "nd0"

# (name, what it changes, training flags on top of the mission's defaults)
ARMS = [
    ("default", "mission default: nested dropout 0.5, L2 + diversity at weight 0.01", []),
    ("nd0", "nested dropout 0", ["--nested_dropout_rate", "0"]),
    ("nd0.25", "nested dropout 0.25", ["--nested_dropout_rate", "0.25"]),
    ("reg_off", "no complementary regularisation", ["--complementary_reg_weight", "0"]),
    ("reg_l2", "L2 term only", ["--complementary_reg_terms", "l2"]),
    ("reg_div", "diversity term only", ["--complementary_reg_terms", "diversity"]),
    ("l2_mean", "L2 divided by the width (width-independent)", ["--complementary_l2", "mean"]),
    ("recon", "+ reconstruction of Stage 1's global embedding from all K tokens, weight 1",
     ["--complementary_recon_weight", "1"]),
    ("residual", "+ residual reconstruction (stop-gradient shared + complementary), weight 1",
     ["--complementary_residual_weight", "1"]),
    ("residual_l2mean", "residual (weight 1) with the width-independent L2",
     ["--complementary_residual_weight", "1", "--complementary_l2", "mean"]),
]

# The image-derived source has long contexts (197 tactile tokens), so a step costs ~3x a latent one: it runs the
# arms the headline claims need, the latent source runs them all.
TVL_ARMS = ("default", "nd0", "residual")
QUICK_ARMS = ("default", "nd0", "reg_off", "residual")  # --quick: the summary line's arms, the controls of the claims
# Sizes: latent (train, val) samples, tvl (SSVTP, HCT) samples generated, epochs per source; "smoke" only checks
# the plumbing (tests).
SIZES = {
    "full": dict(latent=(3072, 1024), tvl=(1000, 1000), epochs={"latent": 4, "tvl": 5}, seeds=3),
    "quick": dict(latent=(1024, 512), tvl=(400, 400), epochs={"latent": 3, "tvl": 4}, seeds=3),
    "smoke": dict(latent=(128, 64), tvl=(60, 60), epochs={"latent": 1, "tvl": 1}, seeds=2),
}
# A register width of 64 instead of the mission's 256 keeps a run at seconds on a CPU; everything else is the
# mission's default (K = 4 tokens, 3 overlapping, depth 2, nested dropout 0.5 from the first step, reg 0.01).
TRAIN_FLAGS = ["--batch_size", "64", "--lr", "2e-3", "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu",
               "--print_freq", "1000", "--register_width", "64"]


def get_args_parser():
    p = argparse.ArgumentParser("FluxTalk study", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "study", "results"), help="results folder")
    p.add_argument("--work_dir", default=None, help="data, caches and checkpoints (default: OUTPUT/work)")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller data, fewer epochs, arms {', '.join(QUICK_ARMS)} unless --arms says otherwise")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing only")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 3, smoke 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run, both sources (default: by size)")
    p.add_argument("--rewrite_report", action="store_true",
                   help="only rewrite RESULTS.md and the plots from OUTPUT/results.json (no training)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared CPU, spinning OpenMP threads made steps ~30x slower)")
    p.add_argument("--sources", nargs="+", default=["latent", "tvl"], choices=["latent", "tvl"])
    p.add_argument("--arms", nargs="+", default=None, choices=[a[0] for a in ARMS], help="default: all available")
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


def prepare_source(source, work, size, stage1_flags, stage1):
    """-> (cache folder, {factor: kind}, {factor: number of classes}, {sample id: {factor: value}})."""
    cache = os.path.join(work, f"cache_{source}_{'_'.join(map(str, size[source]))}")
    log = os.path.join(work, f"prepare_{source}.log")
    if source == "latent":
        if not os.path.isfile(os.path.join(cache, "val", "meta.json")):
            args = train.parse_args(base_flags(cache, stage1_flags, "unused", 0, 1))
            make_latent_cache(cache, stage1, args, *size["latent"], seed=0)
        with open(os.path.join(cache, "factors.json")) as f:
            info = json.load(f)
        return cache, info["factors"], info["classes"], info["samples"]
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
    return cache, kinds, {"material": len(MATERIALS)}, samples


# --------------------------------------------------------------------------------------------------- training

def run_args(argv, stage1):
    """The args a training run with argv holds once it has resolved Stage 1's data recipe."""
    return resolved_args(train.parse_args(argv), stage1)


def base_flags(cache, stage1_flags, out_dir, seed, epochs):
    return ["--feature_cache", cache, "--output_dir", out_dir, "--seed", str(seed), "--epochs", str(epochs),
            "--active_modality_names", *MODALITIES] + TRAIN_FLAGS + stage1_flags


def available_arms(wanted):
    """The arms whose flags this main_train_stage2 knows (others are reported as skipped)."""
    known = {s for a in train.get_args_parser()._actions for s in a.option_strings}
    arms, skipped = [], []
    for name, desc, flags in ARMS:
        if wanted and name not in wanted:
            continue
        (arms if all(f in known for f in flags if f.startswith("--")) else skipped).append((name, desc, flags))
    return arms, [a[0] for a in skipped]


def train_run(argv, out_dir, stage1):
    """Trains one run in this process; -> (args, seconds)."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    code = quiet(lambda: train.main(argv), os.path.join(out_dir, "stdout.txt"))
    if code:
        raise RuntimeError(f"training failed (exit {code}): see {os.path.join(out_dir, 'stdout.txt')}")
    return run_args(argv, stage1), time.time() - t0


# ------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed(registers, args, stage1, split):
    """Register tokens {m: (N, K, E)} (every token kept, eval mode), Stage 1 globals {m: (N, E)}, sample ids."""
    ds = quiet(lambda: train.build_split(args, split, stage1), os.devnull)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)
    registers.eval()
    regs, glob = {m: [] for m in MODALITIES}, {m: [] for m in MODALITIES}
    for batch in loader:
        tokens = {m: t.float() for m, t in batch["tokens"].items()}
        n = next(iter(tokens.values())).shape[0]
        keep = torch.ones(n, registers.num_tokens, dtype=torch.bool)
        out = registers(tokens, batch.get("padding_mask"), keep=keep)
        for m in MODALITIES:
            regs[m].append(out["registers"][m])
            glob[m].append(batch["global"][m].float())
    return {m: torch.cat(v) for m, v in regs.items()}, {m: torch.cat(v) for m, v in glob.items()}, ds.sample_ids


def representations(reg, k_o):
    """{name: (N, F) numpy} of one modality's (N, K, E) register tokens: what the probes read."""
    reps = {"overlapping": reg[:, :k_o].mean(1), "complementary": reg[:, k_o:].flatten(1)}
    reps["overlapping+complementary"] = torch.cat([reps["overlapping"], reps["complementary"]], 1)
    reps.update({f"token{k}": reg[:, k] for k in range(reg.shape[1])})
    return {k: v.numpy() for k, v in reps.items()}


def factor_targets(ids, samples, kinds, classes):
    """{factor: (values (N,) or (N, T), valid bool (N,))}: samples without a value (no contact) are left out."""
    out = {}
    for f in kinds:
        vals = [samples[i].get(f) for i in ids]
        valid = np.array([v is not None and v != -1 for v in vals])
        fill = 0 if f in classes else ([0.0] * len(next(v for v in vals if v is not None)) if
                                       isinstance(next(v for v in vals if v is not None), list) else 0.0)
        arr = np.array([v if ok else fill for v, ok in zip(vals, valid)])
        out[f] = (arr, valid)
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
    """Per pair and direction: Recall@1 of the pooled overlapping tokens, and the prefix curve k = 1..K."""
    out = {}
    for a, b in modality_pairs(MODALITIES):
        za = F.normalize(regs[a][:, :k_o].mean(1), dim=-1)
        zb = F.normalize(regs[b][:, :k_o].mean(1), dim=-1)
        sim = za @ zb.T
        curve = prefix_curve(regs[a], regs[b], regs[a].shape[1])  # every token, complementary ones too
        out[pair_name(a, b)] = {"r1": {"a2b": recall_at_k(sim, (1,))[1], "b2a": recall_at_k(sim.T, (1,))[1]},
                                "prefix": curve, "pair": [a, b]}
    return out


def mean_r1(ret):
    return float(np.mean([v for p in ret.values() for v in p["r1"].values()]))


def mean_prefix(ret):
    """R@1 for k = 1..K, mean over pairs and directions."""
    return np.mean([p["prefix"][d] for p in ret.values() for d in ("a2b", "b2a")], axis=0).tolist()


def token_norms(regs):
    return {m: [float(n) for n in r.norm(dim=-1).mean(0)] for m, r in regs.items()}


def evaluate_module(registers, args, stage1, targets, classes):
    """Every measurement of one register module (trained or not)."""
    k_o = args.num_overlapping_tokens
    regs_tr, _, _ = embed(registers, args, stage1, "train")
    regs_va, _, _ = embed(registers, args, stage1, "val")
    ret = retrieval(regs_va, k_o)
    probes = {m: probe_table(representations(regs_tr[m], k_o), representations(regs_va[m], k_o),
                             targets["train"], targets["val"], classes) for m in MODALITIES}
    return {"retrieval": ret, "mean_r1": mean_r1(ret), "prefix_mean": mean_prefix(ret), "probes": probes,
            "norms": token_norms(regs_va)}


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


def stage1_controls(args, stage1, targets, classes):
    """What Stage 1's global embedding holds (probes) and retrieves (Recall@1 per pair), train/val as the runs."""
    registers = initial_module(args)
    _, glob_tr, _ = embed(registers, args, stage1, "train")
    _, glob_va, _ = embed(registers, args, stage1, "val")
    probes = {m: probe_table({"stage1_global": glob_tr[m].numpy()}, {"stage1_global": glob_va[m].numpy()},
                             targets["train"], targets["val"], classes)["stage1_global"] for m in MODALITIES}
    r1 = {}
    for a, b in modality_pairs(MODALITIES):
        sim = F.normalize(glob_va[a], dim=-1) @ F.normalize(glob_va[b], dim=-1).T
        r1[pair_name(a, b)] = {"a2b": recall_at_k(sim, (1,))[1], "b2a": recall_at_k(sim.T, (1,))[1]}
    return {"probes": probes, "r1": r1}


# ---------------------------------------------------------------------------------------------------- summary

def specific_factors(kinds, m=None):
    return [f for f, k in kinds.items() if k == "specific" and (m is None or f.startswith(m + "_"))]


def probe_gain(run, kinds, rep="complementary", base="overlapping", kind="specific"):
    """Mean over factors of `kind` of score(rep) - score(base), each on its own modality's tokens."""
    diffs = [run["probes"][m][rep][f] - run["probes"][m][base][f] for m in MODALITIES
             for f, k in kinds.items() if k == kind and f.startswith(m + "_")]
    return float(np.mean(diffs))


def probe_mean(run, kinds, rep, kind):
    """Mean probe score of representation `rep` over the factors of `kind` (own modality for specific/nuisance)."""
    vals = [run["probes"][m][rep][f] for m in MODALITIES for f, k in kinds.items()
            if k == kind and (kind == "shared" or f.startswith(m + "_"))]
    return float(np.mean(vals)) if vals else float("nan")


def first_token_r1(run):
    return run["prefix_mean"][0]


def ms(values):
    """(mean, std over seeds; ddof 0 so one seed gives std 0)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std())


def fmt(values, digits=2):
    m, s = ms(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def arm_summary(runs, kinds, k_o):
    """Per-seed headline numbers of one arm: {metric: [value per seed]}."""
    kinds_present = set(kinds.values())
    rows = {"R@1 pooled": [r["mean_r1"] for r in runs], "R@1 first token": [first_token_r1(r) for r in runs],
            f"R@1 first {k_o} (all overlapping)": [r["prefix_mean"][k_o - 1] for r in runs],
            "R@1 all K": [r["prefix_mean"][-1] for r in runs],
            "comp - overlap, specific": [probe_gain(r, kinds) for r in runs],
            "comp, specific": [probe_mean(r, kinds, "complementary", "specific") for r in runs],
            "overlap, specific": [probe_mean(r, kinds, "overlapping", "specific") for r in runs],
            "comp, shared": [probe_mean(r, kinds, "complementary", "shared") for r in runs]}
    if "nuisance" in kinds_present:
        rows["comp, nuisance"] = [probe_mean(r, kinds, "complementary", "nuisance") for r in runs]
        rows["overlap, nuisance"] = [probe_mean(r, kinds, "overlapping", "nuisance") for r in runs]
    rows["comp norm / overlap norm"] = [float(np.mean([r["norms"][m][k_o:] for m in MODALITIES]) /
                                              np.mean([r["norms"][m][:k_o] for m in MODALITIES])) for r in runs]
    return rows


def headline(results):
    src = results["sources"][HEADLINE_SOURCE]
    by_seed = lambda arm: src["arms"][arm]["runs"]  # noqa: E731
    order = [first_token_r1(a) - first_token_r1(b) for a, b in zip(by_seed(DEFAULT_ARM), by_seed(NO_DROPOUT_ARM))]
    spec = [probe_gain(r, src["kinds"]) for r in by_seed(DEFAULT_ARM)]
    return {"ordering_gain": ms(order), "specific_gain": ms(spec), "seeds": len(spec)}


# ------------------------------------------------------------------------------------------------------ report

def write_report(results, out):
    lines = ["# FluxTalk study results", "",
             "Generated by `study/run_study.py`; every number is mean ± std over seeds (population std). "
             "Probe scores: R² for continuous factors, accuracy for classes; ridge / least-squares probes fitted "
             "on the train split, scored on val. R@1 in %, vision↔tactile, mean of both directions.", "",
             f"Command: `{results['command']}`  ", f"Wall time: {results['wall_time_s'] / 60:.1f} min "
             f"({results['size']} size, {results['seeds']} seeds, epochs per run {results['epochs']}, "
             f"{results['threads']} CPU thread(s))", ""]
    h = results["headline"]
    lines += [f"Headline ({HEADLINE_SOURCE} source): ordering gain {h['ordering_gain'][0]:.2f} ± "
              f"{h['ordering_gain'][1]:.2f} points of first-token R@1 (nested dropout 0.5 vs 0); complementary "
              f"minus pooled overlapping probe score on modality-specific factors {h['specific_gain'][0]:.3f} ± "
              f"{h['specific_gain'][1]:.3f} (default objective).", ""]
    if results["skipped_arms"]:
        lines += [f"Arms not run (flags missing in this main_train_stage2): {', '.join(results['skipped_arms'])}", ""]
    for source, src in results["sources"].items():
        k_o, K = src["num_overlapping"], src["num_tokens"]
        lines += [f"## Source: {source}", "", f"{src['num_train']} train / {src['num_val']} val samples; factors: "
                  + ", ".join(f"{f} ({k})" for f, k in src["kinds"].items()), ""]
        arms = list(src["arms"])
        summaries = {a: arm_summary(src["arms"][a]["runs"], src["kinds"], k_o) for a in arms}
        summaries["init (untrained)"] = arm_summary(src["init"], src["kinds"], k_o)
        metrics = list(summaries[arms[0]])
        lines += ["### Arms", "", "| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for a, s in summaries.items():
            digits = lambda k: 1 if k.startswith("R@1") else 3  # noqa: E731
            lines.append(f"| {a} | " + " | ".join(fmt(s[k], digits(k)) for k in metrics) + " |")
        lines += ["", "Paired by seed, arm minus `default` (R@1 in points, probe scores on the modality-specific "
                  "factors of the token's own modality):", "",
                  "| arm | ΔR@1 pooled | ΔR@1 first token | Δ(comp - overlap), specific | Δcomp, specific |"
                  + (" Δcomp, nuisance |" if "comp, nuisance" in metrics else ""),
                  "|---|---|---|---|---|" + ("---|" if "comp, nuisance" in metrics else "")]
        for a in arms:
            if a == DEFAULT_ARM:
                continue
            d = {k: np.array(summaries[a][k]) - np.array(summaries[DEFAULT_ARM][k]) for k in metrics}
            cols = ["R@1 pooled", "R@1 first token", "comp - overlap, specific", "comp, specific"]
            cols += ["comp, nuisance"] if "comp, nuisance" in metrics else []
            lines.append(f"| {a} | " + " | ".join(fmt(d[k], 1 if k.startswith("R@1") else 3) for k in cols) + " |")
        lines += ["", "Arms: " + "; ".join(f"`{a}` = {src['arms'][a]['description']}" for a in arms) + ". "
                  "`init` = the untrained register module of each seed (the control).", "",
                  f"Stage 1 global embedding R@1: " + ", ".join(
                      f"{p} {np.mean(list(v.values())):.1f}" for p, v in src["stage1"]["r1"].items()), ""]
        lines += [f"### Prefix curve (R@1 from the first k tokens, k = 1..{K}; k > {k_o} adds complementary "
                  f"tokens)", "", "| arm | " + " | ".join(f"k={k}" for k in range(1, K + 1)) + " |",
                  "|---" * (K + 1) + "|"]
        for a in arms:
            curves = np.array([r["prefix_mean"] for r in src["arms"][a]["runs"]])
            lines.append(f"| {a} | " + " | ".join(fmt(curves[:, k], 1) for k in range(K)) + " |")
        lines += ["", f"![prefix curves](prefix_{source}.png)", ""]
        for a in [DEFAULT_ARM, "residual"]:
            if a in src["arms"]:
                lines += probe_markdown(src, a)
        lines += [f"![probe heat map](probes_{source}.png)", ""]
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def probe_rows(src, arm):
    """[(label, {factor: [score per seed]})]: every representation of the arm, the init control, Stage 1 global."""
    rows = []
    for m in MODALITIES:
        for rep in src["arms"][arm]["runs"][0]["probes"][m]:
            rows.append((f"{m} {rep}", {f: [r["probes"][m][rep][f] for r in src["arms"][arm]["runs"]]
                                       for f in src["kinds"]}))
        for rep in ("overlapping", "complementary"):
            rows.append((f"{m} {rep} (init)", {f: [r["probes"][m][rep][f] for r in src["init"]] for f in src["kinds"]}))
        rows.append((f"{m} Stage 1 global", {f: [src["stage1"]["probes"][m][f]] for f in src["kinds"]}))
    return rows


def probe_markdown(src, arm):
    factors = list(src["kinds"])
    lines = [f"### Probes, arm `{arm}` (plus controls)", "", "| representation | " + " | ".join(factors) + " |",
             "|---" * (len(factors) + 1) + "|"]
    for label, row in probe_rows(src, arm):
        lines.append(f"| {label} | " + " | ".join(fmt(row[f], 2) for f in factors) + " |")
    return lines + [""]


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for source, src in results["sources"].items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a in [a for a in ("nd0", "nd0.25", "default") if a in src["arms"]]:
            curves = np.array([r["prefix_mean"] for r in src["arms"][a]["runs"]])
            k = np.arange(1, curves.shape[1] + 1)
            ax.errorbar(k, curves.mean(0), yerr=curves.std(0), capsize=3, marker="o",
                        label={"nd0": "nested dropout 0", "nd0.25": "0.25", "default": "0.5 (default)"}[a])
        ax.axvline(src["num_overlapping"] + 0.5, color="grey", ls=":", lw=1)
        ax.set(xlabel="first k register tokens (right of the line: + complementary)", ylabel="R@1 (%)",
               title=f"{source}: retrieval from a prefix", xticks=k)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"prefix_{source}.png"), dpi=110)
        plt.close(fig)

        arms = [a for a in (DEFAULT_ARM, "residual") if a in src["arms"]]
        n_rows = len(probe_rows(src, arms[0]))
        fig, axes = plt.subplots(1, len(arms), figsize=(1.1 * len(src["kinds"]) * len(arms) + 3, 0.3 * n_rows + 1.5),
                                 squeeze=False)
        for i_ax, (ax, a) in enumerate(zip(axes[0], arms)):
            rows = probe_rows(src, a)
            mat = np.array([[np.mean(row[f]) for f in src["kinds"]] for _, row in rows])
            im = ax.imshow(np.clip(mat, 0, 1), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(src["kinds"])), list(src["kinds"]), rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(rows)), [r[0] for r in rows] if i_ax == 0 else [], fontsize=7)  # same rows
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if mat[i, j] < 0.5 else "black")
            ax.set_title(f"{source}, arm {a}: probe score (R² / accuracy)", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.5)
        fig.savefig(os.path.join(out, f"probes_{source}.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)


# -------------------------------------------------------------------------------------------------------- main

def run_source(source, work, size, epochs, seeds, arms, stage1_flags, stage1):
    cache, kinds, classes, samples = prepare_source(source, work, size, stage1_flags, stage1)
    args0 = run_args(base_flags(cache, stage1_flags, os.path.join(work, "unused"), 0, epochs), stage1)
    ids = {s: quiet(lambda s=s: train.build_split(args0, s, stage1), os.devnull).sample_ids for s in ("train", "val")}
    targets = {s: factor_targets(ids[s], samples, kinds, classes) for s in ids}
    src = {"kinds": kinds, "classes": classes, "num_train": len(ids["train"]), "num_val": len(ids["val"]),
           "num_tokens": args0.num_register_tokens, "num_overlapping": args0.num_overlapping_tokens,
           "stage1": stage1_controls(args0, stage1, targets, classes), "arms": {}, "init": []}
    for seed in range(seeds):
        args = run_args(base_flags(cache, stage1_flags, os.path.join(work, "unused"), seed, epochs), stage1)
        src["init"].append(evaluate_module(initial_module(args), args, stage1, targets, classes))
    for name, desc, flags in arms:
        arm = src["arms"][name] = {"description": desc, "flags": flags, "runs": []}
        for seed in range(seeds):
            out_dir = os.path.join(work, "runs", source, name, f"seed{seed}")
            if os.path.isdir(out_dir):  # a study always trains afresh
                import shutil
                shutil.rmtree(out_dir)
            argv = base_flags(cache, stage1_flags, out_dir, seed, epochs) + flags
            args, seconds = train_run(argv, out_dir, stage1)
            run = evaluate_module(load_trained(args, stage1, out_dir), args, stage1, targets, classes)
            run.update(seed=seed, train_seconds=seconds, argv=argv)
            arm["runs"].append(run)
            print(f"{source} {name} seed {seed}: R@1 {run['mean_r1']:.1f}, first token {run['prefix_mean'][0]:.1f}, "
                  f"comp-overlap specific {probe_gain(run, kinds):+.3f} ({seconds:.0f}s)", flush=True)
    return src


def main(argv=None):
    a = get_args_parser().parse_args(argv)
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
    epochs = {k: a.epochs or v for k, v in size["epochs"].items()}
    out = a.output
    work = a.work_dir or os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    arms, skipped = available_arms(a.arms or (QUICK_ARMS if a.quick and not a.smoke else None))
    for need in (DEFAULT_ARM, NO_DROPOUT_ARM):
        if need not in [x[0] for x in arms]:
            print(f"error: --arms must include {need} (the headline compares {DEFAULT_ARM} with {NO_DROPOUT_ARM})",
                  file=sys.stderr)
            return 2
    if HEADLINE_SOURCE not in a.sources:
        print(f"error: --sources must include {HEADLINE_SOURCE} (the headline source)", file=sys.stderr)
        return 2
    if skipped:
        print(f"study: skipping arms whose flags main_train_stage2 lacks: {', '.join(skipped)}")
    torch.set_num_threads(a.threads)
    stage1_flags, stage1 = tiny_stage1(work)
    results = {"command": " ".join(["python study/run_study.py"] + (argv if argv is not None else sys.argv[1:])),
               "size": size_name, "seeds": seeds, "epochs": epochs, "threads": a.threads, "modalities": MODALITIES,
               "skipped_arms": skipped, "sources": {}}
    for source in [s for s in ("latent", "tvl") if s in a.sources]:
        source_arms = [x for x in arms if source == "latent" or x[0] in TVL_ARMS]
        results["sources"][source] = run_source(source, work, size, epochs[source], seeds, source_arms,
                                                stage1_flags, stage1)
    results["headline"] = headline(results)
    results["wall_time_s"] = time.time() - t0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, out)
    plot(results, out)
    h = results["headline"]
    print(f"study: ordering_gain={h['ordering_gain'][0]:.2f} ordering_std={h['ordering_gain'][1]:.2f} "
          f"specific_gain={h['specific_gain'][0]:.3f} specific_std={h['specific_gain'][1]:.3f} seeds={h['seeds']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
