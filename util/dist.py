"""torchrun / DDP helpers. One process per device; a single process is world size 1 (no process group)."""
import contextlib
import datetime
import os
import signal
import sys
import weakref

import torch
import torch.distributed as dist

_CONTROL_GROUP = None  # gloo group for tiny host-side messages (preemption flags) that must not sync the GPU


def add_device_args(group):
    """--device and --precision, shared by training and feature caching (finish with resolve_device_args)."""
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda (NCCL, one GPU per local rank) or cpu (gloo)")
    group.add_argument("--precision", default=None, choices=["fp32", "amp_bf16", "amp_fp16"],
                       help="default: amp_bf16 on CUDA, fp32 on CPU")


def resolve_device_args(parser, args):
    """A missing GPU is a flag error; the precision default follows the device."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible here (use --device cpu)")
    if args.precision is None:
        args.precision = "amp_bf16" if args.device.startswith("cuda") else "fp32"


def init_distributed(device):
    """Reads torchrun's env, joins the process group once, picks this rank's device.

    Returns (rank, world_size, torch.device). `device` is "cuda" or "cpu" (or "cuda:N" without torchrun).
    """
    global _CONTROL_GROUP
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():  # the entry points check this at parse time already
            raise RuntimeError(f"--device {device}: no CUDA device is visible (use --device cpu)")
        dev = torch.device("cuda", local_rank) if world_size > 1 else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        _CONTROL_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return rank, world_size, dev


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn. Schedulers signal the whole process group; torch's worker SIGTERM handler would
    kill the worker mid-batch and take the run down before the main process could save. The main process alone
    acts on SIGTERM/SIGUSR1. Such workers must be shut down explicitly (`tracked_loader`): at interpreter exit
    multiprocessing ends daemonic children with SIGTERM and joins them, which would wait forever."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


_LOADERS = weakref.WeakSet()  # DataLoaders whose workers run_entry_point shuts down, whatever way the run ends


def tracked_loader(loader):
    """Registers a DataLoader for shutdown_loaders (called by run_entry_point on every exit path); returns it."""
    _LOADERS.add(loader)
    return loader


def shutdown_loaders():
    """Ends the worker processes of every tracked loader now: torch's own shutdown (a None on each index queue, a
    join with a timeout), then SIGKILL for any worker still alive, since the SIGTERM torch falls back on is ignored."""
    for loader in list(_LOADERS):
        it, loader._iterator = getattr(loader, "_iterator", None), None
        workers = getattr(it, "_workers", [])
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def any_rank(flag):
    """True on every rank if `flag` is True on any rank. Host-side (gloo), so it never waits for the GPU."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(t.item())


def raise_together(error, elsewhere):
    """Every rank raises when any rank has an `error` (an exception or None): its own, or `elsewhere` (the one to
    raise where this rank was fine). One rank alone raising would leave the others waiting in a collective."""
    if any_rank(error is not None):
        raise together(error or elsewhere)


def raise_from_rank0(error):
    """Rank 0's `error` (an exception or None), raised on every rank: each rank ends with rank 0's line."""
    error = all_gather_object(error)[0]
    if error:
        raise together(error)


def together(error):
    """Marks an exception that every rank raises at the same point, so run_entry_point lets the ranks leave together
    (finish_together) instead of one tearing the process group down under another."""
    error.raised_together = True
    return error


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (host-side, on the gloo control group)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL_GROUP)
    return out


def all_gather_cat(t):
    """(n, ...) per rank -> (world * n, ...), rank-major. Every rank must pass the same shape (no gradient)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_reduce_sum(t):
    """Sum of a tensor over ranks (on a copy; no gradient)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def reduce_mean(t):
    """Mean of a tensor over ranks (in place on a copy)."""
    return all_reduce_sum(t) / get_world_size()


def cleanup():
    """Tears the process group down now, its threads included, while the interpreter is intact."""
    global _CONTROL_GROUP
    if is_dist():
        dist.destroy_process_group()
        # destroy_process_group only unregisters the groups: a gloo group and its threads live until its last
        # reference goes, and this one kept them into interpreter shutdown. A worker thread late to free a finished
        # all_gather (tensors with Python objects: on a loaded machine) then needs the GIL, and Python ends a thread
        # taking the GIL while finalizing: std::terminate, SIGABRT ("terminate called without an active exception")
        # instead of the exit code. Dropped here, the group joins its threads now (without holding the GIL).
        _CONTROL_GROUP = None


def finish_together(timeout_s=120):
    """On success, every rank waits here for the others before the process group is torn down: a rank that tore it
    down while another was still writing its last files was seen to abort in gloo's threads (SIGABRT) under
    torchrun. A monitored barrier on the gloo control group: a rank that never comes raises after timeout_s instead
    of hanging."""
    if is_dist():
        dist.monitored_barrier(group=_CONTROL_GROUP, timeout=datetime.timedelta(seconds=timeout_s))


def exception_message(e):
    """str(e); for one re-raised from a DataLoader worker, the original one-line message without the traceback."""
    msg = str(e)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    return msg


def run_entry_point(run, args, outcomes):
    """Runs `run(args)` for a torchrun entry point and returns the process exit code.

    outcomes: [(exception types, exit code, label)], first match wins. Such an exception is an expected end (bad
    input, a stop signal, a failed write): print "<label>: <message>" on one line instead of a traceback. Loader
    workers (tracked_loader) are always ended and the process group torn down.
    """
    try:
        run(args)
        finish_together()
        return 0
    except Exception as e:
        for types, code, label in outcomes:
            if isinstance(e, types):
                # one write, newline included: print's two (text, then end) interleave with other ranks' lines
                # on a shared unbuffered stderr
                sys.stderr.write(f"{label}: {exception_message(e)}\n")
                sys.stderr.flush()
                if getattr(e, "raised_together", False):
                    # Every rank is here: leave together, as on success (a rank tearing gloo down while another
                    # still used it aborted with SIGABRT, seen with two launches into one folder under load).
                    with contextlib.suppress(Exception):
                        finish_together(timeout_s=30)
                return code
        raise
    finally:
        shutdown_loaders()  # before the process group goes: a worker must not outlive its rank
        if is_dist():
            # The run is over. torchrun stops the other ranks with SIGTERM as soon as one exits; ignored from here on
            # (it stays ignored through interpreter shutdown), it cannot turn this rank's exit code into -15.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup()
