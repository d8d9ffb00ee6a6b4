"""Stage 2 objective (DDP-exact contrastive loss + complementary terms) and retrieval metrics.

Notation: registers (B, K, E) per modality, the first K_o overlapping, the rest complementary; keep (B, K) the
nested-dropout prefix mask; shared = mean of the kept overlapping tokens (before normalisation); c = a kept
complementary token, comp = the mean of a sample's kept complementary tokens. Total loss:

    contrastive                      mean over modality pairs of the symmetric CLIP loss on normalised shared;
                                     with contrastive_prefixes "all" (Matryoshka Representation Learning), its
                                     mean over k = 1..K_o of the loss on the normalised mean of the kept tokens
                                     among the first k (a sample that kept fewer pools those it kept)
  + reg_weight * (l2 + diversity)    each of the two only when named in `complementary_reg_terms`:
        l2         mean over kept complementary tokens c of |c|^2 ("sum", grows with E) or |c|^2 / E ("mean")
        diversity  mean over kept c of cos(c, shared of its sample)^2 + mean over kept pairs of tokens of
                   different samples of cos(c, c')^2 (shared is detached)
  + recon_weight * recon             mean over samples of 1 - cos(decoder(all K tokens, dropped ones zeroed),
                                     Stage 1 global embedding): the overlapping tokens can carry it alone
  + residual_weight * residual       mean over samples with a kept complementary token of
                                     1 - cos(decoder([stop-gradient shared, comp]), Stage 1 global embedding):
                                     the overlapping outputs get no gradient from it (the shared register blocks
                                     do, through c), so only the complementary tokens can supply what shared lacks.
                                     Residual source "partner": shared of each other modality instead, the term
                                     averaged over them (the partner never saw this modality's specific factors)
  + difference_weight * difference   Domain Separation Networks' batch-level difference loss
                                     ||S~^T C~||_F^2 / (n^2 E^2) over the n samples of the global batch with a
                                     kept complementary token, S~ / C~ their detached shared / comp, each column
                                     standardised over those n rows: the mean squared correlation between the
                                     codes' coordinates, so comp cannot linearly encode what shared holds
  + view_weight * view               FactorCL-style intra-modality view contrastive term: symmetric InfoNCE at a
                                     fixed temperature (VIEW_TEMPERATURE) between the normalised comp of two
                                     augmented views of each sample with a kept complementary token, across the
                                     global batch (out["view2"]: the second view's registers, same keep mask)
  + token_weight * token             token-level residual: the modality's own frozen Stage 1 context tokens (the
                                     (B, N_m, C_m) the registers read, before the adapter; padded text positions
                                     left out), decoded from the residual's input [stop-gradient shared of the
                                     modality itself or of each partner, comp]. Target "pooled": their mean over
                                     the valid positions (B, C_m), centred (minus the global batch's per-channel
                                     mean), Linear decoder; "tokens": every token, centred per position over the
                                     global batch's samples where that position is valid, one decoder query per
                                     position (tvl_stage2.TokenDecoder). Loss "cosine": 1 - cos(prediction,
                                     centred target) (per token, then the mean over the sample's valid positions),
                                     averaged as the residual term is (partners, then the global batch's samples with
                                     a kept complementary token); 1 - cos lies in [0, 2] whatever C_m, so weight 1
                                     means the same at every width. Loss "infonce" (pooled only): the view term's
                                     symmetric InfoNCE between the prediction and the centred target (FactorCL /
                                     CPC-style conditional InfoNCE: a lower bound on I([shared, comp]; own tokens)),
                                     mean over partners. Signal from what Stage 1's tokens hold, where its global
                                     embedding may have shed what only this modality sees

Each complementary term is the mean over modalities of the per-modality term (all logged on their own) and is
exactly 0 (never NaN) where nothing it averages over was kept; l2 and diversity are logged even when off. The
recon / residual decoders are per-modality linear maps in the RegisterModule, made only when their weight is > 0.
With the RegisterModule's separate complementary pathway, no complementary term reaches a parameter the
overlapping tokens depend on (the recon decoder then reads the overlapping tokens stop-gradient too).
Under DDP each rank returns a loss whose mean over ranks equals the single-process loss on the global batch,
and whose gradient, averaged by DDP, equals the single-process gradient (gather with gradient, local rows
against all columns, masked means normalised by global counts; the difference term, which needs the global
batch's column statistics, is computed whole on every rank from the gathered batch; the token term's centring
means are all-reduced sums over counts: frozen data, no gradient).
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
    """What the complementary terms need from the keep mask alone, the same for every modality (so computed once a
    step: one all-gather, one all-reduce). keep bool (B, J) -> {"mask": (B*J,), "pairs": (B*J, W*B*J) kept tokens
    of different samples, local rows against all columns, "samples": (B,) / "all_samples": (W*B,) samples with a
    kept token, this rank's / the global batch's, "n_kept", "n_pairs", "n_samples": global counts, at least 1}."""
    world, rank = get_world_size(), get_rank()
    B, J = keep.shape
    mask = keep.reshape(B * J)
    all_sample = torch.arange(world * B, device=keep.device).repeat_interleave(J)  # global sample id per token
    sample = all_sample[rank * B * J:(rank + 1) * B * J]
    all_mask = all_gather_cat(mask.to(torch.uint8)).bool()  # gloo: no bool
    pairs = mask[:, None] & all_mask[None, :] & (sample[:, None] != all_sample[None, :])
    samples = keep.any(dim=1)
    all_samples = all_mask.reshape(world * B, J).any(dim=1)  # (W*B,) the global batch's samples with a kept token
    n_kept, n_pairs, n_samples = all_reduce_sum(torch.stack([mask.sum(), pairs.sum(), samples.sum()])).clamp(min=1)
    return {"mask": mask, "pairs": pairs, "samples": samples, "all_samples": all_samples, "n_kept": n_kept,
            "n_pairs": n_pairs, "n_samples": n_samples}


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


def residual_term(pred, target, masks, valid=None):
    """1 - cos(pred, target) averaged over the global batch's samples with a kept complementary token; exactly 0
    when there is none. pred (B, E_m) the residual decoder's output, or (P, B, E_m) one per partner modality
    (averaged over them), target (B, E_m) Stage 1 global embedding, masks: complementary_masks of the
    complementary keep mask. valid bool (B, N): pred (B, N, F) or (P, B, N, F) and target (B, N, F) hold N positions
    per sample, and a sample's cosine is the mean over its valid positions."""
    cos = F.cosine_similarity(pred, target.to(pred.dtype).expand_as(pred), dim=-1)  # (B,) or (P, B) [, N]
    if valid is not None:
        cos = torch.where(valid, cos, torch.zeros_like(cos)).sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)
    cos = cos.reshape(-1, cos.shape[-1]).mean(dim=0)  # (B,): mean over the partners
    miss = torch.where(masks["samples"], 1 - cos, torch.zeros_like(cos))  # where(): a dropped row adds exactly 0
    return get_world_size() * miss.sum() / masks["n_samples"]


def standardise(x, rows, n, eps=1e-6):
    """(N, E) -> each column minus its mean, over its std (biased, + eps inside the root), both over the rows
    selected by bool (N,) `rows` (n of them, at least 1); unselected rows become exactly 0."""
    x = torch.where(rows[:, None], x, torch.zeros_like(x))
    mean = x.sum(dim=0) / n
    centred = torch.where(rows[:, None], x - mean, torch.zeros_like(x))
    return centred / (centred.pow(2).sum(dim=0) / n + eps).sqrt()


def difference_term(shared, comp, masks):
    """Domain Separation Networks' difference loss at batch level: ||S~^T C~||_F^2 / (n^2 E_s E_c), where S~ and C~
    are the (n, E_s) shared embeddings and (n, E_c) complementary tokens of the global batch's n samples with a
    kept complementary token, each column standardised over those n rows. So the term is the *mean* over every pair
    of coordinates of their squared correlation over the batch: in [0, 1] whatever the width, on the scale of the
    diversity term's mean squared cosine, so one weight means the same at E = 64 and E = 768 (DSN's unnormalised
    sum grows as E^2; independent features still give about 1 / n, the finite-batch floor). Exactly 0 when no
    sample has a kept complementary token.

    shared (B, E) pooled overlapping embedding (before normalisation), comp (B, E) mean of each sample's kept
    complementary tokens, masks: complementary_masks of the complementary keep mask. Unlike DSN, where both
    codes get the gradient, `shared` is detached (as in the diversity term): the term steers only the
    complementary tokens, the shared embedding answers to the contrastive loss alone.
    DDP: every rank computes the global value from the gathered batch (comp gathered with gradient), so the mean
    over ranks is the global value and DDP's averaged gradient the global gradient.
    """
    rows, n = masks["all_samples"], masks["n_samples"]
    s = standardise(all_gather_cat(shared.detach().float()), rows, n)  # (W*B, E)
    c = standardise(gather_with_grad(comp.float()), rows, n)
    return (s.T @ c / n).pow(2).mean()


# The view term's fixed temperature, not the learnt logit scale: that scale belongs to the cross-modal loss (sharing
# it would let a complementary objective move the aligned embedding's similarity scale, which the separate pathway
# is there to prevent), and it grows towards 100, far sharper than two augmentations of one sample call for.
# 0.1 is the usual SimCLR-style value for such intra-modality view pairs.
VIEW_TEMPERATURE = 0.1


def view_term(comp, comp2, masks, temperature=VIEW_TEMPERATURE):
    """FactorCL-style intra-modality view contrastive term: the symmetric InfoNCE (CLIP loss at 1 / temperature)
    between the L2-normalised complementary tokens of two augmented views of the same samples, over the global
    batch's samples with a kept complementary token (the others are neither rows nor columns); exactly 0 when there
    is none. comp / comp2 (B, E) mean of each sample's kept complementary tokens in view 1 / view 2, masks:
    complementary_masks of the complementary keep mask (both views share it)."""
    world, B = get_world_size(), comp.shape[0]
    z1, z2 = F.normalize(comp.float(), dim=-1), F.normalize(comp2.float(), dim=-1)
    rows, cols = masks["samples"], masks["all_samples"]
    labels = torch.arange(B, device=comp.device) + get_rank() * B
    losses = []
    for q, g in ((z1, z2), (z2, z1)):
        logits = torch.where(cols[None, :], q @ gather_with_grad(g).T / temperature, torch.finfo(q.dtype).min)
        ce = F.cross_entropy(logits, labels, reduction="none")  # (B,) local rows against all columns
        losses.append(world * torch.where(rows, ce, torch.zeros_like(ce)).sum() / masks["n_samples"])
    return (losses[0] + losses[1]) / 2


@torch.no_grad()
def centred(x, valid):
    """Frozen data x (B, ..., F), bool valid (B, ...) -> float32 x minus its mean over the global batch's samples
    where valid (per feature, and per position for (B, N, F)), exactly 0 where not valid. The sums and counts are
    all-reduced, so every rank subtracts the global batch's mean."""
    x = torch.where(valid[..., None], x.float(), torch.zeros((), device=x.device))
    stats = all_reduce_sum(torch.cat([x.sum(dim=0), valid.sum(dim=0)[..., None].float()], dim=-1))  # one all-reduce
    mean = stats[..., :-1] / stats[..., -1:].clamp(min=1)
    return torch.where(valid[..., None], x - mean, torch.zeros((), device=x.device))


def token_term(pred, context, padding, masks, target="pooled", loss="cosine"):
    """The token-level residual of one modality (the module docstring's `token`). pred: its token decoder's output,
    (B, C) for target "pooled", (B, N, C) for "tokens", with a leading P (one per partner) for the partner source;
    context (B, N, C) its frozen Stage 1 tokens (float16 from a cache: computed in float32), padding bool (B, N),
    True = padded, or None; masks: complementary_masks of the complementary keep mask."""
    valid = ~padding if padding is not None else torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if target == "tokens":
        if pred.shape[-2:] != context.shape[1:]:
            raise ValueError(f"token target 'tokens': predictions {tuple(pred.shape)} for context "
                             f"{tuple(context.shape)}")
        return residual_term(pred.float(), centred(context, valid), masks, valid)
    goal = centred(masked_mean(context.float(), valid), valid.new_ones(valid.shape[:1]))  # (B, C), every sample
    if loss == "infonce":
        return torch.stack([view_term(p, goal, masks) for p in pred.reshape(-1, *goal.shape)]).mean()
    return residual_term(pred.float(), goal, masks)


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


TVL_TEXT_THRESHOLDS = (0.6356450319, 0.859, 0.893, 0.921)  # 0.6356... is TVL's published "@0.64"


def top1_hit_rate(sim, positive):
    """sim (Nq, Ng), positive bool (Nq, Ng) -> (Nq,) probability that the top-1 gallery item is a positive when
    ties at the top are broken at random (equal to TVL's torch.topk accuracy whenever the top is unique)."""
    top = sim == sim.max(dim=1, keepdim=True).values
    return (top & positive).sum(dim=1) / top.sum(dim=1)


def tvl_accuracy(sim, positive):
    """TVL's top-1 accuracy in %, averaged over the two directions (rows -> columns and columns -> rows) as
    TVL's loss.py get_acc_from_affinity does. sim (N, N) with sample i's pair on the diagonal; positive bool
    (N, N), symmetric: which retrievals count as hits."""
    rows, cols = top1_hit_rate(sim, positive), top1_hit_rate(sim.T, positive.T)
    return 100.0 * (rows.float().mean() + cols.float().mean()).item() / 2


def tvl_metrics(sim, text_emb=None):
    """TVL's published protocol on one pair's (N, N) similarity matrix (whole split).

    Without text: {"touch_vision_acc"}: exact top-1 match. With text_emb (N, E), the Stage 1 (CLIP) text
    embeddings of the split's captions: {"touch_language_acc@T"} for T in TVL_TEXT_THRESHOLDS, a hit when the
    retrieved caption's embedding has cosine > T with the true caption's (repeated captions count as hits)."""
    if text_emb is None:
        return {"touch_vision_acc": tvl_accuracy(sim, torch.eye(*sim.shape, dtype=torch.bool, device=sim.device))}
    text = F.normalize(text_emb.float(), dim=-1)
    cos = text @ text.T
    return {f"touch_language_acc@{t:.4f}": tvl_accuracy(sim, cos > t) for t in TVL_TEXT_THRESHOLDS}


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
    RegisterModule decoders (recon_dims / residual_dims); contrastive_prefixes: "full" (the contrastive loss on the
    K_o overlapping tokens) or "all" (its mean over the prefixes k = 1..K_o); complementary_difference_weight: the
    batch-level difference term (difference_term); complementary_view_weight: the view contrastive term (view_term,
    needs out["view2"]); complementary_token_weight / _target ("pooled" | "tokens") / _loss ("cosine" | "infonce",
    the latter pooled only): the token-level residual (token_term; needs the RegisterModule's token decoders, built
    for the same target, and out["context"] / out["padding_mask"], which FluxTalk adds). The defaults are the
    original objective.
    """

    def __init__(self, num_overlapping, complementary_reg_weight=0.0, complementary_recon_weight=0.0,
                 complementary_reg_terms=("l2", "diversity"), complementary_l2="sum",
                 complementary_residual_weight=0.0, contrastive_prefixes="full", complementary_difference_weight=0.0,
                 complementary_view_weight=0.0, complementary_token_weight=0.0, complementary_token_target="pooled",
                 complementary_token_loss="cosine"):
        super().__init__()
        if not set(complementary_reg_terms) <= {"l2", "diversity"}:
            raise ValueError(f"complementary_reg_terms must be among 'l2', 'diversity', got {complementary_reg_terms}")
        if complementary_l2 not in ("sum", "mean"):
            raise ValueError(f"complementary_l2 must be 'sum' or 'mean', got {complementary_l2!r}")
        if contrastive_prefixes not in ("full", "all"):
            raise ValueError(f"contrastive_prefixes must be 'full' or 'all', got {contrastive_prefixes!r}")
        if complementary_token_target not in ("pooled", "tokens"):
            raise ValueError(f"complementary_token_target must be 'pooled' or 'tokens', got "
                             f"{complementary_token_target!r}")
        if complementary_token_loss not in ("cosine", "infonce"):
            raise ValueError(f"complementary_token_loss must be 'cosine' or 'infonce', got {complementary_token_loss!r}")
        if complementary_token_loss == "infonce" and complementary_token_target == "tokens":
            raise ValueError("complementary_token_loss 'infonce' needs complementary_token_target 'pooled'")
        self.num_overlapping = num_overlapping
        self.reg_weight, self.recon_weight = complementary_reg_weight, complementary_recon_weight
        self.reg_terms, self.l2 = tuple(complementary_reg_terms), complementary_l2
        self.residual_weight = complementary_residual_weight
        self.difference_weight, self.view_weight = complementary_difference_weight, complementary_view_weight
        self.token_weight, self.token_target = complementary_token_weight, complementary_token_target
        self.token_loss = complementary_token_loss
        # "all": Matryoshka Representation Learning's every-prefix loss (unweighted mean over k)
        self.prefixes = range(1, num_overlapping + 1) if contrastive_prefixes == "all" else [num_overlapping]

    def forward(self, out):
        """out: the FluxTalk dict -> (total loss, {name: detached 0-d tensor})."""
        registers, keep = out["registers"], out["keep"]
        K_o = self.num_overlapping
        shared = {m: masked_mean(r[:, :K_o], keep[:, :K_o]) for m, r in registers.items()}  # (B, E)
        terms = {}
        total = terms["contrastive"] = self.contrastive(registers, keep, shared, out["logit_scale"], terms)
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
            recon = self.per_modality("recon", {
                m: (1 - F.cosine_similarity(pred, out["global"][m].to(pred.dtype), dim=-1)).mean()
                for m, pred in out["recon"].items()}, terms)
            total = total + self.recon_weight * recon
        terms["recon"] = recon.detach()
        if self.residual_weight > 0:
            if "residual" not in out:
                raise ValueError("complementary_residual_weight > 0 needs RegisterModule(residual_dims=...)")
            total = total + self.residual_weight * self.per_modality(
                "residual", {m: residual_term(p, out["global"][m], masks) for m, p in out["residual"].items()}, terms)
        if self.difference_weight > 0 or self.view_weight > 0:
            comp = {m: masked_mean(r[:, K_o:], keep[:, K_o:]) for m, r in registers.items()}  # (B, E)
        if self.difference_weight > 0:
            total = total + self.difference_weight * self.per_modality(
                "difference", {m: difference_term(shared[m], comp[m], masks) for m in registers}, terms)
        if self.view_weight > 0:
            if "view2" not in out:
                raise ValueError("complementary_view_weight > 0 needs a second augmented view (out['view2'])")
            comp2 = {m: masked_mean(r[:, K_o:], keep[:, K_o:]) for m, r in out["view2"].items()}
            total = total + self.view_weight * self.per_modality(
                "view", {m: view_term(comp[m], comp2[m], masks) for m in registers}, terms)
        if self.token_weight > 0:
            if "token" not in out or "context" not in out:
                raise ValueError("complementary_token_weight > 0 needs RegisterModule(token_dims=...) and the frozen "
                                 "context tokens (out['context'], as FluxTalk adds them)")
            total = total + self.token_weight * self.per_modality("token", {
                m: token_term(p, out["context"][m], out["padding_mask"].get(m), masks, self.token_target,
                              self.token_loss) for m, p in out["token"].items()}, terms)
        terms["logit_scale"] = out["logit_scale"].detach()
        terms["loss"] = total.detach()
        return total, terms

    @staticmethod
    def per_modality(name, losses, terms):
        """{m: 0-d loss} -> their mean; each logged as <name>_<m>, the mean as <name>."""
        for m, loss in losses.items():
            terms[f"{name}_{m}"] = loss.detach()
        mean = torch.stack(list(losses.values())).mean()
        terms[name] = mean.detach()
        return mean

    def contrastive(self, registers, keep, shared, scale, terms):
        """Mean over modality pairs (and, with contrastive_prefixes "all", over the prefixes k = 1..K_o, each on the
        normalised masked mean of the kept tokens among the first k: a sample whose kept prefix is shorter than k
        pools the tokens it kept, as the full embedding does) of the CLIP loss. Logs each pair's loss
        (contrastive_<pair>), each prefix's mean over pairs (contrastive_prefix<k>, "all" only), and each pair's
        Recall@1 within the batch on the full embedding (r1_<pair>)."""
        per_pair = {}
        for k in self.prefixes:
            full = k == self.num_overlapping
            pooled = shared if full else {m: masked_mean(r[:, :k], keep[:, :k]) for m, r in registers.items()}
            z = {m: F.normalize(s, dim=-1) for m, s in pooled.items()}
            gathered = {m: gather_with_grad(v) for m, v in z.items()}  # one all-gather per modality, not per pair
            at_k = []
            for a, b in modality_pairs(registers):
                name = pair_name(a, b)
                loss = contrastive_loss(z[a], z[b], scale, gathered[a], gathered[b])
                per_pair.setdefault(name, []).append(loss)
                at_k.append(loss)
                if full:
                    with torch.no_grad():  # stays on the device: no host sync per step
                        sim = z[a] @ z[b].T
                        hits = torch.cat([topk_hits(sim, 1), topk_hits(sim.T, 1)])
                    terms[f"r1_{name}"] = 100.0 * hits.float().mean()
            if len(self.prefixes) > 1:
                terms[f"contrastive_prefix{k}"] = torch.stack(at_k).detach().mean()
        contrastive = []
        for name, losses in per_pair.items():
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            terms[f"contrastive_{name}"] = loss.detach()
            contrastive.append(loss)
        return torch.stack(contrastive).mean()
