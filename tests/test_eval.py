"""Evaluation the way TVL reports it: --eval_only on the test split with Stage 1 beside Stage 2, the same numbers
under torchrun, and the embedding API's .npz against the model's own forward pass."""
import argparse
import contextlib
import io
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from conftest import MAIN, ROOT, TINY_REGISTERS, launch_command, main_in_process, stage1_flags

pytestmark = pytest.mark.slow


def run(argv, nproc=1, script=MAIN):
    cmd, env = launch_command(script, nproc)
    proc = subprocess.run(cmd + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_in_process(argv):
    """The trainer's main(argv) in this process (what one python process runs, without its start-up); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main_in_process(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def trained(tiny_stage1_files, synthetic_tvl, tmp_path_factory):
    """One epoch on the synthetic data; returns (its output_dir, the flags of that run's data, Stage 1 and model)."""
    out = tmp_path_factory.mktemp("trained")
    flags = stage1_flags(tiny_stage1_files) + ["--datasets_dir", synthetic_tvl, "--device", "cpu", "--batch_size",
                                               "8", *TINY_REGISTERS, "--num_workers", "0"]
    run_in_process(flags + ["--output_dir", str(out), "--epochs", "1", "--warmup_epochs", "1", "--lr", "1e-3"])
    return str(out), flags


def eval_test(trained, out, nproc=1):
    trained, flags = trained
    argv = flags + ["--eval_only", "--resume", os.path.join(trained, "checkpoint.pth"), "--eval_split", "test",
                    "--output_dir", str(out)]
    stdout = run_in_process(argv) if nproc == 1 else run(argv, nproc).stdout
    with open(os.path.join(out, "eval_test.json")) as f:
        return json.load(f), stdout


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


def test_torchrun_two_processes_give_the_one_process_numbers(trained, tmp_path):
    one, _ = eval_test(trained, tmp_path / "one")
    two, _ = eval_test(trained, tmp_path / "two", nproc=2)
    assert one["n"] == two["n"]
    for part in ("stage2", "stage1"):
        assert set(one[part]) == set(two[part])
        for k, v in one[part].items():
            assert two[part][k] == pytest.approx(v, abs=1e-3), (part, k)


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
