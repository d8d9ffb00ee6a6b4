"""Everything about a training run's files: the TrainState, resuming, checkpoints, log.txt, args.json, TensorBoard.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the target (atomic on POSIX), so a
crash or a full disk mid-write leaves the old file as it was. Reads use `torch.load(weights_only=True)`; the only
extra type allowed is `argparse.Namespace`, which TVL Stage 1 files carry.
"""
import argparse
import contextlib
import errno
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import util.dist as dist


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """Writing failed (permissions, I/O, ...): the input was fine, so not a bad-input exit."""


class DiskFull(CheckpointError):
    """No room for a checkpoint. Not a CheckpointWriteError: it ends the run as bad input does (exit 2, one line), since
    only freeing space lets it go on; the message names the file and the bytes needed and free."""


def load_torch_file(path, flag=None):
    """torch.load(weights_only=True) with argparse.Namespace allow-listed (TVL files carry one).

    Anything else that needs unpickling is refused: we never turn weights_only off, since unpickling arbitrary
    objects can run arbitrary code. Raises CheckpointError naming `path` (and `flag`, the CLI flag, if given).
    """
    where = f"{flag} {path}" if flag else str(path)
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{where}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise CheckpointError(f"{where}: refusing to unpickle {refused.group(1)} (only tensors, plain containers "
                                  f"and argparse.Namespace are allowed; weights_only is never turned off)") from None
        raise CheckpointError(f"{where}: not a torch checkpoint file ({first_line(e)})") from None
    except Exception as e:  # zip / pickle framing errors: truncated, or not a torch file at all
        raise CheckpointError(f"{where}: not a readable torch checkpoint, truncated or another format "
                              f"({first_line(e)})") from None


def load_run_checkpoint(path, flag):
    """A Stage 2 checkpoint's contents, refused (CheckpointError) unless it holds its run's args."""
    ckpt = load_torch_file(path, flag=flag)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"{flag} {path}: not a FluxTalk Stage 2 checkpoint (no 'args')")
    return ckpt


def resume_path(args):
    """The checkpoint --resume names (auto: output_dir/checkpoint.pth, when there is one), or None."""
    if args.resume == "auto":
        path = os.path.join(args.output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    return args.resume or None


def first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0][:200] if lines else type(e).__name__


def atomic_write(path, write, mode="wb"):
    """write(file) into a temp file beside `path`, fsync, rename over `path`, fsync the folder (so the rename is
    durable too). On any failure the old `path` is untouched and the temp file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path, indent=2):
    """json.dump through atomic_write (values JSON does not know are written as str)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent, default=str), mode="w")


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj, path):
    """torch.save(obj, path) through atomic_write; a failure raises CheckpointWriteError naming `path`."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except Exception as e:
        raise CheckpointWriteError(f"{path}: writing the checkpoint failed ({type(e).__name__}: {e}); "
                                   f"the previous file, if any, is intact") from e


def out_of_space(e):
    """Whether ENOSPC is somewhere in the exception's chain. torch.save into a full disk raises RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos ...") with the file's OSError as its context."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def checkpoint_bytes(obj):
    """What torch.save(obj) takes on disk, estimated from the tensors in it (nested dicts, lists, tuples): their
    bytes, 512 per tensor (its zip entry, 64-byte alignment) and 64 KiB for the pickled rest; an upper bound."""
    tensors, stack = [], [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, (dict, list, tuple)):
            stack += list(x.values() if isinstance(x, dict) else x)
    return sum(t.nelement() * t.element_size() + 512 for t in tensors) + 64 * 1024


def allocated_bytes(path):
    """What a file takes on its disk (whole blocks)."""
    st = os.stat(path)
    return max(st.st_size, st.st_blocks * 512)


def remove_stale_temp_files(folder):
    """Temp files of writes that a kill -9 interrupted (never the live ones: those end in this pid)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".") and ".pth.tmp." in name and not name.endswith(f".tmp.{os.getpid()}"):
            os.remove(os.path.join(folder, name))


def append_line(path, line):
    """Append one text line with a single write + fsync, so a crash never leaves half a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state():
    """Every global RNG, in types `weights_only` loading accepts (numpy's array becomes a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_dict_mismatch(own, loaded):
    """None when `loaded` has exactly the keys and shapes of `own` (a module's state dict); else one line naming
    a few of the differences, e.g. "2 mismatches, e.g. pos_embed: (1, 577, 192) vs (1, 197, 192); head.bias:
    missing" (shapes: loaded vs own; missing: not in `loaded`; unexpected: only in `loaded`)."""
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in loaded.items()
           if k in own and v.shape != own[k].shape]
    bad += [f"{k}: missing" for k in own if k not in loaded]
    bad += [f"{k}: unexpected" for k in loaded if k not in own]
    return f"{len(bad)} mismatches, e.g. {'; '.join(bad[:5])}" if bad else None


# ------------------------------------------------------------------------------------------- the run's files

class Preempted(Exception):
    """A run stopped by a signal, once checkpoint.pth holds its state."""


@dataclass
class TrainState:
    """Where a run stands: with the weights, the optimizer and the RNG states, what a checkpoint holds."""
    epoch: int = 0  # the epoch in progress
    next_step: int = 0  # batches of `epoch` already consumed (== steps per epoch: the epoch is finished)
    global_step: int = 0  # optimizer steps so far (the TensorBoard step)
    best: float = -1.0  # best val_mean_r1 so far
    means: dict = None  # the epoch's running sums (engine's RunningMeans.state_dict()) when saved mid-epoch
    bad_samples: list = field(default_factory=list)  # "path: reason" of each bad sample skipped (--max_bad_samples)

    def next_epoch(self):
        self.epoch, self.next_step, self.means = self.epoch + 1, 0, None

    def update_best(self, metric):
        """True when `metric` beats the best so far (which it then becomes)."""
        is_best = metric > self.best
        self.best = max(self.best, metric)
        return is_best


class RunFiles:
    """The output_dir of one run: checkpoint.pth / checkpoint-best.pth / checkpoint-<epoch>.pth, log.txt,
    args.json and the TensorBoard events. Every rank holds one; rank 0 writes, and when a write fails every rank
    raises together (one rank alone raising would leave the others waiting in a collective)."""

    def __init__(self, args, model, optimizer, scaler, stage1_fingerprint):
        self.args, self.model, self.optimizer, self.scaler = args, model, optimizer, scaler
        self.fingerprint = stage1_fingerprint
        self.resume_path = resume_path(args)
        self.layout = None  # (world size, batch size) of the run that wrote the resumed checkpoint
        self.checkpoint_bytes = None  # what one checkpoint takes on disk: the last one written, or the resumed one
        self.writer = None  # TensorBoard, rank 0

    def path(self, name):
        return os.path.join(self.args.output_dir, name)

    @staticmethod
    def stored_args(args):
        """(path, args stored in it) of the --resume checkpoint, read before the model exists (--eval_only)."""
        path = resume_path(args)
        if path is None:
            raise CheckpointError(f"--eval_only --resume auto: no checkpoint.pth in {args.output_dir}")
        return path, load_run_checkpoint(path, "--resume")["args"]

    def resume(self):
        """The TrainState to start from: the --resume checkpoint's (weights, optimizer, scaler and this rank's RNG
        states loaded), or a fresh one, never over another run's output_dir."""
        if self.resume_path is None:
            if os.path.isfile(self.path("checkpoint.pth")):
                raise CheckpointError(f"--output_dir {self.args.output_dir} already holds a run (checkpoint.pth): "
                                      f"pass --resume auto to continue it, or choose another --output_dir")
            return TrainState()
        ckpt = self.load(self.resume_path)
        ranks = ckpt.get("rng_ranks") or []  # per rank; rank 0's alone when the world size changed
        set_rng_state(ranks[dist.get_rank()] if len(ranks) == dist.get_world_size() else ckpt["rng"])
        self.layout = (ckpt["args"].get("world_size"), ckpt["args"].get("batch_size"))
        self.checkpoint_bytes = allocated_bytes(self.resume_path)
        state = TrainState(ckpt["epoch"], ckpt["next_step"], ckpt["global_step"], ckpt.get("best_val_mean_r1", -1.0),
                           ckpt.get("partial"), ckpt.get("bad_samples", []))
        if dist.is_main():
            print(f"resumed from {self.resume_path}: epoch {state.epoch}, step {state.next_step}, best val_mean_r1 "
                  f"{state.best:.2f}")
        return state

    def load(self, path, ckpt=None):
        """Loads a checkpoint into model/optimizer/scaler; refuses a foreign file, another Stage 1 or another model
        shape. ckpt: the file's contents, when the caller has read it already."""
        ckpt = load_torch_file(path, flag="--resume") if ckpt is None else ckpt
        missing = [k for k in ("model", "optimizer", "epoch", "next_step", "global_step", "args", "stage1_fingerprint")
                   if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: not a FluxTalk Stage 2 checkpoint (missing key(s) {', '.join(missing)})")
        if ckpt["stage1_fingerprint"] != self.fingerprint:
            raise CheckpointError(f"{path}: was trained on another Stage 1 (fingerprint "
                                  f"{ckpt['stage1_fingerprint'][:12]} != {self.fingerprint[:12]} of "
                                  f"--stage1_checkpoint/--clip_pretrained); refusing")
        module = self.model.unwrapped_registers
        mismatch = state_dict_mismatch(module.state_dict(), ckpt["model"])
        if mismatch:
            raise CheckpointError(f"{path}: model shape does not match the flags ({mismatch}); resume with the flags "
                                  f"of that run (see its args)")
        module.load_state_dict(ckpt["model"])
        if self.optimizer is not None:  # None: weights only (embed_stage2.load_stage2)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        return ckpt

    def continue_at(self, state, steps_per_epoch):
        """An epoch-end checkpoint continues with the next epoch; a mid-epoch one only with the same ranks x batch
        size (next_step counts this rank's batches: another split of the epoch would repeat or skip samples)."""
        if state.next_step >= steps_per_epoch:
            state.next_epoch()
        elif state.next_step and self.layout != (self.args.world_size, self.args.batch_size):
            raise CheckpointError(f"{self.resume_path}: stopped mid-epoch with {self.layout[0]} rank(s) x --batch_size "
                                  f"{self.layout[1]}; resume it with the same, or from an epoch-end checkpoint")

    def start(self, state):
        """args.json, stale temp files gone, log.txt and TensorBoard cut back to where this run starts.

        output_dir describes this run: a resume drops what it will re-run, a fresh start drops an older run's lines
        and (purge_step=0) its TensorBoard events. Events at the checkpoint's own global_step (its last train/ line,
        and the val/ ones of an epoch-end checkpoint) were written before it and are not re-run: keep them (+1).
        """
        if dist.is_main():
            os.makedirs(self.args.output_dir, exist_ok=True)
            remove_stale_temp_files(self.args.output_dir)
            self.write_json("args.json", self.saved_args())
            self.trim_log(state.epoch)
            # weights and AdamW's two moments of each, until a checkpoint's own size is known
            size = self.checkpoint_bytes or checkpoint_bytes([self.model.trainable_state_dict()] * 3)
            print(f"checkpoints: {self.args.output_dir}: {shutil.disk_usage(self.args.output_dir).free:,} bytes free, "
                  f"{size:,} bytes per checkpoint{'' if self.checkpoint_bytes else ' (estimate)'}", flush=True)
        self.open_writer(state.global_step + 1 if self.resume_path else 0)

    def open_writer(self, purge_step):
        """TensorBoard on rank 0. purge_step drops events a crashed run logged past the resume point."""
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.args.log_dir, purge_step=purge_step)
        return self.writer

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def write_json(self, name, obj):
        """output_dir/<name>, written atomically (rank 0 calls it)."""
        write_json(obj, self.path(name))

    def saved_args(self):
        return {k: v for k, v in vars(self.args).items() if k != "device_obj"}

    def trim_log(self, start_epoch):
        """Drop log.txt lines of epochs >= start_epoch (they will be re-run), so no epoch appears twice."""
        if not os.path.isfile(self.path("log.txt")):
            return
        with open(self.path("log.txt")) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", -1) < start_epoch]
        atomic_write(self.path("log.txt"), lambda f: f.writelines(lines), mode="w")

    def log(self, line):
        """One JSON line appended to log.txt (rank 0)."""
        if dist.is_main():
            os.makedirs(self.args.output_dir, exist_ok=True)
            append_line(self.path("log.txt"), json.dumps(line))

    def save(self, state, names=("checkpoint.pth",)):
        """Every rank: the checkpoint of `state` written by rank 0 under each name (atomically). Only what trains (the
        register module), never the frozen Stage 1; state.means so that a resumed epoch logs the same averages, and
        state.bad_samples so that it counts skipped samples on (--max_bad_samples)."""
        ckpt = {
            "model": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "next_step": state.next_step,
            "global_step": state.global_step,
            "best_val_mean_r1": state.best,
            "args": self.saved_args(),
            "rng": rng_state(),  # rank 0's
            "rng_ranks": dist.all_gather_object(rng_state()),  # every rank's (attention dropout draws differ per rank)
            "stage1_fingerprint": self.fingerprint,
            "partial": state.means,
            "bad_samples": state.bad_samples,
        }
        error = None
        if dist.is_main():
            if self.writer is not None:
                self.writer.flush()  # TensorBoard up to this step survives a kill -9 (a resume purges only later steps)
            need = self.space_needed(names, ckpt)
            try:
                if shutil.disk_usage(self.args.output_dir).free < need:
                    raise self.disk_full(names, need)
                for name in names:
                    save_atomic(ckpt, self.path(name))
                self.checkpoint_bytes = allocated_bytes(self.path(names[0]))
            except (DiskFull, CheckpointWriteError) as e:
                error = self.disk_full(names, need) if out_of_space(e) else e
        dist.raise_from_rank0(error)  # every rank ends with rank 0's line and exit code

    def space_needed(self, names, ckpt):
        """Bytes free that writing `ckpt` under each of `names` needs: a new file keeps its room, a replaced one
        needs room for its temp file only while it is written (the old file goes at the rename)."""
        one = self.checkpoint_bytes or checkpoint_bytes(ckpt)
        new = sum(not os.path.exists(self.path(n)) for n in names)
        return one * (new + (new < len(names)))

    def disk_full(self, names, need):
        free = shutil.disk_usage(self.args.output_dir).free
        also = f" (and {', '.join(names[1:])})" if len(names) > 1 else ""
        return DiskFull(f"{self.path(names[0])}{also}: no space left on its disk for the checkpoint: {need:,} bytes "
                        f"needed, {free:,} bytes free; the checkpoints already there are intact: free space, then "
                        f"continue with --resume auto")

    def save_epoch_end(self, state, is_best):
        """checkpoint.pth; checkpoint-best.pth when the epoch's val_mean_r1 is the best so far; checkpoint-<epoch>.pth
        every --save_every epochs."""
        names = ["checkpoint.pth"] + (["checkpoint-best.pth"] if is_best else [])
        if self.args.save_every and (state.epoch + 1) % self.args.save_every == 0:
            names.append(f"checkpoint-{state.epoch}.pth")
        self.save(state, names)

    def preempted(self, signum, state):
        """The exception that ends a run stopped by a signal, once checkpoint.pth holds its state."""
        self.close()
        name = signal.Signals(signum).name if signum else "a stop request on another rank"
        return Preempted(f"caught {name} at epoch {state.epoch} step {state.global_step}: wrote "
                         f"{self.path('checkpoint.pth')}; resume with --resume auto")


# ------------------------------------------------------------------------------------------- one run per folder

class FolderInUse(CheckpointError):
    """Another live process holds the folder's lock; the message names the folder and that process."""


class FolderLock:
    """An exclusive lock on `folder` (the file folder/.lock, which names the holder's host and pid) for as long as this
    object is held, or FolderInUse at once; nothing in the folder is touched when refused.

    A POSIX record lock (fcntl.lockf): the kernel drops it when the holder dies, kill -9 included, so no stale lock can
    block a `--resume auto`; unlike flock it is not inherited by forked DataLoader workers (a worker outliving a
    killed run would keep holding it) and it works on NFS. Only the holding process opens the file."""

    NAME = ".lock"

    def __init__(self, folder, flag):
        path = os.path.join(folder, self.NAME)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise CheckpointError(f"{flag} {folder}: is a file, not a directory")
        try:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # EROFS, EACCES (not as root), ENOTDIR (a file on the way), ENOSPC
            raise CheckpointError(f"{flag} {folder}: is not writable ({e.strerror}: {e.filename})") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another process holds it
            holder = self.holder()
            os.close(self.fd)
            raise FolderInUse(f"{flag} {folder}: in use by another run ({holder}, lock {path}); wait for it to end "
                              f"or choose another {flag}") from None
        except OSError as e:
            os.close(self.fd)
            raise CheckpointError(f"{flag} {folder}: cannot lock {path} ({e.strerror}; a file system without "
                                  f"POSIX locks?)") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())

    def holder(self, tries=40):
        """What the holder wrote; it writes right after locking, so a launch racing it waits a moment for that."""
        for _ in range(tries):
            text = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.05)
        return "holder not named yet"

    def release(self):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


@contextlib.contextmanager
def folder_lock(folder, flag):
    """Every rank: rank 0 holds FolderLock(folder) for the block (one process per run takes it); when it cannot (another
    run holds it), every rank raises the same error (call after util.dist.init_distributed)."""
    lock, error = None, None
    if dist.is_main():
        try:
            lock = FolderLock(folder, flag)
        except CheckpointError as e:
            error = e
    dist.raise_from_rank0(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
