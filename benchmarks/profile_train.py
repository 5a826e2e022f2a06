"""Where a training step's time goes: ``python -m benchmarks.profile_train [CONFIG ...]``.

Runs the ``train_step`` case of bench_train (memories full) under torch.profiler and prints,
per configuration, the GPU kernels by total time and the host time per step. Not a
benchmark row: a tool for deciding what to optimise next.
"""
import argparse
import math
import time

import torch

from benchmarks.bench_train import CONFIGS, ct_step
from compressive_transformer import preset


def profile(name, steps=3, rows=25, compiled=False):
    config, train_config = preset(name)
    B, n = train_config.batch, config.seg_len
    tokens = torch.randint(0, config.vocab_size, (B, n + 1), device="cuda")
    step = ct_step(name, tokens, compiled=compiled)
    for _ in range(math.ceil((config.mem_len + config.cmem_len * config.rate) / n) + 2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - start) / steps  # host time to queue a step
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / steps / 1e3
    label = f"{name} (compiled)" if compiled else name
    print(f"== {label}: wall {wall * 1e3:.2f} ms/step, host queueing {host * 1e3:.2f} ms/step, "
          f"GPU kernels {gpu_total:.2f} ms/step", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60),
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="*", help=f"any of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--compiled", action="store_true",
                        help="the model under torch.compile (the kernels a compiled step runs)")
    parser.add_argument("--rows", type=int, default=25, help="table rows (default 25)")
    options = parser.parse_args()
    names = options.configs or CONFIGS
    for name in names:
        if name not in CONFIGS:
            parser.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    for name in names:
        profile(name, rows=options.rows, compiled=options.compiled)


if __name__ == "__main__":
    main()
