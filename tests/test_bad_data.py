"""A bad file in a real dataset never hangs a run: every process ends (exit 2, one line naming the file), --check_data
lists every bad file in one report, and --max_bad_samples skips a budget of them, still resuming bitwise.

Real processes (python / torchrun --nproc_per_node=2, CPU, gloo) with `--num_workers 2`: the loader workers ignore
SIGTERM (so a scheduler's group-wide signal does not kill them mid-batch), which is what once left a failed run
hanging at exit. "No process left" is checked by command line (every process of a run, loader workers and torchrun's
ranks included, carries the test's unique output folder in its arguments), since torchrun starts its ranks in
sessions of their own.
"""
import argparse
import os
import re
import shutil
import signal
import time

import pytest
from torch.utils.data import DistributedSampler

import data_stage2 as D
from conftest import TINY_REGISTERS, Run, assert_same_model, load, read_log, run_to_end, scalars, stage1_flags

pytestmark = pytest.mark.slow
VT = ("vision", "tactile")
EXIT_BAD_INPUT, EXIT_PREEMPTED = 2, 75


# ------------------------------------------------------------------------------------------------- helpers

@pytest.fixture
def data(tmp_path, tmp_path_factory):
    """A private copy of a small TVL dataset (the tests damage files): 34 train samples, 8 steps/epoch at batch 4."""
    src = tmp_path_factory.getbasetemp() / "bad_data_src"
    if not src.exists():
        from tools.make_synthetic_tvl import make_synthetic_tvl
        make_synthetic_tvl(str(src), n_ssvtp=24, n_hct=24, seed=1)
    shutil.copytree(src, tmp_path / "data")
    return str(tmp_path / "data")


def listing(data, split):
    """The dataset a run of run_flags reads (its items in the run's index order)."""
    args = D.add_data_args(argparse.ArgumentParser()).parse_args(["--datasets_dir", data])
    return D.build_dataset(args, split, None, VT, seed=0)


def item(data, split, i, modality="vision"):
    """Path of the `modality` image of sample i of a split."""
    return listing(data, split).items[i][modality]


def trained_every_epoch(data, epochs=2, batch_size=4, seed=3):
    """Train indices that a one-process run of run_flags trains on in every epoch (the sampler's shuffled order; the
    last partial batch is dropped, so a few samples sit out each epoch)."""
    sampler = DistributedSampler(range(len(listing(data, "train"))), num_replicas=1, rank=0, shuffle=True, seed=seed,
                                 drop_last=True)
    used = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        used.append(set(order[:len(order) // batch_size * batch_size]))
    return sorted(set.intersection(*used))


def truncate(path):
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[: len(head) // 2])


def not_an_image(path):
    with open(path, "w") as f:
        f.write("this is a caption, not a picture\n" * 20)


DAMAGE = {"truncated": truncate, "missing": os.remove, "not_an_image": not_an_image}


def alive(tag):
    """Pids of live processes whose command line contains `tag` (zombies excluded)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in cmd and state != "Z":
            pids.append(int(pid))
    return pids


def assert_no_process_left(tag):
    left = alive(tag)
    for pid in left:  # do not leave them to the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the run still alive: {left}"


def wait_ended(r, first_line, limit):
    """Waits until the run prints `first_line` on stderr, then at most `limit` seconds for it to end.
    Returns the seconds from that line to the end."""
    t0 = time.time()
    while first_line not in r.stderr():
        if r.proc.poll() is not None or time.time() - t0 > 600:
            break
        time.sleep(0.05)
    t1 = time.time()
    r.wait(timeout=limit)
    return time.time() - t1


def error_lines(err):
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def run_flags(files, data, out, extra=()):
    return stage1_flags(files) + [
        "--datasets_dir", data, "--device", "cpu", "--output_dir", str(out), "--batch_size", "4", "--epochs", "2",
        *TINY_REGISTERS, "--save_every_steps", "2", "--num_workers", "2", "--print_freq", "1", "--lr", "2e-3",
        "--warmup_epochs", "1", "--seed", "3", "--resume", "auto", "--active_modality_names", *VT, *extra]


# ------------------------------------------------------------------------------------- 1. every process ends

@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("kind", ["truncated", "missing", "not_an_image"])
def test_a_bad_training_file_ends_every_process_with_exit_2(kind, nproc, tiny_stage1_files, data, tmp_path):
    bad = item(data, "train", 5)
    DAMAGE[kind](bad)
    out = tmp_path / "out"
    r = Run(run_flags(tiny_stage1_files, data, out), out, nproc)
    seconds = wait_ended(r, f"error: {bad}: ", limit=60)
    err = r.stderr()
    assert_no_process_left(str(out))
    print(f"{kind}, {nproc} process(es): ended {seconds:.1f}s after the error line")
    lines = error_lines(err)
    reason = "file does not exist" if kind == "missing" else "cannot decode image"
    # the rank that read the file names it and why (with 2 ranks the other rank's line may come first)
    assert any(ln.startswith(f"error: {bad}: ") and reason in ln for ln in lines), r.tail()
    if nproc == 1:
        assert r.proc.returncode == EXIT_BAD_INPUT and len(lines) == 1, r.tail()
        assert "Traceback" not in err, err
    else:
        # Each rank ends with exit code 2 and one line naming the file; torchrun then reports its children's exit
        # codes (its own exit status is 1, with its own ChildFailedError traceback, for any failed child).
        assert len(lines) == 2 and all(bad in ln for ln in lines), r.tail()
        assert set(re.findall(r"exitcode\s*: (-?\d+)", err)) == {str(EXIT_BAD_INPUT)}, err
        assert "main_train_stage2.py\", line" not in err and "data_stage2.py\", line" not in err, err


# ------------------------------------------------------------------------------ 2. preemption still works

def test_sigterm_to_the_group_still_stops_with_75_and_a_checkpoint(tiny_stage1_files, data, tmp_path):
    out = tmp_path / "out"
    r = Run(run_flags(tiny_stage1_files, data, out), out)
    r.wait_for_step(0, 3)
    r.signal(signal.SIGTERM)  # the whole group, loader workers included (they ignore it; the main process saves)
    assert r.wait(timeout=120) == EXIT_PREEMPTED, r.tail()
    assert_no_process_left(str(out))
    ck = load(out / "checkpoint.pth")
    assert ck["epoch"] == 0 and ck["next_step"] >= 3 and ck["bad_samples"] == []
    assert "Traceback" not in r.stderr()


# ---------------------------------------------------------------------------------------- 3. --check_data

def test_check_data_lists_three_bad_files_across_two_ranks_then_a_clean_dataset_passes(tiny_stage1_files, data,
                                                                                      tmp_path):
    files = [item(data, "train", 0), item(data, "train", 7, "tactile"), item(data, "val", 1)]
    clean = tmp_path / "clean"
    shutil.copytree(data, clean)
    truncate(files[0])
    os.remove(files[1])
    not_an_image(files[2])
    out = tmp_path / "out"
    r = Run(run_flags(tiny_stage1_files, data, out, ("--check_data",)), out, nproc=2)
    r.wait(timeout=300)
    assert_no_process_left(str(out))
    stdout = r.stdout()
    report = stdout[stdout.index("data: 3 bad sample(s) in train, val:"):].splitlines()[1:4]
    assert [ln.split(": ")[0].strip() for ln in report] == sorted(files), stdout
    assert "cannot decode image" in report[sorted(files).index(files[0])]
    assert "file does not exist" in report[sorted(files).index(files[1])]
    assert "cannot identify image file" in report[sorted(files).index(files[2])]
    lines = error_lines(r.stderr())
    assert len(lines) == 2 and all("3 sample(s) of train, val have missing or unreadable files" in ln
                                   for ln in lines), r.tail()
    assert re.search(r"exitcode\s*: 2", r.stderr()), r.tail()
    assert not os.path.exists(out / "checkpoint.pth")

    out = tmp_path / "out_clean"
    r = Run(run_flags(tiny_stage1_files, str(clean), out, ("--check_data", "--num_workers", "2")), out)
    assert r.wait(timeout=300) == 0, r.tail()
    assert "data: check: all 38 samples of train, val read fine" in r.stdout(), r.tail()
    assert_no_process_left(str(out))


# ----------------------------------------------------------------------------------- 4. --max_bad_samples

def test_max_bad_samples_trains_through_one_bad_file_and_resumes_bitwise(tiny_stage1_files, data, tmp_path):
    bad = item(data, "train", trained_every_epoch(data)[0])
    truncate(bad)
    argv = lambda out: run_flags(tiny_stage1_files, data, out, ("--max_bad_samples", "2"))  # noqa: E731
    ref = tmp_path / "ref"
    r = run_to_end(argv(ref), ref)
    assert r.stdout().count(bad) == 1, r.stdout()  # named once, although every epoch meets it
    assert f"WARNING skipped bad sample 1 of at most 2 (--max_bad_samples): {bad}: cannot decode" in r.stdout()
    assert [ln["train_bad_samples"] for ln in read_log(ref)] == [1, 1]
    assert [v for _, v in scalars(ref)["train/bad_samples"]] == [1.0, 1.0]
    assert load(ref / "checkpoint.pth")["bad_samples"][0].startswith(f"{bad}: cannot decode image")

    out = tmp_path / "killed"
    r = Run(argv(out), out)
    r.wait_for_step(1, 5)
    r.signal(signal.SIGKILL)
    r.wait()
    assert load(out / "checkpoint.pth")["epoch"] == 1
    run_to_end(argv(out), out)
    assert_same_model(str(out), str(ref), "--max_bad_samples 2, SIGKILL at epoch 1 step 5")
    assert [ln["train_bad_samples"] for ln in read_log(out)] == [1, 1]


def test_more_bad_samples_than_allowed_stop_cleanly_naming_them(tiny_stage1_files, data, tmp_path):
    files = [item(data, "train", 2), item(data, "train", 9, "tactile"), item(data, "train", 20)]
    truncate(files[0])
    not_an_image(files[1])
    os.remove(files[2])  # found while listing: counted from the start
    out = tmp_path / "out"
    r = Run(run_flags(tiny_stage1_files, data, out, ("--max_bad_samples", "2")), out)
    assert r.wait(timeout=300) == EXIT_BAD_INPUT, r.tail()
    assert_no_process_left(str(out))
    err = r.stderr()
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: 3 bad samples, more than --max_bad_samples 2: ")
    assert all(f in lines[0] for f in files), lines[0]
