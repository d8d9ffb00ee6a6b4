"""Frozen Stage 1: TVL checkpoint compatibility, token features vs OpenCLIP/timm's own outputs, freezing, bad input.

Everything is offline: tiny OpenCLIP configs with random weights saved to disk, timm models with pretrained=False.
"""
import argparse
import math
import os
import pathlib
import subprocess
import sys

import open_clip
import pytest
import timm
import torch
import torch.nn as nn

from conftest import ROOT, stage1_flags
from stage1 import Stage1Error, build_stage1
from tools.make_tiny_stage1 import make_tiny_stage1


def save_tvl_checkpoint(path, tactile, args, logit_scale=math.log(1 / 0.07), extra=None):
    """What TVL's main_pretrain writes: the TVL state dict minus every clip.* key, plus training state."""
    opt = torch.optim.AdamW(tactile.parameters(), lr=1e-4)  # a real optimizer state, as in TVL files
    for p in tactile.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.zero_grad()
    model = {f"tactile_encoder.{k}": v.clone() for k, v in tactile.state_dict().items()}
    model["logit_scale"] = torch.ones([]) * logit_scale
    model.update(extra or {})
    torch.save({"model": model, "optimizer": opt.state_dict(), "epoch": 399,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 0},
                "args": args}, path)
    return path


def tvl_tactile(name, num_classes, seed=0):
    torch.manual_seed(seed)  # built exactly as TVL does, independently of stage1.create_tactile_encoder
    return timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool="avg").eval()


@pytest.fixture(scope="module")
def tiny(tiny_stage1_files):
    return tiny_stage1_files


def test_tvl_layout_checkpoint_loads_and_matches_original_tactile_encoder(tiny, tmp_path):
    tactile = tvl_tactile("vit_tiny_patch16_224", num_classes=64, seed=1)  # 64 = fluxtalk-tiny text width
    args = argparse.Namespace(tactile_model="vit_tiny_patch16_224", common_latent_dim=None, blr=3e-4,
                              active_modality_names=["tactile", "text"], output_dir="./output")
    path = save_tvl_checkpoint(tmp_path / "tvl_enc_vittiny.pth", tactile, args, logit_scale=2.5)
    s1 = build_stage1(str(path), "fluxtalk-tiny", tiny[1])

    x = torch.randn(2, 3, 224, 224)
    out = s1({"tactile": x, "index": torch.arange(2)})
    with torch.no_grad():
        ref_tokens = tactile.forward_features(x)
        ref_global = tactile(x)
    assert torch.equal(out["tokens"]["tactile"], ref_tokens)
    assert out["tokens"]["tactile"].shape == (2, 197, 192)
    assert torch.equal(out["global"]["tactile"], ref_global)
    assert s1.feature_dims == {"vision": 64, "tactile": 192, "text": 64} and s1.embed_dim == 64
    assert s1.logit_scale == pytest.approx(2.5)
    assert "tactile" not in out["padding_mask"]


def test_tactile_model_defaults_to_checkpoint_args_and_mismatch_names_keys(tiny, tmp_path):
    # A 384-px tiny ViT differs from the default only in pos_embed: the stored args must pick it.
    tactile = tvl_tactile("vit_tiny_patch16_384", num_classes=64)
    path = str(save_tvl_checkpoint(tmp_path / "vit384.pth", tactile, argparse.Namespace(tactile_model="vit_tiny_patch16_384")))
    s1 = build_stage1(path, "fluxtalk-tiny", tiny[1], active_modalities=("tactile", "text"))
    assert torch.equal(s1.tactile_encoder.pos_embed, tactile.pos_embed)
    # the token counts the model is built with, known before any input: those of a forward at 384 px
    with torch.no_grad():
        n_tactile = tactile.forward_features(torch.randn(1, 3, 384, 384)).shape[1]
    assert s1.token_counts == {"tactile": n_tactile, "text": 77} and n_tactile == 577

    with pytest.raises(Stage1Error) as e:
        build_stage1(path, "fluxtalk-tiny", tiny[1], tactile_model="vit_tiny_patch16_224")
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "--tactile_model vit_tiny_patch16_224" in msg
    assert "pos_embed: (1, 577, 192) vs (1, 197, 192)" in msg
    assert "args say tactile_model='vit_tiny_patch16_384': pass --tactile_model vit_tiny_patch16_384" in msg


def test_per_position_token_target_refuses_a_tactile_model_without_a_token_count(tiny, tmp_path):
    """A timm tactile model without a patch embedding (a ConvNeXt) has no token count before a forward: Stage 1 still
    builds, and only the per-position token decoder, which needs it, is refused in one line."""
    import main_train_stage2 as M
    tactile = tvl_tactile("convnext_atto", num_classes=64)
    stored = argparse.Namespace(tactile_model="convnext_atto")
    path = str(save_tvl_checkpoint(tmp_path / "convnext.pth", tactile, stored))
    s1 = build_stage1(path, "fluxtalk-tiny", tiny[1], active_modalities=("tactile", "text"))
    assert s1.token_counts == {"tactile": None, "text": 77}
    base = ["--stage1_checkpoint", path, "--device", "cpu", "--active_modality_names", "tactile", "text",
            "--complementary_token_weight", "1"]
    with pytest.raises(Stage1Error) as e:
        M.build_model(M.parse_args(base + ["--complementary_token_target", "tokens", "--complementary_token_loss",
                                           "cosine"]), s1)
    assert str(e.value) == ("--complementary_token_target tokens: the ['tactile'] encoder's token count is unknown "
                            "before a forward (--tactile_model convnext_atto has no patch embedding); use "
                            "--complementary_token_target pooled")
    assert M.build_model(M.parse_args(base), s1).unwrapped_registers.token_decoder is not None  # pooled: fine


def test_local_openclip_weights_file_tokens_equal_openclip_outputs(tmp_path):
    # A standard OpenCLIP config, randomly initialised and saved to disk, given as --clip_pretrained <path>.
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    clip_path = str(tmp_path / "vit_s32.pt")
    torch.save(ref.state_dict(), clip_path)
    # Frozen like Stage 1: with no parameter requiring grad torch's attention may take its fused fast path,
    # which rounds differently (~1e-6), so compare the same frozen model.
    ref.requires_grad_(False)
    tactile = tvl_tactile("vit_tiny_patch16_224", num_classes=ref.transformer.width)
    ckpt = str(save_tvl_checkpoint(tmp_path / "tvl.pth", tactile, argparse.Namespace(tactile_model="vit_tiny_patch16_224")))
    s1 = build_stage1(ckpt, "ViT-S-32", clip_path)

    captured = {}
    ref.visual.ln_post.register_forward_hook(lambda m, i, o: captured.__setitem__("vision", o))
    ref.ln_final.register_forward_hook(lambda m, i, o: captured.__setitem__("text", o))
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    image = torch.randn(2, 3, 224, 224)
    text = tokenizer(["a smooth cold metal surface", "rough"])
    with torch.no_grad():
        ref_image, ref_text = ref.encode_image(image), ref.encode_text(text)
    out = s1({"vision": image, "text": text})

    assert out["tokens"]["vision"].shape == (2, 50, 384) and out["tokens"]["text"].shape == (2, 77, 384)
    torch.testing.assert_close(out["tokens"]["vision"], captured["vision"], rtol=0, atol=0)
    torch.testing.assert_close(out["tokens"]["text"], captured["text"], rtol=0, atol=0)
    torch.testing.assert_close(out["global"]["vision"], ref_image, rtol=0, atol=0)
    torch.testing.assert_close(out["global"]["text"], ref_text, rtol=0, atol=0)
    assert s1.feature_dims == {"vision": 384, "tactile": 192, "text": 384} and s1.embed_dim == 384
    tactile_tokens = s1({"tactile": torch.randn(1, 3, 224, 224)})["tokens"]["tactile"]
    assert s1.token_counts == {"vision": out["tokens"]["vision"].shape[1], "text": out["tokens"]["text"].shape[1],
                               "tactile": tactile_tokens.shape[1]} == {"vision": 50, "text": 77, "tactile": 197}


def test_text_padding_mask_is_after_end_of_text(tiny_stage1):
    tok = tiny_stage1.tokenizer
    text = tok(["a red cup", "a much longer caption about a soft fabric"])
    eot = tok.eot_token_id
    mask = tiny_stage1({"text": text})["padding_mask"]["text"]
    for row, m in zip(text.tolist(), mask):
        end = row.index(eot)
        assert m.tolist() == [j > end for j in range(77)]
    # What is masked cannot matter: changing ids after end-of-text leaves every unmasked token and the global unchanged.
    changed = text.clone()
    changed[mask] = 1000
    a, b = tiny_stage1({"text": text}), tiny_stage1({"text": changed})
    assert torch.equal(a["global"]["text"], b["global"]["text"])
    assert torch.equal(a["tokens"]["text"][~mask], b["tokens"]["text"][~mask])


def test_frozen_eval_and_no_autograd(tiny_stage1):
    parent = nn.Module()
    parent.stage1 = tiny_stage1
    parent.head = nn.Linear(2, 2)
    parent.train()
    assert parent.head.training
    assert not any(m.training for m in tiny_stage1.modules())
    assert not any(p.requires_grad for p in tiny_stage1.parameters())
    batch = {"vision": torch.randn(1, 3, 224, 224), "tactile": torch.randn(1, 3, 224, 224),
             "text": tiny_stage1.tokenizer(["hard"])}
    with torch.enable_grad():
        out = tiny_stage1(batch)
    tensors = [t for group in out.values() for t in group.values()]
    assert len(tensors) == 7 and all(t.grad_fn is None and not t.requires_grad for t in tensors)


@pytest.mark.slow
def test_active_modalities_and_fingerprint_across_processes(tiny, tiny_stage1):
    s1 = build_stage1(tiny[0], "fluxtalk-tiny", tiny[1], active_modalities=("tactile", "text"))
    out = s1({"vision": torch.randn(1, 3, 224, 224), "tactile": torch.randn(1, 3, 224, 224),
              "text": s1.tokenizer(["soft"])})
    assert set(out["tokens"]) == {"tactile", "text"} and set(s1.feature_dims) == {"tactile", "text"}
    # Same files in a fresh process (the CLI): the same fingerprint.
    r = subprocess.run([sys.executable, "stage1.py", *stage1_flags(tiny)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"fingerprint {tiny_stage1.fingerprint}" in r.stdout
    # ...and it tracks the weights actually loaded: other CLIP weights (random init) give another one.
    assert s1.fingerprint == tiny_stage1.fingerprint
    assert build_stage1(tiny[0], "fluxtalk-tiny", "none").fingerprint != tiny_stage1.fingerprint


def test_make_tiny_stage1_is_deterministic_and_tvl_layout(tiny, tmp_path):
    again = make_tiny_stage1(str(tmp_path), seed=0)
    for a, b in zip(tiny, again):
        sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        sa, sb = sa.get("model", sa), sb.get("model", sb)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ckpt = torch.load(tiny[0], weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert not any(k.startswith("clip") for k in ckpt["model"])
    assert {k.split(".")[0] for k in ckpt["model"]} == {"tactile_encoder", "logit_scale"}


# ----------------------------------------------------------------------------- bad input

def raises(match_all, *args, **kwargs):
    with pytest.raises(Stage1Error) as e:
        build_stage1(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for s in match_all:
        assert s in msg, msg
    return msg


def test_bad_checkpoint_files(tiny, tmp_path):
    clip = ("fluxtalk-tiny", tiny[1])
    missing = str(tmp_path / "nope.pth")
    raises(["--stage1_checkpoint", missing, "no such file"], missing, *clip)
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    raises(["--stage1_checkpoint", str(text_file), "not a torch checkpoint file"], str(text_file), *clip)
    no_model = str(tmp_path / "sd.pth")
    torch.save({"state_dict": {}}, no_model)
    raises(["--stage1_checkpoint", no_model, "no 'model' key", "state_dict"], no_model, *clip)
    # A Namespace holding a type that needs unpickling beyond the allow-list is refused, never loaded unsafely.
    ckpt = torch.load(tiny[0], weights_only=False)
    ckpt["args"].output_dir = pathlib.Path("/runs/tvl")
    unsafe = str(tmp_path / "unsafe.pth")
    torch.save(ckpt, unsafe)
    raises([unsafe, "refusing to unpickle", "Path", "weights_only is never turned off"], unsafe, *clip)


def test_bad_clip_flags(tiny):
    raises(["--clip_model ViT-L-15", "unknown OpenCLIP model", "ViT-L-14"], tiny[0], "ViT-L-15", "none")
    raises(["--clip_pretrained laion9000", "neither a known tag", "datacomp_xl_s13b_b90k", "existing file"],
           tiny[0], "ViT-L-14", "laion9000")
    raises(["--clip_pretrained", tiny[0], "cannot load it into fluxtalk-tiny"], tiny[0], "fluxtalk-tiny", tiny[0])


@pytest.mark.slow
def test_cli_known_tag_download_fails_offline(tiny):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, so a fresh process is the only reliable way to
    # be sure nothing is downloaded; the download fails before any ViT-L-14 is instantiated.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "stage1.py", "--stage1_checkpoint", tiny[0]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1
    assert "--clip_pretrained datacomp_xl_s13b_b90k: downloading the ViT-L-14 weights failed (offline machine?)" in line[0]
    assert "--clip_pretrained /path/to/open_clip_pytorch_model.bin" in line[0]


def test_common_latent_dim_checkpoint_maps_globals_through_modality_heads(tiny, tmp_path):
    # TVL with common_latent_dim: tactile encoder without head (num_classes=0), bias-free Linear head per modality.
    tactile = tvl_tactile("vit_tiny_patch16_224", num_classes=0)
    torch.manual_seed(2)
    heads = nn.ModuleDict({"tactile": nn.Linear(192, 32, bias=False), "vision": nn.Linear(64, 32, bias=False),
                           "text": nn.Linear(64, 32, bias=False)})
    extra = {f"modality_heads.{k}": v for k, v in heads.state_dict().items()}
    path = str(save_tvl_checkpoint(tmp_path / "common.pth", tactile, argparse.Namespace(common_latent_dim=32), extra=extra))
    s1 = build_stage1(path, "fluxtalk-tiny", tiny[1])
    clip = open_clip.create_model("fluxtalk-tiny", pretrained=tiny[1]).eval().requires_grad_(False)
    x, image, text = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 224, 224), s1.tokenizer(["warm"])
    out = s1({"tactile": x, "vision": image, "text": text})
    with torch.no_grad():
        torch.testing.assert_close(out["global"]["tactile"], heads["tactile"](tactile(x)), rtol=0, atol=0)
        torch.testing.assert_close(out["global"]["vision"], heads["vision"](clip.encode_image(image)), rtol=0, atol=0)
        torch.testing.assert_close(out["global"]["text"], heads["text"](clip.encode_text(text)), rtol=0, atol=0)
    assert s1.embed_dim == 32 and s1.feature_dims["tactile"] == 192
