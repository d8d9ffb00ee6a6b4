"""Scale-out as the README documents it, with real torchrun launchers on this host (CPU, gloo):

- two "nodes": two torchrun launchers with --nnodes=2 --node_rank=0/1 --rdzv_backend=c10d on 127.0.0.1, one process
  each, end with the weights of one launcher running two processes; and after both nodes die (kill -9 of each
  launcher and everything under it) a rerun of both with --resume auto ends with the uninterrupted weights;
- preemption under torchrun (2.14): SIGTERM to the launcher is forwarded to the workers, which write checkpoint.pth and
  exit 75, but torchrun itself exits 1; SIGUSR1 is forwarded only with --signals_to_handle. scripts/
  train_tvl_multigpu.sh passes either signal on as SIGTERM and turns the outcome back into 75.

Every run uses OMP_NUM_THREADS=1 per process, so a process computes the same thing whichever launcher started it.
"""
import os
import signal
import sys
import time

import pytest

from conftest import (MAIN, ROOT, TINY_REGISTERS, Run, descendants, free_port, kill_tree, load, running,
                      stage1_flags)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# One thread per process whichever launcher started it; the wrapper script's `torchrun` is this Python's.
LAUNCHER_ENV = {"OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
EXIT_PREEMPTED = 75
pytestmark = pytest.mark.slow


def flags(files, data, out, extra=()):
    """Two epochs of 4 steps per rank (2 ranks x batch 4), attention dropout on (per-rank random draws), nested
    dropout on, a checkpoint every step."""
    return stage1_flags(files) + [
        "--datasets_dir", data, "--device", "cpu", "--output_dir", str(out), "--batch_size", "4", "--epochs", "2",
        *TINY_REGISTERS, "--active_modality_names", "vision", "tactile", "--attn_dropout", "0.1",
        "--save_every_steps", "1", "--num_workers", "0", "--nested_dropout_rate", "0.5", "--print_freq", "1",
        "--lr", "2e-3", "--warmup_epochs", "1", "--seed", "3", "--resume", "auto", *extra]


def launcher(cmd, argv, log_dir, env=None):
    """`cmd` + argv (torchrun or the wrapper script) in its own session, output in files under `log_dir`."""
    return Run(argv, log_dir, cmd=cmd, env=dict(LAUNCHER_ENV, **(env or {})))


def run_ok(proc):
    rc = proc.wait(timeout=400)
    assert rc == 0, proc.tail()
    return proc


def two_node_launchers(argv, log_dir):
    """The README's multi-node command on one host: node_rank 0 and 1, c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [launcher(TORCHRUN + ["--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                 f"--rdzv_endpoint={endpoint}", "--rdzv_id=fluxtalk", MAIN], argv, log_dir)
            for r in (0, 1)]


def one_launcher(argv, log_dir, extra=()):
    return launcher(TORCHRUN + ["--nproc_per_node=2", f"--master_port={free_port()}", *extra, MAIN], argv, log_dir)


def assert_close_models(out, ref_out, atol=1e-6):
    got, ref = load(os.path.join(out, "checkpoint.pth")), load(os.path.join(ref_out, "checkpoint.pth"))
    assert (got["epoch"], got["next_step"], got["global_step"]) == (ref["epoch"], ref["next_step"],
                                                                     ref["global_step"])
    assert got["model"].keys() == ref["model"].keys()
    diff = {k: (got["model"][k] - ref["model"][k]).abs().max().item() for k in ref["model"]}
    assert max(diff.values()) <= atol, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


@pytest.fixture(scope="module")
def reference(tiny_stage1_files, short_tvl, tmp_path_factory):
    """One launcher, two processes, uninterrupted."""
    out = str(tmp_path_factory.mktemp("one_launcher"))
    run_ok(one_launcher(flags(tiny_stage1_files, short_tvl, out), out))
    return out


# ------------------------------------------------------------------------------------------------ two nodes

def test_two_nodes_on_one_host_match_one_launcher(tiny_stage1_files, short_tvl, reference, tmp_path):
    out = str(tmp_path / "run")
    nodes = two_node_launchers(flags(tiny_stage1_files, short_tvl, out), str(tmp_path / "logs"))
    for n in nodes:
        run_ok(n)
    text = nodes[0].text() + nodes[1].text()
    assert "2 rank(s) on cpu" in text, text[-3000:]
    assert_close_models(out, reference)


def test_two_nodes_killed_then_both_rerun_with_resume_auto_match(tiny_stage1_files, short_tvl, reference,
                                                                 tmp_path):
    out, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    argv = flags(tiny_stage1_files, short_tvl, out)
    nodes = two_node_launchers(argv, logs)
    nodes[0].wait_for("epoch 1 [2/4] loss")  # mid-epoch, after the step-level checkpoint of step 1
    # both nodes die at once: each launcher, its workers and anything below them
    pids = [p for n in nodes for p in kill_tree(n.proc.pid)]
    for n in nodes:
        n.proc.wait()
    assert len(pids) >= 4 and not running(pids), (pids, running(pids, timeout=0))
    ck = load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 1 and 0 < ck["next_step"] < 4, (ck["epoch"], ck["next_step"])
    assert len(ck["rng_ranks"]) == 2

    nodes = two_node_launchers(argv, logs)
    for n in nodes:
        run_ok(n)
    text = nodes[0].text() + nodes[1].text()
    assert f"resumed from {os.path.join(out, 'checkpoint.pth')}: epoch 1, step {ck['next_step']}" in text, text[-3000:]
    assert_close_models(out, reference)


# ------------------------------------------------------------------------------------------------ preemption

def test_sigterm_to_one_node_stops_every_rank_of_both_nodes(tiny_stage1_files, short_tvl, tmp_path):
    """A signal that reaches one node only (node 0's launcher): its worker saves and tells the other rank, which
    stops at the same step; both launchers exit 1 (node 0: the re-raised signal; node 1: its worker's 75)."""
    out = str(tmp_path / "run")
    nodes = two_node_launchers(flags(tiny_stage1_files, short_tvl, out), str(tmp_path / "logs"))
    nodes[0].wait_for("epoch 0 [2/4] loss")
    os.kill(nodes[0].proc.pid, signal.SIGTERM)
    assert [n.wait(timeout=200) for n in nodes] == [1, 1], nodes[0].tail() + nodes[1].tail()
    assert "stopped: caught SIGTERM at epoch 0" in nodes[0].text()
    assert "stopped: caught a stop request on another rank at epoch 0" in nodes[1].text(), nodes[1].tail()
    assert "exitcode  : 75" in nodes[1].text(), nodes[1].tail()
    ck = load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 0 and 2 <= ck["next_step"] <= 4


def stop_midway(proc, sig, out):
    proc.wait_for("epoch 0 [2/4] loss")
    os.kill(proc.proc.pid, sig)  # the launcher alone, as a scheduler signalling the job's main process
    rc = proc.wait(timeout=200)
    ck = load(os.path.join(out, "checkpoint.pth"))
    return rc, ck


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_torchrun_forwards_the_stop_signal_but_exits_1(sig, tiny_stage1_files, short_tvl, tmp_path):
    """Plain torchrun: SIGTERM is forwarded (SIGUSR1 only with --signals_to_handle); every worker saves and exits
    75, torchrun re-raises the signal as a SignalException and the shell sees 1."""
    out = str(tmp_path / "run")
    extra = ["--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] if sig == signal.SIGUSR1 else []
    proc = one_launcher(flags(tiny_stage1_files, short_tvl, out), str(tmp_path), extra=extra)
    rc, ck = stop_midway(proc, sig, out)
    text = proc.text()
    assert rc == 1, text[-3000:]
    assert f"SignalException: Process {proc.proc.pid} got signal: {int(sig)}" in text
    assert text.count(f"stopped: caught {sig.name} at epoch 0") == 2, text[-3000:]  # both workers
    assert ck["epoch"] == 0 and 2 <= ck["next_step"] <= 4  # the running step finished (4: the epoch's last)


def test_torchrun_without_signals_to_handle_dies_on_sigusr1_and_orphans_its_workers(tiny_stage1_files, short_tvl,
                                                                                     tmp_path):
    """Why the wrapper passes --signals_to_handle: torchrun's default list lacks SIGUSR1 (what SLURM sends), so the
    launcher dies of it and its workers, in their own sessions, are never told."""
    out = str(tmp_path / "run")
    proc = one_launcher(flags(tiny_stage1_files, short_tvl, out), str(tmp_path))
    proc.wait_for("epoch 0 [2/4] loss")
    workers = [p for p in descendants(proc.proc.pid) if p != proc.proc.pid]
    os.kill(proc.proc.pid, signal.SIGUSR1)
    try:
        assert proc.wait(timeout=60) == -signal.SIGUSR1
        time.sleep(2)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}")]
        assert alive, "expected the workers to outlive the launcher"
        assert "stopped: caught" not in proc.text()
    finally:
        for p in workers:
            kill_tree(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_multigpu_script_exits_75_on_a_stop_signal_and_resumes(sig, tiny_stage1_files, short_tvl, reference,
                                                               tmp_path):
    """scripts/train_tvl_multigpu.sh (NGPUS=2 CPU processes): the signal to the script reaches both workers (as
    SIGTERM, through torchrun), they save, the script exits 75 (what a requeue-on-75 scheduler needs); the same command
    then finishes the run with the uninterrupted weights."""
    out = str(tmp_path / "run")
    ckpt, _ = tiny_stage1_files
    env = {"STAGE1": ckpt, "DATA": short_tvl, "OUT": out, "NGPUS": "2", "STOP_TIMEOUT": "120"}
    argv = flags(tiny_stage1_files, short_tvl, out)
    script = ["bash", os.path.join(ROOT, "scripts", "train_tvl_multigpu.sh")]
    proc = launcher(script, argv, str(tmp_path), env)
    rc, ck = stop_midway(proc, sig, out)
    text = proc.text()
    assert rc == EXIT_PREEMPTED, text[-3000:]
    assert text.count("stopped: caught SIGTERM at epoch 0") == 2, text[-3000:]
    assert f"stopped by SIG{sig.name[3:]}, {out}/checkpoint.pth written; exit 75" in text
    assert ck["epoch"] == 0 and 2 <= ck["next_step"] <= 4

    run_ok(launcher(script, argv, str(tmp_path), env))
    assert_close_models(out, reference)
