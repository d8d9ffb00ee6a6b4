import os
import sys

# Tests import the top-level modules (flat layout, as MAE / TVL): put the repo root on the path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_stage1_files(tmp_path_factory):
    """(tiny_stage1.pth in the TVL layout, tiny_clip.pt) written once per test session."""
    from tools.make_tiny_stage1 import make_tiny_stage1
    return make_tiny_stage1(str(tmp_path_factory.mktemp("tiny_stage1")))


@pytest.fixture(scope="session")
def tiny_stage1(tiny_stage1_files):
    """The real frozen Stage 1 (fluxtalk-tiny OpenCLIP + timm vit_tiny tactile) built from those files."""
    from stage1 import build_stage1
    ckpt, clip = tiny_stage1_files
    return build_stage1(ckpt, clip_model="fluxtalk-tiny", clip_pretrained=clip)


@pytest.fixture(scope="session")
def synthetic_tvl(tmp_path_factory):
    """A small synthetic TVL-format dataset (ssvtp/ + hct/ with three runs) for end-to-end tests."""
    from tools.make_synthetic_tvl import make_synthetic_tvl
    out = str(tmp_path_factory.mktemp("tvl"))
    make_synthetic_tvl(out, n_ssvtp=48, n_hct=48, seed=0)
    return out
