"""Public ops of ct_kernels: validate, pick a backend, run it.

Layout everywhere is ``[B, N, H, D]`` (as ``flash_attn_func``); any strides with a
contiguous last dimension are accepted.
"""
from __future__ import annotations

from typing import Optional

import torch

from ct_kernels import _checks, dispatch, reference
from ct_kernels.reference import RelativePosition

COMPRESS_METHODS = ("mean", "max", "conv", "dilated_conv", "most_used")

dispatch.register("attention", "reference")(reference.compressive_attention)
dispatch.register("compress", "reference")(reference.compress)
dispatch.register("recon_loss", "reference")(reference.attention_reconstruction_loss)
dispatch.register("autoencoding_loss", "reference")(reference.autoencoding_loss)


def compressive_attention(
    q, k, v, mem_k=None, mem_v=None, cmem_k=None, cmem_v=None, *,
    mem_lens=None, cmem_lens=None, key_padding_mask=None, causal=True, scale=None,
    rel_pos: Optional[RelativePosition] = None, return_key_usage=False, backend="auto",
    store_score_grads=False, store_position_scores=False,
):
    """Attention of a segment's queries over ``[cmem | mem | segment]`` keys.

    Args:
        q, k, v: [B, n, H, D] the current segment.
        mem_k, mem_v: [B, m, H, D] memory keys/values (or None).
        cmem_k, cmem_v: [B, cm, H, D] compressed-memory keys/values (or None).
        mem_lens, cmem_lens: int [B]; only the newest ``lens[b]`` slots (right end of each
            buffer) are valid. None: all valid.
        key_padding_mask: bool [B, n], True = padded segment key (ignored).
        causal: query i sees key j iff j <= cm + m + i (bottom-right aligned).
        scale: softmax scale, default D ** -0.5.
        rel_pos: ``RelativePosition(r [H, R, D], u [H, D], v [H, D])``, R >= cm + m + n;
            score = scale * ((q_i + u)·k_j + (q_i + v)·r_{cm+m+i-j}). Needs causal=True.
        return_key_usage: also return usage [B, cm + m + n], the softmax mass each key
            received summed over heads and queries (no gradient).
        backend: "auto", "reference", "triton" or "cuda".
        store_score_grads: with ``rel_pos`` on the Triton backend, the backward keeps the
            score gradients (by key and by distance: twice [B, H, n, cm + m + n] in q's
            dtype, alive during the backward) and forms dq and the position gradients from
            them, instead of a second pass that recomputes the scores: faster, for that much
            memory. On Hopper (bfloat16, causal, head dim 128) the backward is the sm_90
            kernel's: the position scores by key (scored in a pass before it, twice
            [B, H, n, cm + m + n] alive with the gradients by distance, as the Triton
            backward's two buffers) in, the score gradients by distance out, then two
            products per head over the distances. Ignored otherwise.
        store_position_scores: with ``store_score_grads`` (and where something needs a
            gradient), the forward also keeps its position scores by key for the backward
            ([B, H, n, cm + m + n], bfloat16 for bfloat16 inputs, fp32 otherwise, alive from
            the forward to the backward), which reads them instead of scoring the positions
            again and keeps the score gradients by key in their place: a faster backward at
            the same peak memory for one call in bfloat16 or float32 (float16 inputs: the
            buffer is fp32, twice the bytes of the gradients it replaces), but one such
            buffer per call alive until its backward (a model: one per layer), and that
            backward runs once (retain_graph=True then fails at the second). On Hopper the
            sm_90 backward reads the buffer instead of scoring it in a pass of its own.
            Ignored without ``rel_pos`` or on other backends; without ``store_score_grads``
            a ValueError.

    Returns:
        out [B, n, H, D], or (out, usage). A query that sees no key outputs zeros.
    """
    _checks.tensor("q", q, 4)
    B, n, H, D = q.shape
    if store_position_scores and not store_score_grads:
        raise ValueError("store_position_scores=True needs store_score_grads=True (the "
                         "backward from stored score gradients is what reads them)")
    if n == 0:
        raise ValueError("q must hold at least one query (n >= 1)")
    dtype, device = q.dtype, q.device
    _checks.tensor("k", k, 4, dtype, device)
    _checks.tensor("v", v, 4, dtype, device)
    _checks.shape("k", k, (B, n, H, D), "[B, n, H, D] as q")
    _checks.shape("v", v, (B, n, H, D), "[B, n, H, D] as q")
    m = _checks.kv_pair("mem", mem_k, mem_v, B, H, D, dtype, device)
    cm = _checks.kv_pair("cmem", cmem_k, cmem_v, B, H, D, dtype, device)
    _checks.lengths("mem_lens", mem_lens, B, m, "mem_k")
    _checks.lengths("cmem_lens", cmem_lens, B, cm, "cmem_k")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, n] (True = padded)")
        _checks.shape("key_padding_mask", key_padding_mask, (B, n), "[B, n]")
        key_padding_mask = key_padding_mask.to(device)
    _checks.scale(scale)
    if rel_pos is not None:
        if not isinstance(rel_pos, RelativePosition):
            raise TypeError("rel_pos must be a ct_kernels.RelativePosition(r, u, v)")
        if not causal:
            raise ValueError("rel_pos requires causal=True (distances are defined for "
                             "keys at or before the query)")
        _checks.tensor("rel_pos.r", rel_pos.r, 3, dtype, device)
        _checks.tensor("rel_pos.u", rel_pos.u, 2, dtype, device)
        _checks.tensor("rel_pos.v", rel_pos.v, 2, dtype, device)
        R = rel_pos.r.shape[1]
        if rel_pos.r.shape[0] != H or rel_pos.r.shape[2] != D or R < cm + m + n:
            raise ValueError(f"rel_pos.r must have shape [H, R, D] = [{H}, >={cm + m + n}, {D}]"
                             f" (R >= cm + m + n), got {tuple(rel_pos.r.shape)}")
        _checks.shape("rel_pos.u", rel_pos.u, (H, D), "[H, D]")
        _checks.shape("rel_pos.v", rel_pos.v, (H, D), "[H, D]")
    if mem_lens is not None:
        mem_lens = mem_lens.to(device)
    if cmem_lens is not None:
        cmem_lens = cmem_lens.to(device)

    tensors = (q, k, v, mem_k, mem_v, cmem_k, cmem_v) + (tuple(rel_pos) if rel_pos else ())
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    impl = dispatch.resolve("attention", backend, device, dtype=dtype, head_dim=D, n=n,
                            rel_pos=rel_pos is not None, needs_grad=needs_grad,
                            return_key_usage=return_key_usage, causal=causal,
                            key_padding=key_padding_mask is not None)
    return impl(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens=mem_lens, cmem_lens=cmem_lens,
                key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                rel_pos=rel_pos, return_key_usage=return_key_usage,
                store_score_grads=bool(store_score_grads),
                store_position_scores=bool(store_position_scores))


def compress(x, rate, method, *, weight=None, bias=None, usage=None, backend="auto", **options):
    """Compress evicted memories [B, ns, d] into [B, ns // rate, d_out].

    Methods (kernel = stride = rate):
      - "mean", "max": pooling over each window of ``rate`` rows.
      - "conv": nn.Conv1d(d, d_out, rate, stride=rate); weight [d_out, d, rate], bias [d_out].
      - "dilated_conv": same weight layout, option ``dilation`` (default 2); slot t reads
        rows t*rate + rate-1 - (rate-1-k)*dilation (zeros before row 0), i.e. its own
        window's last row and reaching (rate-1)*dilation rows back, so neighbouring slots
        overlap and the compressor sees across window boundaries.
      - "most_used": keep the ns // rate rows with the largest ``usage`` [B, ns] (softmax
        mass received while in memory), in their original order.
    """
    _checks.tensor("x", x, 3)
    _checks.positive_int("rate", rate)
    B, ns, d = x.shape
    if method not in COMPRESS_METHODS:
        raise ValueError(f"method must be one of {COMPRESS_METHODS}, got {method!r}")
    if ns % rate != 0:
        raise ValueError(f"rate ({rate}) must divide the number of rows to compress "
                         f"(x.shape[1] = {ns})")
    allowed = {"dilation"} if method == "dilated_conv" else set()
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"compress(method={method!r}) got unexpected options {sorted(unknown)}")
    if method in ("conv", "dilated_conv"):
        _checks.tensor("weight", weight, 3, x.dtype, x.device)
        if weight.shape[1] != d or weight.shape[2] != rate:
            raise ValueError(f"weight must have nn.Conv1d shape [d_out, d_in, rate] = "
                             f"[d_out, {d}, {rate}], got {tuple(weight.shape)}")
        _checks.tensor("bias", bias, 1, x.dtype, x.device, allow_none=True)
        if bias is not None:
            _checks.shape("bias", bias, (weight.shape[0],), "[d_out]")
        if method == "dilated_conv":
            options.setdefault("dilation", 2)
            _checks.positive_int("dilation", options["dilation"])
    elif weight is not None or bias is not None:
        raise ValueError(f"weight/bias are only used by the conv methods, not {method!r}")
    if method == "most_used":
        _checks.tensor("usage", usage, 2, device=x.device)
        _checks.shape("usage", usage, (B, ns), "[B, ns]")
    elif usage is not None:
        raise ValueError(f"usage is only used by method 'most_used', not {method!r}")

    impl = dispatch.resolve("compress", backend, x.device, method=method, dtype=x.dtype)
    return impl(x, rate, method, weight=weight, bias=bias, usage=usage, **options)


def _check_recon_inputs(q, old_k, old_v, comp_k, comp_v):
    _checks.tensor("q", q, 4)
    B, n, H, D = q.shape
    for name, t in (("old_k", old_k), ("old_v", old_v), ("comp_k", comp_k), ("comp_v", comp_v)):
        _checks.tensor(name, t, 4, q.dtype, q.device)
        if t.shape[0] != B or t.shape[2] != H or t.shape[3] != D:
            raise ValueError(f"{name} must have shape [B, S, H, D] = [{B}, S, {H}, {D}], "
                             f"got {tuple(t.shape)}")
    _checks.shape("old_v", old_v, old_k.shape, "old_k's shape")
    _checks.shape("comp_v", comp_v, comp_k.shape, "comp_k's shape")
    if old_k.shape[1] == 0 or comp_k.shape[1] == 0:
        raise ValueError("old_k and comp_k must hold at least one key each")
    if n == 0:  # the mean over no element is undefined
        raise ValueError("q must hold at least one query (q [B, n, H, D] with n >= 1)")


def attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, *, scale=None, backend="auto"):
    """mean over all elements of (attn(q, old) - attn(q, comp))^2 (paper Algorithm 2).

    Content-only, unmasked attention. q, old_k, old_v: constants (no gradient reaches them);
    gradients flow to comp_k and comp_v. Shapes: q [B, n, H, D], old_* [B, ns, H, D],
    comp_* [B, ns // rate, H, D].
    """
    _check_recon_inputs(q, old_k, old_v, comp_k, comp_v)
    _checks.scale(scale)
    impl = dispatch.resolve("recon_loss", backend, q.device, dtype=q.dtype, head_dim=q.shape[-1])
    return impl(q, old_k, old_v, comp_k, comp_v, scale=scale)


def autoencoding_loss(old, compressed, dec_weight, dec_bias=None, *, backend="auto"):
    """mean((old - g(compressed))^2) with g = nn.ConvTranspose1d(d_comp, d, rate, stride=rate).

    old [B, ns, d] (a constant), compressed [B, ns // rate, d_comp], dec_weight
    [d_comp, d, rate] (nn.ConvTranspose1d layout), dec_bias [d]. The decoder mirrors the
    conv compressor: each slot reconstructs exactly the window it summarises.
    """
    _checks.tensor("old", old, 3)
    B, ns, d = old.shape
    _checks.tensor("compressed", compressed, 3, old.dtype, old.device)
    _checks.tensor("dec_weight", dec_weight, 3, old.dtype, old.device)
    d_comp, _, rate = dec_weight.shape
    if dec_weight.shape[1] != d or rate < 1 or ns % rate != 0:
        raise ValueError(f"dec_weight must have nn.ConvTranspose1d shape [d_comp, {d}, rate] with "
                         f"rate dividing ns = {ns}, got {tuple(dec_weight.shape)}")
    _checks.shape("compressed", compressed, (B, ns // rate, d_comp), "[B, ns // rate, d_comp]")
    _checks.tensor("dec_bias", dec_bias, 1, old.dtype, old.device, allow_none=True)
    if dec_bias is not None:
        _checks.shape("dec_bias", dec_bias, (d,), "[d]")
    impl = dispatch.resolve("autoencoding_loss", backend, old.device, dtype=old.dtype)
    return impl(old, compressed, dec_weight, dec_bias)
