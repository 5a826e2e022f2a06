"""compress() on the fast backends vs the float64 reference (FlashAttention's error rule).

On CPU the Triton kernels run in the interpreter at small shapes; on a GPU the same tests run
the Triton and CUDA backends at real shapes in fp16/bf16/fp32.
"""

import pytest
import torch

import ct_kernels
from ct_kernels import reference
from ct_kernels.testing import error_rule, poison_, run_without_interpreter

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float32, torch.bfloat16]
# (B, ns, d, rate): odd d (scalar path), rate 1, ns = rate, and the vector path
SHAPES = [(2, 12, 40, 3), (3, 10, 37, 5)] + (
    [(16, 512, 1024, 2), (8, 768, 1024, 3), (3, 90, 1000, 6)] if CUDA
    else [(1, 4, 16, 1), (2, 8, 24, 8)])


def _backends():
    have = ct_kernels.available_backends()
    return [pytest.param(b, marks=pytest.mark.skipif(b not in have, reason=f"no {b} backend"))
            for b in ("triton", "cuda")]


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty made during the test starts as NaN: unwritten outputs fail."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))


def _inputs(B, ns, d, dtype, seed, *, strided=False, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, ns + 3, d, generator=g)
    if ties:  # few distinct values: many windows hold their maximum twice
        x = x.mul(2).round()
    x = x[:, 3:] if strided else x[:, :ns].contiguous()  # strided: batch stride != ns * d
    return x.to(DEVICE, dtype).requires_grad_()


def _check(actual, exact, lowp, factor, what):
    error, allowed = error_rule(actual, lowp, exact, factor)
    assert error <= allowed, f"{what}: error {error:.3g} > allowed {allowed:.3g}"


def _check_against_reference(fn_fast, fn_ref, inputs, grad_seed):
    """Forward and every gradient of fn_fast(*inputs) vs fn_ref in float64 and at low precision."""
    out = fn_fast(*inputs)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    exact_in = [t.detach().double().requires_grad_() for t in inputs]
    exact = fn_ref(*exact_in)
    exact_grads = torch.autograd.grad(exact, exact_in, grad.double())
    lowp_in = [t.detach().clone().requires_grad_() for t in inputs]
    lowp = fn_ref(*lowp_in)
    lowp_grads = torch.autograd.grad(lowp, lowp_in, grad)
    _check(out, exact, lowp, 2, "output")
    for i, (a, e, low) in enumerate(zip(grads, exact_grads, lowp_grads)):
        assert not torch.isnan(a).any(), f"gradient {i} has unwritten (NaN) elements"
        _check(a, e, low, 3, f"gradient {i}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("method", ["mean", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-ns{}-d{}-c{}".format(*s))
def test_pooling(poisoned_outputs, backend, method, dtype, shape):
    B, ns, d, rate = shape
    x = _inputs(B, ns, d, dtype, seed=ns * d + rate, strided=rate % 2 == 1)
    _check_against_reference(
        lambda t: ct_kernels.compress(t, rate, method, backend=backend),
        lambda t: reference.compress(t, rate, method), [x], grad_seed=d)


@pytest.mark.parametrize("backend", _backends())
def test_max_ties_share_the_gradient(poisoned_outputs, backend):
    """Rows equal to a window's maximum split its gradient evenly, as torch.amax does."""
    x = _inputs(3, 24, 40, torch.float32, seed=5, ties=True)
    out = ct_kernels.compress(x, 4, "max", backend=backend)
    grad = torch.randn_like(out)
    dx, = torch.autograd.grad(out, x, grad)
    xr = x.detach().clone().requires_grad_()
    dxr, = torch.autograd.grad(reference.compress(xr, 4, "max"), xr, grad)
    assert (x.detach().view(3, 6, 4, 40) == out.detach()[:, :, None]).sum(2).max() > 1  # ties exist
    torch.testing.assert_close(out, reference.compress(x.detach(), 4, "max"), rtol=0, atol=0)
    torch.testing.assert_close(dx, dxr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("method,options", [("conv", {}), ("dilated_conv", {"dilation": 2}),
                                            ("dilated_conv", {"dilation": 3})])
@pytest.mark.parametrize("shape", [(2, 12, 24, 3, 16), (3, 8, 16, 4, 16), (1, 10, 8, 2, 12)]
                         + ([(8, 768, 1024, 3, 1024)] if CUDA else []),
                         ids=lambda s: "B{}-ns{}-d{}-c{}-dout{}".format(*s))
def test_convolutions(backend, method, options, shape):
    B, ns, d, rate, d_out = shape
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = _inputs(B, ns, d, dtype, seed=ns + d, strided=True)
    g = torch.Generator().manual_seed(rate)
    weight = (torch.randn(d_out, d, rate, generator=g) / (d * rate) ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(d_out, generator=g).to(DEVICE, dtype)
    _check_against_reference(
        lambda t, w, b: ct_kernels.compress(t, rate, method, weight=w, bias=b, backend=backend,
                                            **options),
        lambda t, w, b: reference.compress(t, rate, method, weight=w, bias=b, **options),
        [x, weight.requires_grad_(), bias.requires_grad_()], grad_seed=3)


@pytest.mark.parametrize("backend", _backends())
def test_conv_weight_matrix_follows_weight_updates(backend):
    """The permuted weight is cached per weight version: in-place updates are seen."""
    x = torch.randn(2, 8, 16, device=DEVICE)
    weight = torch.randn(16, 16, 2, device=DEVICE)
    first = ct_kernels.compress(x, 2, "conv", weight=weight, backend=backend)
    weight.mul_(-2)
    second = ct_kernels.compress(x, 2, "conv", weight=weight, backend=backend)
    torch.testing.assert_close(second, reference.compress(x, 2, "conv", weight=weight))
    torch.testing.assert_close(second, -2 * first)


@pytest.mark.parametrize("backend", _backends())
def test_most_used_is_served_by_the_reference(backend):
    x = torch.randn(2, 8, 16, device=DEVICE)
    usage = torch.rand(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="most_used"):
        ct_kernels.compress(x, 2, "most_used", usage=usage, backend=backend)
    out = ct_kernels.compress(x, 2, "most_used", usage=usage)  # auto falls back
    keep = usage.topk(4, dim=1).indices.sort(dim=1).values
    torch.testing.assert_close(out, torch.stack([x[b, keep[b]] for b in range(2)]))


@pytest.mark.skipif("cuda" not in ct_kernels.available_backends(), reason="no CUDA extension")
def test_cuda_ops_check_inputs():
    x = torch.randn(2, 9, 16, device="cuda")
    with pytest.raises(RuntimeError, match="rate"):
        torch.ops.ct_kernels.pool_compress(x, 2, False)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        torch.ops.ct_kernels.pool_compress(x.transpose(1, 2), 3, False)


# Compiles every Triton kernel variant of ct_kernels.ops.compress for sm_90 (front end, PTX,
# ptxas; no GPU needed). Runs in a fresh process: the interpreter must be off.
_COMPILE_FOR_SM90 = """
import sys
import triton.language as tl
from ct_kernels.ops import compress as ops
from ct_kernels.testing import compile_for_sm90

dtype = sys.argv[1]
arg_type = lambda n: ("*i32" if "lens" in n else "*" + dtype) if n.endswith("_ptr") else "i32"
common = dict(RATE=3, ACC=tl.float32, BLOCK_D=1024)
for is_max in (False, True):
    for kernel in (ops._pool_forward_kernel, ops._pool_backward_kernel):
        compile_for_sm90(kernel, arg_type, IS_MAX=is_max, **common)
for pool in (ops.POOL_NONE, ops.POOL_MEAN, ops.POOL_MAX, ops.POOL_GIVEN):
    for shift_cmem, shift_mem in ((True, True), (True, False), (False, True)):
        compile_for_sm90(ops._memory_update_kernel, arg_type, POOL=pool, SHIFT_CMEM=shift_cmem,
                         SHIFT_MEM=shift_mem, **common)
"""


@pytest.mark.skipif(CUDA, reason="on a GPU every kernel is compiled and run by the tests above")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_sm90(dtype):
    """The interpreter is dynamically typed: compiling for sm_90 as well makes typing errors
    (e.g. a loop-carried variable changing dtype) fail on the CPU."""
    done = run_without_interpreter(_COMPILE_FOR_SM90, dtype)
    assert done.returncode == 0, done.stderr[-3000:]
