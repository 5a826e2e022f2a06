"""LayerMemory over many segments vs a plain concatenate-and-slice reference, with per-sample
resets and partial fills, on every memory-update backend this machine runs."""
import pytest
import torch

import ct_kernels
from ct_kernels import reference
from ct_kernels.memory import LayerMemory

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _backends():
    have = ct_kernels.available_backends()
    return [pytest.param(b, marks=pytest.mark.skipif(b not in have, reason=f"no {b} backend"))
            for b in ("reference", "triton", "cuda")]


def cat_and_slice(mem, cmem, mem_lens, cmem_lens, h, rate, compress):
    """DESIGN.md §1 literally: concatenate, compress the n oldest rows, keep the newest."""
    n, m, cm = h.shape[1], mem.shape[1], cmem.shape[1]
    stream = torch.cat([mem, h], dim=1)
    comp = torch.cat([cmem, compress(stream[:, :n])], dim=1)
    evicted = (mem_lens + n - m).clamp(min=0)
    return (stream[:, stream.shape[1] - m:], comp[:, comp.shape[1] - cm:],
            (mem_lens + n).clamp(max=m), (cmem_lens + evicted // rate).clamp(max=cm))


# (B, m, cm, n, rate, d): m > n, the paper's m = n, m < n with a short cmem, no memory,
# no compressed memory, rate 1; d = 37 takes the scalar path, the others the vector path
SHAPES = [(3, 8, 6, 4, 2, 40), (2, 6, 5, 6, 3, 16), (2, 3, 1, 6, 2, 37), (2, 0, 4, 4, 2, 8),
          (2, 8, 0, 4, 4, 8), (2, 5, 3, 2, 1, 24)]
METHODS = ["mean", "max", "conv", "dilated_conv", "most_used", "push"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-m{}-cm{}-n{}-c{}-d{}".format(*s))
def test_update_matches_cat_and_slice(backend, method, shape):
    with torch.backends.cudnn.flags(allow_tf32=False):  # the reference's conv1d: exact fp32
        _update_matches_cat_and_slice(backend, method, shape)


def _update_matches_cat_and_slice(backend, method, shape):
    B, m, cm, n, rate, d = shape
    dtype = torch.float64 if backend == "reference" or not CUDA else torch.float32
    g = torch.Generator().manual_seed(hash((method, shape)) % 2**31)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(DEVICE)  # noqa: E731
    weight, bias = randn(d, d, rate), randn(d)
    state = LayerMemory(B, m, cm, d, rate, dtype=dtype, device=DEVICE)
    state.mem.copy_(randn(B, m, d))   # stale contents are not zeros: every slot is checked
    state.cmem.copy_(randn(B, cm, d))
    ref = [state.mem.clone(), state.cmem.clone(), state.mem_lens.clone(), state.cmem_lens.clone()]
    for step in range(7):
        if step in (3, 5):  # documents start at different segments
            which = torch.rand(B, generator=g) < 0.5
            which[step % B] = True
            state.reset(which.to(DEVICE))
            ref[2] = ref[2] * ~which.to(DEVICE)
            ref[3] = ref[3] * ~which.to(DEVICE)
        h = randn(B, n, d)
        usage = randn(B, n).abs()
        kwargs = dict(weight=weight, bias=bias) if "conv" in method else {}
        kwargs.update(dict(dilation=2) if method == "dilated_conv" else {})
        kwargs.update(dict(usage=usage) if method == "most_used" else {})
        ref_method = "mean" if method == "push" else method
        compress = lambda old: reference.compress(old, rate, ref_method, **kwargs)  # noqa: E731
        expected = cat_and_slice(*ref, h, rate, compress)
        if method == "push":
            state.push(h, compress(state.evicted(h)).clone(), backend=backend)
        else:
            state.update(h, method, backend=backend, **kwargs)
        ref = list(expected)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(state.mem, ref[0], **tol)
        torch.testing.assert_close(state.cmem, ref[1], **tol)
        assert torch.equal(state.mem_lens.long(), ref[2].long()), step
        assert torch.equal(state.cmem_lens.long(), ref[3].long()), step
        ref = [state.mem.clone(), state.cmem.clone(), ref[2], ref[3]]  # no drift of rounding


@pytest.mark.parametrize("backend", _backends())
def test_bf16_buffers_and_strided_segment(backend):
    """bf16 buffers, a segment that is a strided view, pooling in fp32 then rounded once
    (the CPU interpreter rounds to bf16 by truncation: one ulp allowed there)."""
    B, m, cm, n, rate, d = 2, 8, 8, 8, 4, 64
    state = LayerMemory(B, m, cm, d, rate, dtype=torch.bfloat16, device=DEVICE)
    state.mem.normal_()
    big = torch.randn(B, 2 * n, d, device=DEVICE)
    for method in ("mean", "max", "mean"):
        old = state.evicted(big[:, 3:3 + n]).float().clone()
        before = state.cmem[:, 2:].clone()
        state.update(big[:, 3:3 + n], method, backend=backend)
        pooled = reference.compress(old, rate, method).bfloat16()
        torch.testing.assert_close(state.cmem[:, -2:], pooled, rtol=0 if CUDA else 2**-7, atol=0)
        torch.testing.assert_close(state.cmem[:, :-2], before, rtol=0, atol=0)
        torch.testing.assert_close(state.mem, big[:, 3:3 + n].bfloat16(), rtol=0, atol=0)


def test_update_bumps_version_and_keeps_lens_in_range():
    state = LayerMemory(2, 4, 2, 8, 2, device=DEVICE)
    view = state.evicted(torch.randn(2, 4, 8, device=DEVICE))
    version = view._version
    for _ in range(5):
        state.update(torch.randn(2, 4, 8, device=DEVICE), "mean")
    assert view._version > version  # autograd refuses graphs that saved the old rows
    assert state.mem_lens.tolist() == [4, 4] and state.cmem_lens.tolist() == [2, 2]


def test_bad_inputs():
    state = LayerMemory(2, 4, 2, 8, 2)
    with pytest.raises(ValueError, match="method"):
        state.update(torch.randn(2, 4, 8), "median")
    with pytest.raises(ValueError, match="h must have shape"):
        state.update(torch.randn(3, 4, 8), "mean")
    with pytest.raises(ValueError, match="multiple of the compression rate"):
        state.update(torch.randn(2, 3, 8), "mean")
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        state.update([[0.0]], "mean")
    with pytest.raises(ValueError, match="weight must have shape"):
        state.update(torch.randn(2, 4, 8), "conv", weight=torch.randn(8, 8, 3))
    with pytest.raises(ValueError, match="weight/bias"):
        state.update(torch.randn(2, 4, 8), "mean", weight=torch.randn(8, 8, 2))
    with pytest.raises(ValueError, match="compressed must have shape"):
        state.push(torch.randn(2, 4, 8), torch.randn(2, 3, 8))
