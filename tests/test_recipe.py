"""Stage 1's data recipe from its checkpoint (prompt, synonyms, background subtraction, ...), TVL's background
subtraction against an independent transcription of the reference steps, and synonyms for SSVTP only."""
import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T1  # the v1 transforms the TVL reference composed
import torchvision.transforms.functional as TF1
from PIL import Image

import cache_features
import data_stage2 as D
import feature_cache as FC
import main_train_stage2 as M
from conftest import main_in_process
from tools.make_synthetic_tvl import SYNONYMS, make_synthetic_tvl
from tools.make_tiny_stage1 import make_tiny_stage1, tvl_train_args

PROMPT = "This image gives tactile feelings of "
# TVL's normalisation of background-subtracted tactile frames, written out here (not imported from the code).
BG_MEAN = (-0.00809318389762342, -0.01887447008747725, -0.018430588238856332)
BG_STD = (0.04535400223885517, 0.044029170444552575, 0.05332520729596308)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_tvl(str(tmp_path_factory.mktemp("tvl")), n_ssvtp=14, n_hct=14, seed=0)


@pytest.fixture(scope="module")
def tok():
    import open_clip
    return open_clip.get_tokenizer("ViT-L-14")


def stage1_stub(**changes):
    """What resolve_recipe reads of a built Stage 1: the stored args and the tactile model the weights went into."""
    return SimpleNamespace(train_args=tvl_train_args(**changes), tactile_model="vit_tiny_patch16_224")


def data_args(*argv):
    return D.add_data_args(argparse.ArgumentParser()).parse_args(list(argv))


# ----------------------------------------------------------------------------- recipe resolution

def test_unset_recipe_flags_are_sentinels_in_both_entry_points(tiny_stage1_files):
    ckpt, _ = tiny_stage1_files
    for parse in (lambda a: M.parse_args(a), lambda a: cache_features.parse_args(a + ["--output", "x"])):
        a = parse(["--stage1_checkpoint", ckpt, "--device", "cpu"])
        assert all(getattr(a, k) is None for k in (*D.RECIPE_DEFAULTS, "no_text_prompt", "tactile_model"))
        b = parse(["--stage1_checkpoint", ckpt, "--device", "cpu", "--no-shuffle_text", "--replace_synonyms",
                   "--subtract_background", "none", "--percent_not_contact", "0.05"])
        assert (b.shuffle_text, b.replace_synonyms, b.subtract_background, b.percent_not_contact) == \
            (False, True, "none", 0.05)


def test_stage1_recipe_becomes_the_default(capsys):
    args = data_args()
    recipe = D.resolve_recipe(args, stage1_stub(subtract_background="background", color_jitter=True,
                                                percent_not_contact=0.2))
    out = capsys.readouterr().out
    assert recipe == dict(text_prompt="", shuffle_text=True, replace_synonyms=True, use_not_contact=True,
                          percent_not_contact=0.2, subtract_background="background", color_jitter=True)
    assert {k: getattr(args, k) for k in recipe} == recipe and args.no_text_prompt is True
    assert args.tactile_model == "vit_tiny_patch16_224"
    assert "WARNING" not in out and "do not say" not in out
    assert ("recipe: text_prompt='' shuffle_text=True replace_synonyms=True use_not_contact=True "
            "percent_not_contact=0.2 subtract_background='background' color_jitter=True "
            "tactile_model='vit_tiny_patch16_224'") in out.splitlines()
    # with the prompt
    args = data_args()
    D.resolve_recipe(args, stage1_stub(no_text_prompt=False))
    assert args.text_prompt == PROMPT and args.no_text_prompt is False


def test_command_line_wins_with_one_warning_per_departure(capsys):
    args = data_args("--text_prompt", PROMPT, "--no-replace_synonyms", "--shuffle_text",
                     "--subtract_background", "none")
    args.tactile_model = "vit_small_patch16_224"
    recipe = D.resolve_recipe(args, stage1_stub(subtract_background="background"))
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "WARNING" in ln]
    # --shuffle_text agrees with Stage 1 (no warning); the other three depart
    assert sorted(warnings) == sorted([
        f"recipe: WARNING --text_prompt {PROMPT!r} departs from Stage 1's recipe ('')",
        "recipe: WARNING --replace_synonyms False departs from Stage 1's recipe (True)",
        "recipe: WARNING --subtract_background None departs from Stage 1's recipe ('background')",
        "recipe: WARNING --tactile_model vit_small_patch16_224 departs from Stage 1's recipe (vit_tiny_patch16_224)"])
    assert recipe["text_prompt"] == PROMPT and recipe["replace_synonyms"] is False
    assert recipe["subtract_background"] is None and args.subtract_background is None
    args = data_args("--no_text_prompt")
    D.resolve_recipe(args, stage1_stub(no_text_prompt=False))
    assert args.text_prompt == "" and "WARNING --text_prompt '' departs" in capsys.readouterr().out
    with pytest.raises(D.DataError, match=r"^--no_text_prompt and --text_prompt 'touch: ': give one of them$"):
        D.resolve_recipe(data_args("--no_text_prompt", "--text_prompt", "touch: "), stage1_stub())


def test_checkpoint_without_recipe_keeps_the_defaults_in_one_line(capsys):
    for train_args in (None, argparse.Namespace(tactile_model="vit_tiny_patch16_224", epochs=3)):
        args = data_args("--shuffle_text")
        recipe = D.resolve_recipe(args, SimpleNamespace(train_args=train_args, tactile_model="vit_tiny_patch16_224"))
        lines = capsys.readouterr().out.splitlines()
        assert recipe == {**D.RECIPE_DEFAULTS, "shuffle_text": True} and recipe["text_prompt"] == PROMPT
        assert [ln for ln in lines if "do not say" in ln] == [
            "recipe: the Stage 1 checkpoint's args do not say no_text_prompt, shuffle_text, replace_synonyms, "
            "use_not_contact, percent_not_contact, subtract_background, color_jitter: TVL's defaults for them"]
        assert not any("WARNING" in ln for ln in lines)  # nothing to depart from
    ns = tvl_train_args()
    del ns.color_jitter  # TVL versions before --color_jitter
    D.resolve_recipe(data_args(), SimpleNamespace(train_args=ns, tactile_model="t"))
    assert "args do not say color_jitter: TVL's defaults for them" in capsys.readouterr().out
    with pytest.raises(D.DataError, match=r"subtract_background='median', which is not reproduced"):
        D.resolve_recipe(data_args(), stage1_stub(subtract_background="median"))
    args = data_args("--subtract_background", "background")  # choosing explicitly is the way out
    assert D.resolve_recipe(args, stage1_stub(subtract_background="median"))["subtract_background"] == "background"
    with pytest.raises(D.DataError, match=r"^--percent_not_contact 1.5: must be a fraction in \[0, 1\]$"):
        D.resolve_recipe(data_args("--percent_not_contact", "1.5"), stage1_stub())


def test_built_stage1_exposes_its_stored_args(tiny_stage1):
    assert isinstance(tiny_stage1.train_args, argparse.Namespace)
    assert tiny_stage1.train_args.no_text_prompt is True and tiny_stage1.tactile_model == "vit_tiny_patch16_224"


def test_cache_fingerprint_holds_the_recipe():
    base = data_args("--datasets_dir", "d")
    D.resolve_recipe(base, stage1_stub())
    flags = FC.cache_data_flags(base, "train")
    assert {k: flags[k] for k in ("text_prompt", "subtract_background", "replace_synonyms", "shuffle_text")} == \
        {"text_prompt": "", "subtract_background": None, "replace_synonyms": True, "shuffle_text": True}
    for change in (dict(no_text_prompt=False), dict(subtract_background="background"), dict(replace_synonyms=False),
                   dict(shuffle_text=False), dict(use_not_contact=False), dict(percent_not_contact=0.05),
                   dict(color_jitter=True)):
        other = data_args("--datasets_dir", "d", "--tactile_background", "bg.png")
        D.resolve_recipe(other, stage1_stub(**change))
        assert FC.cache_data_flags(other, "train") != flags, change


# ----------------------------------------------------------------------------- background subtraction

def reference_subtracted(frame_path, background_path, hflip=False, rot90=False):
    """TVL's steps transcribed with the v1 transforms it used: the frame (PIL) padded to a square and rotated
    90 degrees, to-tensor; the background to-tensor, padded, rotated; subtracted; [flip, rotation]; Resize(224);
    normalised with the subtracted-frame statistics."""
    def pad_rotate(img, h, w):
        m = max(h, w)
        return TF1.rotate(TF1.pad(img, [int((m - w) / 2), int((m - h) / 2)]), 90)
    frame = Image.open(frame_path)
    x = TF1.to_tensor(pad_rotate(frame, frame.size[1], frame.size[0]))
    bg = TF1.to_tensor(Image.open(background_path))
    x = x + -pad_rotate(bg, *bg.shape[1:])
    if hflip:
        x = TF1.hflip(x)
    if rot90:
        x = TF1.rotate(x, 90)
    return T1.Normalize(BG_MEAN, BG_STD)(T1.Resize(224)(x))


def write_png(path, h, w, seed):
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_background_subtraction_equals_the_reference(tmp_path):
    frame, bg = write_png(tmp_path / "f.png", 160, 120, 0), write_png(tmp_path / "b.png", 160, 120, 1)
    mine = D.tactile_minus_background(D.load_image(frame), D.load_image(bg))
    ref = reference_subtracted(frame, bg)
    assert mine.shape == ref.shape == (3, 224, 224)
    assert (mine - ref).abs().max() <= 1e-6
    # training: each draw is one of the reference's four flip x rotation outcomes (never a vertical flip), each seen
    variants = [reference_subtracted(frame, bg, f, r) for f in (False, True) for r in (False, True)]
    seen = []
    for s in range(24):
        x = D.tactile_minus_background(D.load_image(frame), D.load_image(bg), torch.Generator().manual_seed(s))
        diffs = [(x - v).abs().max().item() for v in variants]
        assert min(diffs) <= 1e-6, diffs
        seen.append(int(np.argmin(diffs)))
    assert set(seen) == {0, 1, 2, 3}


def test_synchronised_jitter_hits_frame_and_background_alike(tmp_path):
    frame = D.load_image(write_png(tmp_path / "f.png", 160, 120, 0))
    zero = torch.tensor([-m / s for m, s in zip(BG_MEAN, BG_STD)])[:, None, None].expand(3, 224, 224)
    jittered = 0
    plain = [reference_subtracted(tmp_path / "f.png", write_png(tmp_path / "b.png", 160, 120, 1), f, r)
             for f in (False, True) for r in (False, True)]
    for s in range(12):
        g = torch.Generator().manual_seed(s)
        # a frame minus itself stays exactly zero only if both got the same jitter
        assert torch.allclose(D.tactile_minus_background(frame, frame, g, sync_jitter=True), zero, atol=1e-5)
        x = D.tactile_minus_background(frame, D.load_image(tmp_path / "b.png"), torch.Generator().manual_seed(s),
                                       sync_jitter=True)
        jittered += min((x - v).abs().max().item() for v in plain) > 1e-3
    assert 6 <= jittered <= 11  # jitter with probability 0.8 (fixed seeds: 8 to 11 expected)


def test_dataset_subtracts_each_hct_runs_background_and_the_ssvtp_file(synth, tok, tmp_path):
    sensor = write_png(tmp_path / "tac_background.png", 160, 120, 5)
    args = data_args("--datasets_dir", synth, "--subtract_background", "background", "--tactile_background", sensor)
    ds = D.build_dataset(args, "train", tok, ("tactile",), seed=0, augment=False)
    runs = set()
    for i, it in enumerate(ds.items):
        expected_bg = sensor if it["id"].startswith("ssvtp/") else os.path.join(synth, *it["id"].split("/")[:2],
                                                                                 "background.jpg")
        assert it["background"] == expected_bg
        runs.add(os.path.dirname(expected_bg))
        assert (ds[i]["tactile"] - reference_subtracted(it["tactile"], expected_bg)).abs().max() <= 1e-6
    assert len(runs) == 4  # the SSVTP file and three HCT runs
    # no subtraction: the plain tactile statistics
    plain = D.build_dataset(data_args("--datasets_dir", synth), "train", tok, ("tactile",), seed=0, augment=False)
    assert not torch.allclose(plain[0]["tactile"], ds[0]["tactile"])


def test_subtraction_without_a_background_is_refused(synth, tok, tiny_stage1_files, tmp_path, capsys):
    args = data_args("--datasets_dir", synth, "--subtract_background", "background")
    with pytest.raises(D.DataError, match=r"^--tactile_background: required, Stage 1's recipe subtracts"):
        D.build_dataset(args, "train", tok, ("vision", "tactile"), seed=0)
    D.build_dataset(args, "train", tok, ("vision", "text"), seed=0)  # no tactile, no background needed
    # A Stage 1 trained with subtraction, run on SSVTP without --tactile_background: exit 2, one line.
    ckpt, clip = make_tiny_stage1(str(tmp_path / "bg_stage1"), subtract_background="background")
    code = cache_features.main(["--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained",
                                clip, "--datasets_dir", synth, "--output", str(tmp_path / "c"), "--device", "cpu",
                                "--num_workers", "0", "--splits", "val"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --tactile_background: required")
    assert not os.path.exists(tmp_path / "c" / "val" / "meta.json")


# ----------------------------------------------------------------------------- synonyms

def caption_words(ds, index, epochs=40):
    """Every word of item `index`'s training captions over `epochs` epochs, decoded from the tokens."""
    words = set()
    for e in range(epochs):
        text = ds.tokenizer.decode(ds[(e, index)]["text"].tolist())  # '<start_of_text>a , and b . <end_of_text>!!'
        words |= set(text.split("<end_of_text>")[0][len("<start_of_text>"):].replace(",", " ").replace(".", " ").split())
    return words - {"and"}


def test_synonyms_off_by_default_and_for_hct(synth, tok, tmp_path):
    both = tmp_path / "tvl"
    shutil.copytree(synth, both)
    shutil.copy(both / "ssvtp" / "synonyms.json", both / "hct" / "synonyms.json")  # HCT must ignore it anyway
    all_synonyms = {s for v in SYNONYMS.values() for s in v}
    text = ("text",)  # captions only: no images decoded
    off = D.build_dataset(data_args("--datasets_dir", str(both)), "train", tok, text, seed=0)
    on = D.build_dataset(data_args("--datasets_dir", str(both), "--replace_synonyms"), "train", tok, text, seed=0)
    assert off.synonyms == {} and set(on.synonyms) == {"ssvtp"}
    used = {}
    for ds, name in ((off, "off"), (on, "on")):
        for i, it in enumerate(ds.items):
            if set(it["adjs"]) & set(SYNONYMS):  # a caption that has something to replace
                subset = it["id"].split("/")[0]
                used.setdefault((name, subset), set()).update(caption_words(ds, i) & all_synonyms)
    assert used[("off", "ssvtp")] == used[("off", "hct")] == used[("on", "hct")] == set()
    assert len(used[("on", "ssvtp")]) >= 3
    # and from Stage 1's recipe (the published one replaces synonyms)
    args = data_args("--datasets_dir", str(both))
    D.resolve_recipe(args, stage1_stub())
    assert set(D.build_dataset(args, "train", tok, text, seed=0).synonyms) == {"ssvtp"}


# ----------------------------------------------------------------------------- real runs: what Stage 2 is fed

def run_spied(module, tokens_out, argv):
    """`module`'s main(argv) in this process (its command line without the python start-up), saving every token
    batch the text encoder received; returns its exit code and what it printed."""
    import stage1
    seen, encode = [], stage1.FrozenStage1.encode_text

    def spy(self, text):
        seen.append(text.clone())
        return encode(self, text)
    out, err = io.StringIO(), io.StringIO()
    stage1.FrozenStage1.encode_text = spy
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main_in_process(argv) if module == "main_train_stage2" else importlib.import_module(module).main(argv)
    finally:
        stage1.FrozenStage1.encode_text = encode
        torch.save(torch.cat(seen) if seen else torch.zeros(0, 77, dtype=torch.long), tokens_out)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def prompt_rows(tokens, tok):
    """Per row: does the text start with the prompt (right after the start-of-text token)?"""
    ids = tok([PROMPT])[0]
    k = int((ids != 0).sum()) - 2  # the prompt's own tokens, without start and end of text
    return (tokens[:, 1:1 + k] == ids[1:1 + k]).all(dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("no_text_prompt", [True, False])
def test_training_feeds_the_captions_of_stage1_recipe(no_text_prompt, synth, tok, tmp_path):
    ckpt, clip = make_tiny_stage1(str(tmp_path / "s1"), no_text_prompt=no_text_prompt)
    out = tmp_path / "run"
    r = run_spied("main_train_stage2", tmp_path / "tokens.pt", [
        "--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained", clip,
        "--datasets_dir", synth, "--device", "cpu", "--output_dir", str(out), "--epochs", "1", "--batch_size", "6",
        "--register_width", "32", "--register_depth", "1", "--register_heads", "2", "--num_workers", "0",
        "--warmup_epochs", "0", "--active_modality_names", "vision", "text"])
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = torch.load(tmp_path / "tokens.pt")
    assert len(tokens) > 20
    has_prompt = prompt_rows(tokens, tok)
    assert bool(has_prompt.all()) if not no_text_prompt else not bool(has_prompt.any())
    with open(out / "args.json") as f:
        saved = json.load(f)
    assert saved["text_prompt"] == ("" if no_text_prompt else PROMPT)
    assert saved["subtract_background"] is None and saved["replace_synonyms"] is True and saved["shuffle_text"] is True
    assert "WARNING" not in r.stdout


@pytest.mark.slow
def test_explicit_prompt_flag_overrides_stage1_with_a_warning(synth, tok, tmp_path):
    ckpt, clip = make_tiny_stage1(str(tmp_path / "s1"))  # TVL's published recipe: no prompt
    cache = tmp_path / "cache"
    r = run_spied("cache_features", tmp_path / "tokens.pt", [
        "--stage1_checkpoint", ckpt, "--clip_model", "fluxtalk-tiny", "--clip_pretrained", clip,
        "--datasets_dir", synth, "--output", str(cache), "--device", "cpu", "--num_workers", "0",
        "--splits", "val", "--active_modality_names", "vision", "text", "--text_prompt", PROMPT])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [ln for ln in r.stdout.splitlines() if "WARNING" in ln] == [
        f"recipe: WARNING --text_prompt {PROMPT!r} departs from Stage 1's recipe ('')"]
    tokens = torch.load(tmp_path / "tokens.pt")
    assert len(tokens) > 0 and bool(prompt_rows(tokens, tok).all())
    with open(cache / "val" / "meta.json") as f:
        assert json.load(f)["data_flags"]["text_prompt"] == PROMPT
