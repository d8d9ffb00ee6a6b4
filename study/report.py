"""The study's summary (headline numbers, the issue's decision rules, the hypotheses table, all computed from
the per-run numbers run_study.py stores in results.json), RESULTS.md and the plots.

Every rule is fixed here, before any number is seen: a gain counts when its mean over seeds exceeds twice its
(population) std; a new default may cost at most COST_POINTS of pooled R@1 against the mission's loss; a
no-ordering control whose first token retrieves within FLAT_POINTS of its pooled embedding means one token
suffices, so ordering is reported untestable there rather than failed.
"""
import os

import numpy as np

FLAT_POINTS = 2.0  # a no-ordering control whose first token is within this many R@1 points of its pool: flat
COST_POINTS = 1.0  # the bound on the pooled R@1 cost of a new default
# objective preset of main_train_stage2 --objective -> (its arm, its no-ordering control)
PRESETS = {"mission": ("mission", "nd0"), "separate": ("objective_separate", "separate_noorder")}
ORDERING = [("mission", "nd0", "nested dropout 0.5"), ("prefix_all", "nd0", "all-prefix loss"),
            ("objective_separate", "separate_noorder", "all-prefix loss, separate pathway")]  # (arm, control, how)


# ---------------------------------------------------------------------------------------------------- summary

def ms(values):
    """(mean, std over seeds; ddof 0 so one seed gives std 0); nan for no values."""
    v = np.asarray(values, float)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def fmt(pair, digits=2):
    return "–" if np.isnan(pair[0]) else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def values(runs, key):
    return [r["summary"].get(key, float("nan")) for r in runs]


def diff(runs_a, runs_b, key):
    """Per seed: key of runs_a minus key of runs_b (runs in seed order, the same seeds)."""
    return [x - y for x, y in zip(values(runs_a, key), values(runs_b, key))]


def above(pair):
    """mean > 2 std: the issue's bar for a gain."""
    return bool(pair[0] > 2 * pair[1])


def is_flat(runs):
    """One token suffices: the first token's R@1 within FLAT_POINTS of the pooled R@1 (mean over seeds)."""
    return bool(np.mean(values(runs, "pooled")) - np.mean(values(runs, "first")) <= FLAT_POINTS)


def ordering(src, arm, control):
    """Ordering of `arm` against its no-ordering `control`, or None when either was not run."""
    if arm not in src["arms"] or control not in src["arms"]:
        return None
    a, c = src["arms"][arm]["runs"], src["arms"][control]["runs"]
    h = {"arm": arm, "control": control, "seeds": len(a), "ordering_gain": ms(diff(a, c, "first")),
         "pooled_cost": ms(diff(c, a, "pooled")), "unique_gain": ms(values(a, "unique_gain")),
         "specific_gain": ms(values(a, "specific_gain")), "flat": is_flat(c)}
    h["verdict"] = ("ordering untestable: one token suffices" if h["flat"] else
                    "orders" if above(h["ordering_gain"]) else "does not order")
    return h


def headlines(src):
    """{objective preset: its ordering() numbers} on one source."""
    return {p: ordering(src, arm, control) for p, (arm, control) in PRESETS.items()}


def summary_line(prefix, h):
    if h is None:
        return f"{prefix}: unavailable (its arms were not run)"
    return (f"{prefix}: ordering_gain={h['ordering_gain'][0]:.2f} ordering_std={h['ordering_gain'][1]:.2f} "
            f"pooled_cost={h['pooled_cost'][0]:.2f} unique_gain={h['unique_gain'][0]:.3f} "
            f"unique_std={h['unique_gain'][1]:.3f} specific_gain={h['specific_gain'][0]:.3f} "
            f"specific_std={h['specific_gain'][1]:.3f} seeds={h['seeds']}")


def reference_arm(src):
    return "mission" if "mission" in src["arms"] else next(iter(src["arms"]))


def objective_decisions(src):
    """Per arm: unique / specific gain, pooled R@1 cost against the mission (paired), and whether it meets the
    issue's bar for a new default objective (both gains above 2 std, cost <= COST_POINTS)."""
    ref = src["arms"][reference_arm(src)]["runs"]
    rows = []
    for arm, a in src["arms"].items():
        row = {"arm": arm, "unique_gain": ms(values(a["runs"], "unique_gain")),
               "specific_gain": ms(values(a["runs"], "specific_gain")),
               "pooled_cost": ms(diff(ref, a["runs"], "pooled"))}
        row["passes"] = (above(row["unique_gain"]) and above(row["specific_gain"])
                         and row["pooled_cost"][0] <= COST_POINTS)
        rows.append(row)
    return rows


def ordering_decisions(src):
    """Each ordering mechanism run against its control; `passes`: orders with a pooled cost <= COST_POINTS."""
    rows = []
    for arm, control, how in ORDERING:
        h = ordering(src, arm, control)
        if h is not None:
            h["how"] = how
            h["passes"] = h["verdict"] == "orders" and h["pooled_cost"][0] <= COST_POINTS
            rows.append(h)
    return rows


def best_arm(src, default_arm):
    """The rule fixed before the length runs: the largest mean unique_gain among the arms other than the default
    whose pooled R@1 is at most COST_POINTS below the mission's (paired mean)."""
    rows = [r for r in objective_decisions(src) if r["arm"] != default_arm and r["pooled_cost"][0] <= COST_POINTS
            and not np.isnan(r["unique_gain"][0])]
    return max(rows, key=lambda r: r["unique_gain"][0])["arm"] if rows else None


def hypotheses(results):
    """[(number, hypothesis, arms, evidence, verdict)] for the issue's hypotheses 1-6, computed from the numbers:
    a difference counts when its mean exceeds 2 std over seeds, a retrieval cost when it exceeds COST_POINTS."""
    L = results["sources"].get("latent", {"arms": {}})
    arms = L["arms"]
    has = lambda *names: all(n in arms for n in names)  # noqa: E731
    d = lambda a, b, key: ms(diff(arms[a]["runs"], arms[b]["runs"], key))  # noqa: E731
    v = lambda a, key: ms(values(arms[a]["runs"], key))  # noqa: E731
    yes = lambda ok: "holds" if ok else "fails"  # noqa: E731

    def costed(arm, evidence, ok):
        """Evidence and verdict of an objective on the complementary token, with its pooled R@1 cost vs mission."""
        cost = d("mission", arm, "pooled")
        verdict = yes(ok) + (f", at a pooled R@1 cost of {cost[0]:.1f} points" if ok and cost[0] > COST_POINTS else "")
        return f"{evidence}; pooled R@1 cost vs mission {fmt(cost)}", verdict

    rows = []
    lengths = L.get("lengths", {}).get("runs", {}).get("mission")
    if lengths and len(lengths) > 1:
        eps = sorted(lengths, key=int)
        shed = ms(diff(lengths[eps[-1]], lengths[eps[0]], "aligned_specific"))
        gains = {e: ms(values(lengths[e], "unique_gain")) for e in eps}
        rows.append(("1a", "the aligned embedding sheds specific information with training", "mission at "
                     + "/".join(eps) + " epochs", f"aligned, specific: {eps[-1]} minus {eps[0]} epochs "
                     f"{fmt(shed, 3)}", yes(shed[0] < 0 and above((-shed[0], shed[1])))))
        rows.append(("1b", "measured against the aligned embedding, the mission's complementary token adds "
                     "specific information (by the longest training)", "mission at " + "/".join(eps) + " epochs",
                     "unique_gain " + ", ".join(f"{e} ep {fmt(g, 3)}" for e, g in gains.items()),
                     yes(above(gains[eps[-1]]))))
    else:
        rows.append(("1", "training length: the aligned embedding sheds specific information", "mission",
                     "no training-length runs", "not run"))
    if has("difference", "mission"):
        sel = d("difference", "mission", "comp_shared")
        rows.append(("2", "a batch-level (DSN) difference loss keeps shared information out of the complementary "
                     "token", "difference vs mission", *costed(
                         "difference", f"complementary, shared: {fmt(sel, 3)} (difference minus mission); "
                         f"unique_gain {fmt(v('difference', 'unique_gain'), 3)}",
                         sel[0] < 0 and above((-sel[0], sel[1])))))
    else:
        rows.append(("2", "DSN difference loss", "difference", "not run", "not run"))
    if has("partner", "residual", "mission"):
        g = d("partner", "residual", "unique_gain")
        rows.append(("3a", "a cross-modal (partner) residual gives the complementary token more to add than the "
                     "own residual", "partner vs residual", *costed(
                         "partner", f"unique_gain partner {fmt(v('partner', 'unique_gain'), 3)}, minus residual "
                         f"{fmt(g, 3)}", above(g) and above(v("partner", "unique_gain")))))
    else:
        rows.append(("3a", "cross-modal residual", "partner, residual", "not run", "not run"))
    if has("view", "mission"):
        g = d("view", "mission", "unique_gain")
        rows.append(("3b", "an intra-modality view contrastive term makes the complementary token keep specific "
                     "information", "view vs mission", *costed("view", f"unique_gain view minus mission {fmt(g, 3)}",
                                                               above(g))))
    else:
        rows.append(("3b", "view contrastive term", "view", "not run", "not run"))
    h = ordering(L, "prefix_all", "nd0")
    if h and "mission" in arms:
        nd = ordering(L, "mission", "nd0")
        rows.append(("4", "an all-prefix (Matryoshka) loss orders the tokens at no cost to the pool",
                     "prefix_all vs nd0 (nested dropout: mission vs nd0)",
                     f"ordering_gain {fmt(h['ordering_gain'], 2)}, pooled_cost {fmt(h['pooled_cost'], 2)} "
                     f"(nested dropout: {fmt(nd['ordering_gain'], 2)}, cost {fmt(nd['pooled_cost'], 2)})",
                     h["verdict"] if h["flat"] else yes(h["verdict"] == "orders"
                                                        and h["pooled_cost"][0] <= COST_POINTS)))
    else:
        rows.append(("4", "all-prefix loss", "prefix_all, nd0", "not run", "not run"))
    if has("partner", "mission"):
        leak, cost = d("partner", "mission", "aligned_specific"), d("mission", "partner", "pooled")
        rows.append(("5a", "on shared blocks a complementary objective leaks into the aligned embedding",
                     "partner vs mission", f"aligned, specific: partner minus mission {fmt(leak, 3)}; pooled R@1 "
                     f"cost {fmt(cost, 2)}", yes(above(leak) or cost[0] > COST_POINTS)))
    else:
        rows.append(("5a", "leak through shared blocks", "partner, mission", "not run", "not run"))
    if has("separate_partner", "mission"):
        u, s = v("separate_partner", "unique_gain"), v("separate_partner", "specific_gain")
        cost = d("mission", "separate_partner", "pooled")
        rows.append(("5b", "a complementary pathway of its own (with the cross-modal residual) keeps specific "
                     "information at no retrieval cost", "separate_partner vs mission", f"unique_gain {fmt(u, 3)}, "
                     f"specific_gain {fmt(s, 3)}, pooled R@1 cost {fmt(cost, 2)}",
                     yes(above(u) and above(s) and cost[0] <= COST_POINTS)))
    else:
        rows.append(("5b", "separate pathway + cross-modal residual", "separate_partner, mission", "not run",
                     "not run"))
    if has("separate", "mission"):
        g, cost = d("separate", "mission", "unique_gain"), d("mission", "separate", "pooled")
        rows.append(("5c", "the pathway alone (mission's loss) adds to the complementary token and costs no "
                     "retrieval", "separate vs mission", f"unique_gain minus mission's {fmt(g, 3)}, pooled R@1 "
                     f"cost {fmt(cost, 2)}", yes(above(g) and abs(cost[0]) <= COST_POINTS)))
    else:
        rows.append(("5c", "separate pathway alone", "separate, mission", "not run", "not run"))
    for name, src in results["sources"].items():
        h = ordering(src, "mission", "nd0")
        if h:
            c = src["arms"]["nd0"]["runs"]
            rows.append(("6", f"{name}: ordering is testable only where one token does not suffice", "nd0 (mission)",
                         f"nd0 first token {fmt(ms(values(c, 'first')), 1)} vs pooled "
                         f"{fmt(ms(values(c, 'pooled')), 1)}; nested dropout gain {fmt(h['ordering_gain'], 2)}",
                         h["verdict"]))
    return rows


# ------------------------------------------------------------------------------------------------------ report

# (summary key, column label, digits) of the arms tables; a column with no value in a source is left out.
COLUMNS = [("pooled", "R@1 pooled (aligned)", 1), ("first", "R@1 first token", 1), ("all_k", "R@1 all K", 1),
           ("unique_gain", "unique_gain", 3), ("specific_gain", "specific_gain (comp − aligned)", 3),
           ("comp_specific", "comp, specific", 3), ("aligned_specific", "aligned, specific", 3),
           ("comp_shared", "comp, shared", 3), ("aligned_shared", "aligned, shared", 3),
           ("raw_gap", "comp − raw overlap, specific", 3), ("overlap_specific", "raw overlap, specific", 3),
           ("comp_nuisance", "comp, nuisance", 3), ("aligned_nuisance", "aligned, nuisance", 3),
           ("norm_ratio", "comp norm / overlap norm", 3)]
PAIRED = [("pooled", "ΔR@1 pooled", 1), ("first", "ΔR@1 first token", 1), ("unique_gain", "Δunique_gain", 3),
          ("specific_gain", "Δspecific_gain", 3), ("comp_shared", "Δcomp, shared", 3),
          ("aligned_specific", "Δaligned, specific", 3)]


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def headline_markdown(results):
    rows = []
    for source, src in results["sources"].items():
        for preset, h in headlines(src).items():
            if h:
                rows.append([source, f"{preset} (`{h['arm']}` vs `{h['control']}`)", fmt(h["ordering_gain"]),
                             fmt(h["pooled_cost"]), h["verdict"], fmt(h["unique_gain"], 3),
                             fmt(h["specific_gain"], 3), str(h["seeds"])])
    return table(["source", "objective (arm vs its no-ordering control)", "ordering_gain (first-token R@1, points)",
                  "pooled_cost (points)", "ordering", "unique_gain", "specific_gain", "seeds"], rows)


def elsewhere_markdown(results):
    """The same two rules on the other sources, one line each: where the headline source's verdict is or is not
    replicated."""
    lines = []
    for source, src in results["sources"].items():
        if source == results["headline_source"]:
            continue
        objs = [r["arm"] for r in objective_decisions(src) if r["passes"] and r["arm"] != "mission"]
        orders = [h["arm"] for h in ordering_decisions(src) if h["passes"]]
        lines.append(f"On the {source} source by the same rules: arms meeting the objective bar: "
                     f"{', '.join(objs) if src['kinds'] and objs else 'none' if src['kinds'] else 'not measurable'}; "
                     f"ordering mechanisms meeting the ordering bar: {', '.join(orders) or 'none'}.")
    return lines + [""] if lines else []


def decision_markdown(src):
    """The issue's two rules applied to the headline source's numbers."""
    objs, orders = objective_decisions(src), ordering_decisions(src)
    lines = ["## Decision (computed from the numbers by the issue's rules)", ""]
    if "unique_gain" in next(iter(src["arms"].values()))["runs"][0]["summary"]:
        new = [r for r in objs if r["passes"] and r["arm"] != "mission"]
        best = max(new, key=lambda r: r["unique_gain"][0]) if new else None
        lines.append(
            f"Objective: an objective becomes the default if unique_gain and specific_gain each exceed twice their "
            f"std and its pooled R@1 is at most {COST_POINTS:g} point below the mission's. "
            + (f"{len(new)} arm(s) meet it ({', '.join('`' + r['arm'] + '`' for r in new)}); the largest "
               f"unique_gain is "
               f"`{best['arm']}`'s ({fmt(best['unique_gain'], 3)}, specific_gain {fmt(best['specific_gain'], 3)}, "
               f"pooled cost {fmt(best['pooled_cost'])} points): it should become the default objective."
               if best else "No arm meets it: the mission's loss stays the default objective."))
        lines += [""] + table(["arm", "unique_gain", "specific_gain", "pooled R@1 cost vs mission (points)",
                               "meets the bar"],
                              [[f"`{r['arm']}`", fmt(r["unique_gain"], 3), fmt(r["specific_gain"], 3),
                                fmt(r["pooled_cost"]), "yes" if r["passes"] else "no"] for r in objs]) + [""]
    prefix = [h for h in orders if h["arm"] != "mission" and h["passes"]]
    lines.append(
        f"Ordering: an all-prefix loss becomes the default ordering mechanism if it orders the tokens (ordering_gain "
        f"above twice its std, against its no-ordering control) with a pooled cost of at most {COST_POINTS:g} point. "
        + (f"It does ({', '.join('`' + h['arm'] + '`' for h in prefix)}): the all-prefix loss should replace nested "
           f"dropout." if prefix else "No all-prefix arm does: nested dropout stays the ordering mechanism."))
    lines += [""] + table(["mechanism", "arm vs control", "ordering_gain", "pooled_cost", "ordering", "meets the bar"],
                          [[h["how"], f"`{h['arm']}` vs `{h['control']}`", fmt(h["ordering_gain"]),
                            fmt(h["pooled_cost"]), h["verdict"], "yes" if h["passes"] else "no"] for h in orders])
    return lines + [""]


def lengths_markdown(src):
    axis = src.get("lengths")
    if not axis:
        return []
    keys = [k for k in ("pooled", "first", "aligned_specific", "comp_specific", "unique_gain", "specific_gain",
                        "comp_shared")]
    rows = [[f"`{arm}`", e] + [fmt(ms(values(runs, k)), 1 if k in ("pooled", "first") else 3) for k in keys]
            for arm, by_ep in axis["runs"].items() for e, runs in sorted(by_ep.items(), key=lambda x: int(x[0]))]
    return ["### Training length", "",
            f"Arms: the mission, the default objective's arm and the best arm `{axis['best']}` (the largest "
            f"unique_gain among the arms whose pooled R@1 is at most {COST_POINTS:g} point below the mission's, "
            f"chosen from the main runs before these ran), retrained at each length.", ""] + table(
        ["arm", "epochs"] + [dict((c[0], c[1]) for c in COLUMNS)[k] for k in keys], rows) + [
        "", "![training length](lengths.png)", ""]


def source_markdown(source, src, default_arm):
    k_o, K = src["num_overlapping"], src["num_tokens"]
    arms = list(src["arms"])
    factors = ("factors: " + ", ".join(f"{f} ({k})" for f, k in src["kinds"].items()) if src["kinds"] else
               "no known factors (retrieval only)")
    lines = [f"## Source: {source}", "", f"{src['num_train']} train / {src['num_val']} val samples; {factors}; "
             f"training flags beyond each arm's and Stage 1's: `{' '.join(src['flags'])}`", ""]
    lines += [src["note"], ""] if src.get("note") else []
    rows = {a: src["arms"][a]["runs"] for a in arms}
    if src["init"]:
        rows["init (untrained)"] = src["init"]
    cols = [c for c in COLUMNS if any(not np.isnan(x) for r in rows.values() for x in values(r, c[0]))]
    lines += ["### Arms", ""] + table(["arm"] + [c[1] for c in cols],
                                      [[a] + [fmt(ms(values(r, k)), dg) for k, _, dg in cols]
                                       for a, r in rows.items()])
    ref = reference_arm(src)
    pcols = [c for c in PAIRED if c[0] in [k for k, _, _ in cols]]
    lines += ["", f"Paired by seed, arm minus `{ref}`:", ""] + table(
        ["arm"] + [c[1] for c in pcols], [[a] + [fmt(ms(diff(src["arms"][a]["runs"], src["arms"][ref]["runs"], k)), dg)
                                                 for k, _, dg in pcols] for a in arms if a != ref])
    lines += ["", "Arms: " + "; ".join(f"`{a}` = {src['arms'][a]['description']}" for a in arms) + ". `init` = the "
              "untrained register module of each seed with the trainer's default flags (the unique_gain control is "
              "each arm's own untrained module: `aligned+complementary(init)`).", "",
              "Stage 1 global embedding R@1: " + ", ".join(f"{p} {np.mean(list(v.values())):.1f}"
                                                           for p, v in src["stage1"]["r1"].items()), ""]
    lines += [f"### Prefix curve (R@1 from the first k tokens, k = 1..{K}; k > {k_o} adds complementary tokens)",
              ""] + table(["arm"] + [f"k={k}" for k in range(1, K + 1)],
                          [[a] + [fmt(ms(np.array([r["prefix_mean"] for r in src["arms"][a]["runs"]])[:, k]), 1)
                                  for k in range(K)] for a in arms])
    for arm, control, how in ORDERING:
        h = ordering(src, arm, control)
        if h:
            lines.append(f"\n`{arm}` ({how}) vs `{control}`: ordering_gain {fmt(h['ordering_gain'])}, pooled_cost "
                         f"{fmt(h['pooled_cost'])}: **{h['verdict']}** (untestable where the control's first token "
                         f"is within {FLAT_POINTS:g} points of its pooled R@1).")
    lines += ["", f"![prefix curves](prefix_{source_file(source)}.png)", ""]
    lines += tvl_markdown(src)
    if src["kinds"]:
        for a in probe_arms(src, default_arm):
            lines += probe_markdown(src, a)
        lines += [f"![probe heat map](probes_{source_file(source)}.png)", ""]
    return lines


def tvl_markdown(src):
    """TVL's metrics (main_train_stage2 --eval_only) per arm, Stage 1 beside Stage 2."""
    lines = []
    for a, arm in src["arms"].items():
        for split in arm["runs"][0].get("tvl", {}):
            reports = [r["tvl"][split] for r in arm["runs"]]
            lines += [f"### TVL metrics, arm `{a}`, {split} split ({reports[0]['n']} samples)", ""] + table(
                ["metric", "stage1", "stage2"], [[k, fmt(ms([r["stage1"][k] for r in reports])),
                                                  fmt(ms([r["stage2"][k] for r in reports]))]
                                                 for k in reports[0]["stage1"]]) + [""]
    return lines


def probe_arms(src, default_arm):
    best = src.get("lengths", {}).get("best")
    return [a for a in dict.fromkeys([default_arm, best, "separate_partner"]) if a in src["arms"]][:2]


def write_report(results, out):
    default = results["default_objective"]
    lines = ["# FluxTalk study results", "",
             "Generated by `study/run_study.py`; every number is mean ± std over seeds (population std). "
             "Probe scores: R² for continuous factors, accuracy for classes; ridge / least-squares probes fitted "
             "on the plain train split, scored on val. R@1 in %, vision↔tactile, mean of both directions. "
             "`aligned` = the L2-normalised mean of the overlapping tokens (what users retrieve with); "
             "unique_gain = own specific score of [aligned, complementary] minus [aligned, the same seed and arm's "
             "complementary token at initialisation]; specific_gain = complementary minus aligned, own specific "
             "factors. Every objective weight is fixed a priori at 1 (no tuning).", "",
             f"Command: `{results['command']}`  ", f"Wall time: {results['wall_time_s'] / 60:.1f} min "
             f"({results['size']} size, {results['seeds']} seeds, epochs per run {results['epochs']}, training "
             f"lengths {results['lengths']}, {results['threads']} CPU thread(s), device {results['device']})", "",
             f"main_train_stage2's default objective: `{default}` (arm `{PRESETS[default][0]}`; `--arms default` "
             f"names it).", ""]
    if results["skipped_arms"]:
        lines += [f"Arms not run (flags missing in this main_train_stage2): {', '.join(results['skipped_arms'])}", ""]
    lines += ["## Headline", ""] + headline_markdown(results) + [""]
    main_src = results["sources"][results["headline_source"]]
    lines += decision_markdown(main_src) + elsewhere_markdown(results)
    lines += ["## Hypotheses (issue 17), verdicts computed", ""] + table(
        ["#", "hypothesis", "arms", "evidence", "verdict"], [list(r) for r in hypotheses(results)]) + [""]
    lines += lengths_markdown(main_src)
    for source, src in results["sources"].items():
        lines += source_markdown(source, src, PRESETS[default][0])
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def probe_rows(src, arm):
    """[(label, {factor: [score per seed]})]: every representation of the arm, the init control, Stage 1 global."""
    rows = []
    for m in src["arms"][arm]["runs"][0]["probes"]:
        for rep in src["arms"][arm]["runs"][0]["probes"][m]:
            rows.append((f"{m} {rep}", {f: [r["probes"][m][rep][f] for r in src["arms"][arm]["runs"]]
                                       for f in src["kinds"]}))
        for rep in ("aligned", "complementary"):
            rows.append((f"{m} {rep} (untrained default module)",
                         {f: [r["probes"][m][rep][f] for r in src["init"]] for f in src["kinds"]}))
        rows.append((f"{m} Stage 1 global", {f: [src["stage1"]["probes"][m][f]] for f in src["kinds"]}))
    return rows


def probe_markdown(src, arm):
    factors = list(src["kinds"])
    return [f"### Probes, arm `{arm}` (plus controls)", ""] + table(
        ["representation"] + factors, [[label] + [fmt(ms(row[f])) for f in factors]
                                       for label, row in probe_rows(src, arm)]) + [""]


def source_file(source):
    return "cache" if source.startswith("cache:") else source


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    default_arm = PRESETS[results["default_objective"]][0]
    for source, src in results["sources"].items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for a in [a for a in ("mission", "nd0", "prefix_all", "objective_separate", "separate_noorder")
                  if a in src["arms"]]:
            curves = np.array([r["prefix_mean"] for r in src["arms"][a]["runs"]])
            k = np.arange(1, curves.shape[1] + 1)
            ax.errorbar(k, curves.mean(0), yerr=curves.std(0), capsize=3, marker="o", label=a)
        ax.axvline(src["num_overlapping"] + 0.5, color="grey", ls=":", lw=1)
        ax.set(xlabel="first k register tokens (right of the line: + complementary)", ylabel="R@1 (%)",
               title=f"{source}: retrieval from a prefix", xticks=k)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"prefix_{source_file(source)}.png"), dpi=110)
        plt.close(fig)
        if src["kinds"]:
            probe_plot(plt, src, source, probe_arms(src, default_arm), out)
    axis = results["sources"][results["headline_source"]].get("lengths")
    if axis:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for arm, by_ep in axis["runs"].items():
            eps = sorted(by_ep, key=int)
            for ax, key in zip(axes, ("unique_gain", "aligned_specific")):
                m = [ms(values(by_ep[e], key)) for e in eps]
                ax.errorbar([int(e) for e in eps], [x[0] for x in m], yerr=[x[1] for x in m], capsize=3, marker="o",
                            label=arm)
        ticks = sorted({int(e) for by_ep in axis["runs"].values() for e in by_ep})
        for ax, key in zip(axes, ("unique_gain", "aligned embedding, own specific factors")):
            ax.set(xscale="log", xlabel="epochs", ylabel=key, title=key)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "lengths.png"), dpi=110)
        plt.close(fig)


def probe_plot(plt, src, source, arms, out):
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
    fig.savefig(os.path.join(out, f"probes_{source_file(source)}.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
