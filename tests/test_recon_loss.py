"""Triton compressor losses (ct_kernels/ops/recon_loss.py, autoencoding_loss.py) vs the reference.

Losses follow the error rule of ct_kernels.testing: the kernel's error against the float64
reference may be at most 2x (gradients 3x) the error of the reference run at the kernel's
dtype. The upstream gradient is the number of loss elements (float16: at most 2**14), so
that gradients are O(1) and the rule's few-ulp floor does not hide errors. Kernel buffers are NaN-poisoned before
the kernels write them. Without a GPU the kernels run in Triton's CPU interpreter at small,
odd sizes; the paper shapes run on the GPU.
"""

import pytest
import torch

import ct_kernels
from ct_kernels import dispatch, reference, testing
from ct_kernels.ops import autoencoding_loss as ae_module
from ct_kernels.ops import recon_loss as recon_module

pytestmark = pytest.mark.skipif("triton" not in ct_kernels.available_backends(),
                                reason="Triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter sizes (CPU only)")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def empty(shape, dtype, device):
        return testing.poison_(torch.empty(shape, dtype=dtype, device=device))
    monkeypatch.setattr(recon_module, "_empty", empty)
    monkeypatch.setattr(ae_module, "_empty", empty)


def _randn(*size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*size, generator=g).to(DEVICE)


def _recon_inputs(B, n, H, D, ns, rate, seed=0):
    """float32 q, old_k, old_v, comp_k, comp_v; comp_* are ns // rate slots."""
    nc = ns // rate
    sizes = ((B, n, H, D), (B, ns, H, D), (B, ns, H, D), (B, nc, H, D), (B, nc, H, D))
    return [_randn(*size, seed=seed + i) for i, size in enumerate(sizes)]


def _loss_and_grads(fn, tensors, dtype, grad_of):
    """fn(*tensors) in ``dtype`` and the gradients of the tensors at indices ``grad_of``."""
    leaves = [t.detach().to(dtype).requires_grad_(i in grad_of) for i, t in enumerate(tensors)]
    loss = fn(*leaves)
    # upstream gradient ~ numel makes the gradients O(1); float16 stops at 2**14 (max 65504)
    upstream = float(tensors[0].numel()) if dtype != torch.float16 else min(tensors[0].numel(), 2.0 ** 14)
    upstream = torch.tensor(upstream, dtype=dtype, device=loss.device)
    grads = torch.autograd.grad(loss, [leaves[i] for i in grad_of], upstream)
    return loss.detach(), grads


def check_against_reference(kernel_fn, reference_fn, tensors, dtype, grad_of):
    loss, grads = _loss_and_grads(kernel_fn, tensors, dtype, grad_of)
    loss_lowp, grads_lowp = _loss_and_grads(reference_fn, tensors, dtype, grad_of)
    loss_exact, grads_exact = _loss_and_grads(reference_fn, tensors, torch.float64, grad_of)
    assert loss.dtype == dtype and loss.shape == ()
    error, allowed = testing.error_rule(loss, loss_lowp, loss_exact, 2)
    assert error <= allowed, f"loss: error {error:.3g} > allowed {allowed:.3g}"
    for index, grad, lowp, exact in zip(grad_of, grads, grads_lowp, grads_exact):
        assert grad.dtype == dtype and grad.shape == tensors[index].shape
        error, allowed = testing.error_rule(grad, lowp, exact, 3)
        assert error <= allowed, f"grad of input {index}: error {error:.3g} > allowed {allowed:.3g}"


def triton_recon_loss(q, old_k, old_v, comp_k, comp_v):
    return ct_kernels.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v,
                                                    backend="triton")


def check_recon(B, n, H, D, ns, rate, dtype, seed=0):
    check_against_reference(triton_recon_loss, reference.attention_reconstruction_loss,
                            _recon_inputs(B, n, H, D, ns, rate, seed), dtype, grad_of=(3, 4))


# ------------------------------------------------------------------ attention reconstruction
@CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n,H,D,ns,rate", [
    (1, 1, 1, 16, 4, 2),       # one query
    (2, 37, 2, 32, 45, 3),     # odd sizes, several heads
    (1, 130, 1, 16, 140, 2),   # query and key counts past one tile (128 / 64 rows)
    (1, 65, 1, 16, 129, 2),    # one query / old key past whole tiles, compressed keys whole
    (1, 3, 1, 16, 130, 2),     # one compressed key past a whole tile
    (1, 9, 2, 24, 10, 5),      # head dim that is no power of two
    (1, 5, 1, 128, 9, 3),      # the GPU tiles of head dim 128
])
def test_recon_loss_interpreter(B, n, H, D, ns, rate, dtype):
    check_recon(B, n, H, D, ns, rate, dtype)


@CPU
def test_recon_loss_largest_head_dim_interpreter():
    check_recon(1, 6, 2, 200, 11, 2, torch.bfloat16)  # padded to 256 (16-bit inputs only)


def test_recon_loss_single_compressed_slot():
    # one compressed key gets all the attention: its key has no effect (gradient 0 up to
    # the rounding of dP - delta), its value takes the whole gradient
    tensors = _recon_inputs(1, 3, 1, 16, 3, 3, seed=9)
    check_against_reference(triton_recon_loss, reference.attention_reconstruction_loss,
                            tensors, torch.float32, grad_of=(4,))
    _, (d_comp_k, d_comp_v) = _loss_and_grads(triton_recon_loss, tensors, torch.float32, (3, 4))
    assert d_comp_k.abs().max() <= 1e-6 * d_comp_v.abs().max() * tensors[0].shape[-1]


@CPU
def test_recon_loss_float16_interpreter():
    check_recon(2, 19, 1, 32, 21, 3, torch.float16, seed=5)


def test_recon_loss_constants_get_no_gradient():
    q, old_k, old_v, comp_k, comp_v = (t.requires_grad_() for t in _recon_inputs(2, 7, 2, 16, 9, 3))
    triton_recon_loss(q, old_k, old_v, comp_k, comp_v).backward()
    assert q.grad is None and old_k.grad is None and old_v.grad is None
    expected = torch.autograd.grad(
        reference.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v), (comp_k, comp_v))
    for grad, exact in zip((comp_k.grad, comp_v.grad), expected):
        assert torch.allclose(grad, exact, rtol=1e-4, atol=1e-7)


def test_recon_loss_gradient_of_one_compressed_input():
    check_against_reference(triton_recon_loss, reference.attention_reconstruction_loss,
                            _recon_inputs(1, 11, 2, 16, 12, 4, seed=3), torch.float32, grad_of=(4,))


def test_recon_loss_strided_inputs_and_scale():
    B, n, H, D, nc = 2, 10, 2, 16, 4
    q_packed = _randn(B, n, 3, H, D, seed=11)  # q is one third of a packed projection
    old = _randn(B, 8, 2, H, D, seed=12)
    comp = _randn(B, nc, 2, H, D, seed=13).requires_grad_()
    q, (old_k, old_v), (comp_k, comp_v) = q_packed[:, :, 1], old.unbind(2), comp.unbind(2)
    loss = ct_kernels.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, scale=0.3,
                                                    backend="triton")
    (grad,) = torch.autograd.grad(loss, comp)
    expected = reference.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, scale=0.3)
    (expected_grad,) = torch.autograd.grad(expected, comp)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype,D,words", [(torch.float64, 16, "dtype torch.float64"),
                                           (torch.float32, 264, "head dim 264"),
                                           (torch.float32, 200, "float32 with head dim 200")])
def test_recon_loss_triton_refuses_with_reason(dtype, D, words):
    tensors = [t.to(dtype) for t in _recon_inputs(1, 2, 1, D, 2, 2)]
    with pytest.raises(ValueError, match=words):
        triton_recon_loss(*tensors)


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("B,H,n,ns,rate", [(16, 8, 512, 512, 2), (8, 8, 768, 768, 3)])
def test_recon_loss_gpu_paper_shapes(B, H, n, ns, rate, D, dtype):
    check_recon(B, n, H, D, ns, rate, dtype)


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recon_loss_gpu_odd_sizes(dtype):
    check_recon(3, 333, 3, 64, 301, 7, dtype)


class _LaunchRecorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **meta)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((args, meta))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_recon_loss_launches_take_no_float_computed_from_shapes(monkeypatch, scale):
    """Under torch.compile with dynamic shapes a float computed from sizes (1 / numel, the
    default D ** -0.5) is symbolic, and inductor gives a symbolic float argument of a
    user-defined Triton kernel an integer type: the launch fails with "TypeError: 'float'
    object cannot be interpreted as an integer" (bench_train's d1024-L4 ct_compiled case,
    compiled after d512-L8 in the same process). The float arguments of both launches must
    therefore be the same for every shape: placeholders, or the caller's scale."""
    floats, metas = [], []
    for B, n, H, D, ns, rate in ((1, 4, 1, 16, 6, 3), (2, 7, 3, 32, 8, 2)):
        q, old_k, old_v, comp_k, comp_v = (t.requires_grad_(i >= 3) for i, t in
                                           enumerate(_recon_inputs(B, n, H, D, ns, rate)))
        kernels = _LaunchRecorder(), _LaunchRecorder()
        monkeypatch.setattr(recon_module, "_recon_loss_fwd_kernel", kernels[0])
        monkeypatch.setattr(recon_module, "_recon_loss_bwd_kernel", kernels[1])
        loss = ct_kernels.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v,
                                                        scale=scale, backend="triton")
        loss.backward()
        assert [len(k.calls) for k in kernels] == [1, 1]  # forward, backward
        floats.append([[a for a in args if isinstance(a, float)] for k in kernels
                       for args, _ in k.calls])
        metas += [meta for k in kernels for _, meta in k.calls]
    assert floats[0] == floats[1], floats
    if scale is not None:
        assert floats[0] == [[scale, scale * recon_module.LOG2E]] * 2
    assert all(meta["DEFAULT_SCALE"] == (scale is None) for meta in metas)


# Compiles the recon-loss kernels for sm_90 (front end, PTX, ptxas; no GPU needed) with the
# argument types inductor gives a user-defined kernel under torch.compile: float64 scalars and
# a 64-bit numel (dtype bf16), or the ones of Triton's own launcher: float32 and 32-bit (fp32).
# Runs in a fresh process: the interpreter must be off.
_RECON_COMPILE_FOR_SM90 = """
import sys
import torch
from ct_kernels.ops import recon_loss as ops
from ct_kernels.testing import compile_for_sm90

dtype = sys.argv[1]
scalar, integer, default_scale = ("fp64", "i64", True) if dtype == "bf16" else ("fp32", "i32", False)
torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
fp32_buffers = ("PARTIAL", "LSE", "DELTA", "GRAD_LOSS")
buffers = ("Q", "OLD_K", "OLD_V", "COMP_K", "COMP_V", "DIFF", "D_COMP_K", "D_COMP_V") + fp32_buffers
arg_type = lambda n: (("*fp32" if n in fp32_buffers else "*" + dtype) if n in buffers else
                      scalar if n.endswith("_scale") else integer if n == "numel" else "i32")

D = 128
block_d = ops.padded_head_dim(D)
common = dict(HEAD_DIM=D, DEFAULT_SCALE=default_scale, BLOCK_D=block_d,
              DOT_PRECISION=ops._dot_precision(torch_dtype))
block_m, block_n, _, _ = ops._fwd_config(block_d, torch_dtype)
for save in (True, False):
    compile_for_sm90(ops._recon_loss_fwd_kernel, arg_type, SAVE_FOR_BACKWARD=save,
                     BLOCK_M=block_m, BLOCK_N=block_n, **common)
block_m, block_n, _, _ = ops._bwd_config(block_d, torch_dtype)
compile_for_sm90(ops._recon_loss_bwd_kernel, arg_type, BLOCK_M=block_m, BLOCK_N=block_n, **common)
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels are compiled and run above")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_recon_loss_kernels_compile_for_sm90(dtype):
    """The interpreter is dynamically typed: compiling for sm_90 with the launchers' argument
    types (float64 scalars from torch.compile among them) makes typing errors fail on the CPU."""
    done = testing.run_without_interpreter(_RECON_COMPILE_FOR_SM90, dtype)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------ Hopper forward ("cuda")
def _sm90_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return recon_module._sm90_unsupported(dtype=torch.bfloat16, head_dim=128)


SM90 = pytest.mark.skipif(_sm90_reason() is not None, reason=f"sm_90 forward: {_sm90_reason()}")


def sm90_recon_loss(q, old_k, old_v, comp_k, comp_v):
    return ct_kernels.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, backend="cuda")


@SM90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,n,H,ns,rate", [
    (1, 1, 1, 3, 1),          # one query, three keys of each kind
    (2, 113, 3, 239, 2),      # partial query block, partial key tiles in both sources
    (1, 239, 2, 64, 1),       # whole key tiles, two query blocks
    (3, 333, 2, 301, 7),      # odd everything
    (16, 512, 8, 512, 2),     # the benchmark shapes
    (8, 768, 8, 768, 3),
    (20, 333, 8, 301, 7),     # several items per persistent block, partial tiles
])
def test_recon_loss_sm90_matches_reference(B, n, H, ns, rate, dtype):
    check_against_reference(sm90_recon_loss, reference.attention_reconstruction_loss,
                            _recon_inputs(B, n, H, 128, ns, rate, seed=n), dtype, grad_of=(3, 4))


@SM90
@pytest.mark.parametrize("config", recon_module.SM90_CONFIGS)
@pytest.mark.parametrize("B,n,H,ns,rate", [
    (2, 113, 3, 239, 2), (2, 300, 2, 130, 3), (1, 1, 1, 3, 1),
    (24, 239, 8, 130, 3),  # several items per persistent block
    (64, 65, 8, 3, 1),     # several items of fewer key tiles than K/V stages
])
def test_recon_loss_sm90_saves_what_the_triton_forward_saves(B, n, H, ns, rate, config):
    """Every launch configuration: the loss follows the error rule, and diff, lse and delta,
    which feed either backward, agree with the Triton forward's (every element written:
    the buffers are NaN-poisoned)."""
    exact = _recon_inputs(B, n, H, 128, ns, rate, seed=21)
    tensors = [t.to(torch.bfloat16) for t in exact]
    cuda = recon_module.recon_loss_forward_sm90(*tensors, None, True, config=config)
    triton = recon_module.recon_loss_forward(*tensors, None, True)
    error, allowed = testing.error_rule(
        cuda[0], reference.attention_reconstruction_loss(*tensors),
        reference.attention_reconstruction_loss(*(t.double() for t in exact)), 2)
    assert error <= allowed, f"loss: error {error:.3g} > allowed {allowed:.3g}"
    # diff: a bf16 step at values up to 2; delta sums 128 such products
    for name, got, expected, tol in zip(("diff", "lse", "delta"), cuda[1:], triton[1:],
                                        (8e-3, 1e-4, 2e-2)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol, msg=name)


@SM90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,n,H,ns,rate", [
    (1, 1, 1, 3, 1),      # one query, three compressed keys
    (2, 113, 3, 239, 2),  # partial query tile; 119 keys: the second warpgroup's keys partial
    (1, 239, 2, 130, 1),  # two key blocks, the second with two keys (one warpgroup idle)
    (3, 333, 2, 301, 7),  # odd everything
    (2, 200, 2, 520, 2),  # three key blocks, more query tiles than ring stages
])
def test_recon_loss_sm90_backward_matches_triton(B, n, H, ns, rate, dtype):
    """The sm_90 backward against the Triton backward on the same saved tensors (every
    element written: the buffers are NaN-poisoned). The error rule against the float64
    reference is checked through the op in test_recon_loss_sm90_matches_reference."""
    tensors = [t.to(dtype) for t in _recon_inputs(B, n, H, 128, ns, rate, seed=31)]
    q, _, _, comp_k, comp_v = tensors
    _, *saved = recon_module.recon_loss_forward(*tensors, None, True)
    grad = torch.tensor(float(min(q.numel(), 2 ** 14)), dtype=dtype, device="cuda")
    cuda = recon_module.recon_loss_backward_sm90(grad, q, comp_k, comp_v, *saved, None)
    triton = recon_module.recon_loss_backward(grad, q, comp_k, comp_v, *saved, None)
    for name, got, expected in zip(("d comp_k", "d comp_v"), cuda, triton):
        assert got.shape == comp_k.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        # both round the same fp32 probabilities to the input type; sums run in other orders
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=1e-2 * scale,
                                   msg=name)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=SM90)])
def test_recon_loss_without_grad_writes_only_partials(monkeypatch, backend):
    allocated = []
    empty = recon_module._empty
    monkeypatch.setattr(recon_module, "_empty",
                        lambda shape, dtype, device: allocated.append(shape) or empty(shape, dtype, device))
    tensors = _recon_inputs(2, 130, 2, 128, 70, 2, seed=8)
    dtype = torch.float16 if backend == "cuda" else torch.float32
    block_m = recon_module.SM90_CONFIG[0] if backend == "cuda" else recon_module._fwd_config(128, dtype)[0]
    with torch.no_grad():
        loss = ct_kernels.attention_reconstruction_loss(*(t.to(dtype) for t in tensors), backend=backend)
    assert allocated == [(2 * 2 * recon_module.cdiv(130, block_m),)]  # one partial sum per program
    expected = reference.attention_reconstruction_loss(*(t.double() for t in tensors))
    assert abs(loss.item() - expected.item()) <= (2e-3 if backend == "cuda" else 1e-5) * expected.item()


@SM90
@pytest.mark.parametrize("offset", [0, 1])  # 1: rows not 16-byte aligned (copied first)
def test_recon_loss_sm90_strided_inputs_and_scale(offset):
    B, n, H, D, nc = 2, 70, 2, 128, 33
    packed = _randn(B * n * 3 * H * D + offset, seed=11).bfloat16()[offset:]
    q = packed.view(B, n, 3, H, D)[:, :, 1]  # one third of a packed projection
    old = _randn(B, 90, 2, H, D, seed=12).bfloat16()
    comp = _randn(B, nc, 2, H, D, seed=13).bfloat16().requires_grad_()
    (old_k, old_v), (comp_k, comp_v) = old.unbind(2), comp.unbind(2)
    loss = ct_kernels.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, scale=0.3,
                                                    backend="cuda")
    (grad,) = torch.autograd.grad(loss, comp)
    exact = [t.double() for t in (q, old_k, old_v)] + [comp.double().detach().requires_grad_()]
    expected = reference.attention_reconstruction_loss(*exact[:3], *exact[3].unbind(2), scale=0.3)
    (expected_grad,) = torch.autograd.grad(expected, exact[3])
    assert abs(loss.double() - expected).item() <= 1e-2 * expected.item()
    assert (grad.double() - expected_grad).abs().max() <= 2e-2 * expected_grad.abs().max()


@SM90
def test_recon_loss_auto_runs_the_sm90_forward_where_it_applies():
    device = torch.device("cuda")
    for dtype, D, expected in ((torch.bfloat16, 128, "attention_reconstruction_loss_sm90"),
                               (torch.float16, 128, "attention_reconstruction_loss_sm90"),
                               (torch.bfloat16, 64, "attention_reconstruction_loss"),
                               (torch.float32, 128, "attention_reconstruction_loss")):
        impl = dispatch.resolve("recon_loss", "auto", device, dtype=dtype, head_dim=D)
        assert impl.__name__ == expected, (dtype, D, impl.__name__)
    with pytest.raises(ValueError, match="head dim 64"):
        sm90_recon_loss(*(t.bfloat16() for t in _recon_inputs(1, 4, 1, 64, 4, 2)))


@SM90
def test_recon_loss_sm90_compiles_fullgraph():
    tensors = [t.bfloat16().requires_grad_(i >= 3) for i, t in
               enumerate(_recon_inputs(2, 100, 2, 128, 96, 3, seed=17))]
    compiled = torch.compile(sm90_recon_loss, fullgraph=True)
    results = []
    for fn in (compiled, sm90_recon_loss):
        loss = fn(*tensors)
        results.append((loss, *torch.autograd.grad(loss, tensors[3:])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


@SM90
def test_recon_loss_sm90_op_names_bad_arguments():
    q, old_k, old_v, comp_k, comp_v = (t.bfloat16() for t in _recon_inputs(1, 5, 1, 128, 6, 2))
    partial = torch.empty(1, device="cuda")
    none = [torch.empty(0, device="cuda")] * 3
    op = torch.ops.ct_kernels.recon_loss_fwd_sm90
    with pytest.raises(RuntimeError, match=r"comp_k must be \[B, S, H, 128\]"):
        op(q, old_k, old_v, comp_k[..., :64], comp_v, 0.1, partial, *none, False, 128, 64, 3)
    with pytest.raises(RuntimeError, match="old_v must be a .*BFloat16 tensor"):
        op(q, old_k, old_v.half(), comp_k, comp_v, 0.1, partial, *none, False, 128, 64, 3)
    with pytest.raises(RuntimeError, match=r"partial must be a contiguous Float tensor of shape \[1\]"):
        op(q, old_k, old_v, comp_k, comp_v, 0.1, torch.empty(2, device="cuda"), *none, False, 128, 64, 3)
    with pytest.raises(RuntimeError, match=r"\(block_m, block_n, stages\) must be .*, got \(64, 128, 3\)"):
        op(q, old_k, old_v, comp_k, comp_v, 0.1, partial, *none, False, 64, 128, 3)


@SM90
def test_recon_loss_sm90_backward_op_names_bad_arguments():
    q, _, _, comp_k, comp_v = (t.bfloat16() for t in _recon_inputs(1, 5, 1, 128, 6, 2))
    diff = torch.randn_like(q)
    lse, delta = torch.randn(2, 1, 1, 5, device="cuda").unbind(0)
    grad = torch.ones((), dtype=torch.bfloat16, device="cuda")
    out = [torch.empty_like(comp_k), torch.empty_like(comp_k)]
    op = torch.ops.ct_kernels.recon_loss_bwd_sm90
    with pytest.raises(RuntimeError, match=r"recon_loss_bwd_sm90: comp_v must be \[B, S, H, 128\]"):
        op(grad, q, comp_k, comp_v[..., :64], diff, lse, delta, 0.1, *out)
    with pytest.raises(RuntimeError, match=r"lse must be a contiguous Float tensor of shape \[1, 1, 5\]"):
        op(grad, q, comp_k, comp_v, diff, lse[..., :4], delta, 0.1, *out)
    with pytest.raises(RuntimeError, match=r"grad_loss must be a contiguous BFloat16 tensor of shape \[\]"):
        op(grad.float(), q, comp_k, comp_v, diff, lse, delta, 0.1, *out)
    with pytest.raises(RuntimeError,
                       match=r"d_comp_v must be a contiguous BFloat16 tensor of shape \[1, 3, 1, 128\]"):
        op(grad, q, comp_k, comp_v, diff, lse, delta, 0.1, out[0], out[1][:, :2])


# ------------------------------------------------------------------ auto-encoding loss
def _autoencoding_inputs(B, ns, d, rate, d_comp, bias, seed=0):
    """old [B, ns, d], compressed [B, ns // rate, d_comp], dec_weight, dec_bias (float32)."""
    tensors = [_randn(B, ns, d, seed=seed), _randn(B, ns // rate, d_comp, seed=seed + 1),
               _randn(d_comp, d, rate, seed=seed + 2) * d_comp ** -0.5]
    return tensors + [_randn(d, seed=seed + 3)] if bias else tensors


def triton_autoencoding_loss(*tensors):
    return ct_kernels.autoencoding_loss(*tensors, backend="triton")


def check_autoencoding(B, ns, d, rate, d_comp, bias, dtype, seed=0):
    tensors = _autoencoding_inputs(B, ns, d, rate, d_comp, bias, seed)
    check_against_reference(triton_autoencoding_loss, reference.autoencoding_loss, tensors,
                            dtype, grad_of=tuple(range(1, len(tensors))))


@CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,ns,d,rate,d_comp,bias", [
    (1, 3, 16, 3, 8, True),       # a single compressed slot
    (2, 12, 20, 3, 24, False),    # odd widths, no bias
    (3, 200, 48, 2, 40, True),    # rows and depth past one tile (128 rows, 32/64 deep)
])
def test_autoencoding_loss_interpreter(B, ns, d, rate, d_comp, bias, dtype):
    check_autoencoding(B, ns, d, rate, d_comp, bias, dtype)


def test_autoencoding_loss_old_gets_no_gradient():
    old, compressed, weight, bias = (t.requires_grad_() for t in
                                     _autoencoding_inputs(2, 6, 16, 2, 8, True, seed=4))
    triton_autoencoding_loss(old, compressed, weight, bias).backward()
    assert old.grad is None
    assert compressed.grad is not None and weight.grad is not None and bias.grad is not None


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autoencoding_loss_gpu(dtype):
    check_autoencoding(8, 768, 1024, 3, 1024, True, dtype)


def test_autoencoding_loss_without_grad_writes_no_residual(monkeypatch):
    allocated = []
    empty = ae_module._empty
    monkeypatch.setattr(ae_module, "_empty",
                        lambda shape, dtype, device: allocated.append(shape) or empty(shape, dtype, device))
    tensors = _autoencoding_inputs(2, 8, 16, 4, 12, True, seed=8)
    with torch.no_grad():
        loss = triton_autoencoding_loss(*tensors)
    assert len(allocated) == 1  # only the per-program partial sums
    expected = reference.autoencoding_loss(*(t.double() for t in tensors))
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
