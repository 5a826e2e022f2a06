"""Fused attention-reconstruction loss (paper Algorithm 2): triton backend of "recon_loss".

    loss = mean((attn(q, old_k, old_v) - attn(q, comp_k, comp_v))^2)

content-only, unmasked softmax attention; q, old_k, old_v are constants, so only comp_k and
comp_v receive gradients.

Forward, one program per (batch, head, query tile): both attentions run as online softmaxes
over their keys (old first, then compressed), the tile's squared difference is summed into
one partial per program, and neither attention output is written. One torch reduction sums
the partials in a fixed order (deterministic).

Backward needs, per query row, dO = -2 g (O_old - O_comp) / numel, the compressed
attention's log-sum-exp and delta = dO . O_comp. Recomputing O_old in the backward would
cost 4·n·ns·D FLOPs per head (as much as the old half of the forward); saving the
difference costs one [B, n, H, D] write and read. At the paper shapes the bytes take about a
fifth of the time of the FLOPs, so when a gradient is needed the forward also stores
diff = O_old - O_comp (in the input dtype), the log2-domain LSE and diff . O_comp. The
backward is one program per (batch, head, compressed-key tile) that loops over all query
tiles, so dK/dV accumulate in registers without atomics, and no dQ is computed. Its
probabilities are recomputed from the LSE (a quarter of the backward's FLOPs) rather than
saved: the [B, H, n, nc] matrix would cost about as much time in bytes, plus its memory.
The factor -2 g / numel is applied to the fp32 accumulators at the end: diff is stored
unscaled, which keeps it representable in float16.

On Hopper (sm_90), float16/bfloat16 with head dim 128, the "cuda" backend runs both passes
in ct_kernels._C instead (csrc/recon_loss_sm90.cu). The forward (persistent blocks,
warpgroup MMAs, the P V product of one key tile overlapping the softmax of the next) writes
the same partials and saved tensors; a second kernel there, launched as the forward's
programmatic dependent, sums the partials into the loss. The backward has the Triton
backward's blocking (128 compressed keys per block, all query tiles in turn), with the
score and dP products of a query tile issued together with the previous tile's dK and dV
products.

The launches take no float computed from shapes: the kernels get numel as an integer and
derive the default softmax scale from HEAD_DIM. Under torch.compile with dynamic shapes such
a float (1 / numel) is symbolic, inductor gives a symbolic float argument of a user-defined
Triton kernel an integer type, and the launch fails with "TypeError: 'float' object cannot
be interpreted as an integer".
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ct_kernels import dispatch
from ct_kernels.launch import cdiv, launch
# from the attention kernels: the bf16-safe dot (fp32 accumulation; exact in the CPU
# interpreter), the head-dim padding and the inputs they decline (dtype, head dim)
from ct_kernels.ops.attention import _dot, _dot_precision, _unsupported, padded_head_dim

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_valid, d_valid, MASKED: tl.constexpr):
    """A [rows, BLOCK_D] tile, masked (zeros outside the rows and the head dim) only where
    MASKED: a tail tile or a padded head dim; whole tiles load without masks."""
    if MASKED:
        tile = tl.load(ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, start, n_keys, qk_scale,
                         offs_d, d_valid, TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One key tile of the online softmax. Only the tail tile (TAIL) and a padded head dim
    need masked loads; the tail's keys past the end get -inf scores."""
    keys = start + tl.arange(0, BLOCK_N)
    key_valid = keys < n_keys
    masked: tl.constexpr = TAIL or BLOCK_D != HEAD_DIM
    k = _load_tile(K + keys[:, None] * stride_kn + offs_d[None, :], key_valid, d_valid, masked)
    v = _load_tile(V + keys[:, None] * stride_vn + offs_d[None, :], key_valid, d_valid, masked)
    s = _dot(q, tl.trans(k), DOT_PRECISION)  # raw scores
    if TAIL:
        s = tl.where(key_valid[None, :], s, float("-inf"))
    # rescale the running sums to the new row maximum (log2 domain: the scale is applied to
    # the row maximum and, inside the exponent's FMA, to each score)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _online_softmax_attention(q, K, V, stride_kn, stride_vn, n_keys, qk_scale,
                              offs_d, d_valid, DOT_PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """softmax(q K^T * scale) V for one query tile, unmasked: the full key tiles, then the
    partial last one. Returns (out fp32, lse in log2)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = n_keys // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, K, V, stride_kn, stride_vn, start, n_keys, qk_scale, offs_d,
            d_valid, False, DOT_PRECISION, BLOCK_N, BLOCK_D, HEAD_DIM)
    if full_end < n_keys:
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, K, V, stride_kn, stride_vn, full_end, n_keys, qk_scale, offs_d,
            d_valid, True, DOT_PRECISION, BLOCK_N, BLOCK_D, HEAD_DIM)
    return acc / l_i[:, None], m_i + tl.log2(l_i)


@triton.jit
def _launch_scalars(sm_scale, qk_scale, numel, HEAD_DIM: tl.constexpr,
                    DEFAULT_SCALE: tl.constexpr):
    """(softmax scale, softmax scale * log2(e), 1 / numel) as float32 scalars, each the
    float64 value rounded once: the default scale HEAD_DIM ** -0.5 (and its product with
    log2(e)) folds at compile time in float64, 1 / numel is divided in float64. Otherwise
    sm_scale and qk_scale are the caller's (float32 whoever launches: torch.compile passes
    Python floats as float64)."""
    if DEFAULT_SCALE:
        sm_scale = tl.full([], HEAD_DIM ** -0.5, tl.float32)
        qk_scale = tl.full([], HEAD_DIM ** -0.5 * 1.4426950408889634, tl.float32)
    else:
        sm_scale = tl.full([], sm_scale, tl.float32)
        qk_scale = tl.full([], qk_scale, tl.float32)
    inv_numel = (1.0 / tl.full([], numel, tl.float64)).to(tl.float32)
    return sm_scale, qk_scale, inv_numel


@triton.jit
def _recon_loss_fwd_kernel(
    Q, OLD_K, OLD_V, COMP_K, COMP_V, PARTIAL, DIFF, LSE, DELTA,
    stride_qb, stride_qn, stride_qh,
    stride_okb, stride_okn, stride_okh, stride_ovb, stride_ovn, stride_ovh,
    stride_ckb, stride_ckn, stride_ckh, stride_cvb, stride_cvn, stride_cvh,
    H, n, ns, nc, sm_scale, qk_scale, numel,
    HEAD_DIM: tl.constexpr, DEFAULT_SCALE: tl.constexpr, SAVE_FOR_BACKWARD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _, qk_scale, inv_numel = _launch_scalars(sm_scale, qk_scale, numel, HEAD_DIM, DEFAULT_SCALE)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < n
    d_valid = offs_d < HEAD_DIM
    tile_mask = row_valid[:, None] & d_valid[None, :]

    # the query tile stays in registers for both attentions
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=tile_mask, other=0.0)

    # attention over the old memories (the target), then over their compression
    out_old, _ = _online_softmax_attention(
        q, OLD_K + b * stride_okb + h * stride_okh, OLD_V + b * stride_ovb + h * stride_ovh,
        stride_okn, stride_ovn, ns, qk_scale, offs_d, d_valid,
        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    out_comp, lse_comp = _online_softmax_attention(
        q, COMP_K + b * stride_ckb + h * stride_ckh, COMP_V + b * stride_cvb + h * stride_cvh,
        stride_ckn, stride_cvn, nc, qk_scale, offs_d, d_valid,
        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)

    # squared difference of the tile, summed into this program's share of the mean
    diff = tl.where(tile_mask, out_old - out_comp, 0.0)
    tl.store(PARTIAL + pid_bh * tl.num_programs(0) + pid_m,
             tl.sum(tl.sum(diff * diff, 1), 0) * inv_numel)

    if SAVE_FOR_BACKWARD:
        # diff is contiguous [B, n, H, D]; lse and delta are [B, H, n]
        diff_ptrs = (DIFF + ((b * n + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :])
        diff_stored = diff.to(DIFF.dtype.element_ty)
        tl.store(diff_ptrs, diff_stored, mask=tile_mask)
        row = pid_bh * n + offs_m
        tl.store(LSE + row, lse_comp, mask=row_valid)
        tl.store(DELTA + row, tl.sum(diff_stored.to(tl.float32) * out_comp, 1), mask=row_valid)


@triton.jit
def _recon_loss_bwd_step(dk, dv, k, v, q_base, stride_qn, diff_base, Lse, Delta, start, n,
                         qk_scale, offs_d, d_valid, TAIL: tl.constexpr, H,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dK, dV of one query tile. Only the tail tile (TAIL) and a padded head dim need masked
    loads; the tail's rows past the end get lse = +inf, hence probability 0."""
    offs_m = start + tl.arange(0, BLOCK_M)
    row_valid = offs_m < n
    masked: tl.constexpr = TAIL or BLOCK_D != HEAD_DIM
    q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], row_valid, d_valid,
                   masked)
    diff = _load_tile(diff_base + offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :], row_valid,
                      d_valid, masked)
    if TAIL:
        lse = tl.load(Lse + offs_m, mask=row_valid, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=row_valid, other=0.0)
    else:
        lse = tl.load(Lse + offs_m)
        delta = tl.load(Delta + offs_m)
    # transposed probabilities P^T [BLOCK_N, BLOCK_M] from the saved LSE
    s_t = _dot(k, tl.trans(q), DOT_PRECISION) * qk_scale
    p_t = tl.exp2(s_t - lse[None, :])
    # dV += P^T dO and dK += dS^T q, with dO = diff (scaled at the end)
    dv += _dot(p_t.to(diff.dtype), diff, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(diff), DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _recon_loss_bwd_kernel(
    Q, COMP_K, COMP_V, DIFF, LSE, DELTA, GRAD_LOSS, D_COMP_K, D_COMP_V,
    stride_qb, stride_qn, stride_qh,
    stride_ckb, stride_ckn, stride_ckh, stride_cvb, stride_cvn, stride_cvh,
    H, n, nc, sm_scale, qk_scale, numel,
    HEAD_DIM: tl.constexpr, DEFAULT_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    sm_scale, qk_scale, inv_numel = _launch_scalars(sm_scale, qk_scale, numel, HEAD_DIM,
                                                    DEFAULT_SCALE)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    kv_mask = (offs_n < nc)[:, None] & d_valid[None, :]

    # this program's compressed keys/values stay in registers
    k = tl.load(COMP_K + b * stride_ckb + h * stride_ckh + offs_n[:, None] * stride_ckn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(COMP_V + b * stride_cvb + h * stride_cvh + offs_n[:, None] * stride_cvn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    q_base = Q + b * stride_qb + h * stride_qh
    diff_base = DIFF + (b * n * H + h) * HEAD_DIM  # contiguous [B, n, H, D]
    stats_base = pid_bh * n
    full_end = n // BLOCK_M * BLOCK_M
    for start in range(0, full_end, BLOCK_M):
        dk, dv = _recon_loss_bwd_step(
            dk, dv, k, v, q_base, stride_qn, diff_base, LSE + stats_base, DELTA + stats_base,
            start, n, qk_scale, offs_d, d_valid, False, H, DOT_PRECISION, BLOCK_M, BLOCK_D,
            HEAD_DIM)
    if full_end < n:
        dk, dv = _recon_loss_bwd_step(
            dk, dv, k, v, q_base, stride_qn, diff_base, LSE + stats_base, DELTA + stats_base,
            full_end, n, qk_scale, offs_d, d_valid, True, H, DOT_PRECISION, BLOCK_M, BLOCK_D,
            HEAD_DIM)

    # dO = -2 g diff / numel
    coef = -2.0 * tl.load(GRAD_LOSS).to(tl.float32) * inv_numel
    # the gradients are contiguous [B, nc, H, D]
    out_offs = ((b * nc + offs_n[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(D_COMP_K + out_offs, (dk * (coef * sm_scale)).to(D_COMP_K.dtype.element_ty), mask=kv_mask)
    tl.store(D_COMP_V + out_offs, (dv * coef).to(D_COMP_V.dtype.element_ty), mask=kv_mask)


def _unit_last_stride(t):
    # the kernels take any strides but the head dimension's, which must be 1
    return t if t.stride(-1) == 1 else t.contiguous()


# (BLOCK_M, BLOCK_N, num_warps, num_stages). D = 128: the fastest of the configurations timed
# on the H200 by benchmarks/bench_recon_loss.py:sweep (benchmarks/NOTES.md); smaller head
# dims and 256: chosen to fit sm_90 registers without spills (ptxas -v). The forward holds
# two fp32 [BLOCK_M, D] tiles (O_old while O_comp accumulates). float32 tiles take twice the
# registers and shared memory.
FWD_CONFIGS = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (64, 64, 4, 3),
               256: (64, 32, 8, 2)}
BWD_CONFIGS = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 128, 8, 3),
               256: (32, 64, 8, 2)}
FP32_FWD_CONFIG = (16, 32, 8, 2)
FP32_BWD_CONFIG = (32, 32, 8, 2)


def _fwd_config(block_d, dtype):
    return FP32_FWD_CONFIG if dtype == torch.float32 else FWD_CONFIGS[block_d]


def _bwd_config(block_d, dtype):
    """BLOCK_N is the compressed-key tile of a program, BLOCK_M the query step."""
    return FP32_BWD_CONFIG if dtype == torch.float32 else BWD_CONFIGS[block_d]


def _empty(shape, dtype, device):
    """Buffers the kernels write completely (tests replace this to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _scale_args(scale):
    """The launch's (sm_scale, qk_scale) arguments and DEFAULT_SCALE flag: scale None (the
    default head_dim ** -0.5) is computed in the kernel."""
    if scale is None:
        return (0.0, 0.0), dict(DEFAULT_SCALE=True)
    return (scale, scale * LOG2E), dict(DEFAULT_SCALE=False)


def _forward_buffers(q, programs, save_for_backward):
    """What a forward writes: one fp32 partial of the mean per program and, when saving for
    the backward, diff [B, n, H, D] (q's dtype), lse and delta [B, H, n] (fp32), else Nones."""
    B, n, H, _ = q.shape
    partial = _empty((programs,), torch.float32, q.device)
    if not save_for_backward:
        return partial, None, None, None
    return (partial, _empty(q.shape, q.dtype, q.device),
            _empty((B, H, n), torch.float32, q.device), _empty((B, H, n), torch.float32, q.device))


def recon_loss_forward(q, old_k, old_v, comp_k, comp_v, scale, save_for_backward, config=None):
    """(loss, diff, lse, delta); the last three are None unless save_for_backward.
    scale: the softmax scale, None for head_dim ** -0.5.
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages), default ``_fwd_config``."""
    B, n, H, D = q.shape
    block_d = padded_head_dim(D)
    block_m, block_n, num_warps, num_stages = config or _fwd_config(block_d, q.dtype)
    scales, scale_flag = _scale_args(scale)
    grid = (cdiv(n, block_m), B * H)
    partial, *saved = _forward_buffers(q, B * H * grid[0], save_for_backward)
    # placeholders where nothing is saved: the kernel's SAVE_FOR_BACKWARD branch is compiled out
    diff, lse, delta = saved if save_for_backward else (q, partial, partial)
    launch(_recon_loss_fwd_kernel, grid, (
        q, old_k, old_v, comp_k, comp_v, partial, diff, lse, delta,
        *q.stride()[:3], *old_k.stride()[:3], *old_v.stride()[:3],
        *comp_k.stride()[:3], *comp_v.stride()[:3],
        H, n, old_k.shape[1], comp_k.shape[1], *scales, q.numel()), dict(
        HEAD_DIM=D, **scale_flag, SAVE_FOR_BACKWARD=save_for_backward,
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages))
    return (partial.sum().to(q.dtype), *saved)


def recon_loss_backward(grad_loss, q, comp_k, comp_v, diff, lse, delta, scale, config=None):
    """(d comp_k, d comp_v), contiguous. scale as the forward's; config as ``_bwd_config``
    returns."""
    B, n, H, D = q.shape
    nc = comp_k.shape[1]
    block_d = padded_head_dim(D)
    block_m, block_n, num_warps, num_stages = config or _bwd_config(block_d, q.dtype)
    scales, scale_flag = _scale_args(scale)
    d_comp_k = _empty(comp_k.shape, comp_k.dtype, q.device)
    d_comp_v = _empty(comp_k.shape, comp_k.dtype, q.device)
    launch(_recon_loss_bwd_kernel, (cdiv(nc, block_n), B * H), (
        q, comp_k, comp_v, diff, lse, delta, grad_loss, d_comp_k, d_comp_v,
        *q.stride()[:3], *comp_k.stride()[:3], *comp_v.stride()[:3],
        H, n, nc, *scales, q.numel()), dict(
        HEAD_DIM=D, **scale_flag, DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages))
    return d_comp_k, d_comp_v


# the Hopper forward (csrc/recon_loss_sm90.cu): its head dim and its launch configurations
# (query rows per block, keys per tile, K/V stages); the default is the fastest at the
# benchmark shapes among those checked against the reference on the H200 (benchmarks/NOTES.md)
SM90_HEAD_DIM = 128
SM90_CONFIGS = ((64, 64, 3), (128, 64, 3), (128, 128, 2))
SM90_CONFIG = SM90_CONFIGS[0]


def _sm90_op_loaded() -> bool:
    return dispatch.extension_has("recon_loss_fwd_sm90", "recon_loss_bwd_sm90")


if _sm90_op_loaded():
    @torch.library.register_fake("ct_kernels::recon_loss_fwd_sm90")
    def _recon_loss_fwd_sm90_fake(q, old_k, old_v, comp_k, comp_v, scale, partial, diff, lse, delta,
                                  save_for_backward, block_m, block_n, stages):
        return q.new_empty(())  # the loss; the other outputs are arguments it writes

    @torch.library.register_fake("ct_kernels::recon_loss_bwd_sm90")
    def _recon_loss_bwd_sm90_fake(grad_loss, q, comp_k, comp_v, diff, lse, delta, scale, d_comp_k,
                                  d_comp_v):
        return None  # it writes d_comp_k and d_comp_v


def _sm90_unsupported(dtype=None, head_dim=None, **_):
    if not _sm90_op_loaded():
        return "ct_kernels._C was built without the sm_90 recon_loss ops"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the sm_90 forward needs float16 or bfloat16)"
    if head_dim != SM90_HEAD_DIM:
        return f"head dim {head_dim} (the sm_90 forward needs {SM90_HEAD_DIM})"
    if not dispatch.on_sm90():
        return "the sm_90 forward needs a Hopper GPU (compute capability 9.0)"
    return None


def recon_loss_forward_sm90(q, old_k, old_v, comp_k, comp_v, scale, save_for_backward,
                            config=None):
    """``recon_loss_forward`` on the sm_90 kernel: (loss, diff, lse, delta), the last three
    None unless save_for_backward. Inputs whose rows are not 16-byte aligned are copied (by
    the op: the TMA reads only aligned rows).
    config: (query rows per block, keys per tile, K/V stages), default ``SM90_CONFIG``."""
    B, n, H, D = q.shape
    block_m, block_n, stages = config or SM90_CONFIG
    partial, *saved = _forward_buffers(q, B * H * cdiv(n, block_m), save_for_backward)
    # where nothing is saved the op takes empty tensors and writes none
    diff, lse, delta = saved if save_for_backward else (
        q.new_empty(0), partial.new_empty(0), partial.new_empty(0))
    loss = torch.ops.ct_kernels.recon_loss_fwd_sm90(
        q, old_k, old_v, comp_k, comp_v,
        D ** -0.5 if scale is None else scale, partial, diff, lse, delta, save_for_backward,
        block_m, block_n, stages)
    return (loss, *saved)


def recon_loss_backward_sm90(grad_loss, q, comp_k, comp_v, diff, lse, delta, scale):
    """``recon_loss_backward`` on the sm_90 kernel: (d comp_k, d comp_v), contiguous, from
    what ``recon_loss_forward_sm90`` (or ``recon_loss_forward``) saved."""
    d_comp_k = _empty(comp_k.shape, comp_k.dtype, q.device)
    d_comp_v = _empty(comp_k.shape, comp_k.dtype, q.device)
    torch.ops.ct_kernels.recon_loss_bwd_sm90(
        grad_loss.to(q.dtype), q, comp_k, comp_v, diff, lse, delta,
        q.shape[-1] ** -0.5 if scale is None else scale, d_comp_k, d_comp_v)
    return d_comp_k, d_comp_v


class ReconLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, old_k, old_v, comp_k, comp_v, scale, sm90):
        needs_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        forward = recon_loss_forward_sm90 if sm90 else recon_loss_forward
        loss, diff, lse, delta = forward(q, old_k, old_v, comp_k, comp_v, scale, needs_grad)
        if needs_grad:
            ctx.save_for_backward(q, comp_k, comp_v, diff, lse, delta)
            ctx.scale = scale
            ctx.sm90 = sm90
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q, comp_k, comp_v, diff, lse, delta = ctx.saved_tensors
        backward = recon_loss_backward_sm90 if ctx.sm90 else recon_loss_backward
        d_comp_k, d_comp_v = backward(grad_loss, q, comp_k, comp_v, diff, lse, delta, ctx.scale)
        # q, old_k and old_v are constants of the loss
        return (None, None, None,
                d_comp_k if ctx.needs_input_grad[3] else None,
                d_comp_v if ctx.needs_input_grad[4] else None,
                None, None)


def _recon_loss(q, old_k, old_v, comp_k, comp_v, scale, sm90):
    scale = None if scale is None else float(scale)  # None: head_dim ** -0.5, in the kernels
    # q, old_k, old_v are constants: detach so that no gradient can be asked of them
    q, old_k, old_v = (_unit_last_stride(t.detach()) for t in (q, old_k, old_v))
    return ReconLossFunction.apply(q, old_k, old_v, _unit_last_stride(comp_k),
                                   _unit_last_stride(comp_v), scale, sm90)


@dispatch.register("recon_loss", "triton", unsupported=_unsupported)
def attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v, *, scale=None):
    """Same contract as ``reference.attention_reconstruction_loss``."""
    return _recon_loss(q, old_k, old_v, comp_k, comp_v, scale, sm90=False)


@dispatch.register("recon_loss", "cuda", unsupported=_sm90_unsupported)
def attention_reconstruction_loss_sm90(q, old_k, old_v, comp_k, comp_v, *, scale=None):
    """Same contract as ``reference.attention_reconstruction_loss``, on the sm_90 kernels of
    ct_kernels._C."""
    return _recon_loss(q, old_k, old_v, comp_k, comp_v, scale, sm90=True)
