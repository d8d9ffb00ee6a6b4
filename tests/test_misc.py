import os

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
