"""The issue-17 objectives end to end: training from a feature cache with --objective separate, resuming it, and
reading its embeddings back through embed_stage2."""
import json
import os

import pytest
import torch
from torch.utils.data import default_collate

import cache_features
import embed_stage2
import feature_cache as FC
import main_train_stage2 as M
from conftest import TINY_REGISTERS, assert_same_model, load, read_log, stage1_flags
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
    module = RegisterModule(
        {m: meta["feature_dims"][m] for m in active}, E, num_tokens=a["num_register_tokens"],
        num_overlapping=a["num_overlapping_tokens"], width=a["register_width"], depth=a["register_depth"],
        num_heads=a["register_heads"], complementary_pathway=a["complementary_pathway"],
        residual_source=a["complementary_residual_source"],
        residual_dims={m: E for m in active} if a["complementary_residual_weight"] else None)
    module.load_state_dict(ckpt["model"])
    ds = FC.CachedFeatureDataset(cache, split, meta, active, seed=0, augment=False)
    batch = default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return module.eval()({m: t.float() for m, t in batch["tokens"].items()}, batch["padding_mask"])["registers"]


@pytest.mark.slow
def test_objective_separate_trains_from_a_cache_resumes_bitwise_and_embeds(view_cache, short_tvl, tiny_stage1_files,
                                                                           tmp_path):
    flags = lambda out, *extra: cache_run_flags(tiny_stage1_files, short_tvl, view_cache, out, "--objective",
                                                "separate", *extra)
    assert M.main(flags(tmp_path / "ref", "--epochs", "2", "--save_every", "1")) == 0
    resume = str(tmp_path / "ref" / "checkpoint-0.pth")
    assert M.main(flags(tmp_path / "run", "--epochs", "2", "--resume", resume)) == 0
    assert_same_model(tmp_path / "run", tmp_path / "ref", "--objective separate resumed after epoch 0")
    log = read_log(tmp_path / "ref")
    assert [line["epoch"] for line in log] == [0, 1]
    for line in log:  # the preset's terms are on and logged
        assert line["train_residual"] > 0 and line["train_comp_l2"] > 0
        assert {f"train_contrastive_prefix{k}" for k in (1, 2, 3)} <= set(line)
    stored = json.load(open(tmp_path / "run" / "args.json"))
    assert {k: stored[k] for k in ("objective", "complementary_pathway", "complementary_residual_source",
                                   "complementary_residual_weight", "contrastive_prefixes", "nested_dropout_rate")} == {
        "objective": "separate", "complementary_pathway": "separate", "complementary_residual_source": "partner",
        "complementary_residual_weight": 1.0, "contrastive_prefixes": "all", "nested_dropout_rate": 0.0}
    ckpt = load(tmp_path / "run" / "checkpoint.pth")
    assert ckpt["model"]["register_tokens"].shape[0] == 3 and ckpt["model"]["comp_tokens"].shape[0] == 1
    # embed_stage2 reads the checkpoint back and gives the model's own forward on the cached val split
    model, args = embed_stage2.load_stage2(str(tmp_path / "run" / "checkpoint.pth"))
    result = embed_stage2.embed_split(model, args, "val")
    expected = independent_forward(ckpt, view_cache)
    for m, regs in expected.items():
        assert result["registers"][m].shape == regs.shape == (len(result["index"]), 4, 64)
        torch.testing.assert_close(result["registers"][m], regs, rtol=0, atol=1e-6)
    # a checkpoint of a run from before these flags existed (its args lack them) loads with the original objective
    new_flags = ("objective", "complementary_pathway", "complementary_residual_source",
                 "complementary_difference_weight", "contrastive_prefixes")
    old_args = {k: v for k, v in ckpt["args"].items() if k not in new_flags}
    old_args["complementary_residual_weight"] = 0.0
    mission = M.parse_args(stage1_flags(tiny_stage1_files) + TINY_REGISTERS + ["--device", "cpu"])
    torch.save(dict(ckpt, args=old_args, model=M.build_model(mission, model.stage1).trainable_state_dict()),
               tmp_path / "old.pth")
    model, args = embed_stage2.load_stage2(str(tmp_path / "old.pth"))
    assert not model.unwrapped_registers.separate and model.unwrapped_registers.residual is None
    assert (args.complementary_pathway, args.contrastive_prefixes) == ("shared", "full")
