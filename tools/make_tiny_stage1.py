"""Write a tiny Stage 1 in exactly the TVL layout, for the demo and tests (nothing is downloaded).

    python tools/make_tiny_stage1.py --output data/tiny_stage1

DIR/tiny_stage1.pth: {"model": {"tactile_encoder.*", "logit_scale"}, "optimizer", "epoch", "scaler",
                      "args": argparse.Namespace}  (what TVL's main_pretrain saves, CLIP keys stripped; the
                      args of TVL's published ViT-Tiny command, so its data recipe: no text prompt, ...)
DIR/tiny_clip.pt:    the OpenCLIP "fluxtalk-tiny" state dict (pass it as --clip_pretrained)
Weights are random but seeded, so the same seed always writes the same files.
"""
import argparse
import logging
import math
import os
import sys

import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from stage1 import DEFAULT_TACTILE_MODEL, create_tactile_encoder  # noqa: E402  (also registers fluxtalk-tiny)
from util.checkpoint import atomic_write  # noqa: E402

TINY_CLIP_MODEL = "fluxtalk-tiny"


def tvl_train_args(seed=0, **changes):
    """The args Namespace TVL's main_pretrain.py stores in its checkpoints, as its published ViT-Tiny command
    makes it (--shuffle_text --no_text_prompt --replace_synonyms --use_not_contact ...); `changes` override
    fields (e.g. no_text_prompt=False, subtract_background="background")."""
    args = argparse.Namespace(
        batch_size=256, epochs=200, accum_iter=1, use_tac_text_loss=False, tactile_model=DEFAULT_TACTILE_MODEL,
        common_latent_dim=None, drop_rate=0.0, drop_path_rate=0.0, disable_vision_text_loss=False,
        disable_tactile_text_loss=False, find_unused_parameters=True, weight_decay=0.05, lr=3e-4, blr=3e-4,
        min_lr=0.0, warmup_epochs=10, datasets_dir="./.datasets", datasets=["ssvtp", "hct"],
        importance_sampling=None, use_not_contact=True, percent_not_contact=0.1, color_jitter=False,
        randomize_crop=False, subtract_background=None, shuffle_text=True, no_text_prompt=True,
        replace_synonyms=True, keep_k_synonyms=None, output_dir="./output_dir", log_dir=None,
        log_name="tvl_vittiny_tactile_encoder", device="cuda", seed=seed, resume="", start_epoch=0, num_workers=20,
        pin_mem=True, multi_epochs_dataloader=True, active_modality_names=["vision", "tactile", "text"],
        world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://", enable_flash_attention2=False,
        dist_eval=False, distributed=False)
    for k, v in changes.items():
        if not hasattr(args, k):
            raise ValueError(f"TVL's args have no field {k!r}")
        setattr(args, k, v)
    return args


def make_tiny_stage1(out_dir, seed=0, **train_args):
    """-> (path of tiny_stage1.pth, path of tiny_clip.pt); reuses them when both exist. train_args: changes to the
    stored TVL args (tvl_train_args)."""
    ckpt_path = os.path.join(out_dir, "tiny_stage1.pth")
    clip_path = os.path.join(out_dir, "tiny_clip.pt")
    if os.path.isfile(ckpt_path) and os.path.isfile(clip_path):
        return ckpt_path, clip_path
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # OpenCLIP warns "No pretrained weights loaded": random is the point here
    try:
        clip = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    # As TVL: the tactile head maps into the CLIP text width (= the joint embedding dim).
    tactile = create_tactile_encoder(DEFAULT_TACTILE_MODEL, num_classes=clip.transformer.width)
    model = {f"tactile_encoder.{k}": v for k, v in tactile.state_dict().items()}
    model["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # TVL's init_logit_scale, a 0-d parameter
    args = tvl_train_args(seed, **train_args)
    ckpt = {"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "scaler": {}, "args": args}
    # Temporary name, then rename: a half-written file is never mistaken for a finished one.
    for obj, path in ((clip.state_dict(), clip_path), (ckpt, ckpt_path)):
        atomic_write(path, lambda f, obj=obj: torch.save(obj, f))
    return ckpt_path, clip_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory to write tiny_stage1.pth and tiny_clip.pt to")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    for p in make_tiny_stage1(a.output, a.seed):
        print(p)
