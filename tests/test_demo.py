"""The README's first command: the embedded demo learns (the same check a new user reads off its last line)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_learns_well_above_chance_and_writes_a_real_run(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "main_train_stage2.py", "--demo", "--output_dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"demo: val_mean_r1 before=(\d+\.\d\d) after=(\d+\.\d\d) chance=(\d+\.\d\d)", last)
    assert m, last
    before, after, chance = map(float, m.groups())
    assert after >= 2 * before and after >= 5 * chance, last
    # everything a real run writes, plus the generated inputs it reuses next time
    files = set(os.listdir(out))
    assert {"checkpoint.pth", "checkpoint-best.pth", "log.txt", "args.json", "data", "stage1"} <= files, files
    assert any(f.startswith("events.out.tfevents") for f in files)
    from tools.demo import DEMO
    with open(out / "log.txt") as f:
        assert len(f.readlines()) == DEMO["epochs"]  # one line per epoch
