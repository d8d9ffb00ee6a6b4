"""What one GPU does with FluxTalk Stage 2, in one time-boxed command (bench/gpu_check.sh runs this; not a test).

    bash bench/gpu_check.sh                 # one CUDA GPU, about 5 minutes (budget 8)
    bash bench/gpu_check.sh --dry-run       # the same steps on the CPU with tiny shapes (checks the script itself)

Steps, each with what is left of the time budget:
1. device tests: the tests of tests/test_gpu_check.py that need CUDA (bf16 autocast on the real loss against fp32,
   an NCCL process group of one process); without CUDA they are reported as skipped;
2. bench/bench_stage2.py on the ViT-L-14 shapes at bf16 (dry run: the tiny Stage 1, fp32): online and cached
   samples/s, online step / encoder forward, the encoder forward's TFLOP/s against a dense matmul measured in the
   same run (MFU);
3. the training data loader on JPEGs of TVL's image sizes (camera 640x480, DIGIT 240x320; augmentation on, as in
   training) with one worker per CPU core: decoded samples/s against the encoder's samples/s of step 2. Below 1,
   online training on this machine waits for the loader (input-bound).
Prints one table, writes every raw number to --json, and ends with
    gpu_check: online_over_encoder=<x> mfu=<y> cached_speedup=<z> loader_over_encoder=<w>
(nan where a step failed or ran out of time; the exit code is then 1).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_stage2 as D  # noqa: E402
import tools.make_synthetic_tvl as synth  # noqa: E402

CAMERA_SIZE, DIGIT_SIZE = (640, 480), (240, 320)  # (W, H): webcam frames; DIGIT gel images (portrait)


def run_step(cmd, deadline, log):
    """Runs cmd with what is left until `deadline`; returns (ok, seconds, note). Output goes to `log`."""
    left = deadline - time.time()
    if left < 10:
        return False, 0.0, "no time left"
    t = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
            return False, time.time() - t, f"timed out (see {log})"
    return rc == 0, time.time() - t, "" if rc == 0 else f"exit {rc} (see {log})"


def device_tests(deadline, tmp):
    """{test name: passed | skipped | failed} of the CUDA tests."""
    xml = os.path.join(tmp, "device_tests.xml")
    ok, secs, note = run_step([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                               os.path.join(ROOT, "tests", "test_gpu_check.py"), f"--junitxml={xml}"],
                              deadline, os.path.join(tmp, "device_tests.log"))
    if not os.path.isfile(xml):
        return {"error": note}, secs
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        result[case.get("name")] = status
    return result, secs


def bench_stage2(dry_run, deadline, tmp):
    out = os.path.join(tmp, "bench_stage2.json")
    if dry_run:
        flags = ["--device", "cpu", "--configs", "tiny", "--batch_size", "4", "--batches", "2", "--cached_batches", "4",
                 "--matmul", "256", "3"]
    else:  # batch 64 per GPU, as the training scripts use
        flags = ["--device", "cuda", "--configs", "bench", "--batch_size", "64", "--batches", "10", "--warmup", "3",
                 "--cached_batches", "100"]
    ok, secs, note = run_step([sys.executable, os.path.join(ROOT, "bench", "bench_stage2.py"), *flags, "--json", out],
                              deadline, os.path.join(tmp, "bench_stage2.log"))
    if not ok:
        return {"error": note}, secs
    with open(out) as f:
        raw = json.load(f)
    return dict(next(iter(raw["configs"].values())), device=raw["device"]), secs


def loader_rate(n, batch_size, workers, tmp):
    """Decoded training samples/s (vision + tactile + text, augmentation on) on JPEGs of TVL's sizes."""
    saved = synth.SSVTP_RGB_SIZE, synth.HCT_RGB_SIZE, synth.TAC_SIZE
    synth.SSVTP_RGB_SIZE = synth.HCT_RGB_SIZE = CAMERA_SIZE
    synth.TAC_SIZE = DIGIT_SIZE
    try:
        root = synth.make_synthetic_tvl(os.path.join(tmp, "tvl_real_size"), n_ssvtp=n, n_hct=n, seed=0)
    finally:
        synth.SSVTP_RGB_SIZE, synth.HCT_RGB_SIZE, synth.TAC_SIZE = saved
    import open_clip
    args = D.add_data_args(argparse.ArgumentParser()).parse_args(["--datasets_dir", root])
    ds = D.build_dataset(args, "train", open_clip.get_tokenizer("ViT-L-14"), D.STREAMS, seed=0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not throughput
    samples, t = 0, time.perf_counter()
    for b in it:
        samples += len(b["index"])
    return samples / (time.perf_counter() - t), len(ds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--json", default="gpu_check.json", help="raw numbers")
    p.add_argument("--budget_s", type=float, default=None, help="time box (default: 480, dry run 170)")
    a = p.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + (a.budget_s or (170 if a.dry_run else 480))
    report = {"dry_run": a.dry_run, "cpus": os.cpu_count(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        report["device_tests"], report["device_tests_s"] = device_tests(deadline, tmp)
        report["bench_stage2"], report["bench_stage2_s"] = bench_stage2(a.dry_run, deadline, tmp)
        t = time.time()
        if deadline - t > 10:
            rate, n = loader_rate(40 if a.dry_run else 600, 8 if a.dry_run else 64, os.cpu_count(), tmp)
            report["loader"] = {"samples_per_s": rate, "workers": os.cpu_count(), "train_samples": n,
                                "camera_size": CAMERA_SIZE, "digit_size": DIGIT_SIZE}
        else:
            report["loader"] = {"error": "no time left"}
        report["loader_s"] = time.time() - t
        logs = {name: open(os.path.join(tmp, name)).read()[-4000:] for name in os.listdir(tmp) if name.endswith(".log")}

    b, loader = report["bench_stage2"], report["loader"]
    nan = float("nan")
    enc_sps = b.get("encoder_samples_per_s", nan)
    summary = {"online_over_encoder": b.get("online_over_encoder", nan), "mfu": b.get("mfu", nan),
               "cached_speedup": b.get("speedup_cached_vs_online", nan),
               "loader_over_encoder": loader.get("samples_per_s", nan) / enc_sps}
    report["summary"], report["total_s"] = summary, time.time() - t0
    failed = [k for k, v in report["device_tests"].items() if v not in ("passed", "skipped")]
    problems = failed + [f"{k}: {v['error']}" for k, v in (("bench_stage2", b), ("loader", loader)) if "error" in v]
    if problems:
        report["logs"] = logs
    with open(a.json, "w") as f:
        json.dump(report, f, indent=2)

    print(f"\ngpu_check{' (dry run, CPU, tiny shapes)' if a.dry_run else ''} on {report['gpu'] or 'cpu'}, "
          f"{report['cpus']} CPUs, torch {report['torch']}, {report['total_s']:.0f}s")
    rows = [(f"test {k}", v) for k, v in report["device_tests"].items()]
    if "error" not in b:
        rows += [("online samples/s", f"{b['online_samples_per_s']:.1f}"),
                 ("cached samples/s", f"{b['cached_samples_per_s']:.1f}"),
                 ("encoder forward samples/s", f"{enc_sps:.1f}"),
                 ("online step / encoder forward", f"{b['online_over_encoder']:.3f}"),
                 ("encoder forward TFLOP/s", f"{b['encoder_tflops']:.2f}"),
                 (f"matmul peak TFLOP/s ({b['precision']})", f"{b['matmul_peak_tflops']:.2f}"),
                 ("MFU (encoder / matmul peak)", f"{100 * b['mfu']:.1f}%"),
                 ("cached speedup", f"{b['speedup_cached_vs_online']:.1f}x")]
    if "error" not in loader:
        rows += [(f"loader samples/s ({loader['workers']} workers)", f"{loader['samples_per_s']:.1f}"),
                 ("loader / encoder", f"{summary['loader_over_encoder']:.2f}"
                                      f"{' (input-bound)' if summary['loader_over_encoder'] < 1 else ''}")]
    rows += [(f"problem", p) for p in problems]
    for k, v in rows:
        print(f"{k:<72}{v:>12}")
    print(f"raw numbers: {os.path.abspath(a.json)}")
    print("gpu_check: " + " ".join(f"{k}={v:.3g}" for k, v in summary.items()), flush=True)
    return 1 if problems or any(math.isnan(v) for v in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
