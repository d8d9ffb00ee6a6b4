"""Stage 2 objective (DDP-exact contrastive loss + complementary terms) and retrieval metrics.

Notation: registers (B, K, E) per modality, the first K_o overlapping, the rest complementary; keep (B, K) the
nested-dropout prefix mask; shared = mean of the kept overlapping tokens (before normalisation). Total loss:

    contrastive                      mean over modality pairs of the symmetric CLIP loss on normalised shared
  + reg_weight * (l2 + diversity)    each of the two only when named in `complementary_reg_terms`:
        l2         mean over kept complementary tokens c of |c|^2 ("sum", grows with E) or |c|^2 / E ("mean")
        diversity  mean over kept c of cos(c, shared of its sample)^2 + mean over kept pairs of tokens of
                   different samples of cos(c, c')^2 (shared is detached)
  + recon_weight * recon             mean over samples of 1 - cos(decoder(all K tokens, dropped ones zeroed),
                                     Stage 1 global embedding): the overlapping tokens can carry it alone
  + residual_weight * residual       mean over samples with a kept complementary token of
                                     1 - cos(decoder([stop-gradient shared, mean of kept c]), Stage 1 global
                                     embedding): the overlapping outputs get no gradient from it (the shared
                                     register blocks do, through c), so only the complementary tokens can
                                     supply what shared lacks

Each complementary term is the mean over modalities of the per-modality term (all logged on their own) and is
exactly 0 (never NaN) where nothing it averages over was kept; l2 and diversity are logged even when off. The
recon / residual decoders are per-modality linear maps in the RegisterModule, made only when their weight is > 0.
Under DDP each rank returns a loss whose mean over ranks equals the single-process loss on the global batch,
and whose gradient, averaged by DDP, equals the single-process gradient (gather with gradient, local rows
against all columns, masked means normalised by global counts).
"""
import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

from util.dist import all_gather_cat, all_reduce_sum, get_rank, get_world_size
from util.misc import modality_pairs, pair_name


def gather_with_grad(x):
    """(B, ...) on every rank -> (world * B, ...), rank order; gradients flow back to each rank's slice."""
    if get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def contrastive_loss(z_a, z_b, logit_scale, all_a=None, all_b=None):
    """Symmetric CLIP loss on L2-normalised (B, E) features; equal to open_clip ClipLoss in one process.
    all_a / all_b: z_a / z_b gathered from every rank (gather_with_grad), when the caller already has them."""
    all_a = gather_with_grad(z_a) if all_a is None else all_a
    all_b = gather_with_grad(z_b) if all_b is None else all_b
    labels = torch.arange(z_a.shape[0], device=z_a.device) + get_rank() * z_a.shape[0]  # equal local batches
    loss_ab = F.cross_entropy(logit_scale * z_a @ all_b.T, labels)  # local rows of a->b
    loss_ba = F.cross_entropy(logit_scale * z_b @ all_a.T, labels)  # local rows of b->a
    return (loss_ab + loss_ba) / 2


def masked_mean(tokens, keep):
    """(B, K, E), bool (B, K) -> (B, E): mean over kept tokens; dropped values are selected out, not weighted."""
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(keep[..., None], tokens, torch.zeros_like(tokens)).sum(dim=1) / count


def complementary_masks(keep):
    """What complementary_terms needs from the keep mask alone, the same for every modality (so computed once a
    step: one all-gather, one all-reduce). keep bool (B, J) -> {"mask": (B*J,), "pairs": (B*J, W*B*J) kept tokens
    of different samples, local rows against all columns, "n_kept", "n_pairs": global counts, at least 1}."""
    world, rank = get_world_size(), get_rank()
    B, J = keep.shape
    mask = keep.reshape(B * J)
    all_sample = torch.arange(world * B, device=keep.device).repeat_interleave(J)  # global sample id per token
    sample = all_sample[rank * B * J:(rank + 1) * B * J]
    all_mask = all_gather_cat(mask.to(torch.uint8)).bool()  # gloo: no bool
    pairs = mask[:, None] & all_mask[None, :] & (sample[:, None] != all_sample[None, :])
    samples = keep.any(dim=1)
    n_kept, n_pairs, n_samples = all_reduce_sum(torch.stack([mask.sum(), pairs.sum(), samples.sum()])).clamp(min=1)
    return {"mask": mask, "pairs": pairs, "samples": samples, "n_kept": n_kept, "n_pairs": n_pairs,
            "n_samples": n_samples}


def complementary_terms(comp, keep, shared, masks=None, l2="sum"):
    """L2 and diversity terms of one modality's complementary tokens.

    comp (B, J, E) un-normalised complementary tokens, keep bool (B, J), shared (B, E) pooled overlapping
    embedding. Means run over kept tokens (and kept pairs of different samples) of the *global* batch; each
    term is exactly 0 when nothing is kept anywhere. `shared` is detached: the terms steer only the
    complementary tokens, the shared embedding answers to the contrastive loss alone.
    masks: complementary_masks(keep), when the caller computed it already.
    l2: "sum" = mean squared L2 norm (grows with E: hundreds at real widths against a diversity below 2, so one
    weight means different things at different widths); "mean" = the same divided by E (per coordinate).
    """
    masks = complementary_masks(keep) if masks is None else masks
    mask, pairs, n_kept, n_pairs = masks["mask"], masks["pairs"], masks["n_kept"], masks["n_pairs"]
    world = get_world_size()
    B, J, _ = comp.shape
    flat = comp.reshape(B * J, comp.shape[-1])
    zero = flat.new_zeros(())
    unit = F.normalize(flat, dim=-1)
    # L2 and cosine with the sample's own shared embedding: means over kept tokens
    sq_norm = torch.where(mask, flat.pow(2).sum(-1), zero)
    cos_shared = (unit * F.normalize(shared.detach(), dim=-1).repeat_interleave(J, dim=0)).sum(-1)
    cos_shared = torch.where(mask, cos_shared.pow(2), zero)
    l2_value = world * sq_norm.sum() / n_kept
    if l2 == "mean":
        l2_value = l2_value / comp.shape[-1]
    div_shared = world * cos_shared.sum() / n_kept
    # cosine between different samples' tokens: local kept rows against all kept columns of other samples
    all_unit = gather_with_grad(unit)
    div_cross = world * torch.where(pairs, (unit @ all_unit.T).pow(2), zero).sum() / n_pairs
    return l2_value, div_shared + div_cross


def residual_term(pred, target, masks):
    """1 - cos(pred, target) averaged over the global batch's samples with a kept complementary token; exactly 0
    when there is none. pred (B, E_m) the residual decoder's output, target (B, E_m) Stage 1 global embedding,
    masks: complementary_masks of the complementary keep mask."""
    cos = F.cosine_similarity(pred, target.to(pred.dtype), dim=-1)  # (B,)
    miss = torch.where(masks["samples"], 1 - cos, torch.zeros_like(cos))  # where(): a dropped row adds exactly 0
    return get_world_size() * miss.sum() / masks["n_samples"]


def topk_hits(sim, k):
    """sim (Nq, Ng), ground truth of query i is gallery i -> (Nq,) probability that the true item is in the top k
    when ties are broken at random, on the device.

    Ties matter: TVL captions repeat (many samples share "smooth, hard."), so a caption gallery holds identical
    embeddings. Counting ties for the query would reward collapse, counting them against would score a perfect
    model 0; the expectation over random tie-breaking scores a collapsed model exactly at chance (k / Ng).
    """
    truth = sim.diagonal()[:, None]  # (Nq, 1)
    others = ~torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)
    greater = ((sim > truth) & others).sum(dim=1)
    ties = ((sim == truth) & others).sum(dim=1)
    # the true item's position is uniform over greater .. greater + ties
    return ((k - greater) / (ties + 1)).clamp(0, 1)


def recall_at_k(sim, ks=(1, 5)):
    """sim (Nq, Ng), ground truth of query i is gallery i -> {k: Recall@k in %} (ties broken at random, in
    expectation)."""
    return {k: 100.0 * topk_hits(sim, k).float().mean().item() for k in ks}


def text_threshold_accuracy(sim, text_emb, threshold=0.9):
    """TVL text accuracy in %: a hit when the top-1 retrieved item's caption embedding (Stage 1 text, (N, E),
    index-aligned with queries and gallery) has cosine > threshold with the true caption's."""
    text = F.normalize(text_emb.float(), dim=-1)
    top1 = sim.argmax(dim=1)  # (Nq,)
    cos = (text[top1] * text[: sim.shape[0]]).sum(-1)
    return 100.0 * (cos > threshold).float().mean().item()


def prefix_curve(reg_a, reg_b, num_overlapping):
    """Recall@1 using only the first k overlapping tokens, k = 1..K_o; reg_*: (N, K, E) with all tokens kept.
    Returns {"a2b": [R@1 for k=1..K_o], "b2a": [...]} in %."""
    curve = {"a2b": [], "b2a": []}
    positions = torch.arange(reg_a.shape[1], device=reg_a.device)
    for k in range(1, num_overlapping + 1):
        keep = (positions < k)[None].expand(reg_a.shape[0], -1)
        z_a = F.normalize(masked_mean(reg_a, keep), dim=-1)
        z_b = F.normalize(masked_mean(reg_b, keep), dim=-1)
        sim = z_a @ z_b.T
        curve["a2b"].append(recall_at_k(sim, ks=(1,))[1])
        curve["b2a"].append(recall_at_k(sim.T, ks=(1,))[1])
    return curve


class Stage2Loss(nn.Module):
    """Contrastive loss over all modality pairs + weighted complementary terms (see the module docstring).

    complementary_reg_terms: which of "l2", "diversity" enter the loss (both are logged either way);
    complementary_l2: "sum" or "mean" (see complementary_terms); the recon / residual terms need the matching
    RegisterModule decoders (recon_dims / residual_dims). The defaults are the original objective.
    """

    def __init__(self, num_overlapping, complementary_reg_weight=0.0, complementary_recon_weight=0.0,
                 complementary_reg_terms=("l2", "diversity"), complementary_l2="sum",
                 complementary_residual_weight=0.0):
        super().__init__()
        if not set(complementary_reg_terms) <= {"l2", "diversity"}:
            raise ValueError(f"complementary_reg_terms must be among 'l2', 'diversity', got {complementary_reg_terms}")
        if complementary_l2 not in ("sum", "mean"):
            raise ValueError(f"complementary_l2 must be 'sum' or 'mean', got {complementary_l2!r}")
        self.num_overlapping = num_overlapping
        self.reg_weight, self.recon_weight = complementary_reg_weight, complementary_recon_weight
        self.reg_terms, self.l2 = tuple(complementary_reg_terms), complementary_l2
        self.residual_weight = complementary_residual_weight

    def forward(self, out):
        """out: the FluxTalk dict -> (total loss, {name: detached 0-d tensor})."""
        registers, keep, scale = out["registers"], out["keep"], out["logit_scale"]
        K_o = self.num_overlapping
        shared = {m: masked_mean(r[:, :K_o], keep[:, :K_o]) for m, r in registers.items()}  # (B, E)
        z = {m: F.normalize(s, dim=-1) for m, s in shared.items()}
        gathered = {m: gather_with_grad(v) for m, v in z.items()}  # one all-gather per modality, not per pair
        terms, contrastive = {}, []
        for a, b in modality_pairs(registers):
            name = pair_name(a, b)
            loss = contrastive_loss(z[a], z[b], scale, gathered[a], gathered[b])
            contrastive.append(loss)
            terms[f"contrastive_{name}"] = loss.detach()
            with torch.no_grad():  # stays on the device: no host sync per step
                sim = z[a] @ z[b].T
                hits = torch.cat([topk_hits(sim, 1), topk_hits(sim.T, 1)])
            terms[f"r1_{name}"] = 100.0 * hits.float().mean()
        total = terms["contrastive"] = torch.stack(contrastive).mean()
        masks = complementary_masks(keep[:, K_o:])
        l2, div = [], []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.reg_weight > 0):  # logged even at weight 0
            for m, r in registers.items():
                m_l2, m_div = complementary_terms(r[:, K_o:], keep[:, K_o:], shared[m], masks, self.l2)
                terms[f"comp_l2_{m}"], terms[f"comp_div_{m}"] = m_l2.detach(), m_div.detach()
                l2.append(m_l2)
                div.append(m_div)
            l2, div = torch.stack(l2).mean(), torch.stack(div).mean()
        terms["comp_l2"], terms["comp_div"] = l2.detach(), div.detach()
        if self.reg_weight > 0:
            reg = [v for t, v in (("l2", l2), ("diversity", div)) if t in self.reg_terms]  # a repeated name counts once
            total = total + self.reg_weight * sum(reg)
        recon = total.new_zeros(())
        if self.recon_weight > 0:
            if "recon" not in out:
                raise ValueError("complementary_recon_weight > 0 needs RegisterModule(recon_dims=...)")
            per_m = []
            for m, pred in out["recon"].items():
                loss = (1 - F.cosine_similarity(pred, out["global"][m].to(pred.dtype), dim=-1)).mean()
                terms[f"recon_{m}"] = loss.detach()
                per_m.append(loss)
            recon = torch.stack(per_m).mean()
            total = total + self.recon_weight * recon
        terms["recon"] = recon.detach()
        if self.residual_weight > 0:
            if "residual" not in out:
                raise ValueError("complementary_residual_weight > 0 needs RegisterModule(residual_dims=...)")
            per_m = []
            for m, pred in out["residual"].items():
                loss = residual_term(pred, out["global"][m], masks)
                terms[f"residual_{m}"] = loss.detach()
                per_m.append(loss)
            residual = torch.stack(per_m).mean()
            terms["residual"] = residual.detach()
            total = total + self.residual_weight * residual
        terms["logit_scale"] = scale.detach()
        terms["loss"] = total.detach()
        return total, terms
