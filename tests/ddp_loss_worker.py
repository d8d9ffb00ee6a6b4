"""Worker for the DDP exactness test: 2 gloo processes, each on its half of a fixed global batch, for every case."""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from loss_stage2 import Stage2Loss
from tvl_stage2 import RegisterModule

GLOBAL_BATCH, K, K_O, E, N = 8, 4, 2, 16, 6
DIMS = {"tactile": 12, "text": 10, "vision": 14}
# Every loss term is on in every case: the shared pathway with the own residual, and the separate pathway with the
# partner residual and the all-prefix contrastive loss; on each, the token term in each of its forms (a model's token
# decoders are built for one target): pooled cosine (the cases "shared" and "separate"), per-token cosine
# ("_tokens"), pooled InfoNCE ("_infonce").
PATHWAYS = {"shared": (dict(), dict()),
            "separate": (dict(complementary_pathway="separate", residual_source="partner"),
                         dict(contrastive_prefixes="all"))}
TOKEN_FORMS = {"": ("pooled", "cosine"), "_tokens": ("tokens", "cosine"), "_infonce": ("pooled", "infonce")}
CASES = {p + f: (dict(model_kw, token_target=t),
                 dict(loss_kw, complementary_difference_weight=0.2, complementary_view_weight=0.3,
                      complementary_token_weight=0.25, complementary_token_target=t, complementary_token_loss=loss))
         for p, (model_kw, loss_kw) in PATHWAYS.items() for f, (t, loss) in TOKEN_FORMS.items()}


def build_case(case="shared"):
    """Same model, batch and keep mask on every process (seeded): (module, loss_fn, tokens, pad, global, keep);
    tokens["view2"] holds a second view of the batch (the view term). The text padding differs between the halves,
    so the token term's per-position centring needs the global batch's counts."""
    model_kw, loss_kw = CASES[case]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = RegisterModule(DIMS, E, num_tokens=K, num_overlapping=K_O, width=32, depth=2, num_heads=4,
                            recon_dims={m: E for m in DIMS}, residual_dims={m: E for m in DIMS}, token_dims=DIMS,
                            token_counts={m: N for m in DIMS}, **model_kw)
    tokens = {m: torch.randn(GLOBAL_BATCH, N, c, generator=g) for m, c in DIMS.items()}
    pad = {"text": torch.arange(N)[None, :] >= torch.randint(2, N + 1, (GLOBAL_BATCH, 1), generator=g)}
    glob = {m: torch.randn(GLOBAL_BATCH, E, generator=g) for m in DIMS}
    tokens["view2"] = {m: t + 0.5 * torch.randn(t.shape, generator=g) for m, t in tokens.items()}
    # prefix lengths 1..K: some samples keep no complementary token, some keep 1 or 2; the halves keep different
    # numbers of samples with a complementary token (2 and 3), so a per-rank mean would differ from the global one
    keep = torch.arange(K)[None, :] < torch.tensor([4, 1, 3, 2, 4, 3, 4, 2])[:, None]
    loss_fn = Stage2Loss(K_O, complementary_reg_weight=0.5, complementary_recon_weight=0.3,
                         complementary_residual_weight=0.4, **loss_kw)
    return module, loss_fn, tokens, pad, glob, keep


def step(module, loss_fn, tokens, pad, glob, keep, rows):
    pad = {m: p[rows] for m, p in pad.items()}
    view2 = {"tokens": {m: t[rows] for m, t in tokens["view2"].items()}, "padding_mask": pad}
    out = module({m: t[rows] for m, t in tokens.items() if m != "view2"}, pad, keep=keep[rows], view2=view2)
    out["global"] = {m: g[rows] for m, g in glob.items()}
    out["context"], out["padding_mask"] = {m: t[rows] for m, t in tokens.items() if m != "view2"}, pad
    total, terms = loss_fn(out)
    total.backward()
    return total, terms


def worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # One intra-op thread per rank, as conftest.launch_command gives torchrun's: the ranks share the cores, and with
    # several threads each, every collective waited on threads spinning on a busy machine (seconds per step, measured).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for case in CASES:
        module, loss_fn, tokens, pad, glob, keep = build_case(case)
        ddp = DistributedDataParallel(module)  # no find_unused_parameters: every parameter must get a gradient
        local = GLOBAL_BATCH // world
        total, terms = step(ddp, loss_fn, tokens, pad, glob, keep, slice(rank * local, (rank + 1) * local))
        names = [k for k in sorted(terms) if not k.startswith("r1_")]
        values = torch.stack([total.detach()] + [terms[k] for k in names])
        dist.all_reduce(values)
        values /= world  # loss and logged terms: mean over ranks = the global-batch value
        results[case] = {"values": dict(zip(["total"] + names, values)),
                         "grads": {n: p.grad.clone() for n, p in module.named_parameters()}}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()
