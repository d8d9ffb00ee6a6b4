"""FluxTalk Stage 2 model: K register tokens that read frozen Stage 1 token features through cross-attention.

The register module is the only trainable part (DDP wraps only it); FluxTalk puts the frozen Stage 1 in front.
Shapes: B batch, K register tokens (first K_o overlapping), D register width, N_m/C_m context length/width
of modality m, E output embedding dim.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss_stage2 import masked_mean


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


def residual_input(registers, keep, num_overlapping):
    """(B, K, E) registers of one modality, bool (B, K) keep -> (B, 2E) input of its residual decoder:
    [stop-gradient mean of the kept overlapping tokens (the contrastive loss's embedding, before normalisation),
    mean of the kept complementary tokens (zeros where none is kept)]. The stop-gradient leaves the shared part
    to the contrastive loss, so only the complementary tokens can add what it lacks."""
    K_o = num_overlapping
    shared = masked_mean(registers[:, :K_o], keep[:, :K_o]).detach()
    return torch.cat([shared, masked_mean(registers[:, K_o:], keep[:, K_o:])], dim=-1)


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


class RegisterModule(nn.Module):
    """Everything that trains: register tokens, per-modality adapters, blocks, norm + projection,
    the log logit scale and the optional recon / residual decoders."""

    def __init__(self, feature_dims, embed_dim, num_tokens=4, num_overlapping=3, width=256, depth=2,
                 num_heads=4, mlp_ratio=4.0, attn_dropout=0.0, logit_scale_init=None, recon_dims=None,
                 residual_dims=None):
        super().__init__()
        if not 1 <= num_overlapping <= num_tokens:
            raise ValueError(f"num_overlapping must be in 1..num_tokens={num_tokens}, got {num_overlapping}")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_tokens, self.num_overlapping = num_tokens, num_overlapping
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
        # A stride-0 view of the (K, D) parameter: no per-sample or per-modality copy of the registers.
        x = self.register_tokens.expand(features.shape[0], -1, -1)
        for blk in self.blocks:
            x = blk(x, context, attn_mask)
        return self.head(self.norm(x))

    def keep_mask(self, batch_size, generator=None):
        """(B, K) keep mask: a nested dropout draw in training (one per sample, shared by all its modalities),
        every token in eval."""
        rate = self.nested_dropout_rate if self.training else 0.0
        return nested_dropout_mask(batch_size, self.num_tokens, rate, generator, self.register_tokens.device)

    def forward(self, tokens, padding_mask=None, keep=None, generator=None):
        """tokens {m: (B, N_m, C_m)}, padding_mask {m: bool (B, N_m)} -> dict (see CONTRACT.md)."""
        padding_mask = padding_mask or {}
        if keep is None:
            keep = self.keep_mask(next(iter(tokens.values())).shape[0], generator)
        registers = {m: self.encode(m, feats, padding_mask.get(m)) for m, feats in tokens.items()}  # (B, K, E)
        out = {"registers": registers, "keep": keep, "logit_scale": self.logit_scale.exp().clamp(max=100.0)}
        if self.recon is not None:
            # Dropped tokens are zeroed, so they contribute exactly nothing to the linear decoder.
            out["recon"] = {m: self.recon[m]((r * keep[..., None]).flatten(1)) for m, r in registers.items()}
        if self.residual is not None:
            out["residual"] = {m: self.residual[m](residual_input(r, keep, self.num_overlapping))
                               for m, r in registers.items()}
        return out


class FluxTalk(nn.Module):
    """Frozen Stage 1 -> register module. `stage1` is any module with the stage1.FrozenStage1 interface."""

    def __init__(self, stage1, registers):
        super().__init__()
        self.stage1 = stage1
        self.registers = registers  # the RegisterModule; main_train_stage2 may replace it by its DDP wrapper

    def forward(self, batch, keep=None, generator=None):
        if "tokens" in batch:  # a feature-cache batch already holds Stage 1's outputs (tokens stored in float16)
            feats = dict(batch, tokens={m: t.float() for m, t in batch["tokens"].items()})
        else:
            feats = self.stage1(batch)
        if keep is None:
            # Drawn here rather than inside the register module: the rate changes every step, which would make a
            # torch.compile'd register module recompile every step.
            keep = self.unwrapped_registers.keep_mask(next(iter(feats["tokens"].values())).shape[0], generator)
        out = self.registers(feats["tokens"], feats.get("padding_mask"), keep=keep, generator=generator)
        out["global"] = feats["global"]  # {m: (B, E)} Stage 1 global embeddings (recon targets, text accuracy)
        return out

    @property
    def unwrapped_registers(self):
        """The RegisterModule itself, also after main_train_stage2 wrapped it in DDP."""
        return getattr(self.registers, "module", self.registers)

    def trainable_state_dict(self):
        return self.unwrapped_registers.state_dict()
