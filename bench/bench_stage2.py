"""Stage 2 training speed online (frozen encoders + register module) vs from the feature cache (not a test).

    python bench/bench_stage2.py                      # CPU: tiny demo Stage 1, then the bench configuration
    python bench/bench_stage2.py --device cuda        # GPU: more batches, bf16 autocast, absolute samples/s and MFU

Two configurations, each on the same synthetic TVL data (vision + tactile + text, no augmentation):
- tiny:  the demo Stage 1 (fluxtalk-tiny OpenCLIP + vit_tiny tactile);
- bench: the shapes users train with: OpenCLIP ViT-L-14 vision and text towers and a vit_tiny_patch16_224 tactile
         encoder with a 768-d head, random weights (nothing is downloaded), the default register module of
         main_train_stage2.py (width 256, depth 2, 4 heads, K=4), batch 8.

Per configuration: the cache is built with cache_features.py's own code, then
- online: each step = data (decode) + frozen encoder forward + module step (register module forward, loss, backward,
  AdamW); `overhead = (encoder forward + module step) / encoder forward`, data time excluded (it is reported);
- cached: each step = cache read + the same module step;
- ideal speedup from counted FLOPs (torch.utils.flop_counter, the encoders counted on the meta device):
  (encoder forward + module step) / module step;
- peak memory: CUDA max allocated per mode (Stage 1 is not on the GPU in the cached mode); on CPU the peak RSS of the
  resident weights + optimizer state of the mode (Stage 1 only online) + the peak RSS growth during its steps.
The last line is `speedup_cached_vs_online=<x> overhead_online=<y>` for the bench configuration; --json PATH also
writes every number of every configuration (bench/gpu_check.sh reads it). The model FLOP utilisation (MFU) divides
the encoder forward's achieved FLOP/s by a dense square matmul's, measured in the same run in the same precision.
"""
import json
import argparse
import math
import os
import sys
import tempfile
import threading
import time

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cache_features  # noqa: E402
import data_stage2 as D  # noqa: E402
import feature_cache  # noqa: E402
from main_train_stage2 import build_criterion, build_model, get_args_parser  # noqa: E402
from stage1 import build_stage1, create_tactile_encoder  # noqa: E402
from tools.make_synthetic_tvl import make_synthetic_tvl  # noqa: E402
from tools.make_tiny_stage1 import make_tiny_stage1  # noqa: E402
from util.misc import MODALITIES, autocast, to_device  # noqa: E402

# Dense bf16 peak of a few GPUs (TFLOP/s), for the model FLOP utilisation; --peak_tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def bench_stage1(folder, config):
    """(FrozenStage1, tokenizer name) of a configuration; Stage 1 files written under `folder`."""
    if config == "tiny":
        ckpt, clip = make_tiny_stage1(folder, seed=0)
        return build_stage1(ckpt, "fluxtalk-tiny", clip)
    # TVL layout with a vit_tiny tactile encoder whose head maps to the ViT-L-14 text width (768), random weights.
    import argparse as ap
    tactile = create_tactile_encoder("vit_tiny_patch16_224", num_classes=768)
    ckpt = os.path.join(folder, "tvl_enc_vittiny_random.pth")
    torch.save({"model": {**{f"tactile_encoder.{k}": v for k, v in tactile.state_dict().items()},
                          "logit_scale": torch.tensor(math.log(1 / 0.07))},
                "args": ap.Namespace(tactile_model="vit_tiny_patch16_224")}, ckpt)
    return build_stage1(ckpt, "ViT-L-14", "none")


def rss_bytes():
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory of the process while the context is open (a 2 ms sampling thread)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def peak_memory_mb(device, rss, resident):
    """CUDA: max allocated. CPU: bytes of the tensors the mode keeps resident + the RSS growth during its steps
    (the absolute RSS cannot tell: glibc keeps freed memory mapped, so released Stage 1 weights stay counted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resident + rss.peak - rss.start) / 2**20


def tensor_bytes(*modules_or_optimizers):
    total = 0
    for x in modules_or_optimizers:
        if isinstance(x, torch.optim.Optimizer):
            total += sum(t.numel() * t.element_size() for st in x.state.values() for t in st.values()
                         if torch.is_tensor(t))
        else:
            total += sum(t.numel() * t.element_size() for t in list(x.parameters()) + list(x.buffers()))
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device, dtype, n, iters):
    """Achieved TFLOP/s of an (n, n) @ (n, n) matmul: the practical peak the encoder's FLOP rate is compared with."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def module_step(model, criterion, optimizer, feats, device, precision):
    """Register module forward + loss + backward + AdamW on Stage 1 outputs (what both modes share)."""
    with autocast(device, precision):
        loss, _ = criterion(model(feats))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_config(config, a, device, folder):
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    stage1 = bench_stage1(folder, config)
    n_train = (a.batches + a.warmup) * a.batch_size
    data = os.path.join(folder, "data")
    n_sub = math.ceil(n_train / 1.4) + 1  # ~72% of the samples land in train (90/10 split, caption-less HCT out)
    make_synthetic_tvl(data, n_ssvtp=n_sub, n_hct=n_sub, seed=0)

    # The cache, with cache_features.py's own code and this Stage 1 (view 0: the un-augmented inputs).
    cache = os.path.join(folder, "cache")
    cargs = cache_features.parse_args(["--output", cache, "--datasets_dir", data, "--device", str(device),
                                       "--batch_size", str(a.batch_size), "--num_workers", str(a.num_workers),
                                       "--splits", "train", "--stage1_checkpoint", "unused"])
    t = time.perf_counter()
    stage1.to(device)
    feature_cache.cache_split(cargs, stage1, "train", device)
    t_cache = time.perf_counter() - t

    targs = get_args_parser().parse_args(a.model_flags.split())  # main's defaults: the register module users get
    model = build_model(targs, stage1)  # exactly what training builds
    register = model.registers.to(device)
    register.train()
    criterion = build_criterion(targs)
    optimizer = torch.optim.AdamW(register.parameters(), lr=1e-4)

    ds_online = D.build_dataset(cargs, "train", stage1.tokenizer, MODALITIES, seed=0, augment=False)
    assert len(ds_online) >= n_train, (len(ds_online), n_train)
    ds_cached = feature_cache.CachedFeatureDataset(cache, "train", feature_cache.load_cache_meta(cache, "train"),
                                                   MODALITIES, 0, False)
    loader_kw = dict(batch_size=a.batch_size, shuffle=False, drop_last=True, num_workers=a.num_workers,
                     pin_memory=device.type == "cuda")
    first = to_device(next(iter(DataLoader(ds_cached, **loader_kw))), device)
    with FlopCounterMode(display=False) as fc:  # also the module's warm-up (lazy AdamW state, kernels)
        module_step(model, criterion, optimizer, first, device, precision)
    flops_module = fc.get_total_flops()
    for _ in range(2):
        module_step(model, criterion, optimizer, first, device, precision)

    # online: data + encoder forward + module step; the encoders are warm from building the cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_data = t_enc = t_mod = 0.0
    steps = 0
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for i, batch in enumerate(DataLoader(ds_online, **loader_kw)):
            if i == a.warmup + a.batches:
                break
            batch = to_device(batch, device)
            sync(device)
            t1 = time.perf_counter()
            with autocast(device, precision):
                feats = stage1(batch)
            sync(device)
            t2 = time.perf_counter()
            module_step(model, criterion, optimizer, dict(feats, index=batch["index"]), device, precision)
            sync(device)
            t3 = time.perf_counter()
            if i >= a.warmup:
                t_data, t_enc, t_mod, steps = t_data + t1 - t0, t_enc + t2 - t1, t_mod + t3 - t2, steps + 1
            t0 = time.perf_counter()
    mem_online = peak_memory_mb(device, rss, tensor_bytes(stage1, register, optimizer))
    online = dict(sps=steps * a.batch_size / (t_data + t_enc + t_mod), data=t_data / steps, enc=t_enc / steps,
                  mod=t_mod / steps)

    # encoder FLOPs on the meta device (shapes only); this also releases the Stage 1 weights before the cached mode
    meta_batch = {k: torch.empty_like(v, device="meta") for k, v in batch.items() if k != "index"}
    stage1.to("meta")
    with FlopCounterMode(display=False) as fc, autocast(device, precision):
        stage1(meta_batch)
    flops_enc = fc.get_total_flops()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # cached: cache read + module step, more batches (each is cheap), several passes over the cached split
    steps, t_data, t_mod = 0, 0.0, 0.0
    with PeakRSS() as rss:
        while steps < a.cached_batches:
            t0 = time.perf_counter()
            for batch in DataLoader(ds_cached, **loader_kw):
                batch = to_device(batch, device)
                sync(device)
                t1 = time.perf_counter()
                module_step(model, criterion, optimizer, batch, device, precision)
                sync(device)
                t2 = time.perf_counter()
                t_data, t_mod, steps = t_data + t1 - t0, t_mod + t2 - t1, steps + 1
                t0 = time.perf_counter()
                if steps == a.cached_batches:
                    break
    mem_cached = peak_memory_mb(device, rss, tensor_bytes(register, optimizer))
    cached = dict(sps=steps * a.batch_size / (t_data + t_mod), data=t_data / steps, mod=t_mod / steps)

    speedup = cached["sps"] / online["sps"]
    overhead = (online["enc"] + online["mod"]) / online["enc"]
    ideal = (flops_enc + flops_module) / flops_module
    print(f"\n[{config}] feature dims {stage1.feature_dims}, register module width {targs.register_width} depth "
          f"{targs.register_depth} heads {targs.register_heads}, batch {a.batch_size}, {device} ({precision}), "
          f"{torch.get_num_threads()} threads; cache of {len(ds_cached)} samples built in {t_cache:.1f}s")
    print(f"{'mode':<8}{'samples/s':>11}{'data ms':>10}{'encoder ms':>12}{'module ms':>11}{'step ms':>10}"
          f"{'peak MB':>10}")
    print(f"{'online':<8}{online['sps']:>11.2f}{1e3 * online['data']:>10.1f}{1e3 * online['enc']:>12.1f}"
          f"{1e3 * online['mod']:>11.1f}{1e3 * (online['enc'] + online['mod']):>10.1f}{mem_online:>10.0f}")
    print(f"{'cached':<8}{cached['sps']:>11.2f}{1e3 * cached['data']:>10.1f}{'-':>12}{1e3 * cached['mod']:>11.1f}"
          f"{1e3 * cached['mod']:>10.1f}{mem_cached:>10.0f}")
    print(f"FLOPs per batch: encoder forward {flops_enc / 1e9:.1f} G ({flops_enc / 1e9 / a.batch_size:.1f} G/sample), "
          f"module step {flops_module / 1e9:.2f} G -> ideal speedup {ideal:.1f}x; measured {speedup:.1f}x "
          f"({100 * speedup / ideal:.0f}% of ideal); online overhead {overhead:.3f}")
    enc_tflops = flops_enc / online["enc"] / 1e12
    peak = matmul_tflops(device, torch.bfloat16 if precision == "amp_bf16" else torch.float32, *a.matmul)
    print(f"encoder forward {enc_tflops:.2f} TFLOP/s; dense {a.matmul[0]}^2 matmul ({precision}) {peak:.2f} TFLOP/s "
          f"in this run -> MFU {100 * enc_tflops / peak:.1f}%")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        mfu = f"{100 * enc_tflops / spec:.1f}%" if spec else "n/a (pass --peak_tflops)"
        print(f"{name}: encoder forward {enc_tflops:.1f} TFLOP/s, MFU vs datasheet {mfu}; "
              f"cached data wait {100 * cached['data'] / (cached['data'] + cached['mod']):.0f}% of the step")
    return dict(batch_size=a.batch_size, precision=precision, online_samples_per_s=online["sps"],
                cached_samples_per_s=cached["sps"], encoder_samples_per_s=a.batch_size / online["enc"],
                online_data_ms=1e3 * online["data"], encoder_ms=1e3 * online["enc"], module_ms=1e3 * online["mod"],
                cached_data_ms=1e3 * cached["data"], cached_module_ms=1e3 * cached["mod"],
                peak_mb_online=mem_online, peak_mb_cached=mem_cached, encoder_gflops_per_batch=flops_enc / 1e9,
                module_gflops_per_batch=flops_module / 1e9, encoder_tflops=enc_tflops, matmul_peak_tflops=peak,
                mfu=enc_tflops / peak, speedup_cached_vs_online=speedup, ideal_speedup=ideal,
                online_over_encoder=overhead)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="+", default=["tiny", "bench"], choices=["tiny", "bench"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=None, help="timed online batches (default: CPU 2, CUDA 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed online batches (default: CPU 0, CUDA 3)")
    p.add_argument("--cached_batches", type=int, default=None, help="timed cached batches (default: CPU 6, CUDA 200)")
    p.add_argument("--model_flags", default="", help="main_train_stage2 model flags to try, e.g. "
                                                      "'--register_width 128' (default: main's defaults)")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: CPU 0, CUDA 8)")
    p.add_argument("--peak_tflops", type=float, default=None, help="GPU dense bf16 datasheet peak, for a second MFU")
    p.add_argument("--matmul", type=int, nargs=2, default=None, metavar=("N", "ITERS"),
                   help="the measured matmul peak: size and repetitions (default: CUDA 8192 50, CPU 1024 5)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    a.batches = a.batches or (20 if gpu else 2)
    a.warmup = a.warmup if a.warmup is not None else (3 if gpu else 0)
    a.cached_batches = a.cached_batches or (200 if gpu else 6)
    a.num_workers = a.num_workers if a.num_workers is not None else (8 if gpu else 0)
    a.matmul = a.matmul or ((8192, 50) if gpu else (1024, 5))
    t = time.perf_counter()
    result = {}
    for config in a.configs:
        with tempfile.TemporaryDirectory() as folder:
            result[config] = run_config(config, a, device, folder)
    print(f"\ntotal {time.perf_counter() - t:.0f}s on {os.cpu_count()} CPUs"
          + (f" + {torch.cuda.get_device_name(device)}" if gpu else ""))
    r = result.get("bench", result[a.configs[-1]])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if gpu else "cpu", "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads(), "configs": result}, f, indent=2)
    print(f"speedup_cached_vs_online={r['speedup_cached_vs_online']:.2f} "
          f"overhead_online={r['online_over_encoder']:.2f}")


if __name__ == "__main__":
    main()
