"""The references are the ground truth: check them against independent formulations
(row-by-row loop, torch.nn.functional) and with gradcheck in float64."""
import pytest
import torch

from ct_kernels import reference, testing

F64 = torch.float64


@pytest.mark.parametrize(
    "B,n,H,D,m,cm,partial,padding,rel_pos,causal",
    [
        (2, 1, 2, 16, 0, 0, False, False, False, True),     # n = 1, no memories
        (2, 1, 1, 32, 6, 4, True, False, True, True),       # n = 1 with partial memories
        (3, 7, 2, 16, 5, 4, True, True, False, True),       # partial + padding
        (2, 7, 2, 64, 9, 0, False, True, True, True),       # memory only, rel_pos
        (2, 7, 1, 32, 0, 6, True, False, False, True),      # compressed memory only
        (2, 7, 2, 16, 4, 4, True, True, False, False),      # non-causal
        (1, 113, 1, 16, 40, 20, True, False, True, True),   # odd length
    ],
)
def test_attention_matches_row_by_row_loop(B, n, H, D, m, cm, partial, padding, rel_pos, causal):
    args = testing.random_attention_inputs(B, n, H, D, m, cm, dtype=F64, partial=partial,
                                           padding=padding, rel_pos=rel_pos)
    out, usage = reference.compressive_attention(**args, causal=causal, return_key_usage=True)
    expected_out, expected_usage = testing.naive_attention(**args, causal=causal)
    assert testing.max_abs_error(out, expected_out) < 1e-12
    assert testing.max_abs_error(usage, expected_usage) < 1e-12


def test_attention_explicit_scale_and_partial_lengths_matter():
    args = testing.random_attention_inputs(2, 5, 2, 16, 6, 4, dtype=F64)
    full = reference.compressive_attention(**args, scale=0.3)
    assert testing.max_abs_error(full, testing.naive_attention(**args, scale=0.3)[0]) < 1e-12
    lens = torch.tensor([2, 6])
    partial = reference.compressive_attention(**args, scale=0.3, mem_lens=lens)
    assert testing.max_abs_error(partial[1], full[1]) < 1e-12  # full memory: unchanged
    assert testing.max_abs_error(partial[0], full[0]) > 1e-3  # 4 slots masked: changed


def test_query_that_sees_nothing_outputs_zero_and_passes_no_gradient():
    # non-causal, every segment key padded and no memories: sample 0 sees nothing at all
    args = testing.random_attention_inputs(2, 4, 2, 16, dtype=F64, requires_grad=True)
    pad = torch.tensor([[True] * 4, [False, True, False, True]])
    out, usage = reference.compressive_attention(**args, key_padding_mask=pad, causal=False,
                                                 return_key_usage=True)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (usage[0] == 0).all()
    out.sum().backward()
    assert (args["q"].grad[0] == 0).all() and torch.isfinite(args["q"].grad).all()
    # usage: every query that sees a key spreads mass 1 per head
    assert torch.allclose(usage[1].sum(), torch.tensor(4 * 2, dtype=F64))


def test_attention_gradcheck_including_relative_positions():
    args = testing.random_attention_inputs(2, 3, 2, 4, 3, 2, dtype=F64, partial=True,
                                           padding=True, rel_pos=True, requires_grad=True)
    names = ["q", "k", "v", "mem_k", "mem_v", "cmem_k", "cmem_v"]
    rest = {k: v for k, v in args.items() if k not in names and k != "rel_pos"}

    def fn(q, k, v, mem_k, mem_v, cmem_k, cmem_v, r, u, pos_v):
        return reference.compressive_attention(
            q, k, v, mem_k, mem_v, cmem_k, cmem_v,
            rel_pos=reference.RelativePosition(r, u, pos_v), **rest)

    assert torch.autograd.gradcheck(fn, (*[args[k] for k in names], *args["rel_pos"]))


@pytest.mark.parametrize("method", ["mean", "max", "conv", "dilated_conv", "most_used"])
@pytest.mark.parametrize("rate,dilation", [(1, 2), (3, 2), (4, 3)])
def test_compress_matches_torch_functional(method, rate, dilation):
    B, ns, d = 2, 12, 6
    x = torch.randn(B, ns, d, dtype=F64)
    kw = {}
    if method in ("conv", "dilated_conv"):
        kw = dict(weight=torch.randn(5, d, rate, dtype=F64), bias=torch.randn(5, dtype=F64))
    if method == "dilated_conv":
        kw["dilation"] = dilation
    if method == "most_used":
        kw["usage"] = torch.rand(B, ns, dtype=F64)
    out = reference.compress(x, rate, method, **kw)
    assert out.shape[:2] == (B, ns // rate)
    assert testing.max_abs_error(out, testing.independent_compress(x, rate, method, **kw)) < 1e-12


def test_most_used_keeps_the_most_used_rows_in_order():
    x = torch.arange(6, dtype=F64).view(1, 6, 1).expand(1, 6, 3)
    usage = torch.tensor([[0.5, 3.0, 0.1, 2.0, 9.0, 0.2]], dtype=F64)
    out = reference.compress(x, 2, "most_used", usage=usage)
    assert out[0, :, 0].tolist() == [1.0, 3.0, 4.0]


@pytest.mark.parametrize("method", ["mean", "max", "conv", "dilated_conv"])
def test_compress_gradcheck(method):
    x = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    if method in ("conv", "dilated_conv"):
        w = torch.randn(4, 3, 3, dtype=F64, requires_grad=True)
        b = torch.randn(4, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: reference.compress(x, 3, method, weight=w, bias=b),
                                        (x, w, b))
    else:
        assert torch.autograd.gradcheck(lambda x: reference.compress(x, 3, method), (x,))


def _loss_inputs(B=2, n=5, ns=9, rate=3, H=2, D=8):
    q, old_k, old_v = (torch.randn(B, s, H, D, dtype=F64, requires_grad=True) for s in (n, ns, ns))
    comp_k, comp_v = (torch.randn(B, ns // rate, H, D, dtype=F64, requires_grad=True) for _ in range(2))
    return q, old_k, old_v, comp_k, comp_v


def test_attention_reconstruction_loss_matches_sdpa_and_only_trains_the_compressed_side():
    q, old_k, old_v, comp_k, comp_v = _loss_inputs()
    loss = reference.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, scale=0.4)
    expected = testing.independent_recon_loss(q, old_k, old_v, comp_k, comp_v, scale=0.4)
    assert abs(loss.item() - expected.item()) < 1e-12
    loss.backward()
    assert q.grad is None and old_k.grad is None and old_v.grad is None
    assert comp_k.grad.abs().sum() > 0 and comp_v.grad.abs().sum() > 0


def test_attention_reconstruction_loss_gradcheck():
    q, old_k, old_v, comp_k, comp_v = _loss_inputs()
    assert torch.autograd.gradcheck(
        lambda ck, cv: reference.attention_reconstruction_loss(q, old_k, old_v, ck, cv), (comp_k, comp_v))


def test_autoencoding_loss_matches_conv_transpose_and_gradcheck():
    old = torch.randn(2, 12, 6, dtype=F64)
    comp = torch.randn(2, 4, 5, dtype=F64, requires_grad=True)
    w = torch.randn(5, 6, 3, dtype=F64, requires_grad=True)
    b = torch.randn(6, dtype=F64, requires_grad=True)
    recon = torch.nn.functional.conv_transpose1d(comp.transpose(1, 2), w, b, stride=3).transpose(1, 2)
    expected = (recon - old).pow(2).mean()
    assert abs(reference.autoencoding_loss(old, comp, w, b).item() - expected.item()) < 1e-12
    assert torch.autograd.gradcheck(lambda c, w, b: reference.autoencoding_loss(old, c, w, b), (comp, w, b))
