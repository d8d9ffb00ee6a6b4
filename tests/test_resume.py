"""Issue 6, fault tolerance: a run killed at any moment and resumed with `--resume auto` ends with exactly the weights
of an uninterrupted run; SIGTERM/SIGUSR1 stop cleanly; failed writes keep the previous checkpoint; bad checkpoints
are refused in one line.

Real processes (python / torchrun, CPU, gloo), augmentation and nested dropout on, `--num_workers 2`. Each test
compares the final `model` state dict of checkpoint.pth with that of an uninterrupted run of the same flags,
bitwise (torch.equal per tensor): every random draw is a pure function of (seed, epoch, index) / (seed, step, rank)
or carried in the checkpoint, and the CPU kernels are deterministic for equal shapes and thread counts.

The kill moment is a seeded random choice (RESUME_TEST_SEED, printed on failure) among the mid-epoch steps after
the first step-level checkpoint, plus a random delay inside that step.
"""
import errno
import os
import random
import re
import signal
import time

import pytest
import torch

from conftest import (TINY_REGISTERS, Run, assert_same_model, load, main_in_process, read_log, run_to_end, running,
                      scalars, stage1_flags)

SEED = int(os.environ.get("RESUME_TEST_SEED", "0"))
EXIT_PREEMPTED = 75
SAVE_EVERY = 2
pytestmark = pytest.mark.slow  # every test here trains (killed, resumed) or needs a trained reference run


# ------------------------------------------------------------------------------------------------- helpers

def flags(files, data, out, modalities=None, extra=()):
    f = stage1_flags(files) + [
        "--datasets_dir", data, "--device", "cpu", "--output_dir", str(out), "--batch_size", "4", "--epochs", "2",
        *TINY_REGISTERS, "--save_every_steps", str(SAVE_EVERY), "--num_workers", "2", "--nested_dropout_rate", "0.5",
        "--print_freq", "1", "--lr", "2e-3", "--warmup_epochs", "1", "--seed", "3", "--resume", "auto"]
    if modalities:
        f += ["--active_modality_names", *modalities]
    return f + list(extra)


def assert_same_log(out, ref_out):
    """One line per epoch, none duplicated or dropped; the validation metrics of the resumed run are the reference's,
    and so are the epoch's training averages (the running sums travel in the mid-epoch checkpoint; under DDP they
    are restored as the rank average, which changes float rounding only)."""
    got, ref = read_log(out), read_log(ref_out)
    assert [ln["epoch"] for ln in got] == [ln["epoch"] for ln in ref] == [0, 1]
    for g, r in zip(got, ref):
        assert g["global_step"] == r["global_step"]
        assert {k: v for k, v in g.items() if k.startswith("val_")} == {k: v for k, v in r.items()
                                                                           if k.startswith("val_")}
        for k in ("train_loss", "train_contrastive", "train_comp_l2", "train_logit_scale"):
            assert g[k] == pytest.approx(r[k], rel=1e-6, abs=1e-7), k


def assert_same_tensorboard(out, ref_out):
    """Every train/val step appears exactly once, as in the uninterrupted run, with the same loss values."""
    got, ref = scalars(out), scalars(ref_out)
    for tag in ("train/loss", "train/lr", "train/nested_dropout_rate", "val/mean_r1"):
        steps = [s for s, _ in got[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
        assert steps == [s for s, _ in ref[tag]], f"{tag}: steps {steps} != {[s for s, _ in ref[tag]]}"
        assert [v for _, v in got[tag]] == [v for _, v in ref[tag]], tag


def pick_kill_point(rng, steps_per_epoch):
    """A mid-epoch step after the epoch's first step-level checkpoint, not the epoch's last step."""
    epoch = rng.choice([0, 1])
    step = rng.randint(SAVE_EVERY + 1, steps_per_epoch - 2)
    return epoch, step


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def reference(tiny_stage1_files, short_tvl, tmp_path_factory):
    """Uninterrupted one-process run, all three modalities."""
    out = tmp_path_factory.mktemp("ref1")
    r = run_to_end(flags(tiny_stage1_files, short_tvl, out), out)
    _, n = r.steps_done()
    return str(out), n


@pytest.fixture(scope="module")
def reference_ddp(tiny_stage1_files, short_tvl, tmp_path_factory):
    """Uninterrupted torchrun --nproc_per_node=2 run (vision + tactile, attention dropout on: per-rank RNG)."""
    out = tmp_path_factory.mktemp("ref2")
    r = run_to_end(flags(tiny_stage1_files, short_tvl, out, DDP_MODALITIES, DDP_EXTRA), out, nproc=2)
    _, n = r.steps_done()
    return str(out), n


DDP_MODALITIES = ("vision", "tactile")
DDP_EXTRA = ("--save_every_steps", "1", "--attn_dropout", "0.1")


# ------------------------------------------------------------------------------------------------- tests

def test_sigkill_mid_epoch_then_resume_auto_is_bitwise_equal(tiny_stage1_files, short_tvl, reference, tmp_path):
    ref_out, n = reference
    rng = random.Random(SEED)
    epoch, step = pick_kill_point(rng, n)
    delay = rng.uniform(0.0, 0.3)
    context = f"RESUME_TEST_SEED={SEED}: SIGKILL after epoch {epoch} step {step}/{n} + {delay:.2f}s"
    argv = flags(tiny_stage1_files, short_tvl, tmp_path)

    r = Run(argv, tmp_path)
    r.wait_for_step(epoch, step)
    time.sleep(delay)
    pids = r.kill()  # the process and its loader workers
    assert not running(pids), context
    ck = load(tmp_path / "checkpoint.pth")  # the killed run left a loadable step-level checkpoint
    assert ck["epoch"] == epoch and 0 < ck["next_step"] < n, context
    assert ck["next_step"] % SAVE_EVERY == 0, context
    assert not os.path.isfile(tmp_path / "log.txt") or [ln["epoch"] for ln in read_log(tmp_path)] == \
        list(range(epoch)), context

    r2 = run_to_end(argv, tmp_path)
    assert f"epoch {epoch}, step {ck['next_step']}" in r2.stdout(), context + "\n" + r2.tail()
    assert_same_model(tmp_path, ref_out, context)
    assert_same_log(tmp_path, ref_out)
    assert_same_tensorboard(tmp_path, ref_out)


def test_sigterm_stops_within_a_step_with_exit_75_then_resumes_bitwise(tiny_stage1_files, short_tvl, reference,
                                                                         tmp_path):
    ref_out, n = reference
    rng = random.Random(SEED + 1)
    epoch, step = pick_kill_point(rng, n)
    context = f"RESUME_TEST_SEED={SEED}: SIGTERM after epoch {epoch} step {step}/{n}"
    argv = flags(tiny_stage1_files, short_tvl, tmp_path)

    r = Run(argv, tmp_path)
    (e, s), _ = r.wait_for_step(epoch, step)
    t0 = time.time()
    r.signal(signal.SIGTERM)  # the group, as a scheduler does: DataLoader workers get it too
    rc = r.wait(timeout=120)
    elapsed = time.time() - t0
    assert rc == EXIT_PREEMPTED, context + "\n" + r.tail()
    err = r.stderr()
    assert "SIGTERM" in err and "--resume auto" in err and str(tmp_path / "checkpoint.pth") in err, err
    ck = load(tmp_path / "checkpoint.pth")
    # Within one step: the checkpoint is at the step that was running when the signal came (or the one after, if
    # the signal landed between that step's log line and its stop check).
    assert ck["epoch"] == e and ck["next_step"] in (s, s + 1), (context, e, s, ck["epoch"], ck["next_step"])
    assert not os.listdir(tmp_path) or not any(".tmp" in f for f in os.listdir(tmp_path))
    print(f"{context}: exited {elapsed:.1f}s after the signal at step {ck['next_step']}")

    r2 = run_to_end(argv, tmp_path)
    assert f"epoch {e}, step {ck['next_step']}" in r2.stdout(), r2.tail()
    assert_same_model(tmp_path, ref_out, context)
    assert_same_log(tmp_path, ref_out)


def test_torchrun_two_processes_sigkill_then_resume_is_bitwise_equal(tiny_stage1_files, short_tvl, reference_ddp,
                                                                       tmp_path):
    ref_out, n = reference_ddp
    rng = random.Random(SEED + 2)
    epoch = rng.choice([0, 1])
    step = rng.randint(2, n - 2)  # after the epoch's first step-level checkpoint (--save_every_steps 1)
    delay = rng.uniform(0.0, 0.3)
    context = f"RESUME_TEST_SEED={SEED}: torchrun x2 SIGKILL after epoch {epoch} step {step}/{n} + {delay:.2f}s"
    argv = flags(tiny_stage1_files, short_tvl, tmp_path, DDP_MODALITIES, DDP_EXTRA)

    r = Run(argv, tmp_path, nproc=2)
    r.wait_for_step(epoch, step)
    time.sleep(delay)
    # torchrun, both ranks (each in its own session) and their loader workers at once: a dead node. None of them may
    # still be writing into the output_dir when the resumed run starts.
    pids = r.kill()
    assert len(pids) >= 3 and not running(pids), (context, pids, running(pids, timeout=0))
    ck = load(tmp_path / "checkpoint.pth")
    assert ck["epoch"] == epoch and 0 < ck["next_step"] < n, context
    assert len(ck["rng_ranks"]) == 2

    run_to_end(argv, tmp_path, nproc=2)
    assert_same_model(tmp_path, ref_out, context)
    assert_same_log(tmp_path, ref_out)


# ------------------------------------------------------------------------------ write failure, bad input

def run_in_process(argv, capsys):
    """main_in_process, and what it printed."""
    code = main_in_process(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_failed_checkpoint_write_keeps_previous_checkpoint_and_reports(tiny_stage1_files, short_tvl, tmp_path,
                                                                       monkeypatch, capsys):
    real_save = torch.save
    saved = []

    def flaky_save(obj, f, *a, **kw):
        if len(saved) == 2:  # the third checkpoint write: some bytes, then the disk is full
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append({k: v.clone() for k, v in obj["model"].items()})
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    argv = flags(tiny_stage1_files, short_tvl, tmp_path, ("vision", "tactile"),
                 ("--num_workers", "0", "--save_every_steps", "1", "--epochs", "1"))
    code, out, err = run_in_process(argv, capsys)
    target = str(tmp_path / "checkpoint.pth")
    assert code == 2, (code, err)  # a full disk ends the run as bad input does (issue 23)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"error: {target}: no space left on its disk for the checkpoint: [\d,]+ bytes needed, "
                        r"[\d,]+ bytes free; the checkpoints already there are intact: free space, then continue "
                        r"with --resume auto", lines[0]), lines[0]
    ck = load(target)  # the previous checkpoint is intact and loadable
    assert ck["next_step"] == 2
    assert all(torch.equal(ck["model"][k], v) for k, v in saved[-1].items())
    assert not any(".tmp" in f for f in os.listdir(tmp_path)), os.listdir(tmp_path)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "stage1", "shape"])
def test_bad_checkpoint_at_resume_is_refused_in_one_line(kind, tiny_stage1_files, short_tvl, reference, tmp_path,
                                                         capsys):
    ref_out, _ = reference
    path = str(tmp_path / "bad.pth")
    if kind == "truncated":
        with open(os.path.join(ref_out, "checkpoint.pth"), "rb") as f:
            head = f.read(100)
        with open(path, "wb") as f:
            f.write(head)
    elif kind == "foreign":
        torch.save({"foo": 1}, path)
    elif kind == "stage1":
        path = tiny_stage1_files[0]  # a TVL Stage 1 encoder checkpoint is not a Stage 2 resume point
    else:
        path = os.path.join(ref_out, "checkpoint.pth")  # a width-32 register module, resumed at width 16
    argv = flags(tiny_stage1_files, short_tvl, tmp_path / "out", ("vision", "tactile"), ("--num_workers", "0"))
    if kind == "shape":
        argv[argv.index("--register_width") + 1] = "16"
    argv[argv.index("--resume") + 1] = path
    code, out, err = run_in_process(argv, capsys)
    assert code == 2, (code, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and f"{path}: " in lines[0], lines[0]
    if kind == "shape":
        # (K_o, D) under the default separate pathway, (K, D) under a shared one: the width is what differs
        assert "model shape does not match the flags" in lines[0] and re.search(
            r"register_tokens: \((\d), 32\) vs \(\1, 16\)", lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pth")
