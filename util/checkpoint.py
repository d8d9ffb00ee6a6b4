"""Checkpoint I/O that never destroys the previous good state.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the target (atomic on POSIX), so a
crash or a full disk mid-write leaves the old file as it was. Reads use `torch.load(weights_only=True)`; the only
extra type allowed is `argparse.Namespace`, which TVL Stage 1 files carry.
"""
import argparse
import os
import pickle
import random
import re

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """Writing failed (disk full, permissions, ...): the input was fine, so not a bad-input exit."""


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
