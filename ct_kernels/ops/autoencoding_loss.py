"""Auto-encoding loss of the compressor: triton backend of "autoencoding_loss".

    loss = mean((old - g(compressed))^2),  g = nn.ConvTranspose1d(d_comp, d, rate, stride=rate)

Since kernel = stride = rate, the decoder is one GEMM: with old viewed as [B*T, rate*d]
(row t holds the window t*rate .. t*rate + rate - 1) and the weight permuted to
W[o, k*d + i] = dec_weight[o, i, k], g(compressed) = compressed @ W + bias (bias repeated
for each of the rate rows).

Forward: one Triton GEMM whose epilogue subtracts the tile from old, squares and sums it
into one partial per program; the reconstruction is never written. When gradients are
needed the epilogue also stores the residual old - g(compressed) (the size of old, in its
dtype), and the backward is a composition of two cuBLAS GEMMs and a column sum on it:
d compressed = c R W^T, dW = c compressed^T R, d bias = c sum R, c = -2 g / numel. Fusing
the backward would not pay: each output needs a full reduction over the other GEMM
dimension, so recomputing the residual per tile multiplies the forward's FLOPs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ct_kernels import dispatch
from ct_kernels.launch import cdiv, launch
# the bf16-safe dot of the attention kernels (fp32 accumulation; exact in the CPU interpreter)
from ct_kernels.ops.attention import _dot, _dot_precision


@triton.jit
def _autoencoding_loss_fwd_kernel(
    COMP, W, BIAS, OLD, PARTIAL, RESID,
    M, N, K, d,
    stride_cm, stride_wk, stride_om,
    HAS_BIAS: tl.constexpr, SAVE_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_valid = offs_m < M
    col_valid = offs_n < N

    # reconstruction tile: compressed [BLOCK_M, K] @ W [K, BLOCK_N], fp32 accumulation
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + offs_k
        k_valid = ks < K
        a = tl.load(COMP + offs_m[:, None] * stride_cm + ks[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(W + ks[:, None] * stride_wk + offs_n[None, :],
                    mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc += _dot(a, w, DOT_PRECISION)
    if HAS_BIAS:  # column k*d + i takes bias[i]
        acc += tl.load(BIAS + offs_n % d, mask=col_valid, other=0.0).to(tl.float32)[None, :]

    # epilogue: residual against old, squared and summed into this program's partial
    tile_mask = row_valid[:, None] & col_valid[None, :]
    tile_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    old = tl.load(OLD + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    resid = tl.where(tile_mask, old - acc, 0.0)
    tl.store(PARTIAL + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(resid * resid, 1), 0))
    if SAVE_RESIDUAL:
        tl.store(RESID + tile_offs, resid.to(RESID.dtype.element_ty), mask=tile_mask)


def _config(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 128, 128, 64, 8, 3


def _empty(shape, dtype, device):
    """Buffers the kernel writes completely (tests replace this to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def decoder_matrix(dec_weight):
    """[d_comp, d, rate] (nn.ConvTranspose1d) -> [d_comp, rate * d], column k * d + i."""
    d_comp, d, rate = dec_weight.shape
    return dec_weight.permute(0, 2, 1).reshape(d_comp, rate * d)


class AutoencodingLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, old, compressed, dec_weight, dec_bias):
        B, ns, d = old.shape
        d_comp, _, rate = dec_weight.shape
        M, N, K = B * (ns // rate), rate * d, d_comp
        old_mat = old.reshape(M, N).contiguous()
        comp_mat = compressed.reshape(M, K).contiguous()
        w_mat = decoder_matrix(dec_weight).contiguous()
        save = any(ctx.needs_input_grad[1:])

        block_m, block_n, block_k, num_warps, num_stages = _config(old.dtype)
        grid = (cdiv(M, block_m), cdiv(N, block_n))
        partial = _empty((grid[0] * grid[1],), torch.float32, old.device)
        resid = _empty((M, N), old.dtype, old.device) if save else old_mat
        launch(_autoencoding_loss_fwd_kernel, grid, (
            comp_mat, w_mat, dec_bias if dec_bias is not None else w_mat, old_mat, partial, resid,
            M, N, K, d, comp_mat.stride(0), w_mat.stride(0), old_mat.stride(0)), dict(
            HAS_BIAS=dec_bias is not None, SAVE_RESIDUAL=save,
            DOT_PRECISION=_dot_precision(old.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages))
        if save:
            ctx.save_for_backward(comp_mat, w_mat, resid)
            ctx.shapes = (compressed.shape, dec_weight.shape)
        return (partial.sum() / old.numel()).to(old.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        comp_mat, w_mat, resid = ctx.saved_tensors
        comp_shape, (comp_width, d, rate) = ctx.shapes
        # d loss / d recon = coef * resid; the scale is applied after each GEMM
        coef = grad_loss.float() * (-2.0 / resid.numel())
        d_compressed = d_weight = d_bias = None
        if ctx.needs_input_grad[1]:
            d_compressed = ((resid @ w_mat.t()) * coef).to(resid.dtype).view(comp_shape)
        if ctx.needs_input_grad[2]:
            d_w_mat = ((comp_mat.t() @ resid) * coef).to(resid.dtype)  # [d_comp, rate * d]
            d_weight = d_w_mat.view(comp_width, rate, d).permute(0, 2, 1).contiguous()
        if ctx.needs_input_grad[3]:
            d_bias = (resid.view(-1, d).sum(0, dtype=torch.float32) * coef).to(resid.dtype)
        return None, d_compressed, d_weight, d_bias


def _unsupported(dtype=None, **_):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (supported: float16, bfloat16, float32)"
    return None


@dispatch.register("autoencoding_loss", "triton", unsupported=_unsupported)
def autoencoding_loss(old, compressed, dec_weight, dec_bias=None):
    """Same contract as ``reference.autoencoding_loss``; ``old`` is a constant."""
    return AutoencodingLossFunction.apply(old.detach(), compressed, dec_weight, dec_bias)
