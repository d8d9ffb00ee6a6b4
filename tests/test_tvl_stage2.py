import math

import pytest
import torch

from loss_stage2 import (Stage2Loss, complementary_masks, complementary_terms, difference_term, masked_mean,
                         residual_term, token_term, view_term)
from tvl_stage2 import FluxTalk, RegisterModule, TokenDecoder, nested_dropout_mask

DIMS = {"tactile": 12, "text": 10, "vision": 14}


def _module(**kw):
    torch.manual_seed(0)
    args = dict(num_tokens=4, num_overlapping=3, width=32, depth=2, num_heads=4)
    return RegisterModule(DIMS, 16, **{**args, **kw})


def _tokens(B=3, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, N, c, generator=g) for m, c in DIMS.items()}


@pytest.mark.parametrize("K,rate", [(4, 0.5), (2, 0.3), (8, 0.8)])
def test_nested_dropout_is_a_prefix_with_linear_drop_schedule(K, rate):
    keep = nested_dropout_mask(200_000, K, rate, generator=torch.Generator().manual_seed(K))
    assert keep.dtype == torch.bool and keep.shape == (200_000, K)
    assert keep[:, 0].all() and (keep[:, 1:] <= keep[:, :-1]).all()  # every row is a non-empty prefix
    drop = 1 - keep.float().mean(0)
    expected = torch.tensor([rate * k / (K - 1) for k in range(K)])
    assert (drop - expected).abs().max() < 0.005, (drop, expected)


def test_nested_dropout_edge_cases():
    assert nested_dropout_mask(50, 4, 0.0).all()
    assert nested_dropout_mask(50, 1, 0.9).all()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            nested_dropout_mask(4, 4, bad)
    a = nested_dropout_mask(64, 4, 0.5, generator=torch.Generator().manual_seed(1))
    b = nested_dropout_mask(64, 4, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_keep_mask_drawn_in_train_only_and_shared_by_modalities():
    module = _module()
    module.nested_dropout_rate = 0.9
    tokens = _tokens(B=64)
    module.eval()
    assert module(tokens)["keep"].all()
    module.train()
    g = torch.Generator().manual_seed(5)
    out = module(tokens, generator=g)
    assert torch.equal(out["keep"], nested_dropout_mask(64, 4, 0.9, generator=torch.Generator().manual_seed(5)))
    assert (~out["keep"]).any()
    assert set(out["registers"]) == set(DIMS) and all(r.shape == (64, 4, 16) for r in out["registers"].values())


def test_register_tokens_are_a_view_never_copied_per_modality():
    module = _module()
    seen = []
    module.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    module(_tokens(B=5))
    assert len(seen) == len(DIMS)
    for x in seen:  # every modality's first block reads the parameter's own storage, stride 0 over the batch
        assert x.shape == (5, 4, 32) and x.stride(0) == 0
        assert x.data_ptr() == module.register_tokens.data_ptr()


def test_causal_prefix_does_not_depend_on_later_register_tokens():
    module = _module(recon_dims={m: 16 for m in DIMS}).eval()
    tokens = _tokens()
    with torch.no_grad():
        ref = module(tokens)
        for k in range(module.num_tokens - 1):
            saved = module.register_tokens.detach().clone()
            module.register_tokens[k + 1:] += torch.randn_like(module.register_tokens[k + 1:])
            out = module(tokens, keep=torch.arange(4)[None].expand(3, -1) <= k)  # prefix of length k + 1
            module.register_tokens.copy_(saved)
            for m in DIMS:
                assert torch.allclose(out["registers"][m][:, :k + 1], ref["registers"][m][:, :k + 1], atol=1e-6)
                assert not torch.allclose(out["registers"][m][:, k + 1:], ref["registers"][m][:, k + 1:])
                # the recon decoder sees the kept prefix only, so it cannot see the perturbation either
                kept_only = module(tokens, keep=torch.arange(4)[None].expand(3, -1) <= k)["recon"][m]
                assert torch.allclose(out["recon"][m], kept_only, atol=1e-6)


def test_residual_decoder_is_optional_and_changes_no_other_initial_value():
    plain, with_residual = _module(), _module(residual_dims={m: 5 for m in DIMS})
    assert plain.residual is None and "residual" not in plain(_tokens())
    own = plain.state_dict()
    extra = {k: v for k, v in with_residual.state_dict().items() if k not in own}
    assert set(extra) == {f"residual.{m}.{p}" for m in DIMS for p in ("weight", "bias")}
    assert all(v.shape == ((5, 32) if k.endswith("weight") else (5,)) for k, v in extra.items())  # (E_m, 2E)
    for k, v in own.items():  # same seed, same values: runs with and without the term start from one point
        assert torch.equal(v, with_residual.state_dict()[k]), k


def test_residual_gradient_from_the_module_skips_the_overlapping_outputs():
    module = _module(residual_dims={m: 5 for m in DIMS})
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = module(_tokens(), keep=keep)
    for r in out["registers"].values():
        r.retain_grad()
    target = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    masks = complementary_masks(keep[:, 3:])
    sum(residual_term(out["residual"][m], target, masks) for m in DIMS).backward()
    for m, r in out["registers"].items():
        assert torch.all(r.grad[:, :3] == 0) and torch.all(r.grad[1] == 0)
        assert r.grad[[0, 2], 3].abs().sum(-1).gt(0).all()
        assert module.residual[m].weight.grad.abs().sum() > 0
    # through the complementary token the term does train the shared register module
    assert module.register_tokens.grad[3].abs().sum() > 0 and module.head.weight.grad.abs().sum() > 0


def test_separate_pathway_changes_no_initial_value_and_keeps_the_overlapping_outputs():
    shared = _module(residual_dims={m: 5 for m in DIMS})
    separate = _module(residual_dims={m: 5 for m in DIMS}, complementary_pathway="separate", residual_source="partner")
    own, sep = shared.state_dict(), separate.state_dict()
    # same seed: every shared parameter starts where it did; the register draw is split between the two pathways
    for k, v in own.items():
        if k != "register_tokens":
            assert torch.equal(v, sep[k]), k
    assert torch.equal(sep["register_tokens"], own["register_tokens"][:3])
    assert torch.equal(sep["comp_tokens"], own["register_tokens"][3:])
    new = {k.split(".")[0] for k in sep if k not in own}
    assert new == {"comp_tokens", "comp_blocks", "comp_norm", "comp_head"}
    assert sum(v.numel() for k, v in sep.items() if k.startswith("comp_blocks")) == sum(
        v.numel() for k, v in own.items() if k.startswith("blocks"))  # same depth and width
    tokens, pad = _tokens(B=5), {"text": torch.arange(7)[None, :] >= torch.tensor([2, 7, 4, 5, 3])[:, None]}
    keep = torch.arange(4)[None, :] < torch.tensor([4, 1, 3, 4, 2])[:, None]
    with torch.no_grad():
        a, b = shared(tokens, pad, keep=keep), separate(tokens, pad, keep=keep)
    assert torch.equal(a["keep"], b["keep"])  # nested dropout covers the K tokens of both pathways
    for m in DIMS:
        assert b["registers"][m].shape == (5, 4, 16)
        # causal self-attention: the first K_o outputs never depended on the complementary token
        torch.testing.assert_close(b["registers"][m][:, :3], a["registers"][m][:, :3], rtol=0, atol=1e-6)
        assert not torch.allclose(b["registers"][m][:, 3], a["registers"][m][:, 3], atol=1e-3)
        assert b["residual"][m].shape == (2, 5, 5)  # one prediction per partner modality


TOKEN_COUNTS = {m: 7 for m in DIMS}  # _tokens' N


@pytest.mark.parametrize("target", ["pooled", "tokens"])
def test_token_decoders_are_optional_made_last_and_change_no_other_initial_value(target):
    kw = dict(residual_dims={m: 5 for m in DIMS}, complementary_pathway="separate", residual_source="partner")
    plain = _module(**kw)
    assert plain.token_decoder is None and "token" not in plain(_tokens())
    with_token = _module(**kw, token_dims=DIMS, token_target=target, token_counts=TOKEN_COUNTS)
    own, new = plain.state_dict(), with_token.state_dict()
    for k, v in own.items():  # same seed: every other parameter starts where it did (the separate pathway's too)
        assert torch.equal(v, new[k]), k
    extra = {k: v.shape for k, v in new.items() if k not in own}
    assert {k.split(".")[0] for k in extra} == {"token_decoder"}
    for m, c in DIMS.items():
        if target == "pooled":  # Linear(2E -> C_m)
            assert {k: s for k, s in extra.items() if k.startswith(f"token_decoder.{m}.")} == {
                f"token_decoder.{m}.weight": (c, 32), f"token_decoder.{m}.bias": (c,)}
        else:  # N_m queries and 2 slots of the register width D, Linear(D -> C_m) last
            assert extra[f"token_decoder.{m}.queries"] == (7, 32) and extra[f"token_decoder.{m}.slots"] == (2, 32)
            assert extra[f"token_decoder.{m}.head.weight"] == (c, 32)
            for half in ("shared_in", "comp_in"):  # Linear(E -> D) of each memory slot
                assert extra[f"token_decoder.{m}.{half}.weight"] == (32, 16)
    if target == "tokens":  # trunc normal std 0.02, like the register tokens
        queries = torch.cat([with_token.token_decoder[m].queries.flatten() for m in DIMS])
        assert abs(queries.std().item() - 0.02) < 0.003 and abs(queries.mean().item()) < 0.003
    with pytest.raises(ValueError, match="token_counts"):
        _module(token_dims=DIMS, token_target="tokens")


def test_token_decoder_is_mae_cross_attention_from_per_position_queries_to_a_two_token_memory():
    torch.manual_seed(0)
    E, D, H, N, C = 6, 8, 2, 5, 3
    dec = TokenDecoder(E, D, H, N, C).eval()
    x = torch.randn(4, 2 * E)
    out = dec(x)
    assert out.shape == (4, N, C) and dec(x.expand(3, 4, 2 * E)).shape == (3, 4, N, C)  # (P, B, 2E) partners too
    # independently: per sample, head and position, softmax over the two memory slots, by hand
    with torch.no_grad():
        for b in range(4):
            memory = torch.stack([dec.shared_in(x[b, :E]), dec.comp_in(x[b, E:])]) + dec.slots  # (2, D)
            keys, values = dec.cross_attn.kv(memory).split(D, dim=-1)
            for n in range(N):
                q = dec.cross_attn.q(dec.norm1(dec.queries[n]))
                heads = []
                for h in range(H):
                    cut = slice(h * D // H, (h + 1) * D // H)
                    weights = torch.softmax(keys[:, cut] @ q[cut] / math.sqrt(D // H), dim=0)  # (2,)
                    heads.append(weights @ values[:, cut])
                y = dec.queries[n] + dec.cross_attn.proj(torch.cat(heads))
                y = y + dec.mlp(dec.norm2(y))
                torch.testing.assert_close(out[b, n], dec.head(dec.norm(y)), rtol=0, atol=1e-6)
        # the memory is the only per-sample input: changing sample 0's complementary half (or its shared half)
        # changes every position of sample 0 and nothing of the others
        for half in (slice(E, None), slice(0, E)):
            changed = x.clone()
            changed[0, half] += 1.0
            moved = dec(changed)
            assert (moved[0] - out[0]).abs().amax(-1).gt(1e-4).all() and torch.equal(moved[1:], out[1:])
        # the queries are per position: swapping two queries swaps those two positions' predictions
        dec.queries[[0, 3]] = dec.queries[[3, 0]]
        swapped = dec(x)
        torch.testing.assert_close(swapped[:, [3, 0]], out[:, [0, 3]], rtol=0, atol=1e-6)
        torch.testing.assert_close(swapped[:, [1, 2, 4]], out[:, [1, 2, 4]], rtol=0, atol=0)


def test_fluxtalk_hands_the_loss_the_frozen_context_only_with_token_decoders(tiny_stage1):
    s1 = tiny_stage1
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": {m: torch.randn(2, s1.token_counts[m], c, generator=g) for m, c in s1.feature_dims.items()},
             "padding_mask": {"text": torch.arange(77)[None, :] > torch.tensor([[5], [9]])},
             "global": {m: torch.randn(2, s1.embed_dim, generator=g) for m in s1.feature_dims}}
    kw = dict(width=32, depth=1, num_heads=4)
    plain = FluxTalk(s1, RegisterModule(s1.feature_dims, s1.embed_dim, **kw))(batch)
    assert "context" not in plain and "padding_mask" not in plain and "token" not in plain
    model = FluxTalk(s1, RegisterModule(s1.feature_dims, s1.embed_dim, **kw, token_dims=s1.feature_dims,
                                        token_target="tokens", token_counts=s1.token_counts))
    out = model(batch)
    for m, t in batch["tokens"].items():
        assert out["context"][m] is t  # the very tensors the register module read: no copy
        assert out["token"][m].shape == t.shape
    assert out["padding_mask"] is batch["padding_mask"]
    half = dict(batch, tokens={m: t.half() for m, t in batch["tokens"].items()})  # as a cache stores them
    assert all(t.dtype == torch.float32 for t in model(half)["context"].values())


def overlapping_parameters(module):
    """The parameters the overlapping tokens depend on: everything but the complementary pathway and decoders."""
    return {n: p for n, p in module.named_parameters()
            if not n.startswith(("comp_", "residual.", "recon.", "token_decoder."))}


@pytest.mark.parametrize("target", ["pooled", "tokens"])
def test_no_complementary_gradient_reaches_the_overlapping_pathway(target):
    module = _module(complementary_pathway="separate", residual_dims={m: 5 for m in DIMS},
                     recon_dims={m: 5 for m in DIMS}, residual_source="partner", token_dims=DIMS, token_target=target,
                     token_counts=TOKEN_COUNTS)
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pad = {"text": torch.arange(7)[None, :] >= torch.tensor([2, 7, 4])[:, None]}
    out = module(_tokens(), pad, keep=keep, view2={"tokens": _tokens(seed=1), "padding_mask": pad})
    with torch.no_grad():  # the second view's registers are the module's output on the second view
        alone = module(_tokens(seed=1), pad, keep=keep)["registers"]
    assert all(torch.allclose(out["view2"][m], alone[m], atol=1e-6) for m in DIMS)
    out["global"] = {m: torch.randn(3, 5, generator=torch.Generator().manual_seed(1)) for m in DIMS}
    regs, masks = out["registers"], complementary_masks(keep[:, 3:])
    shared = {m: masked_mean(r[:, :3], keep[:, :3]) for m, r in regs.items()}
    comp = {m: masked_mean(r[:, 3:], keep[:, 3:]) for m, r in regs.items()}
    objectives = {
        "l2+diversity": sum(sum(complementary_terms(r[:, 3:], keep[:, 3:], shared[m], masks)) for m, r in regs.items()),
        "residual": sum(residual_term(out["residual"][m], out["global"][m], masks) for m in DIMS),
        "difference": sum(difference_term(shared[m], comp[m], masks) for m in DIMS),
        "view": sum(view_term(comp[m], masked_mean(out["view2"][m][:, 3:], keep[:, 3:]), masks) for m in DIMS),
        "recon": sum((1 - torch.cosine_similarity(out["recon"][m], out["global"][m])).mean() for m in DIMS)}
    context = _tokens()
    for loss in ("cosine", "infonce") if target == "pooled" else ("cosine",):
        objectives[f"token {loss}"] = sum(token_term(out["token"][m], context[m], pad.get(m), masks, target, loss)
                                          for m in DIMS)
    overlap = overlapping_parameters(module)
    comp_params = {n: p for n, p in module.named_parameters() if n.startswith("comp_")}
    for name, loss in objectives.items():
        grads = torch.autograd.grad(loss, list(overlap.values()) + list(comp_params.values()), retain_graph=True,
                                    allow_unused=True)
        grads = dict(zip(list(overlap) + list(comp_params), grads))
        for n in overlap:
            assert grads[n] is None or torch.all(grads[n] == 0), (name, n)
        # the complementary pathway does learn (not every parameter: self-attention over its one token, or a bias
        # that the difference term's standardisation removes, has none)
        assert all(grads[n] is not None for n in comp_params), name
        assert grads["comp_head.weight"].abs().sum() > 0 and grads["comp_tokens"].abs().sum() > 0, name
        if name.startswith("token"):  # and so do the token decoders, every parameter of them
            decoder = dict(module.token_decoder.named_parameters())
            for n, g in zip(decoder, torch.autograd.grad(loss, list(decoder.values()), retain_graph=True)):
                assert g.abs().sum() > 0, (name, n)
    # and the contrastive loss never reaches the complementary pathway
    total, _ = Stage2Loss(3)(out)
    grads = torch.autograd.grad(total, list(comp_params.values()), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in grads)


def test_padded_context_positions_do_not_change_outputs():
    module = _module().eval()
    tokens = _tokens(N=9)
    pad = torch.arange(9)[None, :] >= torch.tensor([3, 9, 6])[:, None]  # True = padded
    with torch.no_grad():
        ref = module(tokens, {"text": pad})["registers"]["text"]
        changed = dict(tokens, text=torch.where(pad[..., None], 50 * torch.randn_like(tokens["text"]),
                                                tokens["text"]))
        out = module(changed, {"text": pad})["registers"]["text"]
        unmasked = module(changed)["registers"]["text"]
        assert torch.allclose(out, ref, atol=1e-6)
        assert not torch.allclose(unmasked, ref, atol=1e-3)  # without the mask the padding does leak in
        # a fully padded row (never happens for text) stays finite
        assert module(tokens, {"text": torch.ones(3, 9, dtype=torch.bool)})["registers"]["text"].isfinite().all()


def test_logit_scale_init_and_argument_checks():
    assert torch.isclose(_module()(_tokens())["logit_scale"], torch.tensor(1 / 0.07))
    assert torch.isclose(_module(logit_scale_init=math.log(20.0))(_tokens())["logit_scale"], torch.tensor(20.0))
    with pytest.raises(ValueError, match="num_overlapping"):
        _module(num_overlapping=5)




def test_wrapper_trains_only_the_register_module(tiny_stage1):
    s1 = tiny_stage1
    module = RegisterModule(s1.feature_dims, s1.embed_dim, width=32, depth=1, num_heads=4,
                            logit_scale_init=s1.logit_scale, recon_dims={m: s1.embed_dim for m in s1.feature_dims})
    model = FluxTalk(s1, module).train()
    assert model.registers is module
    module.nested_dropout_rate = 0.5
    g = torch.Generator().manual_seed(0)
    batch = {"vision": torch.randn(4, 3, 224, 224, generator=g), "tactile": torch.randn(4, 3, 224, 224, generator=g),
             "text": s1.tokenizer(["rough bark", "smooth glass", "soft foam", "a bumpy rubber mat"])}
    keep = nested_dropout_mask(4, 4, 0.5, generator=torch.Generator().manual_seed(3))
    out = model(batch, keep=keep)
    total, _ = Stage2Loss(3, complementary_reg_weight=1.0, complementary_recon_weight=1.0)(out)
    total.backward()
    assert all(not p.requires_grad and p.grad is None for p in s1.parameters())
    assert not s1.clip.training and not s1.tactile_encoder.training  # encoders stay in eval
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"registers.{n}" for n, _ in module.named_parameters()}
    assert all(p.grad is not None for p in module.parameters())
    assert set(model.trainable_state_dict()) == set(module.state_dict())
    # precomputed features (the feature cache path) skip Stage 1 and give the same outputs
    cached = model(s1(batch), keep=keep)
    for m in s1.feature_dims:
        assert torch.allclose(cached["registers"][m], out["registers"][m], atol=1e-6)
        assert torch.equal(cached["global"][m], out["global"][m])


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_logit_scale_learns_from_above_the_bound_and_never_exceeds_it(direction):
    """Starting just below log 100, AdamW + clamp_logit_scale after every step (what the engine does): a loss that
    wants a larger scale keeps t at exactly log 100 (never above), one that wants a smaller scale moves it down.
    A clamp inside the forward would give no gradient at all once t passed the bound."""
    module = _module(logit_scale_init=math.log(100) - 1e-4)
    opt = torch.optim.AdamW([module.logit_scale], lr=0.01, weight_decay=0.0)
    seen = []
    for _ in range(5):
        loss = -direction * module(_tokens())["logit_scale"]  # direction 1: larger is better
        loss.backward()
        assert module.logit_scale.grad.abs() > 0  # the gradient flows, also at or above the bound
        opt.step()
        opt.zero_grad()
        module.clamp_logit_scale()
        seen.append(module.logit_scale.item())
    bound = torch.tensor(math.log(100)).item()  # log 100 as the float32 parameter holds it
    if direction > 0:
        assert seen == [bound] * 5
    else:
        assert seen[-1] < bound - 0.04 and seen == sorted(seen, reverse=True)
    assert max(seen) <= bound
