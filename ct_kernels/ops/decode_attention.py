"""Decode attention: the "cuda" backend of ``compressive_attention`` for 1..16 queries.

Calls ``torch.ops.ct_kernels.decode_attention`` (csrc/decode_attention.cu), a split-KV
forward that reads cmem, mem and the segment in place. Forward only: inputs that need
gradients, key usage, more than 16 queries, float32/64 or other head dims go elsewhere.
This module imports without the extension; the op is looked up only when called.
"""
from __future__ import annotations

import torch

from ct_kernels import dispatch

MAX_QUERIES = 16
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def _unsupported(*, dtype=None, head_dim=None, n=None, needs_grad=False, return_key_usage=False, **_):
    if n is None or n > MAX_QUERIES:
        return f"the decode kernel handles 1..{MAX_QUERIES} queries, got n={n}"
    if dtype not in DTYPES:
        return f"the decode kernel handles float16/bfloat16, got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"the decode kernel handles head dims {HEAD_DIMS}, got {head_dim}"
    if needs_grad:
        return "the decode kernel is forward only (inputs require grad)"
    if return_key_usage:
        return "the decode kernel does not return key usage"
    return None


def _rows_aligned(t):
    """t with a contiguous last dim, 16-byte aligned start and strides, else a contiguous copy."""
    if t is None:
        return None
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        size <= 1 or stride % 8 == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _source(k, v, lens):
    """(k, v, int32 lens) of one memory, or Nones where the memory is absent or empty."""
    if k is None or k.shape[1] == 0:
        return None, None, None
    lens = None if lens is None else lens.to(device=k.device, dtype=torch.int32).contiguous()
    return _rows_aligned(k), _rows_aligned(v), lens


@dispatch.register("attention", "cuda", unsupported=_unsupported)
def decode_attention(q, k, v, mem_k=None, mem_v=None, cmem_k=None, cmem_v=None, *,
                     mem_lens=None, cmem_lens=None, key_padding_mask=None, causal=True,
                     scale=None, rel_pos=None, return_key_usage=False, num_splits=0, out=None,
                     store_score_grads=False, store_position_scores=False):
    """Same contract as ``reference.compressive_attention`` (forward, no key usage).

    num_splits: key splits per (batch, head); 0 picks them from the GPU's occupancy.
    out: optional contiguous [B, n, H, D] output buffer to write into.
    store_score_grads, store_position_scores: choices of the Triton backward; ignored
    (forward only).
    """
    if return_key_usage:
        raise ValueError("decode_attention does not return key usage")
    from ct_kernels import _C  # noqa: F401  (registers torch.ops.ct_kernels.decode_attention)

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mem_k, mem_v, mem_lens = _source(mem_k, mem_v, mem_lens)
    cmem_k, cmem_v, cmem_lens = _source(cmem_k, cmem_v, cmem_lens)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous()
    r = u = pv = None
    if rel_pos is not None:
        r, u, pv = (_rows_aligned(t) for t in rel_pos)
    args = (_rows_aligned(q), _rows_aligned(k), _rows_aligned(v), mem_k, mem_v, cmem_k, cmem_v,
            mem_lens, cmem_lens, key_padding_mask, causal, scale, r, u, pv, num_splits)
    if out is None:
        return torch.ops.ct_kernels.decode_attention(*args)
    return torch.ops.ct_kernels.decode_attention.out(*args, out=out)
