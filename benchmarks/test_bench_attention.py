"""CPU-sized attention benchmarks for pytest-benchmark (``pytest benchmarks --benchmark-only``).

The same cases as benchmarks/bench_attention.py; timings are reported, never asserted.
Without a GPU the Triton kernels run in the CPU interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import bench_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(op, case) for op, rel_pos in (("attention", False), ("relpos_attention", True))
         for case in bench_attention.cases(bench_attention.CPU_SHAPES, torch.float32, DEVICE,
                                           rel_pos)]


@pytest.mark.parametrize("op,case", CASES, ids=[f"{op}-{c[0]}-{c[1]}-{c[2]}" for op, c in CASES])
def test_attention(benchmark, op, case):
    name, provider, mode, fn, flops = case
    benchmark.extra_info.update(op=op, shape=name, provider=provider, mode=mode, flops=flops)
    benchmark(fn)
