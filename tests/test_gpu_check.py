"""The CUDA-only checks (skipped without a GPU; bench/gpu_check.sh runs them on a lent one), and the GPU check script
itself in its CPU dry run.

The CUDA tests use the real register module and loss on the shapes users train with: ViT-L-14 vision (257 x 1024) and
text (77 x 768) tokens, vit_tiny tactile tokens (197 x 192), the default module (K=4, K_o=3, width 256, depth 2),
batch 16, nested dropout, padded text, reconstruction on.
"""
import json
import os
import re
import subprocess
import time

import pytest
import torch

from conftest import ROOT, free_port
import util.dist as udist
from loss_stage2 import Stage2Loss
from tvl_stage2 import RegisterModule, nested_dropout_mask
from util.misc import autocast

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIMS = {"vision": (257, 1024), "tactile": (197, 192), "text": (77, 768)}
B, E = 16, 768


def case(device):
    """(module, loss_fn, out_kwargs) on `device`, seeded: the same values on every device."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = RegisterModule({m: c for m, (_, c) in DIMS.items()}, E, recon_dims={m: E for m in DIMS}).to(device)
    tokens = {m: torch.randn(B, n, c, generator=g).to(device) for m, (n, c) in DIMS.items()}
    pad = {"text": (torch.arange(77)[None, :] >= torch.randint(5, 77, (B, 1), generator=g)).to(device)}
    glob = {m: torch.randn(B, E, generator=g).to(device) for m in DIMS}
    keep = nested_dropout_mask(B, 4, 0.5, generator=g).to(device)
    return module, Stage2Loss(3, 0.01, 0.1), dict(tokens=tokens, padding_mask=pad, keep=keep), glob


def loss_and_grads(module, loss_fn, inputs, glob, device, precision):
    module.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = module(**inputs)
        out["global"] = glob
        loss, terms = loss_fn(out)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in module.parameters()])


@cuda
def test_cuda_bf16_autocast_loss_and_gradients_match_fp32():
    device = torch.device("cuda")
    module, loss_fn, inputs, glob = case(device)
    ref_loss, ref_grad = loss_and_grads(module, loss_fn, inputs, glob, device, "fp32")
    loss, grad = loss_and_grads(module, loss_fn, inputs, glob, device, "amp_bf16")
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); the loss is a mean of log-softmaxes
    # computed in float32 under autocast, so a few such errors add up to well under 2e-2 of the loss.
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert torch.isfinite(grad).all()
    assert torch.nn.functional.cosine_similarity(grad.double(), ref_grad.double(), dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in module.parameters())  # autocast never casts the weights

    cpu_loss, _ = loss_and_grads(*case(torch.device("cpu")), torch.device("cpu"), "fp32")
    assert ref_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-4)  # the CUDA fp32 path is the CPU one


@cuda
def test_cuda_nccl_one_process_group_gathers_and_trains_like_no_group(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    device = torch.device("cuda", 0)
    module, loss_fn, inputs, glob = case(device)
    ref_loss, ref_grad = loss_and_grads(module, loss_fn, inputs, glob, device, "fp32")

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device)
    try:
        monkeypatch.setattr(udist, "_CONTROL_GROUP", dist.new_group(backend="gloo"))
        x = torch.arange(6.0, device=device).view(3, 2)
        assert torch.equal(udist.all_gather_cat(x), x) and torch.equal(udist.reduce_mean(x), x)
        assert udist.any_rank(True) and not udist.any_rank(False)
        ddp = DistributedDataParallel(module, device_ids=[0])
        loss, grad = loss_and_grads(ddp, loss_fn, inputs, glob, device, "fp32")
    finally:
        dist.destroy_process_group()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_gpu_check_dry_run_prints_table_json_and_summary_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    t = time.time()
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--json", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    seconds = time.time() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"gpu_check: online_over_encoder=(\S+) mfu=(\S+) cached_speedup=(\S+) loader_over_encoder=(\S+)",
                     last)
    assert m, last
    report = json.loads(out.read_text())
    b, loader, s = report["bench_stage2"], report["loader"], report["summary"]
    # the summary line is the JSON's summary, which is made of the raw numbers
    assert [float(v) for v in m.groups()] == pytest.approx(
        [s["online_over_encoder"], s["mfu"], s["cached_speedup"], s["loader_over_encoder"]], rel=1e-2)
    assert s["mfu"] == pytest.approx(b["encoder_tflops"] / b["matmul_peak_tflops"])
    assert s["loader_over_encoder"] == pytest.approx(loader["samples_per_s"] / b["encoder_samples_per_s"])
    assert s["online_over_encoder"] == pytest.approx((b["encoder_ms"] + b["module_ms"]) / b["encoder_ms"])
    assert s["cached_speedup"] == pytest.approx(b["cached_samples_per_s"] / b["online_samples_per_s"])
    assert b["precision"] == "fp32" and report["gpu"] is None and loader["workers"] == os.cpu_count()
    # the CUDA tests ran and skipped for want of a GPU (a collection error would list no tests)
    assert {k: v for k, v in report["device_tests"].items() if "cuda" in k} == {
        "test_cuda_bf16_autocast_loss_and_gradients_match_fp32": "skipped",
        "test_cuda_nccl_one_process_group_gathers_and_trains_like_no_group": "skipped"}
    assert "MFU (encoder / matmul peak)" in proc.stdout and "loader / encoder" in proc.stdout
    print(f"dry run: {seconds:.0f}s wall")
