"""The README's first command: the embedded demo learns (the same check a new user reads off its last line), and run
again in the same folder it reuses its inputs and starts over."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, read_log

LAST_LINE = r"demo: val_mean_r1 before=(\d+\.\d\d) after=(\d+\.\d\d) chance=(\d+\.\d\d)"


def run_demo(out, *flags):
    proc = subprocess.run([sys.executable, "main_train_stage2.py", "--demo", "--output_dir", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def val_metrics(line):
    return {k: v for k, v in line.items() if k.startswith("val_")}


@pytest.mark.slow
def test_demo_learns_well_above_chance_and_writes_a_real_run(tmp_path):
    from tools.demo import DEMO
    out = tmp_path / "demo"
    last = run_demo(out).strip().splitlines()[-1]
    m = re.fullmatch(LAST_LINE, last)
    assert m, last
    before, after, chance = map(float, m.groups())
    assert after >= 2 * before and after >= 5 * chance, last
    # everything a real run writes, plus the generated inputs it reuses next time
    files = set(os.listdir(out))
    assert {"checkpoint.pth", "checkpoint-best.pth", "log.txt", "args.json", "data", "stage1"} <= files, files
    assert any(f.startswith("events.out.tfevents") for f in files)
    # the trainer's --eval_at_start line, then one line per epoch: the table's two columns
    log = read_log(out)
    assert log[0]["eval_at_start"] is True and (log[0]["epoch"], log[0]["global_step"]) == (0, 0)
    assert [ln["epoch"] for ln in log[1:]] == list(range(DEMO["epochs"])) and not any(
        ln.get("eval_at_start") for ln in log[1:])
    assert (f"{log[0]['val_mean_r1']:.2f}", f"{log[-1]['val_mean_r1']:.2f}") == m.groups()[:2], last

    # Again in the same folder (one epoch): the data and the cache are reused, and the run starts over instead of
    # resuming or being refused; from the same seed its first evaluations equal the first run's.
    data_written = {str(p): p.stat().st_mtime_ns for p in (out / "data").rglob("*")}
    stdout = run_demo(out, "--epochs", "1")
    assert stdout.count("is complete already") == 2, stdout[-3000:]  # the train and val caches
    assert {str(p): p.stat().st_mtime_ns for p in (out / "data").rglob("*")} == data_written
    assert not os.path.exists(f"{out / 'data'}.partial")
    again = read_log(out)
    assert [(ln["epoch"], ln.get("eval_at_start", False)) for ln in again] == [(0, True), (0, False)], again
    assert val_metrics(again[0]) == val_metrics(log[0]) and val_metrics(again[1]) == val_metrics(log[1])
