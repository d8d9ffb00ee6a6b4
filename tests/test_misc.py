import os

import pytest

from conftest import ROOT
from util.misc import modality_pairs, pair_name


def test_pairs_are_all_unordered_pairs_sorted_by_name():
    assert modality_pairs(["vision", "tactile", "text"]) == [
        ("tactile", "text"), ("tactile", "vision"), ("text", "vision")]
    assert modality_pairs(["vision", "tactile"]) == [("tactile", "vision")]
    assert pair_name("vision", "tactile") == pair_name("tactile", "vision") == "tactile_vision"


def test_ci_runs_the_readme_test_command_verbatim():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_command = [ln for ln in f.read().splitlines() if ln.startswith("python3 -m venv")][0]
    assert "pytest" in ci_command and f"```bash\n{ci_command}\n```" in readme


def test_state_dict_mismatch_names_shapes_missing_and_unexpected_keys():
    import torch
    from util.checkpoint import state_dict_mismatch
    own = {"a": torch.zeros(2, 3), "b": torch.zeros(1), "c": torch.zeros(4)}
    assert state_dict_mismatch(own, {k: v.clone() for k, v in own.items()}) is None
    loaded = {"a": torch.zeros(3, 3), "b": torch.zeros(1), "d": torch.zeros(1)}
    assert state_dict_mismatch(own, loaded) == "3 mismatches, e.g. a: (3, 3) vs (2, 3); c: missing; d: unexpected"


def test_affinity_image_draws_each_sample_as_a_block_on_a_fixed_colour_scale():
    import torch
    from engine_stage2 import affinity_image
    # viridis' published end colours: cosine -1 -> (68, 1, 84) dark purple, +1 -> (253, 231, 36) yellow
    sim = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -1.0], [2.0, -3.0, 1.0]])  # out of [-1, 1] is clamped
    image, diag, off = affinity_image(sim, min_px=256)
    assert image.shape == (258, 258, 3) and str(image.dtype) == "uint8"  # 3 blocks of ceil(256 / 3) = 86 px
    blocks = image[::86, ::86]
    assert (blocks[[0, 1, 2], [0, 1, 2]] == [253, 231, 36]).all()
    assert (blocks[[0, 1, 1, 2], [1, 0, 2, 1]] == [68, 1, 84]).all()
    assert (image[:86, :86] == image[0, 0]).all()  # no smoothing inside a block
    assert diag == 1.0 and off == pytest.approx((-1 + 0.5 - 1 - 1 + 2 - 3) / 6)
    assert affinity_image(torch.zeros(300, 300))[0].shape == (256, 256, 3)  # the first 256 samples, one pixel each
