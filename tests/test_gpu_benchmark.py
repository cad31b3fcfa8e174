"""benchmarks/gpu.py, the script a session with a GPU runs to measure calibration time and memory, kept working here:
its small configuration on CPU, in bfloat16 as ComfyUI loads a model, writes its report."""
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")


def test_small_bf16_run_writes_a_report_per_batch(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(BENCH, "gpu.py"))
        gpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu)
        out = str(tmp_path / "GPU")
        report = gpu.main(["--small", "--device", "cpu", "--dtype", "bfloat16", "--latent", "16", "--steps", "3",
                           "--fine-steps", "2",
                           "--batches", "6", "8", "--chunk", "2", "--max-minutes", "0.02", "--out", out])
    finally:
        sys.path.remove(BENCH)
    # each batch with the network's blocks checkpointed, the first also without, side by side
    assert [(r["batch"], r["blocks_checkpointed"]) for r in report["rows"]] == [(6, True), (6, False), (8, True)]
    assert all(r["evaluations_per_sample"] > 0 and r["calibration_seconds"] > 0 for r in report["rows"])
    assert json.load(open(os.path.join(os.path.dirname(out), "gpu.json")))["dtype"] == "bfloat16"
    table = open(out + ".md").read()
    assert "| 6 |" in table and "| 8 |" in table
    # the network runs in bfloat16, the sampler's state stays float32
    net = gpu.UNet((32, 64, 128), emb=128).to(torch.bfloat16)
    x = torch.randn(2, 4, 16, 16)
    d = gpu.EpsDenoiser(net)(x, torch.tensor(3.0), cond=0, cfg=5.0)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
