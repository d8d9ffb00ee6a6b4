"""TVL data for Stage 2: readers for SSVTP and HCT as users unpack them, the reference preprocessing and
training augmentation, caption prompts, and tokenisation (the layout, split and caption rules: docs/reference.md).

    ds = build_dataset(args, "train", tokenizer, active_modalities=("vision", "tactile", "text"), seed=0)
    ds[(epoch, i)] -> {"vision": float (3, 224, 224), "tactile": float (3, 224, 224), "text": long (77,), "index": i}

Only the active modalities are present; `default_collate` turns "index" into a long (B,) tensor.

Splits. `train` and `val` come from train.csv (or the folder listing / contact.json) with TVL's seeded
split, `train_test_split(items, train_size=0.9, random_state=42)`, applied per subset as Stage 1 did;
`test` is test.csv. With both subsets active the dataset is SSVTP's items followed by HCT's. A Stage 1
trained with --use_not_contact split HCT *after* adding the no-contact frames, so most HCT validation
items were in its training split: only `test` is clean of Stage 1 training data.

Recipe. Stage 1's data recipe (prompt, caption shuffling, synonyms, no-contact frames, background
subtraction, colour jitter) is stored in its checkpoint's args; `resolve_recipe(args, stage1)` makes it
this run's default, a flag given on the command line wins with a warning.

Randomness. Every random choice of an item (flips, jitter factors, blur sigma, rotation, caption
subset, order and synonyms) is drawn from generators seeded by `item_seed(seed, epoch, index, stream)`,
a splitmix64 mix of the run seed, the epoch, the dataset index and the modality stream: never from the
global RNGs. So the inputs of a run do not depend on the number of DataLoader workers, on the world size,
on how many samples were drawn before, or on resumption. The epoch comes with the key: `ds[(epoch, i)]`
(what main_train_stage2's sampler yields, so persistent DataLoader workers need no per-epoch state); a plain
`ds[i]` is `ds[(0, i)]` (evaluation, where nothing is random).

Deviations from the TVL reference reader, each on purpose:
- Missing files and undecodable images are errors naming the file (see "bad files" below for listing them all
  and for a budget of skipped samples). SSVTP rows whose RGB file is missing are dropped *before* the split when
  bad samples are tolerated, as the reference silently did, so the split still matches Stage 1.
- HCT runs are taken in sorted name order (the reference used the filesystem's order); the 200 px crop
  offset applies to the run named `data3` (the reference matched "data3" anywhere in the path); a crop
  that would leave the image is shifted back inside it.
- Caption-less HCT samples (contact.json without a CSV) are left out after the split when text is active.
- `--use_not_contact` frames (at most --percent_not_contact of the HCT training samples, captioned
  `background`) go to the train split only, after the split, so the split does not change with the flag.
- Evaluation tactile frames are never augmented, also with background subtraction (the reference's
  validation set reused its training transform); a missing HCT background file is an error naming it
  (the reference fell back to a digit_background.png three folders up). The synchronised colour jitter
  works on float images (the reference's on 8-bit PIL images, rounding after each of its four steps).
"""
import argparse
import csv
import functools
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import util.dist as dist

from util.dist import is_main

SUBSETS = ("ssvtp", "hct")
IMG_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TAC_MEAN = (0.29174602, 0.29713256, 0.29104045)
TAC_STD = (0.18764469, 0.19467652, 0.21871583)
# Background-subtracted tactile frames (frame - background, both in [0, 1]) are normalised with these instead.
TAC_BG_MEAN = (-0.00809318389762342, -0.01887447008747725, -0.018430588238856332)
TAC_BG_STD = (0.04535400223885517, 0.044029170444552575, 0.05332520729596308)
CROP_SCALE = 0.18           # vision crop side = ceil(sqrt(2) * CROP_SCALE * max(h, w))
HCT_DATA3_TOP = 200         # data3's camera looks at the sensor lower in the frame
SPLIT_TRAIN_SIZE, SPLIT_SEED = 0.9, 42
NOT_CONTACT_FRAC = 0.1
DEFAULT_PROMPT = "This image gives tactile feelings of "
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Training augmentation: the TVL reference values (tacvis.py RGB_AUGMENTS / TAC_AUGMENTS).
VISION_JITTER = dict(p=0.8, brightness=(0.8, 1.1), contrast=(0.7, 1.3), saturation=(0.8, 1.2), hue=(0.0, 0.0))
VISION_GRAYSCALE_P = 0.2
VISION_BLUR = dict(p=0.5, kernel=9, sigma=(0.5, 1.0))
TACTILE_JITTER = dict(p=0.8, brightness=(0.9, 1.1), contrast=(0.9, 1.1), saturation=(0.8, 1.2), hue=(-0.05, 0.05))
STREAMS = {"vision": 0, "tactile": 1, "text": 2}  # one independent random stream per modality
VIEW2_STREAM_OFFSET = 8  # the second augmented view's streams (two_views): STREAMS + 8
EVAL_CAPTION_SEED = 0  # evaluation captions depend on the sample alone, never on the run's --seed


class DataError(ValueError):
    """Bad dataset input; the message is one line naming the path (and line) and what was expected."""


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--datasets_dir", default=None, help="TVL top folder holding ssvtp/ and hct/")
    g.add_argument("--datasets", nargs="+", choices=SUBSETS, default=list(SUBSETS))
    g.add_argument("--no_augment", action="store_true",
                   help="deterministic training inputs: no image augmentation, all adjectives in order")
    g.add_argument("--eval_captions", default="random", choices=["random", "full"],
                   help="val/test captions: a random non-empty subset of each sample's adjectives as TVL's test "
                        "evaluation draws them (seeded per sample, so every evaluation and the Stage 1 baseline see "
                        "the same ones), or all adjectives in order")
    g.add_argument("--num_workers", type=int, default=4)
    g = parser.add_argument_group(
        "data recipe", "Default: Stage 1's own, read from the args stored in --stage1_checkpoint (TVL's defaults when "
                       "it stores none); a flag given here departs from it, with a warning")
    # default=None everywhere: "not given on the command line", so Stage 1's value can take its place.
    g.add_argument("--text_prompt", default=None, help=f"text before the adjectives (TVL's: '{DEFAULT_PROMPT}')")
    g.add_argument("--no_text_prompt", action="store_true", default=None,
                   help="captions are the adjectives alone (= --text_prompt ''; all released TVL Stage 1s)")
    g.add_argument("--shuffle_text", action=argparse.BooleanOptionalAction, default=None,
                   help="shuffle the sampled adjectives of training captions")
    g.add_argument("--replace_synonyms", action=argparse.BooleanOptionalAction, default=None,
                   help="SSVTP training captions: each adjective drawn among itself and its ssvtp/synonyms.json synonyms")
    g.add_argument("--use_not_contact", action=argparse.BooleanOptionalAction, default=None,
                   help="mix HCT no-contact frames (captioned 'background') into training")
    g.add_argument("--percent_not_contact", type=float, default=None,
                   help=f"at most this fraction of no-contact frames with --use_not_contact ({NOT_CONTACT_FRAC})")
    g.add_argument("--subtract_background", choices=["none", "background"], default=None,
                   help="'background': tactile frames minus the sensor's image with nothing touching it (HCT: each "
                        "run's own; SSVTP: --tactile_background)")
    g.add_argument("--color_jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="with --subtract_background background: one colour jitter for an SSVTP training frame and its "
                        "background (without subtraction the tactile jitter is always on, as in TVL)")
    g.add_argument("--tactile_background", default=None,
                   help="SSVTP sensor background image for --subtract_background background (TVL ships it as "
                        "tvl_enc/data/tac_background.png; not part of the dataset)")
    return parser


# ----------------------------------------------------------------------------- recipe

# The data recipe and its defaults when neither Stage 1 nor the command line sets a value (TVL's parser defaults).
RECIPE_DEFAULTS = dict(text_prompt=DEFAULT_PROMPT, shuffle_text=False, replace_synonyms=False, use_not_contact=False,
                       percent_not_contact=NOT_CONTACT_FRAC, subtract_background=None, color_jitter=False)
# The fields of TVL's stored args that carry it (no_text_prompt becomes text_prompt).
STAGE1_RECIPE_FIELDS = ("no_text_prompt", "shuffle_text", "replace_synonyms", "use_not_contact",
                        "percent_not_contact", "subtract_background", "color_jitter")


def given_recipe(args):
    """{name: value} of the recipe flags given on the command line (not None); raises DataError on a conflict."""
    given = {k: getattr(args, k, None) for k in RECIPE_DEFAULTS}
    if getattr(args, "no_text_prompt", None):
        if given["text_prompt"] not in (None, ""):
            raise DataError(f"--no_text_prompt and --text_prompt {given['text_prompt']!r}: give one of them")
        given["text_prompt"] = ""
    given = {k: v for k, v in given.items() if v is not None}
    if not 0 <= given.get("percent_not_contact", 0) <= 1:
        raise DataError(f"--percent_not_contact {given['percent_not_contact']}: must be a fraction in [0, 1]")
    if given.get("subtract_background") == "none":
        given["subtract_background"] = None
    return given


def recipe_of(args):
    """The effective recipe {name: value}: the flags of args where set, RECIPE_DEFAULTS elsewhere (args that
    resolve_recipe has seen hold every value)."""
    return {**RECIPE_DEFAULTS, **given_recipe(args)}


def stage1_recipe(train_args):
    """-> (Stage 1's recipe {name: value}, names of TVL fields its stored args lack: defaults used for them)."""
    recipe, missing = dict(RECIPE_DEFAULTS), []
    for field in STAGE1_RECIPE_FIELDS:
        if not hasattr(train_args, field):
            missing.append(field)
        elif field == "no_text_prompt":
            recipe["text_prompt"] = "" if train_args.no_text_prompt else DEFAULT_PROMPT
        else:
            recipe[field] = getattr(train_args, field)
    return recipe, missing


def resolve_recipe(args, stage1):
    """Make Stage 1's data recipe this run's: every RECIPE_DEFAULTS name of args is set to the command line's value
    where one was given (a warning when it departs from Stage 1's), else to Stage 1's (stage1.train_args, the args
    stored in its checkpoint), else to the default. args.tactile_model becomes the model the weights were loaded
    into. Prints the effective recipe (rank 0)."""
    say = print if is_main() else (lambda *a: None)
    stored, missing = stage1_recipe(stage1.train_args)
    unknown = {"text_prompt" if f == "no_text_prompt" else f for f in missing}
    if missing:
        say(f"recipe: the Stage 1 checkpoint's args do not say {', '.join(missing)}: TVL's defaults for them")
    given = given_recipe(args)
    if stored["subtract_background"] not in (None, "background") and "subtract_background" not in given:
        # TVL's SSVTP reader refuses the other choices and its HCT reader treats them as 'background'.
        raise DataError(f"--stage1_checkpoint: its args say subtract_background={stored['subtract_background']!r}, "
                        f"which is not reproduced here; choose with --subtract_background none|background")
    given_model, stored_model = getattr(args, "tactile_model", None), getattr(stage1.train_args, "tactile_model", None)
    if given_model and stored_model and given_model != stored_model:
        say(f"recipe: WARNING --tactile_model {given_model} departs from Stage 1's recipe ({stored_model})")
    for k, v in given.items():
        if k not in unknown and v != stored[k]:
            say(f"recipe: WARNING --{k} {v!r} departs from Stage 1's recipe ({stored[k]!r})")
    recipe = {**stored, **given}
    vars(args).update(recipe, no_text_prompt=recipe["text_prompt"] == "", tactile_model=stage1.tactile_model)
    say("recipe: " + " ".join(f"{k}={v!r}" for k, v in recipe.items()) + f" tactile_model={stage1.tactile_model!r}")
    return recipe


# ----------------------------------------------------------------------------- randomness, split, text

def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def epoch_and_index(key):
    """A dataset key is (epoch, index), or an index meaning (0, index)."""
    return key if isinstance(key, tuple) else (0, key)


def item_seed(seed, epoch, index, stream=0):
    """A 63-bit seed that depends only on (seed, epoch, index, stream); Python's hash() is salted per process."""
    h = 0
    for v in (seed, epoch, index, stream):
        h = _splitmix64(h ^ (int(v) & 0xFFFFFFFFFFFFFFFF))
    return h >> 1


def train_val_split(n, train_size=SPLIT_TRAIN_SIZE, seed=SPLIT_SEED):
    """(train, val) index arrays equal to sklearn's train_test_split(range(n), train_size, random_state=seed)."""
    perm = np.random.RandomState(seed).permutation(n)
    n_train = int(math.floor(train_size * n))
    n_val = n - n_train
    return perm[n_val:n_val + n_train], perm[:n_val]


def parse_adjectives(raw):
    """'Smooth, hard ,cold.\\n' -> ['smooth', 'hard', 'cold'] (TVL's label rules)."""
    words = raw.replace(".", "").replace("\n", "").lower().split(",")
    return [w.strip() for w in words if w.strip()]


def join_adjectives(words):
    """['a'] -> 'a'; ['a', 'b'] -> 'a, and b'; ['a', 'b', 'c'] -> 'a, b, and c'. The two-word comma is TVL's
    (its "a and b" branch is unreachable), so these are the captions Stage 1 was trained on."""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + f", and {words[-1]}"


def make_caption(adjs, prompt, rng=None, shuffle=False, synonyms=None):
    """prompt + adjectives + '.'. With rng (training): a uniformly random non-empty subset of the adjectives in
    their original order (TVL's load_text draws uniformly over all non-empty combinations), then optionally
    shuffled, then each word optionally replaced by a random choice among itself and its synonyms."""
    words = list(adjs)
    if rng is not None:
        mask = rng.randint(1, 2 ** len(words) - 1)
        words = [w for b, w in enumerate(words) if mask >> b & 1]
        if shuffle:
            rng.shuffle(words)
        if synonyms:
            words = [rng.choice(list(dict.fromkeys([w] + synonyms.get(w, [])))) for w in words]
    return prompt + join_adjectives(words) + "."


# ----------------------------------------------------------------------------- images

def load_image(path):
    """uint8 (3, H, W). Decodes fully here, so a truncated file fails now and names itself."""
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def crop_vision(img, crop_top=None):
    """Square crop of side ceil(sqrt(2)*0.18*max(h, w)): centred (SSVTP), or from row crop_top, centred
    horizontally (HCT), shifted back inside the image if it would leave it."""
    h, w = img.shape[-2:]
    s = int(math.ceil(math.sqrt(2) * CROP_SCALE * max(h, w)))
    if crop_top is None:
        return TF.center_crop(img, [s, s])
    top = max(0, min(crop_top, h - s))
    return TF.crop(img, top, (w - s) // 2, s, s)


def pad_rotate_tactile(img):
    """Pad to a square (TVL's tac_padding), then rotate 90 degrees counter-clockwise (= PIL rotate(90))."""
    h, w = img.shape[-2:]
    m = max(h, w)
    img = TF.pad(img, [(m - w) // 2, (m - h) // 2])  # [left/right, top/bottom]
    return torch.rot90(img, 1, dims=(-2, -1))


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _coin(g, p):
    return torch.rand((), generator=g).item() < p


def _color_jitter(x, g, cfg):
    """torchvision ColorJitter with parameters drawn from g (random order of the four ops, as torchvision)."""
    if not _coin(g, cfg["p"]):
        return x
    order = torch.randperm(4, generator=g).tolist()
    return _jitter(x, order, _jitter_factors(g, cfg))


def _jitter_factors(g, cfg):
    return [_uniform(g, *cfg[k]) for k in ("brightness", "contrast", "saturation", "hue")]


def _jitter(x, order, factors):
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in order:
        if k < 3 or factors[3] != 0.0:
            x = ops[k](x, factors[k])
    return x


@functools.lru_cache(maxsize=128)
def load_background(path):
    """A run's background image, decoded once per process (many frames share it); never modified by callers."""
    return load_image(path)


def vision_transform(img, crop_top=None, g=None):
    """uint8 (3, H, W) -> normalised float (3, 224, 224). With g: hflip, colour jitter, grayscale, blur."""
    x = TF.to_dtype(crop_vision(img, crop_top), torch.float32, scale=True)
    if g is not None:
        if _coin(g, 0.5):
            x = TF.horizontal_flip(x)
        x = _color_jitter(x, g, VISION_JITTER)
        if _coin(g, VISION_GRAYSCALE_P):
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _coin(g, VISION_BLUR["p"]):
            sigma = _uniform(g, *VISION_BLUR["sigma"])
            x = TF.gaussian_blur(x, [VISION_BLUR["kernel"]] * 2, [sigma, sigma])
    x = TF.resize(x, [IMG_SIZE, IMG_SIZE], antialias=True)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def tactile_transform(img, g=None):
    """uint8 (3, H, W) -> normalised float (3, 224, 224). With g: h/v flips, colour jitter, 0/90 deg rotation."""
    x = TF.to_dtype(pad_rotate_tactile(img), torch.float32, scale=True)
    if g is not None:
        if _coin(g, 0.5):
            x = TF.horizontal_flip(x)
        if _coin(g, 0.5):
            x = TF.vertical_flip(x)
        x = _color_jitter(x, g, TACTILE_JITTER)
        if _coin(g, 0.5):
            x = torch.rot90(x, 1, dims=(-2, -1))
    x = TF.resize(x, [IMG_SIZE, IMG_SIZE], antialias=True)
    return TF.normalize(x, TAC_MEAN, TAC_STD)


def tactile_minus_background(img, background, g=None, sync_jitter=False):
    """TVL's --subtract_background background. uint8 (3, H, W) frame and its background image -> normalised float
    (3, 224, 224): both padded and rotated alike, to [0, 1], frame - background; with g: [sync_jitter: one colour
    jitter (p 0.8, brightness, contrast, saturation, hue in that order) for frame and background, before the
    subtraction], a horizontal flip, a 0/90 degree rotation (no vertical flip, no other jitter: TVL's recipe);
    resize; normalised with the statistics of subtracted frames."""
    # / 255 as ToTensor does (to_dtype multiplies by 1/255: an ulp apart, which the small std below magnifies)
    x = pad_rotate_tactile(img).float() / 255
    bg = pad_rotate_tactile(background).float() / 255
    if g is not None and sync_jitter and _coin(g, TACTILE_JITTER["p"]):
        factors = _jitter_factors(g, TACTILE_JITTER)
        x, bg = _jitter(x, range(4), factors), _jitter(bg, range(4), factors)
    x = x - bg
    if g is not None:
        if _coin(g, 0.5):
            x = TF.horizontal_flip(x)
        if _coin(g, 0.5):
            x = torch.rot90(x, 1, dims=(-2, -1))
    x = TF.resize(x, [IMG_SIZE, IMG_SIZE], antialias=True)
    return TF.normalize(x, TAC_BG_MEAN, TAC_BG_STD)


# ----------------------------------------------------------------------------- readers
# An item is a dict: id, vision, tactile, background (paths), text (label file or None), adjs (list or None),
# crop_top (None = centre crop), src (where it was listed, for messages).

def read_csv_rows(path, ncols=None):
    """[(line, [cells])], blank rows skipped; every row must have ncols cells (default: the first row's)."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                ncols = ncols or len(row)
                if len(row) != ncols:
                    raise DataError(f"{path} line {reader.line_num}: {len(row)} columns, expected {ncols}")
                out.append((reader.line_num, [c.strip() for c in row]))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} after line {reader.line_num}: not UTF-8 text ({e.reason})") from None
    return out


def _is_ssvtp_header(root, cell):
    return not cell.lower().endswith(IMAGE_EXTS) and not os.path.isfile(os.path.join(root, cell))


def _split(items, split):
    if split == "test":
        return items
    train, val = train_val_split(len(items))
    return [items[i] for i in (train if split == "train" else val)]


def read_ssvtp(root, split, bad=None):
    """SSVTP items of a split. A missing RGB file is an error; with a `bad` list its row is dropped before the
    split instead (the reference did so silently, and Stage 1's split was made without them) and named in `bad`."""
    csv_path = os.path.join(root, "test.csv" if split == "test" else "train.csv")
    if os.path.isfile(csv_path):
        rows = read_csv_rows(csv_path)
        if rows and _is_ssvtp_header(root, rows[0][1][0]):
            rows = rows[1:]
        rels = []
        for line, cells in rows:
            if os.path.isfile(os.path.join(root, cells[0])):
                rels.append((cells[0], f"{csv_path} line {line}"))
            else:
                path = os.path.join(root, cells[0])
                _bad_sample(bad, f"{path}: listed in {csv_path} line {line}, file does not exist")
    elif split == "test":
        raise DataError(f"{csv_path}: missing (expected the SSVTP test list, one RGB path per row)")
    else:
        rgb_dir = os.path.join(root, "images_rgb")
        if not os.path.isdir(rgb_dir):
            raise DataError(f"{root}: no train.csv and no images_rgb/ (expected the SSVTP layout)")
        rels = [(f"images_rgb/{f}", rgb_dir) for f in sorted(os.listdir(rgb_dir)) if f.lower().endswith(IMAGE_EXTS)]
    if not rels:
        raise DataError(f"{root}: no samples (expected rows in train.csv/test.csv or images in images_rgb/)")
    items = []
    for rel, src in _split(rels, split):
        stem = os.path.splitext(os.path.basename(rel))[0]  # image_<id>_rgb
        label_id = stem[len("image_"):-len("_rgb")] if stem.startswith("image_") and stem.endswith("_rgb") else None
        items.append(dict(id=f"ssvtp/{rel}", vision=os.path.join(root, rel),
                          tactile=os.path.join(root, rel.replace("rgb", "tac")), background=None,
                          text=os.path.join(root, "text", f"labels_{label_id}.txt") if label_id else "",
                          adjs=None, crop_top=None, src=src))
    return items


def _read_json_lists(path):
    try:
        with open(path) as fh:
            d = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("vision", "tactile", "background")) \
            or len({len(d[k]) for k in ("vision", "tactile", "background")}) != 1:
        raise DataError(f"{path}: expected {{'vision': [...], 'tactile': [...], 'background': [...]}} of equal length")
    return list(zip(d["vision"], d["tactile"], d["background"]))


def _hct_item(run_dir, run, vis, tac, bg, adjs, src):
    return dict(id=f"hct/{run}/{vis}", vision=os.path.join(run_dir, vis), tactile=os.path.join(run_dir, tac),
                background=os.path.join(run_dir, bg), text=None, adjs=adjs, src=src,
                crop_top=HCT_DATA3_TOP if run == "data3" else 0)


def read_hct(root, split, use_not_contact=False, seed=0, percent_not_contact=NOT_CONTACT_FRAC):
    """HCT items of a split: runs (sub-folders with contact.json) in sorted order, rows of train.csv/test.csv
    (or contact.json, caption-less, for train/val), split over the concatenation of all runs."""
    runs = sorted(r for r in os.listdir(root) if os.path.isfile(os.path.join(root, r, "contact.json")))
    if not runs:
        raise DataError(f"{root}: no run folders (expected sub-folders like data1/ holding contact.json)")
    items = []
    for run in runs:
        run_dir = os.path.join(root, run)
        csv_path = os.path.join(run_dir, "test.csv" if split == "test" else "train.csv")
        if os.path.isfile(csv_path):
            for line, (vis, tac, bg, cap) in read_csv_rows(csv_path, ncols=4)[1:]:  # first row: the header
                items.append(_hct_item(run_dir, run, vis, tac, bg, parse_adjectives(cap) or None,
                                       f"{csv_path} line {line}"))
        elif split == "test":
            print(f"data: {run_dir} has no test.csv; none of its frames are in the test split")
        else:
            src = os.path.join(run_dir, "contact.json")
            items += [_hct_item(run_dir, run, *frame, None, src) for frame in _read_json_lists(src)]
    if not items:
        raise DataError(f"{root}: no {split} samples (expected rows in <run>/{'test' if split == 'test' else 'train'}.csv)")
    items = _split(items, split)
    if use_not_contact and split == "train":
        items += read_not_contact(root, runs, max_count=int(percent_not_contact * len(items)), seed=seed)
    return items


def read_not_contact(root, runs, max_count, seed):
    """At most max_count no-contact frames from the runs' not_contact.json, a seeded choice, captioned 'background'."""
    frames = []
    for run in runs:
        path = os.path.join(root, run, "not_contact.json")
        if os.path.isfile(path):
            frames += [_hct_item(os.path.join(root, run), run, *f, ["background"], path) for f in _read_json_lists(path)]
    if not frames:
        raise DataError(f"{root}: --use_not_contact given but no run holds not_contact.json")
    if len(frames) > max_count:
        keep = np.random.RandomState(seed).choice(len(frames), max_count, replace=False)
        frames = [frames[i] for i in sorted(keep)]
    print(f"data: added {len(frames)} HCT no-contact frames (captioned 'background') to the train split")
    return frames


def _bad_sample(bad, message):
    """A sample that cannot be used: DataError(message), or (with a `bad` list) the message appended to it."""
    if bad is None:
        raise DataError(message)
    bad.append(message)


def _check_files(items, active, bad, background=False):
    """Every file the active modalities need must exist: error naming the first missing one, or (with a `bad`
    list) the sample dropped and its missing files named in `bad`."""
    keys = [k for k in ("vision", "tactile", "text") if k in active] + (["background"] if background else [])
    kept = []
    for it in items:  # it["text"]: SSVTP label path ("" when the RGB name has no id), None for HCT (CSV caption)
        missing = [it[k] or f"label file of {it['vision']} (expected an RGB name image_<id>_rgb.<ext>)"
                   for k in keys if it[k] is not None and not os.path.isfile(it[k])]
        if missing:
            _bad_sample(bad, "; ".join(f"{m}: listed in {it['src']}, file does not exist" for m in missing))
        else:
            kept.append(it)
    return kept


def _read_labels(items, bad):
    """SSVTP captions: the first line of each label file (an empty one, or one that is not UTF-8 text, is a bad
    sample: TVL's reader would stop on it, and decoded any other way its words would be wrong without a word said)."""
    kept = []
    for it in items:
        if it["text"]:
            with open(it["text"], "rb") as fh:
                raw = fh.read()
            try:
                it["adjs"] = parse_adjectives(raw.decode("utf-8").split("\n")[0]) or None
            except UnicodeDecodeError as e:
                _bad_sample(bad, f"{it['text']}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})")
                continue
            if it["adjs"] is None:
                _bad_sample(bad, f"{it['text']}: no adjectives on the first line (expected e.g. 'smooth, hard.')")
                continue
        kept.append(it)
    return kept


def _load_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- dataset

class TVLDataset(Dataset):
    """items -> {modality: tensor, "index": int}. Attributes: sample_ids (stable string per item), captions
    (evaluation caption per item, None where an item has none; None when text is not active), bad_files (messages
    of the samples left out while listing; see build_dataset's tolerate_bad).

    replace_bad: a sample whose image does not decode is replaced by the next loadable index (a function of the
    files only: deterministic, and the batch keeps its size) and the item says so in "bad" (one "path: reason"
    line per replaced sample, "" when none; see pop_bad). Otherwise such a sample raises DataError.

    two_views (the view contrastive term, with augment): the item also holds, under "view2", {modality: tensor} of
    a second, independent augmentation draw of the same sample (its own random streams)."""

    def __init__(self, items, tokenizer, active_modalities, seed, augment, prompt=DEFAULT_PROMPT,
                 shuffle_text=False, synonyms=None, replace_bad=False, bad_files=None, subtract_background=False,
                 color_jitter=False, random_captions=False, two_views=False):
        self.items = items
        self.tokenizer = tokenizer
        self.active = tuple(active_modalities)
        self.seed, self.augment, self.two_views = seed, augment, two_views
        self.prompt, self.shuffle_text = prompt, shuffle_text
        self.synonyms = synonyms or {}  # {subset: {word: [synonyms]}}
        self.replace_bad, self.bad_files = replace_bad, list(bad_files or [])
        self.subtract_background = subtract_background  # tactile frames minus each item's "background" image
        self.color_jitter = color_jitter  # with subtraction: TVL's synchronised jitter, SSVTP only
        self.sample_ids = [it["id"] for it in items]
        self.captions = None
        if "text" in self.active:
            self.captions = [make_caption(it["adjs"], prompt, self._caption_rng(i) if random_captions else None)
                             if it["adjs"] else None for i, it in enumerate(items)]

    def __len__(self):
        return len(self.items)

    @staticmethod
    def _caption_rng(index):
        return random.Random(item_seed(EVAL_CAPTION_SEED, 0, index, STREAMS["text"]))

    def __getitem__(self, key):
        epoch, index = epoch_and_index(key)
        if not self.replace_bad:
            return self._load(index, epoch)
        bad = []
        for k in range(len(self)):
            j = (index + k) % len(self)
            try:
                return dict(self._load(j, epoch), bad="\n".join(bad))
            except DataError as e:
                bad.append("; ".join(self.file_problems(j)) or str(e))
        raise DataError(f"no sample of {len(self)} could be loaded: {bad[0]}")

    def file_problems(self, index):
        """["path: reason"] for every image of sample `index` the active modalities need that does not decode."""
        problems = []
        for m in ("vision", "tactile"):
            if m in self.active:
                try:
                    load_image(self.items[index][m])
                except DataError as e:
                    problems.append(str(e))
        return problems

    def _stream(self, epoch, index, modality, view):
        return item_seed(self.seed, epoch, index, STREAMS[modality] + VIEW2_STREAM_OFFSET * view)

    def _gen(self, epoch, index, modality, view=0):
        return torch.Generator().manual_seed(self._stream(epoch, index, modality, view)) if self.augment else None

    def _load(self, index, epoch):
        """The item with data from sample `index` ("index" says which sample the tensors came from)."""
        out = self._inputs(index, epoch)
        if self.two_views:
            out["view2"] = self._inputs(index, epoch, view=1)
        out["index"] = index
        return out

    def _inputs(self, index, epoch, view=0):
        """{modality: tensor} of sample `index`, augmentation draw `view` (0, or 1 for the second view)."""
        it = self.items[index]
        out = {}
        if "vision" in self.active:
            g = self._gen(epoch, index, "vision", view)
            out["vision"] = vision_transform(load_image(it["vision"]), it["crop_top"], g)
        if "tactile" in self.active:
            out["tactile"] = self._tactile(it, self._gen(epoch, index, "tactile", view))
        if "text" in self.active:
            if self.augment:
                rng = random.Random(self._stream(epoch, index, "text", view))
                syn = self.synonyms.get(it["id"].split("/")[0])
                text = make_caption(it["adjs"], self.prompt, rng, self.shuffle_text, syn)
            else:
                text = self.captions[index]
            out["text"] = self.tokenizer([text])[0]
        return out

    def _tactile(self, it, g):
        frame = load_image(it["tactile"])
        if not self.subtract_background:
            return tactile_transform(frame, g)
        background = load_background(it["background"])
        if frame.shape != background.shape:
            raise DataError(f"{it['tactile']}: {tuple(frame.shape[1:])} pixels, its background {it['background']} "
                            f"{tuple(background.shape[1:])}: background subtraction needs the same size")
        sync = self.color_jitter and it["id"].startswith("ssvtp/")  # TVL's HCT reader never jitters
        return tactile_minus_background(frame, background, g, sync)


def build_dataset(args, split, tokenizer, active_modalities, seed, augment=None, tolerate_bad=False):
    """The TVLDataset of `split` ("train" | "val" | "test") over args.datasets under args.datasets_dir, with the
    data recipe of args (recipe_of: after resolve_recipe, Stage 1's unless overridden).
    augment=None: the train split augments unless args.no_augment; val/test never do. Raises DataError, at the
    first missing file; with tolerate_bad samples with missing files or empty labels are left out instead (named
    in the dataset's bad_files) and undecodable ones are replaced (TVLDataset's replace_bad). An augmented train
    split gives two augmentation draws per item (TVLDataset's two_views) when args.complementary_view_weight > 0."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    root = args.datasets_dir
    if not root or not os.path.isdir(root):
        raise DataError(f"--datasets_dir {root}: no such directory (expected the TVL folder holding ssvtp/ and hct/)")
    recipe = recipe_of(args)
    augment = (split == "train" and not args.no_augment) if augment is None else augment
    two_views = augment and split == "train" and getattr(args, "complementary_view_weight", 0) > 0
    subtract = recipe["subtract_background"] == "background" and "tactile" in active_modalities
    items, synonyms = [], {}
    bad = [] if tolerate_bad else None
    subsets = [s for s in SUBSETS if s in args.datasets]  # always SSVTP first: item indices do not depend on flag order
    for subset in subsets:
        sub = os.path.join(root, subset)
        if not os.path.isdir(sub):
            raise DataError(f"{sub}: missing (expected the {subset.upper()} subset of TVL, see docs/reference.md)")
        if subset == "ssvtp":
            part = read_ssvtp(sub, split, bad)
            background = _ssvtp_background(args) if subtract else None
            for it in part:
                it["background"] = background
        else:
            part = read_hct(sub, split, recipe["use_not_contact"], seed, recipe["percent_not_contact"])
        part = _check_files(part, active_modalities, bad, background=subtract)
        if "text" in active_modalities:
            part = _read_labels(part, bad)
            n = len(part)
            part = [it for it in part if it["adjs"] is not None]
            if len(part) < n:
                print(f"data: left out {n - len(part)} caption-less {subset} samples of {split} (text is active)")
        if not part:
            raise DataError(f"{sub}: no usable {split} samples")
        items += part
        if subset == "ssvtp" and recipe["replace_synonyms"]:  # TVL replaces synonyms in SSVTP captions only
            synonyms[subset] = _load_json(os.path.join(sub, "synonyms.json"))
            if synonyms[subset] is None:
                print(f"data: --replace_synonyms: {sub}/synonyms.json does not exist, captions keep their words")
    print(f"data: {split}: {len(items)} samples from {', '.join(subsets)} (augment={augment})"
          + (f", {len(bad)} left out for missing files or empty labels" if bad else ""))
    return TVLDataset(items, tokenizer, active_modalities, seed, augment, recipe["text_prompt"],
                      recipe["shuffle_text"], {k: v for k, v in synonyms.items() if v}, tolerate_bad, bad, subtract,
                      recipe["color_jitter"], random_captions=split != "train" and args.eval_captions == "random",
                      two_views=two_views)


def _ssvtp_background(args):
    """SSVTP's one sensor background image (not in the dataset): --tactile_background, required for subtraction."""
    path = getattr(args, "tactile_background", None)
    if not path:
        raise DataError("--tactile_background: required, Stage 1's recipe subtracts the sensor background from "
                        "SSVTP tactile frames (pass TVL's tvl_enc/data/tac_background.png, or --subtract_background "
                        "none to depart from that recipe)")
    if not os.path.isfile(path):
        raise DataError(f"--tactile_background {path}: no such file")
    return path


# ----------------------------------------------------------------------------- bad files
# A real dataset can hold the odd missing or unreadable file. By default the first one stops the run, on every rank
# at once and with its loader workers ended (GuardedLoader, util.dist.run_entry_point), exit code 2. check_data
# lists every one in a single pass; with a budget (BadSamples, main_train_stage2's --max_bad_samples) they are
# replaced and counted instead.

def pop_bad(batch):
    """Removes a batch's "bad" entry (TVLDataset's replace_bad) and returns its messages, one per bad sample."""
    return [m for s in batch.pop("bad", []) for m in s.split("\n") if m]


class BadSamples:
    """The bad samples a run has met ("path: reason" messages), each printed once (rank 0), refused past `limit`.
    `seen` is appended to in place: pass the run state's list (util.checkpoint.TrainState.bad_samples), so the
    checkpoint holds the count and a resumed run counts on from where it stopped."""

    def __init__(self, limit, seen=None):
        self.limit, self.seen = limit, [] if seen is None else seen

    def add(self, messages):
        for m in sorted(set(messages) - set(self.seen)):
            self.seen.append(m)
            if dist.is_main():
                print(f"data: WARNING skipped bad sample {len(self.seen)} of at most {self.limit} "
                      f"(--max_bad_samples): {m}", flush=True)
        if len(self.seen) > self.limit:
            raise DataError(f"{len(self.seen)} bad samples, more than --max_bad_samples {self.limit}: "
                            + "; ".join(self.seen))


class GuardedLoader:
    """A DataLoader every rank iterates in step (same batch count everywhere): a DataError on any rank (a bad file,
    or one bad sample more than the budget) is raised on every rank together, naming the file, so no rank is left
    waiting in a collective; bad samples replaced on any rank are counted in `bad` on all of them. One host-side
    flag exchange per batch (util.dist.any_rank), none with one process. Workers end with the run
    (util.dist.tracked_loader)."""

    def __init__(self, loader, bad):
        self.loader, self.bad = dist.tracked_loader(loader), bad
        self.sampler, self.dataset = loader.sampler, loader.dataset
        bad.add(getattr(loader.dataset, "bad_files", []))  # left out while listing; no rank exchange: all list alike

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            batch, error = None, None
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as e:
                error = dist.exception_message(e)
            new = pop_bad(batch) if batch is not None else []
            if dist.any_rank(error or new):
                shared = dist.all_gather_object((error, new))
                errors = [e for e, _ in shared if e]
                if errors:
                    raise DataError(error or f"stopped: another rank could not read its data: {errors[0]}")
                self.bad.add([m for _, msgs in shared for m in msgs])
            yield batch


def raise_bad_files(messages, what):
    """On every rank: DataError when any rank has bad-sample messages, after rank 0 printed each once, sorted."""
    found = sorted({m for part in dist.all_gather_object(list(messages)) for m in part})
    if not found:
        return
    if dist.is_main():
        print(f"data: {len(found)} bad sample(s) in {what}:\n" + "\n".join(f"  {m}" for m in found), flush=True)
    raise DataError(f"{len(found)} sample(s) of {what} have missing or unreadable files (listed above), the first: "
                    f"{found[0]}")


class _FileCheck(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        return self.ds.file_problems(index)


def _concat(lists):
    return [m for part in lists for m in part]


def check_data(args, splits, active_modalities):
    """Reads every sample of `splits` once: missing files and empty labels while listing, then every image decoded
    (this rank's share of the indices, args.num_workers loader workers, a progress bar on rank 0). Rank 0 prints
    every bad sample in one report; DataError on every rank when there is one. Returns the samples checked."""
    problems, total = [], 0
    for split in splits:
        ds = build_dataset(args, split, None, active_modalities, args.seed, augment=False, tolerate_bad=True)
        problems += ds.bad_files
        total += len(ds) + len(ds.bad_files)
        share = list(range(dist.get_rank(), len(ds), dist.get_world_size()))
        loader = DataLoader(_FileCheck(ds), batch_size=16, sampler=share, num_workers=args.num_workers,
                            collate_fn=_concat)
        with tqdm(total=len(share), desc=f"check {split}", disable=not dist.is_main(), file=sys.stdout,
                  mininterval=1.0) as bar:
            for batch_problems in loader:
                problems += batch_problems
                bar.update(min(16, bar.total - bar.n))
    raise_bad_files(problems, ", ".join(splits))
    if dist.is_main():
        print(f"data: check: all {total} samples of {', '.join(splits)} read fine", flush=True)
    return total
