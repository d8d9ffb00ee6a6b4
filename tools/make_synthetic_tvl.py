"""Write a small dataset in the exact TVL layout (docs/reference.md) from latent factors we control.

Each sample is rendered from three kinds of factors, so evaluation can ask which register tokens carry which:

- `material` (class, 0..5): decides the adjectives (the caption) and the base colour of both images
  -> shared by vision, tactile and text.
- `texture` (continuous in [0, 1]): sets the mean intensity, stripe frequency and stripe orientation of the
  touched object in the camera image and of the gel pattern in the tactile image -> shared by vision and
  tactile only. It dominates the low-frequency appearance of both images on purpose: the demo must learn
  tactile<->vision retrieval on top of frozen *random-weight* encoders.
- nuisances, visible to one modality only: vision `vision_bg` (background colour) and `vision_light`
  (global gain); tactile `tactile_offset` (gel pattern phase shift, pixels) and `tactile_tint` (colour offset).

Every subset folder gets `factors.json`: {"factors": {name: which modalities see it}, "samples": {sample_id: {...}}}
with sample ids as `data_stage2.TVLDataset.sample_ids` spells them ("ssvtp/images_rgb/image_3_rgb.jpg",
"hct/data1/vision/frame_0003.jpg").

Layout written (both subsets):
  ssvtp/images_rgb/image_<id>_rgb.jpg, images_tac/image_<id>_tac.jpg, text/labels_<id>.txt,
        train.csv (header-less by default, --ssvtp_csv_header adds one), test.csv, synonyms.json
  hct/data<r>/vision/frame_<i>.jpg, tactile/frame_<i>.jpg, background.jpg, contact.json, not_contact.json,
        train.csv, test.csv (header + rows "vision,tactile,background,caption")
The HCT camera images are tall enough that the `data3` crop (200 px down) stays inside the image.

    python tools/make_synthetic_tvl.py --output /tmp/tvl_synth --n_ssvtp 300 --n_hct 300 --seed 0
"""
import argparse
import csv
import json
import math
import os

import numpy as np
from PIL import Image

# material class -> (name, adjectives, vision RGB colour, tactile RGB colour)
MATERIALS = [
    ("metal", ["smooth", "hard", "cold"], (0.55, 0.60, 0.70), (0.45, 0.50, 0.75)),
    ("fabric", ["soft", "fuzzy"], (0.90, 0.35, 0.35), (0.75, 0.40, 0.45)),
    ("wood", ["rough", "hard", "grainy", "warm"], (0.70, 0.50, 0.20), (0.60, 0.55, 0.30)),
    ("sponge", ["squishy"], (0.95, 0.90, 0.30), (0.70, 0.75, 0.35)),
    ("glass", ["glossy", "slippery", "smooth"], (0.30, 0.85, 0.85), (0.35, 0.70, 0.65)),
    ("stone", ["bumpy", "rough", "textured"], (0.45, 0.45, 0.45), (0.50, 0.45, 0.50)),
]
SYNONYMS = {"smooth": ["sleek", "even"], "hard": ["firm", "rigid"], "soft": ["gentle"],
            "rough": ["coarse"], "bumpy": ["lumpy", "uneven"], "glossy": ["shiny"]}
FACTOR_INFO = {"material": "vision, tactile, text", "texture": "vision, tactile",
               "vision_bg": "vision", "vision_light": "vision",
               "tactile_offset": "tactile", "tactile_tint": "tactile"}
SSVTP_RGB_SIZE = (256, 192)  # (W, H); the SSVTP centre crop is ceil(sqrt(2)*0.18*256) = 66 px
HCT_RGB_SIZE = (320, 288)    # crop 82 px from the top (from y=200 for data3: 282 <= 288)
TAC_SIZE = (120, 160)        # (W, H), portrait like the DIGIT sensor
JPEG_QUALITY = 90


def crop_size(w, h):
    """The reference vision crop side (docs/reference.md, section 4); data_stage2 uses the same rule."""
    return int(math.ceil(math.sqrt(2) * 0.18 * max(h, w)))


def _stripes(h, w, texture, phase_xy=(0.0, 0.0)):
    """(h, w) pattern in [-1, 1]: frequency and orientation set by texture, phase by a nuisance offset."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = math.pi * texture
    freq = 2.0 + 6.0 * texture  # cycles across the region
    u = ((x + phase_xy[0]) * math.cos(theta) + (y + phase_xy[1]) * math.sin(theta)) / max(h, w)
    return np.sin(2 * math.pi * freq * u)


def _shade(colour, texture, pattern, amp):
    """(h, w, 3) in [0, 1]: material colour scaled by a texture-driven intensity plus the stripe pattern."""
    level = 0.25 + 0.6 * texture + amp * pattern
    return np.clip(np.asarray(colour, np.float32)[None, None] * level[..., None] * 1.3, 0, 1)


def render_vision(f, size, top, rng, contact=True):
    """Camera image (H, W, 3) uint8: background colour, and the object centred in the reference crop."""
    w, h = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.asarray(f["vision_bg"], np.float32)
    img += rng.normal(0, 0.02, size=(h, w, 1)).astype(np.float32)
    s = crop_size(w, h)
    side = int(0.8 * s)
    y0 = (top if top is not None else (h - s) // 2) + (s - side) // 2
    x0 = (w - side) // 2
    if contact:
        obj = _shade(MATERIALS[f["material"]][2], f["texture"], _stripes(side, side, f["texture"]), 0.2)
        img[y0:y0 + side, x0:x0 + side] = obj
    img *= f["vision_light"]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_tactile(f, rng, contact=True):
    """Gel image (H, W, 3) uint8: the touched texture pattern (shifted by the gel offset) plus a tint."""
    w, h = TAC_SIZE
    if contact:
        pat = _stripes(h, w, f["texture"], f["tactile_offset"])
        img = _shade(MATERIALS[f["material"]][3], f["texture"], pat, 0.25)
    else:
        img = np.full((h, w, 3), 0.35, np.float32)
    img = img + np.asarray(f["tactile_tint"], np.float32)[None, None] + rng.normal(0, 0.02, (h, w, 1))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def sample_factors(rng):
    return {
        "material": int(rng.integers(len(MATERIALS))),
        "texture": float(rng.uniform()),
        "vision_bg": [float(v) for v in rng.uniform(0.35, 0.65, 3)],
        "vision_light": float(rng.uniform(0.9, 1.1)),
        "tactile_offset": [float(v) for v in rng.uniform(0, 20, 2)],
        "tactile_tint": [float(v) for v in rng.uniform(-0.06, 0.06, 3)],
    }


def _save(arr, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=JPEG_QUALITY)


def _caption_line(adjs, rng):
    """Label text with the quirks the reader must undo: capitals, uneven spaces, a final period."""
    words = [a.capitalize() if rng.uniform() < 0.3 else a for a in adjs]
    sep = " ,  " if rng.uniform() < 0.3 else ", "
    return sep.join(words) + ".\n"


def _write_factors(path, samples):
    with open(path, "w") as fh:
        json.dump({"factors": FACTOR_INFO, "materials": [m[0] for m in MATERIALS], "samples": samples}, fh)


def make_ssvtp(root, n, rng, test_frac=0.15, csv_header=False):
    d = os.path.join(root, "ssvtp")
    samples, rows = {}, []
    for i in range(n):
        f = sample_factors(rng)
        rgb = f"images_rgb/image_{i}_rgb.jpg"
        _save(render_vision(f, SSVTP_RGB_SIZE, None, rng), os.path.join(d, rgb))
        _save(render_tactile(f, rng), os.path.join(d, rgb.replace("rgb", "tac")))
        os.makedirs(os.path.join(d, "text"), exist_ok=True)
        with open(os.path.join(d, "text", f"labels_{i}.txt"), "w") as fh:
            fh.write(_caption_line(MATERIALS[f["material"]][1], rng))
        samples["ssvtp/" + rgb] = f
        rows.append(rgb)
    n_test = int(round(test_frac * n))
    for name, part in (("train.csv", rows[n_test:]), ("test.csv", rows[:n_test])):
        with open(os.path.join(d, name), "w", newline="") as fh:
            w = csv.writer(fh)
            if csv_header:
                w.writerow(["rgb_path"])
            w.writerows([[r] for r in part])
    with open(os.path.join(d, "synonyms.json"), "w") as fh:
        json.dump(SYNONYMS, fh)
    _write_factors(os.path.join(d, "factors.json"), samples)


def make_hct(root, n, rng, runs=3, test_frac=0.2, not_contact_frac=0.3):
    d = os.path.join(root, "hct")
    samples = {}
    per_run = [n // runs + (r < n % runs) for r in range(runs)]
    for r, n_run in enumerate(per_run):
        run = f"data{r + 1}"
        rd = os.path.join(d, run)
        top = 200 if run == "data3" else 0
        bg_rng = np.random.default_rng(rng.integers(1 << 31))
        _save(render_tactile(sample_factors(bg_rng), bg_rng, contact=False), os.path.join(rd, "background.jpg"))
        contact = {"vision": [], "tactile": [], "background": []}
        not_contact = {"vision": [], "tactile": [], "background": []}
        captions = []
        n_nc = int(round(not_contact_frac * n_run))
        for i in range(n_run + n_nc):
            f = sample_factors(rng)
            is_contact = i < n_run
            vis, tac = f"vision/frame_{i:04d}.jpg", f"tactile/frame_{i:04d}.jpg"
            _save(render_vision(f, HCT_RGB_SIZE, top, rng, contact=is_contact), os.path.join(rd, vis))
            _save(render_tactile(f, rng, contact=is_contact), os.path.join(rd, tac))
            target = contact if is_contact else not_contact
            for k, v in (("vision", vis), ("tactile", tac), ("background", "background.jpg")):
                target[k].append(v)
            if is_contact:
                captions.append(", ".join(MATERIALS[f["material"]][1]))
            else:
                f = dict(f, material=-1, texture=None)  # no contact: nothing touched
            samples[f"hct/{run}/{vis}"] = f
        for name, obj in (("contact.json", contact), ("not_contact.json", not_contact)):
            with open(os.path.join(rd, name), "w") as fh:
                json.dump(obj, fh)
        n_test = int(round(test_frac * n_run))
        rows = [[contact["vision"][i], contact["tactile"][i], "background.jpg", captions[i]] for i in range(n_run)]
        for name, part in (("train.csv", rows[n_test:]), ("test.csv", rows[:n_test])):
            with open(os.path.join(rd, name), "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["vision", "tactile", "background", "caption"])
                w.writerows(part)
    _write_factors(os.path.join(d, "factors.json"), samples)


def make_synthetic_tvl(out_dir, n_ssvtp=300, n_hct=300, seed=0, hct_runs=3, ssvtp_csv_header=False):
    """Write ssvtp/ (n_ssvtp samples) and hct/ (n_hct contact frames over hct_runs runs) under out_dir.

    Deterministic in seed. Returns out_dir (pass it as --datasets_dir)."""
    if hct_runs < 2:
        raise ValueError("hct_runs must be >= 2 (the readers must see more than one run)")
    rng = np.random.default_rng(seed)
    make_ssvtp(out_dir, n_ssvtp, rng, csv_header=ssvtp_csv_header)
    make_hct(out_dir, n_hct, rng, runs=hct_runs)
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="folder to write (becomes --datasets_dir)")
    p.add_argument("--n_ssvtp", type=int, default=300)
    p.add_argument("--n_hct", type=int, default=300, help="contact frames over all HCT runs")
    p.add_argument("--hct_runs", type=int, default=3, help="data1..dataN; data3 uses the 200 px crop offset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ssvtp_csv_header", action="store_true", help="write a header row in ssvtp/*.csv")
    a = p.parse_args()
    make_synthetic_tvl(a.output, a.n_ssvtp, a.n_hct, a.seed, a.hct_runs, a.ssvtp_csv_header)
    print(f"wrote {a.n_ssvtp} SSVTP + {a.n_hct} HCT samples to {a.output}")


if __name__ == "__main__":
    main()
