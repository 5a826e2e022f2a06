"""Host time of one attention call: ``python -m benchmarks.host_time``.

For our kernels (launched through ``ct_kernels.launch``, and through Triton's own launcher
for comparison) and FlexAttention: the calls of the attention benchmark enqueued thirty at
a time, the host's seconds per call (best of three), beside ``do_bench``'s GPU-event time.
When the host time exceeds the GPU time the GPU waits for the host and the eager timings
measure the host. Not a benchmark row: a tool for deciding what to optimise next.
"""
import time

import torch
import triton

from benchmarks import bench_attention
from ct_kernels import launch as fast_launch
from ct_kernels.ops import attention

SHAPES = {"tiny": (1, 1, 16, 16, 16, 128), "pg19-like": bench_attention.SHAPES["pg19-like"],
          "enwik8-like": bench_attention.SHAPES["enwik8-like"]}


def _triton_launch(kernel, grid, args, meta):
    kernel[grid](*args, **meta)


def host_ms(fn, calls=30):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def main():
    for name, shape in SHAPES.items():
        for _, provider, mode, fn, _ in bench_attention.cases({name: shape}, torch.bfloat16,
                                                               "cuda", False):
            if provider not in ("ct_triton", "flex"):
                continue
            launchers = {"": None}
            if provider == "ct_triton":
                launchers = {"ct_kernels.launch": fast_launch.launch, "kernel[grid]": _triton_launch}
            for label, launcher in launchers.items():
                if launcher:
                    attention.launch = launcher
                for _ in range(3):
                    fn()
                host = min(host_ms(fn) for _ in range(3))
                gpu = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                print(f"{name:12s} {provider:10s} {label:18s} {mode:8s} host {host:7.3f} ms/call"
                      f"  do_bench {gpu:7.4f} ms", flush=True)
            attention.launch = fast_launch.launch


if __name__ == "__main__":
    main()
