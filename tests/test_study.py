"""The study's probes against known answers, the latent-token cache against its generator, and the quick path end
to end (files written, the summary line)."""
import json
import os
import re

import numpy as np
import pytest

from study.probes import probe_classes, probe_continuous, r2


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


@pytest.mark.slow
def test_quick_path_writes_its_outputs(tmp_path):
    """The study end to end at the smallest size (two seeds, one epoch): every output file, the summary line."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, os.path.join(root, "study", "run_study.py"), "--smoke", "--quick",
                        "--output", str(out), "--arms", "default", "nd0", "residual"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"study: ordering_gain=(-?[\d.]+) ordering_std=([\d.]+) specific_gain=(-?[\d.]+) "
                     r"specific_std=([\d.]+) seeds=2", last)
    assert m, last
    res = json.load(open(out / "results.json"))
    runs = res["sources"]["latent"]["arms"]["default"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    # the summary line is recomputed here from the stored per-seed numbers
    first = lambda arm: [r["prefix_mean"][0] for r in res["sources"]["latent"]["arms"][arm]["runs"]]  # noqa: E731
    gains = np.array(first("default")) - np.array(first("nd0"))
    assert float(m.group(1)) == pytest.approx(gains.mean(), abs=0.006)
    for r_ in runs:  # K = 4 register tokens: the prefix curve has 4 points, the probes cover every representation
        assert len(r_["prefix_mean"]) == 4
        assert set(r_["probes"]["vision"]) == {"overlapping", "complementary", "overlapping+complementary",
                                               "token0", "token1", "token2", "token3"}
    assert set(res["sources"]) == {"latent", "tvl"}
    md = (out / "RESULTS.md").read_text()
    assert "## Source: latent" in md and "## Source: tvl" in md and res["command"] in md
    for name in ("prefix_latent.png", "prefix_tvl.png", "probes_latent.png", "probes_tvl.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_init_control_is_the_module_training_starts_from(tmp_path, tiny_stage1_files):
    """With lr 0 training leaves the weights where they started: the checkpoint must equal the study's control."""
    import torch

    import main_train_stage2 as train
    from stage1 import build_stage1
    from study.latent_tokens import make_latent_cache
    from study.run_study import base_flags, initial_module, load_trained, train_run
    ckpt, clip = tiny_stage1_files
    flags = ["--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained", clip]
    cache, out = str(tmp_path / "cache"), str(tmp_path / "run")
    argv = base_flags(cache, flags, out, 3, 1) + ["--lr", "0"]
    stage1 = build_stage1(ckpt, "fluxtalk-tiny", clip, active_modalities=["vision", "tactile"])
    make_latent_cache(cache, stage1, train.parse_args(argv), n_train=128, n_val=64, seed=0)
    args, _ = train_run(argv, out, stage1)
    trained, init = load_trained(args, stage1, out).state_dict(), initial_module(args).state_dict()
    assert trained.keys() == init.keys()
    for k in trained:
        assert torch.equal(trained[k], init[k]), k
