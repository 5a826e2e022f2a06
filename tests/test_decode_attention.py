"""CUDA decode attention (csrc/decode_attention.cu) against the reference.

GPU tests compare the kernel with the float64 reference under the error rule of
ct_kernels.testing (at most 2x the error of the reference run in the kernel's dtype) on
fresh random inputs, writing into NaN-poisoned output buffers. They cover empty and
partially filled memories, n = 1, a query-chunk tail (n = 5) and n = 16, head dims 64 and
128, fp16 and bf16, key padding and relative positions, forced split counts, strided views
and misaligned inputs. The CPU tests check that the "cuda" backend is refused clearly.
"""
import os
import subprocess
import sys

import pytest
import torch

import ct_kernels
from ct_kernels import dispatch, reference, testing
from ct_kernels.ops import decode_attention as decode

GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ct_kernels.available_backends(),
    reason="needs a CUDA GPU and the ct_kernels._C extension")
B, H = 3, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (m, cm, partial lengths, key padding)
CACHES = [
    (0, 0, False, False),      # no memories at all
    (0, 0, False, True),       # padded segment only: some rows see nothing
    (37, 0, True, False),
    (0, 53, True, True),
    (300, 129, True, True),
    (1500, 2600, False, False),  # long: many splits
    (1024, 3072, True, False),
]


def _cast(args, dtype):
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    out = {k: cast(t) for k, t in args.items()}
    if args.get("rel_pos") is not None:
        out["rel_pos"] = reference.RelativePosition(*(cast(t) for t in args["rel_pos"]))
    return out


def check(args, **options):
    """Kernel output (into a poisoned buffer) vs the reference, by the error rule."""
    q = args["q"]
    out = testing.poison_(torch.empty_like(q, memory_format=torch.contiguous_format))
    result = decode.decode_attention(**args, **options, out=out)
    assert result.data_ptr() == out.data_ptr()
    plain = {k: v for k, v in options.items() if k != "num_splits"}
    lowp = reference.compressive_attention(**args, **plain)
    exact = reference.compressive_attention(**_cast(args, torch.float64), **plain)
    error, allowed = testing.error_rule(out, lowp, exact, 2)
    assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g}"
    return out


def inputs(n, D, m, cm, dtype, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return testing.random_attention_inputs(B, n, H, D, m, cm, dtype=dtype, device="cuda",
                                           generator=g, **kw)


@GPU
@pytest.mark.parametrize("rel_pos", [False, True])
@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, cm, partial, padding", CACHES)
def test_matches_reference(m, cm, partial, padding, dtype, D, n, rel_pos):
    args = inputs(n, D, m, cm, dtype, seed=m + 7 * cm + n, partial=partial, padding=padding,
                  rel_pos=rel_pos)
    check(args)


@GPU
@pytest.mark.parametrize("n", [1, 16])
def test_empty_memories_by_length(n):
    """Memory buffers present but holding nothing yet (lens = 0 for every sample)."""
    args = inputs(n, 128, 64, 96, torch.bfloat16, partial=True, padding=True, rel_pos=True)
    args["mem_lens"] = torch.zeros(B, dtype=torch.int64, device="cuda")
    args["cmem_lens"] = torch.zeros(B, dtype=torch.int64, device="cuda")
    check(args)


@GPU
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("n", [1, 16])
def test_forced_splits(num_splits, n):
    args = inputs(n, 128, 700, 900, torch.float16, seed=num_splits, partial=True, padding=True)
    check(args, num_splits=num_splits)


@GPU
@pytest.mark.parametrize("n", [1, 16])
def test_non_causal(n):
    args = inputs(n, 64, 200, 100, torch.bfloat16, partial=True, padding=True)
    check(args, causal=False)


@GPU
def test_scale():
    args = inputs(4, 128, 50, 70, torch.float16, partial=True)
    check(args, scale=0.3)


@GPU
def test_strided_views():
    """Segment from a packed qkv tensor, memories as windows of larger ring buffers."""
    n, D, m, cm = 3, 128, 40, 24
    g = torch.Generator().manual_seed(1)
    randn = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    qkv = randn(B, n, 3, H, D)
    mem = randn(B, m + 8, 2, H, D)           # keys and values interleaved, 8 spare slots
    cmem_k, cmem_v = randn(B, cm, 2 * H, D).chunk(2, dim=2)  # every other head block
    args = dict(q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2],
                mem_k=mem[:, 8:, 0], mem_v=mem[:, 8:, 1], cmem_k=cmem_k, cmem_v=cmem_v,
                mem_lens=torch.tensor([0, 17, 40], device="cuda"))
    check(args)


@GPU
def test_misaligned_inputs_are_copied():
    n, D = 2, 64
    args = inputs(n, D, 30, 0, torch.float16)
    flat = torch.randn(B * n * H * D + 1, device="cuda").to(torch.float16)
    args["q"] = flat[1:].view(B, n, H, D)  # starts 2 bytes past a 16-byte boundary
    check(args)
    with pytest.raises(RuntimeError, match="q must be 16-byte aligned"):
        torch.ops.ct_kernels.decode_attention(
            args["q"], args["k"], args["v"], args["mem_k"], args["mem_v"], None, None, None,
            None, None, True, 0.125, None, None, None)


@GPU
def test_public_api_routes_to_cuda():
    args = inputs(1, 128, 100, 50, torch.bfloat16, partial=True, rel_pos=True)
    facts = dict(dtype=torch.bfloat16, head_dim=128, n=1, rel_pos=True, needs_grad=False,
                 return_key_usage=False, causal=True, key_padding=False)
    assert dispatch.resolve("attention", "auto", args["q"].device, **facts) is decode.decode_attention
    out = ct_kernels.compressive_attention(**args, backend="cuda")
    exact = reference.compressive_attention(**_cast(args, torch.float64))
    error, allowed = testing.error_rule(out, reference.compressive_attention(**args), exact, 2)
    assert error <= allowed


# Each bad call runs in a fresh interpreter: should the op crash instead of raising, this
# test fails and the rest of the suite still runs.
BAD_CALL = """
import torch, ct_kernels._C
x = lambda *shape, dtype=torch.float16: torch.randn(*shape, device="cuda", dtype=dtype)
def call(q, k, v, mem_k=None, mem_v=None):
    torch.ops.ct_kernels.decode_attention(q, k, v, mem_k, mem_v, None, None, None, None, None,
                                          True, 0.125, None, None, None)
try:
    {statement}
except RuntimeError as error:
    print(error)
"""


@GPU
@pytest.mark.parametrize("statement, message", [
    ("q = x(3, 1, 4, 64, dtype=torch.float32); call(q, q, q)", "q must be float16 or bfloat16"),
    ("q = x(3, 1, 4, 96); call(q, q, q)", "head dim (q.shape[3]) must be 64 or 128"),
    ("q = x(3, 17, 4, 64); call(q, q, q)", "q must hold 1..16 queries"),
    ("q = x(3, 1, 4, 64); call(q, q, q, x(3, 10, 4, 64), x(3, 5, 4, 64))", "mem_v must have shape"),
])
def test_op_rejects_bad_inputs(statement, message):
    result = subprocess.run([sys.executable, "-c", BAD_CALL.format(statement=statement)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, f"the op crashed (rc {result.returncode}): {result.stderr[-2000:]}"
    assert message in result.stdout, result.stdout + result.stderr[-2000:]


# ------------------------------------------------------------------------------- CPU
def test_cuda_backend_refused_on_cpu():
    args = testing.random_attention_inputs(2, 1, 2, 64, 8, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        ct_kernels.compressive_attention(**args, backend="cuda")


@pytest.mark.parametrize("facts, reason", [
    (dict(n=17), "1..16 queries"),
    (dict(dtype=torch.float32), "float16/bfloat16"),
    (dict(head_dim=96), "head dims"),
    (dict(needs_grad=True), "forward only"),
    (dict(return_key_usage=True), "key usage"),
])
def test_unsupported_reasons(facts, reason):
    base = dict(dtype=torch.bfloat16, head_dim=128, n=1, rel_pos=True, needs_grad=False,
                return_key_usage=False, causal=False, key_padding=True)
    assert decode._unsupported(**base) is None
    assert reason in decode._unsupported(**{**base, **facts})
