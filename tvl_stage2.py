"""FluxTalk Stage 2 model: K register tokens that read frozen Stage 1 token features through cross-attention.

The register module is the only trainable part (DDP wraps only it); FluxTalk puts the frozen Stage 1 in front.
Shapes: B batch, K register tokens (first K_o overlapping), D register width, N_m/C_m context length/width
of modality m, E output embedding dim.

Complementary pathway (RegisterModule's complementary_pathway): "shared" runs all K tokens through one set of
blocks, so every objective on the complementary tokens also reshapes what the overlapping tokens compute;
"separate" gives the K - K_o complementary tokens their own tokens, blocks, norm and head over a stop-gradient
copy of the adapted context. Either way the output is (B, K, E) per modality, the keep mask (B, K) covers all K
tokens, and a dropped complementary token counts in no term.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss_stage2 import masked_mean

MAX_LOG_SCALE = math.log(100)  # the logit scale never exceeds 100 (CLIP's bound)


def nested_dropout_mask(batch_size, num_tokens, rate, generator=None, device=None):
    """Keep mask (B, K), True = kept; every row is a prefix of length L in 1..K.

    P(L = K) = 1 - rate and P(L = j) = rate / (K - 1) for j < K, so token k is dropped with probability
    rate * k / (K - 1): never the first token, the last one with probability `rate`.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"nested dropout rate must be in [0, 1), got {rate!r}")
    positions = torch.arange(num_tokens, device=device)
    if rate == 0.0 or num_tokens == 1:
        return torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
    # Inverse CDF on one uniform per sample: u < rate -> L uniform in 1..K-1, else L = K.
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor), then move.
    u = torch.rand(batch_size, generator=generator, device=generator.device if generator is not None else device)
    u = u.to(device if device is not None else u.device)
    short = (1 + (u / rate * (num_tokens - 1)).floor().long()).clamp(max=num_tokens - 1)  # float rounding guard
    length = torch.where(u < rate, short, torch.full_like(short, num_tokens))  # (B,)
    return positions[None, :] < length.to(positions.device)[:, None]


def residual_input(registers, keep, num_overlapping, partner=None):
    """(B, K, E) registers of one modality, bool (B, K) keep -> (B, 2E) input of its residual decoder:
    [stop-gradient mean of the kept overlapping tokens (the contrastive loss's embedding, before normalisation),
    mean of the kept complementary tokens (zeros where none is kept)]. The stop-gradient leaves the shared part
    to the contrastive loss, so only the complementary tokens can add what it lacks.
    partner: another modality's (B, K, E) registers whose overlapping tokens give the shared half instead (the
    cross-modal residual: the partner never saw this modality's specific factors, so only this modality's
    complementary tokens can supply them)."""
    K_o = num_overlapping
    source = registers if partner is None else partner
    shared = masked_mean(source[:, :K_o], keep[:, :K_o]).detach()
    return torch.cat([shared, masked_mean(registers[:, K_o:], keep[:, K_o:])], dim=-1)


def residual_inputs(registers, keep, num_overlapping, source="own"):
    """{m: (B, K, E)} -> {m: input of m's residual decoder}: (B, 2E) from m's own shared embedding ("own"), or
    (P, B, 2E) from each of the P other modalities' ("partner"; the loss averages over them)."""
    if source == "own":
        return {m: residual_input(r, keep, num_overlapping) for m, r in registers.items()}
    return {m: torch.stack([residual_input(r, keep, num_overlapping, registers[p]) for p in registers if p != m])
            for m, r in registers.items()}


class Attention(nn.Module):
    """Multi-head attention through SDPA; self-attention when `context` is None."""

    def __init__(self, dim, num_heads, attn_dropout=0.0):
        super().__init__()
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, attn_mask=None, is_causal=False):
        # x: (B, K, D); context: (B, N, D); attn_mask: bool (B, 1, 1, N), True = attend
        context = x if context is None else context
        B, K, D = x.shape
        H = self.num_heads
        q = self.q(x).view(B, K, H, D // H).transpose(1, 2)  # (B, H, K, d)
        k, v = self.kv(context).view(B, context.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, K, D))


class Block(nn.Module):
    """Pre-LN: causal self-attention among registers, cross-attention to the context, MLP."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_dropout=0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, attn_dropout)
        self.cross_attn = Attention(dim, num_heads, attn_dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, context, attn_mask=None):
        # Causal: register k sees registers 0..k only, so a prefix of the output never depends on the suffix.
        x = x + self.self_attn(self.norm1(x), is_causal=True)
        x = x + self.cross_attn(self.norm2(x), context, attn_mask)
        return x + self.mlp(self.norm3(x))


class TokenDecoder(nn.Module):
    """The per-position token decoder (MAE's decoder reading a 2-token memory): (..., 2E) residual_input ->
    (..., N, C) predictions of a modality's N frozen Stage 1 context tokens.

    Memory: [Linear(E -> D)(shared half), Linear(E -> D)(comp half)] + a learned (2, D) slot embedding (so the two
    slots are told apart). One learned query per context position (N, D), truncated normal like the register tokens,
    cross-attends to the memory (Attention: SDPA), then an MLP, a LayerNorm and Linear(D -> C), pre-LN as Block. The
    queries are the only per-position parameters: what differs between two samples' predictions comes from the
    memory alone, so position n's prediction is what the shared embedding and the complementary tokens say of token
    n."""

    def __init__(self, embed_dim, width, num_heads, num_positions, out_dim, mlp_ratio=4.0, attn_dropout=0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.queries = nn.Parameter(torch.empty(num_positions, width))  # (N, D)
        self.slots = nn.Parameter(torch.empty(2, width))  # (2, D): shared slot, complementary slot
        self.shared_in, self.comp_in = nn.Linear(embed_dim, width), nn.Linear(embed_dim, width)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = Attention(width, num_heads, attn_dropout)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.head = nn.Linear(width, out_dim)
        nn.init.trunc_normal_(self.queries, std=0.02)  # as the register tokens
        nn.init.trunc_normal_(self.slots, std=0.02)

    def forward(self, x):
        lead = x.shape[:-1]  # (B,) or (P, B)
        shared, comp = x.reshape(-1, 2 * self.embed_dim).split(self.embed_dim, dim=-1)  # (M, E) each
        memory = torch.stack([self.shared_in(shared), self.comp_in(comp)], dim=1) + self.slots  # (M, 2, D)
        q = self.queries.expand(memory.shape[0], -1, -1)  # (M, N, D), a view
        h = q + self.cross_attn(self.norm1(q), memory)
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm(h)).reshape(*lead, *self.queries.shape[:1], -1)  # (..., N, C)


class RegisterModule(nn.Module):
    """Everything that trains: register tokens, per-modality adapters, blocks, norm + projection,
    the log logit scale and the optional recon / residual decoders.

    complementary_pathway "shared": all K tokens run through the same blocks, norm and head. "separate": the
    K - K_o complementary tokens get their own tokens, blocks (same depth and heads), final norm and head, and read
    a stop-gradient copy of the adapted context (Domain Separation Networks' private encoder); the overlapping tokens
    run through the original blocks alone, so, the self-attention being causal, their outputs are those of a shared
    module with the same weights, and no complementary objective reaches the parameters they depend on.
    residual_source "own" | "partner": which modality's shared embedding the residual and token decoders read
    (residual_inputs).
    token_dims {m: C_m}: make the token-level residual's decoders, reading residual_inputs like the residual decoder
    and predicting m's frozen Stage 1 context tokens: token_target "pooled" Linear(2E -> C_m) (their mean), "tokens"
    a TokenDecoder with token_counts[m] queries (every token)."""

    def __init__(self, feature_dims, embed_dim, num_tokens=4, num_overlapping=3, width=256, depth=2,
                 num_heads=4, mlp_ratio=4.0, attn_dropout=0.0, logit_scale_init=None, recon_dims=None,
                 residual_dims=None, complementary_pathway="shared", residual_source="own", token_dims=None,
                 token_target="pooled", token_counts=None):
        super().__init__()
        if not 1 <= num_overlapping <= num_tokens:
            raise ValueError(f"num_overlapping must be in 1..num_tokens={num_tokens}, got {num_overlapping}")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if complementary_pathway not in ("shared", "separate"):
            raise ValueError(f"complementary_pathway must be 'shared' or 'separate', got {complementary_pathway!r}")
        if residual_source not in ("own", "partner"):
            raise ValueError(f"residual_source must be 'own' or 'partner', got {residual_source!r}")
        if residual_source == "partner" and (residual_dims or token_dims) and len(feature_dims) < 2:
            raise ValueError("residual_source 'partner' needs two or more modalities")
        if token_target not in ("pooled", "tokens"):
            raise ValueError(f"token_target must be 'pooled' or 'tokens', got {token_target!r}")
        if token_dims and token_target == "tokens" and not set(token_dims) <= set(token_counts or {}):
            raise ValueError(f"token_target 'tokens' needs token_counts for {sorted(token_dims)}, got {token_counts}")
        self.num_tokens, self.num_overlapping = num_tokens, num_overlapping
        self.separate, self.residual_source = complementary_pathway == "separate", residual_source
        self.nested_dropout_rate = 0.0  # set by the engine every step (linear warm-up schedule)
        self.register_tokens = nn.Parameter(torch.empty(num_tokens, width))  # (K, D), shared by all modalities
        self.adapters = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(c), nn.Linear(c, width))
                                       for m, c in feature_dims.items()})
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio, attn_dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim)
        # As in OpenCLIP / TVL the parameter holds t = log(scale); Stage 1's value is already a log-scale.
        init = math.log(1 / 0.07) if logit_scale_init is None else float(logit_scale_init)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        # Linear(K*E -> E_m) per modality; create only when its loss weight is > 0, or DDP sees unused params.
        self.recon = None if not recon_dims else nn.ModuleDict(
            {m: nn.Linear(num_tokens * embed_dim, e) for m, e in recon_dims.items()})
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.register_tokens, std=0.02)
        # Linear(2E -> E_m) per modality on residual_input. Made after the other initialisations so that turning
        # it on leaves every other parameter's initial value unchanged (same seed: comparable runs).
        self.residual = None if not residual_dims else nn.ModuleDict(
            {m: nn.Linear(2 * embed_dim, e) for m, e in residual_dims.items()})
        if self.residual is not None:
            self.residual.apply(self._init_weights)
        if self.separate:
            # Last, for the same reason. The complementary tokens are split off the (K, D) draw above, so both
            # pathways start from the values a shared module starts from; (K - K_o, D) and (K_o, D) afterwards.
            drawn = self.register_tokens.detach()
            self.register_tokens = nn.Parameter(drawn[:num_overlapping].clone())
            self.comp_tokens = nn.Parameter(drawn[num_overlapping:].clone())
            self.comp_blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio, attn_dropout) for _ in range(depth)])
            self.comp_norm = nn.LayerNorm(width)
            self.comp_head = nn.Linear(width, embed_dim)
            for part in (self.comp_blocks, self.comp_norm, self.comp_head):
                part.apply(self._init_weights)
        # The token-level residual's decoders, made last for the same reason.
        self.token_decoder = None if not token_dims else nn.ModuleDict({
            m: nn.Linear(2 * embed_dim, c) if token_target == "pooled" else
            TokenDecoder(embed_dim, width, num_heads, token_counts[m], c, mlp_ratio, attn_dropout)
            for m, c in token_dims.items()})
        if self.token_decoder is not None:
            self.token_decoder.apply(self._init_weights)

    @torch.no_grad()
    def clamp_logit_scale(self):
        """t = log(scale) clamped in place to [0, log 100] (as OpenCLIP does after each optimizer step)."""
        self.logit_scale.clamp_(0, MAX_LOG_SCALE)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):  # MAE-style init
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, modality, features, padding_mask=None):
        """(B, N, C_m) context of one modality (+ bool (B, N) padding mask, True = padded) -> (B, K, E)."""
        context = self.adapters[modality](features)  # (B, N, D)
        attn_mask = None
        if padding_mask is not None:
            attend = ~padding_mask
            # A fully padded row would make SDPA return NaN; let it attend everywhere instead (its output is
            # meaningless but finite). Cannot happen for text: the SOT/EOT tokens are never padding.
            attend = attend | ~attend.any(dim=1, keepdim=True)
            attn_mask = attend[:, None, None, :]  # (B, 1, 1, N)
        out = self.pathway(self.register_tokens, self.blocks, self.norm, self.head, context, attn_mask)
        if self.separate:  # the stop-gradient context: no complementary gradient reaches the adapters
            comp = self.pathway(self.comp_tokens, self.comp_blocks, self.comp_norm, self.comp_head, context.detach(),
                                attn_mask)
            out = torch.cat([out, comp], dim=1)  # (B, K_o + K - K_o, E)
        return out

    @staticmethod
    def pathway(tokens, blocks, norm, head, context, attn_mask):
        """(T, D) register tokens through the blocks (causal among themselves, reading the (B, N, D) context),
        the final norm and the head -> (B, T, E)."""
        # A stride-0 view of the parameter: no per-sample or per-modality copy of the registers.
        x = tokens.expand(context.shape[0], -1, -1)
        for blk in blocks:
            x = blk(x, context, attn_mask)
        return head(norm(x))

    def keep_mask(self, batch_size, generator=None):
        """(B, K) keep mask: a nested dropout draw in training (one per sample, shared by all its modalities),
        every token in eval."""
        rate = self.nested_dropout_rate if self.training else 0.0
        return nested_dropout_mask(batch_size, self.num_tokens, rate, generator, self.register_tokens.device)

    def forward(self, tokens, padding_mask=None, keep=None, generator=None, view2=None):
        """tokens {m: (B, N_m, C_m)}, padding_mask {m: bool (B, N_m), True = padded} -> {"registers": {m: (B, K, E)}
        every token (dropped ones too; `keep` says which count), "keep": bool (B, K), "logit_scale": 0-d, and, with
        their decoders, "recon" / "residual": {m: (B, E_m)} predictions of Stage 1's global embedding ("residual"
        with residual_source "partner": (P, B, E_m), one per other modality), "token": {m: (B, C_m)} (pooled) or
        (B, N_m, C_m) (tokens) predictions of m's frozen context tokens (partner: a leading P as well)}.
        view2: {"tokens", "padding_mask"} of a second augmented view of the same samples (the view contrastive
        term): its registers are returned too, as "view2": {m: (B, K, E)}, under the same keep mask."""
        padding_mask = padding_mask or {}
        if keep is None:
            keep = self.keep_mask(next(iter(tokens.values())).shape[0], generator)
        registers = {m: self.encode(m, feats, padding_mask.get(m)) for m, feats in tokens.items()}  # (B, K, E)
        # No clamp here: a clamp in the forward has no gradient above the bound, which would freeze a temperature
        # that starts there; clamp_logit_scale bounds the parameter itself after each optimizer step instead.
        out = {"registers": registers, "keep": keep, "logit_scale": self.logit_scale.exp()}
        if view2 is not None:
            pad2 = view2.get("padding_mask") or {}
            out["view2"] = {m: self.encode(m, feats, pad2.get(m)) for m, feats in view2["tokens"].items()}
        if self.recon is not None:
            # Dropped tokens are zeroed, so they contribute exactly nothing to the linear decoder. With a separate
            # pathway the overlapping tokens are read stop-gradient: they answer to the contrastive loss alone.
            K_o = self.num_overlapping
            recon_in = {m: torch.cat([r[:, :K_o].detach(), r[:, K_o:]], dim=1) if self.separate else r
                        for m, r in registers.items()}
            out["recon"] = {m: self.recon[m]((r * keep[..., None]).flatten(1)) for m, r in recon_in.items()}
        if self.residual is not None or self.token_decoder is not None:
            inputs = residual_inputs(registers, keep, self.num_overlapping, self.residual_source)
        if self.residual is not None:
            out["residual"] = {m: self.residual[m](x) for m, x in inputs.items()}
        if self.token_decoder is not None:
            out["token"] = {m: self.token_decoder[m](x) for m, x in inputs.items()}
        return out


class FluxTalk(nn.Module):
    """Frozen Stage 1 -> register module. `stage1` is any module with the stage1.FrozenStage1 interface."""

    def __init__(self, stage1, registers):
        super().__init__()
        self.stage1 = stage1
        self.registers = registers  # the RegisterModule; main_train_stage2 may replace it by its DDP wrapper

    def forward(self, batch, keep=None, generator=None):
        """batch: raw inputs {m: tensor} or a feature-cache batch, each optionally with a second augmented view
        under "view2" (in the same form) -> the register module's output dict plus "global", and with the token-level
        residual's decoders "context" {m: (B, N_m, C_m)} and "padding_mask" {m: bool (B, N_m)}: the frozen tokens the
        register module read (the same tensors, before the adapters) and their padding masks."""
        feats = self.features(batch)
        view2 = self.features(batch["view2"]) if "view2" in batch else None
        if keep is None:
            # Drawn here rather than inside the register module: the rate changes every step, which would make a
            # torch.compile'd register module recompile every step.
            keep = self.unwrapped_registers.keep_mask(next(iter(feats["tokens"].values())).shape[0], generator)
        out = self.registers(feats["tokens"], feats.get("padding_mask"), keep=keep, generator=generator, view2=view2)
        out["global"] = feats["global"]  # {m: (B, E)} Stage 1 global embeddings (recon targets, text accuracy)
        if self.unwrapped_registers.token_decoder is not None:  # the token term's targets: the same tensors, no copy
            out["context"], out["padding_mask"] = feats["tokens"], feats.get("padding_mask") or {}
        return out

    def features(self, batch):
        """Stage 1's {"tokens", "padding_mask", "global"}: computed, or as the feature cache holds them."""
        if "tokens" in batch:  # a feature-cache batch already holds Stage 1's outputs (tokens stored in float16)
            return dict(batch, tokens={m: t.float() for m, t in batch["tokens"].items()})
        return self.stage1(batch)

    @property
    def unwrapped_registers(self):
        """The RegisterModule itself, also after main_train_stage2 wrapped it in DDP."""
        return getattr(self.registers, "module", self.registers)

    def trainable_state_dict(self):
        return self.unwrapped_registers.state_dict()
