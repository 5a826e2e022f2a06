"""Compression of evicted memories and the per-segment memory update.

Ops (CSV benchmarks/results/compress.csv):
  compress_mean / compress_max: ours vs F.avg_pool1d / F.max_pool1d on the transposed layout
      (providers torch_avgpool / torch_maxpool); gbps = bytes read + written at minimum.
  compress_conv: ours vs nn.Conv1d on the transposed layout (torch_conv1d); tflops.
  memory_update: one segment's update of all 24 layers of enwik8 (B8, n = m = 768, cm = 1152,
      c = 3, d = 1024, bf16) vs concatenate-and-slice (torch_cat); mode = compression method,
      eager or "+graph" (replayed from a CUDA graph: the GPU time without host launch work).
Ours: ct_cuda (the C++/CUDA extension) and ct_triton.
BENCH_COMPRESS_ONLY=pooling|conv|memory_update runs one section.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import ct_kernels
from benchmarks import harness
from ct_kernels.memory import LayerMemory

CSV = "compress.csv"
SHAPES = [(16, 512, 1024, 2), (8, 768, 1024, 3), (64, 2048, 1024, 4)]
ENWIK8 = dict(layers=24, B=8, n=768, m=768, cm=1152, rate=3, d=1024, heads=8, head_dim=128)
TORCH_POOL = {"mean": ("torch_avgpool", F.avg_pool1d), "max": ("torch_maxpool", F.max_pool1d)}


def _ours():
    have = ct_kernels.available_backends()
    return [(f"ct_{b}", b) for b in ("cuda", "triton") if b in have]


def _record(rows, op, shape, provider, mode, fn, **counts):
    """Measure one case into rows; a provider that cannot run it (e.g. out of memory) is
    printed and skipped, so the other rows still land in the CSV."""
    try:
        rows.append(harness.measure(op, shape, provider, mode, fn, **counts))
        return rows[-1]
    except Exception as error:  # noqa: BLE001 - any failure of one case
        harness.failed_row(op, shape, provider, mode, error)
        return None


def _fwd_bwd(fn, x, *params):
    """fn's forward and backward with one fixed random output gradient (drawn on first use,
    so a failing provider fails inside _record)."""
    grad = []

    def step():
        out = fn()
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])
        for p in (x, *params):
            p.grad = None
    return step


def _pooling(rows, B, ns, d, rate, dtype, device):
    name = f"B{B}-ns{ns}-d{d}-c{rate}"
    T = ns // rate
    x = torch.randn(B, ns, d, dtype=dtype, device=device, requires_grad=True)
    size = x.element_size() * B * d
    for method, (torch_name, torch_pool) in TORCH_POOL.items():
        op = f"compress_{method}"
        providers = [(torch_name, lambda: torch_pool(x.transpose(1, 2), rate).transpose(1, 2))]
        providers += [(p, lambda b=b: ct_kernels.compress(x, rate, method, backend=b))
                      for p, b in _ours()]
        fwd_bytes = size * (ns + T)  # read x, write out
        bwd_bytes = size * (ns + T) + (size * ns if method == "max" else 0)  # grad, dx (+ x)
        for provider, fn in providers:
            with torch.no_grad():
                _record(rows, op, name, provider, "fwd", fn, nbytes=fwd_bytes)
            _record(rows, op, name, provider, "fwd+bwd", _fwd_bwd(fn, x),
                    nbytes=fwd_bytes + bwd_bytes)


def _conv(rows, B, ns, d, rate, dtype, device):
    name = f"B{B}-ns{ns}-d{d}-c{rate}"
    x = torch.randn(B, ns, d, dtype=dtype, device=device, requires_grad=True)
    conv = torch.nn.Conv1d(d, d, rate, stride=rate).to(device, dtype)
    flops = 2 * B * (ns // rate) * rate * d * d
    providers = [("torch_conv1d", lambda: conv(x.transpose(1, 2)).transpose(1, 2))]
    providers += [(p, lambda b=b: ct_kernels.compress(x, rate, "conv", weight=conv.weight,
                                                      bias=conv.bias, backend=b))
                  for p, b in _ours()]
    for provider, fn in providers:
        with torch.no_grad():
            _record(rows, "compress_conv", name, provider, "fwd", fn, flops=flops)
        _record(rows, "compress_conv", name, provider, "fwd+bwd",
                _fwd_bwd(fn, x, conv.weight, conv.bias), flops=3 * flops)


def _memory_update(rows, dtype, device):
    c = ENWIK8
    L, B, n, m, cm, rate, d = c["layers"], c["B"], c["n"], c["m"], c["cm"], c["rate"], c["d"]
    nc = n // rate
    hs = [torch.randn(B, n, d, dtype=dtype, device=device) for _ in range(L)]
    conv = torch.nn.Conv1d(d, d, rate, stride=rate).to(device, dtype)
    # minimum traffic per layer: read the n evicted rows, the segment and the surviving cmem
    # rows; write the whole memory and compressed memory
    nbytes = L * B * d * hs[0].element_size() * (2 * n + (cm - nc) + m + cm)

    def torch_cat(method):
        state = [dict(mem=torch.randn(B, m, d, dtype=dtype, device=device),
                      cmem=torch.randn(B, cm, d, dtype=dtype, device=device),
                      mem_lens=torch.zeros(B, dtype=torch.int32, device=device),
                      cmem_lens=torch.zeros(B, dtype=torch.int32, device=device)) for _ in range(L)]

        def step():
            with torch.no_grad():
                for s, h in zip(state, hs):
                    stream = torch.cat([s["mem"], h], dim=1)
                    old = stream[:, :n].transpose(1, 2)
                    new = (F.avg_pool1d(old, rate) if method == "mean" else conv(old)).transpose(1, 2)
                    evicted = (s["mem_lens"] + n - m).clamp(min=0)
                    s["mem"] = stream[:, -m:]
                    s["cmem"] = torch.cat([s["cmem"], new], dim=1)[:, -cm:]
                    s["mem_lens"] = (s["mem_lens"] + n).clamp(max=m)
                    s["cmem_lens"] = (s["cmem_lens"] + evicted // rate).clamp(max=cm)
        return step

    def ours(method, backend):
        state = [LayerMemory(B, m, cm, d, rate, dtype=dtype, device=device) for _ in range(L)]
        kwargs = dict(weight=conv.weight, bias=conv.bias) if method == "conv" else {}

        def step():
            for s, h in zip(state, hs):
                s.update(h, method, backend=backend, **kwargs)
        return step

    attention_ms = _estimated_attention_ms()
    for method in ("mean", "conv"):
        providers = [("torch_cat", torch_cat(method))] + [(p, ours(method, b)) for p, b in _ours()]
        for provider, step in providers:
            # eager (host launch work included), then the GPU time alone (CUDA graph), which
            # is what the update costs when it is queued behind the layer's other kernels
            modes = [(method, step)]
            if provider != "torch_cat":  # rebinds its state to fresh tensors: not graph-safe
                modes.append((f"{method}+graph", _graph_replay(step)))
            for mode, fn in modes:
                row = _record(rows, "memory_update", "enwik8-24L", provider, mode, fn,
                              nbytes=nbytes if method == "mean" else None)
                if row:
                    print(f"    = {100 * float(row['ms']) / attention_ms:.1f}% of the 24 layers' "
                          f"attention fwd+bwd (~{attention_ms:.2f} ms at 400 TF/s)")


def _graph_replay(step):
    """``step`` captured in a CUDA graph on first call (after one warm-up run), then replayed."""
    graph = []

    def replay():
        if not graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graph[0]):
                step()
        graph[0].replay()
    return replay


def _estimated_attention_ms(tflops=400.0):
    """DESIGN.md §3's FLOP formula for one segment of all layers, fwd+bwd, at ``tflops``."""
    c = ENWIK8
    n = c["n"]
    flops = 3.5 * 4 * c["B"] * c["heads"] * c["head_dim"] * (n * (c["m"] + c["cm"]) + n * (n + 1) / 2)
    return c["layers"] * flops / (tflops * 1e12) * 1e3


def run():
    if not torch.cuda.is_available():
        print("bench_compress: no GPU, skipped")
        return []
    rows = []
    sections = []
    if os.environ.get("BENCH_COMPRESS_ONLY", "") in ("", "pooling"):
        sections += [lambda r, s=s: _pooling(r, *s, torch.bfloat16, "cuda") for s in SHAPES]
    if os.environ.get("BENCH_COMPRESS_ONLY", "") in ("", "conv"):
        sections += [lambda r, s=s: _conv(r, *s, torch.bfloat16, "cuda") for s in SHAPES]
    if os.environ.get("BENCH_COMPRESS_ONLY", "") in ("", "memory_update"):
        sections += [lambda r: _memory_update(r, torch.bfloat16, "cuda")]
    for section in sections:  # rows land in the CSV section by section
        new = []
        section(new)
        harness.append_rows(new, CSV)
        rows += new
    for op, value in (("compress_mean", "gbps"), ("compress_max", "gbps"),
                      ("compress_conv", "tflops"), ("memory_update", "ms")):
        harness.plot(rows, op, value)
    return rows


if __name__ == "__main__":
    run()
