"""train_one_epoch and evaluate (in the style of MAE's engine_pretrain.py).

Host syncs: the training loop keeps running sums of every logged value on the device and reads them back only every
`--print_freq` steps (and at checkpoints), so a GPU step is never stalled by logging. The one per-step host-side
exchange is the preemption flag (`util.dist.any_rank`, a gloo message that does not wait for the GPU).
"""
import resource
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

import util.dist as dist
from loss_stage2 import prefix_curve, recall_at_k, tvl_metrics
from util.lr_sched import adjust_learning_rate, nested_dropout_rate_at
from util.misc import autocast, modality_pairs, pair_name, to_device


class NonFiniteLoss(RuntimeError):
    pass


def step_seed(seed, micro_step, rank):
    """Seed of the nested-dropout draw of one micro-step on one rank: a pure function, so a resumed run redraws
    exactly what the uninterrupted run drew (no generator state to carry)."""
    return (seed * 1_000_003 + micro_step * 8_191 + rank) % (2**63 - 1)


def max_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_one_epoch(model, criterion, loader, optimizer, scaler, state, steps_per_epoch, args, writer=None,
                    save=None, stop_requested=lambda: False):
    """Trains epoch `state.epoch` from batch `state.next_step` (non-zero when resuming mid-epoch; `loader` already
    skips those), advancing state.next_step and state.global_step (a util.checkpoint.TrainState).

    save(state): writes checkpoint.pth; called every `--save_every_steps` optimizer steps and at a stop request, with
    state.means holding the epoch's running sums (so a resumed epoch logs the same averages).
    Logging happens every `--print_freq` optimizer steps, keyed by the global optimizer step.
    Returns (averages of the logged terms over the epoch, "done" | "stopped").
    """
    model.train()
    device, rank = args.device_obj, dist.get_rank()
    registers = model.registers
    gen = torch.Generator(device=device)  # nested dropout draws, reseeded from (seed, step, rank) each micro-step
    means = RunningMeans(device, state.means)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    grad_norm = torch.zeros((), device=device)
    log = StepLog(state, steps_per_epoch, writer)
    batch_ids = {}  # micro-step -> its batch's dataset indices, since the last finiteness check (which names them)
    for i, batch in enumerate(loader, start=state.next_step):
        log.batch_arrived()
        micro_step = state.epoch * steps_per_epoch + i
        epoch_f = state.epoch + i / steps_per_epoch
        boundary = (i + 1) % args.accum_iter == 0 or i + 1 == steps_per_epoch
        if i % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch_f, args)
            model.unwrapped_registers.nested_dropout_rate = nested_dropout_rate_at(
                epoch_f, args.nested_dropout_rate, args.nested_dropout_ramp_epochs)

        batch_ids[micro_step] = batch["index"].tolist()  # still on the host: no device sync
        batch = to_device(batch, device)
        gen.manual_seed(step_seed(args.seed, micro_step, rank))
        sync = nullcontext() if boundary or not hasattr(registers, "no_sync") else registers.no_sync()
        with sync:
            with autocast(device, args.precision):
                out = model(batch, generator=gen)
                loss, terms = criterion(out)
            scaler.scale(loss / args.accum_iter).backward()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), micro_step, first_bad)

        if boundary:
            grad_norm = optimizer_step(optimizer, scaler, model.unwrapped_registers, args.clip_grad)
            state.global_step += 1
        means.add(dict(terms, grad_norm=grad_norm.detach().float()))
        state.next_step = i + 1
        log.step_done(batch["index"].shape[0] * dist.get_world_size())

        last = i + 1 == steps_per_epoch
        if boundary and (state.global_step % args.print_freq == 0 or last):
            check_finite(first_bad, batch_ids, loader.dataset)
            log.write(means.log_window(), state, lr, model.unwrapped_registers.nested_dropout_rate, device)
        if boundary and not last:
            stop = dist.any_rank(stop_requested())
            if stop or args.save_every_steps and state.global_step % args.save_every_steps == 0:
                check_finite(first_bad, batch_ids, loader.dataset)
                state.means = means.state_dict()
                save(state)
            if stop:
                log.close()
                return means.epoch_means(), "stopped"
        log.wait_for_batch()
    log.close()
    state.means = None  # the epoch is complete: its checkpoint carries no running sums
    return means.epoch_means(), "done"


def optimizer_step(optimizer, scaler, registers, clip_grad):
    """Unscale, clip (or only measure) the gradient norm, step, zero the gradients, clamp the logit scale in place
    (as OpenCLIP does); returns the norm (on device)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in registers.parameters() if p.requires_grad],
                                               clip_grad or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    registers.clamp_logit_scale()
    return grad_norm


class RunningMeans:
    """Running sums of each step's logged terms over two spans, the window since the last log line and the epoch.

    The sums stay on the device (no host sync per step); they are read back, averaged over ranks, only at log lines
    and checkpoints. Averaging over ranks matters: each rank's loss terms are its share of the global-batch value
    (see loss_stage2)."""

    def __init__(self, device, state=None):
        self.device = device
        self.window, self.n_window = {}, 0  # {term: 0-dim tensor on device}, steps
        self.epoch, self.n_epoch = {}, 0
        if state:
            self.load_state_dict(state)

    def add(self, terms):
        """One step's {name: 0-dim tensor}."""
        for k, v in terms.items():
            self.window[k] = self.window.get(k, 0.0) + v.detach().float()
        self.n_window += 1

    def log_window(self):
        """Means of the window as host floats; the window then joins the epoch and starts over."""
        means = self.host_means(self.window, self.n_window)
        for k, v in self.window.items():
            self.epoch[k] = self.epoch.get(k, 0.0) + v
        self.n_epoch += self.n_window
        self.window, self.n_window = {}, 0
        return means

    def epoch_means(self):
        return self.host_means(self.epoch, self.n_epoch)

    def state_dict(self):
        """Host floats averaged over ranks (every rank calls it); what a mid-epoch checkpoint stores."""
        return {"window": self.snapshot(self.window, self.n_window), "epoch": self.snapshot(self.epoch, self.n_epoch)}

    def load_state_dict(self, state):
        """Every rank restarts from the rank average, which averages to the same value."""
        self.window, self.n_window = self.restore(state["window"])
        self.epoch, self.n_epoch = self.restore(state["epoch"])

    def restore(self, snapshot):
        """Inverse of snapshot."""
        return {k: torch.tensor(v, device=self.device) for k, v in snapshot["sums"].items()}, snapshot["n"]

    @staticmethod
    def snapshot(sums, n):
        """Sums averaged over ranks, as host floats (one collective, one device->host copy)."""
        keys = list(sums)
        values = dist.reduce_mean(torch.stack([sums[k] for k in keys])).cpu().tolist() if keys else []
        return {"sums": dict(zip(keys, values)), "n": n}

    @staticmethod
    def host_means(sums, n):
        """Means over steps and ranks."""
        return {k: v / n for k, v in RunningMeans.snapshot(sums, n)["sums"].items()}


class StepLog:
    """The progress bar; samples/s and the share of time spent waiting for data since the last log line; and the log
    line itself: TensorBoard, plus one plain stdout line when stdout is not a terminal (SLURM, CI)."""

    def __init__(self, state, steps_per_epoch, writer):
        self.epoch, self.steps_per_epoch, self.writer = state.epoch, steps_per_epoch, writer
        self.interactive = dist.is_main() and sys.stdout.isatty()
        self.bar = tqdm(total=steps_per_epoch, initial=state.next_step, disable=not self.interactive,
                        dynamic_ncols=True, desc=f"epoch {state.epoch}", file=sys.stdout, mininterval=1.0)
        self.start_window()
        self.wait_for_batch()

    def start_window(self):
        self.t_window, self.wait, self.samples = time.perf_counter(), 0.0, 0

    def wait_for_batch(self):
        self.t_wait = time.perf_counter()

    def batch_arrived(self):
        self.wait += time.perf_counter() - self.t_wait

    def step_done(self, samples):
        self.samples += samples
        self.bar.update(1)

    def write(self, means, state, lr, nested_dropout_rate, device):
        elapsed = time.perf_counter() - self.t_window
        means.update(lr=lr, samples_per_s=self.samples / elapsed, data_wait_frac=self.wait / elapsed,
                     max_mem_mb=max_memory_mb(device), nested_dropout_rate=nested_dropout_rate)
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, state.global_step)
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
        if dist.is_main() and not self.interactive:
            print(f"epoch {self.epoch} [{state.next_step}/{self.steps_per_epoch}] loss {means['loss']:.4f} lr "
                  f"{lr:.2e} {means['samples_per_s']:.1f} samples/s data wait {100 * means['data_wait_frac']:.0f}%",
                  flush=True)
        self.start_window()

    def close(self):
        self.bar.close()


def check_finite(first_bad, batch_ids, dataset):
    """Stops every rank together at the first non-finite loss, before anything is saved, naming the samples of the
    batch where it happened (batch_ids: {micro-step: dataset indices} since the last check, then cleared)."""
    bad, kept = int(first_bad.item()), "stopping all ranks, the last checkpoint written before it is kept"
    error = None
    if bad >= 0:
        names = getattr(dataset, "sample_ids", None)
        ids = [names[i] if names else i for i in batch_ids[bad]]
        error = NonFiniteLoss(f"non-finite loss at micro-step {bad} on rank {dist.get_rank()}, in the batch of its "
                              f"{len(ids)} samples {', '.join(map(str, ids))}; {kept}")
    dist.raise_together(error, NonFiniteLoss(f"non-finite loss on another rank (see its error line); {kept}"))
    batch_ids.clear()


@torch.no_grad()
def compute_embeddings(model, loader, args):
    """Runs the model over a whole split, all tokens kept. Returns {"registers": {m: (N, K, E)}, "global": {m: (N, E)}
    Stage 1's own global embeddings, "index": (N,)}, gathered from every rank, with the duplicates that
    DistributedSampler pads in removed, sorted by index."""
    model.eval()
    device = args.device_obj
    parts, index = {"registers": {}, "global": {}}, []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, args.precision):
            out = model(batch)
        for kind, per_m in parts.items():
            for m, x in out[kind].items():
                per_m.setdefault(m, []).append(x.float())
        index.append(batch["index"])
    index = dist.all_gather_cat(torch.cat(index))
    order = unique_first(index)
    emb = {kind: {m: dist.all_gather_cat(torch.cat(xs))[order].cpu() for m, xs in per_m.items()}
           for kind, per_m in parts.items()}
    emb["index"] = index[order].cpu()
    return emb


def unique_first(index):
    """Positions of the first occurrence of each distinct index, in increasing index order."""
    index = index.cpu()
    order = torch.argsort(index, stable=True)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    return order[keep]


def pooled(registers, k):
    """(N, K, E) registers, all kept -> (N, E): the L2-normalised mean of the first k tokens."""
    return F.normalize(registers[:, :k].mean(dim=1), dim=-1)


def retrieval_metrics(z, text_global=None):
    """Whole-split retrieval between L2-normalised embeddings z {m: (N, E)}, row i of every modality = sample i.

    Returns ({metric: percent}, {pair: (N, N) similarity}). Per pair a_b (full modality names, sorted) and direction
    q->g: <a>_<b>_<q>2<g>_r1 / _r5 (Recall@k), <a>_<b>_r1 (their mean), mean_r1 over every pair and direction; and
    TVL's published metrics (loss_stage2.tvl_metrics): touch_vision_acc on tactile_vision, touch_language_acc@T on
    tactile_text (text_global: Stage 1's text embeddings of the captions, which decide what counts as a hit).
    """
    metrics, sims, r1_all = {}, {}, []
    for a, b in modality_pairs(z):
        name = pair_name(a, b)
        sim = sims[name] = z[a] @ z[b].T  # row i = query a_i, column j = gallery b_j; pairs on the diagonal
        for q, g, s in ((a, b, sim), (b, a, sim.T)):
            rec = recall_at_k(s, ks=(1, 5))
            metrics[f"{name}_{q}2{g}_r1"], metrics[f"{name}_{q}2{g}_r5"] = rec[1], rec[5]
            r1_all.append(rec[1])
        metrics[f"{name}_r1"] = (r1_all[-2] + r1_all[-1]) / 2
        if name == "tactile_vision":
            metrics.update(tvl_metrics(sim))
        elif name == "tactile_text" and text_global is not None:
            metrics.update(tvl_metrics(sim, text_global))
    metrics["mean_r1"] = sum(r1_all) / len(r1_all)
    return metrics, sims


def evaluate(model, loader, args):
    """Cross-modal retrieval over the whole split (docs/reference.md, section 6), for Stage 2 and, on the same
    samples and captions, for Stage 1's own global embeddings (the baseline TVL reports).

    Returns (metrics, artifacts). metrics: Stage 2's retrieval_metrics plus the prefix curve <a>_<b>_prefix<k>_r1
    (Recall@1 from the first k overlapping tokens) and num_samples, each key prefixed with the split
    ("val_mean_r1" selects the best checkpoint). artifacts: {"stage2": metrics without the prefix, "stage1": Stage
    1's retrieval_metrics, "sim": {pair: (N, N)}, "prefix": {pair: [R@1 at k = 1..K_o]}}.
    """
    emb = compute_embeddings(model, loader, args)
    regs, glob, k_o = emb["registers"], emb["global"], args.num_overlapping_tokens
    text = glob.get("text")
    stage2, sims = retrieval_metrics({m: pooled(r, k_o) for m, r in regs.items()}, text)
    stage1, _ = retrieval_metrics({m: F.normalize(g, dim=-1) for m, g in glob.items() if m in regs}, text)
    prefixes = {}
    for a, b in modality_pairs(regs):
        name = pair_name(a, b)
        curves = prefix_curve(regs[a], regs[b], k_o)  # {"a2b": [R@1 at k = 1..K_o], "b2a": [...]}
        prefixes[name] = [(x + y) / 2 for x, y in zip(curves["a2b"], curves["b2a"])]
        stage2.update({f"{name}_prefix{k}_r1": v for k, v in enumerate(prefixes[name], start=1)})
    stage2["num_samples"] = float(len(emb["index"]))
    metrics = {f"{args.eval_split}_{k}": v for k, v in stage2.items()}
    return metrics, {"stage2": stage2, "stage1": stage1, "sim": sims, "prefix": prefixes}


def log_eval(writer, metrics, artifacts, step):
    """Scalars (val_mean_r1 -> val/mean_r1), the prefix curve and, per pair, the similarity matrix as an image with its
    diagonal's and off-diagonal's means as scalars (rank 0 only)."""
    if writer is None:
        return
    for k, v in metrics.items():
        writer.add_scalar("/".join(k.split("_", 1)), v, step)
    split = next(iter(metrics)).split("_", 1)[0]
    for name, sim in artifacts["sim"].items():
        image, diag, off = affinity_image(sim)
        writer.add_image(f"affinity/{name}", image, step, dataformats="HWC")
        writer.add_scalar(f"affinity/{name}_diagonal", diag, step)
        writer.add_scalar(f"affinity/{name}_off_diagonal", off, step)
    writer.add_figure(f"{split}/prefix_curve", prefix_figure(artifacts["prefix"]), step)


def log_baseline(writer, stage1_metrics, split):
    """Stage 1's own numbers on the evaluation split, once per run (constant): baseline_stage1/<split>_<metric>."""
    if writer is not None:
        for k, v in stage1_metrics.items():
            writer.add_scalar(f"baseline_stage1/{split}_{k}", v, 0)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def affinity_image(sim, max_n=256, min_px=256):
    """The top-left (n, n) block of a cosine-similarity matrix (row = query, column = gallery, pairs on the
    diagonal) as an (H, W, 3) uint8 image: viridis on the fixed range [-1, 1], so colours compare across steps and
    runs; each sample a square block of at least min_px / n pixels (no smoothing). Drawn directly, without a
    matplotlib figure (a figure cost 0.1-0.2 s per pair and evaluation).
    -> (image, diagonal mean, off-diagonal mean)."""
    n = min(sim.shape[0], max_n)
    s = sim[:n, :n].float()
    diag = s.diagonal().mean().item()
    off = (s.sum() - s.diagonal().sum()).item() / max(n * n - n, 1)
    import matplotlib
    rgb = matplotlib.colormaps["viridis"](((s.clamp(-1, 1) + 1) / 2).numpy(), bytes=True)[..., :3]  # (n, n, 3)
    block = -(-min_px // n)  # ceil
    return rgb.repeat(block, axis=0).repeat(block, axis=1), diag, off


def prefix_figure(prefixes):
    fig, ax = pyplot().subplots(figsize=(4, 3))
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.16, top=0.95)
    for name, curve in prefixes.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("overlapping tokens kept (prefix k)")
    ax.set_ylabel("Recall@1 (%)")
    ax.set_xticks(range(1, len(next(iter(prefixes.values()))) + 1))
    ax.legend(fontsize=7)
    return fig
