"""Public API: dispatch, backends, and clear errors for bad inputs."""
import re
import warnings

import pytest
import torch

import ct_kernels
from ct_kernels import RelativePosition, dispatch, testing


def _attn(**overrides):
    args = testing.random_attention_inputs(2, 5, 2, 8, 4, 3)
    args.update(overrides)
    return args


def test_available_backends_always_has_reference():
    backends = ct_kernels.available_backends()
    assert backends[-1] == "reference"
    assert set(backends) <= {"cuda", "triton", "reference"}
    assert ("cuda" in backends) <= torch.cuda.is_available()


def test_auto_on_cpu_matches_reference(monkeypatch):
    # outside Triton's CPU interpreter (which CI's tests run under) CPU tensors have only the
    # reference backend
    monkeypatch.setattr(dispatch, "triton_interpreted", lambda: False)
    args = _attn()
    assert torch.equal(ct_kernels.compressive_attention(**args, backend="reference"),
                       ct_kernels.compressive_attention(**args))


def test_strided_inputs_with_contiguous_last_dim():
    qkv = torch.randn(2, 5, 3, 2, 8)  # a packed projection: q, k, v are strided views
    q, k, v = qkv.unbind(dim=2)
    out = ct_kernels.compressive_attention(q, k, v)
    expected = ct_kernels.compressive_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(q=torch.randn(2, 5, 8)), ValueError, "q must have 4 dimensions"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.randn(2, 5, 3, 8)), ValueError, "k must have shape"),
    (dict(v=torch.randn(2, 5, 2, 8, dtype=torch.float64)), TypeError, "v must have dtype"),
    (dict(q=torch.randint(0, 3, (2, 5, 2, 8))), TypeError, "q must be a floating tensor"),
    (dict(mem_k=torch.randn(3, 4, 2, 8)), ValueError, "mem_k must have shape"),
    (dict(mem_v=None), ValueError, "mem_k and mem_v must be given together"),
    (dict(cmem_v=torch.randn(2, 3, 2, 4)), ValueError, "cmem_v must have shape"),
    (dict(mem_lens=torch.tensor([1, 5])), ValueError, "mem_lens must lie in [0, 4]"),
    (dict(cmem_lens=torch.tensor([-1, 0])), ValueError, "cmem_lens must lie in [0, 3]"),
    (dict(mem_lens=torch.tensor([1.0, 2.0])), TypeError, "mem_lens must be an integer tensor"),
    (dict(mem_lens=torch.tensor([1, 2, 3])), ValueError, "mem_lens must have shape"),
    (dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool"),
    (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(scale=-1.0), ValueError, "scale must be a positive"),
    (dict(rel_pos=(1, 2, 3)), TypeError, "rel_pos must be a ct_kernels.RelativePosition"),
    (dict(rel_pos=RelativePosition(torch.randn(2, 11, 8), torch.randn(2, 8), torch.randn(2, 8))),
     ValueError, "R >= cm + m + n"),
    (dict(rel_pos=RelativePosition(torch.randn(2, 12, 8), torch.randn(2, 4), torch.randn(2, 8))),
     ValueError, "rel_pos.u must have shape"),
    (dict(backend="fastest"), ValueError, "backend must be 'auto' or one of"),
    (dict(store_position_scores=True), ValueError, "store_position_scores=True needs store_score_grads"),
])
def test_attention_bad_inputs(overrides, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ct_kernels.compressive_attention(**_attn(**overrides))


def test_rel_pos_requires_causal():
    rp = RelativePosition(torch.randn(2, 12, 8), torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="rel_pos requires causal=True"):
        ct_kernels.compressive_attention(**_attn(rel_pos=rp), causal=False)


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to place one tensor elsewhere")
    with pytest.raises(ValueError, match="k must be on device"):
        ct_kernels.compressive_attention(**_attn(k=torch.randn(2, 5, 2, 8, device="cuda")))


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("cuda", "triton") if b not in ct_kernels.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match="not available on this machine"):
        ct_kernels.compressive_attention(**_attn(), backend=missing[0])


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(x=torch.randn(2, 12, 4), rate=5, method="mean"), ValueError, "rate (5) must divide"),
    (dict(x=torch.randn(2, 12, 4), rate=0, method="mean"), ValueError, "rate must be >= 1"),
    (dict(x=torch.randn(2, 12, 4), rate=2.0, method="mean"), TypeError, "rate must be an int"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="median"), ValueError, "method must be one of"),
    (dict(x=torch.randn(12, 4), rate=3, method="mean"), ValueError, "x must have 3 dimensions"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="conv"), TypeError, "weight must be a torch.Tensor"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="conv", weight=torch.randn(4, 4, 2)), ValueError,
     "weight must have nn.Conv1d shape"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="conv", weight=torch.randn(4, 4, 3), bias=torch.randn(3)),
     ValueError, "bias must have shape"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="most_used"), TypeError, "usage must be a torch.Tensor"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="most_used", usage=torch.rand(2, 11)), ValueError,
     "usage must have shape"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="mean", weight=torch.randn(4, 4, 3)), ValueError,
     "only used by the conv methods"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="mean", dilation=2), TypeError, "unexpected options"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="dilated_conv", weight=torch.randn(4, 4, 3), dilation=0),
     ValueError, "dilation must be >= 1"),
    (dict(x=torch.randn(2, 12, 4), rate=3, method="mean", backend="nope"), ValueError, "backend must be"),
])
def test_compress_bad_inputs(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        ct_kernels.compress(**kwargs)


def test_recon_loss_bad_inputs():
    q, ok, ov = torch.randn(2, 5, 2, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    ck, cv = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    with pytest.raises(ValueError, match="comp_k must have shape"):
        ct_kernels.attention_reconstruction_loss(q, ok, ov, torch.randn(2, 3, 2, 4), cv)
    with pytest.raises(ValueError, match="comp_v must have shape"):
        ct_kernels.attention_reconstruction_loss(q, ok, ov, ck, torch.randn(2, 4, 2, 8))
    with pytest.raises(TypeError, match="old_v must have dtype"):
        ct_kernels.attention_reconstruction_loss(q, ok, ov.double(), ck, cv)
    with pytest.raises(ValueError, match="at least one key"):
        ct_kernels.attention_reconstruction_loss(q, ok[:, :0], ov[:, :0], ck, cv)
    with pytest.raises(ValueError, match="at least one query"):
        ct_kernels.attention_reconstruction_loss(q[:, :0], ok, ov, ck, cv)


def test_autoencoding_loss_bad_inputs():
    old, comp = torch.randn(2, 12, 6), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="dec_weight must have nn.ConvTranspose1d shape"):
        ct_kernels.autoencoding_loss(old, comp, torch.randn(5, 6, 5))
    with pytest.raises(ValueError, match="compressed must have shape"):
        ct_kernels.autoencoding_loss(old, torch.randn(2, 3, 5), torch.randn(5, 6, 3))
    with pytest.raises(ValueError, match="dec_bias must have shape"):
        ct_kernels.autoencoding_loss(old, comp, torch.randn(5, 6, 3), torch.randn(5))


def test_validate_command_passes():
    from ct_kernels import validate
    assert validate.main(["--backend", "reference", "--seed", "3"]) == 0


def test_auto_warns_once_when_cuda_inputs_fall_back_to_the_reference(monkeypatch):
    """The reference materialises the scores: CUDA inputs that no kernel accepts say so."""
    monkeypatch.setattr(dispatch, "available_backends", lambda: ["triton", "reference"])
    dispatch._warn_once.cache_clear()
    reference_fn = dispatch._REGISTRY["attention"]["reference"].fn
    facts = dict(dtype=torch.bfloat16, head_dim=320, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.resolve("attention", "auto", torch.device("cpu"), **facts)  # CPU: expected
    with pytest.warns(UserWarning, match=r"attention on CUDA tensors falls back to the reference "
                                         r"implementation \(unsupported by triton: head dim 320"):
        assert dispatch.resolve("attention", "auto", torch.device("cuda"), **facts) is reference_fn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.resolve("attention", "auto", torch.device("cuda"), **facts)  # once only
        dispatch.resolve("attention", "auto", torch.device("cuda"),  # a kernel runs them
                         dtype=torch.bfloat16, head_dim=96, n=4)
