"""Checkpoint I/O that never destroys the previous good state.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the target (atomic on POSIX), so a
crash or a full disk mid-write leaves the old file as it was. Reads use `torch.load(weights_only=True)`; the only
extra type allowed is `argparse.Namespace`, which TVL Stage 1 files carry.
"""
import argparse
import os
import pickle
import random
import zipfile

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def load_torch_file(path):
    """torch.load with weights_only=True (+ argparse.Namespace). Raises CheckpointError naming `path` on failure."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses arbitrary classes; we never turn that safety off.
        first = str(e).strip().splitlines()
        why = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(f"{path}: refused to unpickle (only tensors, plain containers and "
                              f"argparse.Namespace are loaded, weights_only=True): {why.strip()}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or another format?): {msg}") from None


def save_atomic(obj, path):
    """torch.save(obj, path) via temp file + fsync + rename. On any failure the old `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception):
            raise CheckpointError(f"{path}: writing the checkpoint failed ({type(e).__name__}: {e}); "
                                  f"the previous file, if any, is intact") from e
        raise


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
