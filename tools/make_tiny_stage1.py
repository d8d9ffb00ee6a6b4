"""Write a tiny Stage 1 in exactly the TVL layout, for the demo and tests (nothing is downloaded).

    python tools/make_tiny_stage1.py --output data/tiny_stage1

DIR/tiny_stage1.pth: {"model": {"tactile_encoder.*", "logit_scale"}, "optimizer", "epoch", "scaler",
                      "args": argparse.Namespace}  (what TVL's main_pretrain saves, CLIP keys stripped)
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


def make_tiny_stage1(out_dir, seed=0):
    """-> (path of tiny_stage1.pth, path of tiny_clip.pt); reuses them when both exist."""
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
    args = argparse.Namespace(tactile_model=DEFAULT_TACTILE_MODEL, clip_model=TINY_CLIP_MODEL,
                              common_latent_dim=None, active_modality_names=["vision", "tactile", "text"],
                              epochs=1, seed=seed)
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
