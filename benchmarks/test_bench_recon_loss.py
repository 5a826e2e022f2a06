"""CPU-sized reconstruction-loss benchmarks for pytest-benchmark (``pytest benchmarks
--benchmark-only``): the cases of benchmarks/bench_recon_loss.py at CPU_SHAPES; timings are
reported, never asserted. Without a GPU the Triton kernels run in the CPU interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import bench_recon_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = list(bench_recon_loss.cases(bench_recon_loss.CPU_SHAPES, torch.float32, DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_recon_loss(benchmark, case):
    name, provider, mode, fn, flops = case
    benchmark.extra_info.update(op="recon_loss", shape=name, provider=provider, mode=mode,
                                flops=flops)
    benchmark(fn)
