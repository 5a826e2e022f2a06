"""Decode attention: one new token (n = 1) over a long [cmem | mem | segment] cache.

Rows (benchmarks/results/decode.csv), op ``decode_attention``, mode fwd, bf16,
B = 32, H = 8, D = 128, cached length L = 1024, 4096, 16384 (shape ``B32-H8-D128-L<L>``),
split as cmem L/2, mem L/2 - 1, segment 1 (the new token):
  - ct_cuda: compressive_attention(..., backend="cuda"), memories read in place.
  - ct_cuda-eager: the same call launched eagerly from Python (user-path overhead).
  - ct_cuda-relpos: the same with Transformer-XL relative positions (r read as well).
  - sdpa: F.scaled_dot_product_attention on the cache already concatenated as [B, H, L, D]
    (its best layout; the concatenation is not timed).
  - ct_triton: compressive_attention(..., backend="triton").
gbps = K/V bytes read / time = 2 * B * L * H * D * 2 bytes / time (r not counted).
Every provider except ct_cuda-eager is timed as a CUDA graph replay of one call, so the
time is GPU time and not Python launch overhead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ct_kernels
from benchmarks import harness
from ct_kernels import testing
from ct_kernels.ops import decode_attention

B, H, D, N_QUERIES = 32, 8, 128, 1
LENGTHS = (1024, 4096, 16384)
SPLIT_SWEEP = (1, 2, 3, 4, 8, 16, 32)  # at L = 4096, printed only
CSV = "decode.csv"
OP = "decode_attention"


def cache_inputs(L, dtype=torch.bfloat16, device="cuda", rel_pos=False):
    cm = L // 2
    m = L - cm - N_QUERIES
    return testing.random_attention_inputs(B, N_QUERIES, H, D, m, cm, dtype=dtype, device=device,
                                           rel_pos=rel_pos, extra_rows=0)


def _measure(rows, shape, provider, make_fn, nbytes, flops, keep=True):
    try:
        row = harness.measure(OP, shape, provider, "fwd", make_fn(), flops=flops, nbytes=nbytes)
    except Exception as error:  # noqa: BLE001  (a missing or failing provider is reported)
        harness.failed_row(OP, shape, provider, "fwd", error)
        return
    if keep:
        rows.append(row)


def run():
    if not torch.cuda.is_available() or "cuda" not in ct_kernels.available_backends():
        print("bench_decode: needs a CUDA GPU and the ct_kernels._C extension; skipped")
        return []
    rows = []
    for L in LENGTHS:
        shape = f"B{B}-H{H}-D{D}-L{L}"
        nbytes = 2 * B * L * H * D * 2
        flops = 4 * B * H * D * L * N_QUERIES
        args = cache_inputs(L)
        call = lambda backend, a=args: ct_kernels.compressive_attention(**a, backend=backend)  # noqa: E731
        _measure(rows, shape, "ct_cuda", lambda: harness.graphed(lambda: call("cuda")), nbytes, flops)
        _measure(rows, shape, "ct_cuda-eager", lambda: (lambda: call("cuda")), nbytes, flops)
        rel_args = cache_inputs(L, rel_pos=True)
        _measure(rows, shape, "ct_cuda-relpos",
                 lambda: harness.graphed(lambda: ct_kernels.compressive_attention(**rel_args, backend="cuda")),
                 nbytes, flops)
        del rel_args

        keys = torch.cat([args["cmem_k"], args["mem_k"], args["k"]], 1).transpose(1, 2).contiguous()
        values = torch.cat([args["cmem_v"], args["mem_v"], args["v"]], 1).transpose(1, 2).contiguous()
        query = args["q"].transpose(1, 2)
        _measure(rows, shape, "sdpa",
                 lambda: harness.graphed(lambda: F.scaled_dot_product_attention(query, keys, values)),
                 nbytes, flops)
        del keys, values
        _measure(rows, shape, "ct_triton", lambda: harness.graphed(lambda: call("triton")), nbytes, flops)

        if L == 4096:  # how the split count trades parallelism against combine work
            for splits in SPLIT_SWEEP:
                _measure(rows, shape, f"ct_cuda-splits{splits}",
                         lambda: harness.graphed(lambda: decode_attention.decode_attention(**args, num_splits=splits)),
                         nbytes, flops, keep=False)
        del args
        torch.cuda.empty_cache()
    harness.append_rows(rows, CSV)
    harness.plot(rows, OP, value="gbps", filename="decode.png")
    return rows


if __name__ == "__main__":
    run()
