"""Pure-PyTorch reference implementations: the project's ground truth.

Every op here follows DESIGN.md literally and is written for clarity, not speed.
They run on any device and any floating dtype (float64 included) and are
differentiable through ordinary autograd, so ``torch.autograd.gradcheck`` applies.
Fast backends are tested against these functions.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class RelativePosition(NamedTuple):
    """Transformer-XL relative positions.

    r: [H, R, D] projected sinusoids, row ``delta`` = distance query->key (R >= cm+m+n).
    u: [H, D] content bias. v: [H, D] position bias.
    """

    r: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def key_valid_mask(batch, n, m, cm, mem_lens, cmem_lens, key_padding_mask, device):
    """[B, L] bool: which of the L = cm + m + n keys hold data (ignores causality)."""
    slots_c = torch.arange(cm, device=device)
    slots_m = torch.arange(m, device=device)
    if cmem_lens is None:
        valid_c = torch.ones(batch, cm, dtype=torch.bool, device=device)
    else:  # the newest cmem_lens[b] slots (right end of the buffer) are valid
        valid_c = slots_c[None, :] >= (cm - cmem_lens.to(device).long())[:, None]
    if mem_lens is None:
        valid_m = torch.ones(batch, m, dtype=torch.bool, device=device)
    else:
        valid_m = slots_m[None, :] >= (m - mem_lens.to(device).long())[:, None]
    if key_padding_mask is None:
        valid_s = torch.ones(batch, n, dtype=torch.bool, device=device)
    else:  # True = padded
        valid_s = ~key_padding_mask.to(device)
    return torch.cat([valid_c, valid_m, valid_s], dim=1)


def attention_mask(batch, n, m, cm, mem_lens, cmem_lens, key_padding_mask, causal, device):
    """[B, 1, n, L] bool: query i may attend key j (bottom-right-aligned causal mask)."""
    L = cm + m + n
    mask = key_valid_mask(batch, n, m, cm, mem_lens, cmem_lens, key_padding_mask, device)
    mask = mask[:, None, None, :].expand(batch, 1, n, L)
    if causal:
        i = torch.arange(n, device=device)[:, None]
        j = torch.arange(L, device=device)[None, :]
        mask = mask & (j <= cm + m + i)
    return mask


def relative_position_scores(q_plus_v, r, n, L):
    """[B, H, n, L] position term (q_i + v)·r_{delta(i, j)}, delta = (L - n) + i - j.

    Entries with j > L - n + i (negative distance) are filled from row 0; they are always
    masked by the causal mask.
    """
    # q_plus_v: [B, n, H, D]; r: [H, R, D]
    band = torch.einsum("bihd,hrd->bhir", q_plus_v, r)  # score against every distance
    i = torch.arange(n, device=r.device)[:, None]
    j = torch.arange(L, device=r.device)[None, :]
    delta = ((L - n) + i - j).clamp(min=0)  # [n, L]
    index = delta.expand(band.shape[0], band.shape[1], n, L)
    return torch.gather(band, 3, index)


def compressive_attention(
    q, k, v, mem_k=None, mem_v=None, cmem_k=None, cmem_v=None, *,
    mem_lens=None, cmem_lens=None, key_padding_mask=None, causal=True, scale=None,
    rel_pos: Optional[RelativePosition] = None, return_key_usage=False, store_score_grads=False,
    store_position_scores=False,
):
    """Attention of the segment's queries over [cmem | mem | segment]. Layout [B, N, H, D].
    store_score_grads and store_position_scores (choices of the Triton backward) change
    nothing here."""
    B, n, H, D = q.shape
    empty = q.new_empty(B, 0, H, D)
    cmem_k = empty if cmem_k is None else cmem_k
    cmem_v = empty if cmem_v is None else cmem_v
    mem_k = empty if mem_k is None else mem_k
    mem_v = empty if mem_v is None else mem_v
    cm, m = cmem_k.shape[1], mem_k.shape[1]
    L = cm + m + n
    scale = D ** -0.5 if scale is None else scale

    keys = torch.cat([cmem_k, mem_k, k], dim=1)    # [B, L, H, D]
    values = torch.cat([cmem_v, mem_v, v], dim=1)
    q_content = q if rel_pos is None else q + rel_pos.u[None, None]
    scores = torch.einsum("bihd,bjhd->bhij", q_content, keys)
    if rel_pos is not None:
        scores = scores + relative_position_scores(q + rel_pos.v[None, None], rel_pos.r, n, L)
    scores = scores * scale

    mask = attention_mask(B, n, m, cm, mem_lens, cmem_lens, key_padding_mask, causal, q.device)
    row_sees_any = mask.any(dim=-1, keepdim=True)  # rows that see nothing output zeros
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~row_sees_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_sees_any
    out = torch.einsum("bhij,bjhd->bihd", probs, values)
    if return_key_usage:
        usage = probs.detach().sum(dim=(1, 2))  # [B, L]: mass over heads and queries
        return out, usage
    return out


# ---------------------------------------------------------------------------- compression
def conv_weight_as_matrix(weight):
    """nn.Conv1d weight [d_out, d_in, rate] -> GEMM operand [rate * d_in, d_out].

    Row ``k * d_in + i`` multiplies x[t * rate + k, i], the layout of x.view(B, T, rate * d).
    """
    d_out, d_in, rate = weight.shape
    return weight.permute(2, 1, 0).reshape(rate * d_in, d_out)


def compress(x, rate, method, *, weight=None, bias=None, usage=None, dilation=2):
    """Compress [B, ns, d] into [B, ns // rate, d_out] (d_out = d except for convolutions)."""
    B, ns, d = x.shape
    T = ns // rate
    if method == "mean":
        return x.view(B, T, rate, d).mean(dim=2)
    if method == "max":
        return x.view(B, T, rate, d).amax(dim=2)
    if method == "conv":
        out = x.reshape(B, T, rate * d) @ conv_weight_as_matrix(weight)
        return out if bias is None else out + bias
    if method == "dilated_conv":
        # Slot t reads rows t*rate + rate-1 - (rate-1-k)*dilation, k = 0..rate-1: it ends at
        # the last row of its own window and reaches (rate-1)*dilation rows back (zeros
        # before row 0). nn.Conv1d(kernel=stride=rate, dilation) with left padding only.
        pad = (rate - 1) * (dilation - 1)
        xt = F.pad(x.transpose(1, 2), (pad, 0))
        return F.conv1d(xt, weight, bias, stride=rate, dilation=dilation).transpose(1, 2)
    if method == "most_used":
        keep = usage.topk(T, dim=1).indices.sort(dim=1).values  # order kept
        return torch.gather(x, 1, keep[:, :, None].expand(B, T, d))
    raise ValueError(f"unknown compression method {method!r}")


# ---------------------------------------------------------------------------- compressor losses
def _full_attention(q, k, v, scale):
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * scale, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, *, scale=None):
    """mean((attn(q, old) - attn(q, compressed))^2); content-only, unmasked attention.

    q, old_k, old_v are constants: gradients reach comp_k and comp_v only.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, old_k, old_v = q.detach(), old_k.detach(), old_v.detach()
    target = _full_attention(q, old_k, old_v, scale)
    return (target - _full_attention(q, comp_k, comp_v, scale)).pow(2).mean()


def autoencoding_loss(old, compressed, dec_weight, dec_bias=None):
    """mean((old - g(compressed))^2), g a transposed convolution with kernel = stride = rate.

    dec_weight is in nn.ConvTranspose1d layout [d_comp, d, rate]: slot t of ``compressed``
    reconstructs rows t*rate .. t*rate + rate - 1 of ``old``. ``old`` is a constant.
    """
    B, ns, d = old.shape
    d_comp, _, rate = dec_weight.shape
    # g(c)[b, t*rate + k, i] = sum_o c[b, t, o] * W[o, i, k] + bias[i]
    recon = (compressed @ dec_weight.reshape(d_comp, d * rate)).view(B, -1, d, rate)
    recon = recon.transpose(2, 3).reshape(B, ns, d)
    if dec_bias is not None:
        recon = recon + dec_bias
    return (old.detach() - recon).pow(2).mean()
