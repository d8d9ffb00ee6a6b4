"""scripts/slurm_train.sbatch under a real SLURM (a private one-host cluster, tests/slurm_cluster.py), CPU, the tiny
Stage 1 and a feature cache:

- preempted mid-epoch the way a cluster does it (SIGUSR1 to the batch shell, as --signal=B:USR1@T sends it before the
  time limit: `scancel --signal=USR1 --batch`), the job requeues itself and the requeued job ends with the weights
  of an uninterrupted run; the same when SLURM requeues it from outside (`scontrol requeue`);
- two srun tasks on the one host, each a torchrun "node" of one process meeting in a c10d rendezvous, end with the
  weights of one torchrun running two processes (as tests/test_scaleout.py checks for two launchers);
- a job killed outright (plain scancel: no requeue) and submitted again with the same script resumes too.

The references are plain torchrun runs outside SLURM with the same flags. The moment of preemption is made exact by
freezing the job's training process (SIGSTOP) once it has logged a chosen step, preempting, waiting until the
signal is pending in that process, and letting it go on (SIGCONT): whatever the scheduler's latency, a SIGUSR1 lands
in that step. (When SLURM ends a job itself, scancel or scontrol requeue, it sends SIGCONT before its SIGTERM, so the
process may go on a step or two, or be killed by srun before it saves: those tests check a resume from mid-run,
wherever that is.) Every wait is bounded and says what it waited for.
"""
import os
import re
import signal
import sys
import time

import pytest

from conftest import MAIN, ROOT, TINY_REGISTERS, Run, free_port, load, assert_same_model, stage1_flags
from slurm_cluster import SlurmCluster, missing_tools
from test_scaleout import assert_close_models

SCRIPT = os.path.join(ROOT, "scripts", "slurm_train.sbatch")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# One thread per process inside and outside SLURM; the script's `torchrun` is this Python's.
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
STEPS = 8  # per epoch on one rank: 35 training samples // batch 4
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def slurm():
    """The cluster, started once for this module; at the end no daemon, job or process of a job may be left."""
    missing = missing_tools()
    reason = ("SLURM tests start slurmd, which needs root" if os.geteuid() else
              f"SLURM tests need slurm-wlm and munge (apt-get install slurm-wlm munge): {', '.join(missing)} not "
              f"found" if missing else None)
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run them (.ci/run installs them)")
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        print(f"\nslurm: one-host cluster up in {cluster.startup_s:.1f} s ({cluster.cpus} CPUs, {cluster.root})")
        yield cluster
    finally:
        left = cluster.stop()
    assert not left, f"processes of the SLURM cluster still running after its stop (killed now): {left}"


@pytest.fixture(scope="module")
def cache(tiny_stage1_files, short_tvl, tmp_path_factory):
    """Train (plain view + 1 augmented view) and val features of short_tvl, with the runs' seed (the seed draws the
    no-contact frames of the split)."""
    import cache_features
    out = str(tmp_path_factory.mktemp("slurm_cache") / "c")
    assert cache_features.main(stage1_flags(tiny_stage1_files) + [
        "--datasets_dir", short_tvl, "--output", out, "--device", "cpu", "--num_workers", "0", "--splits", "train",
        "val", "--cache_views", "1", "--seed", "3"]) == 0
    return out


def flags(files, data, cache, out):
    """Every flag the script sets, overridden: 2 epochs of 8 steps (one rank), a checkpoint every 2 steps."""
    return stage1_flags(files) + [
        "--datasets_dir", data, "--datasets", "ssvtp", "hct", "--feature_cache", cache, "--device", "cpu",
        "--output_dir", str(out), "--batch_size", "4", "--epochs", "2", *TINY_REGISTERS, "--num_register_tokens", "4",
        "--num_overlapping_tokens", "3", "--nested_dropout_rate", "0.5", "--complementary_reg_weight", "0.01",
        "--num_workers", "0", "--save_every_steps", "2", "--print_freq", "1", "--lr", "2e-3", "--warmup_epochs", "1",
        "--seed", "3", "--resume", "auto"]


def reference_run(argv, out, nproc):
    r = Run(argv, out, cmd=TORCHRUN + [f"--nproc_per_node={nproc}", MAIN], env=JOB_ENV)
    assert r.wait(timeout=300) == 0, r.tail()
    return str(out)


@pytest.fixture(scope="module")
def reference(tiny_stage1_files, short_tvl, cache, tmp_path_factory):
    """One torchrun, one process, uninterrupted."""
    out = tmp_path_factory.mktemp("slurm_ref1")
    return reference_run(flags(tiny_stage1_files, short_tvl, cache, out), out, 1)


# --------------------------------------------------------------------------------------------------- a job

class Job:
    """scripts/slurm_train.sbatch submitted with `sbatch_args` and the training flags `argv`; its log under `out`."""

    def __init__(self, cluster, argv, out, sbatch_args=(), env=None):
        self.cluster, self.out = cluster, str(out)
        self.log = os.path.join(self.out, "slurm.out")
        os.makedirs(self.out, exist_ok=True)
        stage1 = argv[argv.index("--stage1_checkpoint") + 1]
        data = argv[argv.index("--datasets_dir") + 1]
        job_env = dict(JOB_ENV, STAGE1=stage1, DATA=data, OUT=self.out, NGPUS="1", **(env or {}))
        self.id = cluster.sbatch("--gpus-per-node=0", "--cpus-per-task=1", f"--output={self.log}", *sbatch_args,
                                 SCRIPT, *argv, env=job_env, cwd=ROOT)

    def text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tail(self):
        return f"--- job {self.id} log\n{self.text()[-4000:]}"

    def wait_for(self, needle, timeout=240):
        """Until `needle` is in the job log (read every 5 ms: the test freezes the run right after a line)."""
        t0 = last_check = time.time()
        while needle not in self.text():
            if time.time() - last_check > 0.5:  # scontrol takes a while: not at every read
                last_check = time.time()
                state = self.cluster.job(self.id)["JobState"]
                if state in FINAL:
                    raise AssertionError(f"job {self.id} ended ({state}) before {needle!r}\n{self.tail()}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"{needle!r} not in the job log after {timeout} s\n{self.tail()}")
            time.sleep(0.005)

    def wait_end(self, timeout=300):
        """The job's record once it has ended for good (a requeued job passes through REQUEUED and PENDING), and
        none of its processes is left."""
        t0 = time.time()
        while True:
            job = self.cluster.job(self.id)
            if job["JobState"] in FINAL:
                left = self.cluster.wait_no_process(f"SLURM_JOB_ID={self.id}")
                assert not left, f"job {self.id} ended ({job['JobState']}) but left processes {left}"
                return job
            if time.time() - t0 > timeout:
                raise AssertionError(f"job {self.id} still {job['JobState']} after {timeout} s\n{self.tail()}\n"
                                     f"{self.cluster.logs()}")
            time.sleep(0.2)

    def trainers(self):
        """The job's training processes (`python -u main_train_stage2.py ...`, started by torchrun)."""
        pids = []
        for p in self.cluster.job_pids(self.id):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    argv = f.read().decode().split("\0")
            except OSError:
                continue
            script = [a for a in argv[1:] if not a.startswith("-")][:1]
            if script and script[0].endswith("main_train_stage2.py"):
                pids.append(p)
        return pids


def status(pid):
    """/proc/<pid>/status as a dict, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.split(":", 1) for line in f)
    except OSError:
        return None


def is_stopped(st):
    return st is not None and st["State"].strip().startswith("T")


def acted_on(pid, sig):
    """True once `sig` waits to be delivered to the stopped process `pid`, or something let it go on (SLURM sends
    SIGCONT before the SIGTERM that ends a job), or it is gone."""
    st = status(pid)
    if not is_stopped(st):
        return True
    return bool((int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)) >> (sig - 1) & 1)


def preempt_at(job, step, preempt, sig, timeout=120):
    """Freezes the job's training process right after it logged epoch 0's `step`, calls preempt(), waits until `sig`
    is pending in the process (see acted_on), and lets it go on. Returns the last step it logged (epoch, step)."""
    job.wait_for(" steps/epoch, ")  # printed just before the first step: the training process is up
    pids = job.trainers()
    assert len(pids) == 1, (pids, job.tail())
    pid = pids[0]
    job.wait_for(f"epoch 0 [{step}/{STEPS}] loss")
    os.kill(pid, signal.SIGSTOP)
    t0 = time.time()
    while not is_stopped(status(pid)):  # SIGSTOP takes effect asynchronously
        assert time.time() - t0 < 30, f"the training process {pid} did not stop in 30 s: {status(pid)}"
        time.sleep(0.005)
    time.sleep(0.5)  # lines it printed before the stop may still be on their way through srun to the log
    frozen = tuple(map(int, re.findall(r"^epoch (\d+) \[(\d+)/\d+\] loss", job.text(), flags=re.M)[-1]))
    if frozen[0] != 0 or frozen[1] == STEPS:
        os.kill(pid, signal.SIGCONT)
        raise AssertionError(f"froze the run too late for a mid-epoch preemption: at {frozen}\n{job.tail()}")
    preempt()
    t0 = time.time()
    while not acted_on(pid, sig):
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGCONT)
            raise AssertionError(f"{sig.name} did not reach the training process {pid} in {timeout} s\n{job.tail()}")
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # killed while frozen
    return frozen


def restarts_in_log(text, job_id):
    return re.findall(rf"^slurm_train\.sbatch: job {job_id} restart (\d+):", text, flags=re.M)


def resumed_at(text, out):
    hits = re.findall(rf"^resumed from {re.escape(os.path.join(out, 'checkpoint.pth'))}: epoch (\d+), step (\d+)",
                      text, flags=re.M)
    return [tuple(map(int, h)) for h in hits]


def mid_run(position):
    """(epoch, step) after the first step-level checkpoint (step 2) and before the end of the run (2 epochs).

    Where exactly a job ended by SLURM (scancel, scontrol requeue) stops is not the test's to choose: SLURM sends
    SIGCONT before its SIGTERM, which lets the frozen process go on for a step or two; then the process either
    saves at the SIGTERM or is killed by srun before, leaving the last --save_every_steps checkpoint."""
    return (0, 2) <= tuple(position) < (1, STEPS)


# --------------------------------------------------------------------------------------------------- tests

def test_usr1_preemption_requeues_and_resumes_exactly(slurm, tiny_stage1_files, short_tvl, cache, reference,
                                                      tmp_path):
    """The batch shell gets SIGUSR1 mid-epoch (what --signal=B:USR1@T delivers before the time limit); the training
    process finishes its step, saves and exits 75, the script requeues the job, the requeued job resumes at that
    step and ends with the uninterrupted run's weights."""
    out = str(tmp_path / "run")
    job = Job(slurm, flags(tiny_stage1_files, short_tvl, cache, out), out)
    frozen = preempt_at(job, 2, lambda: slurm.cmd("scancel", "--signal=USR1", "--batch", job.id), signal.SIGUSR1)
    record = job.wait_end()
    text = job.text()
    assert record["Restarts"] == "1", f"the job was not requeued once: Restarts={record['Restarts']}, " \
        f"{record['JobState']} with exit code {record['ExitCode']}\n{job.tail()}"
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, job.tail())
    assert restarts_in_log(text, job.id) == ["0", "1"], job.tail()  # SLURM_RESTART_COUNT of each run
    assert f"slurm_train.sbatch: stopped with checkpoint.pth written: scontrol requeue {job.id}" in text
    stop = re.findall(r"stopped: caught SIGUSR1 at epoch 0 step (\d+)", text)
    # the step it was in: the one it had just logged (stop check not yet reached) or the next
    assert stop and int(stop[0]) in (frozen[1], frozen[1] + 1), (frozen, stop, job.tail())
    assert resumed_at(text, out) == [(0, int(stop[0]))], job.tail()
    assert_same_model(out, reference, f"job {job.id}, SIGUSR1 after epoch 0 step {frozen[1]}")


def test_requeue_from_outside_resumes_exactly(slurm, tiny_stage1_files, short_tvl, cache, reference, tmp_path):
    """`scontrol requeue` (what a scheduler does to a preempted job with PreemptMode=REQUEUE): SIGTERM to every
    process of the job, srun kills the training process; SLURM requeues the job, which resumes from the last
    checkpoint.pth and ends with the uninterrupted run's weights."""
    out = str(tmp_path / "run")
    job = Job(slurm, flags(tiny_stage1_files, short_tvl, cache, out), out)
    frozen = preempt_at(job, 3, lambda: slurm.cmd("scontrol", "requeue", job.id), signal.SIGTERM)
    record = job.wait_end()
    text = job.text()
    assert record["Restarts"] == "1", f"the job was not requeued once: Restarts={record['Restarts']}, " \
        f"{record['JobState']} with exit code {record['ExitCode']}\n{job.tail()}"
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, job.tail())
    assert restarts_in_log(text, job.id) == ["0", "1"], job.tail()
    assert "scontrol requeue" not in text  # SLURM requeued it, not the script
    resumed = resumed_at(text, out)
    assert len(resumed) == 1 and mid_run(resumed[0]), (frozen, resumed, job.tail())
    assert_same_model(out, reference, f"job {job.id}, requeued after epoch 0 step {frozen[1]}, resumed at "
                                      f"{resumed[0]}")


def test_scancelled_job_submitted_again_resumes(slurm, tiny_stage1_files, short_tvl, cache, reference, tmp_path):
    """Plain scancel: SIGTERM to every process of the job, no requeue (the job stays CANCELLED); the same sbatch
    command submitted again resumes from the last checkpoint.pth and ends with the uninterrupted run's weights."""
    out = str(tmp_path / "run")
    argv = flags(tiny_stage1_files, short_tvl, cache, out)
    job = Job(slurm, argv, out)
    frozen = preempt_at(job, 3, lambda: slurm.cmd("scancel", job.id), signal.SIGTERM)
    record = job.wait_end()
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", (record, job.tail())
    ck = load(os.path.join(out, "checkpoint.pth"))
    at = (ck["epoch"], ck["next_step"])
    assert mid_run(at), (frozen, at, job.tail())

    again = Job(slurm, argv, out)
    record = again.wait_end()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, again.tail())
    assert resumed_at(again.text(), out) == [at], again.tail()
    assert_same_model(out, reference, f"job {job.id} cancelled after epoch 0 step {frozen[1]}, checkpoint at {at}, "
                                      f"then job {again.id}")


def test_two_srun_tasks_as_two_nodes_match_one_torchrun_with_two_processes(slurm, tiny_stage1_files, short_tvl,
                                                                           cache, tmp_path):
    """One job, two tasks on the one node (--ntasks-per-node=2): srun starts a torchrun in each, and the two meet in
    a c10d rendezvous on the job's first node as two "nodes" of one process each."""
    ref_out = tmp_path / "ref2"
    reference_run(flags(tiny_stage1_files, short_tvl, cache, ref_out), ref_out, 2)
    out = str(tmp_path / "run")
    job = Job(slurm, flags(tiny_stage1_files, short_tvl, cache, out), out,
              sbatch_args=("--nodes=1", "--ntasks=2", "--ntasks-per-node=2"), env={"MASTER_PORT": str(free_port())})
    record = job.wait_end()
    text = job.text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, job.tail())
    assert record["NumTasks"] == "2", record
    assert f"slurm_train.sbatch: job {job.id} restart 0: 2 torchrun x 1 process(es) on {slurm.host}" in text, \
        job.tail()
    assert "2 rank(s) on cpu, 4 steps/epoch" in text, job.tail()
    assert_close_models(out, str(ref_out))
