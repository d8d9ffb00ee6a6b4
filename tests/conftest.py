"""Fixtures and helpers shared by the test files: the tiny Stage 1 and synthetic TVL data, command lines, process
launchers (python / torchrun, CPU), and readers for what a run writes (checkpoints, log.txt, TensorBoard).

Test files import the helpers with `from conftest import ...` (pytest puts tests/ on sys.path). Tests that train or
launch a run are marked `slow`: `python -m pytest -q -m "not slow"` is the fast loop.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

# Tests import the top-level modules (flat layout, as MAE / TVL): put the repo root on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAIN = os.path.join(ROOT, "main_train_stage2.py")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread in this process and in every process a test launches (they inherit the variable): the suite
# runs on two pytest-xdist workers on 2 cores, and a run's processes share the cores anyway. A second thread per
# process only oversubscribes them, and OpenMP's spinning threads then burn CPU time waiting for each other (measured:
# tests/test_resume.py took 164 s of CPU with two threads on a loaded machine, 83 s with one). Every comparison in
# the tests is between runs launched the same way, so with the same thread count.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# A register module small enough to train in seconds on CPU.
TINY_REGISTERS = ["--register_width", "32", "--register_depth", "1", "--register_heads", "2"]

# The files that take longest, first (pytest.ini hands whole files to the xdist workers in collection order): a long
# file started last would run alone while the other workers sit idle. The SLURM tests lead, as they mostly wait on
# the scheduler, then the three single long processes (the compile, the demo, the study's smoke run), then the
# others by their measured time (--durations); new files come after them.
LONGEST_FIRST = ["test_slurm.py", "test_compile.py", "test_demo.py", "test_study.py", "test_integrity.py",
                 "test_scaleout.py", "test_bad_data.py", "test_resume.py", "test_train.py", "test_eval.py"]


def pytest_xdist_auto_num_workers(config):
    """The workers `-n auto` (pytest.ini) starts: three for the whole suite; none (all in this process) for the fast
    loop (-m "not slow") or named files and tests, which end before three workers would have started (each imports
    torch and the models). PYTEST_XDIST_AUTO_NUM_WORKERS, if set, decides instead."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS and "not slow" not in config.option.markexpr
    return 3 if whole_suite else 0


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_stage1_files(tmp_path_factory):
    """(tiny_stage1.pth in the TVL layout, tiny_clip.pt) written once per test session."""
    from tools.make_tiny_stage1 import make_tiny_stage1
    return make_tiny_stage1(str(tmp_path_factory.mktemp("tiny_stage1")))


@pytest.fixture(scope="session")
def tiny_stage1(tiny_stage1_files):
    """The real frozen Stage 1 (fluxtalk-tiny OpenCLIP + timm vit_tiny tactile) built from those files."""
    from stage1 import build_stage1
    ckpt, clip = tiny_stage1_files
    return build_stage1(ckpt, clip_model="fluxtalk-tiny", clip_pretrained=clip)


@pytest.fixture(scope="session")
def synthetic_tvl(tmp_path_factory):
    """A small synthetic TVL-format dataset (ssvtp/ + hct/ with three runs) for end-to-end tests."""
    from tools.make_synthetic_tvl import make_synthetic_tvl
    out = str(tmp_path_factory.mktemp("tvl"))
    make_synthetic_tvl(out, n_ssvtp=48, n_hct=48, seed=0)
    return out


@pytest.fixture(scope="session")
def short_tvl(tmp_path_factory):
    """Half the size of synthetic_tvl, for the tests that train many short runs: 8 steps per epoch at batch 4 on one
    rank, 4 on two."""
    from tools.make_synthetic_tvl import make_synthetic_tvl
    out = str(tmp_path_factory.mktemp("short_tvl"))
    make_synthetic_tvl(out, n_ssvtp=24, n_hct=24, seed=1)
    return out


# ------------------------------------------------------------------------------------------ command lines

def stage1_flags(tiny_stage1_files):
    """The flags that select the tiny Stage 1 of the tiny_stage1_files fixture."""
    ckpt, clip = tiny_stage1_files
    return ["--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained", clip]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script, nproc=1):
    """(argv, env) that run `script` in one python process, or under torchrun as `nproc` CPU processes on a free
    port; each rank then gets one intra-op thread, as the ranks share the cores."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if nproc == 1:
        return [sys.executable, script], env
    env["OMP_NUM_THREADS"] = "1"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", script], env


def descendants(pid):
    """pid and every process below it, from /proc (torchrun starts its workers in new sessions, so a process group
    kill misses them)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid):
    """SIGKILL pid and every process below it; returns their pids. The tree is stopped first (SIGSTOP, until no new
    process shows up), so none can fork a child between the listing and the kill, nor be reparented away from it."""
    stopped = set()
    while True:
        new = [p for p in descendants(pid) if p not in stopped]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped.update(new)
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(stopped)


def running(pids, timeout=30):
    """Those of pids still running (not gone, not a zombie) after waiting up to `timeout` s for them to end."""
    def alive(p):
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
        except OSError:
            return False
    t0 = time.time()
    while any(alive(p) for p in pids) and time.time() - t0 < timeout:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def main_in_process(argv):
    """main_train_stage2.main(argv) in this process (use --num_workers 0); restores the signal handlers it installs.
    Returns its exit code."""
    import main_train_stage2
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return main_train_stage2.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


class Run:
    """One training process (or torchrun and its workers) in its own session, output in files under `out`.
    `cmd` (with `env` added to the environment) replaces the python / torchrun command of launch_command."""

    def __init__(self, argv, out, nproc=1, script=MAIN, cmd=None, env=None):
        self.out = str(out)
        os.makedirs(self.out, exist_ok=True)
        n = len([f for f in os.listdir(self.out) if f.startswith("stdout")])
        self.stdout_path = os.path.join(self.out, f"stdout{n}.txt")
        self.stderr_path = os.path.join(self.out, f"stderr{n}.txt")
        launch, launch_env = launch_command(script, nproc)
        with open(self.stdout_path, "w") as so, open(self.stderr_path, "w") as se:
            self.proc = subprocess.Popen((cmd or launch) + list(argv), cwd=ROOT, env=dict(launch_env, **(env or {})),
                                         stdout=so, stderr=se, start_new_session=True)

    def stdout(self):
        with open(self.stdout_path) as f:
            return f.read()

    def stderr(self):
        with open(self.stderr_path) as f:
            return f.read()

    def steps_done(self):
        """(epoch, step) of the last printed training step ('epoch E [S/N] loss ...'), or None; and N."""
        hits = re.findall(r"^epoch (\d+) \[(\d+)/(\d+)\] loss", self.stdout(), flags=re.M)
        if not hits:
            return None, None
        e, s, n = map(int, hits[-1])
        return (e, s), n

    def wait_for_step(self, epoch, step, timeout=240):
        t0 = time.time()
        while time.time() - t0 < timeout:
            done, n = self.steps_done()
            if done is not None and done >= (epoch, step):
                return done, n
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before epoch {epoch} step {step}\n"
                                     + self.tail())
            time.sleep(0.02)
        raise AssertionError(f"epoch {epoch} step {step} not reached in {timeout}s\n" + self.tail())

    def text(self):
        return self.stdout() + self.stderr()

    def wait_for(self, needle, timeout=300):
        """Until `needle` is in the output."""
        t0 = time.time()
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"ended (rc {self.proc.returncode}) before {needle!r}\n{self.tail()}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"{needle!r} not seen in {timeout}s\n{self.tail()}")
            time.sleep(0.05)

    def signal(self, sig):
        """`sig` to the process group: the process and its DataLoader workers (not torchrun's workers: their own
        sessions)."""
        os.killpg(self.proc.pid, sig)

    def kill(self):
        """SIGKILL the launcher and every process below it, as a dead node; returns their pids once reaped here."""
        pids = kill_tree(self.proc.pid)
        self.proc.wait()
        return pids

    def wait(self, timeout=300):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not end within {timeout}s\n" + self.tail())

    def tail(self):
        return f"--- stdout\n{self.stdout()[-3000:]}\n--- stderr\n{self.stderr()[-3000:]}"


def run_to_end(argv, out, nproc=1):
    """Runs a training command to its end; it must exit 0."""
    r = Run(argv, out, nproc)
    rc = r.wait()
    assert rc == 0, r.tail()
    return r


# --------------------------------------------------------------------------------- what a run writes

def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(out):
    """log.txt: one JSON object per line."""
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def read_tensorboard(out):
    """The run's TensorBoard events as TensorBoard shows them (EventAccumulator applies purge_step), all kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(out):
    """{tag: [(step, value)]} of the run's TensorBoard scalars."""
    acc = read_tensorboard(out)
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def assert_same_model(out, ref_out, context=""):
    """checkpoint.pth of `out` is that of `ref_out`: same position, model and optimizer state, bitwise."""
    got, ref = load(os.path.join(out, "checkpoint.pth")), load(os.path.join(ref_out, "checkpoint.pth"))
    assert (got["epoch"], got["next_step"], got["global_step"]) == (ref["epoch"], ref["next_step"],
                                                                     ref["global_step"]), context
    assert got["model"].keys() == ref["model"].keys()
    differ = [k for k in ref["model"] if not torch.equal(got["model"][k], ref["model"][k])]
    assert not differ, f"{context}: not bitwise equal to the uninterrupted run: " + ", ".join(
        f"{k} (max abs diff {(got['model'][k] - ref['model'][k]).abs().max().item():.3g})" for k in differ[:5])
    # The optimizer state too (Adam moments and step counts), so a later continuation would also agree.
    for (pid, s), (_, s_ref) in zip(sorted(got["optimizer"]["state"].items()),
                                    sorted(ref["optimizer"]["state"].items())):
        for k in s_ref:
            assert torch.equal(s[k], s_ref[k]), f"{context}: optimizer state {pid}.{k} differs"
