import numpy as np
import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import ddp_loss_worker
from conftest import free_port
from loss_stage2 import (TVL_TEXT_THRESHOLDS, Stage2Loss, complementary_masks, complementary_terms, contrastive_loss,
                         difference_term, masked_mean, prefix_curve, recall_at_k, residual_term, token_term,
                         tvl_metrics, view_term, VIEW_TEMPERATURE)
from tvl_stage2 import TokenDecoder, residual_inputs


def _out(B=6, K=4, E=8, seed=0, keep=None):
    g = torch.Generator().manual_seed(seed)
    regs = {m: torch.randn(B, K, E, generator=g, requires_grad=True) for m in ("tactile", "vision", "text")}
    if keep is None:
        keep = torch.arange(K)[None, :] < torch.randint(1, K + 1, (B, 1), generator=g)
    return {"registers": regs, "keep": keep, "logit_scale": torch.tensor(10.0)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_contrastive_loss_equals_open_clip_clip_loss(seed):
    g = torch.Generator().manual_seed(seed)
    z_a = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    z_b = F.normalize(z_a + torch.randn(16, 32, generator=g) * (seed + 1) * 0.3, dim=-1)
    scale = torch.tensor(1 / 0.07 * (seed + 1))
    expected = open_clip.loss.ClipLoss()(z_a, z_b, scale)
    assert torch.allclose(contrastive_loss(z_a, z_b, scale), expected, atol=1e-6, rtol=0)


def test_masked_mean_selects_kept_tokens_only():
    tokens = torch.randn(3, 4, 5)
    keep = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    tokens[0, 1:] = float("inf")  # dropped values are selected out, so not even inf leaks in
    expected = torch.stack([tokens[0, :1].mean(0), tokens[1, :3].mean(0), tokens[2].mean(0)])
    assert torch.allclose(masked_mean(tokens, keep), expected)


def test_dropped_tokens_change_neither_loss_nor_kept_gradients():
    loss_fn = Stage2Loss(3, complementary_reg_weight=1.0)
    out = _out(B=8)
    keep = out["keep"]
    assert (~keep).any() and keep[:, 3].any()  # both dropped and kept complementary tokens
    total, terms = loss_fn(out)
    total.backward()
    grads = {m: r.grad.clone() for m, r in out["registers"].items()}
    out2 = {**out, "registers": {}}
    for m, r in out["registers"].items():
        changed = torch.where(keep[..., None], r.detach(), 100 * torch.randn_like(r)).requires_grad_()
        out2["registers"][m] = changed
    total2, terms2 = loss_fn(out2)
    total2.backward()
    assert torch.equal(total, total2)
    for m, r in out2["registers"].items():
        assert torch.allclose(r.grad[keep], grads[m][keep], atol=1e-7)
        assert torch.all(r.grad[~keep] == 0) and torch.all(grads[m][~keep] == 0)
        assert grads[m][keep].abs().sum(-1).gt(0).all()  # every kept token gets a gradient


def _manual_terms(comp, keep, shared):
    """Reference by explicit loops over kept tokens and kept pairs of different samples."""
    kept = [(b, j) for b in range(comp.shape[0]) for j in range(comp.shape[1]) if keep[b, j]]
    if not kept:
        return 0.0, 0.0
    l2 = sum(comp[b, j].pow(2).sum() for b, j in kept) / len(kept)
    div = sum(F.cosine_similarity(comp[b, j], shared[b], dim=0) ** 2 for b, j in kept) / len(kept)
    pairs = [(p, q) for p in kept for q in kept if p[0] != q[0]]
    if pairs:
        div = div + sum(F.cosine_similarity(comp[p], comp[q], dim=0) ** 2 for p, q in pairs) / len(pairs)
    return l2, div


def test_complementary_terms_match_explicit_loops():
    g = torch.Generator().manual_seed(0)
    comp, shared = torch.randn(5, 2, 8, generator=g), torch.randn(5, 8, generator=g)
    keep = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [0, 0]], dtype=torch.bool)
    l2, div = complementary_terms(comp, keep, shared)
    ref_l2, ref_div = _manual_terms(comp, keep, shared)
    assert torch.allclose(l2, ref_l2, atol=1e-6) and torch.allclose(div, ref_div, atol=1e-6)
    assert div > 0


def test_mean_l2_is_the_sum_l2_divided_by_the_width():
    g = torch.Generator().manual_seed(1)
    comp, shared = torch.randn(6, 2, 24, generator=g), torch.randn(6, 24, generator=g)
    keep = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    l2_sum, div_sum = complementary_terms(comp, keep, shared)
    l2_mean, div_mean = complementary_terms(comp, keep, shared, l2="mean")
    assert torch.equal(l2_mean, l2_sum / 24) and torch.equal(div_mean, div_sum)
    ref_l2, _ = _manual_terms(comp, keep, shared)
    assert torch.allclose(l2_mean, ref_l2 / 24, atol=1e-6)
    # through the loss: the logged L2 terms and the total follow the choice
    out = _out(B=8, E=24, seed=2)
    _, terms = Stage2Loss(3, 0.5)(out)
    assert terms["comp_l2"] > 0
    total, terms_mean = Stage2Loss(3, 0.5, complementary_l2="mean")(out)
    for m in ("tactile", "text", "vision"):
        assert torch.equal(terms_mean[f"comp_l2_{m}"], terms[f"comp_l2_{m}"] / 24)
    assert torch.allclose(total, terms["contrastive"] + 0.5 * (terms_mean["comp_l2"] + terms["comp_div"]))


@pytest.mark.parametrize("reg_terms", [("l2",), ("diversity",), ("l2", "diversity"), ("diversity", "l2", "l2")])
def test_reg_terms_select_exactly_the_named_regularisers(reg_terms):
    out, K_o, w = _out(B=8, seed=3), 3, 0.3
    keep = out["keep"]
    assert keep[:, K_o].any()
    total, terms = Stage2Loss(K_o, w, complementary_reg_terms=reg_terms)(out)
    total.backward()
    grads = {m: r.grad.clone() for m, r in out["registers"].items()}
    # reference: contrastive alone plus the named terms of complementary_terms, each counted once
    regs = {m: r.detach().requires_grad_() for m, r in out["registers"].items()}
    contrastive, _ = Stage2Loss(K_o, 0.0)({**out, "registers": regs})
    per_m = []
    for m, r in regs.items():
        l2, div = complementary_terms(r[:, K_o:], keep[:, K_o:], masked_mean(r[:, :K_o], keep[:, :K_o]))
        per_m.append(("l2" in reg_terms) * l2 + ("diversity" in reg_terms) * div)
    ref = contrastive + w * torch.stack(per_m).mean()
    ref.backward()
    assert torch.allclose(total, ref, atol=1e-6)
    for m, r in regs.items():
        assert torch.allclose(grads[m], r.grad, atol=1e-6), m
    assert terms["comp_l2"] > 0 and terms["comp_div"] > 0  # both logged whichever is on
    with pytest.raises(ValueError, match="complementary_reg_terms"):
        Stage2Loss(K_o, w, complementary_reg_terms=("l1",))
    with pytest.raises(ValueError, match="complementary_l2"):
        Stage2Loss(K_o, w, complementary_l2="max")


def _with_residual(out, K_o, seed=0, source="own"):
    """Adds out["residual"] from fresh per-modality Linear(2E -> E_m) decoders and Stage 1 targets out["global"]."""
    torch.manual_seed(seed)
    E = next(iter(out["registers"].values())).shape[-1]
    decoders = {m: nn.Linear(2 * E, 5) for m in out["registers"]}
    out["global"] = {m: torch.randn(out["keep"].shape[0], 5) for m in out["registers"]}
    inputs = residual_inputs(out["registers"], out["keep"], K_o, source)
    out["residual"] = {m: decoders[m](x) for m, x in inputs.items()}
    return decoders


def _manual_residual(out, decoders, K_o, source="own"):
    """Reference by explicit loops: mean over modalities of the mean over samples with a kept complementary
    token of 1 - cos(decoder([mean of kept overlapping tokens, mean of kept complementary tokens]), target), the
    overlapping tokens those of the modality itself ("own") or, averaged over them, of each other one ("partner")."""
    keep, regs, per_m = out["keep"], out["registers"], []
    for m, r in regs.items():
        losses = []
        for b in range(r.shape[0]):
            comp = [r[b, j] for j in range(K_o, r.shape[1]) if keep[b, j]]
            if not comp:
                continue
            miss = []
            for p in ([m] if source == "own" else [p for p in regs if p != m]):
                overlap = [regs[p][b, j] for j in range(K_o) if keep[b, j]]
                x = torch.cat([sum(overlap) / len(overlap), sum(comp) / len(comp)])
                pred = decoders[m].weight @ x + decoders[m].bias
                miss.append(1 - F.cosine_similarity(pred, out["global"][m][b], dim=0))
            losses.append(sum(miss) / len(miss))
        per_m.append(sum(losses) / len(losses) if losses else torch.tensor(0.0))
    return sum(per_m) / len(per_m)


def test_partner_residual_matches_explicit_loops_and_skips_every_shared_embedding():
    out, K_o = _out(B=8, K=5, E=6, seed=7), 3
    keep = out["keep"]
    assert keep[:, K_o].any() and (~keep[:, K_o]).any()
    decoders = _with_residual(out, K_o, source="partner")
    assert all(p.shape == (2, 8, 5) for p in out["residual"].values())  # two partners each
    total, terms = Stage2Loss(K_o, 0.0, complementary_residual_weight=0.7)(out)
    ref = _manual_residual(out, decoders, K_o, "partner")
    assert torch.allclose(terms["residual"], ref, atol=1e-6)
    assert not torch.allclose(ref, _manual_residual(out, decoders, K_o, "own"), atol=1e-3)
    assert torch.allclose(total, terms["contrastive"] + 0.7 * ref, atol=1e-6)
    regs = out["registers"]
    masks = complementary_masks(keep[:, K_o:])
    grads = torch.autograd.grad(sum(residual_term(out["residual"][m], out["global"][m], masks) for m in regs),
                                list(regs.values()))
    for m, g in zip(regs, grads):
        assert torch.all(g[:, :K_o] == 0)  # no modality's overlapping tokens: every shared half is stop-gradient
        assert torch.all(g[:, K_o][~keep[:, K_o]] == 0) and g[:, K_o][keep[:, K_o]].abs().sum(-1).gt(0).all()


TOKEN_DIMS, TOKEN_N = {"tactile": 5, "text": 7, "vision": 6}, 4


def _with_token(out, K_o, target, source, seed=0):
    """Adds out["token"] from fresh decoders (Linear(2E -> C_m), or a TokenDecoder with TOKEN_N queries), and the
    frozen context out["context"] (float16, as a cache holds it) with text padding out["padding_mask"]."""
    torch.manual_seed(seed)
    B, E = out["keep"].shape[0], next(iter(out["registers"].values())).shape[-1]
    decoders = {m: nn.Linear(2 * E, c) if target == "pooled" else TokenDecoder(E, 8, 2, TOKEN_N, c)
                for m, c in TOKEN_DIMS.items()}
    out["context"] = {m: (3 * torch.randn(B, TOKEN_N, c) + 1).half() for m, c in TOKEN_DIMS.items()}
    # text keeps 1..N positions (one sample all of them); a padded position must never count
    out["padding_mask"] = {"text": torch.arange(TOKEN_N)[None, :] >= torch.randint(1, TOKEN_N + 1, (B, 1))}
    out["padding_mask"]["text"][0] = False
    out["context"]["text"][out["padding_mask"]["text"]] = 1e4  # large (and then centred): would dominate if it leaked
    inputs = residual_inputs(out["registers"], out["keep"], K_o, source)
    out["token"] = {m: decoders[m](x) for m, x in inputs.items()}
    return decoders


def _cos(a, b):
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _numpy_infonce(pred, goal, temperature=VIEW_TEMPERATURE):
    """Symmetric InfoNCE by explicit loops: each row i against every column, both directions, mean."""
    z1 = [p / np.linalg.norm(p) for p in pred]
    z2 = [g / np.linalg.norm(g) for g in goal]
    total = 0.0
    for a, b in ((z1, z2), (z2, z1)):
        for i in range(len(a)):
            logits = [float(a[i] @ b[j]) / temperature for j in range(len(b))]
            total += np.log(sum(np.exp(v) for v in logits)) - logits[i]
    return total / (2 * len(z1))


def _manual_token(out, decoders, K_o, target, loss, source):
    """Reference, per modality: the frozen tokens in float64 numpy, the target pooled over the valid positions and
    centred over every sample (pooled), or each position centred over the samples where it is valid (tokens);
    predictions from each sample's own decoder input built by hand (mean of the kept overlapping tokens of the
    modality or of each partner, mean of its kept complementary tokens), one sample at a time; the loss over the
    samples with a kept complementary token, partner by partner."""
    keep, regs, per_m = out["keep"], out["registers"], {}
    K = keep.shape[1]
    for m, r in regs.items():
        ctx = out["context"][m].double().numpy()
        B, N, _ = ctx.shape
        valid = ~out["padding_mask"][m].numpy() if m in out["padding_mask"] else np.ones((B, N), bool)
        if target == "pooled":
            pooled = np.stack([ctx[b][valid[b]].mean(0) for b in range(B)])
            goal = pooled - pooled.mean(0)
        else:
            goal = np.zeros_like(ctx)
            for n in range(N):
                rows = [b for b in range(B) if valid[b, n]]
                for b in rows:
                    goal[b, n] = ctx[b, n] - ctx[rows, n].mean(0)
        kept = [b for b in range(B) if keep[b, K_o:].any()]
        partners = [m] if source == "own" else [p for p in regs if p != m]
        preds = {}  # (partner, sample) -> prediction
        for p in partners:
            for b in kept:
                overlap = [regs[p][b, j] for j in range(K_o) if keep[b, j]]
                comp = [r[b, j] for j in range(K_o, K) if keep[b, j]]
                x = torch.cat([sum(overlap) / len(overlap), sum(comp) / len(comp)]).detach()
                preds[p, b] = decoders[m](x[None])[0].detach().double().numpy()
        if not kept:
            per_m[m] = 0.0
        elif loss == "infonce":
            per_m[m] = np.mean([_numpy_infonce([preds[p, b] for b in kept], goal[kept]) for p in partners])
        else:
            misses = []
            for b in kept:
                per_partner = []
                for p in partners:
                    if target == "pooled":
                        per_partner.append(1 - _cos(preds[p, b], goal[b]))
                    else:
                        per_partner.append(np.mean([1 - _cos(preds[p, b][n], goal[b, n]) for n in range(N)
                                                    if valid[b, n]]))
                misses.append(np.mean(per_partner))
            per_m[m] = np.mean(misses)
    return per_m


TOKEN_FORMS = [("pooled", "cosine"), ("tokens", "cosine"), ("pooled", "infonce")]


@pytest.mark.parametrize("source", ["own", "partner"])
@pytest.mark.parametrize("target, loss", TOKEN_FORMS)
def test_token_term_matches_explicit_loops_and_steers_only_kept_complementary_tokens(target, loss, source):
    out, K_o = _out(B=9, K=5, E=6, seed=13), 3
    keep, regs = out["keep"], out["registers"]
    rows = keep[:, K_o:].any(1)
    assert 2 < rows.sum() < 9 and (keep[:, K_o] & ~keep[:, K_o + 1]).any()  # dropped, one and two kept tokens
    decoders = _with_token(out, K_o, target, source)
    lead = (2,) if source == "partner" else ()
    for m, pred in out["token"].items():
        assert pred.shape == lead + (9,) + ((TOKEN_N,) if target == "tokens" else ()) + (TOKEN_DIMS[m],)
    kw = dict(complementary_token_target=target, complementary_token_loss=loss)
    total, terms = Stage2Loss(K_o, 0.0, complementary_token_weight=0.6, **kw)(out)
    ref = _manual_token(out, decoders, K_o, target, loss, source)
    for m in regs:
        assert terms[f"token_{m}"].item() == pytest.approx(ref[m], rel=1e-5, abs=1e-6), m
    assert terms["token"].item() == pytest.approx(np.mean(list(ref.values())), rel=1e-5) and terms["token"] > 0
    assert torch.allclose(total, terms["contrastive"] + 0.6 * terms["token"], atol=1e-6)
    if loss == "infonce":  # also open_clip's ClipLoss on the kept rows at logit scale 1 / 0.1, per partner
        for m in regs:
            valid = ~out["padding_mask"][m] if m == "text" else torch.ones(9, TOKEN_N, dtype=torch.bool)
            pooled = masked_mean(out["context"][m].double(), valid)
            goal = F.normalize((pooled - pooled.mean(0)).float()[rows], dim=-1)
            preds = out["token"][m].reshape(-1, 9, TOKEN_DIMS[m])
            clip = [open_clip.loss.ClipLoss()(F.normalize(p[rows], dim=-1), goal, torch.tensor(1 / VIEW_TEMPERATURE))
                    for p in preds]
            assert torch.allclose(terms[f"token_{m}"], sum(clip) / len(clip), atol=1e-5), m
    masks = complementary_masks(keep[:, K_o:])
    value = sum(token_term(out["token"][m], out["context"][m], out["padding_mask"].get(m), masks, target, loss)
                for m in regs)
    params = [p for d in decoders.values() for p in d.parameters()]
    grads = torch.autograd.grad(value, list(regs.values()) + params)
    for g in grads[:len(regs)]:
        assert torch.all(g[:, :K_o] == 0)  # the shared half is stop-gradient
        assert torch.all(g[:, K_o:][~keep[:, K_o:]] == 0) and g[:, K_o:][keep[:, K_o:]].abs().sum(-1).gt(0).all()
    assert all(g.abs().sum() > 0 for g in grads[len(regs):])  # every decoder parameter learns


@pytest.mark.parametrize("target, loss", TOKEN_FORMS)
def test_token_term_is_exactly_zero_without_kept_complementary_tokens(target, loss):
    out, K_o = _out(B=6, seed=6, keep=torch.arange(4)[None, :] < torch.tensor([1, 3, 2, 3, 3, 1])[:, None]), 3
    decoders = _with_token(out, K_o, target, "partner")
    total, terms = Stage2Loss(K_o, 0.0, complementary_token_weight=1.0, complementary_token_target=target,
                              complementary_token_loss=loss)(out)
    assert terms["token"].item() == 0.0 and all(terms[f"token_{m}"].item() == 0.0 for m in decoders)
    assert torch.equal(total, terms["contrastive"])
    masks = complementary_masks(out["keep"][:, K_o:])
    value = sum(token_term(out["token"][m], out["context"][m], out["padding_mask"].get(m), masks, target, loss)
                for m in decoders)
    for g in torch.autograd.grad(value, [p for d in decoders.values() for p in d.parameters()]):
        assert torch.all(g == 0)  # zero, not NaN


def test_token_term_refusals():
    out = _out()
    _with_token(out, 3, "pooled", "own")
    with pytest.raises(ValueError, match="token_dims"):
        Stage2Loss(3, complementary_token_weight=1.0)({k: v for k, v in out.items() if k != "token"})
    with pytest.raises(ValueError, match="context"):
        Stage2Loss(3, complementary_token_weight=1.0)({k: v for k, v in out.items() if k != "context"})
    with pytest.raises(ValueError, match="complementary_token_loss 'infonce' needs complementary_token_target"):
        Stage2Loss(3, complementary_token_target="tokens", complementary_token_loss="infonce")
    with pytest.raises(ValueError, match="predictions"):  # a pooled decoder's output read as per-token predictions
        Stage2Loss(3, complementary_token_weight=1.0, complementary_token_target="tokens")(out)
    assert not any(k.startswith("token") for k in Stage2Loss(3)(out)[1])  # off: nothing logged


def _numpy_difference(shared, comp, rows, eps=1e-6):
    """DSN's difference loss written out: standardise the selected rows' columns, then every entry of S~^T C~."""
    s, c = shared[rows].astype(np.float64), comp[rows].astype(np.float64)
    n = s.shape[0]
    if n == 0:
        return 0.0
    s = (s - s.mean(0)) / np.sqrt(s.var(0) + eps)
    c = (c - c.mean(0)) / np.sqrt(c.var(0) + eps)
    total = 0.0
    for i in range(s.shape[1]):
        for j in range(c.shape[1]):
            total += sum(s[b, i] * c[b, j] for b in range(n)) ** 2
    return total / n ** 2 / (s.shape[1] * c.shape[1])


def test_difference_term_matches_numpy_and_steers_only_kept_complementary_tokens():
    out, K_o = _out(B=9, K=5, E=6, seed=11), 3
    keep, regs = out["keep"], out["registers"]
    rows = keep[:, K_o:].any(1)
    assert 2 < rows.sum() < 9 and (keep[:, K_o] & ~keep[:, K_o + 1]).any()
    total, terms = Stage2Loss(K_o, 0.0, complementary_difference_weight=0.3)(out)
    per_m = []
    for m, r in regs.items():
        shared = masked_mean(r[:, :K_o], keep[:, :K_o]).detach().numpy()
        comp = masked_mean(r[:, K_o:], keep[:, K_o:]).detach().numpy()
        per_m.append(_numpy_difference(shared, comp, rows.numpy()))
        assert terms[f"difference_{m}"].item() == pytest.approx(per_m[-1], rel=1e-5)
    assert terms["difference"].item() == pytest.approx(np.mean(per_m), rel=1e-5) and terms["difference"] > 0
    assert torch.allclose(total, terms["contrastive"] + 0.3 * terms["difference"], atol=1e-6)
    masks = complementary_masks(keep[:, K_o:])
    diff = sum(difference_term(masked_mean(r[:, :K_o], keep[:, :K_o]), masked_mean(r[:, K_o:], keep[:, K_o:]), masks)
               for r in regs.values())
    for m, g in zip(regs, torch.autograd.grad(diff, list(regs.values()))):
        assert torch.all(g[:, :K_o] == 0)  # the shared embedding is detached
        assert torch.all(g[:, K_o:][~keep[:, K_o:]] == 0) and g[:, K_o:][keep[:, K_o:]].abs().sum(-1).gt(0).all()
    # the standardisation makes it blind to a per-column shift and scale of either code
    shared, comp = regs["vision"][:, 0], regs["vision"][:, K_o]
    ref = difference_term(shared, comp, masks)
    assert torch.allclose(difference_term(3 * shared + 1, comp * 0.5 - 2, masks), ref, rtol=1e-4)


def test_difference_term_is_exactly_zero_without_kept_complementary_tokens():
    keep = torch.arange(4)[None, :] < torch.tensor([1, 3, 2, 3, 3, 1])[:, None]
    out = _out(B=6, seed=6, keep=keep)
    total, terms = Stage2Loss(3, 0.0, complementary_difference_weight=1.0)(out)
    assert terms["difference"].item() == 0.0 and torch.equal(total, terms["contrastive"])
    comp = torch.randn(6, 8, requires_grad=True)
    masks = complementary_masks(keep[:, 3:])
    value = difference_term(torch.randn(6, 8), comp, masks)
    value.backward()
    assert value.item() == 0.0 and torch.all(comp.grad == 0)  # zero, not NaN
    one = complementary_masks(torch.tensor([[True], [False], [False]]))  # one sample: nothing to correlate
    assert difference_term(torch.randn(3, 4), torch.randn(3, 4), one).item() == 0.0


def test_view_term_is_open_clip_loss_over_the_samples_with_a_kept_complementary_token():
    out, K_o = _out(B=9, K=5, E=6, seed=12), 3
    keep, regs = out["keep"], out["registers"]
    g = torch.Generator().manual_seed(1)
    out["view2"] = {m: (r.detach() + 0.3 * torch.randn(r.shape, generator=g)).requires_grad_() for m, r in regs.items()}
    rows = keep[:, K_o:].any(1)
    assert 2 < rows.sum() < 9 and (keep[:, K_o] & ~keep[:, K_o + 1]).any()
    total, terms = Stage2Loss(K_o, 0.0, complementary_view_weight=0.4)(out)
    clip, per_m = open_clip.loss.ClipLoss(), []
    for m in regs:  # rows and columns: only the samples with a kept complementary token
        z1, z2 = (_prefix_embedding(r[rows][:, K_o:], keep[rows][:, K_o:], 2) for r in (regs[m], out["view2"][m]))
        per_m.append(clip(z1, z2, torch.tensor(1 / VIEW_TEMPERATURE)))
        assert torch.allclose(terms[f"view_{m}"], per_m[-1], atol=1e-5), m
    assert torch.allclose(total, terms["contrastive"] + 0.4 * sum(per_m) / 3, atol=1e-5)
    masks = complementary_masks(keep[:, K_o:])
    comp = lambda r: masked_mean(r[:, K_o:], keep[:, K_o:])  # noqa: E731
    loss = sum(view_term(comp(regs[m]), comp(out["view2"][m]), masks) for m in regs)
    tensors = list(regs.values()) + list(out["view2"].values())
    for g in torch.autograd.grad(loss, tensors):
        assert torch.all(g[:, :K_o] == 0) and torch.all(g[:, K_o:][~keep[:, K_o:]] == 0)
        assert g[:, K_o:][keep[:, K_o:]].abs().sum(-1).gt(0).all()
    with pytest.raises(ValueError, match="view2"):
        Stage2Loss(K_o, complementary_view_weight=1.0)({k: v for k, v in out.items() if k != "view2"})


def test_view_term_is_exactly_zero_without_kept_complementary_tokens():
    keep = torch.tensor([[True, False], [True, False], [True, False]])
    comp, comp2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    value = view_term(comp, comp2, complementary_masks(keep[:, 1:]))
    value.backward()
    assert value.item() == 0.0 and torch.all(comp.grad == 0) and torch.all(comp2.grad == 0)  # zero, not NaN


def _prefix_embedding(r, keep, k):
    """Explicit loop: per sample, the normalised mean of its kept tokens among the first k."""
    rows = []
    for b in range(r.shape[0]):
        kept = [r[b, j] for j in range(k) if keep[b, j]]
        rows.append(F.normalize(sum(kept) / len(kept), dim=0))
    return torch.stack(rows)


def test_all_prefix_contrastive_is_the_mean_of_open_clip_losses_over_prefixes():
    out, K_o = _out(B=8, K=4, E=8, seed=4), 3
    keep = out["keep"]
    assert (keep.sum(1) < K_o).any()  # some samples' kept prefix is shorter than K_o
    total, terms = Stage2Loss(K_o, 0.0, contrastive_prefixes="all")(out)
    clip = open_clip.loss.ClipLoss()
    pairs = [("tactile", "text"), ("tactile", "vision"), ("text", "vision")]
    per_k = []
    for k in range(1, K_o + 1):
        z = {m: _prefix_embedding(r, keep, k) for m, r in out["registers"].items()}
        per_k.append(sum(clip(z[a], z[b], out["logit_scale"]) for a, b in pairs) / len(pairs))
        assert torch.allclose(terms[f"contrastive_prefix{k}"], per_k[-1], atol=1e-6), k
    assert torch.allclose(total, sum(per_k) / K_o, atol=1e-6) and torch.allclose(terms["contrastive"], total)
    full, full_terms = Stage2Loss(K_o, 0.0)(out)
    assert torch.allclose(full, per_k[-1], atol=1e-6) and not torch.allclose(full, total, atol=1e-3)
    assert not any(k.startswith("contrastive_prefix") for k in full_terms)
    for a, b in pairs:  # each pair's logged loss is its mean over prefixes
        ref = sum(clip(_prefix_embedding(out["registers"][a], keep, k), _prefix_embedding(out["registers"][b], keep, k),
                       out["logit_scale"]) for k in range(1, K_o + 1)) / K_o
        assert torch.allclose(terms[f"contrastive_{a}_{b}"], ref, atol=1e-6)
    # a token beyond a sample's kept prefix changes nothing, nor gets a gradient
    regs = {m: r.detach().requires_grad_() for m, r in out["registers"].items()}
    loss, _ = Stage2Loss(K_o, 0.0, contrastive_prefixes="all")({**out, "registers": regs})
    for g in torch.autograd.grad(loss, list(regs.values())):
        assert torch.all(g[~keep] == 0) and torch.all(g[:, K_o:] == 0)
        assert g[:, :K_o][keep[:, :K_o]].abs().sum(-1).gt(0).all()


def test_residual_term_matches_explicit_loops():
    out, K_o = _out(B=8, K=5, E=6, seed=5), 3  # two complementary tokens: their mean is decoded
    keep = out["keep"]
    assert keep[:, K_o].any() and (~keep[:, K_o]).any() and (keep[:, K_o] & ~keep[:, K_o + 1]).any()
    decoders = _with_residual(out, K_o)
    total, terms = Stage2Loss(K_o, 0.0, complementary_residual_weight=0.7)(out)
    ref = _manual_residual(out, decoders, K_o)
    assert torch.allclose(terms["residual"], ref, atol=1e-6)
    assert torch.allclose(total, terms["contrastive"] + 0.7 * ref, atol=1e-6)
    for m in out["registers"]:
        assert f"residual_{m}" in terms
    assert "residual" not in Stage2Loss(K_o)(out)[1]  # off: the logged terms are the original ones
    with pytest.raises(ValueError, match="residual_dims"):
        Stage2Loss(K_o, complementary_residual_weight=1.0)({k: v for k, v in out.items() if k != "residual"})


def test_residual_term_is_exactly_zero_when_no_complementary_token_is_kept():
    out, K_o = _out(B=6, seed=6, keep=torch.arange(4)[None, :] < torch.tensor([1, 3, 2, 3, 3, 1])[:, None]), 3
    decoders = _with_residual(out, K_o)
    total, terms = Stage2Loss(K_o, 0.0, complementary_residual_weight=1.0)(out)
    assert terms["residual"].item() == 0.0 and all(terms[f"residual_{m}"].item() == 0.0 for m in decoders)
    assert torch.equal(total, terms["contrastive"])
    # masks for an empty complementary part (K == K_o) give 0 too
    masks = complementary_masks(torch.zeros(4, 0, dtype=torch.bool))
    assert residual_term(torch.randn(4, 5), torch.randn(4, 5), masks).item() == 0.0
    masks = complementary_masks(out["keep"][:, K_o:])
    residual = sum(residual_term(out["residual"][m], out["global"][m], masks) for m in decoders)
    grads = torch.autograd.grad(residual, [d.weight for d in decoders.values()])
    assert all(torch.all(g == 0) for g in grads)  # zero, not NaN


def test_residual_gradient_reaches_complementary_tokens_and_decoder_not_overlapping_tokens():
    out, K_o = _out(B=8, seed=3), 3
    keep = out["keep"]
    assert keep[:, K_o].any() and (~keep[:, K_o]).any()
    decoders = _with_residual(out, K_o)
    masks = complementary_masks(keep[:, K_o:])
    sum(residual_term(out["residual"][m], out["global"][m], masks) for m in decoders).backward()
    for m, r in out["registers"].items():
        assert torch.all(r.grad[:, :K_o] == 0)  # the shared part is stop-gradient in this term
        assert torch.all(r.grad[:, K_o][~keep[:, K_o]] == 0)
        assert r.grad[:, K_o][keep[:, K_o]].abs().sum(-1).gt(0).all()
        assert decoders[m].weight.grad.abs().sum() > 0 and decoders[m].bias.grad.abs().sum() > 0
        # the decoder does read the shared half: its weights there get gradients too
        assert decoders[m].weight.grad[:, :r.shape[-1]].abs().sum() > 0

    comp = torch.randn(4, 1, 8, requires_grad=True)
    l2, div = complementary_terms(comp, torch.zeros(4, 1, dtype=torch.bool), torch.randn(4, 8))
    assert l2.item() == 0.0 and div.item() == 0.0  # exactly 0, not NaN
    (l2 + div).backward()
    assert torch.all(comp.grad == 0)
    none = complementary_terms(torch.randn(4, 0, 8), torch.zeros(4, 0, dtype=torch.bool), torch.randn(4, 8))
    assert [t.item() for t in none] == [0.0, 0.0]  # K == K_o: no complementary tokens at all
    # shared embeddings along e0, each sample's complementary token along its own axis: all cosines 0
    eye = torch.eye(8)
    shared, comp = eye[0].expand(4, 8), 3 * eye[1:5, None, :]
    l2, div = complementary_terms(comp, torch.ones(4, 1, dtype=torch.bool), shared)
    assert div.item() == 0.0 and torch.isclose(l2, torch.tensor(9.0))
    _, div = complementary_terms(comp + 0.1 * eye[0], torch.ones(4, 1, dtype=torch.bool), shared)
    assert div > 0


def test_complementary_gradients_reach_only_kept_complementary_tokens():
    loss_fn = Stage2Loss(3, complementary_reg_weight=1.0)
    out = _out(B=8, seed=3)
    keep = out["keep"]
    assert keep[:, 3].any() and (~keep[:, 3]).any()
    _, terms = loss_fn(out)
    regs = out["registers"]
    K_o = 3
    shared = {m: masked_mean(r[:, :K_o], keep[:, :K_o]) for m, r in regs.items()}
    reg_only = sum(sum(complementary_terms(r[:, K_o:], keep[:, K_o:], shared[m])) for m, r in regs.items())
    reg_only.backward()
    for m, r in regs.items():
        assert torch.all(r.grad[:, :K_o] == 0)  # the shared embedding is steered by the contrastive loss only
        assert torch.all(r.grad[:, K_o][~keep[:, K_o]] == 0)
        assert r.grad[:, K_o][keep[:, K_o]].abs().sum(-1).gt(0).all()
        assert torch.allclose(terms[f"comp_l2_{m}"] + terms[f"comp_div_{m}"],
                              sum(complementary_terms(r[:, K_o:], keep[:, K_o:], shared[m])).detach())


def test_loss_total_and_term_names():
    loss_fn = Stage2Loss(3, complementary_reg_weight=0.25)
    out = _out()
    total, terms = loss_fn(out)
    pairs = ["tactile_text", "tactile_vision", "text_vision"]
    assert set(terms) == ({f"contrastive_{p}" for p in pairs} | {f"r1_{p}" for p in pairs}
                          | {f"comp_{t}_{m}" for t in ("l2", "div") for m in ("tactile", "text", "vision")}
                          | {"contrastive", "comp_l2", "comp_div", "recon", "logit_scale", "loss"})
    contrastive = sum(terms[f"contrastive_{p}"] for p in pairs) / 3
    comp = sum(terms[f"comp_l2_{m}"] + terms[f"comp_div_{m}"] for m in ("tactile", "text", "vision")) / 3
    assert torch.allclose(total, contrastive + 0.25 * comp)
    assert torch.equal(terms["loss"], total.detach()) and terms["recon"] == 0
    with pytest.raises(ValueError, match="recon_dims"):
        Stage2Loss(3, complementary_recon_weight=1.0)(out)


def test_recall_at_k_and_prefix_curve():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.9, 0.7, 0.3]])
    # true ranks: 0, 1, 2 -> R@1 = 1/3, R@2 = 2/3
    r = recall_at_k(sim, ks=(1, 2))
    assert r[1] == pytest.approx(100 / 3) and r[2] == pytest.approx(200 / 3)
    # ties are broken at random in expectation: a collapsed model is at chance (k / N), never 0 or 100
    assert recall_at_k(torch.ones(4, 4), ks=(1, 2)) == {1: pytest.approx(25.0), 2: pytest.approx(50.0)}
    # query 0's true item ties with one other item and beats the rest: R@1 = 1/2, R@2 = 1
    tied = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.9, 0.1], [0.0, 0.1, 0.9]])
    assert recall_at_k(tied, ks=(1, 2)) == {1: pytest.approx(100 * (0.5 + 1 + 1) / 3), 2: pytest.approx(100.0)}
    # prefix curve: token 0 carries no information (identical: chance), token 1 identifies the sample
    N = 5
    reg_a = torch.zeros(N, 3, N + 1)
    reg_a[:, 0, -1] = 1.0
    reg_a[:, 1, :N] = torch.eye(N) * 5
    curve = prefix_curve(reg_a, reg_a.clone(), num_overlapping=2)
    assert curve["a2b"] == pytest.approx([100 / N, 100.0]) and curve["b2a"] == pytest.approx([100 / N, 100.0])


def test_tvl_metrics_on_hand_built_matrices():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.9, 0.7, 0.3]])
    # exact match, both directions: rows hit {0}; columns: col 0 ties rows 0 and 2 (1/2), col 2 -> row 2
    assert tvl_metrics(sim) == {"touch_vision_acc": pytest.approx(100 * (1 / 3 + 1.5 / 3) / 2)}
    # captions 0 and 1 are identical (cosine 1), caption 2 orthogonal: retrieving item 0 for query 1 is a hit;
    # rows hit {0, 1}; columns: col 0 ties rows 0 (hit) and 2 (miss), col 1 -> row 2 miss, col 2 -> row 2 hit
    text = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # not normalised: cosine is what counts
    expected = pytest.approx(100 * (2 / 3 + 1.5 / 3) / 2)
    assert tvl_metrics(sim, text) == {"touch_language_acc@0.6356": expected, "touch_language_acc@0.8590": expected,
                                      "touch_language_acc@0.8930": expected, "touch_language_acc@0.9210": expected}
    # a caption at cosine 0.7 with the truth is a hit at the published 0.6356 threshold only
    text = torch.tensor([[1.0, 0.0], [0.7, 0.71414284], [0.0, 1.0]])
    acc = tvl_metrics(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), text)
    # rows: query 0 -> item 1 (cos 0.7), 1 -> 1, 2 -> 2; columns: 0 ties all rows (1/3: row 0 only, or 2/3 with
    # row 1 at 0.6356), 1 ties rows 0 and 1 (both hits at 0.6356, row 1 only above), 2 -> row 2
    assert acc["touch_language_acc@0.6356"] == pytest.approx(100 * (1 + (2 / 3 + 1 + 1) / 3) / 2)
    assert acc["touch_language_acc@0.8590"] == pytest.approx(100 * (2 / 3 + (1 / 3 + 1 / 2 + 1) / 3) / 2)


def test_tvl_metrics_equal_tvl_topk_accuracy_without_ties():
    """An independent transcription of TVL's get_acc_from_affinity (torch.topk masks, both directions)."""
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(40, 40, generator=g)
    text = F.normalize(torch.randn(40, 8, generator=g).round(), dim=-1)  # rounded: some captions coincide
    cos = text @ text.T

    def tvl_acc1(affinity, positive):
        top1 = torch.zeros_like(affinity, dtype=torch.bool).scatter_(1, affinity.topk(1, dim=1)[1], True)
        top1_t = torch.zeros_like(affinity, dtype=torch.bool).scatter_(1, affinity.T.topk(1, dim=1)[1], True)
        return 100 * ((top1 & positive).any(1).float().mean() + (top1_t & positive).any(1).float().mean()) / 2

    assert tvl_metrics(sim)["touch_vision_acc"] == pytest.approx(tvl_acc1(sim, torch.eye(40, dtype=torch.bool)).item())
    acc = tvl_metrics(sim, text)
    for t in TVL_TEXT_THRESHOLDS:
        assert acc[f"touch_language_acc@{t:.4f}"] == pytest.approx(tvl_acc1(sim, cos > t).item())


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    path = tmp_path / "ddp.pt"
    mp.spawn(ddp_loss_worker.worker, args=(2, free_port(), str(path)), nprocs=2, join=True)
    results = torch.load(path, weights_only=True)
    for case in ddp_loss_worker.CASES:
        module, loss_fn, tokens, pad, glob, keep = ddp_loss_worker.build_case(case)
        total, terms = ddp_loss_worker.step(module, loss_fn, tokens, pad, glob, keep, slice(None))
        result = results[case]
        for name in ("comp_l2", "comp_div", "recon", "residual", "difference", "view", "token"):
            assert terms[name] > 0, (case, name)
        if case.startswith("separate"):
            assert {f"contrastive_prefix{k}" for k in (1, 2)} <= set(result["values"])
        assert torch.allclose(result["values"]["total"], total.detach(), atol=1e-5, rtol=0), case
        assert set(result["values"]) == {"total"} | {k for k in terms if not k.startswith("r1_")}
        for name, value in result["values"].items():
            if name != "total":
                assert torch.allclose(value, terms[name], atol=1e-5, rtol=0), (case, name)
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (case, name)
            # float32 rounding of sums taken in another order
            assert torch.allclose(result["grads"][name], p.grad, atol=1e-5, rtol=1e-5), (case, name)
