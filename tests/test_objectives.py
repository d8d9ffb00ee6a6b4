"""The issue-17 and issue-22 objectives end to end: training from a feature cache with --objective separate, tokens
and the per-position token target (and the view term), resuming it, reading its embeddings back through
embed_stage2; the two views the view term reads, from the cache and online; the caches they refuse."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import cache_features
import embed_stage2
import data_stage2 as D
import feature_cache as FC
import main_train_stage2 as M
from conftest import TINY_REGISTERS, assert_same_model, load, read_log, stage1_flags
from test_train import NEW_OBJECTIVE_FLAGS
from tvl_stage2 import RegisterModule


@pytest.fixture(scope="module")
def view_cache(tiny_stage1_files, short_tvl, tmp_path_factory):
    """train (plain view + 2 augmented views) and val, all three modalities: runs the caching tool (slow tests)."""
    out = str(tmp_path_factory.mktemp("cache") / "c")
    assert cache_features.main(stage1_flags(tiny_stage1_files) + [
        "--datasets_dir", short_tvl, "--output", out, "--device", "cpu", "--num_workers", "0", "--shard_size", "8",
        "--batch_size", "8", "--cache_views", "2"]) == 0
    return out


def cache_run_flags(tiny_stage1_files, data, cache, out, *extra):
    return stage1_flags(tiny_stage1_files) + [
        "--datasets_dir", data, "--feature_cache", cache, "--device", "cpu", "--output_dir", str(out),
        "--batch_size", "6", *TINY_REGISTERS, "--num_workers", "0", "--print_freq", "1", "--warmup_epochs", "0",
        "--lr", "1e-3", *extra]


def independent_forward(ckpt, cache, split="val"):
    """The checkpoint's register module built from its stored args and the cache's dims, fed the cached split."""
    a, meta = ckpt["args"], json.load(open(os.path.join(cache, split, "meta.json")))
    E, active = meta["embed_dim"], a["active_modality_names"]
    dims = {m: meta["feature_dims"][m] for m in active}
    module = RegisterModule(
        dims, E, num_tokens=a["num_register_tokens"],
        num_overlapping=a["num_overlapping_tokens"], width=a["register_width"], depth=a["register_depth"],
        num_heads=a["register_heads"], complementary_pathway=a["complementary_pathway"],
        residual_source=a["complementary_residual_source"],
        residual_dims={m: E for m in active} if a["complementary_residual_weight"] else None,
        token_dims=dims if a["complementary_token_weight"] else None, token_target=a["complementary_token_target"],
        token_counts={m: meta["arrays"][f"{m}_tokens"]["shape"][0] for m in active})  # the cache's own N_m
    module.load_state_dict(ckpt["model"])
    ds = FC.CachedFeatureDataset(cache, split, meta, active, seed=0, augment=False)
    batch = default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return module.eval()({m: t.float() for m, t in batch["tokens"].items()}, batch["padding_mask"])["registers"]


SEPARATE_ARGS = {"objective": "separate", "complementary_pathway": "separate",
                 "complementary_residual_source": "partner", "complementary_residual_weight": 1.0,
                 "contrastive_prefixes": "all", "nested_dropout_rate": 0.0, "complementary_token_weight": 0.0,
                 "complementary_token_target": "pooled", "complementary_token_loss": "cosine"}
TOKENS_ARGS = dict(SEPARATE_ARGS, objective="tokens", complementary_residual_weight=0.0, complementary_token_weight=1.0,
                   complementary_token_loss="infonce")
# flags -> (the resolved objective flags args.json must hold, the complementary term its log must show)
OBJECTIVE_RUNS = {"separate": (["--objective", "separate"], SEPARATE_ARGS, "residual"),
                  "tokens": (["--objective", "tokens"], TOKENS_ARGS, "token"),
                  "tokens_per_position": (["--objective", "tokens", "--complementary_token_target", "tokens",
                                           "--complementary_token_loss", "cosine"],
                                          dict(TOKENS_ARGS, complementary_token_target="tokens",
                                               complementary_token_loss="cosine"), "token")}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVE_RUNS))
def test_objective_trains_from_a_cache_resumes_bitwise_and_embeds(objective, view_cache, short_tvl,
                                                                  tiny_stage1_files, tmp_path):
    argv, expected_args, term = OBJECTIVE_RUNS[objective]
    flags = lambda out, *extra: cache_run_flags(tiny_stage1_files, short_tvl, view_cache, out, *argv, *extra)
    assert M.main(flags(tmp_path / "ref", "--epochs", "2", "--save_every", "1")) == 0
    resume = str(tmp_path / "ref" / "checkpoint-0.pth")
    assert M.main(flags(tmp_path / "run", "--epochs", "2", "--resume", resume)) == 0
    assert_same_model(tmp_path / "run", tmp_path / "ref", f"{argv} resumed after epoch 0")
    log = read_log(tmp_path / "ref")
    assert [line["epoch"] for line in log] == [0, 1]
    for line in log:  # the preset's terms are on and logged, per modality too; the other residual is off
        assert line[f"train_{term}"] > 0 and line["train_comp_l2"] > 0
        assert all(line[f"train_{term}_{m}"] > 0 for m in ("vision", "tactile", "text"))
        assert {f"train_contrastive_prefix{k}" for k in (1, 2, 3)} <= set(line)
        assert f"train_{({'residual', 'token'} - {term}).pop()}" not in line
    stored = json.load(open(tmp_path / "run" / "args.json"))
    assert {k: stored[k] for k in expected_args} == expected_args
    ckpt = load(tmp_path / "run" / "checkpoint.pth")
    assert ckpt["model"]["register_tokens"].shape[0] == 3 and ckpt["model"]["comp_tokens"].shape[0] == 1
    decoders = {k.split(".")[0] for k in ckpt["model"]} & {"residual", "token_decoder"}
    assert decoders == {"residual" if term == "residual" else "token_decoder"}
    # embed_stage2 reads the checkpoint back and gives the model's own forward on the cached val split
    model, args = embed_stage2.load_stage2(str(tmp_path / "run" / "checkpoint.pth"))
    result = embed_stage2.embed_split(model, args, "val")
    expected = independent_forward(ckpt, view_cache)
    for m, regs in expected.items():
        assert result["registers"][m].shape == regs.shape == (len(result["index"]), 4, 64)
        torch.testing.assert_close(result["registers"][m], regs, rtol=0, atol=1e-6)
    if objective != "separate":
        return  # what follows does not depend on the objective
    # a checkpoint of a run from before these flags existed (its args lack them) loads with the original objective
    old_args = {k: v for k, v in ckpt["args"].items() if k not in NEW_OBJECTIVE_FLAGS}
    old_args["complementary_residual_weight"] = 0.0
    mission = M.parse_args(stage1_flags(tiny_stage1_files) + TINY_REGISTERS + ["--device", "cpu",
                                                                            "--objective", "mission"])
    torch.save(dict(ckpt, args=old_args, model=M.build_model(mission, model.stage1).trainable_state_dict()),
               tmp_path / "old.pth")
    model, args = embed_stage2.load_stage2(str(tmp_path / "old.pth"))
    assert not model.unwrapped_registers.separate and model.unwrapped_registers.residual is None
    assert (args.complementary_pathway, args.contrastive_prefixes) == ("shared", "full")


@pytest.mark.slow
def test_view_term_trains_from_a_two_view_cache_and_online(view_cache, short_tvl, tiny_stage1_files, tmp_path):
    flags = cache_run_flags(tiny_stage1_files, short_tvl, view_cache, tmp_path / "cached", "--epochs", "1",
                            "--objective", "separate", "--complementary_view_weight", "0.5")
    assert M.main(flags) == 0
    line = read_log(tmp_path / "cached")[0]
    assert line["train_view"] > 0 and all(line[f"train_view_{m}"] > 0 for m in ("vision", "tactile", "text"))
    # online: two augmentation draws per sample, two modalities (half the encoder cost)
    online = [a for a in flags if a != view_cache]
    online.remove("--feature_cache")
    online[online.index(str(tmp_path / "cached"))] = str(tmp_path / "online")
    assert M.main(online + ["--active_modality_names", "vision", "tactile"]) == 0
    assert read_log(tmp_path / "online")[0]["train_view"] > 0


@pytest.mark.slow
def test_cached_second_view_is_another_augmented_view(view_cache):
    meta = json.load(open(os.path.join(view_cache, "train", "meta.json")))
    ds = FC.CachedFeatureDataset(view_cache, "train", meta, ("vision", "text"), seed=0, augment=True, two_views=True)
    seen = set()
    for epoch in range(4):
        for i in range(len(ds)):
            v1, v2 = ds.view(i, epoch), ds.second_view(i, epoch)
            assert {v1, v2} == {1, 2}  # two augmented views: always both, never the plain view 0
            seen.add(v1)
    assert seen == {1, 2}
    item = ds[(3, 5)]
    k, j = divmod(5, meta["shard_size"])
    arrays = os.path.join(view_cache, "train", f"shard_{k:05d}")
    tokens = torch.from_numpy(np.load(os.path.join(arrays, "vision_tokens.npy")))
    assert torch.equal(item["tokens"]["vision"], tokens[ds.view(5, 3), j])
    assert torch.equal(item["view2"]["tokens"]["vision"], tokens[ds.second_view(5, 3), j])
    assert set(item["view2"]) == {"tokens", "global", "padding_mask"} and "index" not in item["view2"]


def test_online_second_view_is_an_independent_augmentation_draw(short_tvl, tiny_stage1):
    args = D.add_data_args(argparse.ArgumentParser()).parse_args(["--datasets_dir", short_tvl])
    D.resolve_recipe(args, tiny_stage1)
    one = D.build_dataset(args, "train", tiny_stage1.tokenizer, ("vision", "tactile"), seed=0)
    args.complementary_view_weight = 0.5
    two = D.build_dataset(args, "train", tiny_stage1.tokenizer, ("vision", "tactile"), seed=0)
    val = D.build_dataset(args, "val", tiny_stage1.tokenizer, ("vision", "tactile"), seed=0)
    assert "view2" not in val[0] and "view2" not in one[(1, 2)]
    item, ref = two[(1, 2)], one[(1, 2)]
    for m in ("vision", "tactile"):
        assert torch.equal(item[m], ref[m])  # the first view is the one training without the term reads
        assert item["view2"][m].shape == item[m].shape and not torch.equal(item["view2"][m], item[m])
    assert torch.equal(two[(1, 2)]["view2"]["vision"], item["view2"]["vision"])  # a function of (seed, epoch, index)
    assert not torch.equal(two[(2, 2)]["view2"]["vision"], item["view2"]["vision"])


@pytest.mark.slow
def test_view_term_refuses_a_cache_with_one_augmented_view(view_cache, short_tvl, tiny_stage1_files, tmp_path,
                                                          capsys):
    cache = str(tmp_path / "one_view")  # a real cache of the plain view + one augmented view (a meta.json edited to
    # say so would be refused as damaged first: its shapes no longer match the shards)
    assert cache_features.main(stage1_flags(tiny_stage1_files) + [
        "--datasets_dir", short_tvl, "--output", cache, "--device", "cpu", "--num_workers", "0", "--shard_size", "8",
        "--batch_size", "8", "--cache_views", "1"]) == 0
    out = tmp_path / "run"
    code = M.main(cache_run_flags(tiny_stage1_files, short_tvl, cache, out, "--epochs", "1",
                                  "--complementary_view_weight", "0.5"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert line == (f"error: --complementary_view_weight 0.5 needs two augmented views per sample: --feature_cache "
                    f"{cache} (train) has 1 (rebuild it with cache_features.py --cache_views 2 or more)")
    assert not (out / "checkpoint.pth").exists()


def test_per_position_token_target_reads_the_positions_of_the_cache(tiny_stage1_files, tiny_stage1, tmp_path):
    """The study's latent-token cache holds its own number of context positions (not Stage 1's): the per-position
    decoder is built with one query per position of the tokens the run reads, so it trains on that cache, and its
    checkpoint holds that many queries."""
    from study.latent_tokens import SPEC, make_latent_cache
    cache, out = str(tmp_path / "latent"), tmp_path / "run"
    base = stage1_flags(tiny_stage1_files) + ["--feature_cache", cache, "--device", "cpu", "--output_dir", str(out),
                                              "--batch_size", "6", *TINY_REGISTERS, "--num_workers", "0",
                                              "--active_modality_names", "vision", "tactile"]  # as the study
    make_latent_cache(cache, tiny_stage1, M.parse_args(base), n_train=12, n_val=6)
    assert SPEC["num_context"] not in tiny_stage1.token_counts.values()
    assert M.main(base + ["--objective", "tokens", "--complementary_token_target", "tokens",
                          "--complementary_token_loss", "cosine", "--epochs", "1"]) == 0
    model = load(os.path.join(out, "checkpoint.pth"))["model"]
    for m in ("vision", "tactile"):
        assert model[f"token_decoder.{m}.queries"].shape[0] == SPEC["num_context"]
