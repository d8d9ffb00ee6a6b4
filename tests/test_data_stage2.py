"""data_stage2: TVL layout readers, Stage 1 split, bad-input messages, (seed, epoch, index) randomness, text rules."""
import argparse
import csv
import json
import os
import random
import shutil
import socket
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1  # the v1 PIL ops the TVL reference used
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Subset

import data_stage2 as D
from tools.make_synthetic_tvl import make_synthetic_tvl

VT = ("vision", "tactile")
VTT = ("vision", "tactile", "text")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Items are small images: intra-op threads only add overhead (and spin on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_tvl(str(tmp_path_factory.mktemp("tvl")), n_ssvtp=40, n_hct=60, seed=1, hct_runs=3)


@pytest.fixture(scope="module")
def tok():
    import open_clip
    connect = socket.socket.connect

    def no_network(*a, **k):
        raise AssertionError("the tokenizer tried to reach the network")
    socket.socket.connect = no_network
    try:
        return open_clip.get_tokenizer("ViT-L-14")  # bundled BPE vocabulary, nothing downloaded
    finally:
        socket.socket.connect = connect


def make_args(root, *extra):
    return D.add_data_args(argparse.ArgumentParser()).parse_args(["--datasets_dir", str(root), *extra])


def factors_of(root, ds):
    """Each sample's latent factors, matched by sample id in the factors.json that make_synthetic_tvl writes per subset."""
    table = {}
    for subset in D.SUBSETS:
        with open(os.path.join(root, subset, "factors.json")) as f:
            table.update(json.load(f)["samples"])
    return [table[sid] for sid in ds.sample_ids]


def copy_subset(synth, tmp_path, subset):
    shutil.copytree(os.path.join(synth, subset), tmp_path / subset)
    return tmp_path


def csv_col(path, col, skip_header):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return [r[col] for r in rows[1 if skip_header else 0:]]


def hct_rows(root):
    runs = sorted(r for r in os.listdir(os.path.join(root, "hct")) if r.startswith("data"))
    return [f"hct/{r}/{v}" for r in runs for v in csv_col(os.path.join(root, "hct", r, "train.csv"), 0, True)]


# ----------------------------------------------------------------------------- acceptance 1: split

@pytest.mark.parametrize("subset", ["ssvtp", "hct"])
def test_split_matches_sklearn(synth, tok, subset):
    if subset == "ssvtp":
        all_ids = ["ssvtp/" + p for p in csv_col(os.path.join(synth, "ssvtp", "train.csv"), 0, False)]
    else:
        all_ids = hct_rows(synth)
    ref_train, ref_val = train_test_split(all_ids, train_size=0.9, random_state=42)
    args = make_args(synth, "--datasets", subset)
    train = D.build_dataset(args, "train", tok, VT, seed=0).sample_ids
    val = D.build_dataset(args, "val", tok, VT, seed=0).sample_ids
    assert train == list(ref_train) and val == list(ref_val)
    assert not set(train) & set(val) and sorted(train + val) == sorted(all_ids)


def test_split_index_helper_matches_sklearn():
    for n in (2, 7, 10, 101, 4587):
        tr, va = train_test_split(np.arange(n), train_size=0.9, random_state=42)
        mine_tr, mine_va = D.train_val_split(n)
        assert np.array_equal(mine_tr, tr) and np.array_equal(mine_va, va)


def test_both_subsets_concatenate_ssvtp_then_hct(synth, tok):
    both = D.build_dataset(make_args(synth), "val", tok, VT, seed=0).sample_ids
    s = D.build_dataset(make_args(synth, "--datasets", "ssvtp"), "val", tok, VT, seed=0).sample_ids
    h = D.build_dataset(make_args(synth, "--datasets", "hct"), "val", tok, VT, seed=0).sample_ids
    assert both == s + h


def test_ssvtp_header_row_and_folder_listing(synth, tok, tmp_path):
    root = copy_subset(synth, tmp_path, "ssvtp")
    rows = csv_col(root / "ssvtp" / "train.csv", 0, False)
    ref_train, _ = train_test_split(["ssvtp/" + p for p in rows], train_size=0.9, random_state=42)
    with open(root / "ssvtp" / "train.csv", "w") as fh:
        fh.write("rgb_path\n" + "\n".join(rows) + "\n")
    args = make_args(root, "--datasets", "ssvtp")
    assert D.build_dataset(args, "train", tok, VT, seed=0).sample_ids == list(ref_train)
    # without train.csv every image of images_rgb/ is a sample, sorted by name
    os.remove(root / "ssvtp" / "train.csv")
    listing = sorted("ssvtp/images_rgb/" + f for f in os.listdir(root / "ssvtp" / "images_rgb"))
    ref_train, ref_val = train_test_split(listing, train_size=0.9, random_state=42)
    assert D.build_dataset(args, "val", tok, VT, seed=0).sample_ids == list(ref_val)


def test_hct_contact_json_without_csv_drops_captionless_after_split(synth, tok, tmp_path, capsys):
    root = copy_subset(synth, tmp_path, "hct")
    for r in ("data1", "data2", "data3"):
        os.remove(root / "hct" / r / "train.csv")
    import json
    ids = []
    for r in ("data1", "data2", "data3"):
        with open(root / "hct" / r / "contact.json") as fh:
            ids += [f"hct/{r}/{v}" for v in json.load(fh)["vision"]]
    ref_train, _ = train_test_split(ids, train_size=0.9, random_state=42)
    args = make_args(root, "--datasets", "hct")
    assert D.build_dataset(args, "train", tok, VT, seed=0).sample_ids == list(ref_train)
    with pytest.raises(D.DataError, match="no usable train samples"):
        D.build_dataset(args, "train", tok, VTT, seed=0)
    assert f"left out {len(ref_train)} caption-less hct samples" in capsys.readouterr().out


# ----------------------------------------------------------------------------- acceptance 2: bad input

def test_missing_datasets_dir_and_subset(synth, tok, tmp_path):
    with pytest.raises(D.DataError, match=r"--datasets_dir .*nope: no such directory"):
        D.build_dataset(make_args(tmp_path / "nope"), "train", tok, VT, seed=0)
    root = copy_subset(synth, tmp_path, "ssvtp")
    with pytest.raises(D.DataError) as e:
        D.build_dataset(make_args(root), "train", tok, VT, seed=0)
    assert str(e.value) == f"{root / 'hct'}: missing (expected the HCT subset of TVL, see docs/reference.md)"


def test_subset_without_samples(tok, tmp_path):
    (tmp_path / "ssvtp" / "images_rgb").mkdir(parents=True)
    (tmp_path / "hct" / "data1").mkdir(parents=True)
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'ssvtp'}: no samples \(expected"):
        D.build_dataset(make_args(tmp_path, "--datasets", "ssvtp"), "train", tok, VT, seed=0)
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'hct'}: no run folders"):
        D.build_dataset(make_args(tmp_path, "--datasets", "hct"), "train", tok, VT, seed=0)


def test_missing_listed_file(synth, tok, tmp_path, capsys):
    root = copy_subset(synth, tmp_path, "hct")
    rel = csv_col(root / "hct" / "data2" / "train.csv", 1, True)[2]  # third data row: line 4
    os.remove(root / "hct" / "data2" / rel)
    missing = str(root / "hct" / "data2" / rel)
    # test split: the file is not in it, nothing to complain about; train+val hold it
    hits = 0
    for split in ("train", "val"):
        try:
            D.build_dataset(make_args(root, "--datasets", "hct"), split, tok, VT, seed=0)
        except D.DataError as e:
            hits += 1
            assert str(e) == f"{missing}: listed in {root / 'hct' / 'data2' / 'train.csv'} line 4, file does not exist"
    assert hits == 1
    n = len(hct_rows(root))
    args = make_args(root, "--datasets", "hct")
    parts = [D.build_dataset(args, s, tok, VT, seed=0, tolerate_bad=True) for s in ("train", "val")]
    assert sum(len(ds) for ds in parts) == n - 1
    # left out after the split (the split is Stage 1's), named with the list it came from
    assert [m for ds in parts for m in ds.bad_files] == [
        f"{missing}: listed in {root / 'hct' / 'data2' / 'train.csv'} line 4, file does not exist"]
    assert "1 left out for missing files or empty labels" in capsys.readouterr().out
    # the tactile file is not needed when tactile is inactive
    assert len(D.build_dataset(make_args(root, "--datasets", "hct"), "train", tok, ("vision", "text"), 0)) > 0


def test_missing_ssvtp_rgb_dropped_before_split(synth, tok, tmp_path):
    root = copy_subset(synth, tmp_path, "ssvtp")
    rows = csv_col(root / "ssvtp" / "train.csv", 0, False)
    os.remove(root / "ssvtp" / rows[5])
    with pytest.raises(D.DataError, match=rf"{root / 'ssvtp' / rows[5]}: listed in .*train.csv line 6, file does not exist"):
        D.build_dataset(make_args(root, "--datasets", "ssvtp"), "train", tok, VT, seed=0)
    ds = D.build_dataset(make_args(root, "--datasets", "ssvtp"), "train", tok, VT, seed=0, tolerate_bad=True)
    ids = ds.sample_ids
    assert len(ds.bad_files) == 1 and ds.bad_files[0].startswith(f"{root / 'ssvtp' / rows[5]}: listed in ")
    ref_train, _ = train_test_split(["ssvtp/" + r for r in rows if r != rows[5]], train_size=0.9, random_state=42)
    assert ids == list(ref_train)  # the reference split was made without the missing row


def test_truncated_jpeg(synth, tok, tmp_path):
    root = copy_subset(synth, tmp_path, "ssvtp")
    ds = D.build_dataset(make_args(root, "--datasets", "ssvtp"), "val", tok, VT, seed=0)
    bad = ds.items[1]["vision"]
    with open(bad, "rb") as fh:
        data = fh.read()
    with open(bad, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(D.DataError, match=rf"^{bad}: cannot decode image"):
        ds[1]
    ds = D.build_dataset(make_args(root, "--datasets", "ssvtp"), "val", tok, VT, seed=0, tolerate_bad=True)
    item, nxt = ds[1], ds[2]  # replaced by the next loadable sample, the replacement said in "bad"
    assert item["index"] == 2 and torch.equal(item["vision"], nxt["vision"])
    assert item["bad"].startswith(f"{bad}: cannot decode image") and "\n" not in item["bad"] and nxt["bad"] == ""
    assert ds.file_problems(1) == [item["bad"]] and ds.file_problems(2) == []
    os.remove(ds.items[2]["tactile"])  # two bad in a row: both named, in index order
    item = ds[1]
    assert item["index"] == 3 and item["bad"].split("\n") == [
        ds.file_problems(1)[0], f"{ds.items[2]['tactile']}: file does not exist"]


def test_csv_row_with_wrong_column_count(synth, tok, tmp_path):
    root = copy_subset(synth, tmp_path, "hct")
    path = root / "hct" / "data1" / "train.csv"
    lines = open(path).read().splitlines()
    lines[3] = "vision/frame_0001.jpg,tactile/frame_0001.jpg,background.jpg"
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(D.DataError) as e:
        D.build_dataset(make_args(root, "--datasets", "hct"), "train", tok, VT, seed=0)
    assert str(e.value) == f"{path} line 4: 3 columns, expected 4"


# ----------------------------------------------------------------------------- acceptance 3: randomness

def test_no_augment_is_deterministic(synth, tok):
    ds = D.build_dataset(make_args(synth, "--no_augment"), "train", tok, VTT, seed=0)
    assert not ds.augment
    a = ds[3]
    b = ds[(5, 3)]
    for k in VTT:
        assert torch.equal(a[k], b[k])
    assert torch.equal(a["text"], tok([ds.captions[3]])[0])  # all adjectives, in order


def _collect(ds, idx, workers, epoch):
    dl = DataLoader(Subset(ds, [(epoch, i) for i in idx]), batch_size=3, num_workers=workers)
    batches = list(dl)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_augmentation_depends_on_seed_epoch_index_only(synth, tok):
    ds = D.build_dataset(make_args(synth), "train", tok, VTT, seed=7)
    assert ds.augment
    idx = [0, 5, 9, 41, 60, 61]  # SSVTP and HCT (data1, data2) items
    w0, w2 = _collect(ds, idx, 0, epoch=2), _collect(ds, idx, 2, epoch=2)
    for k in (*VTT, "index"):
        assert torch.equal(w0[k], w2[k]), k
    assert w0["index"].tolist() == idx
    direct = ds[(2, 41)]  # no other sample drawn before it
    assert torch.equal(direct["vision"], w0["vision"][3]) and torch.equal(direct["tactile"], w0["tactile"][3])
    e3 = _collect(ds, idx, 0, epoch=3)
    for m in VT:  # every augmented image changes with the epoch
        assert all(not torch.equal(a, b) for a, b in zip(w0[m], e3[m])), m
    plain = D.build_dataset(make_args(synth), "train", tok, VT, seed=7, augment=False)
    assert not torch.equal(plain[0]["vision"], w0["vision"][0])
    seeded = D.build_dataset(make_args(synth), "train", tok, VT, seed=8)
    assert not torch.equal(seeded[(2, 0)]["tactile"], w0["tactile"][0])


def test_val_and_test_never_augment(synth, tok):
    args = make_args(synth)
    assert not D.build_dataset(args, "val", tok, VT, seed=0).augment
    assert not D.build_dataset(args, "test", tok, VT, seed=0).augment
    assert D.build_dataset(args, "val", tok, VT, seed=0, augment=True).augment


def test_item_seeds_are_distinct_63_bit_values():
    seeds = {D.item_seed(s, e, i, m) for s in range(3) for e in range(3) for i in range(50) for m in range(3)}
    assert len(seeds) == 3 * 3 * 50 * 3 and max(seeds) < 2 ** 63


def test_a_key_gives_the_same_draw_in_another_process(synth, tmp_path):
    """Loader workers, ranks and resumed runs are other processes: there the same (seed, epoch, index) must give the
    same augmented item and the same (seed, step, rank) the same nested-dropout mask, whatever Python's hash salt
    (PYTHONHASHSEED) and the global RNG states."""
    import subprocess
    import sys

    import seed_draws
    from conftest import ROOT
    here = seed_draws.draws(synth)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED="1" if os.environ.get("PYTHONHASHSEED") != "1" else "2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "seed_draws.py"), synth, str(tmp_path / "d.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = torch.load(tmp_path / "d.pt", weights_only=True)
    assert there["text"] == here["text"]
    for k in ("vision", "tactile", "keep"):
        assert torch.equal(there[k], here[k]), k
    # ...and the keys draw different things, so the equality above is not that of constants
    assert len(set(here["text"])) > 1 and not torch.equal(here["keep"][1], here["keep"][2])
    assert all(not torch.equal(here["vision"][0], v) for v in here["vision"][1:])


# ----------------------------------------------------------------------------- preprocessing vs the reference ops

def test_vision_crops_match_reference(synth):
    path = os.path.join(synth, "ssvtp", "images_rgb", "image_3_rgb.jpg")
    pil = Image.open(path).convert("RGB")
    s = int(np.ceil(np.sqrt(2) * 0.18 * max(pil.size)))
    ref = np.array(TF1.center_crop(pil, s))
    assert np.array_equal(D.crop_vision(D.load_image(path)).permute(1, 2, 0).numpy(), ref)
    path = os.path.join(synth, "hct", "data3", "vision", "frame_0002.jpg")
    pil = Image.open(path).convert("RGB")
    s = int(np.ceil(np.sqrt(2) * 0.18 * max(pil.size)))
    ref = np.array(TF1.crop(pil, 200, (pil.size[0] - s) // 2, s, s))  # data3: 200 px down
    assert np.array_equal(D.crop_vision(D.load_image(path), 200).permute(1, 2, 0).numpy(), ref)


def test_tactile_pad_rotate_matches_reference(synth):
    path = os.path.join(synth, "ssvtp", "images_tac", "image_3_tac.jpg")
    pil = Image.open(path).convert("RGB")
    w, h = pil.size
    m = max(w, h)
    ref = np.array(TF1.rotate(TF1.pad(pil, [(m - w) // 2, (m - h) // 2]), 90))
    assert np.array_equal(D.pad_rotate_tactile(D.load_image(path)).permute(1, 2, 0).numpy(), ref)


def test_deterministic_transform_close_to_reference_pipeline(synth):
    """Crop/pad+rotate, Resize(224), ToTensor, Normalize with the format page's constants (PIL resize)."""
    path = os.path.join(synth, "ssvtp", "images_rgb", "image_3_rgb.jpg")
    pil = Image.open(path).convert("RGB")
    crop = TF1.center_crop(pil, int(np.ceil(np.sqrt(2) * 0.18 * max(pil.size))))
    ref = TF1.normalize(TF1.to_tensor(TF1.resize(crop, 224)), [0.48145466, 0.4578275, 0.40821073],
                        [0.26862954, 0.26130258, 0.27577711])
    mine = D.vision_transform(D.load_image(path))
    assert mine.shape == ref.shape == (3, 224, 224)
    assert (mine - ref).abs().mean() < 0.02


# ----------------------------------------------------------------------------- acceptance 4: text

def test_adjective_parsing_and_joining():
    assert D.parse_adjectives("Glossy ,  Slippery ,  Smooth.\n") == ["glossy", "slippery", "smooth"]
    assert D.parse_adjectives("squishy.") == ["squishy"]
    assert D.parse_adjectives("hard,, soft,\n") == ["hard", "soft"]
    p = "This image gives tactile feelings of "
    assert D.make_caption(["smooth"], p) == "This image gives tactile feelings of smooth."
    assert D.make_caption(["soft", "fuzzy"], p) == "This image gives tactile feelings of soft, and fuzzy."  # TVL's comma
    assert D.make_caption(["rough", "hard", "grainy", "warm"], "") == "rough, hard, grainy, and warm."


def test_training_caption_subsets_uniform_in_order():
    adjs, p = ["a", "b", "c"], "P "
    rng = random.Random(0)
    counts = Counter(D.make_caption(adjs, p, rng) for _ in range(7000))
    expected = {"P a.", "P b.", "P c.", "P a, and b.", "P a, and c.", "P b, and c.", "P a, b, and c."}
    assert set(counts) == expected  # non-empty subsets only, original order kept
    assert all(800 < c < 1200 for c in counts.values())  # uniform over the 7 subsets (1000 each)
    shuffled = {D.make_caption(adjs, p, rng, shuffle=True) for _ in range(2000)}
    assert "P c, b, and a." in shuffled and "P b, and a." in shuffled
    syn = {"a": ["x", "y"]}
    words = Counter(D.make_caption(["a"], p, rng, synonyms=syn) for _ in range(3000))
    assert set(words) == {"P a.", "P x.", "P y."} and min(words.values()) > 850


def test_dataset_captions_from_labels_and_csv(synth, tok):
    args = make_args(synth, "--no_augment", "--eval_captions", "full")  # all adjectives (default: TVL's subsets)
    ds = D.build_dataset(args, "test", tok, VTT, seed=0)
    wood = "This image gives tactile feelings of rough, hard, grainy, and warm."
    fabric = "This image gives tactile feelings of soft, and fuzzy."
    names = {0: "This image gives tactile feelings of smooth, hard, and cold.", 1: fabric, 2: wood,
             3: "This image gives tactile feelings of squishy.", 5: "This image gives tactile feelings of bumpy, rough, and textured.",
             4: "This image gives tactile feelings of glossy, slippery, and smooth."}
    subsets = set()
    for i, (cap, f, sid) in enumerate(zip(ds.captions, factors_of(synth, ds), ds.sample_ids)):
        assert cap == names[f["material"]], sid
        subsets.add(sid.split("/")[0])
    assert subsets == {"ssvtp", "hct"}
    i = ds.sample_ids.index(next(s for s in ds.sample_ids if s.startswith("hct/")))
    assert torch.equal(ds[i]["text"], tok([ds.captions[i]])[0])
    plain = D.build_dataset(make_args(synth, "--no_text_prompt", "--eval_captions", "full"), "test", tok, VTT, seed=0)
    assert all(c == names[f["material"]][len("This image gives tactile feelings of "):]
               for c, f in zip(plain.captions, factors_of(synth, plain)))


def test_training_text_uses_synonyms_for_ssvtp(synth, tok):
    ds = D.build_dataset(make_args(synth, "--datasets", "ssvtp", "--replace_synonyms"), "train", tok,
                         ("vision", "text"), seed=0)
    assert ds.synonyms["ssvtp"]["smooth"] == ["sleek", "even"]
    i = next(i for i, f in enumerate(factors_of(synth, ds)) if f["material"] == 0)  # smooth, hard, cold
    tokens = set()
    for e in range(40):
        tokens.add(tuple(ds[(e, i)]["text"].tolist()))
    allowed = {tuple(tok([D.make_caption(w, ds.prompt)])[0].tolist())
               for w in _subset_variants(["smooth", "hard", "cold"], {"smooth": ["sleek", "even"], "hard": ["firm", "rigid"]})}
    assert tokens <= allowed and len(tokens) > 5


def _subset_variants(adjs, syn):
    import itertools
    out = []
    for r in range(1, len(adjs) + 1):
        for sub in itertools.combinations(adjs, r):
            out += [list(p) for p in itertools.product(*[[w] + syn.get(w, []) for w in sub])]
    return out


def test_use_not_contact(synth, tok, capsys):
    base = D.build_dataset(make_args(synth, "--datasets", "hct"), "train", tok, VTT, seed=0)
    ds = D.build_dataset(make_args(synth, "--datasets", "hct", "--use_not_contact"), "train", tok, VTT, seed=0)
    extra = len(ds) - len(base)
    assert ds.sample_ids[:len(base)] == base.sample_ids  # the split does not move
    assert extra == int(0.1 * len(base)) and extra > 0
    assert all(c == "This image gives tactile feelings of background." for c in ds.captions[len(base):])
    assert all(f["material"] == -1 for f in factors_of(synth, ds)[len(base):])  # really no-contact frames
    assert f"added {extra} HCT no-contact frames" in capsys.readouterr().out
    val = D.build_dataset(make_args(synth, "--datasets", "hct", "--use_not_contact"), "val", tok, VTT, seed=0)
    assert all(f["material"] >= 0 for f in factors_of(synth, val))


# ----------------------------------------------------------------------------- acceptance 5: batches

def test_dataloader_batches(synth, tok):
    ds = D.build_dataset(make_args(synth), "train", tok, VTT, seed=0)
    dl = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    b = next(iter(dl))
    assert set(b) == {"vision", "tactile", "text", "index"}
    assert b["vision"].shape == b["tactile"].shape == (4, 3, 224, 224)
    assert b["vision"].dtype == b["tactile"].dtype == torch.float32
    assert b["text"].shape == (4, 77) and b["text"].dtype == torch.long
    assert (b["text"][:, 0] == 49406).all()  # OpenCLIP start-of-text token
    assert b["index"].shape == (4,) and b["index"].dtype == torch.long
    only = D.build_dataset(make_args(synth), "val", tok, ("tactile", "text"), seed=0)
    assert set(only[0]) == {"tactile", "text", "index"}
    # un-normalised deterministic inputs are images in [0, 1]
    x = only[0]["tactile"] * torch.tensor(D.TAC_STD)[:, None, None] + torch.tensor(D.TAC_MEAN)[:, None, None]
    assert x.min() > -1e-4 and x.max() < 1 + 1e-4


def test_epoch_comes_with_the_key(synth, tok):
    """Persistent loader workers get the epoch with each key: ds[(e, i)] is the same item whichever dataset object
    (process) draws it, and a plain index is epoch 0."""
    ds = D.build_dataset(make_args(synth), "train", tok, ("vision", "tactile", "text"), seed=3)
    other = D.build_dataset(make_args(synth), "train", tok, ("vision", "tactile", "text"), seed=3)
    for key, same in (((0, 5), 5), ((4, 5), (4, 5))):
        keyed, plain = ds[key], other[same]
        assert all(torch.equal(keyed[m], plain[m]) for m in ("vision", "tactile", "text"))
    assert not torch.equal(ds[(0, 5)]["vision"], ds[(4, 5)]["vision"])


def test_evaluation_captions_are_seeded_random_subsets_unless_full(synth, tok):
    """TVL's test evaluation captions a sample with a random non-empty subset of its adjectives: drawn per sample
    from a fixed seed, so every evaluation (and the Stage 1 baseline) reads the same captions whatever --seed."""
    full = D.build_dataset(make_args(synth, "--eval_captions", "full"), "test", tok, VTT, seed=0).captions
    a = D.build_dataset(make_args(synth), "test", tok, VTT, seed=0)
    b = D.build_dataset(make_args(synth), "test", tok, VTT, seed=7)
    assert a.captions == b.captions
    assert [D.make_caption(it["adjs"], a.prompt) for it in a.items] == full  # full: all adjectives, in order
    differ = 0
    for cap, it in zip(a.captions, a.items):
        words = cap[len(a.prompt):-1].replace(", and ", ", ").split(", ")
        assert words and set(words) <= set(it["adjs"]), (cap, it["adjs"])
        assert words == [w for w in it["adjs"] if w in words]  # a subset, in the original order
        differ += words != list(it["adjs"])
    assert differ > len(a.captions) // 4  # really subsets, not the full lists
    assert torch.equal(a[0]["text"], tok([a.captions[0]])[0])  # what the text encoder receives
    train = D.build_dataset(make_args(synth, "--no_augment"), "train", tok, VTT, seed=0)
    assert train.captions == [D.make_caption(it["adjs"], train.prompt) for it in train.items]
