"""Issue 18: at TVL scale nothing is lost and nothing is silently wrong. One run per output folder (a second launch
exits 2 naming the holder; kill -9 leaves no stale lock), a full disk while caching is an error and not a SIGBUS (the
rerun completes the cache), a damaged cache is named at open and by --verify and repaired, a caption that is not
UTF-8 is a bad file, a non-finite loss names the samples of its batch.

Real processes (python / torchrun --nproc_per_node=2, CPU, gloo) with `--num_workers 2` for every failure path.
The disk-full test mounts small tmpfs file systems (root only; skipped, saying why, where mount fails).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import torch

import cache_features
import feature_cache as FC
import util.checkpoint as C
from conftest import (ROOT, TINY_REGISTERS, Run, assert_same_model, descendants, load, main_in_process, read_log,
                      stage1_flags)
from test_feature_cache import assert_same_cache

pytestmark = pytest.mark.slow  # every test launches processes or caches features
CACHE = os.path.join(ROOT, "cache_features.py")
VT = ["--active_modality_names", "vision", "text"]  # no tactile ViT: half the encoder cost


# ------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def small_tvl(tmp_path_factory):
    """14 SSVTP + 14 HCT samples: 19 train / 4 val."""
    from tools.make_synthetic_tvl import make_synthetic_tvl
    out = str(tmp_path_factory.mktemp("small_tvl"))
    make_synthetic_tvl(out, n_ssvtp=14, n_hct=14, seed=0)
    return out


def cache_flags(files, data, out, *extra, workers=2):
    """A cache of vision + text, 4 samples per shard: train (view 0 + one augmented view, 5 shards) and val."""
    return stage1_flags(files) + ["--datasets_dir", data, "--output", str(out), "--device", "cpu",
                                  "--num_workers", str(workers), "--shard_size", "4", "--batch_size", "3",
                                  "--cache_views", "1", "--splits", "train", "val", *VT, *extra]


@pytest.fixture(scope="module")
def ref_cache(tiny_stage1_files, small_tvl, tmp_path_factory):
    """The cache written in one go, in this process; the tests damage copies of it."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    assert cache_features.main(cache_flags(tiny_stage1_files, small_tvl, out, workers=0)) == 0
    return str(out)


def train_flags(files, data, out, *extra):
    return stage1_flags(files) + [
        "--datasets_dir", data, "--device", "cpu", "--output_dir", str(out), "--batch_size", "4", "--epochs", "1",
        *TINY_REGISTERS, "--num_workers", "2", "--print_freq", "1", "--lr", "2e-3", "--warmup_epochs", "0",
        "--seed", "3", "--resume", "auto", *extra]


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def one_error_line(r, nproc=1):
    """The run's error line (each rank prints the same one under torchrun); no traceback of our code."""
    err = r.stderr()
    lines = error_lines(err)
    assert lines and len(set(lines)) == 1 and len(lines) == nproc, r.tail()
    assert not re.search(r"(main_train_stage2|cache_features|feature_cache|data_stage2)\.py\", line", err), err
    return lines[0]


def folder_state(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.stat(os.path.join(d, f)).st_size,
                                                          os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, fs in os.walk(folder) for f in fs}


# ----------------------------------------------------------------------------- 1. one run per output folder

@pytest.mark.parametrize("order", ["together", "torchrun_first"])
def test_two_launches_into_one_folder_one_runs_the_other_exits_2_naming_it(order, tiny_stage1_files, small_tvl,
                                                                           tmp_path):
    """torchrun x2 and a single process launched into one --output_dir, together (either may win) or torchrun first
    (its rank 0 holds the lock): exactly one runs to the end, the other exits 2 at once naming the folder and the
    holder; the survivor's checkpoint and log equal a run made alone."""
    out = tmp_path / "out"
    argv = train_flags(tiny_stage1_files, small_tvl, out, *VT)
    runs = {2: Run(argv, tmp_path / "logs2", nproc=2)}
    if order == "torchrun_first":  # paused (SIGSTOP) once it lists its data, so that it still runs when the other starts
        runs[2].wait_for("data:")
        holder, torchrun_pids = 2, pause(runs[2])
    runs[1] = Run(argv, tmp_path / "logs1", nproc=1)
    if order == "together":
        # Whichever took the lock (it lists its data only then), paused the same way: on a busy machine one launch
        # could otherwise finish its whole run before the other has even started, and neither would meet a held folder.
        holder = lock_holder(runs)
        paused = pause(runs[holder]) if holder else []
    else:
        paused = torchrun_pids
    if paused:
        try:
            runs[3 - holder].wait(timeout=120)
        finally:
            for p in paused:
                os.kill(p, signal.SIGCONT)
    t0 = time.time()
    ended = {}
    while len(ended) < 2 and time.time() - t0 < 400:
        for n, r in runs.items():
            if n not in ended and r.proc.poll() is not None:
                ended[n] = (r.proc.returncode, time.time() - t0)
        time.sleep(0.05)
    winner = next((n for n, (rc, _) in ended.items() if rc == 0), None)
    assert winner is not None and len(ended) == 2, {n: r.tail() for n, r in runs.items()}
    loser = 3 - winner
    # a single process exits 2; torchrun exits 1 for a failed child, whose own exit code it reports
    assert ended[loser][0] == (2 if loser == 1 else 1), runs[loser].tail()
    if loser == 2:
        assert set(re.findall(r"exitcode\s*: (-?\d+)", runs[2].stderr())) == {"2"}, runs[2].tail()
    line = one_error_line(runs[loser], loser)
    with open(out / ".lock") as f:
        holder = f.read().strip()
    host, pid = re.fullmatch(r"host (\S+) pid (\d+)", holder).groups()
    assert host == socket.gethostname()
    if winner == 1:
        assert int(pid) == runs[1].proc.pid
    if order == "torchrun_first":
        assert winner == 2 and int(pid) in torchrun_pids and int(pid) != runs[2].proc.pid  # rank 0, not the agent
    assert line == (f"error: --output_dir {out}: in use by another run ({holder}, lock {out}/.lock); wait for it to "
                    f"end or choose another --output_dir"), line
    # at once: before building anything (no Stage 1 recipe, no data listed)
    assert not re.search(r"^(recipe|data):", runs[loser].stdout(), flags=re.M), runs[loser].tail()
    print(f"{order}: winner {winner} process(es); the loser ended after {ended[loser][1]:.1f}s, the winner after "
          f"{ended[winner][1]:.1f}s")

    alone = tmp_path / "alone"
    ref = Run([a if a != str(out) else str(alone) for a in argv], tmp_path / "logs_alone", nproc=winner)
    assert ref.wait() == 0, ref.tail()
    assert_same_model(str(out), str(alone), "survivor vs alone")
    assert [ln["epoch"] for ln in read_log(out)] == [0]
    assert {k: v for k, v in read_log(out)[0].items() if k.startswith("val_")} == \
        {k: v for k, v in read_log(alone)[0].items() if k.startswith("val_")}


def pause(run):
    """SIGSTOP to the run's launcher and every process below it; returns their pids (for the SIGCONT)."""
    pids = descendants(run.proc.pid)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    return pids


def lock_holder(runs, timeout=300):
    """The key of the run in `runs` that listed its data (so holds the folder's lock), once one has; None if all
    ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for n, r in runs.items():
            if re.search(r"^data:", r.stdout(), flags=re.M):
                return n
        if all(r.proc.poll() is not None for r in runs.values()):
            return None
        time.sleep(0.01)
    raise AssertionError(f"no run listed its data in {timeout}s\n" + "\n".join(r.tail() for r in runs.values()))


def test_kill_9_leaves_no_stale_lock(tiny_stage1_files, small_tvl, tmp_path):
    """kill -9 of the training process alone (its loader workers may linger a moment): --resume auto starts at once."""
    out = tmp_path / "out"
    argv = train_flags(tiny_stage1_files, small_tvl, out, "--epochs", "2", "--save_every_steps", "1",
                       "--active_modality_names", "vision", "tactile")
    r = Run(argv, out)
    r.wait_for_step(0, 2)
    workers = [p for p in descendants(r.proc.pid) if p != r.proc.pid]
    os.kill(r.proc.pid, 9)
    r.proc.wait()
    again = Run(argv, out)
    assert again.wait() == 0, again.tail()
    assert "resumed from" in again.stdout() and not error_lines(again.stderr()), again.tail()
    assert load(os.path.join(out, "checkpoint.pth"))["epoch"] == 1
    for p in workers:  # reparented away from us: do not leave them behind
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("entry", ["train_x2", "eval_only", "cache_features_x2"])
def test_a_held_folder_is_refused_by_each_entry_point_touching_nothing(entry, tiny_stage1_files, small_tvl,
                                                                      tmp_path):
    folder = tmp_path / "held"
    folder.mkdir()
    (folder / "log.txt").write_text('{"epoch": 0}\n')
    lock = C.FolderLock(str(folder), "--x")  # held by this test process
    before = folder_state(str(folder))
    try:
        if entry.startswith("cache"):
            r = Run(cache_flags(tiny_stage1_files, small_tvl, folder), tmp_path / "logs", nproc=2, script=CACHE)
            flag = "--output"
        else:
            extra = ["--eval_only"] if entry == "eval_only" else []
            r = Run(train_flags(tiny_stage1_files, small_tvl, folder, *extra), tmp_path / "logs",
                    nproc=2 if entry.endswith("x2") else 1)
            flag = "--output_dir"
        rc = r.wait(timeout=120)
    finally:
        lock.release()
    nproc = 2 if entry.endswith("x2") else 1
    assert rc == (1 if nproc == 2 else 2), r.tail()
    line = one_error_line(r, nproc)
    assert line == (f"error: {flag} {folder}: in use by another run (host {socket.gethostname()} pid {os.getpid()}, "
                    f"lock {folder}/.lock); wait for it to end or choose another {flag}"), line
    assert folder_state(str(folder)) == before


# ----------------------------------------------------------------------------------- 2. a full disk

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_kib, ro=False) mounts a tmpfs of that size at tmp_path/fs (again: remount, contents kept); unmounted
    after."""
    where = tmp_path / "fs"
    where.mkdir()
    mounted = []

    def mount(kib, ro=False):
        opts = f"size={kib}k" + (",remount" if mounted else "") + (",ro" if ro else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {p.stderr.strip()}")
        mounted.append(kib)
        return str(where)
    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def shard_bytes(root, k):
    """Bytes tmpfs allocates for shard k of a cache: each file rounded up to 4 KiB pages."""
    d = os.path.join(root, "train", FC.shard_name(k))
    return sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096 for f in os.listdir(d))


def test_full_disk_is_refused_up_front_or_an_error_and_the_rerun_completes(ref_cache, tiny_stage1_files, small_tvl,
                                                                           tmpfs):
    files = [f for d, _, fs in os.walk(os.path.join(ref_cache, "train")) for f in fs if "shard_" in d]
    data_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ref_cache, "train"))
                     for f in fs if "shard_" in d)
    fs = tmpfs(64)
    out = os.path.join(fs, "cache")
    argv = cache_flags(tiny_stage1_files, small_tvl, out)

    # up front: planned vs free, nothing written
    r = Run(argv, os.path.join(os.path.dirname(fs), "logs_refused"), script=CACHE)
    assert r.wait(timeout=120) == 2, r.tail()
    line = one_error_line(r)
    todo, free = (int(x.replace(",", "")) for x in re.search(r"not enough free space: ([\d,]+) bytes still to write, "
                                                             r"([\d,]+) bytes free", line).groups())
    assert free == shutil.disk_usage(fs).free  # (the folder's .lock file takes one page of the 64 KiB)
    # the plan covers every byte the cache's shards hold, and overestimates by at most a few headers per shard
    assert data_bytes <= todo <= data_bytes + 5 * (4096 + 128 * len(files) // 5), (todo, data_bytes)
    assert f"--output {out}/train: not enough free space" in line
    assert os.listdir(os.path.join(out, "train")) == []

    # mid-write, the check bypassed: room for .lock, plan.json, two shards and a half
    room = shard_bytes(ref_cache, 0) + shard_bytes(ref_cache, 1) + 2 * 4096 + shard_bytes(ref_cache, 2) // 2
    fs = tmpfs(room // 1024)
    r = Run(argv + ["--skip_space_check"], os.path.join(os.path.dirname(fs), "logs_full"), script=CACHE)
    rc = r.wait(timeout=120)
    assert rc == 2, r.tail()  # not -7 (SIGBUS) nor 135
    line = one_error_line(r)
    assert re.fullmatch(rf"error: {out}/train/\.tmp_shard_00002/\S+\.npy: No space left on device while writing the "
                        r"cache; the finished shards are kept: free space and rerun the same command to complete it",
                        line), line
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["plan.json", "shard_00000", "shard_00001"]
    kept = folder_state(os.path.join(out, "train", "shard_00000"))

    tmpfs(4096)  # space freed
    r = Run(argv + ["--skip_space_check"], os.path.join(os.path.dirname(fs), "logs_rerun"), script=CACHE)
    assert r.wait(timeout=300) == 0, r.tail()
    assert "wrote 3 shard(s), skipped 2 finished one(s)" in r.stdout()
    assert folder_state(os.path.join(out, "train", "shard_00000")) == kept
    assert_same_cache(ref_cache, out, "train", modalities=("vision", "text"))


def page_bytes(path):
    """Bytes tmpfs allocates for a file: its size rounded up to 4 KiB pages."""
    return -(-os.path.getsize(path) // 4096) * 4096


def checkpoints_line(stdout, out):
    """(bytes free, bytes per checkpoint, estimated?) of the start-up line about --output_dir's space."""
    free, size, est = re.search(rf"^checkpoints: {re.escape(str(out))}: ([\d,]+) bytes free, ([\d,]+) bytes per "
                                rf"checkpoint( \(estimate\))?$", stdout, flags=re.M).groups()
    return int(free.replace(",", "")), int(size.replace(",", "")), est is not None


def disk_full_line(path, need, free, also=""):
    return (f"error: {path}{also}: no space left on its disk for the checkpoint: {need:,} bytes needed, {free:,} bytes "
            f"free; the checkpoints already there are intact: free space, then continue with --resume auto")


def test_a_full_disk_at_checkpoint_time_ends_every_rank_in_one_line_and_resume_auto_continues(
        tiny_stage1_files, small_tvl, tmp_path, tmpfs):
    """torchrun x2, loader workers on, a checkpoint of each epoch kept (--save_every 1): the tmpfs holds epoch 0's three
    checkpoints (checkpoint.pth, -best, -0) but not epoch 1's new checkpoint-1.pth and checkpoint.pth's temp file.
    The run ends before writing any of them, and continues once the mount is bigger, as if never stopped."""
    argv = lambda out: train_flags(tiny_stage1_files, small_tvl, out, *VT, "--epochs", "2", "--save_every", "1",  # noqa
                                   "--log_dir", str(tmp_path / "tb"))  # TensorBoard off the tmpfs: only checkpoints grow
    ref = Run(argv(tmp_path / "ref"), tmp_path / "ref", nproc=2)
    assert ref.wait() == 0, ref.tail()
    one = page_bytes(tmp_path / "ref" / "checkpoint.pth")
    fs = tmpfs((9 * one // 2 + 16 * 1024) // 1024)  # 4.5 checkpoints, and pages for .lock, args.json and log.txt
    out = os.path.join(fs, "out")
    free_at_mount = shutil.disk_usage(fs).free

    r = Run(argv(out), tmp_path / "logs", nproc=2)
    assert r.wait(timeout=300) == 1, r.tail()  # torchrun exits 1 for a failed child; each rank exited 2
    assert set(re.findall(r"exitcode\s*: (-?\d+)", r.stderr())) == {"2"}, r.tail()
    # start-up: the free space (less .lock and args.json) and an estimate that covers a checkpoint, a little over
    free, size, estimated = checkpoints_line(r.stdout(), out)
    assert free == free_at_mount - 2 * 4096 and estimated and one <= size <= 1.15 * one, (free, size, one)
    log = read_log(tmp_path / "ref")
    also = (["checkpoint-best.pth"] if log[1]["val_mean_r1"] > log[0]["val_mean_r1"] else []) + ["checkpoint-1.pth"]
    assert one_error_line(r, 2) == disk_full_line(f"{out}/checkpoint.pth", 2 * one, shutil.disk_usage(fs).free,
                                                  also=f" (and {', '.join(also)})")
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint-0.pth", "checkpoint-best.pth",
                                       "checkpoint.pth", "log.txt"]  # no temp file, no checkpoint-1.pth
    # checkpoint.pth is epoch 0's, as the uninterrupted run wrote it (checkpoint-0.pth holds the same)
    with open(os.path.join(out, "checkpoint.pth"), "rb") as a, open(os.path.join(out, "checkpoint-0.pth"), "rb") as b:
        assert a.read() == b.read()
    got, want = load(os.path.join(out, "checkpoint.pth")), load(tmp_path / "ref" / "checkpoint-0.pth")
    assert got["epoch"] == 0 and all(torch.equal(got["model"][k], v) for k, v in want["model"].items())

    tmpfs(16 * 1024)  # space freed
    again = Run(argv(out), tmp_path / "logs", nproc=2)
    assert again.wait(timeout=300) == 0, again.tail()
    assert "resumed from" in again.stdout()
    assert checkpoints_line(again.stdout(), out)[1:] == (page_bytes(os.path.join(out, "checkpoint-0.pth")), False)
    assert_same_model(out, str(tmp_path / "ref"), "resumed after the full disk")


def test_a_disk_that_fills_during_the_checkpoint_write_gives_the_same_line(tiny_stage1_files, small_tvl, tmpfs,
                                                                           tmp_path, monkeypatch, capsys):
    """The space check passes, then another process fills the disk: torch.save itself fails (a RuntimeError from
    inline_container.cc over the file's ENOSPC); the line is the same, the temp file is gone, checkpoint.pth intact."""
    fs = tmpfs(8 * 1024)
    out, filler = os.path.join(fs, "out"), os.path.join(fs, "filler")
    real_save, calls, before = C.save_atomic, [], {}

    def fill_then_save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint.pth of --save_every_steps 1: the check has passed
            before["bytes"] = open(path, "rb").read()
            with open(filler, "wb") as f:  # all but 64 KiB, far less than a checkpoint
                os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(fs).free - 64 * 1024)
        return real_save(obj, path)

    monkeypatch.setattr(C, "save_atomic", fill_then_save)
    argv = train_flags(tiny_stage1_files, small_tvl, out, *VT, "--num_workers", "0", "--save_every_steps", "1",
                       "--log_dir", str(tmp_path / "tb"))
    assert main_in_process(argv) == 2
    stdout, err = capsys.readouterr()
    target = os.path.join(out, "checkpoint.pth")
    assert err.splitlines() == [disk_full_line(target, page_bytes(target), shutil.disk_usage(fs).free)], err
    assert open(target, "rb").read() == before["bytes"] and load(target)["next_step"] == 1
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint.pth"]  # no temp file (log.txt: epoch ends)

    os.remove(filler)
    monkeypatch.setattr(C, "save_atomic", real_save)
    assert main_in_process(argv) == 0
    assert "resumed from" in capsys.readouterr().out and load(target)["epoch"] == 0


# ------------------------------------------------------------------ --output_dir that cannot hold a run

def test_an_output_dir_that_is_a_file_is_refused_in_one_line(tiny_stage1_files, small_tvl, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    r = Run(train_flags(tiny_stage1_files, small_tvl, afile), tmp_path / "logs")
    assert r.wait(timeout=120) == 2, r.tail()
    assert one_error_line(r) == f"error: --output_dir {afile}: is a file, not a directory"
    assert afile.read_text() == "not a folder\n" and not re.search(r"^(recipe|data):", r.stdout(), flags=re.M)


def test_an_output_dir_that_is_not_writable_is_refused_in_one_line_by_every_rank(tiny_stage1_files, small_tvl,
                                                                                 tmp_path, tmpfs):
    """A read-only file system (root ignores chmod 555): under torchrun x2, both ranks say it and exit 2."""
    out = os.path.join(tmpfs(64, ro=True), "out")
    r = Run(train_flags(tiny_stage1_files, small_tvl, out), tmp_path / "logs", nproc=2)
    assert r.wait(timeout=120) == 1, r.tail()
    assert set(re.findall(r"exitcode\s*: (-?\d+)", r.stderr())) == {"2"}, r.tail()
    assert one_error_line(r, 2) == f"error: --output_dir {out}: is not writable (Read-only file system: {out})"
    assert not re.search(r"^(recipe|data):", r.stdout(), flags=re.M)


# ------------------------------------------------------------------------------------- 3. a damaged cache

def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {  # shard -> (damage, what training says)
    1: (lambda d: truncate(os.path.join(d, "vision_tokens.npy")), "vision_tokens.npy: "),
    2: (shutil.rmtree, "missing"),
    3: (lambda d: flip(os.path.join(d, "text_tokens.npy"), 0), "text_tokens.npy: not a readable .npy file"),  # header
    4: (lambda d: flip(os.path.join(d, "vision_global.npy"), os.path.getsize(os.path.join(d, "vision_global.npy")) - 3),
        None),  # data bytes: only --verify reads them
}


def copy_cache(ref_cache, where):
    shutil.copytree(ref_cache, where)
    return str(where)


@pytest.mark.parametrize("shard,nproc", [(1, 1), (2, 2), (3, 1)])
def test_training_refuses_a_damaged_shard_in_one_line(shard, nproc, ref_cache, tiny_stage1_files, small_tvl,
                                                      tmp_path):
    cache = copy_cache(ref_cache, tmp_path / "cache")
    damage, says = DAMAGE[shard]
    damage(os.path.join(cache, "train", FC.shard_name(shard)))
    r = Run(train_flags(tiny_stage1_files, small_tvl, tmp_path / "out", "--feature_cache", cache, *VT),
            tmp_path / "out", nproc=nproc)
    assert r.wait(timeout=120) == (2 if nproc == 1 else 1), r.tail()
    if nproc == 2:  # torchrun exits 1 for a failed child; each rank exited 2
        assert set(re.findall(r"exitcode\s*: (-?\d+)", r.stderr())) == {"2"}, r.tail()
    line = one_error_line(r, nproc)
    command = json.load(open(os.path.join(cache, "train", "meta.json")))["command"]
    assert line.startswith(f"error: --feature_cache {cache}: train/{FC.shard_name(shard)} is damaged ({says}"), line
    assert line.endswith(f"; rebuild them with: {command} --repair"), line


def test_verify_lists_every_damaged_shard_and_repair_restores_the_cache(ref_cache, tiny_stage1_files, small_tvl,
                                                                        tmp_path, capsys):
    assert cache_features.main(["--verify", "--output", ref_cache]) == 0
    assert "every shard matches" in capsys.readouterr().out
    cache = copy_cache(ref_cache, tmp_path / "cache")
    for k, (damage, _) in DAMAGE.items():
        damage(os.path.join(cache, "train", FC.shard_name(k)))
    r = Run(["--verify", "--output", cache], tmp_path / "logs", script=CACHE)
    assert r.wait(timeout=60) == 2, r.tail()
    listed = re.findall(r"^damaged: (\S+): (.*)$", r.stdout(), flags=re.M)
    assert [p for p, _ in listed] == [os.path.join(cache, "train", FC.shard_name(k)) for k in sorted(DAMAGE)], r.tail()
    assert dict(listed)[os.path.join(cache, "train", FC.shard_name(4))] == \
        "vision_global.npy: contents differ from its checksum"
    assert one_error_line(r).startswith(f"error: --output {cache}: 4 damaged shard(s), listed above; rebuild them with")

    # the repair: the same command with --repair (workers on)
    r = Run(cache_flags(tiny_stage1_files, small_tvl, cache, "--repair"), tmp_path / "logs", script=CACHE)
    assert r.wait(timeout=300) == 0, r.tail()
    assert "wrote 4 shard(s), skipped 1 finished one(s)" in r.stdout(), r.tail()
    assert_same_cache(ref_cache, cache, "train", modalities=("vision", "text"))
    assert cache_features.main(["--verify", "--output", cache]) == 0


def test_a_cache_without_checksums_still_opens_and_verify_says_so(ref_cache, tmp_path, capsys):
    cache = copy_cache(ref_cache, tmp_path / "old")
    for k in range(5):
        os.remove(os.path.join(cache, "train", FC.shard_name(k), FC.CHECKSUMS))
    meta = FC.load_cache_meta(cache, "train")
    FC.check_shards(cache, "train", meta, FC.reader_arrays(["vision", "text"]))  # no error
    assert cache_features.main(["--verify", "--output", cache]) == 0
    out = capsys.readouterr().out
    assert "5 shard(s) have no checksums (written before they were recorded): checked by size and header only" in out


# ------------------------------------------------------------------------- 4. bad text, 5. a non-finite loss

def test_a_caption_file_that_is_not_utf8_is_a_bad_file(tiny_stage1_files, small_tvl, tmp_path):
    import argparse
    import data_stage2 as D
    data = shutil.copytree(small_tvl, tmp_path / "data")
    args = D.add_data_args(argparse.ArgumentParser()).parse_args(["--datasets_dir", str(data)])
    label = next(it["text"] for it in D.build_dataset(args, "train", None, ["vision", "text"], seed=0).items
                 if it["text"])
    with open(label, "wb") as f:
        f.write(b"smooth, h\xe9rd.\n")
    why = f"{label}: not UTF-8 text (byte 0xe9 at offset 9)"

    r = Run(train_flags(tiny_stage1_files, str(data), tmp_path / "a"), tmp_path / "a", nproc=2)
    assert r.wait(timeout=120) == 1, r.tail()
    assert one_error_line(r, 2) == f"error: {why}", r.tail()
    assert set(re.findall(r"exitcode\s*: (-?\d+)", r.stderr())) == {"2"}, r.tail()

    r = Run(train_flags(tiny_stage1_files, str(data), tmp_path / "b", "--check_data"), tmp_path / "b")
    assert r.wait(timeout=120) == 2, r.tail()
    assert f"  {why}" in r.stdout().splitlines(), r.tail()

    r = Run(train_flags(tiny_stage1_files, str(data), tmp_path / "c", "--max_bad_samples", "1"), tmp_path / "c")
    assert r.wait(timeout=300) == 0, r.tail()
    assert f"data: WARNING skipped bad sample 1 of at most 1 (--max_bad_samples): {why}" in r.stdout()
    assert read_log(tmp_path / "c")[0]["train_bad_samples"] == 1


def test_a_non_finite_loss_names_the_samples_of_its_batch(ref_cache, tiny_stage1_files, small_tvl, tmp_path):
    """One cached sample's vision tokens set to inf (both views): under torchrun x2 the loss of the first step is not
    finite; the rank whose batch holds the sample names exactly that batch (the sampler's order, computed here)."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(19), num_replicas=2, rank=0, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(0)
    first_batch = list(sampler)[:4]  # rank 0's first batch (--batch_size 4)
    victim = first_batch[1]
    cache = copy_cache(ref_cache, tmp_path / "cache")
    k, row = divmod(victim, 4)
    path = os.path.join(cache, "train", FC.shard_name(k), "vision_tokens.npy")
    a = np.load(path, mmap_mode="r+")
    a[:, row] = np.inf
    a.flush()
    del a
    ids = FC.load_cache_meta(cache, "train")["sample_ids"]
    r = Run(train_flags(tiny_stage1_files, small_tvl, tmp_path / "out", "--feature_cache", cache, *VT),
            tmp_path / "out", nproc=2)
    assert r.wait(timeout=120) == 1, r.tail()
    lines = error_lines(r.stderr())
    assert len(lines) == 2, r.tail()  # the loss is global (features gathered): not finite on both ranks
    assert (f"error: non-finite loss at micro-step 0 on rank 0, in the batch of its 4 samples "
            f"{', '.join(ids[i] for i in first_batch)}; stopping all ranks, the last checkpoint written before it is "
            f"kept") in lines, r.tail()
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pth")
