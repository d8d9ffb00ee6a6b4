"""Frozen Stage 1 encoders: OpenCLIP (vision, text) + the TVL timm tactile encoder.

Stage 1 is the TVL tactile encoder recipe: an OpenCLIP ViT-L-14 (datacomp_xl_s13b_b90k) for vision and text,
and a timm ViT trained to land in the same space. TVL checkpoints (tvl_enc_vit{tiny,s,b}.pth) hold only the
tactile side:

    {"model": {"tactile_encoder.*": ..., "logit_scale": ..., ["modality_heads.<m>.weight": ...]},
     "optimizer": ..., "epoch": ..., "scaler": ..., "args": argparse.Namespace(...)}

so the CLIP weights come from OpenCLIP (a pretrained tag or a local weights file). Everything here is frozen and
runs in eval mode without autograd: Stage 2 only reads token features from it.

    python stage1.py --stage1_checkpoint tvl_enc_vittiny.pth              # prints feature dims + fingerprint
"""
import argparse
import difflib
import hashlib
import logging
import os
import re
import sys

import open_clip
import timm
import torch
import torch.nn as nn
from open_clip.transformer import text_global_pool

from util.checkpoint import CheckpointError, first_line, load_torch_file, state_dict_mismatch
from util.misc import MODALITIES

# The repo's tiny OpenCLIP config ("fluxtalk-tiny") for the demo and tests: registered at import so
# `--clip_model fluxtalk-tiny --clip_pretrained none` works offline.
MODEL_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "model_configs")
open_clip.add_model_config(MODEL_CONFIG_DIR)

DEFAULT_TACTILE_MODEL = "vit_tiny_patch16_224"  # TVL's default (and smallest) tactile encoder


class Stage1Error(ValueError):
    """A bad Stage 1 input (file, flag or key); the message is one line naming it."""


def add_stage1_args(parser):
    g = parser.add_argument_group("Stage 1 (frozen encoders)")
    g.add_argument("--stage1_checkpoint", default=None, type=str,
                   help="TVL tactile encoder checkpoint (tvl_enc_vittiny.pth, ...) or a tools/ tiny one")
    g.add_argument("--clip_model", default="ViT-L-14", type=str, help="OpenCLIP model name")
    g.add_argument("--clip_pretrained", default="datacomp_xl_s13b_b90k", type=str,
                   help="OpenCLIP pretrained tag, a local weights file, or 'none' (random init)")
    g.add_argument("--tactile_model", default=None, type=str,
                   help=f"timm tactile model (default: the checkpoint's args.tactile_model, else {DEFAULT_TACTILE_MODEL})")
    return parser


# --------------------------------------------------------------------------- safe loading

def load_stage1_checkpoint(path):
    """-> (model state dict, args Namespace or None) of a TVL-layout Stage 1 file."""
    try:
        ckpt = load_torch_file(path, flag="--stage1_checkpoint")
    except CheckpointError as e:
        raise Stage1Error(str(e)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise Stage1Error(f"--stage1_checkpoint {path}: no 'model' key (found {keys}); expected the TVL layout "
                          f"{{'model': {{'tactile_encoder.*', 'logit_scale'}}, 'args', ...}}")
    state = ckpt["model"]
    if not any(k.startswith("tactile_encoder.") for k in state):
        raise Stage1Error(f"--stage1_checkpoint {path}: 'model' has no 'tactile_encoder.*' weights")
    args = ckpt.get("args")
    if isinstance(args, dict):  # some re-saved files turn the Namespace into a plain dict
        args = argparse.Namespace(**args)
    return state, args if isinstance(args, argparse.Namespace) else None


def _sub_state(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- building the encoders

def create_clip(clip_model, clip_pretrained):
    """OpenCLIP model from a name and a pretrained tag / local file / 'none'; bad input -> Stage1Error."""
    if open_clip.get_model_config(clip_model) is None:
        close = difflib.get_close_matches(clip_model, open_clip.list_models(), n=5, cutoff=0.5)
        raise Stage1Error(f"--clip_model {clip_model}: unknown OpenCLIP model (close names: {close})")
    tags = open_clip.list_pretrained_tags_by_model(clip_model)
    pretrained = None if clip_pretrained in (None, "", "none") else clip_pretrained
    if pretrained is not None and pretrained not in tags and not os.path.isfile(pretrained):
        raise Stage1Error(f"--clip_pretrained {pretrained}: neither a known tag for {clip_model} {tags} "
                          f"nor an existing file (or 'none')")
    try:
        if pretrained is not None and os.path.isfile(pretrained):
            # OpenCLIP loads a local file but still warns "No pretrained weights loaded" (it only counts tags).
            logging.disable(logging.WARNING)
        return open_clip.create_model(clip_model, pretrained=pretrained)
    except Exception as e:
        if pretrained in tags:
            raise Stage1Error(f"--clip_pretrained {pretrained}: downloading the {clip_model} weights failed "
                              f"(offline machine?); download them elsewhere and pass the local file, e.g. "
                              f"--clip_pretrained /path/to/open_clip_pytorch_model.bin (cause: {first_line(e)})") from None
        raise Stage1Error(f"--clip_pretrained {pretrained}: cannot load it into {clip_model}: {first_line(e)}") from None
    finally:
        logging.disable(logging.NOTSET)


def create_tactile_encoder(tactile_model, num_classes):
    """The tactile encoder exactly as TVL builds it (num_classes = CLIP text width, or 0 with modality heads)."""
    if not timm.is_model(tactile_model):
        raise Stage1Error(f"--tactile_model {tactile_model}: unknown timm model")
    return timm.create_model(tactile_model, pretrained=False, num_classes=num_classes, global_pool="avg")


def _check_tactile_fit(encoder, state, tactile_model, ckpt_args, path):
    """Stage1Error listing a few mismatched keys/shapes when the weights do not fit `--tactile_model`."""
    mismatch = state_dict_mismatch(encoder.state_dict(), state)
    if not mismatch:
        return
    hint = ""
    stored = getattr(ckpt_args, "tactile_model", None)
    if stored and stored != tactile_model:
        hint = f"; the checkpoint's args say tactile_model='{stored}': pass --tactile_model {stored}"
    raise Stage1Error(f"--stage1_checkpoint {path}: tactile weights do not fit --tactile_model {tactile_model} "
                      f"({mismatch}){hint}")


def _modality_heads(state, path):
    """TVL's optional per-modality heads (common_latent_dim): bias-free Linear layers keyed by modality.

    TVL then builds the tactile encoder with num_classes=0 and maps every modality's global embedding
    through its head into the common latent space; we assume exactly that layout and refuse anything else.
    """
    heads = _sub_state(state, "modality_heads.")
    if not heads:
        return None
    if any(not re.fullmatch(r"\w+\.weight", k) or v.ndim != 2 for k, v in heads.items()):
        raise Stage1Error(f"--stage1_checkpoint {path}: unsupported 'modality_heads.*' layout {sorted(heads)[:5]} "
                          f"(expected modality_heads.<modality>.weight, bias-free Linear)")
    return nn.ModuleDict({k.split(".")[0]: _linear_from(v) for k, v in heads.items()})


def _linear_from(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def state_fingerprint(named_tensors):
    """sha256 hex over (name, dtype, shape, bytes) of every tensor, in sorted name order: identical weights
    give the same fingerprint in any process; any changed value, shape or dtype changes it."""
    h = hashlib.sha256()
    for name in sorted(named_tensors):
        t = named_tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    return h.hexdigest()


class FrozenStage1(nn.Module):
    """OpenCLIP + timm tactile encoder, frozen; forward(batch) -> token features, padding masks, globals.
    feature_dims / token_counts: {m: C_m} / {m: N_m} of the active modalities' tokens; embed_dim: E of the globals."""

    def __init__(self, clip, tactile_encoder, modality_heads=None, logit_scale=None, tokenizer=None,
                 active_modalities=MODALITIES, fingerprint=None, train_args=None, tactile_model=None):
        super().__init__()
        if not isinstance(clip, open_clip.CLIP):
            raise Stage1Error(f"--clip_model: {type(clip).__name__} models are not supported (need OpenCLIP's "
                              f"CLIP class: a built-in text tower)")
        self.active_modalities = tuple(active_modalities)
        self.clip = clip
        self.tactile_encoder = tactile_encoder
        self.modality_heads = modality_heads
        self.logit_scale = logit_scale
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        # How Stage 1 was trained: the argparse.Namespace stored in its checkpoint (None when absent). Its data
        # recipe (text prompt, background subtraction, ...) is the default of this run's data pipeline.
        self.train_args = train_args
        self.tactile_model = tactile_model  # the timm name the tactile weights were loaded into
        dims = {"vision": clip.visual.transformer.width, "text": clip.transformer.width,
                "tactile": tactile_encoder.num_features}
        self.feature_dims = {m: dims[m] for m in self.active_modalities}
        # N_m, the positions of forward()'s (B, N_m, C_m) tokens, known before any input is seen (a decoder with one
        # query per position is built from it): vision class + patches (CLIP's visual positional embedding), text
        # the context length, tactile timm's patches + prefix (class / register) tokens; None where a timm tactile
        # model has no patch embedding to count (not a ViT).
        patches = getattr(getattr(tactile_encoder, "patch_embed", None), "num_patches", None)
        counts = {"vision": clip.visual.positional_embedding.shape[0], "text": clip.context_length,
                  "tactile": None if patches is None else patches + getattr(tactile_encoder, "num_prefix_tokens", 0)}
        self.token_counts = {m: counts[m] for m in self.active_modalities}
        self.embed_dim = clip.text_projection.shape[1] if modality_heads is None else \
            next(iter(modality_heads.values())).out_features
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        # The encoders are frozen feature extractors: stay in eval (no dropout, fixed norms) whatever the parent does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch):
        """batch {m: input} -> {"tokens": {m: (B,N_m,C_m)}, "padding_mask": {"text": (B,77) bool, True = pad},
        "global": {m: (B,E)}}. One encoder pass per modality gives both tokens and the global embedding."""
        encode = {"vision": self.encode_vision, "text": self.encode_text, "tactile": self.encode_tactile}
        out = {"tokens": {}, "padding_mask": {}, "global": {}}
        for m in self.active_modalities:
            if m not in batch:
                continue
            tokens, pooled, pad = encode[m](batch[m])
            if self.modality_heads is not None:
                pooled = self.modality_heads[m](pooled)
            out["tokens"][m], out["global"][m] = tokens, pooled
            if pad is not None:
                out["padding_mask"][m] = pad
        return out

    def encode_vision(self, image):
        """(B,3,H,W) -> tokens (B,1+N,C) after ln_post (class + patches), global (B,E), no padding."""
        visual = self.clip.visual
        x = visual.transformer(visual._embeds(image))
        pooled, _ = visual._pool(x)  # OpenCLIP's own pooling, so the global equals encode_image
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return visual.ln_post(x), pooled, None

    def encode_text(self, text):
        """(B,L) token ids -> tokens (B,L,C) after ln_final, global (B,E), padding (B,L) True after end-of-text."""
        clip = self.clip
        x = clip.token_embedding(text).to(clip.transformer.get_cast_dtype())
        x = clip.transformer(x + clip.positional_embedding.to(x.dtype), attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        pooled = text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        pooled = clip.text_projection(pooled) if isinstance(clip.text_projection, nn.Linear) \
            else pooled @ clip.text_projection
        # Causal text tower: tokens after end-of-text never influence the pooled feature; mask them out too.
        if clip.text_pool_type == "argmax":
            eot = text.argmax(dim=-1)  # the end-of-text id is the largest id in OpenCLIP's default vocab
        elif clip.text_pool_type == "eos":
            eot = (text == clip.text_eos_id).int().argmax(dim=-1)
        else:
            raise Stage1Error(f"--clip_model: text pool type '{clip.text_pool_type}' has no end-of-text token to mask after")
        padding = torch.arange(text.shape[1], device=text.device)[None, :] > eot[:, None]
        return x, pooled, padding

    def encode_tactile(self, tactile):
        """(B,3,224,224) -> timm forward_features tokens (B,1+N,C_t), global = forward_head (B,E), no padding."""
        x = self.tactile_encoder.forward_features(tactile)
        return x, self.tactile_encoder.forward_head(x), None


def build_stage1(stage1_checkpoint, clip_model="ViT-L-14", clip_pretrained="datacomp_xl_s13b_b90k",
                 tactile_model=None, active_modalities=MODALITIES):
    """Build OpenCLIP + the TVL tactile encoder, load the Stage 1 checkpoint, freeze. Bad input -> Stage1Error."""
    if not stage1_checkpoint:
        raise Stage1Error("--stage1_checkpoint: required (a TVL tactile encoder file such as tvl_enc_vittiny.pth)")
    unknown = [m for m in active_modalities if m not in MODALITIES]
    if unknown:
        raise Stage1Error(f"--active_modality_names: unknown {unknown} (choose from {list(MODALITIES)})")
    state, ckpt_args = load_stage1_checkpoint(stage1_checkpoint)
    clip = create_clip(clip_model, clip_pretrained)
    heads = _modality_heads(state, stage1_checkpoint)

    tactile_model = tactile_model or getattr(ckpt_args, "tactile_model", None) or DEFAULT_TACTILE_MODEL
    # TVL: num_classes = CLIP text width, so the tactile head output lives in the joint space (768 for ViT-L-14);
    # with modality heads (common_latent_dim) the encoder has no head and the heads do the projection.
    tactile = create_tactile_encoder(tactile_model, 0 if heads is not None else clip.transformer.width)
    tactile_state = _sub_state(state, "tactile_encoder.")
    _check_tactile_fit(tactile, tactile_state, tactile_model, ckpt_args, stage1_checkpoint)
    tactile.load_state_dict(tactile_state)
    if heads is not None:
        _check_heads(heads, clip, tactile, active_modalities, stage1_checkpoint)

    logit_scale = state.get("logit_scale")
    loaded = {**{f"clip.{k}": v for k, v in clip.state_dict().items()},
              **{f"tactile_encoder.{k}": v for k, v in tactile_state.items()},
              **{f"modality_heads.{k}": v for k, v in _sub_state(state, "modality_heads.").items()}}
    if logit_scale is not None:
        loaded["logit_scale"] = logit_scale
    return FrozenStage1(clip, tactile, heads,
                        logit_scale=None if logit_scale is None else float(logit_scale.reshape(-1)[0]),
                        tokenizer=open_clip.get_tokenizer(clip_model), active_modalities=active_modalities,
                        fingerprint=state_fingerprint(loaded), train_args=ckpt_args, tactile_model=tactile_model)


def _check_heads(heads, clip, tactile, active_modalities, path):
    in_dims = {"vision": clip.text_projection.shape[1], "text": clip.text_projection.shape[1],
               "tactile": tactile.num_features}
    for m in active_modalities:
        if m not in heads or heads[m].in_features != in_dims[m]:
            raise Stage1Error(f"--stage1_checkpoint {path}: 'modality_heads.{m}.weight' missing or not "
                              f"(*, {in_dims[m]}) for the {m} global embedding")


def main(argv=None):
    parser = add_stage1_args(argparse.ArgumentParser("Build the frozen Stage 1 and print what Stage 2 sees"))
    parser.add_argument("--active_modality_names", nargs="+", default=list(MODALITIES))
    args = parser.parse_args(argv)
    try:
        stage1 = build_stage1(args.stage1_checkpoint, args.clip_model, args.clip_pretrained, args.tactile_model,
                              args.active_modality_names)
    except Stage1Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"feature_dims {stage1.feature_dims} embed_dim {stage1.embed_dim} logit_scale {stage1.logit_scale}")
    print(f"fingerprint {stage1.fingerprint}")


if __name__ == "__main__":
    main()
