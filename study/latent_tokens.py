"""Token features generated directly from known latents (no images, no encoders), written as a feature cache.

Per sample: a shared continuous latent and a shared class (seen by every modality), and per modality a specific
latent and a nuisance latent (seen by that modality only). Each modality's context is N tokens of Stage 1's
feature width for it; every latent group is written, through fixed random matrices, into a contiguous span of
several tokens (spans overlap), plus Gaussian noise. The Stage 1 "global" embedding of a modality (what the
reconstruction targets read) is a fixed random linear map of the shared + specific latents only, never of the
nuisance. So a representation can hold a factor because it was kept on purpose (shared, specific: both in the
global embedding) or because nothing removed it (nuisance: in the tokens only), and the probes tell them apart.

How much of its specific latent a modality's global embedding holds is a setting (`global_specific`, per modality,
1 = all of it, 0 = none): the specific global map is scaled after it is drawn, so the tokens and every other map
(and so every other random draw) are the same at every setting. A contrastively trained Stage 1 (TVL's tactile
encoder, trained against CLIP) sheds what the partner cannot predict: global_specific {"tactile": 0} is that case.

Augmented views (train split, `views` > 0, what the intra-modality view objective contrasts and what training
then reads instead of the plain view, as for a cache_features.py cache): a view keeps every latent of the sample,
the nuisance too (it is a property of the sample, not of one observation), and changes only the observation:
the token noise is drawn afresh, and each context token is dropped (zeroed) with probability VIEW_TOKEN_DROP,
independently per view, modality and token. The Stage 1 global embedding, a function of the latents, is the
same in every view. View 0 is the plain rendering, identical with or without augmented views.

The files follow main_train_stage2's feature-cache layout (one shard; V = 1 + views on train, 1 on val):
    DIR/<split>/shard_00000/{<m>_tokens.npy float16 (V, n, N, C_m), <m>_global.npy float32 (V, n, E), index.npy}
    DIR/<split>/meta.json
    DIR/factors.json    {"factors": {name: kind}, "classes": {name: count}, "samples": {sample_id: {name: value}}}
"""
import argparse
import contextlib
import io
import json
import os

import numpy as np

from data_stage2 import resolve_recipe
from feature_cache import CACHE_FORMAT, cache_data_flags

SPEC = dict(shared_dim=4, num_classes=6, specific_dim=4, nuisance_dim=4, num_context=12, noise=0.3)
# Token spans (fractions of the context) of each latent group: overlapping, so no token holds one group alone.
SPANS = {"shared": (0.0, 0.5), "class": (0.25, 0.75), "specific": (0.25, 0.75), "nuisance": (0.5, 1.0)}
VIEW_TOKEN_DROP = 0.15  # augmented views: probability that a context token is zeroed


def factor_kinds(modalities):
    """{factor: "shared" | "specific" | "nuisance"}; the modality of a specific / nuisance factor prefixes it."""
    kinds = {"shared": "shared", "shared_class": "shared"}
    for m in modalities:
        kinds[f"{m}_specific"], kinds[f"{m}_nuisance"] = "specific", "nuisance"
    return kinds


def sample_latents(n, modalities, rng):
    """{factor: (n, d) float or (n,) int class} drawn independently, standard normal / uniform class."""
    z = {"shared": rng.standard_normal((n, SPEC["shared_dim"])),
         "shared_class": rng.integers(SPEC["num_classes"], size=n)}
    for m in modalities:
        z[f"{m}_specific"] = rng.standard_normal((n, SPEC["specific_dim"]))
        z[f"{m}_nuisance"] = rng.standard_normal((n, SPEC["nuisance_dim"]))
    return z


def make_maps(modalities, feature_dims, embed_dim, rng, global_specific=None):
    """Fixed random maps per modality: for each latent group, (N, d, C) token writer zero outside its span, and
    (d, E) global writer for the shared (the same in every modality) and specific groups. Entries scaled so every
    group adds unit variance per coordinate of the tokens it is written into. global_specific {m: fraction}
    (default 1) scales m's specific global writer after every map is drawn: no other draw depends on it."""
    n_ctx = SPEC["num_context"]
    dims = {"shared": SPEC["shared_dim"], "class": SPEC["num_classes"], "specific": SPEC["specific_dim"],
            "nuisance": SPEC["nuisance_dim"]}
    # As a contrastively trained Stage 1: the shared latents land on the same global directions in every modality.
    shared_glob = {g: rng.standard_normal((dims[g], embed_dim)) / np.sqrt(dims[g]) for g in ("shared", "class")}
    maps = {}
    for m in modalities:
        c = feature_dims[m]
        tok = {}
        for g, d in dims.items():
            lo, hi = (int(round(f * n_ctx)) for f in SPANS[g])
            w = np.zeros((n_ctx, d, c))
            w[lo:hi] = rng.standard_normal((hi - lo, d, c)) / np.sqrt(d)
            tok[g] = w
        specific = rng.standard_normal((dims["specific"], embed_dim)) / np.sqrt(dims["specific"])
        maps[m] = {"tokens": tok, "global": dict(shared_glob, specific=specific)}
    for m, fraction in (global_specific or {}).items():
        maps[m]["global"]["specific"] = maps[m]["global"]["specific"] * fraction
    return maps


def render(z, maps, m):
    """(noise-free tokens (n, N, C), global (n, E)) of modality m from the latents z."""
    groups = {"shared": z["shared"], "class": np.eye(SPEC["num_classes"])[z["shared_class"]] * np.sqrt(SPEC["num_classes"]),
              "specific": z[f"{m}_specific"], "nuisance": z[f"{m}_nuisance"]}
    tokens = sum(np.einsum("nd,tdc->ntc", groups[g], w) for g, w in maps[m]["tokens"].items())
    glob = sum(groups[g] @ w for g, w in maps[m]["global"].items())
    return tokens, glob


def observe(clean, rng, drop=0.0):
    """One observation of noise-free tokens (n, N, C): fresh noise, each token zeroed with probability `drop`."""
    tokens = clean + SPEC["noise"] * rng.standard_normal(clean.shape)
    if drop:
        tokens = tokens * (rng.random(clean.shape[:2]) >= drop)[..., None]
    return tokens.astype(np.float32)


def write_split(root, split, z, maps, modalities, fingerprint, data_flags, embed_dim, feature_dims, rng, views=0,
                view_rng=None):
    n = len(z["shared"])
    shard = os.path.join(root, split, "shard_00000")
    os.makedirs(shard, exist_ok=True)
    for m in modalities:
        clean, glob = render(z, maps, m)
        tokens = [observe(clean, rng)] + [observe(clean, view_rng, VIEW_TOKEN_DROP) for _ in range(views)]
        np.save(os.path.join(shard, f"{m}_tokens.npy"), np.stack(tokens).astype(np.float16))  # (V, n, N, C)
        np.save(os.path.join(shard, f"{m}_global.npy"), np.repeat(glob[None].astype(np.float32), 1 + views, 0))
    np.save(os.path.join(shard, "index.npy"), np.arange(n, dtype=np.int64))
    ids = [f"latent/{split}/{i:06d}" for i in range(n)]
    meta = {"format": CACHE_FORMAT, "split": split, "stage1_fingerprint": fingerprint,
            "active_modalities": list(modalities), "data_flags": data_flags, "seed": 0, "views": 1 + views,
            "shard_size": n, "num_samples": n, "num_shards": 1, "sample_ids": ids, "precision": "fp32",
            "feature_dims": {m: feature_dims[m] for m in modalities}, "embed_dim": embed_dim, "captions": None}
    with open(os.path.join(root, split, "meta.json"), "w") as f:
        json.dump(meta, f)
    return ids


def resolved_args(args, stage1):
    """A copy of the parsed training args holding Stage 1's data recipe where the command line gives none, as
    main_train_stage2.run resolves them before it reads a cache (the cache's data flags must match those)."""
    args = argparse.Namespace(**vars(args))
    with contextlib.redirect_stdout(io.StringIO()):  # resolve_recipe prints the recipe
        resolve_recipe(args, stage1)
    return args


def make_latent_cache(root, stage1, args, n_train, n_val, seed=0, views=0, global_specific=None):
    """Writes the cache under root for `stage1` (its feature dims, embed dim and fingerprint) and the data flags of
    the training `args` (parsed; Stage 1's recipe is resolved into a copy here), with `views` augmented views of
    the train split; returns root. Deterministic in seed; view 0 does not depend on `views`, and only the globals
    depend on `global_specific` ({modality: fraction of its specific latent in its global embedding}, default 1)."""
    unknown = set(global_specific or {}) - set(args.active_modality_names)
    if unknown:
        raise ValueError(f"global_specific names modalities not in the cache: {sorted(unknown)}")
    args = resolved_args(args, stage1)
    modalities = list(args.active_modality_names)
    rng = np.random.default_rng(seed)
    maps = make_maps(modalities, stage1.feature_dims, stage1.embed_dim, rng, global_specific)
    samples = {}
    for split, n in (("train", n_train), ("val", n_val)):
        z = sample_latents(n, modalities, rng)
        ids = write_split(root, split, z, maps, modalities, stage1.fingerprint, cache_data_flags(args, split),
                          stage1.embed_dim, stage1.feature_dims, rng, views if split == "train" else 0,
                          np.random.default_rng([seed, 1]))  # own stream: view 0 stays what it was
        for i, sid in enumerate(ids):
            samples[sid] = {k: (int(v[i]) if v.ndim == 1 else v[i].tolist()) for k, v in z.items()}
    with open(os.path.join(root, "factors.json"), "w") as f:
        json.dump({"factors": factor_kinds(modalities), "classes": {"shared_class": SPEC["num_classes"]},
                   "global_specific": {m: float((global_specific or {}).get(m, 1.0)) for m in modalities},
                   "samples": samples}, f)
    return root
