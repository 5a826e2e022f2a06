"""Triton compressive attention (ct_kernels/ops/attention.py) against the reference.

Every comparison uses the error rule of ct_kernels.testing: the kernel's error against the
float64 reference may be at most 2x (gradients 3x) the error of the reference run at the
kernel's dtype. Kernel outputs are NaN-poisoned before the kernels write them. Without a
GPU the kernels run in Triton's CPU interpreter at small shapes; real shapes run on GPU.
"""
import types

import pytest
import torch

import ct_kernels
from ct_kernels import dispatch, reference, testing
from ct_kernels.ops import attention

pytestmark = pytest.mark.skipif("triton" not in ct_kernels.available_backends(),
                                reason="Triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def empty(shape, dtype, device):
        return testing.poison_(torch.empty(shape, dtype=dtype, device=device))
    monkeypatch.setattr(attention, "_empty", empty)


def _leaves(args):
    """name -> tensor for every differentiable input (rel_pos expanded to r, u, v)."""
    leaves = {k: t for k, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if args.get("rel_pos") is not None:
        leaves.update(zip(("r", "u", "v_bias"), args["rel_pos"]))
    return leaves


def _cast(args, dtype):
    """A copy of the inputs in ``dtype`` (float tensors only), as fresh leaves."""
    cast = lambda t: t.detach().to(dtype).requires_grad_(True)  # noqa: E731
    out = {k: (cast(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
           for k, t in args.items()}
    if args.get("rel_pos") is not None:
        out["rel_pos"] = reference.RelativePosition(*(cast(t) for t in args["rel_pos"]))
    return out


def check(args, *, grads=True, usage=False, **options):
    """Forward (and gradients, usage) of the Triton backend vs the reference, error rule."""
    dtype = args["q"].dtype
    kernel, lowp, exact = _cast(args, dtype), _cast(args, dtype), _cast(args, torch.float64)
    results = {}
    for name, inputs, backend in (("kernel", kernel, "triton"), ("lowp", lowp, "reference"),
                                  ("exact", exact, "reference")):
        results[name] = ct_kernels.compressive_attention(**inputs, **options, backend=backend,
                                                         return_key_usage=usage)
    outs = {k: (r[0] if usage else r) for k, r in results.items()}
    error, allowed = testing.error_rule(outs["kernel"], outs["lowp"], outs["exact"], 2)
    assert error <= allowed, f"output error {error:.3g} > allowed {allowed:.3g}"
    if usage:
        error, allowed = testing.error_rule(results["kernel"][1], results["lowp"][1],
                                            results["exact"][1], 2)
        assert error <= allowed, f"key usage error {error:.3g} > allowed {allowed:.3g}"
    if not grads:
        return
    grad_out = torch.randn(outs["exact"].shape, generator=torch.Generator().manual_seed(11),
                           dtype=torch.float64).to(outs["exact"].device)
    grads = {}
    for name, inputs in (("kernel", kernel), ("lowp", lowp), ("exact", exact)):
        leaves = _leaves(inputs)
        values = torch.autograd.grad(outs[name], list(leaves.values()), grad_out.to(outs[name].dtype))
        grads[name] = dict(zip(leaves, values))
    for leaf, grad in grads["kernel"].items():
        assert grad.shape == grads["exact"][leaf].shape, leaf
        error, allowed = testing.error_rule(grad, grads["lowp"][leaf], grads["exact"][leaf], 3)
        assert error <= allowed, f"d{leaf} error {error:.3g} > allowed {allowed:.3g}"


# ----------------------------------------------------------------------------- small shapes
# (B, n, H, D, m, cm, options): interpreter-sized; the interpreter's tiles are 16 x 16, so
# these cover single and multiple tiles per source, partial tiles and the causal band.
SMALL_CASES = [
    (2, 1, 2, 16, 0, 0, {}),
    (2, 7, 2, 32, 5, 3, {"partial": True}),
    (2, 13, 2, 16, 20, 9, {"partial": True, "padding": True}),
    (1, 37, 1, 16, 0, 17, {"padding": True}),
    (2, 1, 1, 32, 18, 33, {"partial": True}),
    (3, 19, 2, 16, 16, 0, {"partial": True}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n,H,D,m,cm,options", SMALL_CASES)
def test_forward_and_gradients(B, n, H, D, m, cm, options, dtype):
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + cm)
    args = testing.random_attention_inputs(B, n, H, D, m, cm, dtype=dtype, device=DEVICE,
                                           generator=g, **options)
    check(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n,H,D,m,cm,options", [
    (2, 1, 2, 16, 4, 2, {}),
    (2, 13, 1, 32, 7, 5, {"partial": True, "padding": True}),
    (1, 21, 2, 16, 0, 11, {"extra_rows": 29}),  # R well beyond L
])
@pytest.mark.parametrize("stored,kept", [(False, False), (True, False), (True, True)])
def test_relative_positions(B, n, H, D, m, cm, options, dtype, stored, kept):
    """The three backwards: the dQ pass recomputing the scores, the one reading the score
    gradients the dK/dV pass stored (poisoned first: entries it did not write must not be
    read), and that one with the position scores the forward kept (poisoned first too)."""
    g = torch.Generator().manual_seed(7 + n)
    args = testing.random_attention_inputs(B, n, H, D, m, cm, dtype=dtype, device=DEVICE,
                                           generator=g, rel_pos=True, **options)
    check(args, store_score_grads=stored, store_position_scores=kept)


def test_stored_position_scores_are_kept_for_a_backward_only(monkeypatch):
    # the forward keeps its position scores only where a backward will read them, and that
    # backward overwrites them: a second backward of the same graph fails instead of reading
    # score gradients as position scores
    g = torch.Generator().manual_seed(5)
    a = testing.random_attention_inputs(2, 9, 2, 16, 5, 3, device=DEVICE, generator=g,
                                        rel_pos=True)
    kept = []
    pos_scores = attention._Call.pos_scores
    monkeypatch.setattr(attention._Call, "pos_scores",
                        lambda self: kept.append(pos_scores(self)) or kept[-1])
    run = lambda **kw: ct_kernels.compressive_attention(  # noqa: E731
        **kw, backend="triton", store_score_grads=True, store_position_scores=True)
    run(**a)
    assert not kept  # nothing requires a gradient
    a["q"].requires_grad_(True)
    with torch.no_grad():  # nor here, traced
        torch.compile(lambda: run(**a), fullgraph=True)()
    assert not kept
    out = run(**a)
    assert len(kept) == 1
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("rel_pos", [False, True])
@pytest.mark.parametrize("D", [8, 24, 80, 256])
def test_head_dims_padded_to_a_power_of_two(D, rel_pos):
    """Head dims other than 16/32/64/128 run on tiles padded to a power of two (masked head-dim
    columns); 256 is the largest."""
    g = torch.Generator().manual_seed(D)
    args = testing.random_attention_inputs(2, 17, 2, D, 9, 5, dtype=torch.bfloat16,
                                           device=DEVICE, generator=g, partial=True,
                                           padding=True, rel_pos=rel_pos)
    check(args, usage=True)


@pytest.mark.parametrize("rel_pos", [False, True])
def test_float16_and_custom_scale(rel_pos):
    """float16 (relative positions: the position band travels as fp32 pairs)."""
    g = torch.Generator().manual_seed(3)
    args = testing.random_attention_inputs(2, 19, 2, 32, 6, 4, dtype=torch.float16,
                                           device=DEVICE, generator=g, partial=True,
                                           rel_pos=rel_pos)
    check(args, scale=0.3)


def test_not_causal():
    g = torch.Generator().manual_seed(4)
    args = testing.random_attention_inputs(2, 11, 1, 16, 5, 0, device=DEVICE, generator=g,
                                           padding=True)
    check(args, causal=False)


def test_relative_positions_under_autocast():
    """Under bfloat16 autocast (as the model's training step calls it) the output and the key
    usage with relative positions are those of the same call without it: w = (v - u).r stays
    fp32 (autocast would run its product in bfloat16)."""
    g = torch.Generator().manual_seed(6)
    args = testing.random_attention_inputs(2, 37, 2, 64, 20, 12, dtype=torch.bfloat16,
                                           device=DEVICE, generator=g, partial=True, rel_pos=True)
    call = lambda: ct_kernels.compressive_attention(**args, backend="triton",  # noqa: E731
                                                    return_key_usage=True)
    want = call()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        got = call()
    for name, a, b in zip(("output", "key usage"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("rel_pos", [False, True])
def test_key_usage(rel_pos):
    g = torch.Generator().manual_seed(5)
    args = testing.random_attention_inputs(2, 13, 3, 16, 10, 18, device=DEVICE, generator=g,
                                           partial=True, padding=True, rel_pos=rel_pos)
    check(args, grads=False, usage=True)


def test_rows_without_keys_give_zero_output_and_gradient():
    # sample 0: empty memories and every segment key padded, so no query sees any key
    g = torch.Generator().manual_seed(6)
    args = testing.random_attention_inputs(2, 5, 2, 16, 4, 3, device=DEVICE, generator=g,
                                           requires_grad=True)
    args["mem_lens"] = torch.tensor([0, 4], device=DEVICE)
    args["cmem_lens"] = torch.tensor([0, 1], device=DEVICE)
    pad = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    pad[0] = True
    pad[1, 2] = True
    args["key_padding_mask"] = pad
    out, usage = ct_kernels.compressive_attention(**args, backend="triton", return_key_usage=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(usage[0], torch.zeros_like(usage[0]))
    out.sum().backward()
    for name in ("q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v"):
        grad = args[name].grad
        assert torch.isfinite(grad).all(), name
        assert torch.equal(grad[0], torch.zeros_like(grad[0])), name
    check({k: t for k, t in args.items()})


def test_strided_inputs_are_read_in_place():
    # k/v split from one fused projection, memories stored [B, H, S, D] and transposed
    g = torch.Generator().manual_seed(8)
    B, n, H, D, m, cm = 2, 9, 2, 16, 6, 5
    kv = torch.randn(B, n, H, 2 * D, generator=g).to(DEVICE)
    mem = torch.randn(B, H, m, 2 * D, generator=g).to(DEVICE).transpose(1, 2)
    cmem = torch.randn(2, B, H, cm, D, generator=g).to(DEVICE).transpose(2, 3)
    args = dict(q=torch.randn(B, n, H, D, generator=g).to(DEVICE),
                k=kv[..., :D], v=kv[..., D:], mem_k=mem[..., :D], mem_v=mem[..., D:],
                cmem_k=cmem[0], cmem_v=cmem[1], mem_lens=torch.tensor([3, 6], device=DEVICE))
    assert not args["k"].is_contiguous() and not args["mem_k"].is_contiguous()
    check(args)


@pytest.mark.parametrize("rel_pos", [False, True])
def test_backward_run_twice_gives_the_same_gradients(rel_pos):
    # the eager backward reuses the forward's view of the call once, then rebuilds it
    args = testing.random_attention_inputs(2, 7, 2, 16, 5, 6, device=DEVICE, partial=True,
                                           rel_pos=rel_pos, requires_grad=True)
    leaves = list(_leaves(args).values())
    out = ct_kernels.compressive_attention(**args, backend="triton")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)  # relative positions: fp32 atomics, any order


def test_unsupported_inputs_are_named():
    q = torch.randn(1, 4, 1, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 264"):
        ct_kernels.compressive_attention(q, q, q, backend="triton")
    q200 = q[..., :200]
    with pytest.raises(ValueError, match="float32 with head dim 200"):
        ct_kernels.compressive_attention(q200, q200, q200, backend="triton")
    ct_kernels.compressive_attention(q200.bfloat16(), q200.bfloat16(), q200.bfloat16(),
                                     backend="triton")  # 16-bit inputs: up to 256
    q64 = q[..., :16].double()
    with pytest.raises(ValueError, match="dtype"):
        ct_kernels.compressive_attention(q64, q64, q64, backend="triton")
    # "auto" falls back to the reference for them
    out = ct_kernels.compressive_attention(q, q, q)
    assert torch.allclose(out, reference.compressive_attention(q, q, q))


@pytest.mark.parametrize("stored,kept", [(False, False), (True, False), (True, True)])
def test_custom_op_registration(stored, kept):
    g = torch.Generator().manual_seed(9)
    a = testing.random_attention_inputs(1, 5, 1, 16, 3, 2, device=DEVICE, generator=g,
                                        rel_pos=True, requires_grad=True)
    args = (a["q"], a["k"], a["v"], a["mem_k"], a["mem_v"], a["cmem_k"], a["cmem_v"], None, None,
            None, *a["rel_pos"], True, 0.25, stored, kept)
    torch.library.opcheck(attention.attention_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------- GPU shapes
@GPU
@pytest.mark.parametrize("n,m,cm,D,dtype", [
    (1, 64, 96, 64, torch.float16), (1, 0, 0, 128, torch.bfloat16),
    (113, 113, 0, 32, torch.bfloat16), (239, 0, 0, 128, torch.float16),
    (239, 256, 384, 64, torch.bfloat16), (1023, 512, 333, 128, torch.bfloat16),
    (1023, 0, 1023, 32, torch.float16), (239, 113, 256, 96, torch.bfloat16),
    (113, 64, 0, 256, torch.bfloat16), (512, 512, 512, 256, torch.float16),
    (113, 40, 17, 24, torch.float16), (239, 0, 100, 80, torch.bfloat16),
])
def test_gpu_shapes(n, m, cm, D, dtype):
    g = torch.Generator().manual_seed(n + m + cm + D)
    args = testing.random_attention_inputs(2, n, 3, D, m, cm, dtype=dtype, device="cuda",
                                           generator=g, partial=True, padding=n > 1)
    check(args, usage=True)


@GPU
@pytest.mark.parametrize("n,m,cm,D,dtype", [
    (1, 32, 64, 64, torch.bfloat16), (239, 113, 256, 128, torch.bfloat16),
    (512, 512, 0, 32, torch.bfloat16), (239, 113, 256, 128, torch.float16),
    (239, 113, 256, 96, torch.bfloat16), (113, 64, 40, 256, torch.bfloat16),
    (113, 40, 17, 24, torch.float16), (239, 0, 100, 80, torch.bfloat16),
])
@pytest.mark.parametrize("stored,kept", [(False, False), (True, False), (True, True)])
def test_gpu_relative_positions(n, m, cm, D, dtype, stored, kept):
    g = torch.Generator().manual_seed(n + D)
    args = testing.random_attention_inputs(2, n, 2, D, m, cm, dtype=dtype,
                                           device="cuda", generator=g, partial=True,
                                           rel_pos=True)
    check(args, store_score_grads=stored, store_position_scores=kept)


@GPU
def test_gpu_float32():
    g = torch.Generator().manual_seed(10)
    args = testing.random_attention_inputs(2, 239, 2, 64, 100, 50, device="cuda", generator=g,
                                           partial=True, padding=True, rel_pos=True)
    check(args)


# ----------------------------------------------------------------------------- sm_90 kernels
def _sm90_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not attention._sm90_loaded():
        return "ct_kernels._C was built without attention_fwd_sm90 / attention_bwd_sm90"
    if not dispatch.on_sm90():
        return "needs a Hopper GPU (compute capability 9.0)"
    return None


SM90 = pytest.mark.skipif(_sm90_reason() is not None, reason=f"sm_90 kernels: {_sm90_reason()}")


def _fail_if_called(monkeypatch, names, what):
    """The launchers `names` of the attention module raise instead of launching."""
    def fail(*_args, **_kwargs):
        raise AssertionError(f"{what} ran")
    for name in names:
        monkeypatch.setattr(attention, name, fail)


@pytest.fixture
def sm90_only(monkeypatch):
    """The Triton forward and backward passes fail if called: a test passes through the sm_90
    kernels only."""
    _fail_if_called(monkeypatch, ("_launch_fwd", "_launch_dq", "_launch_dkdv"),
                    "a Triton attention pass")


@pytest.mark.parametrize("D,dtype,rel_pos,causal,padding,forward,backward", [
    (128, torch.bfloat16, False, True, False, True, True),
    (64, torch.float16, False, False, False, True, False),
    (32, torch.bfloat16, False, True, False, False, False),
    (256, torch.float16, False, True, False, False, False),
    (128, torch.float32, False, True, False, False, False),
    (128, torch.bfloat16, True, True, False, True, False),
    (64, torch.bfloat16, True, True, False, True, False),
    (128, torch.float16, True, True, False, False, False),
    (128, torch.bfloat16, True, False, False, False, False),
    (128, torch.bfloat16, False, True, True, False, False),
])
def test_sm90_dispatch(monkeypatch, D, dtype, rel_pos, causal, padding, forward, backward):
    # which calls the sm_90 kernels take: 16-bit inputs without key padding, the forward at
    # D = 64 and 128 (with relative positions: bfloat16, causal), the backward at 128 without
    # relative positions (the extension and the Hopper GPU stubbed present)
    monkeypatch.setattr(attention, "_sm90_loaded", lambda: True)
    monkeypatch.setattr(dispatch, "on_sm90", lambda: True)
    call = types.SimpleNamespace(query=types.SimpleNamespace(is_cuda=True), dtype=dtype, D=D,
                                 flags=dict(REL_POS=rel_pos, CAUSAL=causal, HAS_PAD=padding))
    forward_heads = attention.SM90_FORWARD_HEAD_DIMS
    backward_heads = attention.SM90_BACKWARD_HEAD_DIMS
    assert attention._sm90_applies(call, True, forward_heads, rel_pos=True) == forward
    assert attention._sm90_applies(call, True, backward_heads) == backward
    assert not attention._sm90_applies(call, False, forward_heads, rel_pos=True)
    if rel_pos:  # a kernel without relative positions never takes them
        assert not attention._sm90_applies(call, True, forward_heads)
    monkeypatch.setattr(dispatch, "on_sm90", lambda: False)
    assert not attention._sm90_applies(call, True, forward_heads, rel_pos=True)


@SM90
@pytest.mark.parametrize("n,m,cm,dtype,partial,causal", [
    (1, 0, 0, torch.bfloat16, False, True), (1, 64, 96, torch.float16, True, True),
    (113, 113, 0, torch.bfloat16, True, True), (239, 0, 0, torch.float16, False, True),
    (239, 256, 384, torch.bfloat16, True, True), (512, 512, 1024, torch.bfloat16, False, True),
    (1023, 512, 333, torch.bfloat16, True, True), (239, 113, 256, torch.float16, True, False),
    (200, 0, 129, torch.bfloat16, False, False), (64, 1, 0, torch.bfloat16, True, True),
    (130, 300, 0, torch.float16, False, True),
])
def test_sm90_matches_reference(sm90_only, n, m, cm, dtype, partial, causal):
    # one query; partial query tiles; memories empty, partial (lens 0 and full included),
    # shorter than a key tile and spanning several; causal and not
    g = torch.Generator().manual_seed(n + 3 * m + 7 * cm)
    args = testing.random_attention_inputs(2, n, 3, 128, m, cm, dtype=dtype, device="cuda",
                                           generator=g, partial=partial)
    check(args, causal=causal)


@pytest.fixture
def sm90_forward(monkeypatch):
    """The Triton forward fails if called: a test's forward runs on the sm_90 kernel (its
    gradients on whichever backward applies)."""
    _fail_if_called(monkeypatch, ("_launch_fwd",), "the Triton forward")


@SM90
@pytest.mark.parametrize("n,m,cm,dtype,partial,causal", [
    (1, 0, 0, torch.bfloat16, False, True), (113, 113, 40, torch.float16, True, True),
    (239, 256, 384, torch.bfloat16, True, True), (512, 512, 1024, torch.bfloat16, False, True),
    (200, 70, 0, torch.float16, True, False),
])
def test_sm90_forward_head_dim_64(sm90_forward, n, m, cm, dtype, partial, causal):
    # the sm_90 forward at D = 64 (its gradients from the Triton backward and the LSE it saved)
    g = torch.Generator().manual_seed(n + 5 * m + 3 * cm)
    args = testing.random_attention_inputs(2, n, 3, 64, m, cm, dtype=dtype, device="cuda",
                                           generator=g, partial=partial)
    check(args, causal=causal)


@SM90
@pytest.mark.parametrize("n,m,cm,D,partial,extra_rows", [
    (1, 0, 0, 128, False, 3), (1, 64, 96, 64, True, 0), (113, 113, 0, 128, True, 3),
    (239, 0, 0, 64, False, 3), (239, 256, 384, 128, True, 200), (512, 512, 512, 128, False, 0),
    (1023, 512, 333, 128, True, 3), (200, 70, 129, 64, True, 65), (64, 1, 0, 128, True, 3),
])
@pytest.mark.parametrize("store_score_grads", [False, True])
def test_sm90_forward_relative_positions(sm90_forward, n, m, cm, D, partial, extra_rows,
                                         store_score_grads):
    # the sm_90 forward with relative positions (bfloat16): sources whose first tiles are not
    # 64 apart in distance (cm, m not multiples of 64, skipped invalid tiles), R > L and
    # R = L, one query; gradients from the Triton backward and the LSE it saved (and, with
    # store_score_grads, the position scores it kept)
    g = torch.Generator().manual_seed(n + 7 * m + 3 * cm + D)
    args = testing.random_attention_inputs(2, n, 3, D, m, cm, dtype=torch.bfloat16,
                                           device="cuda", generator=g, partial=partial,
                                           rel_pos=True, extra_rows=extra_rows)
    check(args, store_score_grads=store_score_grads, store_position_scores=store_score_grads)


@pytest.fixture
def sm90_relpos_backward(monkeypatch):
    """The Triton dK/dV and dQ passes fail if called: a backward with relative positions and
    stored score gradients runs on the sm_90 kernel."""
    _fail_if_called(monkeypatch, ("_launch_dq", "_launch_dkdv", "_launch_delta",
                                  "_launch_dq_stored"), "a Triton dK/dV or dQ pass")


@SM90
@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("n,m,cm,partial,extra_rows", [
    (1, 0, 0, False, 3), (1, 64, 96, True, 0), (113, 113, 0, True, 3), (64, 1, 0, True, 3),
    (239, 256, 384, True, 200), (200, 70, 129, True, 65), (512, 512, 1024, False, 0),
    (1023, 512, 333, True, 3),
])
def test_sm90_backward_with_stored_score_grads(sm90_forward, sm90_relpos_backward, n, m, cm,
                                               partial, extra_rows, kept):
    # store_score_grads with relative positions: the sm_90 backward reading the position
    # scores by key, those the sm_90 forward kept or those scored for it (both NaN-poisoned
    # first, as are the gradients by distance), then the products over the distances: one
    # query, sources not 64 apart in distance, partial memories (empty and full included),
    # partial query tiles, R > L
    g = torch.Generator().manual_seed(n + 5 * m + 11 * cm)
    args = testing.random_attention_inputs(2, n, 3, 128, m, cm, dtype=torch.bfloat16,
                                           device="cuda", generator=g, partial=partial,
                                           rel_pos=True, extra_rows=extra_rows)
    check(args, store_score_grads=True, store_position_scores=kept)


@pytest.mark.parametrize("m,cm,partial", [(7, 5, True), (0, 11, False), (6, 0, True)])
def test_clear_unwritten_distances(m, cm, partial):
    # the zeros that the products over the distances need where the sm_90 backward writes no
    # score gradient (keys before the first; memory slots before the valid ones), over the
    # distances d < L; every other entry keeps what it had
    B, n, H, D = 2, 9, 2, 16
    g = torch.Generator().manual_seed(m + cm)
    a = testing.random_attention_inputs(B, n, H, D, m, cm, device=DEVICE, generator=g,
                                        partial=partial, rel_pos=True)
    names = ("q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v", "mem_lens", "cmem_lens")
    c = attention._Call(*(a.get(name) for name in names), None, *a["rel_pos"], True, D**-0.5)
    L, columns = cm + m + n, c.score_grad_columns[0]
    grads = torch.full((H, B * n, columns), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    attention._clear_unwritten_distances(c, grads, L)
    rows = torch.arange(B * n, device=DEVICE)
    b, i, d = rows // n, rows % n, torch.arange(columns, device=DEVICE)
    j = (cm + m + i)[:, None] - d[None, :]
    lo = lambda lens, size: (size - a[lens][b] if lens in a else 0 * b)[:, None]  # noqa: E731
    unwritten = ((j < 0) | (j < lo("cmem_lens", cm))
                 | ((j >= cm) & (j < cm + lo("mem_lens", m)))) & (d < L)[None, :]
    assert unwritten.any() and not unwritten.all()
    for head in grads:
        assert torch.equal(head == 0, unwritten)
        assert torch.equal(head.isnan(), ~unwritten)


def test_position_part():
    # dQ from its content part as the sm_90 backward leaves it (fp32 sums, unscaled, per
    # 64-query tile two [64, 64] column halves in its threads' order; rows past n hold
    # padding: NaN here) and its position part ([H, B n, D] fp32), in dQ's layout and dtype,
    # and the row sums of each part (the gradients of u and v)
    B, n, H, D, scale = 2, 70, 3, 128, 0.125
    tiles_m = -(-n // 64)
    g = torch.Generator().manual_seed(3)
    content = torch.randn(B, H, tiles_m * 64, D, generator=g)
    content[:, :, n:] = float("nan")
    # rows 16 warp + 8 half_row + row, columns 64 half + 8 i + 2 pair + e; a thread (warp,
    # row, pair) adds float4 i: (half_row, e) of each
    accum = content.view(B * H, tiles_m, 4, 2, 8, 2, 8, 4, 2).permute(0, 1, 5, 6, 2, 4, 7, 3, 8)
    accum = accum.reshape(-1).to(DEVICE)
    position = torch.randn(H, B * n, D, generator=g).to(DEVICE)
    dq = testing.poison_(torch.empty(B, n, H, D, dtype=torch.bfloat16, device=DEVICE))
    du, dv = attention._position_part(accum, position, dq, scale)
    content = scale * content[:, :, :n].to(DEVICE).transpose(1, 2)  # [B, n, H, D]
    position = position.view(H, B, n, D).permute(1, 2, 0, 3)
    # (one rounding to bfloat16: the interpreter's may truncate)
    torch.testing.assert_close(dq.float(), content + position, rtol=2**-7, atol=0)
    torch.testing.assert_close(du, content.sum((0, 1)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dv, position.sum((0, 1)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_biased_queries(dtype):
    # q + u and q + v in one pass, from a q with strides (a slice of a fused projection),
    # bit for bit as torch rounds them (the interpreter's bfloat16 conversion may truncate:
    # there within one rounding)
    B, n, H, D = 2, 37, 3, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, n, H, 3 * D, generator=g).to(DEVICE, dtype)
    u, v = (torch.randn(H, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    q = qkv[..., D:2 * D]
    c = attention._Call(q, q, q, None, None, None, None, None, None, None,
                        torch.randn(H, n, D, generator=g).to(DEVICE, dtype), u, v, True, 0.1)
    query_u, query_v = attention._biased_queries(c)
    assert query_u.is_contiguous() and query_v.is_contiguous()
    for got, want in ((query_u, q + u), (query_v, q + v)):
        if dtype == torch.bfloat16 and dispatch.triton_interpreted():
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
        else:
            assert torch.equal(got, want)


@SM90
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_forward_relative_positions_unaligned_biases(sm90_forward, D):
    # u and v views that start 2 bytes into their buffers: the op copies them for its 16-byte
    # (u) and 4-byte (v) loads; the results are those of aligned copies, bit for bit
    B, n, H, m, cm = 2, 239, 3, 113, 256
    g = torch.Generator().manual_seed(D)
    a = testing.random_attention_inputs(B, n, H, D, m, cm, dtype=torch.bfloat16, device="cuda",
                                        generator=g, partial=True, rel_pos=True)
    r, u, v = a.pop("rel_pos")
    unaligned = [torch.empty(H * D + 1, dtype=u.dtype, device="cuda")[1:].view(H, D).copy_(t)
                 for t in (u, v)]
    assert unaligned[0].data_ptr() % 16 != 0 and unaligned[1].data_ptr() % 4 != 0
    aligned, shifted = (ct_kernels.compressive_attention(**a, rel_pos=ct_kernels.RelativePosition(r, *b))
                        for b in ((u, v), unaligned))
    assert torch.equal(shifted, aligned)


def _check_position_scores_by_key(a, call, kept, name):
    """kept ([B * H, n, columns] by key, ``pos_scores_layout``) holds (q_i + v).r_d as added,
    rounded to bfloat16, wherever a query sees the key (valid memory slots and segment keys up
    to the query), within the rounding of the query sum and of the result:
    |error| <= 2^-8 (|s| + |q_i + v|.|r_d|), twice their bounds."""
    B, n, H, _ = a["q"].shape
    m, cm, device = call.m, call.cm, a["q"].device
    columns, col_m, col_s = call.score_grad_columns
    key = torch.arange(columns, device=device)
    query = torch.arange(n, device=device)[:, None]
    seen = torch.zeros(B, n, columns, dtype=torch.bool, device=device)
    for b in range(B):
        cmem_lo = cm - int(a["cmem_lens"][b]) if "cmem_lens" in a else 0
        mem_lo = m - int(a["mem_lens"][b]) if "mem_lens" in a else 0
        seen[b] = (((key >= cmem_lo) & (key < cm))
                   | ((key >= col_m + mem_lo) & (key < col_m + m))
                   | ((key >= col_s) & (key - col_s <= query)))
    seen = seen.repeat_interleave(H, dim=0)  # [B * H, n, columns]
    # each column's distance to each query: cm + m + i - (the key's position in [cmem | mem |
    # segment])
    r, _, v = a["rel_pos"]
    r = torch.nn.functional.pad(r, (0, 0, 0, max(0, cm + m + n - r.shape[1])))  # d >= R: 0
    position = torch.where(key < col_m, key,
                           torch.where(key < col_s, cm + key - col_m, cm + m + key - col_s))
    distance = (cm + m + query - position).clamp(0, r.shape[1] - 1).expand(B * H, n, columns)

    def by_column(q_plus_v, r):  # [B * H, n, columns] of (q_i + v).r_distance
        scores = torch.einsum("bnhd,hrd->bhnr", q_plus_v, r)
        return scores.reshape(B * H, n, -1).gather(2, distance)

    q_plus_v = a["q"].double() + v.double()
    exact = by_column(q_plus_v, r.double())
    bound = 2**-8 * (exact.abs() + by_column(q_plus_v.abs(), r.double().abs()))
    kept = kept.double()
    assert not kept[seen].isnan().any(), name
    excess = ((kept - exact).abs() - bound)[seen].max()
    assert excess <= 0, (name, excess.item())


@pytest.mark.parametrize("B,n,H,D,m,cm,partial,extra_rows", [
    (2, 1, 2, 32, 0, 40, True, 3), (2, 23, 3, 16, 13, 70, True, 0), (1, 70, 2, 64, 0, 0, False, 5),
    (2, 9, 1, 32, 130, 0, True, 0), (2, 5, 2, 32, 7, 19, False, 2),
])
def test_position_scores_by_key(B, n, H, D, m, cm, partial, extra_rows):
    # the position scores that the sm_90 backward reads, scored in a Triton pass where the
    # forward kept none: R > L and R < L (distances past r score 0), partial, full and empty
    # memories, sources not a tile apart
    g = torch.Generator().manual_seed(n + m + cm)
    a = testing.random_attention_inputs(B, n, H, D, m, cm, dtype=torch.bfloat16,
                                        device=DEVICE, generator=g, partial=partial,
                                        rel_pos=True, extra_rows=extra_rows)
    if extra_rows == 0:  # R < L: r of the first distances only
        a["rel_pos"] = reference.RelativePosition(a["rel_pos"][0][:, :(cm + m + n) // 2],
                                                  *a["rel_pos"][1:])
    names = ("q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v", "mem_lens", "cmem_lens")
    call = attention._Call(*(a.get(name) for name in names), None, *a["rel_pos"], True,
                           D**-0.5)
    query_v = (a["q"] + a["rel_pos"][2]).contiguous()
    kept = attention._position_scores_by_key(call, query_v)
    _check_position_scores_by_key(a, call, kept, "triton")


@SM90
@pytest.mark.parametrize("n,m,cm,D", [(1, 0, 40, 128), (239, 113, 256, 128), (200, 70, 129, 64)])
def test_sm90_forward_keeps_the_position_scores(monkeypatch, n, m, cm, D):
    # the position scores that the sm_90 forward and the Triton forward keep for the backward
    # ((q_i + v).r_d as added, rounded to bfloat16; the sm_90 forward forms q + v, the Triton
    # forward (q + u).r + (v - u).r), wherever a query sees the key, within the rounding of the
    # query sum and of the result: |error| <= 2^-8 (|s| + |q_i + v|.|r_d|), twice their bounds
    monkeypatch.setattr(attention, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    g = torch.Generator().manual_seed(n + m + cm)
    a = testing.random_attention_inputs(2, n, 3, D, m, cm, dtype=torch.bfloat16, device="cuda",
                                        generator=g, partial=True, rel_pos=True)
    call = attention._Call(a["q"], a["k"], a["v"], a.get("mem_k"), a.get("mem_v"),
                           a.get("cmem_k"), a.get("cmem_v"), a.get("mem_lens"),
                           a.get("cmem_lens"), None, *a["rel_pos"], True, D ** -0.5, True,
                           True)
    kept = {}
    triton_forward = attention._launch_fwd

    def no_triton_forward(*_args, **_kwargs):
        raise AssertionError("the Triton forward ran")
    for name, launch in (("sm90", no_triton_forward), ("triton", triton_forward)):
        monkeypatch.setattr(attention, "_launch_fwd", launch)
        monkeypatch.setattr(attention, "SM90_FORWARD", name == "sm90")
        kept[name] = attention._forward_call(call)[2].double()
    for name in ("sm90", "triton"):
        _check_position_scores_by_key(a, call, kept[name], name)


@SM90
@pytest.mark.parametrize("n,m,cm", [(1, 0, 40), (239, 113, 256)])
def test_sm90_forward_key_usage(sm90_only, n, m, cm):
    # the key usage (a Triton pass) from the sm_90 forward's LSE
    g = torch.Generator().manual_seed(n + m)
    args = testing.random_attention_inputs(2, n, 2, 128, m, cm, dtype=torch.bfloat16,
                                           device="cuda", generator=g, partial=True)
    check(args, grads=False, usage=True)


@SM90
def test_sm90_strided_and_unaligned_inputs(sm90_only):
    # k/v from one fused projection, memories stored [B, H, S, D] and transposed, q starting
    # one element into its buffer (not 16-byte aligned: the op copies it)
    g = torch.Generator().manual_seed(21)
    B, n, H, D, m, cm = 2, 150, 2, 128, 70, 200
    dtype = torch.bfloat16
    kv = torch.randn(B, n, H, 2 * D, generator=g).to("cuda", dtype)
    mem = torch.randn(B, H, m, 2 * D, generator=g).to("cuda", dtype).transpose(1, 2)
    cmem = torch.randn(2, B, H, cm, D, generator=g).to("cuda", dtype).transpose(2, 3)
    q = torch.randn(B, n, H, D + 1, generator=g).to("cuda", dtype)[..., 1:]
    args = dict(q=q, k=kv[..., :D], v=kv[..., D:], mem_k=mem[..., :D], mem_v=mem[..., D:],
                cmem_k=cmem[0], cmem_v=cmem[1], mem_lens=torch.tensor([3, 70], device="cuda"))
    assert q.data_ptr() % 16 != 0 and not args["mem_k"].is_contiguous()
    check(args, scale=0.07)


def _expect_messages(op, args, cases):
    """op(*args.values()) runs, and the same call with each change of cases (a dict of
    replaced arguments) raises a RuntimeError whose text matches that case's message."""
    op(*args.values())
    for change, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*{**args, **change}.values())


@SM90
def test_sm90_forward_op_names_bad_arguments():
    B, n, H, D, cm = 2, 70, 2, 128, 40
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, n, H, D, **bf16)
    cmem = torch.randn(B, cm, H, D, **bf16)

    r = torch.randn(H, n + cm, D, **bf16)
    u, v = torch.randn(2, H, D, **bf16)
    args = dict(q=q, k=q, v=q, mem_k=None, mem_v=None, cmem_k=cmem, cmem_v=cmem, mem_lens=None,
                cmem_lens=torch.tensor([0, 40], dtype=torch.int32, device="cuda"), rel_r=None,
                rel_u=None, rel_v=None, rel_scores=None, causal=True, scale=0.1,
                out=torch.empty_like(q), lse=torch.empty(B, H, n, device="cuda"))
    rel = {**args, "rel_r": r, "rel_u": u, "rel_v": v}
    _expect_messages(torch.ops.ct_kernels.attention_fwd_sm90, rel, (
            (dict(rel_v=None), "rel_r, rel_u and rel_v must be given together"),
            (dict(rel_r=r[:, :, :64]), "rel_r must be \\[H, R, D\\] with q's H and D"),
            (dict(rel_r=r.half()), "rel_r must be a BFloat16 tensor"),
            (dict(rel_u=u[:, 1:]), "rel_u must be a contiguous BFloat16 tensor of shape \\[2, 128\\]"),
            (dict(rel_v=v.float()), "rel_v must be a contiguous BFloat16 tensor of shape \\[2, 128\\]"),
            (dict(causal=False), "relative positions need causal=True"),
            (dict(rel_scores=torch.empty(B * H, n, 128 + 127, **bf16)),
             "rel_scores must be a contiguous BFloat16 tensor of shape \\[4, 70, 256\\]")))
    _expect_messages(torch.ops.ct_kernels.attention_fwd_sm90, args, (
            (dict(q=q.half()), "k must be a Half tensor"),
            (dict(v=q[:, :, :, :64]), "v must be \\[B, S, H, 128\\]"),
            (dict(cmem_v=None), "cmem_k and cmem_v must be given together"),
            (dict(rel_scores=torch.empty(B * H, n, 256, **bf16)), "rel_scores needs relative positions"),
            (dict(cmem_lens=torch.tensor([3, 4], device="cuda")), "cmem_lens must be a contiguous int32"),
            (dict(out=torch.empty(B, n + 1, H, D, **bf16)), "out must be a contiguous"),
            (dict(lse=torch.empty(B, H, n, device="cuda", dtype=torch.float64)), "lse must be a contiguous"),
            (dict(q=q[..., :32]), "q must be \\[B, n, H, 64 or 128\\]"),
            (dict(q=q.cpu()), "q must be a CUDA tensor")))


def _sm90_backward(grad_out, sources, out, lse, block_window=0):
    """The sm_90 backward op's gradients (q, k, v, mem_k, mem_v, cmem_k, cmem_v; causal)
    written into NaN-poisoned buffers, its workspace poisoned too (the op zeroes dQ's sums and
    writes delta there)."""
    names = ("q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v")
    grads = [testing.poison_(torch.empty_like(sources[name])) for name in names]
    B, n, H, D = sources["q"].shape
    torch.ops.ct_kernels.attention_bwd_sm90(
        grad_out, **sources, out=out, lse=lse, causal=True, scale=D ** -0.5, dq=grads[0],
        dk=grads[1], dv=grads[2], dmem_k=grads[3], dmem_v=grads[4], dcmem_k=grads[5],
        dcmem_v=grads[6],
        workspace=testing.poison_(attention.sm90_backward_workspace(B, H, n, "cuda")),
        block_window=block_window)
    return grads


@SM90
@pytest.mark.parametrize("D,rel_pos", [(128, False), (64, False), (128, True)])
def test_sm90_block_order_leaves_results_unchanged(D, rel_pos):
    # the kernels run their blocks in windows of batch-heads (sm90.cuh, block_work); 15
    # batch-heads in windows of 1 (batch-head-major), 4 and 7 (a last window of 3, of 1) and
    # of the kernels' own choice: each block's outputs are the same, only dQ's fp32 sums
    # over key blocks may add up in another order
    B, n, H, m, cm = 3, 239, 5, 113, 256
    g = torch.Generator().manual_seed(21)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v, grad_out = (torch.randn(B, n, H, D, generator=g).to(**bf16) for _ in range(4))
    mem_k, mem_v = (torch.randn(B, m, H, D, generator=g).to(**bf16) for _ in range(2))
    cmem_k, cmem_v = (torch.randn(B, cm, H, D, generator=g).to(**bf16) for _ in range(2))
    lens = dict(mem_lens=torch.tensor([113, 0, 50], dtype=torch.int32, device="cuda"),
                cmem_lens=torch.tensor([256, 200, 1], dtype=torch.int32, device="cuda"))
    rel = dict(rel_r=None, rel_u=None, rel_v=None)
    if rel_pos:
        R = n + m + cm
        rel = dict(rel_r=torch.randn(H, R, D, generator=g).to(**bf16),
                   rel_u=torch.randn(H, D, generator=g).to(**bf16),
                   rel_v=torch.randn(H, D, generator=g).to(**bf16))
    sources = dict(q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v, cmem_k=cmem_k, cmem_v=cmem_v, **lens)
    results = {}
    for window in (0, 1, 4, 7):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((B, H, n), float("nan"), device="cuda")
        torch.ops.ct_kernels.attention_fwd_sm90(**sources, **rel, rel_scores=None, causal=True,
                                                scale=D ** -0.5, out=out, lse=lse,
                                                block_window=window)
        results[window] = [out, lse]
        if D == 128 and not rel_pos:
            results[window] += _sm90_backward(grad_out, sources, out, lse, window)
    for window in (1, 4, 7):
        for i, (got, want) in enumerate(zip(results[window], results[0])):
            assert not got.isnan().any(), (window, i)
            if i == 2:  # dq
                torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)
            else:
                assert torch.equal(got, want), (window, i)


@SM90
def test_sm90_backward_repeats_agree():
    # the backward's two warpgroups hand each other their dS^T tiles (for dQ) and their
    # ring stages through shared memory, ordered by named barriers and release counters: a
    # handoff out of order shows as gradients that differ between repeats (or from the
    # reference, test_sm90_matches_reference); 16 query tiles, so every buffer is reused
    # several times, and enough blocks for every SM
    B, n, H, D, m, cm = 2, 1023, 16, 128, 512, 384
    g = torch.Generator().manual_seed(5)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v, grad_out = (torch.randn(B, n, H, D, generator=g).to(**bf16) for _ in range(4))
    mem_k, mem_v = (torch.randn(B, m, H, D, generator=g).to(**bf16) for _ in range(2))
    cmem_k, cmem_v = (torch.randn(B, cm, H, D, generator=g).to(**bf16) for _ in range(2))
    sources = dict(q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v, cmem_k=cmem_k, cmem_v=cmem_v,
                   mem_lens=None, cmem_lens=None)
    out, lse = torch.empty_like(q), torch.empty(B, H, n, device="cuda")
    torch.ops.ct_kernels.attention_fwd_sm90(**sources, rel_r=None, rel_u=None, rel_v=None,
                                            rel_scores=None, causal=True, scale=D ** -0.5,
                                            out=out, lse=lse)
    first = None
    for _ in range(12):
        grads = _sm90_backward(grad_out, sources, out, lse)
        assert not any(t.isnan().any() for t in grads)
        if first is None:
            first = grads
            continue
        # dQ's fp32 sums over key blocks may add up in another order: one bfloat16 ulp
        torch.testing.assert_close(grads[0], first[0], rtol=2**-7, atol=1e-3)
        for got, want in zip(grads[1:], first[1:]):
            assert torch.equal(got, want)


@SM90
def test_sm90_backward_op_names_bad_arguments():
    B, n, H, D, m = 1, 64, 2, 128, 32
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, n, H, D, **bf16)
    mem = torch.randn(B, m, H, D, **bf16)
    stats = torch.zeros(B, H, n, device="cuda")
    workspace = attention.sm90_backward_workspace(B, H, n, "cuda")
    grad = lambda rows: torch.empty(B, rows, H, D, **bf16)  # noqa: E731

    args = dict(grad_out=q, q=q, k=q, v=q, mem_k=mem, mem_v=mem, cmem_k=None, cmem_v=None,
                out=q, lse=stats, mem_lens=None, cmem_lens=None, causal=True, scale=0.1,
                dq=grad(n), dk=grad(n), dv=grad(n), dmem_k=grad(m), dmem_v=grad(m),
                dcmem_k=grad(0), dcmem_v=grad(0), workspace=workspace, block_window=0,
                rel_scores=None, rel_score_grads=None)
    kept = torch.empty(B * H, n, 256, **bf16)  # columns: m and n, each padded to 128
    by_distance = torch.empty(H, B * n, 256, **bf16)
    with_kept = dict(rel_scores=kept, rel_score_grads=by_distance, dq=grad(0))
    _expect_messages(torch.ops.ct_kernels.attention_bwd_sm90, {**args, **with_kept}, (
            (dict(rel_score_grads=None), "rel_scores and rel_score_grads must be given together"),
            (dict(rel_scores=kept[..., :128]), "rel_scores must be a contiguous BFloat16"),
            (dict(rel_score_grads=by_distance.float()), "rel_score_grads must be a contiguous BFloat16"),
            (dict(rel_score_grads=by_distance[:, :32]), "rel_score_grads must be a contiguous"),
            (dict(dq=grad(n)), "with rel_scores dQ's content part stays in the workspace, dq must be empty"),
            (dict(causal=False), "rel_scores needs causal=True")))
    _expect_messages(torch.ops.ct_kernels.attention_bwd_sm90, args, (
            (dict(q=q.float()), "q must be bfloat16 or float16"),
            (dict(k=q[:, :10]), "k and v must have q's 64 rows"),
            (dict(mem_v=None), "mem_k and mem_v must be given together"),
            (dict(mem_lens=torch.tensor([3], device="cuda")), "mem_lens must be a contiguous int32"),
            (dict(lse=stats[..., :10]), "lse must be a contiguous"),
            (dict(dq=grad(n).float()), "dq must be a contiguous"),
            (dict(dmem_k=grad(m + 1)), "dmem_k must be a contiguous"),
            (dict(out=q[:, :10]), "grad_out and out must have q's shape"),
            (dict(out=q.half()), "out must be a BFloat16 tensor"),
            (dict(workspace=workspace[1:]), "workspace must be a contiguous"),
            (dict(q=q.cpu()), "q must be a CUDA tensor")))


def test_torch_compile_fullgraph():
    # inductor on GPU; on CPU the AOT tracing alone (fake tensors, autograd registration)
    g = torch.Generator().manual_seed(11)
    big = DEVICE == "cuda"
    a = testing.random_attention_inputs(2, 129 if big else 9, 2, 64 if big else 16,
                                        64 if big else 6, 32 if big else 4,
                                        dtype=torch.bfloat16 if big else torch.float32,
                                        device=DEVICE, generator=g, partial=True,
                                        requires_grad=True)

    def layer(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens):
        out, usage = ct_kernels.compressive_attention(
            q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens=mem_lens, cmem_lens=cmem_lens,
            backend="triton", return_key_usage=True)
        return (out.float() ** 2).sum(), usage

    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if big else "aot_eager")
    names = ("q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v", "mem_lens", "cmem_lens")
    loss, usage = compiled(*(a[k] for k in names))
    loss.backward()
    grads = [a[k].grad.clone() for k in names[:7]]
    for k in names[:7]:
        a[k].grad = None
    eager_loss, eager_usage = layer(*(a[k] for k in names))
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(usage, eager_usage)
    for k, grad in zip(names, grads):
        torch.testing.assert_close(grad, a[k].grad, msg=k)


@pytest.mark.parametrize("stored,kept", [(False, False), (True, False), (True, True)])
def test_compiled_backward_reads_the_lengths_of_the_call(stored, kept):
    # a caller that updates its length buffer in place after the call (as the model's
    # memories do) and clones it for the call: inductor drops that clone, so the backward
    # must not read the caller's buffer (it did, and saw the updated lengths)
    g = torch.Generator().manual_seed(13)
    a = testing.random_attention_inputs(2, 6, 2, 16, 6, 3, device=DEVICE, generator=g,
                                        rel_pos=True, requires_grad=True)
    names = ("q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v")

    def layer(q, k, v, mem_k, mem_v, cmem_k, cmem_v, r, u, v_bias, mem_lens):
        out = ct_kernels.compressive_attention(
            q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens=mem_lens.clone(),
            rel_pos=ct_kernels.RelativePosition(r, u, v_bias), backend="triton",
            store_score_grads=stored, store_position_scores=kept)
        mem_lens.add_(4).clamp_(max=6)  # the memory fills after the call
        return (out.float() ** 2).sum()

    leaves = [a[k] for k in names] + list(a["rel_pos"])
    grads = {}
    for name, fn in (("eager", layer), ("compiled", torch.compile(layer, fullgraph=True))):
        lens = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
        grads[name] = torch.autograd.grad(fn(*leaves, lens), leaves)
        assert lens.tolist() == [4, 6]
    for name, eager, compiled in zip(names + ("r", "u", "v_bias"), grads["eager"], grads["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("config,rel_pos", [((64, 64, 4, 3), False), ((32, 128, 4, 3), False),
                                            ((128, 32, 8, 2), False), ((32, 64, 4, 2), True),
                                            ((64, 64, 4, 2), True), ((32, 32, 4, 2), True),
                                            ((64, 64, 4, 1), True)])
def test_gpu_tile_sizes(monkeypatch, config, rel_pos):
    # the tile logic at the tuned GPU block sizes (also in the interpreter): several query
    # and key tiles per source, partial tiles, the causal band
    monkeypatch.setattr(attention, "launch_config", lambda *_: config)
    g = torch.Generator().manual_seed(12)
    args = testing.random_attention_inputs(2, 140, 1, 16, 70, 45, device=DEVICE, generator=g,
                                           partial=True, padding=True, rel_pos=rel_pos)
    check(args, usage=True)


@pytest.mark.parametrize("dkdv,dq_stored", [((16, 16, 4, 1), (32, 16, 4, 1)),
                                             ((32, 64, 4, 1), (64, 64, 4, 2)),
                                             ((64, 32, 4, 1), (16, 32, 4, 2))])
@pytest.mark.parametrize("kept", [False, True])
def test_stored_score_grads_whatever_the_two_passes_tiles(monkeypatch, dkdv, dq_stored, kept):
    # the dQ pass reads back only what the dK/dV pass wrote (the rest stays poisoned): query
    # rows the dK/dV pass skips for a segment key tile, slots before a memory's valid ones;
    # and the dK/dV pass reads only the position scores that the forward (on its own tiles)
    # kept
    configs = {"dkdv_stored_rel": dkdv, "dkdv_kept_rel": dkdv, "dq_stored_rel": dq_stored}
    monkeypatch.setattr(attention, "launch_config",
                        lambda pass_name, *_: configs.get(pass_name, (16, 16, 4, 1)))
    g = torch.Generator().manual_seed(13)
    args = testing.random_attention_inputs(2, 150, 1, 16, 70, 45, device=DEVICE, generator=g,
                                           partial=True, padding=True, rel_pos=True)
    check(args, store_score_grads=True, store_position_scores=kept)


def test_relative_positions_reject_taller_than_wide_query_tiles(monkeypatch):
    # the forward and dQ passes carry half a position band from one key tile to the next,
    # which needs BLOCK_M <= BLOCK_N; every tuned configuration satisfies it
    for (pass_name, _), (block_m, block_n, _, _) in attention.GPU_CONFIGS.items():
        if pass_name in ("fwd_rel", "dq_rel"):
            assert block_m <= block_n, (pass_name, block_m, block_n)
    monkeypatch.setattr(attention, "launch_config", lambda *_: (32, 16, 4, 2))
    args = testing.random_attention_inputs(1, 9, 1, 16, 4, 0, device=DEVICE, rel_pos=True)
    with pytest.raises(ValueError, match="BLOCK_M <= BLOCK_N"):
        ct_kernels.compressive_attention(**args, backend="triton")


def test_tuning_sweep_re_measures_every_launch_configuration():
    """`bench_attention --tune` keeps the best candidate: the one in use must be among them,
    or a sweep could replace it by a slower one without ever timing it."""
    from benchmarks import bench_attention
    missing = {key: attention.GPU_CONFIGS[key] for key, candidates in
               bench_attention.TUNE_CANDIDATES.items()
               if attention.GPU_CONFIGS[key] not in candidates}
    assert not missing, f"launch configurations missing from TUNE_CANDIDATES: {missing}"


def test_tuning_sweep_skips_candidates_that_fail(monkeypatch):
    """A candidate that fails in its compile worker (out of resources, or a fault that leaves
    the worker's CUDA context unusable) runs once more alone; if it fails again it is not
    timed, so a fault cannot take the timing process down, and it is never chosen."""
    import concurrent.futures

    from benchmarks import bench_attention

    class InProcessPool:  # the worker pool, run in this process
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs):
            return [fn(job) for job in jobs]

    key, good, bad = ("dkdv_rel", 128), (64, 64, 8, 1), (32, 64, 4, 1)
    compiled, timed = [], []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InProcessPool)
    monkeypatch.setattr(bench_attention, "TUNE_CANDIDATES", {key: [good, bad]})
    monkeypatch.setattr(bench_attention, "_compile_job", lambda job: compiled.append(job[1]) or (
        "AcceleratorError: an illegal memory access" if job[1] == bad else None))
    monkeypatch.setattr(bench_attention, "make_inputs", lambda *args: None)
    monkeypatch.setattr(bench_attention, "pass_launchers", lambda args: {"dkdv": None})
    # the failing candidate would look faster, were it timed
    monkeypatch.setattr(bench_attention.harness, "time_ms", lambda fn, rep_ms: timed.append(
        attention.GPU_CONFIGS[key]) or (0.5 if attention.GPU_CONFIGS[key] == bad else 1.0))
    monkeypatch.setitem(attention.GPU_CONFIGS, key, bad)
    bench_attention.tune(["dkdv_rel"])
    assert compiled == [good, bad, bad]
    assert set(timed) == {good}
    assert attention.GPU_CONFIGS[key] == good
