"""Evaluation the way TVL reports it: --eval_only on the test split with Stage 1 beside Stage 2, from the checkpoint
alone (its stored args) as from every flag, the same numbers under torchrun, and the embedding API's .npz against the
model's own forward pass."""
import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from conftest import MAIN, ROOT, TINY_REGISTERS, launch_command, main_in_process, read_log, stage1_flags

pytestmark = pytest.mark.slow


def run(argv, nproc=1, script=MAIN):
    cmd, env = launch_command(script, nproc)
    proc = subprocess.run(cmd + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_in_process(argv, code=0):
    """The trainer's main(argv) in this process (what one python process runs, without its start-up); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        got = main_in_process(argv)
    assert got == code, out.getvalue()[-3000:]
    return out.getvalue()


def train(tiny_stage1_files, data, out, *extra):
    """One epoch in this process; returns (its output_dir, the flags of that run's data, Stage 1 and model)."""
    flags = stage1_flags(tiny_stage1_files) + ["--datasets_dir", data, "--device", "cpu", "--batch_size", "8",
                                               *TINY_REGISTERS, "--num_workers", "0", *extra]
    run_in_process(flags + ["--output_dir", str(out), "--epochs", "1", "--warmup_epochs", "1", "--lr", "1e-3"])
    return str(out), flags


@pytest.fixture(scope="module")
def trained(tiny_stage1_files, synthetic_tvl, tmp_path_factory):
    """The default objective on the synthetic data."""
    return train(tiny_stage1_files, synthetic_tvl, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def trained_mission(tiny_stage1_files, short_tvl, tmp_path_factory):
    """--objective mission (shared pathway, nested dropout: another model than the default preset builds)."""
    return train(tiny_stage1_files, short_tvl, tmp_path_factory.mktemp("mission"), "--objective", "mission")


def eval_only(trained, out, split="test", nproc=1, every_flag=True):
    """--eval_only of the run's checkpoint.pth into `out`, given the run's flags, or (every_flag=False) only
    --resume and --output_dir; -> (eval_<split>.json, stdout)."""
    trained, flags = trained
    argv = (flags if every_flag else []) + ["--eval_only", "--resume", os.path.join(trained, "checkpoint.pth"),
                                            "--output_dir", str(out)] + (["--eval_split", split] if split else [])
    stdout = run_in_process(argv) if nproc == 1 else run(argv, nproc).stdout
    with open(os.path.join(out, f"eval_{split or 'val'}.json")) as f:
        return json.load(f), stdout


def eval_test(trained, out, nproc=1):
    return eval_only(trained, out, "test", nproc)


def stage1_reference(trained, tiny_stage1):
    """Stage 1's metrics on the test split computed here: FrozenStage1 called on the dataset's items directly."""
    from data_stage2 import build_dataset
    from engine_stage2 import retrieval_metrics
    with open(os.path.join(trained, "args.json")) as f:
        args = argparse.Namespace(**json.load(f))
    ds = build_dataset(args, "test", tiny_stage1.tokenizer, args.active_modality_names, args.seed)
    batch = default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        glob = tiny_stage1(batch)["global"]
    metrics, _ = retrieval_metrics({m: F.normalize(g.float(), dim=-1) for m, g in glob.items()}, glob["text"])
    return metrics, len(ds)


def test_eval_only_on_test_writes_stage2_and_a_stage1_baseline_equal_to_frozen_stage1(trained, tiny_stage1,
                                                                                      tmp_path):
    report, stdout = eval_test(trained, tmp_path / "eval1")
    expected, n = stage1_reference(trained[0], tiny_stage1)
    assert report["split"] == "test" and report["n"] == n and report["captions"] == "random"
    assert set(report["stage1"]) == set(expected)
    for k, v in expected.items():
        assert report["stage1"][k] == pytest.approx(v, abs=1e-4), k
    for k in ("touch_vision_acc", "touch_language_acc@0.6356", "touch_language_acc@0.8590",
              "touch_language_acc@0.8930", "touch_language_acc@0.9210", "mean_r1", "tactile_vision_prefix1_r1"):
        assert 0.0 <= report["stage2"][k] <= 100.0, k
    assert "stage1" in stdout and "touch_vision_acc" in stdout  # the side-by-side table
    assert not any(f.endswith(".pth") for f in os.listdir(tmp_path / "eval1"))


@pytest.mark.parametrize("fixture", ["trained", "trained_mission"])
def test_the_checkpoint_alone_evaluates_as_every_flag_and_as_the_training_did(fixture, request, tmp_path):
    """--eval_only --resume PATH --output_dir D: the Stage 1 files, objective, register shape and data recipe come from
    the checkpoint's args. The report equals the one given every flag of the run, and its numbers those the training
    logged at its end on the same split (the checkpoint's weights: val, and Stage 1's baseline)."""
    trained = request.getfixturevalue(fixture)
    alone, _ = eval_only(trained, tmp_path / "alone", split=None, every_flag=False)
    every, _ = eval_only(trained, tmp_path / "every", split="val")
    assert alone == every
    log = read_log(trained[0])
    assert alone["split"] == "val" and alone["checkpoint"] == os.path.join(trained[0], "checkpoint.pth")
    assert alone["stage2"] == {k: log[-1][f"val_{k}"] for k in alone["stage2"]}
    assert alone["stage1"] == log[0]["baseline_stage1"]
    # --resume auto finds --output_dir's checkpoint.pth, and reads its args the same way
    shutil.copy(os.path.join(trained[0], "checkpoint.pth"), tmp_path / "checkpoint.pth")
    run_in_process(["--eval_only", "--resume", "auto", "--output_dir", str(tmp_path)])
    with open(tmp_path / "eval_val.json") as f:
        assert json.load(f) == {**alone, "checkpoint": str(tmp_path / "checkpoint.pth")}


def test_torchrun_two_processes_give_the_one_process_numbers(trained, tmp_path):
    """The one-process evaluation given every flag; the torchrun one from the checkpoint alone."""
    one, _ = eval_test(trained, tmp_path / "one")
    two, _ = eval_only(trained, tmp_path / "two", "test", nproc=2, every_flag=False)
    assert one["n"] == two["n"]
    for part in ("stage2", "stage1"):
        assert set(one[part]) == set(two[part])
        for k, v in one[part].items():
            assert two[part][k] == pytest.approx(v, abs=1e-3), (part, k)


@pytest.mark.parametrize("flag, value, stored", [
    ("--num_register_tokens", "8", "4"),
    ("--stage1_checkpoint", "other_stage1.pth", None),  # None: the run's, a path
    ("--objective", "mission", "tokens"),  # the default preset's own name, given: detected though it is no default
])
def test_a_flag_that_contradicts_the_checkpoint_is_refused_naming_both_values(flag, value, stored, trained, tmp_path,
                                                                             capsys):
    ckpt = os.path.join(trained[0], "checkpoint.pth")
    stored = stored or dict(zip(trained[1], trained[1][1:]))[flag]
    run_in_process(["--eval_only", "--resume", ckpt, "--output_dir", str(tmp_path), flag, value], code=2)
    assert capsys.readouterr().err.splitlines() == [
        f"error: {flag} {value}: the checkpoint {ckpt} was trained with {stored}; --eval_only takes the Stage 1, "
        f"model and data flags from it: drop the flag"]
    assert os.listdir(tmp_path) == [".lock"]  # refused right after taking the folder, before anything is written


def test_embedding_npz_equals_the_models_forward_on_the_same_samples(trained, tmp_path):
    from embed_stage2 import embed, load_stage2, main
    from data_stage2 import build_dataset
    out = tmp_path / "test.npz"
    ckpt = os.path.join(trained[0], "checkpoint.pth")
    assert main(["--checkpoint", ckpt, "--split", "test", "--k", "2", "--output", str(out), "--device", "cpu"]) == 0
    npz = np.load(out)
    model, args = load_stage2(ckpt)
    ds = build_dataset(args, "test", model.stage1.tokenizer, args.active_modality_names, args.seed)
    assert list(npz["sample_ids"]) == ds.sample_ids and list(npz["index"]) == list(range(len(ds)))
    batch = default_collate([ds[i] for i in range(len(ds))])
    ref = embed(model, batch, k=2)
    for m in args.active_modality_names:
        assert np.allclose(npz[m], ref["embedding"][m].numpy(), atol=1e-5), m
        assert np.allclose(npz[f"{m}_registers"], ref["registers"][m].numpy(), atol=1e-5), m
        # the prefix embedding: the normalised mean of the first k = 2 register tokens
        first2 = F.normalize(torch.from_numpy(npz[f"{m}_registers"])[:, :2].mean(1), dim=-1).numpy()
        assert np.allclose(npz[m], first2, atol=1e-6)
