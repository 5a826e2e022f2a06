"""Shared benchmark harness: timing, peak memory, the results CSV and its plot.

Every benchmark appends rows with exactly ``COLUMNS`` to a CSV under benchmarks/results/.
Timings are medians of ``triton.testing.do_bench`` (CUDA events, warm-up included) on GPU,
and medians of wall-clock repeats on CPU.
"""
from __future__ import annotations

import csv
import datetime
import os
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

COLUMNS = ["op", "shape", "provider", "mode", "ms", "tflops", "gbps", "peak_extra_mib",
           "gpu", "torch", "triton", "date"]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat()}


_gpu_warm = False


def _warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy with matrix products for about ``seconds`` once per process, so that
    the first case is not timed while the clocks ramp up from idle."""
    global _gpu_warm
    if _gpu_warm:
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
    _gpu_warm = True


def time_ms(fn: Callable[[], object], warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median milliseconds of one call of ``fn``."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        _warm_up_gpu()
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured as a CUDA graph of one call (after a warm-up call on a side stream, which
    compiles kernels and fills the allocator); returns the replay, whose time is GPU time
    without Python or launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graph_pool_mib(graph: "torch.cuda.CUDAGraph") -> float:
    """Memory of a captured CUDA graph's private pool (what its replays read and write)."""
    pool = tuple(graph.pool())
    return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
               if tuple(segment["segment_pool_id"]) == pool) / 2**20


def peak_extra_mib(fn: Callable[[], object]) -> Optional[float]:
    """Peak memory allocated during one call of ``fn`` beyond what was allocated before it."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(op: str, shape: str, provider: str, mode: str, fn: Callable[[], object], *,
            flops: Optional[float] = None, nbytes: Optional[float] = None,
            memory: bool = True, peak_mib: Optional[float] = None) -> dict:
    """Time ``fn`` and return one CSV row (tflops/gbps left empty where not counted;
    peak memory too without ``memory``, e.g. for graph replays, whose memory is the graph's;
    ``peak_mib`` gives a peak measured elsewhere, such as the size of a graph's memory pool)."""
    ms = time_ms(fn)
    peak = peak_mib if peak_mib is not None else peak_extra_mib(fn) if memory else None
    row = {"op": op, "shape": shape, "provider": provider, "mode": mode, "ms": f"{ms:.4f}",
           "tflops": f"{flops / ms / 1e9:.1f}" if flops else "",
           "gbps": f"{nbytes / ms / 1e6:.1f}" if nbytes else "",
           "peak_extra_mib": f"{peak:.1f}" if peak is not None else ""}
    row.update(environment())
    print(f"{op:18s} {shape:28s} {provider:16s} {mode:8s} {ms:9.4f} ms  "
          f"{row['tflops']:>7s} TF/s {row['gbps']:>8s} GB/s  peak {row['peak_extra_mib']:>8s} MiB",
          flush=True)
    return row


def failed_row(op: str, shape: str, provider: str, mode: str, error: Exception) -> None:
    """Print why a provider could not run a case (e.g. out of memory); no CSV row."""
    print(f"{op:18s} {shape:28s} {provider:16s} {mode:8s} failed: {type(error).__name__}: "
          f"{str(error).splitlines()[0][:120]}", flush=True)


def append_rows(rows: Iterable[dict], filename: str = "results.csv") -> str:
    """Append rows to benchmarks/results/<filename> (header written once)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list, op: str, value: str = "tflops", filename: Optional[str] = None) -> Optional[str]:
    """Grouped bar chart of ``value`` per (shape, mode) and provider for one op; PNG path."""
    rows = [r for r in rows if r["op"] == op and r[value]]
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    groups = list(dict.fromkeys(f"{r['shape']}\n{r['mode']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for p, provider in enumerate(providers):
        xs, ys = [], []
        for g, group in enumerate(groups):
            for r in rows:
                if r["provider"] == provider and f"{r['shape']}\n{r['mode']}" == group:
                    xs.append(g + p * width)
                    ys.append(float(r[value]))
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel({"tflops": "TFLOP/s", "gbps": "GB/s", "ms": "ms"}[value])
    ax.set_title(f"{op} ({rows[0]['gpu']}, {rows[0]['date']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(RESULTS_DIR, filename or f"{op}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
