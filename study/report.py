"""The study's summary (headline numbers, the decision rule, the hypotheses table, the factor-free measure's
validation, all computed from the per-run numbers run_study.py stores in results.json), RESULTS.md and the plots.

Every rule is fixed here, before any number is seen: a gain counts when its mean over seeds exceeds twice its
(population) std; a new default may cost at most COST_POINTS of pooled R@1 against the mission's loss; a
no-ordering control whose first token retrieves within FLAT_POINTS of its pooled embedding means one token
suffices, so ordering is reported untestable there rather than failed.

The decision rule (issue 22, item 4; decide()): an arm becomes the default objective only if, for EACH modality and
under BOTH latent sources (RULE_SOURCES: Stage 1's global embeddings hold their specific latent; touch's has shed
it):
  - unique_gain > 2 std and >= UNIQUE_MIN;
  - specific_gain > 2 std (so > 0);
  - pooled R@1 within COST_POINTS of the mission's (paired by seed: mission minus arm <= COST_POINTS);
  - ordering_gain > 2 std and pooled_cost <= COST_POINTS against its no-ordering control (nd0 on the shared
    pathway; separate_noorder on the separate pathway, whose overlapping tokens no complementary objective changes).
Among the arms that pass, a selective one is preferred: selectivity (the complementary token's own specific score
minus its shared score) > 2 std for every modality and both sources. Among the preferred arms (all passers if
none is selective) the largest minimum unique_gain over modality x source wins (an exact tie: the arm listed
first). If none passes, the trainer's current default stays, and the report says per modality and source which
conditions fail, with their numbers.
"""
import os

import numpy as np

FLAT_POINTS = 2.0  # a no-ordering control whose first token is within this many R@1 points of its pool: flat
COST_POINTS = 1.0  # the bound on the pooled R@1 cost of a new default
UNIQUE_MIN = 0.05  # issue 22: unique_gain must also be at least this large (probe score units)
RULE_SOURCES = ("latent", "latent_shed")  # the decision rule's two settings of the latent-source axis
# objective preset of main_train_stage2 --objective -> (its arm, its no-ordering control)
PRESETS = {"mission": ("mission", "nd0"), "separate": ("objective_separate", "separate_noorder"),
           "tokens": ("tokens", "separate_noorder")}
ORDERING = [("mission", "nd0", "nested dropout 0.5"), ("prefix_all", "nd0", "all-prefix loss"),
            ("objective_separate", "separate_noorder", "all-prefix loss, separate pathway")]  # (arm, control, how)
NAN = (float("nan"), float("nan"))  # (mean, std) of something not run


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


def modality_order(mods):
    """Touch first (the modality this project exists for), then the others as given."""
    return sorted(mods, key=lambda m: m != "tactile")


def src_mods(src):
    return modality_order(src["mods"])


def is_flat(runs):
    """One token suffices: the first token's R@1 within FLAT_POINTS of the pooled R@1 (mean over seeds)."""
    return bool(np.mean(values(runs, "pooled")) - np.mean(values(runs, "first")) <= FLAT_POINTS)


def ordering(src, arm, control):
    """Ordering of `arm` against its no-ordering `control`, or None when either was not run."""
    if arm not in src["arms"] or control not in src["arms"]:
        return None
    a, c = src["arms"][arm]["runs"], src["arms"][control]["runs"]
    h = {"control": control, "ordering_gain": ms(diff(a, c, "first")), "pooled_cost": ms(diff(c, a, "pooled")),
         "flat": is_flat(c), **gains(src, arm)}
    h["verdict"] = ("ordering untestable: one token suffices" if h["flat"] else
                    "orders" if above(h["ordering_gain"]) else "does not order")
    return h


def gains(src, arm):
    """The arm's seed count and mean ± std gains, over modalities and per modality."""
    a = src["arms"][arm]["runs"]
    h = {"arm": arm, "seeds": len(a)}
    for key in ("unique_gain", "specific_gain", "content_gain"):
        h[key] = ms(values(a, key))
        h.update({f"{key}_{m}": ms(values(a, f"{key}_{m}")) for m in src_mods(src)})
    return h


def headlines(src):
    """{objective preset: its ordering() numbers} on one source."""
    return {p: ordering(src, arm, control) for p, (arm, control) in PRESETS.items()}


def preset_headline(results, preset):
    """The numbers of one preset's summary line: ordering, pooled cost and gains on the headline source (mean over
    modalities, and per modality), touch's unique_gain on latent_shed; ordering and cost nan where its control was
    not run; None where its arm was not run there."""
    src, (arm, control) = results["sources"][results["headline_source"]], PRESETS[preset]
    if arm not in src["arms"]:
        return None
    h = ordering(src, arm, control) or dict(gains(src, arm), control=control, ordering_gain=NAN, pooled_cost=NAN)
    shed = results["sources"].get("latent_shed", {"arms": {}, "mods": []})
    return dict(h, unique_tactile_shed=ms(values(shed["arms"][arm]["runs"], "unique_gain_tactile"))
                if arm in shed["arms"] else NAN)


def summary_line(prefix, h):
    if h is None:
        return f"{prefix}: unavailable (its arm was not run)"
    u = {m: h.get(f"unique_gain_{m}", NAN) for m in ("vision", "tactile")}
    return (f"{prefix}: ordering_gain={h['ordering_gain'][0]:.2f} ordering_std={h['ordering_gain'][1]:.2f} "
            f"pooled_cost={h['pooled_cost'][0]:.2f} unique_gain={h['unique_gain'][0]:.3f} "
            f"unique_std={h['unique_gain'][1]:.3f} unique_vision={u['vision'][0]:.3f} "
            f"unique_vision_std={u['vision'][1]:.3f} unique_tactile={u['tactile'][0]:.3f} "
            f"unique_tactile_std={u['tactile'][1]:.3f} unique_tactile_shed={h['unique_tactile_shed'][0]:.3f} "
            f"unique_tactile_shed_std={h['unique_tactile_shed'][1]:.3f} specific_gain={h['specific_gain'][0]:.3f} "
            f"specific_std={h['specific_gain'][1]:.3f} seeds={h['seeds']}")


def content_line(source, src, arm):
    """One source's factor-free numbers for `arm`: content_gain per modality and the Stage 1 diagnostic."""
    runs = src["arms"][arm]["runs"] if arm in src["arms"] else []
    parts = []
    for m in src_mods(src):
        c = ms(values(runs, f"content_gain_{m}"))
        parts.append(f"content_gain_{m}={c[0]:.3f} content_gain_{m}_std={c[1]:.3f}")
    parts += [f"stage1_content_{m}={src['stage1']['content'][m]['stage1_content']:.3f}" for m in src_mods(src)]
    return f"study(content, {source}, {arm}): " + " ".join(parts) + f" seeds={len(runs)}"


def reference_arm(src):
    return "mission" if "mission" in src["arms"] else next(iter(src["arms"]))


def best_arm(src, default_arm):
    """The rule fixed before the length runs (issue 17): the largest mean unique_gain (over modalities) among the
    arms other than the default whose pooled R@1 is at most COST_POINTS below the mission's (paired mean)."""
    ref = src["arms"][reference_arm(src)]["runs"]
    rows = [(arm, ms(values(a["runs"], "unique_gain"))[0]) for arm, a in src["arms"].items()
            if arm != default_arm and ms(diff(ref, a["runs"], "pooled"))[0] <= COST_POINTS]
    rows = [r for r in rows if not np.isnan(r[1])]
    return max(rows, key=lambda r: r[1])[0] if rows else None


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


# ------------------------------------------------------------------------------------------ the decision rule

def arm_conditions(src, arm):
    """The rule's conditions for `arm` on one source: per modality (unique, specific, selective) and per source
    (pooled R@1 against the mission, ordering against the arm's own no-ordering control); a condition whose numbers
    were not run fails."""
    a = src["arms"][arm]
    runs, control = a["runs"], a.get("control")
    out = {"modalities": {}}
    for m in src_mods(src):
        u, s, sel = (ms(values(runs, f"{k}_{m}")) for k in ("unique_gain", "specific_gain", "selectivity"))
        out["modalities"][m] = {"unique_gain": u, "specific_gain": s, "selectivity": sel,
                                "unique_ok": above(u) and u[0] >= UNIQUE_MIN,
                                "specific_ok": above(s) and s[0] > 0, "selective": above(sel)}
    out["mission_gap"] = ms(diff(src["arms"]["mission"]["runs"], runs, "pooled")) if "mission" in src["arms"] else NAN
    out["mission_ok"] = bool(out["mission_gap"][0] <= COST_POINTS)  # False for nan
    h = ordering(src, arm, control) if control else None
    out["control"] = control
    out["ordering_gain"], out["pooled_cost"] = (h["ordering_gain"], h["pooled_cost"]) if h else (NAN, NAN)
    out["ordering_ok"] = bool(h is not None and above(h["ordering_gain"]) and h["pooled_cost"][0] <= COST_POINTS)
    out["passes"] = out["mission_ok"] and out["ordering_ok"] and all(
        c["unique_ok"] and c["specific_ok"] for c in out["modalities"].values())
    return out


def failures(cond):
    """[text] of every condition `cond` (arm_conditions) fails, with its numbers."""
    out = []
    for m, c in cond["modalities"].items():
        if not c["unique_ok"]:
            out.append(f"{m} unique_gain {fmt(c['unique_gain'], 3)} (needs > 2 std and >= {UNIQUE_MIN:g})")
        if not c["specific_ok"]:
            out.append(f"{m} specific_gain {fmt(c['specific_gain'], 3)} (needs > 2 std)")
    if not cond["mission_ok"]:
        out.append(f"pooled R@1 {fmt(cond['mission_gap'])} points below the mission's (needs <= {COST_POINTS:g})")
    if not cond["ordering_ok"]:
        out.append(f"ordering against `{cond['control']}`: ordering_gain {fmt(cond['ordering_gain'])}, pooled_cost "
                   f"{fmt(cond['pooled_cost'])} (needs ordering_gain > 2 std, pooled_cost <= {COST_POINTS:g})"
                   if cond["control"] else "no no-ordering control")
    return out


def decide(results):
    """The decision rule (module docstring) on results["sources"]: {"status", "candidates": {arm: {source:
    arm_conditions}}, "passers", "selective", "min_unique": {arm: value}, "chosen", "preset", "kept", "failures":
    {arm: {source: [text]}}}. Candidates: every arm run on both RULE_SOURCES that has a no-ordering control (the
    controls themselves have no ordering mechanism to test)."""
    srcs = [results["sources"].get(s) for s in RULE_SOURCES]
    default = results["default_objective"]
    out = {"sources": list(RULE_SOURCES), "default_objective": default, "candidates": {}, "passers": [],
           "selective": [], "min_unique": {}, "failures": {}, "not_candidates": {}, "chosen": None, "preset": None,
           "kept": True}
    if not all(srcs):
        out["status"] = f"not decided: the rule needs both {' and '.join(RULE_SOURCES)} sources"
        return out
    names = [a for a in srcs[0]["arms"] if all(a in s["arms"] and s["arms"][a].get("control") for s in srcs)]
    # arms missing from a source (not run there, or their training failed), and why
    for source, s in zip(RULE_SOURCES, srcs):
        for arm in list(srcs[0]["arms"]) + list(srcs[1]["arms"]) + list(s.get("failed", {})):
            entry = srcs[0]["arms"].get(arm) or srcs[1]["arms"].get(arm)
            is_control = entry is not None and not entry.get("control")
            if arm not in names and arm not in out["not_candidates"] and not is_control and (
                    arm in s.get("failed", {}) or arm not in s["arms"]):
                out["not_candidates"][arm] = (f"its training failed on {source}: {s['failed'][arm]}"
                                              if arm in s.get("failed", {}) else f"not run on {source}")
    for arm in names:
        conds = {name: arm_conditions(s, arm) for name, s in zip(RULE_SOURCES, srcs)}
        out["candidates"][arm] = conds
        out["min_unique"][arm] = float(min(c["unique_gain"][0] for cond in conds.values()
                                           for c in cond["modalities"].values()))
        if all(c["passes"] for c in conds.values()):
            out["passers"].append(arm)
            if all(c["selective"] for cond in conds.values() for c in cond["modalities"].values()):
                out["selective"].append(arm)
        else:
            out["failures"][arm] = {s: failures(c) for s, c in conds.items() if not c["passes"]}
    pool = out["selective"] or out["passers"]
    if pool:
        best = max(out["min_unique"][a] for a in pool)
        out["chosen"] = next(a for a in pool if out["min_unique"][a] == best)  # a tie: the arm listed first
        out["preset"] = arm_preset(out["chosen"])
        out["kept"] = out["preset"] == default
        out["status"] = (f"`{out['chosen']}` meets the rule" + (" and is selective" if out["selective"] else
                                                                 " (no passing arm is selective)"))
    else:
        out["chosen"], out["preset"] = PRESETS[default][0], default
        out["status"] = f"no arm meets the rule: the default stays `--objective {default}`"
    return out


def decision_line(dec):
    """One line: the rule's outcome."""
    if not dec["candidates"]:
        return f"study(decision): {dec['status']}"
    head = (f"chosen={dec['chosen']} preset={dec['preset'] or 'none'}" if dec["passers"] else
            f"chosen=none keep={dec['default_objective']}")
    return (f"study(decision): {head} passes={','.join(dec['passers']) or 'none'} "
            f"selective={','.join(dec['selective']) or 'none'} candidates={len(dec['candidates'])}")


def arm_preset(arm):
    """The --objective preset whose arm this is, or None (an arm with no preset of its own)."""
    return next((p for p, (a, _) in PRESETS.items() if a == arm), None)


# ------------------------------------------------------------------------------ the factor-free measure

def content_validation(results):
    """Sign agreement of content_gain with unique_gain, and with own_gain (specific and nuisance factors: all that
    a measure knowing no factors can see), means over seeds, on every latent arm x latent source x modality cell:
    {"cells": [...], "agree", "n", "agree_strong", "n_strong", "agree_own", "disagreements"}; strong = unique_gain
    beyond 2 std from 0."""
    cells = []
    for source in RULE_SOURCES:
        src = results["sources"].get(source)
        for arm, a in (src or {"arms": {}})["arms"].items():
            for m in src_mods(src):
                u, c = ms(values(a["runs"], f"unique_gain_{m}")), ms(values(a["runs"], f"content_gain_{m}"))
                if np.isnan(u[0]) or np.isnan(c[0]):
                    continue
                own, nuisance = ms(values(a["runs"], f"own_gain_{m}")), ms(values(a["runs"], f"nuisance_gain_{m}"))
                cells.append({"source": source, "arm": arm, "modality": m, "unique_gain": u, "content_gain": c,
                              "own_gain": own, "nuisance_gain": nuisance,
                              "agree": bool(np.sign(u[0]) == np.sign(c[0])), "strong": bool(abs(u[0]) > 2 * u[1]),
                              "agree_own": bool(np.sign(own[0]) == np.sign(c[0]))})
    strong = [c for c in cells if c["strong"]]
    return {"cells": cells, "agree": sum(c["agree"] for c in cells), "n": len(cells),
            "agree_strong": sum(c["agree"] for c in strong), "n_strong": len(strong),
            "agree_own": sum(c["agree_own"] for c in cells), "r_unique": correlation(cells, "unique_gain"),
            "r_own": correlation(cells, "own_gain"),
            "disagreements": [c for c in cells if not (c["agree"] and c["agree_own"])]}


def correlation(cells, key):
    """Pearson correlation of content_gain with `key` over the cells' means (nan below three cells)."""
    if len(cells) < 3:
        return float("nan")
    return float(np.corrcoef([c[key][0] for c in cells], [c["content_gain"][0] for c in cells])[0, 1])


def agreement_line(v):
    return (f"study(content_agreement): sign agreement of content_gain with unique_gain agree={v['agree']}/{v['n']} "
            f"beyond_2std={v['agree_strong']}/{v['n_strong']}; with own_gain (specific and nuisance) "
            f"agree_own={v['agree_own']}/{v['n']}")


# ------------------------------------------------------------------------------------------------ hypotheses

def hypotheses(results):
    """[(number, hypothesis, arms, evidence, verdict)] for issue 17's hypotheses 1-6 and issue 22's 7, computed from
    the numbers per modality (touch first): a difference counts when its mean exceeds 2 std over seeds, a retrieval
    cost when it exceeds COST_POINTS."""
    L = results["sources"].get("latent", {"arms": {}, "mods": []})
    arms, mods = L["arms"], src_mods(L)
    has = lambda *names: all(n in arms for n in names)  # noqa: E731
    d = lambda a, b, key: ms(diff(arms[a]["runs"], arms[b]["runs"], key))  # noqa: E731
    v = lambda a, key: ms(values(arms[a]["runs"], key))  # noqa: E731
    yes = lambda ok: "holds" if ok else "fails"  # noqa: E731

    def per_mod(fn, mods=mods):
        """fn(m) -> (evidence, ok) per modality -> (evidence, verdict), one clause each."""
        res = [(m, *fn(m)) for m in mods]
        return "; ".join(f"{m}: {e}" for m, e, _ in res), ", ".join(f"{m} {yes(ok)}" for m, _, ok in res)

    def costed(arm, evidence, verdict, src_arms=arms):
        """Evidence and verdict of an objective on the complementary token, with its pooled R@1 cost vs mission."""
        cost = ms(diff(src_arms["mission"]["runs"], src_arms[arm]["runs"], "pooled"))
        return f"{evidence}; pooled R@1 cost vs mission {fmt(cost)}", verdict + (
            f" (at a pooled R@1 cost of {cost[0]:.1f} points)" if cost[0] > COST_POINTS else "")

    rows = []
    lengths = L.get("lengths", {}).get("runs", {}).get("mission")
    if lengths and len(lengths) > 1:
        eps = sorted(lengths, key=int)
        shed = lambda m: ms(diff(lengths[eps[-1]], lengths[eps[0]], f"aligned_specific_{m}"))  # noqa: E731
        gains = lambda m: {e: ms(values(lengths[e], f"unique_gain_{m}")) for e in eps}  # noqa: E731
        rows.append(("1a", "the aligned embedding sheds specific information with training", "mission at "
                     + "/".join(eps) + " epochs", *per_mod(lambda m: (
                         f"aligned, specific: {eps[-1]} minus {eps[0]} epochs {fmt(shed(m), 3)}",
                         shed(m)[0] < 0 and above((-shed(m)[0], shed(m)[1]))))))
        rows.append(("1b", "measured against the aligned embedding, the mission's complementary token adds "
                     "specific information (by the longest training)", "mission at " + "/".join(eps) + " epochs",
                     *per_mod(lambda m: ("unique_gain " + ", ".join(f"{e} ep {fmt(g, 3)}" for e, g in
                                                                    gains(m).items()), above(gains(m)[eps[-1]])))))
    else:
        rows.append(("1", "training length: the aligned embedding sheds specific information", "mission",
                     "no training-length runs", "not run"))
    if has("difference", "mission"):
        rows.append(("2", "a batch-level (DSN) difference loss keeps shared information out of the complementary "
                     "token", "difference vs mission", *costed("difference", *per_mod(lambda m: (
                         f"complementary, shared: {fmt(d('difference', 'mission', f'comp_shared_{m}'), 3)} "
                         f"(difference minus mission); unique_gain {fmt(v('difference', f'unique_gain_{m}'), 3)}",
                         d("difference", "mission", f"comp_shared_{m}")[0] < 0
                         and above((-d("difference", "mission", f"comp_shared_{m}")[0],
                                    d("difference", "mission", f"comp_shared_{m}")[1])))))))
    else:
        rows.append(("2", "DSN difference loss", "difference", "not run", "not run"))
    if has("partner", "residual", "mission"):
        rows.append(("3a", "a cross-modal (partner) residual gives the complementary token more to add than the "
                     "own residual", "partner vs residual", *costed("partner", *per_mod(lambda m: (
                         f"unique_gain partner {fmt(v('partner', f'unique_gain_{m}'), 3)}, minus residual "
                         f"{fmt(d('partner', 'residual', f'unique_gain_{m}'), 3)}",
                         above(d("partner", "residual", f"unique_gain_{m}"))
                         and above(v("partner", f"unique_gain_{m}")))))))
    else:
        rows.append(("3a", "cross-modal residual", "partner, residual", "not run", "not run"))
    if has("view", "mission"):
        rows.append(("3b", "an intra-modality view contrastive term makes the complementary token keep specific "
                     "information", "view vs mission", *costed("view", *per_mod(lambda m: (
                         f"unique_gain view minus mission {fmt(d('view', 'mission', f'unique_gain_{m}'), 3)}",
                         above(d("view", "mission", f"unique_gain_{m}")))))))
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
        cost = d("mission", "partner", "pooled")
        ev, verdict = per_mod(lambda m: (f"aligned, specific: partner minus mission "
                                         f"{fmt(d('partner', 'mission', f'aligned_specific_{m}'), 3)}",
                                         above(d("partner", "mission", f"aligned_specific_{m}"))
                                         or cost[0] > COST_POINTS))
        rows.append(("5a", "on shared blocks a complementary objective leaks into the aligned embedding",
                     "partner vs mission", f"{ev}; pooled R@1 cost {fmt(cost, 2)}", verdict))
    else:
        rows.append(("5a", "leak through shared blocks", "partner, mission", "not run", "not run"))
    if has("separate_partner", "mission"):
        cost = d("mission", "separate_partner", "pooled")
        ev, verdict = per_mod(lambda m: (
            f"unique_gain {fmt(v('separate_partner', f'unique_gain_{m}'), 3)}, specific_gain "
            f"{fmt(v('separate_partner', f'specific_gain_{m}'), 3)}",
            above(v("separate_partner", f"unique_gain_{m}")) and above(v("separate_partner", f"specific_gain_{m}"))
            and cost[0] <= COST_POINTS))
        rows.append(("5b", "a complementary pathway of its own (with the cross-modal residual) keeps specific "
                     "information at no retrieval cost", "separate_partner vs mission",
                     f"{ev}; pooled R@1 cost {fmt(cost, 2)}", verdict))
    else:
        rows.append(("5b", "separate pathway + cross-modal residual", "separate_partner, mission", "not run",
                     "not run"))
    if has("separate", "mission"):
        cost = d("mission", "separate", "pooled")
        ev, verdict = per_mod(lambda m: (f"unique_gain minus mission's "
                                         f"{fmt(d('separate', 'mission', f'unique_gain_{m}'), 3)}",
                                         above(d("separate", "mission", f"unique_gain_{m}"))
                                         and abs(cost[0]) <= COST_POINTS))
        rows.append(("5c", "the pathway alone (mission's loss) adds to the complementary token and costs no "
                     "retrieval", "separate vs mission", f"{ev}; pooled R@1 cost {fmt(cost, 2)}", verdict))
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
    return rows + shed_hypotheses(results, per_mod, yes)


def shed_hypotheses(results, per_mod, yes):
    """Issue 22's hypotheses on the latent-source axis (rows 7a-7d)."""
    rows = []
    S = {s: results["sources"].get(s, {"arms": {}, "mods": []}) for s in RULE_SOURCES}
    bar = lambda g: above(g) and g[0] >= UNIQUE_MIN  # noqa: E731
    u = lambda s, arm, m: ms(values(S[s]["arms"][arm]["runs"], f"unique_gain_{m}"))  # noqa: E731
    if all("objective_separate" in S[s]["arms"] for s in RULE_SOURCES):
        rows.append(("7a", "the partner residual needs the specific latent in Stage 1's global embedding: the "
                     "default's unique_gain falls below the bar where touch's global has shed it (and only there)",
                     "objective_separate, latent vs latent_shed", *per_mod(lambda m: (
                         f"unique_gain latent {fmt(u('latent', 'objective_separate', m), 3)}, latent_shed "
                         f"{fmt(u('latent_shed', 'objective_separate', m), 3)}",
                         bar(u("latent", "objective_separate", m)) and
                         bar(u("latent_shed", "objective_separate", m)) != (m == "tactile")), src_mods(S["latent"]))))
    for arm, what in (("tokens", "a token-level target (own frozen context tokens, pooled)"),
                      ("tokens_decoder", "a token-level target (one query per context position)"),
                      ("separate_view", "the view term on the separate pathway")):
        if all(arm in S[s]["arms"] for s in RULE_SOURCES):
            rows.append((f"7b ({arm})", f"{what} keeps each modality's specific information under both settings "
                         "of the axis", f"{arm}, latent and latent_shed", *per_mod(lambda m: (
                             f"unique_gain latent {fmt(u('latent', arm, m), 3)}, latent_shed "
                             f"{fmt(u('latent_shed', arm, m), 3)}",
                             bar(u("latent", arm, m)) and bar(u("latent_shed", arm, m))), src_mods(S["latent"]))))
    for arm, ref in (("separate_difference", "objective_separate"), ("tokens_difference", "tokens")):
        src = S["latent"]
        if arm in src["arms"] and ref in src["arms"]:
            sel = lambda m, a: ms(values(src["arms"][a]["runs"], f"selectivity_{m}"))  # noqa: E731
            rows.append((f"7c ({arm})", "the difference term on the separate pathway makes the complementary "
                         "token selective (own specific score above its shared score) and keeps unique_gain above "
                         "the bar", f"{arm} vs {ref}, latent", *per_mod(lambda m: (
                             f"selectivity {fmt(sel(m, arm), 3)} ({ref}: {fmt(sel(m, ref), 3)}), unique_gain "
                             f"{fmt(u('latent', arm, m), 3)}", above(sel(m, arm)) and bar(u("latent", arm, m))),
                             src_mods(src))))
    return rows


# ------------------------------------------------------------------------------------------------------ report

# (summary key, column label, digits) of the retrieval table; a column with no value in a source is left out.
COLUMNS = [("pooled", "R@1 pooled (aligned)", 1), ("first", "R@1 first token", 1), ("all_k", "R@1 all K", 1),
           ("norm_ratio", "comp norm / overlap norm", 3)]
# Per-modality columns (key f"{stat}_{m}") of the probe tables.
MOD_COLUMNS = [("unique_gain", "unique_gain", 3), ("specific_gain", "specific_gain (comp − aligned)", 3),
               ("selectivity", "selectivity (comp: specific − shared)", 3), ("content_gain", "content_gain", 3),
               ("comp_specific", "comp, specific", 3), ("comp_shared", "comp, shared", 3),
               ("comp_nuisance", "comp, nuisance", 3), ("aligned_specific", "aligned, specific", 3),
               ("aligned_shared", "aligned, shared", 3), ("aligned_nuisance", "aligned, nuisance", 3),
               ("raw_gap", "comp − raw overlap, specific", 3)]
PAIRED = [("pooled", "ΔR@1 pooled", 1), ("first", "ΔR@1 first token", 1)]
MOD_PAIRED = [("unique_gain", "Δunique_gain", 3), ("specific_gain", "Δspecific_gain", 3),
              ("selectivity", "Δselectivity", 3), ("content_gain", "Δcontent_gain", 3),
              ("comp_shared", "Δcomp, shared", 3), ("aligned_specific", "Δaligned, specific", 3)]


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def yn(ok):
    return "yes" if ok else "no"


def headline_markdown(results):
    """Each preset against its no-ordering control, per source; the gains per modality (touch first)."""
    rows = []
    for source, src in results["sources"].items():
        for preset, h in headlines(src).items():
            if h:
                runs = src["arms"][h["arm"]]["runs"]
                for m in src_mods(src):
                    rows.append([source, f"{preset} (`{h['arm']}` vs `{h['control']}`)", fmt(h["ordering_gain"]),
                                 fmt(h["pooled_cost"]), h["verdict"], m]
                                + [fmt(ms(values(runs, f"{k}_{m}")), 3) for k in HEADLINE_GAINS] + [str(h["seeds"])])
    return table(["source", "objective (arm vs its no-ordering control)", "ordering_gain (first-token R@1, points)",
                  "pooled_cost (points)", "ordering", "modality"] + list(HEADLINE_GAINS) + ["seeds"], rows)


HEADLINE_GAINS = ("unique_gain", "specific_gain", "selectivity", "content_gain")


def decision_markdown(results):
    """The rule (module docstring) applied: the table per candidate, the choice, where the claim fails."""
    dec = decide(results)
    lines = ["## Decision: the default objective (rule fixed before the runs, computed from the numbers)", "",
             f"An arm becomes the default only if, for each modality and under both `latent` and `latent_shed`: "
             f"unique_gain > 2 std and ≥ {UNIQUE_MIN:g}; specific_gain > 2 std; pooled R@1 at most {COST_POINTS:g} "
             f"point below the mission's (paired by seed); ordering_gain > 2 std and pooled_cost ≤ {COST_POINTS:g} "
             f"against its no-ordering control. Among those that pass, a selective one (selectivity > 2 std for "
             f"every modality and both sources) is preferred; then the largest minimum unique_gain over modality × "
             f"source. If none passes, the trainer's default stays. Candidates: every arm run on both sources that "
             f"has a no-ordering control (the controls `nd0` and `separate_noorder` have no ordering mechanism).", ""]
    if not dec["candidates"]:
        return lines + [f"**{dec['status']}.**", ""]
    rows = []
    for arm, conds in dec["candidates"].items():
        for source, c in conds.items():
            for m, x in c["modalities"].items():
                rows.append([f"`{arm}`", source, m, fmt(x["unique_gain"], 3) + ("" if x["unique_ok"] else " ✗"),
                             fmt(x["specific_gain"], 3) + ("" if x["specific_ok"] else " ✗"),
                             fmt(x["selectivity"], 3) + (" (selective)" if x["selective"] else ""),
                             fmt(c["mission_gap"]) + ("" if c["mission_ok"] else " ✗"),
                             f"vs `{c['control']}`: {fmt(c['ordering_gain'])}, cost {fmt(c['pooled_cost'])}"
                             + ("" if c["ordering_ok"] else " ✗"), yn(c["passes"])])
    lines += table(["arm", "source", "modality", "unique_gain", "specific_gain", "selectivity",
                    "pooled R@1 below mission's (points)", "ordering: gain, pooled cost", "source passes"], rows)
    lines += ["", "✗ marks a failed condition.", ""]
    lines += table(["arm", "preset", "passes", "selective", "min unique_gain (modality × source)"],
                   [[f"`{a}`", f"`--objective {arm_preset(a)}`" if arm_preset(a) else "no preset",
                     yn(a in dec["passers"]), yn(a in dec["selective"]), f"{dec['min_unique'][a]:.3f}"]
                    for a in dec["candidates"]]) + [""]
    if dec["passers"]:
        chosen = dec["chosen"]
        lines.append(f"**Decision: `{chosen}`** ({dec['status']}; minimum unique_gain {dec['min_unique'][chosen]:.3f}). "
                     + (f"Its preset: `--objective {dec['preset']}`" if dec["preset"] else
                        "It has no `--objective` preset of its own: its flags are "
                        f"`{' '.join(results['sources']['latent']['arms'][chosen]['flags'])}`")
                     + (" (already the default)." if dec["kept"] else "."))
    else:
        lines.append(f"**Decision: {dec['status']}.** Where the claim fails (per arm, source and modality):")
    lines.append("")
    for arm, by_source in dec["failures"].items():
        for source, texts in by_source.items():
            lines.append(f"- `{arm}`, {source}: " + "; ".join(texts))
    if dec["not_candidates"]:
        lines += ["", "Not candidates (not measured under both settings): " + "; ".join(
            f"`{a}`: {why}" for a, why in dec["not_candidates"].items()) + "."]
    return lines + [""]


def equality_markdown(results):
    """Separate-pathway arms: a complementary objective cannot change the overlapping tokens, so an arm's pooled
    and first-token R@1 must equal (per seed) those of the arm with the same overlapping objective (its twin)."""
    rows = []
    for source, src in results["sources"].items():
        for arm, a in src["arms"].items():
            twin = a.get("twin")
            if not twin or twin == arm or twin not in src["arms"]:
                continue
            t = src["arms"][twin]["runs"]
            gaps = [abs(x) for k in ("pooled", "first") for x in diff(a["runs"], t, k)]
            rows.append([source, f"`{arm}`", f"`{twin}`", yn(max(gaps) == 0.0), f"{max(gaps):.2f}"])
    if not rows:
        return []
    return ["## The separate pathway leaves the overlapping tokens alone (checked)", "",
            "On the separate pathway the complementary token has its own blocks over a stop-gradient copy of the "
            "context, so no complementary objective changes the overlapping tokens (their outputs equal those of a "
            "shared module with the same weights). So every separate-pathway arm's no-ordering control is "
            "`separate_noorder` (the same overlapping objective without the all-prefix loss), and its pooled and "
            "first-token R@1 must equal, seed by seed, those of the arm with the same overlapping objective:", ""] + \
        table(["source", "arm", "same overlapping objective as", "R@1 equal on every seed", "max |difference| "
               "(points)"], rows) + [""]


def validation_markdown(results):
    v = content_validation(results)
    lines = ["## The factor-free measure (content_gain) and the Stage 1 diagnostic", "",
             "content_gain (per modality) = how much of the modality's own Stage 1 token content a ridge probe "
             "recovers from [aligned, complementary] beyond [aligned, the same run's complementary token at "
             "initialisation] (the unique_gain control). Content, fixed a priori: the top k = 16 principal "
             "components (fewer if the width is smaller) of the mean-pooled (non-padded) Stage 1 tokens of that "
             "modality, PCA fitted on the plain train split; score = variance-weighted R² over them (the fraction of "
             "that top-k variance recovered), fitted on train, scored on val. It needs no known factors, so it runs "
             "on any cache.",
             "",
             "stage1_content (per modality, no training) = content R² from [partner's Stage 1 global, own Stage 1 "
             "global] minus from [partner's Stage 1 global] alone (mean over partners): how much of its own token "
             "content beyond what the partner predicts the modality's global embedding holds. Near 0, a "
             "global-embedding target (the partner residual of `--objective separate`) has nothing to teach the "
             "complementary token; a token-level target still does.",
             "",
             "Caveat: a token-level objective (`--objective tokens` and its variants) trains on a close relative of "
             "this content (the pooled context tokens), so content_gain alone cannot rank a token objective against "
             "a global one on real data; that is why it is validated against the known-factor unique_gain here.", ""]
    rows = [[source, m, f"{src['stage1']['content'][m]['stage1_content']:.3f}",
             f"{src['stage1']['content'][m]['partner']:.3f}", f"{src['stage1']['content'][m]['partner+own']:.3f}",
             str(src["stage1"]["content"][m]["k"])]
            for source, src in results["sources"].items() for m in src_mods(src) if src["stage1"].get("content")]
    lines += table(["source", "modality", "stage1_content", "content R² from partner global",
                    "from [partner, own] globals", "k"], rows) + [""]
    if v["n"]:
        lines += [f"Validation on the latent sources (every arm × `latent`/`latent_shed` × modality, means over "
                  f"seeds): content_gain agrees in sign with unique_gain in **{v['agree']} of {v['n']}** cells; in "
                  f"**{v['agree_strong']} of {v['n_strong']}** where unique_gain is beyond 2 std from 0. It agrees "
                  f"in sign with own_gain in **{v['agree_own']} of {v['n']}**. Pearson correlation over the cells: "
                  f"{v['r_unique']:.2f} with unique_gain, {v['r_own']:.2f} with own_gain.", "",
                  "own_gain = unique_gain's measure (own score of [aligned, complementary] minus [aligned, "
                  "complementary at initialisation]) over every factor only this modality sees, specific and "
                  "nuisance (nuisance_gain: over the nuisance alone). A measure that knows no factors cannot do "
                  "better than own_gain: the specific and the nuisance latents are both properties of the sample, "
                  "seen by this modality's tokens only, kept by every augmented view; on `latent_shed` touch's "
                  "global embedding holds neither, so only their labels tell them apart. Where an arm gains specific "
                  "information while losing nuisance (a global-embedding target teaches the complementary token the "
                  "specific latent and nothing keeps the nuisance), unique_gain and content_gain can differ in "
                  "sign.", ""]
        if v["disagreements"]:
            lines += ["Cells where content_gain disagrees in sign with unique_gain or own_gain:", ""] + table(
                ["source", "arm", "modality", "unique_gain", "nuisance_gain", "own_gain", "content_gain",
                 "unique_gain beyond 2 std", "sign as unique_gain", "sign as own_gain"],
                [[c["source"], f"`{c['arm']}`", c["modality"], fmt(c["unique_gain"], 3), fmt(c["nuisance_gain"], 3),
                  fmt(c["own_gain"], 3), fmt(c["content_gain"], 3), yn(c["strong"]), yn(c["agree"]),
                  yn(c["agree_own"])] for c in v["disagreements"]]) + [""]
        lines += ["![content_gain vs unique_gain and own_gain](content_validation.png)", ""]
    return lines


def lengths_markdown(src):
    axis = src.get("lengths")
    if not axis:
        return []
    keys = [("pooled", 1), ("first", 1)]
    mkeys = [("aligned_specific", 3), ("comp_specific", 3), ("unique_gain", 3), ("specific_gain", 3),
             ("comp_shared", 3)]
    mods = src_mods(src)
    rows = [[f"`{arm}`", e] + [fmt(ms(values(runs, k)), dg) for k, dg in keys]
            + [fmt(ms(values(runs, f"{k}_{m}")), dg) for k, dg in mkeys for m in mods]
            for arm, by_ep in axis["runs"].items() for e, runs in sorted(by_ep.items(), key=lambda x: int(x[0]))]
    labels = dict((c[0], c[1]) for c in COLUMNS + MOD_COLUMNS)
    return ["### Training length (latent)", "",
            f"Arms: the mission, the default objective's arm and the best arm `{axis['best']}` (the largest "
            f"unique_gain among the arms whose pooled R@1 is at most {COST_POINTS:g} point below the mission's, "
            f"chosen from the main runs before these ran), retrained at each length.", ""] + table(
        ["arm", "epochs"] + [labels[k] for k, _ in keys] + [f"{labels[k]}, {m}" for k, _ in mkeys for m in mods],
        rows) + ["", "![training length](lengths.png)", ""]


def source_markdown(source, src, default_arm):
    k_o, K = src["num_overlapping"], src["num_tokens"]
    arms, mods = list(src["arms"]), src_mods(src)
    factors = ("factors: " + ", ".join(f"{f} ({k})" for f, k in src["kinds"].items()) if src["kinds"] else
               "no known factors (retrieval and the factor-free content measure only)")
    lines = [f"## Source: {source}", "", f"{src['num_train']} train / {src['num_val']} val samples; {factors}; "
             f"training flags beyond each arm's and Stage 1's: `{' '.join(src['flags'])}`", ""]
    lines += [src["note"], ""] if src.get("note") else []
    rows = {a: src["arms"][a]["runs"] for a in arms}
    if src["init"]:
        rows["init (untrained)"] = src["init"]
    has = lambda k: any(not np.isnan(x) for r in rows.values() for x in values(r, k))  # noqa: E731
    cols = [c for c in COLUMNS if has(c[0])]
    mcols = [c for c in MOD_COLUMNS if any(has(f"{c[0]}_{m}") for m in mods)]
    lines += ["### Arms: retrieval", ""] + table(["arm", "no-ordering control"] + [c[1] for c in cols],
                                                 [[a, f"`{src['arms'][a].get('control') or '–'}`" if a in src["arms"]
                                                   else "–"] + [fmt(ms(values(r, k)), dg) for k, _, dg in cols]
                                                  for a, r in rows.items()])
    lines += ["", "### Arms: what the complementary token holds, per modality", ""] + table(
        ["arm", "modality"] + [c[1] for c in mcols],
        [[a, m] + [fmt(ms(values(r, f"{k}_{m}")), dg) for k, _, dg in mcols] for a, r in rows.items() for m in mods])
    ref = reference_arm(src)
    pcols = [c for c in PAIRED if c in cols]
    pmcols = [c for c in MOD_PAIRED if c[0] in [k for k, _, _ in mcols]]
    lines += ["", f"Paired by seed, arm minus `{ref}`:", ""] + table(
        ["arm", "modality"] + [c[1] for c in pcols] + [c[1] for c in pmcols],
        [[a, m] + [fmt(ms(diff(src["arms"][a]["runs"], src["arms"][ref]["runs"], k)), dg) for k, _, dg in pcols]
         + [fmt(ms(diff(src["arms"][a]["runs"], src["arms"][ref]["runs"], f"{k}_{m}")), dg) for k, _, dg in pmcols]
         for a in arms if a != ref for m in mods])
    lines += [""] + [f"`{a}` left out: its training failed ({err})." for a, err in src.get("failed", {}).items()]
    lines += ["", "Arms: " + "; ".join(f"`{a}` = {src['arms'][a]['description']}" for a in arms) + ". `init` = the "
              "untrained register module of each seed with the trainer's default flags (the unique_gain and "
              "content_gain control is each arm's own untrained module: `aligned+complementary(init)`).", "",
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
    return [a for a in dict.fromkeys([default_arm, best, "tokens", "separate_partner"]) if a in src["arms"]][:2]


def write_report(results, out):
    default = results["default_objective"]
    lines = ["# FluxTalk study results", "",
             "Generated by `study/run_study.py`; every number is mean ± std over seeds (population std). "
             "Probe scores: R² for continuous factors, accuracy for classes; ridge / least-squares probes fitted "
             "on the plain train split, scored on val. R@1 in %, vision↔tactile, mean of both directions. "
             "`aligned` = the L2-normalised mean of the overlapping tokens (what users retrieve with); "
             "per modality (touch first): unique_gain = own specific score of [aligned, complementary] minus "
             "[aligned, the same seed and arm's complementary token at initialisation]; specific_gain = "
             "complementary minus aligned, own specific factors; selectivity = the complementary token's own "
             "specific score minus its shared score; content_gain: the factor-free measure (below). Sources "
             "`latent` (each Stage 1 global embedding holds its modality's specific latent) and `latent_shed` (the "
             "same tokens; touch's global embedding holds none of its specific latent, as a contrastively trained "
             "tactile encoder would; vision's holds all of it). Every objective weight is fixed a priori at 1 (no "
             "tuning).", "",
             f"Command: `{results['command']}`  ", f"Wall time: {results['wall_time_s'] / 60:.1f} min "
             f"({results['size']} size, {results['seeds']} seeds, epochs per run {results['epochs']}, training "
             f"lengths {results['lengths']}, {results['threads']} CPU thread(s), device {results['device']})", "",
             f"main_train_stage2's default objective: `{default}` (arm `{PRESETS[default][0]}`; `--arms default` "
             f"names it).", ""]
    if results.get("preamble"):
        lines += [results["preamble"], ""]
    if results["skipped_arms"]:
        lines += [f"Arms not run (flags missing in this main_train_stage2): {', '.join(results['skipped_arms'])}", ""]
    lines += ["## Headline", ""] + headline_markdown(results) + [""]
    lines += decision_markdown(results) + equality_markdown(results) + validation_markdown(results)
    main_src = results["sources"][results["headline_source"]]
    orders = ordering_decisions(main_src)
    if orders:
        lines += ["## Ordering mechanisms (headline source)", ""] + table(
            ["mechanism", "arm vs control", "ordering_gain", "pooled_cost", "ordering", f"orders at cost ≤ "
             f"{COST_POINTS:g}"], [[h["how"], f"`{h['arm']}` vs `{h['control']}`", fmt(h["ordering_gain"]),
                                   fmt(h["pooled_cost"]), h["verdict"], yn(h["passes"])] for h in orders]) + [""]
    lines += ["## Hypotheses (issues 17 and 22), verdicts computed per modality", ""] + table(
        ["#", "hypothesis", "arms", "evidence", "verdict"], [list(r) for r in hypotheses(results)]) + [""]
    lines += lengths_markdown(main_src)
    for source, src in results["sources"].items():
        lines += source_markdown(source, src, PRESETS[default][0])
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def probe_rows(src, arm):
    """[(label, {factor: [score per seed]})]: every representation of the arm, the init control, Stage 1 global."""
    rows = []
    for m in src_mods(src):
        for rep in src["arms"][arm]["runs"][0]["probes"][m]:
            rows.append((f"{m} {rep}", {f: [r["probes"][m][rep][f] for r in src["arms"][arm]["runs"]]
                                       for f in src["kinds"]}))
        for rep in ("aligned", "complementary") if src["init"] else ():  # not measured by --quick
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


# ------------------------------------------------------------------------------------------------------- plots

def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    default_arm = PRESETS[results["default_objective"]][0]
    for source, src in results["sources"].items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for a in [a for a in ("mission", "nd0", "prefix_all", "objective_separate", "separate_noorder", "tokens")
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
    modality_plot(plt, results, out)
    validation_plot(plt, results, out)
    lengths_plot(plt, results, out)


def modality_plot(plt, results, out):
    """modalities.png: per source (columns), unique_gain and content_gain (rows) of every arm, one bar per
    modality (touch first), mean ± std over seeds."""
    srcs = list(results["sources"].items())
    keys = [k for k in ("unique_gain", "content_gain") if any(
        not np.isnan(x) for _, s in srcs for a in s["arms"].values() for m in src_mods(s)
        for x in values(a["runs"], f"{k}_{m}"))]
    if not keys:
        return
    n_arms = max(len(s["arms"]) for _, s in srcs)
    fig, axes = plt.subplots(len(keys), len(srcs), figsize=(0.45 * n_arms * len(srcs) + 2, 3.2 * len(keys)),
                             squeeze=False)
    for j, (source, src) in enumerate(srcs):
        mods, arms = src_mods(src), list(src["arms"])
        for i, key in enumerate(keys):
            ax, width = axes[i][j], 0.8 / len(mods)
            for n, m in enumerate(mods):
                v = [ms(values(src["arms"][a]["runs"], f"{key}_{m}")) for a in arms]
                ax.bar(np.arange(len(arms)) + (n - (len(mods) - 1) / 2) * width, [x[0] for x in v], width,
                       yerr=[x[1] for x in v], capsize=2, label=m)
            ax.axhline(0, color="black", lw=0.6)
            if key == "unique_gain":
                ax.axhline(UNIQUE_MIN, color="grey", ls=":", lw=1)
            ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{source}: {key}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "modalities.png"), dpi=110)
    plt.close(fig)


def validation_plot(plt, results, out):
    v = content_validation(results)
    if not v["n"]:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, key, title in ((axes[0], "unique_gain", f"agree {v['agree']}/{v['n']} (beyond 2 std: "
                                                     f"{v['agree_strong']}/{v['n_strong']}), r {v['r_unique']:.2f}"),
                           (axes[1], "own_gain", f"agree {v['agree_own']}/{v['n']}, r {v['r_own']:.2f}")):
        for source, marker, colors in zip(RULE_SOURCES, ("o", "s"), (("C0", "C1"), ("C2", "C3"))):
            for m, color in zip(("tactile", "vision"), colors):
                cs = [c for c in v["cells"] if c["source"] == source and c["modality"] == m]
                if cs:
                    ax.errorbar([c[key][0] for c in cs], [c["content_gain"][0] for c in cs],
                                xerr=[c[key][1] for c in cs], yerr=[c["content_gain"][1] for c in cs],
                                fmt=marker, color=color, ms=4, capsize=2, label=f"{source}, {m}")
        ax.axhline(0, color="black", lw=0.6)
        ax.axvline(0, color="black", lw=0.6)
        ax.set(xlabel=f"{key} (known factors)", title=f"sign {title}")
    axes[0].set_ylabel("content_gain (no factors)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "content_validation.png"), dpi=110)
    plt.close(fig)


def lengths_plot(plt, results, out):
    src = results["sources"][results["headline_source"]]
    axis = src.get("lengths")
    if not axis:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for n, (arm, by_ep) in enumerate(axis["runs"].items()):
        eps = sorted(by_ep, key=int)
        for m, ls in zip(src_mods(src), ("-", "--", ":")):
            for ax, key in zip(axes, ("unique_gain", "aligned_specific")):
                v = [ms(values(by_ep[e], f"{key}_{m}")) for e in eps]
                ax.errorbar([int(e) for e in eps], [x[0] for x in v], yerr=[x[1] for x in v], capsize=3, marker="o",
                            ls=ls, color=f"C{n}", label=f"{arm}, {m}")
    ticks = sorted({int(e) for by_ep in axis["runs"].values() for e in by_ep})
    for ax, key in zip(axes, ("unique_gain", "aligned embedding, own specific factors")):
        ax.set(xscale="log", xlabel="epochs", ylabel=key, title=key)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=6)
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
