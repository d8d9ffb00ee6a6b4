"""The study's probes against known answers, the latent-token cache against its generator (and its latent-source
axis), the factor-free content measure and the Stage 1 diagnostic against independent computations, the decision
rule on hand-built numbers, and the study end to end (files written, the summary lines)."""
import json
import os
import re

import numpy as np
import pytest

from study.probes import pca, probe_classes, probe_content, probe_continuous, r2, r2_weighted, ridge_predictions
from study.report import PRESETS as STUDY_PRESETS


def test_r2_matches_definition():
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    assert r2(y, y) == 1.0
    assert r2(y, np.full_like(y, 2.5)) == 0.0  # the mean of the scored split: nothing explained
    assert r2(y, y + 1) == pytest.approx(1 - 4 / 5)  # SSE 4, SST 5


def test_exact_linear_factor_gives_r2_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 20))
    w = rng.standard_normal((20, 3))
    y = x @ w + 5.0  # a vector factor, exactly linear in the features (plus an offset)
    assert probe_continuous(x[:400], y[:400], x[400:], y[400:]) > 0.999


def test_independent_noise_gives_r2_zero_on_held_out_data():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((1500, 32)), rng.standard_normal(1500)
    score = probe_continuous(x[:1000], y[:1000], x[1000:], y[1000:])
    assert abs(score) < 0.03
    # the same probe on its own training data would report a spurious fit: held-out scoring is what removes it
    x_small, y_small = x[:40], y[:40]
    assert probe_continuous(x_small, y_small, x_small, y_small) > 0.05


def test_partial_linear_signal_gives_its_variance_share():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 8))
    y = x[:, 0] + rng.standard_normal(4000)  # half the variance is linear in the features
    assert probe_continuous(x[:3000], y[:3000], x[3000:], y[3000:]) == pytest.approx(0.5, abs=0.05)


def test_class_probe_known_answers():
    rng = np.random.default_rng(3)
    labels = rng.integers(4, size=1200)
    centres = rng.standard_normal((4, 16)) * 4
    x = centres[labels] + 0.1 * rng.standard_normal((1200, 16))  # separable classes
    assert probe_classes(x[:800], labels[:800], x[800:], labels[800:], 4) == 1.0
    noise = rng.standard_normal((1200, 16))  # features independent of the label: chance (1/4)
    assert probe_classes(noise[:800], labels[:800], noise[800:], labels[800:], 4) == pytest.approx(0.25, abs=0.06)


def test_variance_weighted_r2_and_ridge_match_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    rng = np.random.default_rng(4)
    y = rng.standard_normal((300, 5)) * np.array([3.0, 1.0, 0.5, 2.0, 0.1])
    pred = y + rng.standard_normal(y.shape)
    assert r2_weighted(y, pred) == pytest.approx(r2_score(y, pred, multioutput="variance_weighted"), abs=1e-12)
    assert r2_weighted(y, pred) != pytest.approx(r2(y, pred), abs=1e-3)  # not the plain mean over columns
    x = rng.standard_normal((300, 12))
    x_test = rng.standard_normal((50, 12))
    ours = ridge_predictions(x, y, x_test, [3.0])[0]
    assert np.allclose(ours, Ridge(alpha=3.0).fit(x, y).predict(x_test), atol=1e-10)
    feats = rng.standard_normal((400, 20)) @ rng.standard_normal((20, 20))
    mean, comps = pca(feats, 6)
    ref = PCA(6).fit(feats)
    assert comps.shape == (20, 6) and np.allclose(mean, ref.mean_)
    assert np.allclose(np.abs(comps.T), np.abs(ref.components_), atol=1e-8)  # the same directions, up to sign
    assert pca(feats[:5], 16)[1].shape == (20, 4) and pca(feats[:, :3], 16)[1].shape == (3, 3)  # fewer: k <= N-1, D


def test_knn_probes_match_sklearn():
    """knn_many against sklearn's k-nearest-neighbour regressor / classifier on the same standardised features:
    R², variance-weighted R² and accuracy of their predictions."""
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    from study.probes import knn_many
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 3)) * np.array([1.0, 10.0, 0.1])  # standardised first: the scales do not matter
    y = np.cos(x[:, :2] * [2.0, 0.2]) + 0.1 * rng.standard_normal((500, 2))  # even in x: nothing linear
    labels = (x[:, 0] > 0).astype(int) + (x[:, 2] > 0)
    tr, te = slice(0, 400), slice(400, 500)
    scaler = StandardScaler().fit(x[tr])
    xs_tr, xs_te = scaler.transform(x[tr]), scaler.transform(x[te])
    pred = KNeighborsRegressor(n_neighbors=20).fit(xs_tr, y[tr]).predict(xs_te)
    acc = (KNeighborsClassifier(n_neighbors=20).fit(xs_tr, labels[tr]).predict(xs_te) == labels[te]).mean()
    ours = knn_many(x[tr], x[te], [("continuous", y[tr], y[te], None), ("content", y[tr], y[te], None),
                                   ("class", labels[tr], labels[te], 3)])
    assert ours[0] == pytest.approx(r2_score(y[te], pred), abs=1e-9)
    assert ours[1] == pytest.approx(r2_score(y[te], pred, multioutput="variance_weighted"), abs=1e-9)
    assert ours[2] == pytest.approx(acc, abs=0.011)  # ties in the vote may break otherwise: at most one sample
    linear = probe_continuous(x[tr], y[tr], x[te], y[te])
    assert ours[0] > 0.5 and linear < 0.05, (ours[0], linear)  # what a linear probe cannot see


def test_content_probe_scores_the_fraction_of_variance_recovered():
    """Two content components of variance 3 and 1; the features hold exactly the first: the variance-weighted R²
    is 3/4 (the plain mean over components would say 1/2)."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4000, 2))
    y = z * np.sqrt([3.0, 1.0])
    x = np.concatenate([z[:, :1], rng.standard_normal((4000, 5))], 1)
    assert probe_content(x[:3000], y[:3000], x[3000:], y[3000:]) == pytest.approx(0.75, abs=0.02)
    assert probe_content(z[:3000], y[:3000], z[3000:], y[3000:]) > 0.999


def test_probes_sharing_features_score_each_target_as_alone():
    """probe_many decomposes the features once for several targets: each score equals that target's probe alone."""
    from study.probes import probe_many
    rng = np.random.default_rng(7)
    x, x_test = rng.standard_normal((500, 10)), rng.standard_normal((200, 10))
    y, y_test = x[:, :2] + rng.standard_normal((500, 2)), x_test[:, :2] + rng.standard_normal((200, 2))
    labels, labels_test = (x[:, 3] > 0).astype(int), (x_test[:, 3] > 0).astype(int)
    shared = probe_many(x, x_test, [("continuous", y, y_test, None), ("class", labels, labels_test, 2),
                                    ("content", y, y_test, None)])
    assert shared == [probe_continuous(x, y, x_test, y_test), probe_classes(x, labels, x_test, labels_test, 2),
                      probe_content(x, y, x_test, y_test)]
    assert shared[0] != shared[2]  # mean over columns vs variance-weighted


def test_latent_cache_holds_what_it_says(tmp_path, tiny_stage1_files):
    """Token features carry shared + specific + nuisance latents, the Stage 1 global embedding no nuisance."""
    import main_train_stage2 as train
    from feature_cache import load_cache_meta
    from stage1 import build_stage1
    from study.latent_tokens import make_latent_cache, resolved_args
    ckpt, clip = tiny_stage1_files
    mods = ["vision", "tactile"]
    stage1 = build_stage1(ckpt, "fluxtalk-tiny", clip, active_modalities=mods)
    args = train.parse_args(["--feature_cache", str(tmp_path), "--stage1_checkpoint", ckpt, "--clip_model",
                             "fluxtalk-tiny", "--clip_pretrained", clip, "--active_modality_names", *mods,
                             "--device", "cpu"])
    make_latent_cache(str(tmp_path), stage1, args, n_train=600, n_val=300, seed=0)
    args = resolved_args(args, stage1)  # as training holds them: Stage 1's recipe resolved into them
    ds = {s: train.build_split(args, s, stage1) for s in ("train", "val")}  # accepted by the training reader
    assert len(ds["train"]) == 600 and load_cache_meta(str(tmp_path), "val")["stage1_fingerprint"] == stage1.fingerprint
    samples = json.load(open(tmp_path / "factors.json"))["samples"]

    def arrays(split, kind, m):
        x = np.stack([ds[split][i][kind][m].float().numpy().reshape(-1) for i in range(len(ds[split]))])
        return x

    def target(split, f):
        return np.array([samples[i][f] for i in ds[split].sample_ids])

    for f in ("shared", "vision_specific", "vision_nuisance"):
        assert probe_continuous(arrays("train", "tokens", "vision"), target("train", f),
                                arrays("val", "tokens", "vision"), target("val", f)) > 0.9, f
    glob = {s: arrays(s, "global", "vision") for s in ("train", "val")}
    assert probe_continuous(glob["train"], target("train", "vision_specific"), glob["val"],
                            target("val", "vision_specific")) > 0.99
    assert abs(probe_continuous(glob["train"], target("train", "vision_nuisance"), glob["val"],
                                target("val", "vision_nuisance"))) < 0.05
    assert abs(probe_continuous(glob["train"], target("train", "tactile_specific"), glob["val"],
                                target("val", "tactile_specific"))) < 0.05


def test_latent_views_keep_the_latents_and_change_the_observation(tmp_path, tiny_stage1_files):
    """Augmented views: the plain view and the global embedding as without views, fresh noise, dropped tokens."""
    import main_train_stage2 as train
    from stage1 import build_stage1
    from study.latent_tokens import SPEC, VIEW_TOKEN_DROP, make_latent_cache
    ckpt, clip = tiny_stage1_files
    stage1 = build_stage1(ckpt, "fluxtalk-tiny", clip, active_modalities=["vision", "tactile"])
    args = train.parse_args(["--feature_cache", "x", "--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny",
                             "--clip_pretrained", clip, "--active_modality_names", "vision", "tactile"])
    plain, views = str(tmp_path / "plain"), str(tmp_path / "views")
    make_latent_cache(plain, stage1, args, n_train=200, n_val=50, seed=0)
    make_latent_cache(views, stage1, args, n_train=200, n_val=50, seed=0, views=2)
    load = lambda root, split, name: np.load(os.path.join(root, split, "shard_00000", name))  # noqa: E731
    tok, glob = load(views, "train", "vision_tokens.npy"), load(views, "train", "vision_global.npy")
    assert tok.shape[0] == glob.shape[0] == 3 and load(views, "val", "vision_tokens.npy").shape[0] == 1
    assert json.load(open(os.path.join(views, "train", "meta.json")))["views"] == 3
    assert np.array_equal(tok[0], load(plain, "train", "vision_tokens.npy")[0])  # view 0: the plain rendering
    assert np.array_equal(glob[0], glob[1]) and np.array_equal(glob[0], glob[2])  # latents unchanged
    t = tok.astype(np.float32)
    dropped = (t[1:] == 0).all(-1)  # (2, n, N): tokens zeroed in the augmented views
    assert dropped.mean() == pytest.approx(VIEW_TOKEN_DROP, abs=0.02) and not (t[0] == 0).all(-1).any()
    kept = ~dropped[0] & ~dropped[1]
    # two views differ by their noise only: the difference of two independent draws has variance 2 noise^2
    assert np.std((t[1] - t[2])[kept]) == pytest.approx(np.sqrt(2) * SPEC["noise"], rel=0.03)


def test_latent_source_axis_changes_only_touchs_global(tmp_path, tiny_stage1_files):
    """latent_shed: every token file is byte-identical to today's cache (so every other random draw is too), vision's
    global as well; touch's global is today's minus exactly its specific latent's part (what is left is a function
    of the shared latents alone). Fraction 1 everywhere is today's cache byte for byte."""
    import main_train_stage2 as train
    from stage1 import build_stage1
    from study.latent_tokens import make_latent_cache
    from study.run_study import LATENT_SOURCES
    ckpt, clip = tiny_stage1_files
    stage1 = build_stage1(ckpt, "fluxtalk-tiny", clip, active_modalities=["vision", "tactile"])
    args = train.parse_args(["--feature_cache", "x", "--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny",
                             "--clip_pretrained", clip, "--active_modality_names", "vision", "tactile"])
    roots = {name: str(tmp_path / name) for name in ("today", "ones", "shed")}
    make_latent_cache(roots["today"], stage1, args, n_train=300, n_val=100, seed=0, views=2)
    make_latent_cache(roots["ones"], stage1, args, n_train=300, n_val=100, seed=0, views=2,
                      global_specific={"vision": 1.0, "tactile": 1.0})
    make_latent_cache(roots["shed"], stage1, args, n_train=300, n_val=100, seed=0, views=2,
                      global_specific=LATENT_SOURCES["latent_shed"])
    assert LATENT_SOURCES["latent_shed"] == {"tactile": 0.0}
    raw = lambda name, split, f: open(os.path.join(roots[name], split, "shard_00000", f), "rb").read()  # noqa: E731
    load = lambda name, split, f: np.load(os.path.join(roots[name], split, "shard_00000", f))  # noqa: E731
    for split in ("train", "val"):
        for f in os.listdir(os.path.join(roots["today"], split, "shard_00000")):
            assert raw("ones", split, f) == raw("today", split, f), (split, f)
            if f != "tactile_global.npy":
                assert raw("shed", split, f) == raw("today", split, f), (split, f)
    factors = {n: json.load(open(os.path.join(roots[n], "factors.json"))) for n in roots}
    assert factors["shed"]["samples"] == factors["today"]["samples"]
    assert factors["shed"]["global_specific"] == {"vision": 1.0, "tactile": 0.0}
    samples = factors["today"]["samples"]
    ids = [f"latent/train/{i:06d}" for i in range(300)]
    spec = np.array([samples[i]["tactile_specific"] for i in ids])  # (n, 4)
    shared = np.concatenate([np.array([samples[i]["shared"] for i in ids]),
                             np.eye(6)[[samples[i]["shared_class"] for i in ids]]], 1)  # (n, 10)
    today, shed = load("today", "train", "tactile_global.npy")[0], load("shed", "train", "tactile_global.npy")[0]
    removed = today.astype(np.float64) - shed
    assert np.abs(removed).max() > 0.5  # the specific part was there today
    fit = lambda x, y: y - x @ np.linalg.lstsq(x, y, rcond=None)[0]  # noqa: E731  least-squares residual
    assert np.abs(fit(spec, removed)).max() < 1e-5  # exactly a linear map of touch's specific latent
    assert np.abs(fit(shared, shed.astype(np.float64))).max() < 1e-5  # what is left: shared latents only
    assert np.abs(fit(shared, today.astype(np.float64))).max() > 0.5


def test_unique_gain_reads_the_right_representations():
    """Tokens built so the answer is known: overlapping tokens hold the shared factor, the complementary token the
    specific one, the untrained control holds only the nuisance -> unique_gain ~1, nuisance_gain ~-1 and own_gain
    (both kinds together) their mean; with the control equal to the trained token all are exactly 0; specific_gain
    compares the complementary token with the aligned embedding."""
    import torch

    from study.run_study import probe_summary, probe_table, representations
    rng = np.random.default_rng(0)
    n, e = 1200, 16
    shared, specific = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    reg = np.zeros((n, 4, e))
    reg[:, :3, :2] = shared[:, None]
    reg[:, :3, 4] = 30.0  # a large constant direction: the L2 normalisation keeps the shared factor ~linear
    reg[:, 3, 2:4] = specific
    reg += 0.01 * rng.standard_normal(reg.shape)
    reg = torch.tensor(reg, dtype=torch.float32)
    nuisance = rng.standard_normal((n, 2))
    noise = rng.standard_normal((n, e))
    noise[:, :2] = nuisance
    noise = torch.tensor(noise, dtype=torch.float32)
    kinds = {"shared": "shared", "vision_specific": "specific", "vision_nuisance": "nuisance"}
    y = {"shared": (shared, np.ones(n, bool)), "vision_specific": (specific, np.ones(n, bool)),
         "vision_nuisance": (nuisance, np.ones(n, bool))}
    split = lambda d, s: {k: (v[0][s], v[1][s]) for k, v in d.items()}  # noqa: E731

    def summary(control):
        train, val = slice(0, 800), slice(800, n)
        tables = probe_table(representations(reg[train], 3, control[train]),
                             representations(reg[val], 3, control[val]), split(y, train), split(y, val), {})
        return probe_summary({"vision": tables}, kinds)

    untrained = summary(noise)
    assert untrained["unique_gain"] > 0.95  # [aligned, comp] ~1 against [aligned, noise] ~0
    assert untrained["nuisance_gain"] < -0.95  # the control held the nuisance, the trained token does not
    assert untrained["own_gain"] == pytest.approx((untrained["unique_gain"] + untrained["nuisance_gain"]) / 2)
    assert untrained["specific_gain"] > 0.95 and untrained["aligned_specific"] < 0.05
    assert untrained["comp_shared"] < 0.05 and untrained["aligned_shared"] > 0.9
    same = summary(reg[:, 3])  # control = the trained token: nothing added
    assert same["unique_gain"] == same["nuisance_gain"] == same["own_gain"] == 0.0


def test_content_gain_and_stage1_diagnostic_match_an_independent_computation():
    """Pooled tokens written from a latent seen by both modalities (s) and one only this modality sees (u): the
    content targets are sklearn's PCA projections; content_gain of [aligned = s, comp = u] over [s, noise] and the
    Stage 1 diagnostic (partner global = s, own global = [s, u]) equal least-squares fits scored by sklearn's
    variance-weighted R² on the same content."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    from study.run_study import CONTENT_K, content_scores, content_summary, content_targets, stage1_content
    rng = np.random.default_rng(6)
    n, n_tr = 5000, 4000
    s_lat, u_lat = rng.standard_normal((n, 3)), rng.standard_normal((n, 2)) * 0.8
    pooled = s_lat @ rng.standard_normal((3, 24)) + u_lat @ rng.standard_normal((2, 24)) \
        + 0.05 * rng.standard_normal((n, 24))
    tr, va = slice(0, n_tr), slice(n_tr, n)
    target = content_targets({"tactile": pooled[tr]}, {"tactile": pooled[va]})["tactile"]
    ref = PCA(CONTENT_K).fit(pooled[tr])
    for split, rows in (("train", tr), ("val", va)):
        assert np.allclose(np.abs(target[split]), np.abs(ref.transform(pooled[rows])), atol=1e-8)

    def reference(x):  # least squares fitted on train, variance-weighted R² on val
        y = ref.transform(pooled)
        return r2_score(y[va], LinearRegression().fit(x[tr], y[tr]).predict(x[va]), multioutput="variance_weighted")

    noise = rng.standard_normal((n, 2))
    reps = {"aligned": s_lat, "aligned+complementary": np.concatenate([s_lat, u_lat], 1),
            "aligned+complementary(init)": np.concatenate([s_lat, noise], 1)}
    scores = content_scores({k: v[tr] for k, v in reps.items()}, {k: v[va] for k, v in reps.items()}, target)
    for k, x in reps.items():
        assert scores[k] == pytest.approx(reference(x), abs=2e-3), k
    gain = content_summary({"tactile": scores})["content_gain_tactile"]
    assert gain == pytest.approx(reference(reps["aligned+complementary"]) - reference(reps["aligned+complementary(init)"]),
                                 abs=3e-3) and gain > 0.1

    mix = lambda x, e: x @ rng.standard_normal((x.shape[1], e))  # noqa: E731  a global embedding writing x
    glob = {"vision": mix(s_lat, 8), "tactile": mix(np.concatenate([s_lat, u_lat], 1), 8)}
    glob = {split: {m: g[rows] for m, g in glob.items()} for split, rows in (("train", tr), ("val", va))}
    diag = stage1_content(glob, {"tactile": target})["tactile"]
    both = np.concatenate([mix(s_lat, 8), mix(np.concatenate([s_lat, u_lat], 1), 8)], 1)
    assert diag["partner"] == pytest.approx(reference(s_lat), abs=2e-3)
    assert diag["partner+own"] == pytest.approx(reference(both), abs=2e-3)
    assert diag["stage1_content"] == pytest.approx(reference(both) - reference(s_lat), abs=3e-3)
    assert diag["stage1_content"] > 0.1 and diag["k"] == CONTENT_K
    rot = rng.standard_normal((8, 8))
    shed = {split: {"vision": g["vision"], "tactile": g["vision"] @ rot}
            for split, g in glob.items()}  # touch's global holds only what the partner's does
    assert abs(stage1_content(shed, {"tactile": target})["tactile"]["stage1_content"]) < 0.01


def fake_arm(control, pooled=(80.0, 81.0, 82.0), first=(79.0, 80.0, 81.0), unique=(0.20, 0.21, 0.19),
             specific=(0.30, 0.31, 0.29), selectivity=(-0.10, -0.11, -0.09), **per_modality):
    """An arm of results.json with three seeds; every per-modality statistic the same in both modalities unless
    per_modality overrides one (e.g. unique_gain_tactile=(...))."""
    stats = {"unique_gain": unique, "specific_gain": specific, "selectivity": selectivity}
    runs = []
    for i in range(3):
        summary = {"pooled": pooled[i], "first": first[i]}
        for stat, vals in stats.items():
            for m in ("tactile", "vision"):
                summary[f"{stat}_{m}"] = per_modality.get(f"{stat}_{m}", vals)[i]
        runs.append({"seed": i, "summary": summary})
    return {"control": control, "twin": None, "flags": ["--flag", "x"], "description": "", "runs": runs}


def fake_results(arms_latent, arms_shed=None):
    """Two latent sources holding the mission, the controls and the given arms ({name: fake_arm})."""
    base = {"mission": fake_arm("nd0", unique=(0.01, 0.0, 0.02)), "nd0": fake_arm(None, first=(50.0, 52.0, 48.0)),
            "separate_noorder": fake_arm(None, first=(50.0, 52.0, 48.0))}
    src = lambda arms: {"mods": ["vision", "tactile"], "arms": {**base, **arms}}  # noqa: E731
    return {"default_objective": "separate", "headline_source": "latent",
            "sources": {"latent": src(arms_latent), "latent_shed": src(arms_shed or arms_latent)}}


def test_decision_rule_on_hand_built_numbers():
    """Each condition of the rule fails alone (in one modality and source); a selective passer is preferred; then the
    largest minimum unique_gain; an exact tie goes to the arm listed first; none passing keeps the default."""
    from study.report import decide, decision_markdown
    good = fake_arm("separate_noorder")
    dec = decide(fake_results({"objective_separate": good}))
    assert dec["passers"] == ["objective_separate"] and dec["chosen"] == "objective_separate"
    assert dec["preset"] == "separate" and dec["kept"] and "nd0" not in dec["candidates"]
    assert "mission" in dec["candidates"] and set(dec["failures"]["mission"]) == {"latent", "latent_shed"}
    failing = {  # latent_shed's arms: one condition broken, in one modality or for the source
        "unique_gain >= 0.05": ({"objective_separate": fake_arm("separate_noorder", unique_gain_tactile=(
            0.04, 0.041, 0.039))}, "tactile unique_gain 0.040 ± 0.001"),
        "unique_gain > 2 std": ({"objective_separate": fake_arm("separate_noorder", unique_gain_tactile=(
            0.30, 0.0, 0.15))}, "tactile unique_gain 0.150 ± 0.122"),
        "specific_gain > 2 std": ({"objective_separate": fake_arm("separate_noorder", specific_gain_vision=(
            0.1, -0.1, 0.05))}, "vision specific_gain 0.017 ± 0.085"),
        "pooled R@1 within 1 point of the mission's": ({"objective_separate": good, "mission": fake_arm(
            "nd0", unique=(0.01, 0.0, 0.02), pooled=(81.6, 82.6, 83.6))}, "pooled R@1 1.60 ± 0.00 points below"),
        "ordering_gain > 2 std": ({"objective_separate": fake_arm("separate_noorder", first=(50.0, 53.0, 48.0))},
                                  "ordering against `separate_noorder`: ordering_gain 0.33 ± 0.47"),
        "pooled_cost <= 1": ({"objective_separate": good, "separate_noorder": fake_arm(
            None, pooled=(81.5, 82.5, 83.5), first=(50.0, 52.0, 48.0))}, "pooled_cost 1.50 ± 0.00"),
    }
    for name, (shed, text) in failing.items():
        dec = decide(fake_results({"objective_separate": good}, shed))
        assert dec["passers"] == [] and dec["chosen"] == "objective_separate" and dec["kept"], name
        assert "no arm meets the rule" in dec["status"], name
        assert list(dec["failures"]["objective_separate"]) == ["latent_shed"], name
        texts = dec["failures"]["objective_separate"]["latent_shed"]
        assert len(texts) == 1 and text in texts[0], (name, texts)
    # selectivity preferred over a larger minimum unique_gain
    arms = {"objective_separate": good, "tokens": fake_arm("separate_noorder", unique=(0.10, 0.11, 0.09),
                                                            selectivity=(0.10, 0.11, 0.09))}
    dec = decide(fake_results(arms))
    assert dec["passers"] == ["objective_separate", "tokens"] and dec["selective"] == ["tokens"]
    assert dec["chosen"] == "tokens" and dec["preset"] == "tokens" and not dec["kept"]
    # selective in one source only: not preferred
    dec = decide(fake_results(arms, {**arms, "tokens": fake_arm("separate_noorder", unique=(0.10, 0.11, 0.09))}))
    assert dec["selective"] == [] and dec["chosen"] == "objective_separate"
    # the largest minimum over modality x source, not the largest mean
    lopsided = fake_arm("separate_noorder", unique_gain_tactile=(0.5, 0.5, 0.5), unique_gain_vision=(0.1, 0.1, 0.1))
    even = fake_arm("separate_noorder", unique=(0.15, 0.15, 0.15))
    dec = decide(fake_results({"tokens": lopsided, "separate_view": even}))
    assert dec["min_unique"]["tokens"] == pytest.approx(0.1) and dec["min_unique"]["separate_view"] == pytest.approx(0.15)
    assert dec["passers"] == ["tokens", "separate_view"]
    assert dec["chosen"] == "separate_view" and dec["preset"] is None
    # an exact tie: the arm listed first
    dec = decide(fake_results({"separate_view": even, "tokens": even}))
    assert dec["chosen"] == "separate_view"
    # a chosen arm without a preset is reported as such, with its flags
    md = "\n".join(decision_markdown(fake_results({"separate_view": even})))
    assert "**Decision: `separate_view`**" in md and "It has no `--objective` preset of its own" in md
    assert "`--flag x`" in md
    # an arm missing from a source (or failed there) is no candidate, and the report says why
    res = fake_results({"objective_separate": good, "separate_view": even}, {"objective_separate": good})
    res["sources"]["latent_shed"]["failed"] = {"tokens_decoder": "training x failed (exit 2): error: no"}
    dec = decide(res)
    assert dec["not_candidates"] == {"separate_view": "not run on latent_shed",
                                     "tokens_decoder": "its training failed on latent_shed: training x failed (exit 2): "
                                                       "error: no"}
    assert "separate_view" not in dec["candidates"] and dec["chosen"] == "objective_separate"
    # without both latent sources the rule does not decide
    one = fake_results({"objective_separate": good})
    del one["sources"]["latent_shed"]
    assert decide(one)["chosen"] is None and "needs both" in decide(one)["status"]


def test_content_validation_counts_signs_against_unique_and_own_gain():
    """Hand-built cells: content_gain following own_gain (specific and nuisance) where unique_gain (specific only)
    has the other sign; the counts, the 2-std split, the disagreement list and Pearson's r (by its formula)."""
    from study.report import agreement_line, content_validation

    def arm(unique, own, content):  # two seeds, the same numbers in both modalities
        runs = [{"summary": {f"{k}_{m}": v[i] for m in ("tactile", "vision")
                             for k, v in (("unique_gain", unique), ("own_gain", own), ("content_gain", content),
                                          ("nuisance_gain", (0.0, 0.0)))}} for i in range(2)]
        return {"runs": runs}
    arms = {"a": arm((0.20, 0.22), (0.10, 0.12), (0.05, 0.06)),  # all positive: agree
            "b": arm((0.02, 0.04), (-0.03, -0.05), (-0.01, -0.02)),  # unique > 0 (beyond 2 std), content < 0
            "c": arm((-0.01, 0.03), (-0.02, -0.04), (-0.01, -0.01))}  # unique within 2 std, positive mean
    res = {"sources": {"latent": {"mods": ["vision", "tactile"], "arms": arms},
                       "latent_shed": {"mods": ["vision", "tactile"], "arms": {"a": arms["a"]}}}}
    v = content_validation(res)
    assert (v["n"], v["agree"], v["agree_own"], v["n_strong"], v["agree_strong"]) == (8, 4, 8, 6, 4)
    assert {(c["source"], c["arm"]) for c in v["disagreements"]} == {("latent", "b"), ("latent", "c")}
    assert [c["modality"] for c in v["cells"]][:2] == ["tactile", "vision"]  # touch first
    x = np.array([c["unique_gain"][0] for c in v["cells"]])
    y = np.array([c["content_gain"][0] for c in v["cells"]])
    r = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert v["r_unique"] == pytest.approx(r)
    assert agreement_line(v).endswith("agree=4/8 beyond_2std=4/6; with own_gain (specific and nuisance) agree_own=8/8")


def test_summary_line_carries_the_per_modality_numbers():
    """The last line's exact fields: ordering, pooled cost, mean and per-modality unique_gain on latent, touch's
    unique_gain on latent_shed, specific_gain; recomputed here with numpy from the per-seed numbers."""
    from study.report import preset_headline, summary_line
    arm = fake_arm("separate_noorder", unique_gain_tactile=(0.2, 0.3, 0.4), unique_gain_vision=(0.1, 0.1, 0.4),
                   specific_gain_tactile=(0.5, 0.5, 0.5), specific_gain_vision=(0.1, 0.2, 0.3))
    for r, u in zip(arm["runs"], np.mean([(0.2, 0.3, 0.4), (0.1, 0.1, 0.4)], 0)):
        r["summary"]["unique_gain"], r["summary"]["specific_gain"] = u, np.mean([0.5, r["summary"]["specific_gain_vision"]])
    shed = fake_arm("separate_noorder", unique_gain_tactile=(-0.01, 0.02, 0.02))
    res = fake_results({"objective_separate": arm}, {"objective_separate": shed})
    line = summary_line("study", preset_headline(res, "separate"))
    ut, uv, u = np.array([0.2, 0.3, 0.4]), np.array([0.1, 0.1, 0.4]), np.array([0.15, 0.2, 0.4])
    sp = np.array([0.3, 0.35, 0.4])
    assert line == (f"study: ordering_gain={30.0:.2f} ordering_std={np.std([29, 28, 33]):.2f} pooled_cost=0.00 "
                    f"unique_gain={u.mean():.3f} unique_std={u.std():.3f} unique_vision={uv.mean():.3f} "
                    f"unique_vision_std={uv.std():.3f} unique_tactile={ut.mean():.3f} unique_tactile_std={ut.std():.3f} "
                    f"unique_tactile_shed={0.01:.3f} unique_tactile_shed_std={np.std([-0.01, 0.02, 0.02]):.3f} "
                    f"specific_gain={sp.mean():.3f} specific_std={sp.std():.3f} seeds=3")
    assert re.fullmatch("study: " + SUMMARY, line)
    del res["sources"]["latent_shed"]  # not run: nan, same fields
    assert "unique_tactile_shed=nan unique_tactile_shed_std=nan" in summary_line("s", preset_headline(res, "separate"))
    assert summary_line("study(tokens)", preset_headline(res, "tokens")) == "study(tokens): unavailable (its arm was not run)"
    del res["sources"]["latent"]["arms"]["separate_noorder"]  # control not run: its fields nan, the gains still there
    line = summary_line("study", preset_headline(res, "separate"))
    assert line.startswith("study: ordering_gain=nan ordering_std=nan pooled_cost=nan ") and re.fullmatch(
        "study: " + SUMMARY, line) and f"unique_tactile={ut.mean():.3f} " in line


def test_arm_flags_follow_the_trainer():
    """An arm whose flag (or a flag's value: a preset the trainer does not know) the trainer lacks is skipped;
    `--objective mission` is what a trainer without the flag computes anyway, so it is dropped rather than the arm."""
    from study.run_study import MISSION, TOKENS_PRESET, arm_flags
    objective = {"--objective": ["mission", "separate", "custom"]}
    assert arm_flags(MISSION + ["--nested_dropout_rate", "0"], {"--nested_dropout_rate": None}) == [
        "--nested_dropout_rate", "0"]
    assert arm_flags(MISSION, objective) == MISSION
    assert arm_flags(["--objective", "separate"], {"--nested_dropout_rate": None}) is None
    assert arm_flags(MISSION + ["--complementary_view_weight", "1"], objective) is None
    assert arm_flags(TOKENS_PRESET, objective) is None
    assert arm_flags(TOKENS_PRESET, {"--objective": objective["--objective"] + ["tokens"]}) == TOKENS_PRESET


def test_quick_plan_puts_the_default_first():
    """Whichever preset is the trainer's default, --quick runs its arm and control first, then the mission, then
    the other presets' arms; each once."""
    from study.run_study import quick_plan, source_arms
    for default, (arm, control) in STUDY_PRESETS.items():
        plan = quick_plan(default)
        assert plan[:2] == [arm, control] and "mission" in plan[:3] and len(set(plan)) == len(plan)
        assert {a for pair in STUDY_PRESETS.values() for a in pair} - {"nd0", control} | {control} == set(plan)
        for source in ("latent", "latent_shed"):
            assert source_arms(source, None, True, default) == plan
    assert source_arms("tvl", None, True, "separate") == ["objective_separate", "separate_noorder", "mission", "tokens"]
    assert source_arms("latent_shed", None, False, "separate") == [
        a for a in source_arms("latent", None, False, "separate")
        if a not in ("residual", "difference", "partner", "view", "separate", "separate_partner", "prefix_all")]
    assert source_arms("latent_shed", ["residual"], False, "separate") == ["residual"]  # --arms: every source


def test_arm_roles_name_each_arms_control_and_twin(tiny_stage1_files):
    """Read from the flags as the trainer parses them: the separate pathway's arms have `separate_noorder` as their
    control and the arm with the same overlapping objective as their twin; the shared pathway's have `nd0`."""
    from conftest import stage1_flags
    from study.run_study import TRAIN_FLAGS, arm_roles, available_arms
    arms, skipped = available_arms()
    spec = {"cache": "unused", "mods": ["vision", "tactile"], "flags": TRAIN_FLAGS,
            "stage1_flags": stage1_flags(tiny_stage1_files)}
    roles = arm_roles(arms, spec)
    expect = {"mission": ("nd0", None), "nd0": (None, None), "residual": ("nd0", None), "prefix_all": ("nd0", None),
              "separate": ("separate_noorder", "separate"), "separate_partner": ("separate_noorder", "separate"),
              "objective_separate": ("separate_noorder", "objective_separate"),
              "separate_noorder": (None, "separate_noorder"),
              "separate_difference": ("separate_noorder", "objective_separate"),
              "separate_view": ("separate_noorder", "objective_separate"),
              "tokens": ("separate_noorder", "objective_separate"),
              "tokens_decoder": ("separate_noorder", "objective_separate")}
    for arm, role in expect.items():
        assert arm in skipped or roles[arm] == role, arm


def test_bad_sources_are_refused_in_one_line(tmp_path, capsys):
    """A cache:DIR that is no folder, or holds no cache, ends in one line naming it and exit 2, before any run."""
    from study.run_study import main
    with pytest.raises(SystemExit) as e:
        main(["--sources", f"cache:{tmp_path / 'missing'}", "--output", str(tmp_path / "out")])
    assert e.value.code == 2 and "cache:DIR" in capsys.readouterr().err.strip().splitlines()[-1]
    from study.run_study import default_objective
    out = ["--output", str(tmp_path / "out"), "--arms", *STUDY_PRESETS[default_objective()]]
    assert main(["--sources", f"cache:{tmp_path}"] + out) == 2
    assert capsys.readouterr().err.strip() == ("error: --sources cache:DIR needs --stage1_checkpoint (and "
                                               "--clip_model/--clip_pretrained) of the Stage 1 that made the cache")
    assert main(["--sources", f"cache:{tmp_path}", "--stage1_checkpoint", "x.pth"] + out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --feature_cache {tmp_path}: no train/meta.json"), err


NUM, STD = r"(-?[\d.]+|nan)", r"([\d.]+|nan)"
SUMMARY = (rf"ordering_gain={NUM} ordering_std={STD} pooled_cost={NUM} unique_gain={NUM} unique_std={STD} "
           rf"unique_vision={NUM} unique_vision_std={STD} unique_tactile={NUM} unique_tactile_std={STD} "
           rf"unique_tactile_shed={NUM} unique_tactile_shed_std={STD} specific_gain={NUM} specific_std={STD} "
           r"seeds=(\d+)")
# the groups of SUMMARY
G = {k: i + 1 for i, k in enumerate(["ordering_gain", "ordering_std", "pooled_cost", "unique_gain", "unique_std",
                                      "unique_vision", "unique_vision_std", "unique_tactile", "unique_tactile_std",
                                      "unique_tactile_shed", "unique_tactile_shed_std", "specific_gain",
                                      "specific_std", "seeds"])}


def run_study_script(*flags):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "study", "run_study.py"), *flags], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def line_values(line):
    """{field: value} of a `key=value ...` summary line."""
    return {k: float(v) for k, v in re.findall(r"(\w+)=(-?[\d.]+|nan)\b", line)}


@pytest.mark.slow
def test_smoke_study_writes_its_outputs(tmp_path):
    """The study end to end at the smallest size (two seeds, one epoch, a length axis of 2 epochs) on both latent
    sources and tvl: every output file, the summary lines recomputed from the stored per-seed numbers, per-modality
    numbers in every run, the decision, the factor-free measure and its validation, the Stage 1 diagnostic."""
    out = tmp_path / "results"
    lines = run_study_script("--smoke", "--output", str(out), "--sources", "latent", "latent_shed", "tvl", "--arms",
                             "mission", "nd0", "residual", "objective_separate", "separate_noorder",
                             "separate_difference", "tokens", "--lengths", "2")
    m = re.fullmatch("study: " + SUMMARY, lines[-1])
    assert m, lines[-1]
    for preset in ("mission", "separate", "tokens"):
        assert re.fullmatch(rf"study\({preset}\): " + SUMMARY, [x for x in lines if x.startswith(f"study({preset})")][0])
    res = json.load(open(out / "results.json"))
    arms, shed = res["sources"]["latent"]["arms"], res["sources"]["latent_shed"]["arms"]
    runs = arms["mission"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and m.group(G["seeds"]) == "2"
    # recomputed here from the stored per-seed numbers, for the trainer's default objective and its control
    arm, control = STUDY_PRESETS[res["default_objective"]]
    first = lambda arm: np.array([r["prefix_mean"][0] for r in arms[arm]["runs"]])  # noqa: E731
    pooled = lambda arm: np.array([np.mean([v for p in r["retrieval"].values() for v in p["r1"].values()])  # noqa: E731
                                   for r in arms[arm]["runs"]])
    unique = lambda runs, mod: np.array([r["probes"][mod]["aligned+complementary"][f"{mod}_specific"]  # noqa: E731
                                         - r["probes"][mod]["aligned+complementary(init)"][f"{mod}_specific"]
                                         for r in runs])
    both = (unique(arms[arm]["runs"], "vision") + unique(arms[arm]["runs"], "tactile")) / 2
    expect = {"ordering_gain": (first(arm) - first(control)).mean(), "pooled_cost": (pooled(control) - pooled(arm)).mean(),
              "unique_gain": both.mean(), "unique_std": both.std(),
              "unique_vision": unique(arms[arm]["runs"], "vision").mean(),
              "unique_vision_std": unique(arms[arm]["runs"], "vision").std(),
              "unique_tactile": unique(arms[arm]["runs"], "tactile").mean(),
              "unique_tactile_std": unique(arms[arm]["runs"], "tactile").std(),
              "unique_tactile_shed": unique(shed[arm]["runs"], "tactile").mean(),
              "unique_tactile_shed_std": unique(shed[arm]["runs"], "tactile").std()}
    for key, value in expect.items():
        assert float(m.group(G[key])) == pytest.approx(value, abs=0.006 if key in ("ordering_gain", "pooled_cost")
                                                       else 6e-4), key
    for r_ in runs:  # K = 4 register tokens: the prefix curve has 4 points, the probes cover every representation
        assert len(r_["prefix_mean"]) == 4
        assert set(r_["probes"]["vision"]) == {"aligned", "overlapping", "complementary", "aligned+complementary",
                                               "aligned+complementary(init)", "token0", "token1", "token2", "token3"}
        s = r_["summary"]
        for mod in ("vision", "tactile"):  # per-modality numbers and their definitions
            assert s[f"selectivity_{mod}"] == pytest.approx(s[f"comp_specific_{mod}"] - s[f"comp_shared_{mod}"])
            c = r_["content"][mod]
            assert s[f"content_gain_{mod}"] == c["aligned+complementary"] - c["aligned+complementary(init)"]
        for key in ("unique_gain", "specific_gain", "selectivity", "content_gain"):
            assert s[key] == pytest.approx((s[f"{key}_vision"] + s[f"{key}_tactile"]) / 2), key
    # the mission reads no global embedding: the axis leaves it exactly as it was
    assert [r["summary"] for r in shed["mission"]["runs"]] == [r["summary"] for r in runs]
    assert arms["separate_difference"]["control"] == "separate_noorder"
    assert arms["separate_difference"]["twin"] == "objective_separate" and arms["mission"]["control"] == "nd0"
    axis = res["sources"]["latent"]["lengths"]["runs"]
    assert {"mission", arm, res["sources"]["latent"]["lengths"]["best"]} == set(axis)
    assert [r["epochs"] for r in axis["mission"]["2"]] == [2, 2] and axis["mission"]["1"] == runs
    assert set(res["sources"]) == {"latent", "latent_shed", "tvl"} and "lengths" not in res["sources"]["latent_shed"]
    assert set(res["sources"]["tvl"]["arms"]) == {"mission", "nd0", "objective_separate", "separate_noorder",
                                                     "tokens"}
    assert set(shed) == {"mission", "nd0", "residual", "objective_separate", "separate_noorder", "separate_difference",
                         "tokens"}
    # the Stage 1 diagnostic sees the axis: touch's global holds its token content beyond vision's only on latent
    diag = {s: res["sources"][s]["stage1"]["content"] for s in res["sources"]}
    assert diag["latent"]["tactile"]["stage1_content"] > 0.1 > abs(diag["latent_shed"]["tactile"]["stage1_content"])
    assert diag["latent_shed"]["vision"]["stage1_content"] > 0.1 and set(diag["tvl"]) == {"vision", "tactile"}
    for source in res["sources"]:  # the factor-free line of each source, as results.json holds it
        line = [x for x in lines if x.startswith(f"study(content, {source}, {arm}): ")]
        assert len(line) == 1, source
        v = line_values(line[0])
        for mod in ("tactile", "vision"):
            gains = [r["summary"][f"content_gain_{mod}"] for r in res["sources"][source]["arms"][arm]["runs"]]
            assert v[f"content_gain_{mod}"] == pytest.approx(np.mean(gains), abs=6e-4)
            assert v[f"stage1_content_{mod}"] == pytest.approx(diag[source][mod]["stage1_content"], abs=6e-4)
    val = res["content_validation"]
    assert val["n"] == 2 * 2 * 7  # 7 arms x 2 latent sources x 2 modalities
    assert (f"agree={val['agree']}/{val['n']} beyond_2std={val['agree_strong']}/{val['n_strong']}; with own_gain "
            f"(specific and nuisance) agree_own={val['agree_own']}/{val['n']}") in lines[-2]
    dec = res["decision"]
    # candidates: the arms run on both latent sources that have a no-ordering control (--arms runs them on both)
    assert set(dec["candidates"]) == {"mission", "residual", "objective_separate", "separate_difference",
                                        "tokens"}
    assert len([x for x in lines if x.startswith("study(decision): ")]) == 1
    md = (out / "RESULTS.md").read_text()
    for needle in ("## Source: latent", "## Source: latent_shed", "## Source: tvl", res["command"], "## Decision",
                   "## Hypotheses", "### Training length", "content_gain", "stage1_content",
                   "| latent | `separate_difference` | `objective_separate` |"):
        assert needle in md, needle
    for name in ("prefix_latent.png", "prefix_latent_shed.png", "prefix_tvl.png", "probes_latent.png",
                 "probes_latent_shed.png", "probes_tvl.png", "lengths.png", "modalities.png",
                 "content_validation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # --rewrite_report recomputes every derived number from the raw measurements: drop them, get them back
    stripped = dict(json.loads(json.dumps(res)), decision=None, content_validation=None)  # a deep copy
    for src in stripped["sources"].values():
        for runs in [a["runs"] for a in src["arms"].values()] + [src["init"]]:
            for r_ in runs:
                r_["summary"] = {}
    (out / "results.json").write_text(json.dumps(stripped))
    (out / "RESULTS.md").unlink()
    again = run_study_script("--rewrite_report", "--output", str(out))
    assert len(again) >= 9 and again == lines[-len(again):]  # the study's summary lines, printed again
    same = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731  (text: NaN, as of the untrained rows, != itself)
    assert same(json.load(open(out / "results.json"))) == same(res) and (out / "RESULTS.md").read_text() == md


@pytest.mark.slow
def test_recheck_runs_the_study_on_another_latent_structure_with_knn_probes(tmp_path):
    """study/recheck.py: the cache holds the held-out structure (token count, latent sizes), a stored Stage 1 probe
    score equals sklearn's k-nearest-neighbour regressor on the cached features, the setting is recorded, and the
    study's own structure and ridge probes are back afterwards."""
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    from study import latent_tokens, probes, recheck
    spec, spans = dict(latent_tokens.SPEC), dict(latent_tokens.SPANS)
    out = tmp_path / "recheck"
    assert recheck.main(["--smoke", "--seeds", "1", "--output", str(out)]) == 0
    assert latent_tokens.SPEC == spec and latent_tokens.SPANS == spans and probes.probe_many.__name__ == "probe_many"
    res = json.load(open(out / "results.json"))
    assert res["command"].startswith("python study/recheck.py --smoke") and set(res["sources"]) == {"latent",
                                                                                                   "latent_shed"}
    assert recheck.PREAMBLE in (out / "RESULTS.md").read_text()
    cache = out / "work" / "cache_latent_128_64_v2"
    samples = json.load(open(cache / "factors.json"))["samples"]
    assert len(samples["latent/train/000000"]["vision_specific"]) == recheck.HELDOUT_SPEC["specific_dim"] != spec[
        "specific_dim"]
    assert np.load(cache / "val" / "shard_00000" / "vision_tokens.npy").shape[2] == recheck.HELDOUT_SPEC["num_context"]
    x = {s: np.load(cache / s / "shard_00000" / "vision_global.npy")[0] for s in ("train", "val")}  # plain view
    y = {s: np.array([samples[f"latent/{s}/{i:06d}"]["shared"] for i in range(len(x[s]))]) for s in x}
    scaler = StandardScaler().fit(x["train"])
    knn = KNeighborsRegressor(n_neighbors=20).fit(scaler.transform(x["train"]), y["train"])
    expect = r2_score(y["val"], knn.predict(scaler.transform(x["val"])))
    assert res["sources"]["latent"]["stage1"]["probes"]["vision"]["shared"] == pytest.approx(expect, abs=1e-6)


@pytest.mark.slow
def test_study_on_a_users_cache(tmp_path, synthetic_tvl, tiny_stage1_files):
    """--sources cache:DIR: a cache_features.py cache of TVL-format data, the Stage 1 flags passed through; R@1,
    the prefix curve and TVL's metrics (Stage 1 beside Stage 2) on val and test, no probe numbers; the factor-free
    content_gain per modality and the Stage 1 diagnostic, in results.json, RESULTS.md and a printed line."""
    import cache_features
    from conftest import stage1_flags
    cache = str(tmp_path / "cache")
    assert cache_features.main(["--output", cache, "--splits", "train", "val", "test", "--datasets_dir",
                                synthetic_tvl, "--num_workers", "0", "--device", "cpu", "--active_modality_names",
                                "vision", "tactile"] + stage1_flags(tiny_stage1_files)) == 0
    out = tmp_path / "results"
    lines = run_study_script("--sources", f"cache:{cache}", *stage1_flags(tiny_stage1_files), "--arms",
                             "tokens", "separate_noorder", "separate_view", "--seeds", "1", "--epochs", "1",
                             "--output", str(out), "--train_args", "--batch_size 16 --register_width 32")
    m = re.fullmatch("study: " + SUMMARY, lines[-1])
    assert m and m.group(G["unique_gain"]) == "nan" and m.group(G["seeds"]) == "1", lines[-1]
    res = json.load(open(out / "results.json"))
    src = res["sources"][f"cache:{cache}"]
    run = src["arms"]["tokens"]["runs"][0]
    assert "probes" not in run and len(run["prefix_mean"]) == 4 and set(run["tvl"]) == {"val", "test"}
    assert "--batch_size" in run["argv"] and "--register_width" in run["argv"]
    # the study's own R@1 on val equals the trainer's evaluation of the same checkpoint
    assert run["summary"]["pooled"] == pytest.approx(run["tvl"]["val"]["stage2"]["mean_r1"], abs=0.01)
    # Stage 1's numbers do not depend on the arm
    assert src["arms"]["separate_noorder"]["runs"][0]["tvl"]["test"]["stage1"] == run["tvl"]["test"]["stage1"]
    # the factor-free measure and the diagnostic, per modality, with no known factor
    line = [x for x in lines if x.startswith(f"study(content, cache:{cache}, tokens): ")]
    assert len(line) == 1, lines
    v = line_values(line[0])
    for mod in ("tactile", "vision"):
        c = run["content"][mod]
        assert run["summary"][f"content_gain_{mod}"] == c["aligned+complementary"] - c["aligned+complementary(init)"]
        assert v[f"content_gain_{mod}"] == pytest.approx(run["summary"][f"content_gain_{mod}"], abs=6e-4)
        d = src["stage1"]["content"][mod]
        assert d["stage1_content"] == pytest.approx(d["partner+own"] - d["partner"]) and 1 <= d["k"] <= 16
        assert v[f"stage1_content_{mod}"] == pytest.approx(d["stage1_content"], abs=6e-4)
        assert -1 < d["partner"] <= d["partner+own"] + 0.05 < 1.05  # R² values
    assert v["seeds"] == 1
    # an arm the trainer refuses on this cache (the view term needs augmented views; this cache has none) is left
    # out with the trainer's line, and the study goes on
    error = src["failed"]["separate_view"]
    assert "separate_view" not in src["arms"] and error.startswith("training ") and "error: " in error
    assert f"study: cache:{cache}, separate_view: left out, its training failed: {error}" in lines
    md = (out / "RESULTS.md").read_text()
    header = md.split("### Arms: retrieval")[1].strip().splitlines()[0]
    assert "TVL metrics, arm `tokens`, test split" in md and "R@1 pooled" in header and "unique_gain" not in header
    per_mod = md.split("### Arms: what the complementary token holds, per modality")[1].strip().splitlines()[0]
    assert "content_gain" in per_mod and "unique_gain" not in per_mod
    assert f"| cache:{cache} | tactile | {src['stage1']['content']['tactile']['stage1_content']:.3f} |" in md
    assert f"`separate_view` left out: its training failed ({error})." in md


@pytest.mark.parametrize("arm", ["mission", "separate_partner"])
def test_init_control_is_the_module_training_starts_from(tmp_path, tiny_stage1_files, arm):
    """With lr 0 training leaves the weights where they started: the checkpoint must equal the study's control
    (with the complementary pathway of its own too, whose blocks draw from the same generator)."""
    import torch

    import main_train_stage2 as train
    from stage1 import build_stage1
    from study.latent_tokens import make_latent_cache
    from study.run_study import (ARMS, TRAIN_FLAGS, arm_flags, base_flags, initial_module, load_trained,
                                 trainer_options, train_run)
    arm_argv = arm_flags({a[0]: a[2] for a in ARMS}[arm], trainer_options())
    if arm_argv is None:
        pytest.skip(f"main_train_stage2 lacks a flag of arm {arm}")
    ckpt, clip = tiny_stage1_files
    flags = ["--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained", clip]
    cache, out = str(tmp_path / "cache"), str(tmp_path / "run")
    spec = {"cache": cache, "mods": ["vision", "tactile"], "flags": TRAIN_FLAGS, "stage1_flags": flags}
    argv = base_flags(spec, out, 3, 1) + arm_argv + ["--lr", "0"]
    stage1 = build_stage1(ckpt, "fluxtalk-tiny", clip, active_modalities=["vision", "tactile"])
    make_latent_cache(cache, stage1, train.parse_args(argv), n_train=128, n_val=64, seed=0)
    args, _ = train_run(argv, out, stage1)
    trained, init = load_trained(args, stage1, out).state_dict(), initial_module(args).state_dict()
    assert trained.keys() == init.keys()
    for k in trained:
        assert torch.equal(trained[k], init[k]), k
