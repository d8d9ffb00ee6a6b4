"""Feature cache: cached views equal the online inputs' features, training from the cache equals online training,
the cache does not depend on the number of processes, a killed caching run completes on rerun, refusals."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import cache_features
import data_stage2 as D
import feature_cache as FC
import main_train_stage2 as M
from conftest import ROOT, TINY_REGISTERS, launch_command, scalars, stage1_flags

SHARD = 4  # samples per shard: several shards even on the small test split


@pytest.fixture(scope="module")
def small_tvl(tmp_path_factory):
    """14 SSVTP + 14 HCT samples: 19 train / 4 val; small, as every sample costs a (tiny) encoder forward."""
    from tools.make_synthetic_tvl import make_synthetic_tvl
    out = str(tmp_path_factory.mktemp("small_tvl"))
    make_synthetic_tvl(out, n_ssvtp=14, n_hct=14, seed=0)
    return out


def cache_flags(tiny_stage1_files, data, out, *extra):
    return stage1_flags(tiny_stage1_files) + ["--datasets_dir", data, "--output", str(out), "--device", "cpu",
                                              "--num_workers", "0", "--shard_size", str(SHARD), "--batch_size", "3",
                                              *extra]


@pytest.fixture(scope="module")
def cache(tiny_stage1_files, small_tvl, tmp_path_factory):
    """A clean one-process cache of train (view 0 + 1 augmented view) and val, all three modalities.
    It runs the caching tool over both splits: the tests that use it are marked slow."""
    out = tmp_path_factory.mktemp("cache") / "c"
    assert cache_features.main(cache_flags(tiny_stage1_files, small_tvl, out, "--cache_views", "1")) == 0
    return str(out)


def shard_files(root, split):
    d = os.path.join(root, split)
    return sorted(os.path.relpath(os.path.join(dp, f), d) for dp, _, fs in os.walk(d) for f in fs if f != "meta.json")


def assert_same_cache(a, b, split, modalities=("vision", "tactile", "text")):
    """b's shard files are byte-identical (headers included) to a's files of `modalities`; meta.json agrees."""
    files = [f for f in shard_files(a, split)
             if os.path.basename(f).split("_")[0] in modalities + ("index.npy", FC.CHECKSUMS)]
    assert shard_files(b, split) == files
    for f in files:
        if f.endswith(FC.CHECKSUMS):  # b's checksums are a's of the files b holds
            sums_a, sums_b = (json.load(open(os.path.join(r, split, f))) for r in (a, b))
            assert set(sums_b) == set(os.listdir(os.path.join(b, split, os.path.dirname(f)))) - {FC.CHECKSUMS}
            assert sums_b == {k: v for k, v in sums_a.items() if k in sums_b}, f
            continue
        with open(os.path.join(a, split, f), "rb") as fa, open(os.path.join(b, split, f), "rb") as fb:
            assert fa.read() == fb.read(), f
    meta_a, meta_b = (json.load(open(os.path.join(r, split, "meta.json"))) for r in (a, b))
    ignore = ["args", "command"]  # creation args and command line name the output folder; the rest must agree
    if len(modalities) < 3:
        ignore += ["active_modalities", "arrays", "feature_dims"]
    assert {k: v for k, v in meta_a.items() if k not in ignore} == {k: v for k, v in meta_b.items() if k not in ignore}


@pytest.mark.slow
def test_views_are_stage1_features_of_the_pipeline_inputs(cache, small_tvl, tiny_stage1):
    """View 0 = Stage 1 on the un-augmented inputs; view 1 = on the augmented inputs of epoch 1, same (seed, index)."""
    args = D.add_data_args(__import__("argparse").ArgumentParser()).parse_args(["--datasets_dir", small_tvl])
    D.resolve_recipe(args, tiny_stage1)  # the data recipe cache_features took from the Stage 1 checkpoint
    meta = json.load(open(os.path.join(cache, "train", "meta.json")))
    assert meta["views"] == 2 and meta["num_shards"] == 5 and meta["arrays"]["vision_tokens"]["dtype"] == "float16"
    shard = 3  # samples 12..15
    for view, augment in ((0, False), (1, True)):
        ds = D.build_dataset(args, "train", tiny_stage1.tokenizer, D.STREAMS, seed=0, augment=augment)
        batch = default_collate([ds[(view, i)] for i in range(shard * SHARD, (shard + 1) * SHARD)])
        feats = tiny_stage1(batch)
        folder = os.path.join(cache, "train", f"shard_{shard:05d}")
        for m in ("vision", "tactile", "text"):
            cached = torch.from_numpy(np.load(os.path.join(folder, f"{m}_tokens.npy"))[view]).float()
            # float16 storage: within half a unit in the last place (2^-11 relative) of the fp32 features
            torch.testing.assert_close(cached, feats["tokens"][m], rtol=2 ** -11, atol=1e-6)
            glob = torch.from_numpy(np.load(os.path.join(folder, f"{m}_global.npy"))[view])
            torch.testing.assert_close(glob, feats["global"][m], rtol=1e-5, atol=1e-6)
        pad = torch.from_numpy(np.load(os.path.join(folder, "text_padding.npy"))[view])
        assert torch.equal(pad, feats["padding_mask"]["text"])
    assert np.array_equal(np.load(os.path.join(folder, "index.npy")), np.arange(12, 16))


@pytest.mark.slow
def test_cached_dataset_picks_one_augmented_view_per_epoch(cache):
    meta = json.load(open(os.path.join(cache, "train", "meta.json")))
    plain = FC.CachedFeatureDataset(cache, "train", meta, ("vision", "text"), seed=0, augment=False)
    aug = FC.CachedFeatureDataset(cache, "train", meta, ("vision", "text"), seed=0, augment=True)
    assert {plain.view(i) for i in range(len(plain))} == {0}
    assert {aug.view(i) for i in range(len(aug))} == {1}  # one augmented view: never the plain one
    item = aug[13]
    view1 = np.load(os.path.join(cache, "train", "shard_00003", "vision_tokens.npy"))[1, 1]
    assert item["index"] == 13 and item["tokens"]["vision"].dtype == torch.float16
    assert np.array_equal(item["tokens"]["vision"].numpy(), view1)
    assert set(item["tokens"]) == {"vision", "text"} and set(item["padding_mask"]) == {"text"}


def train_flags(tiny_stage1_files, data, out, *extra):
    # --no_augment, nested dropout 0, no attention dropout: the only difference left is the fp16 rounding of features
    return stage1_flags(tiny_stage1_files) + [
        "--datasets_dir", data, "--device", "cpu", "--output_dir", str(out), "--epochs", "1", "--batch_size", "6",
        *TINY_REGISTERS, "--num_workers", "0",
        "--print_freq", "1", "--warmup_epochs", "0", "--lr", "1e-3", "--no_augment", "--nested_dropout_rate", "0",
        *extra]


def step_losses(out):
    return [v for _, v in scalars(out)["train/loss"]]


@pytest.mark.slow
def test_training_from_cache_equals_online_training(cache, small_tvl, tiny_stage1_files, tmp_path):
    """3 steps (19 train samples // batch 6) + evaluation, online vs from the cache, same seed.

    Tolerance: the cache stores each feature rounded to float16, a relative error <= 2^-11 (4.9e-4); the losses
    are smooth functions of LayerNorm'ed features, so they move by about that much: rtol 1e-3 (2x the rounding
    bound) on every step's loss. Weights are not compared elementwise: AdamW's first steps are ~lr * sign(grad),
    so a parameter whose gradient is ~0 may step +lr or -lr on a rounding-level difference without changing any
    loss. The retrieval metrics are rank statistics over the validation split and must be exactly equal."""
    assert M.main(train_flags(tiny_stage1_files, small_tvl, tmp_path / "online")) == 0
    assert M.main(train_flags(tiny_stage1_files, small_tvl, tmp_path / "cached", "--feature_cache", cache)) == 0
    online, cached = step_losses(tmp_path / "online"), step_losses(tmp_path / "cached")
    assert len(online) == len(cached) == 3
    print("relative loss differences cached vs online:", np.abs(np.array(cached) / np.array(online) - 1))
    np.testing.assert_allclose(cached, online, rtol=1e-3)
    assert online[0] != online[2]  # the steps changed the model: equal losses are not trivially equal
    logs = [json.loads(open(tmp_path / r / "log.txt").read()) for r in ("online", "cached")]
    val = [{k: v for k, v in log.items() if k.startswith("val_")} for log in logs]
    assert val[0] == val[1] and len(val[0]) > 10


@pytest.mark.slow
def test_two_processes_write_the_same_cache(cache, small_tvl, tiny_stage1_files, tmp_path):
    out = tmp_path / "c2"
    cmd, env = launch_command(os.path.join(ROOT, "cache_features.py"), nproc=2)
    cmd += cache_flags(tiny_stage1_files, small_tvl, out, "--cache_views", "1", "--splits", "train")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 1: train: wrote 2 shard(s)" in proc.stdout  # shards 1 and 3 of 5: the work was really split
    assert_same_cache(cache, str(out), "train")


@pytest.mark.slow
def test_killed_run_completes_without_redoing_finished_shards(cache, small_tvl, tiny_stage1_files, tmp_path):
    out = tmp_path / "c"
    # vision + text only (no tactile ViT): half the cost, and still compared with the clean all-modality cache
    flags = cache_flags(tiny_stage1_files, small_tvl, out, "--cache_views", "1", "--splits", "train",
                        "--active_modality_names", "vision", "text")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cache_features.py")] + flags, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train = out / "train"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if len(list(train.glob("shard_*"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the caching run ended before it could be killed"
    assert not (train / "meta.json").exists()
    finished = {p.name: (os.stat(p / "vision_tokens.npy").st_ino, os.stat(p / "vision_tokens.npy").st_mtime_ns)
                for p in train.glob("shard_*")}
    assert 2 <= len(finished) < 5

    # an unfinished cache is refused by training, naming the folder and the missing meta.json
    with pytest.raises(D.DataError, match=rf"--feature_cache {out}: no train/meta.json"):
        FC.load_cache_meta(str(out), "train")

    assert cache_features.main(flags) == 0
    after = {p: (os.stat(train / p / "vision_tokens.npy").st_ino, os.stat(train / p / "vision_tokens.npy").st_mtime_ns)
             for p in finished}
    assert after == finished  # finished shards were skipped, not rewritten
    assert not list(train.glob(".tmp_*")) and not (train / "plan.json").exists()
    assert_same_cache(cache, str(out), "train", modalities=("vision", "text"))


def run_main(argv, capsys):
    code = M.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_refusals_name_the_cache_and_what_differs(cache, small_tvl, tiny_stage1_files, tiny_stage1, tmp_path, capsys):
    from tools.make_tiny_stage1 import make_tiny_stage1
    # another Stage 1 (other tactile weights): refused by main, exit 2, one line
    other_ckpt, _ = make_tiny_stage1(str(tmp_path / "other"), seed=1)
    flags = train_flags(tiny_stage1_files, small_tvl, tmp_path / "run", "--feature_cache", cache)
    flags[flags.index("--stage1_checkpoint") + 1] = other_ckpt
    code, line = run_main(flags, capsys)
    assert code == 2 and line.startswith(f"error: --feature_cache {cache} (val): made with another Stage 1")

    def args(*extra):
        a = M.parse_args(train_flags(tiny_stage1_files, small_tvl, tmp_path / "run", "--feature_cache", cache, *extra))
        D.resolve_recipe(a, tiny_stage1)  # as the trainer does once Stage 1 is loaded
        return a

    # other modalities: a vision + text cache cannot serve a tactile run
    vt = str(tmp_path / "vt")
    assert cache_features.main(cache_flags(tiny_stage1_files, small_tvl, vt, "--splits", "val",
                                           "--active_modality_names", "vision", "text")) == 0
    a = args()
    a.feature_cache = vt
    with pytest.raises(D.DataError, match=r"\(val\): holds modalities \['vision', 'text'\], not \['tactile'\]"):
        FC.build_cached_dataset(a, "val", tiny_stage1, a.seed)

    # another split: other subsets, or other samples under --datasets_dir
    with pytest.raises(D.DataError, match=r"\(train\): another split or captions: --datasets \['ssvtp', 'hct'\] "
                                          r"\(cache\) vs \['ssvtp'\]"):
        FC.build_cached_dataset(args("--datasets", "ssvtp"), "train", tiny_stage1, 0)
    with pytest.raises(D.DataError, match=r"another split or captions: --text_prompt '' \(cache\) vs 'This image"):
        FC.build_cached_dataset(args("--text_prompt", "This image gives tactile feelings of "), "val", tiny_stage1, 0)
    tampered = str(tmp_path / "tampered")
    shutil.copytree(os.path.join(cache, "val"), os.path.join(tampered, "val"))
    meta = json.load(open(os.path.join(tampered, "val", "meta.json")))
    meta["sample_ids"][1] = "ssvtp/images_rgb/image_999_rgb.jpg"
    json.dump(meta, open(os.path.join(tampered, "val", "meta.json"), "w"))
    a = args()
    a.feature_cache = tampered
    with pytest.raises(D.DataError, match=r"another split: 4 cached samples vs 4 under --datasets_dir, first "
                                          r"difference at index 1 \('ssvtp/images_rgb/image_999_rgb.jpg' vs"):
        FC.build_cached_dataset(a, "val", tiny_stage1, 0)

    # a rerun into an existing cache with other settings is refused instead of mixing two caches
    code = cache_features.main(cache_flags(tiny_stage1_files, small_tvl, cache, "--splits", "val", "--seed", "1"))
    assert code == 2 and "this cache was started with other settings (seed differ)" in capsys.readouterr().err


def test_damaged_meta_json_is_refused_in_one_line(tmp_path):
    from data_stage2 import DataError
    from feature_cache import load_cache_meta
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "meta.json").write_text('{"format": ')
    with pytest.raises(DataError, match=r"train/meta.json is unreadable .*rebuild the cache") as e:
        load_cache_meta(str(tmp_path), "train")
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_every_bad_file_of_a_split_is_reported_and_the_rest_cached(cache, small_tvl, tiny_stage1_files, tmp_path,
                                                                    capsys):
    data = tmp_path / "data"
    shutil.copytree(small_tvl, data)
    listing = D.build_dataset(cache_features.parse_args(cache_flags(tiny_stage1_files, str(data), tmp_path)),
                              "train", None, ("vision", "text"), seed=0)
    bad = [listing.items[1]["vision"], listing.items[10]["vision"]]  # in shards 0 and 2
    originals = {}
    for path in bad:
        with open(path, "rb") as f:
            originals[path] = f.read()
    with open(bad[0], "wb") as f:
        f.write(originals[bad[0]][:len(originals[bad[0]]) // 2])  # truncated
    with open(bad[1], "w") as f:
        f.write("not an image\n")
    out = tmp_path / "c"
    flags = cache_flags(tiny_stage1_files, str(data), out, "--cache_views", "1", "--splits", "train",
                        "--active_modality_names", "vision", "text")
    assert cache_features.main(flags) == 2
    captured = capsys.readouterr()
    report = captured.out[captured.out.index("data: 2 bad sample(s) in train"):].splitlines()[1:3]
    assert [ln.split(": ")[0].strip() for ln in report] == sorted(bad), captured.out
    assert captured.err.strip().splitlines()[-1].startswith("error: 2 sample(s) of train (their shards were not "
                                                            "written; rerun once they are fixed)")
    train = out / "train"
    assert not (train / "meta.json").exists() and not list(train.glob(".tmp_*"))
    assert sorted(p.name for p in train.glob("shard_*")) == ["shard_00001", "shard_00003", "shard_00004"]

    for path, content in originals.items():  # fixed: the rerun writes the two missing shards only
        with open(path, "wb") as f:
            f.write(content)
    assert cache_features.main(flags) == 0
    assert_same_cache(cache, str(out), "train", modalities=("vision", "text"))
