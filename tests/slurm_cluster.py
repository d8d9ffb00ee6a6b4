"""A private one-host SLURM cluster for the tests: munged, slurmctld and slurmd on 127.0.0.1, as root, with their own
key, socket, SLURM_CONF, ports, state and spool folders under one temporary directory, and one node with this
machine's cores and memory (what `slurmd -C` reports).

Every daemon runs in the foreground (-F / -D) as a child of the test process, so it is stopped by the process id it
was started with. Every process of the cluster (the daemons, the slurmstepd they start, the jobs and whatever those
start) carries CLUSTER_MARK=<its folder> in its environment: the job's from sbatch (which exports the submitting
environment), the rest inherited. After stop() none may be left; stop() kills any that is and says so.
"""
import os
import shutil
import subprocess
import tempfile
import time

from conftest import free_port, kill_tree

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
CLUSTER_MARK = "FLUXTALK_TEST_SLURM"
CONF = """\
ClusterName=fluxtalk
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a job's credentials stay valid, and so how long (+1 s) a requeued job waits before it may
# start again (default 120 s)
AuthInfo=socket={root}/munge/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
KillWait=30
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools():
    """The SLURM / MUNGE programs not on PATH (empty when a cluster can start)."""
    return [t for t in PROGRAMS if shutil.which(t) is None]


def marked_pids(*marks):
    """Processes whose environment holds every one of `marks` (NAME=value)."""
    needles = {m.encode() for m in marks}
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needles <= set(f.read().split(b"\0")):
                        found.append(int(d))
            except OSError:
                pass
    return found


class SlurmCluster:
    def __init__(self):
        # munged wants its socket's folder, and every folder above it, searchable by all (pytest's tmp is 0700).
        self.root = tempfile.mkdtemp(prefix="fluxtalk-slurm-")
        os.chmod(self.root, 0o755)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf, **{CLUSTER_MARK: self.root})
        self.procs = {}

    # ------------------------------------------------------------------------------------------ start, stop

    def start(self, timeout=60):
        t0 = time.time()
        for d in ("munge", "state", "spool", "logs"):
            os.makedirs(os.path.join(self.root, d))
        key = os.path.join(self.root, "munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        m = os.path.join(self.root, "munge")
        self.spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={m}/munge.sock",
                              f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"])
        self.wait_until(lambda: os.path.exists(f"{m}/munge.sock"), timeout, "munged's socket")
        # this machine as slurmd sees it: NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        self.host = node.split()[0].split("=")[1]
        self.cpus = int(node.split("CPUs=")[1].split()[0])
        ports = set()
        while len(ports) < 2:
            ports.add(free_port())
        with open(self.conf, "w") as f:
            f.write(CONF.format(host=self.host, root=self.root, node=node, ctld_port=ports.pop(),
                                slurmd_port=ports.pop()))
        self.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self.spawn("slurmd", ["slurmd", "-D", "-f", self.conf])
        self.wait_until(lambda: self.node_state() == "idle", timeout, "the node to be idle")
        self.startup_s = time.time() - t0

    def spawn(self, name, argv):
        log = open(os.path.join(self.root, "logs", f"{name}.log"), "w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def stop(self, timeout=60):
        """Cancels every job, waits for them to end, stops the daemons (SIGTERM, then SIGKILL after 15 s); then
        kills and returns whatever process of the cluster is left (an empty list when the cluster was clean, whose
        folder is then removed; else it stays, with the daemons' logs)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=30)
            try:
                self.wait_until(lambda: not self.squeue(), timeout, "every job to end")
            except AssertionError:
                pass  # reported below as leftover processes
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        left = self.wait_no_process(timeout=10)
        for p in left:
            kill_tree(p)
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def job_pids(self, job_id):
        """The processes of a job: the batch shell and everything below it, srun's tasks and theirs."""
        return marked_pids(f"{CLUSTER_MARK}={self.root}", f"SLURM_JOB_ID={job_id}")

    def wait_no_process(self, *marks, timeout=30):
        """The processes of the cluster (with `marks` in their environment too, e.g. SLURM_JOB_ID=7) still running
        after waiting up to `timeout` s for them to end."""
        t0 = time.time()
        while (left := marked_pids(f"{CLUSTER_MARK}={self.root}", *marks)) and time.time() - t0 < timeout:
            time.sleep(0.1)
        return left

    def wait_until(self, ready, timeout, what):
        t0 = time.time()
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise AssertionError(f"{dead} exited while waiting for {what}\n{self.logs()}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"no {what} after {timeout} s\n{self.logs()}")
            time.sleep(0.1)

    def logs(self):
        d = os.path.join(self.root, "logs")
        return "\n".join(f"--- {n}\n{open(os.path.join(d, n)).read()[-3000:]}" for n in sorted(os.listdir(d)))

    # --------------------------------------------------------------------------------------- client commands

    def cmd(self, *argv, env=None, cwd=None, check=True):
        r = subprocess.run(argv, env=dict(self.env, **(env or {})), cwd=cwd, capture_output=True, text=True,
                           timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        return r.stdout

    def node_state(self):
        return self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).strip()

    def squeue(self):
        return self.cmd("squeue", "-h", "-o", "%i %T", check=False).strip()

    def sbatch(self, *argv, env=None, cwd=None):
        """Submits; returns the job id."""
        return self.cmd("sbatch", "--parsable", *argv, env=env, cwd=cwd).strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "-o", "show", "job", job_id)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
