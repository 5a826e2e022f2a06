"""Fused compressive attention in Triton: forward, backward and per-key usage.

Queries of the segment attend over three key sources read in place from their own tensors
and strides, oldest first: compressed memory (cm slots), memory (m slots), the segment
itself (n slots); global key position j runs over [cmem | mem | segment]. Query i sits at
global position cm + m + i and sees key j iff j <= cm + m + i (bottom-right causal).

Kernels (one program per (tile, batch*head)):
  - ``_fwd_kernel``: online softmax in the log2 domain (scale * log2(e) applied to the row
    maxima and, inside the exponent's FMA, to each score), fp32 accumulators; stores the
    output and the log2-sum-exp (LSE, +inf for a row that sees no key, whose output is
    zero).
  - ``_bwd_dq_kernel``: delta = rowsum(dO * O), then dQ over the three sources (and, with
    relative positions, the gradients of r and of the per-distance bias by fp32 atomics, and
    the row sum of dQ).
  - ``_bwd_dkdv_kernel``: one key tile of one source against every query tile that sees it:
    dK, dV. With ``USAGE`` it instead sums the softmax
    mass each key receives (a pass over K only, recomputing probabilities from the saved
    LSE; heads are reduced on the host, so the usage is deterministic). With ``STORE_DS``
    (relative positions, ``store_score_grads``) it keeps the score gradients, by key and by
    distance, and with ``POS_KEPT`` (``store_position_scores``) it reads the position scores
    that the forward kept by key (``STORE_POS``) instead of scoring and re-aligning a band,
    and stores the gradients by key in their place, for
  - ``_bwd_dq_stored_kernel``: dQ, dr, dw from those stored gradients (no recompute); it
    replaces the dQ pass, and ``_bwd_delta_kernel`` computes delta before the dK/dV pass.
On Hopper (sm_90) with float16/bfloat16 and without key padding, the forward (head dims 64
and 128; with relative positions for bfloat16 causal calls) and, without relative positions,
the backward (head dim 128) run instead on ct_kernels._C's ``attention_fwd_sm90`` and
``attention_bwd_sm90`` (csrc/attention_sm90.cu; the backward computes delta itself, then makes
one pass over key blocks that also computes dQ, adding it into an fp32 buffer;
``SM90_FORWARD`` and ``SM90_BACKWARD`` switch them off). With relative positions and
``store_score_grads`` (bfloat16, causal, head dim 128) the sm_90 backward runs too: it reads the position scores by key (the forward's, if it kept them, else
scored by ``_position_scores_by_key_kernel``) and computes dK, dV and the content part of dQ,
storing the score gradients by distance; two products per head over the distances then add
the position part of dQ and give dr (``_sm90_relpos_backward``).
Masking is applied only on tiles that need it (partial memories, source tails, the causal
band, key padding); tiles with no valid key are skipped. Any head dim up to 256 runs: the
tiles' head-dim width BLOCK_D is HEAD_DIM padded to a power of two, and only where it pads do
loads and stores mask the columns past HEAD_DIM (``_in_head_dim``; compiled out otherwise).

Transformer-XL relative positions are a constexpr branch of the same kernels. The score
(q_i + u).k_j + (q_i + v).r_d, d = distance, is computed as (q_i + u).(k_j + r_d) + w_d with
w_d = (v - u).r_d: one biased query qu = q + u (formed on the host) serves both products,
and w [H, R] is a per-distance bias. A tile spans 2T distances (T = BLOCK_N; the dK/dV pass
T = max(BLOCK_M, BLOCK_N)), its position band: two halves of T rows of r (and w) scored with
tl.dot, re-aligned to (i, j) with tl.gather. In the query-major passes (forward, dQ) the next
key tile's upper half is this tile's lower half, so each tile scores one half; the two
halves are packed into one word per column (bfloat16 pairs for bfloat16 inputs, fp32 pairs
otherwise) so that one gather re-aligns both, and the dQ pass sums a distance's score
gradients over the two tiles that share it before the products with r and q and the
atomics.
Gradients: dq = dqu; du = sum_i dqu_i - dw.r; dv = dw.r; dr = dr(band) + dw (v - u).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ct_kernels import dispatch
from ct_kernels.launch import cdiv, launch, next_power_of_2

LOG2E = 1.4426950408889634

# Launch configurations for 16-bit inputs on the H200 (sm_90), from the kernel-level sweep
# ``python -m benchmarks.bench_attention --tune`` of 2026-11-29 (triton 3.6; head dims
# 64 and 128 measured on the DESIGN.md shapes, best geometric mean; 16 and 32 follow 64;
# relative positions at D = 64 on the d64 shape; their tiles re-measured with the packed
# bands, benchmarks/NOTES.md, Attention sections 10-12; D = 256: the fastest of five
# candidates per pass at B8-H8-n512-m512-cm1024, section 16):
# (pass, BLOCK_D) -> (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages), BLOCK_D the head
# dim padded to a power of two (other head dims run on the padded tiles, masked). Passes: "fwd",
# "dq", "dkdv" (also the key-usage pass); "_rel" with relative positions (the forward and
# dQ passes need BLOCK_M <= BLOCK_N there); "dkdv_stored_rel" / "dq_stored_rel", the backward
# from stored score gradients (benchmarks/NOTES.md, Attention section 17); "dkdv_kept_rel", its
# dK/dV pass reading the position scores that the forward kept (section 21; head dims 64 and
# 128 measured, the others follow 64 and the stored pass).
GPU_CONFIGS = {
    ("fwd", 16): (128, 64, 4, 3), ("fwd", 32): (128, 64, 4, 3),
    ("fwd", 64): (128, 64, 4, 3), ("fwd", 128): (64, 64, 4, 3),
    ("dq", 16): (128, 64, 4, 3), ("dq", 32): (128, 64, 4, 3),
    ("dq", 64): (128, 64, 4, 3), ("dq", 128): (64, 64, 4, 2),
    ("dkdv", 16): (32, 128, 4, 2), ("dkdv", 32): (32, 128, 4, 2),
    ("dkdv", 64): (32, 128, 4, 2), ("dkdv", 128): (32, 64, 4, 2),
    ("fwd_rel", 16): (64, 64, 4, 2), ("fwd_rel", 32): (64, 64, 4, 2),
    ("fwd_rel", 64): (64, 64, 4, 2), ("fwd_rel", 128): (64, 64, 4, 1),
    ("dq_rel", 16): (64, 64, 4, 2), ("dq_rel", 32): (64, 64, 4, 2),
    ("dq_rel", 64): (64, 64, 4, 2), ("dq_rel", 128): (64, 64, 4, 1),
    ("dkdv_rel", 16): (64, 64, 4, 1), ("dkdv_rel", 32): (64, 64, 4, 1),
    ("dkdv_rel", 64): (64, 64, 4, 1), ("dkdv_rel", 128): (32, 64, 4, 1),
    ("fwd", 256): (64, 32, 4, 2), ("dq", 256): (64, 32, 4, 2), ("dkdv", 256): (32, 64, 8, 1),
    ("fwd_rel", 256): (32, 32, 4, 1), ("dq_rel", 256): (32, 32, 4, 1),
    ("dkdv_rel", 256): (32, 32, 4, 1),
    ("dq_stored_rel", 16): (64, 64, 4, 3), ("dq_stored_rel", 32): (64, 64, 4, 3),
    ("dq_stored_rel", 64): (64, 64, 4, 3), ("dq_stored_rel", 128): (64, 64, 4, 3),
    ("dq_stored_rel", 256): (64, 32, 4, 2),
    ("dkdv_stored_rel", 16): (64, 64, 4, 1), ("dkdv_stored_rel", 32): (64, 64, 4, 1),
    ("dkdv_stored_rel", 64): (64, 64, 4, 1), ("dkdv_stored_rel", 128): (32, 64, 4, 1),
    ("dkdv_stored_rel", 256): (32, 32, 4, 1),
    ("dkdv_kept_rel", 16): (32, 128, 4, 3), ("dkdv_kept_rel", 32): (32, 128, 4, 3),
    ("dkdv_kept_rel", 64): (32, 128, 4, 3), ("dkdv_kept_rel", 128): (32, 64, 4, 3),
    ("dkdv_kept_rel", 256): (32, 32, 4, 1),
}
FP32_CONFIG = (32, 32, 4, 1)          # fp32 tiles take twice the registers / shared memory
INTERPRETER_CONFIG = (16, 16, 1, 1)   # small tiles keep the CPU interpreter fast
HEAD_DIMS = (16, 32, 64, 128, 256)  # the padded head dims (BLOCK_D) with tuned tiles
MAX_HEAD_DIM = HEAD_DIMS[-1]
# the stored score gradients' column blocks (one per key source) are padded to this, the
# widest key tile of the storing dK/dV pass
SCORE_GRAD_COLUMNS = 128
# float32 (a correctness path) stops at 128: above it its tiles spill kilobytes per thread,
# and it has not been run on a GPU
FP32_MAX_HEAD_DIM = 128


def padded_head_dim(head_dim: int) -> int:
    """The head dim padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


def launch_config(pass_name: str, head_dim: int, dtype: torch.dtype):
    if dispatch.triton_interpreted():
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FP32_CONFIG
    return GPU_CONFIGS[(pass_name, padded_head_dim(head_dim))]


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. PRECISION "upcast" is for the CPU interpreter, which
    multiplies bfloat16 operands as raw integers: there they go through fp32 (exact)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _in_head_dim(mask, d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile's row mask, also masking the columns d >= HEAD_DIM where BLOCK_D pads the head
    dim to a power of two (unchanged otherwise: no column mask is computed)."""
    if HEAD_DIM < BLOCK_D:
        mask = mask & (d < HEAD_DIM)
    return mask


@triton.jit
def _position_rows(R_h, sr_n, R_rows, first, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """r [BLOCK_T, D] of the distances first.. (zeros outside [0, R)), those distances and
    which of them exist."""
    rows = first + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    in_r = (rows >= 0) & (rows < R_rows)
    r = tl.load(R_h + rows[:, None] * sr_n + offs_d[None, :],
                mask=_in_head_dim(in_r[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D), other=0.0)
    return r, rows, in_r


@triton.jit
def _position_scores(q, R_h, W_h, sr_n, R_rows, first, KEY_MAJOR: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PRECISION: tl.constexpr):
    """(q_i + u).r_d + w_d of the BLOCK_T distances d = first..: [BLOCK_M, BLOCK_T], or the
    transpose [BLOCK_T, BLOCK_M] with KEY_MAJOR (q is q + u)."""
    r, rows, in_r = _position_rows(R_h, sr_n, R_rows, first, BLOCK_T, BLOCK_D, HEAD_DIM)
    w = tl.load(W_h + rows, mask=in_r, other=0.0)
    if KEY_MAJOR:
        scores = _dot(r, tl.trans(q), PRECISION) + w[:, None]
    else:
        scores = _dot(q, tl.trans(r), PRECISION) + w[None, :]
    return scores


@triton.jit
def _position_band(lower, upper, q):
    """A tile's position scores of the distances base.. from its lower and upper halves
    ([BLOCK_M, T] query-major, [T, BLOCK_M] key-major; fp32): column (row) c packs the
    scores of distances base + c and base + T + c into one word, rounded to bfloat16 pairs
    (uint32) for bfloat16 inputs (the inputs' precision; the content scores stay fp32),
    fp32 pairs (uint64) otherwise: one gather then serves both halves, and bfloat16 pairs
    halve the bytes it and the layout conversions around it move."""
    if q.dtype == tl.bfloat16:
        lo = lower.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = upper.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        band = lo | (hi << 16)
    else:
        lo = lower.to(tl.uint32, bitcast=True).to(tl.uint64)
        hi = upper.to(tl.uint32, bitcast=True).to(tl.uint64)
        band = lo | (hi << 32)
    return band


@triton.jit
def _sheared_position_scores(band, KEY_MAJOR: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """A tile's position scores (fp32) from its packed band (_position_band): [BLOCK_M,
    BLOCK_N] from a [BLOCK_M, T] band, or with KEY_MAJOR [BLOCK_N, BLOCK_M] from a
    [T, BLOCK_M] one. (query i, key j) has distance base + T + i - j, in the upper half iff
    i >= j, and either half's column (row) is (i - j) mod T."""
    if KEY_MAJOR:
        i = tl.arange(0, BLOCK_M)[None, :]
        j = tl.arange(0, BLOCK_N)[:, None]
        packed = tl.gather(band, (i - j + BLOCK_T) % BLOCK_T, 0)
    else:
        i = tl.arange(0, BLOCK_M)[:, None]
        j = tl.arange(0, BLOCK_N)[None, :]
        packed = tl.gather(band, (i - j + BLOCK_T) % BLOCK_T, 1)
    if band.dtype == tl.uint32:
        bits = tl.where(i >= j, packed >> 16, packed & 0xFFFF).to(tl.uint16)
        scores = bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        bits = tl.where(i >= j, packed >> 32, packed & 0xFFFFFFFF).to(tl.uint32)
        scores = bits.to(tl.float32, bitcast=True)
    return scores


@triton.jit
def _band_gradient(ds, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """The inverse of the shear: the score gradients of a query-major tile [BLOCK_M, T]
    (BLOCK_N = T) per distance, as the lower and upper halves [BLOCK_M, T] of its band
    (fp32). Distance c of either half is key (i - c) mod T, in the lower half's range of
    keys iff i < c: one gather serves both halves."""
    i = tl.arange(0, BLOCK_M)[:, None]
    c = tl.arange(0, BLOCK_T)[None, :]
    g = tl.gather(ds, (i - c + BLOCK_T) % BLOCK_T, 1).to(tl.float32)
    return tl.where(i < c, g, 0.0), tl.where(i >= c, g, 0.0)


@triton.jit
def _scores(q, k, pos, query_pos0, key_pos0, key_ok, apply_mask,
            KEY_MAJOR: tl.constexpr, CAUSAL: tl.constexpr, REL_POS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Unscaled scores, -inf where masked, of BLOCK_M queries x BLOCK_N keys (the callers
    fold scale * log2(e) into the exponent's fused multiply-add):
    [BLOCK_M, BLOCK_N] from k^T [D, BLOCK_N], or with KEY_MAJOR the transpose
    [BLOCK_N, BLOCK_M] from k [BLOCK_N, D]. With relative positions q is q + u and pos the
    tile's position scores, aligned to (query, key) like the result (fp32; where masked they
    may be anything, NaN included).

    query_pos0 / key_pos0: global positions of the tile's first query / key.
    """
    i = tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_N)
    if KEY_MAJOR:
        s = _dot(k, tl.trans(q), PRECISION)
    else:
        s = _dot(q, k, PRECISION)
    if REL_POS:
        s += pos
    if apply_mask:
        if KEY_MAJOR:
            keep = key_ok[:, None]
            if CAUSAL:
                keep = keep & (key_pos0 + j[:, None] <= query_pos0 + i[None, :])
        else:
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (key_pos0 + j[None, :] <= query_pos0 + i[:, None])
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _key_tile(Kp, sk_n, Pad, spad_n, start, size, valid_lo, pad_on, KEY_MAJOR: tl.constexpr,
              HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    """Keys start.. of a source (K^T [D, BLOCK_N], or K [BLOCK_N, D] with KEY_MAJOR),
    which of them hold data, and whether the tile needs masking for it (partial memory,
    source tail, key padding where ``pad_on``: the segment's keys)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_src = offs_n < size
    if KEY_MAJOR:
        k = tl.load(Kp + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=_in_head_dim(in_src[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D),
                    other=0.0)
    else:
        k = tl.load(Kp + offs_n[None, :] * sk_n + offs_d[:, None],
                    mask=_in_head_dim(in_src[None, :], offs_d[:, None], HEAD_DIM, BLOCK_D),
                    other=0.0)
    key_ok = in_src & (offs_n >= valid_lo)
    partial = (start < valid_lo) | (start + BLOCK_N > size)
    if HAS_PAD:
        padded = tl.load(Pad + offs_n * spad_n, mask=tl.where(pad_on, in_src, False), other=0)
        key_ok = key_ok & (padded == 0)
        partial = partial | pad_on
    return k, key_ok, partial


@triton.jit
def _query_program(Q, MemLens, CmemLens, R, W, Pad, sq_b, sq_n, sq_h, spad_b,
                   sr_h, H, n, m, cm, R_rows, HAS_MEM_LENS: tl.constexpr,
                   HAS_CMEM_LENS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """What a query-tile program (forward, dQ) starts from: its batch and head, query rows,
    the query tile, where each memory's valid slots begin, the tile's global position, the
    end of the segment keys it sees, and its per-head / per-sample base pointers (r, w, key
    padding)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                mask=_in_head_dim(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D),
                other=0.0)
    valid_lo_c = cm - tl.load(CmemLens + b) if HAS_CMEM_LENS else 0
    valid_lo_m = m - tl.load(MemLens + b) if HAS_MEM_LENS else 0
    query_pos0 = cm + m + pid_m * BLOCK_M
    seg_hi = tl.minimum(n, pid_m * BLOCK_M + BLOCK_M) if CAUSAL else n
    return (pid_bh, b, h, offs_m, offs_d, row_ok, q, valid_lo_c, valid_lo_m, query_pos0,
            seg_hi, R + h * sr_h, W + h * R_rows, Pad + b * spad_b)


@triton.jit
def _query_major_scores(q, upper, Kp, sk_n, Pad, spad_n, start, size, valid_lo, key_base,
                        query_pos0, R_h, W_h, sr_n, R_rows,
                        IS_SEGMENT: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                        REL_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Scores of the key tile at slot ``start`` of a source for a query tile (forward, dQ):
    (scores, k^T, lower, pos). With relative positions the tile spans the distances
    query_pos0 - (key_base + start) - T + [0, 2T): ``upper`` is the upper half, carried from
    the previous tile, and the lower half scored here is returned for the next tile (BLOCK_N
    = T keys on) to take as its upper half; without, ``upper`` passes through. pos: the
    tile's position scores aligned to (query, key) (a placeholder without)."""
    kt, key_ok, apply_mask = _key_tile(Kp, sk_n, Pad, spad_n, start, size, valid_lo, True,
                                       False, HAS_PAD and IS_SEGMENT, BLOCK_N, BLOCK_D,
                                       HEAD_DIM)
    if IS_SEGMENT and CAUSAL:  # the diagonal band: some key after some query
        apply_mask = apply_mask | (key_base + start + BLOCK_N - 1 > query_pos0)
    pos = 0.0
    lower = upper
    if REL_POS:
        lower = _position_scores(q, R_h, W_h, sr_n, R_rows,
                                 query_pos0 - key_base - start - BLOCK_T, False, BLOCK_T,
                                 BLOCK_D, HEAD_DIM, PRECISION)
        pos = _sheared_position_scores(_position_band(lower, upper, q), False, BLOCK_M,
                                       BLOCK_N, BLOCK_T)
    s = _scores(q, kt, pos, query_pos0, key_base + start, key_ok, apply_mask,
                False, CAUSAL, REL_POS, BLOCK_M, BLOCK_N, PRECISION)
    return s, kt, lower, pos


@triton.jit
def _first_upper_half(q, R_h, W_h, sr_n, R_rows, first, key_base, query_pos0,
                      REL_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """The upper half of the band of a source's first key tile (slot ``first``), the carry
    that ``_query_major_scores`` starts from (a placeholder without relative positions)."""
    upper = 0.0
    if REL_POS:
        upper = _position_scores(q, R_h, W_h, sr_n, R_rows, query_pos0 - key_base - first,
                                 False, BLOCK_T, BLOCK_D, HEAD_DIM, PRECISION)
    return upper


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_source(acc, m_i, l_i, q, Kp, Vp, sk_n, sv_n, Pad, spad_n, size, valid_lo, hi,
                key_base, query_pos0, R_h, W_h, sr_n, R_rows, PS_src, row_ok, scale_log2,
                IS_SEGMENT: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                REL_POS: tl.constexpr, STORE_POS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over slots [first tile with valid slots, hi) of one key source; with
    STORE_POS each tile's position scores also go to the query rows' pointers PS_src (the
    source's first column, _fwd_kernel)."""
    offs_d = tl.arange(0, BLOCK_D)
    first = valid_lo // BLOCK_N * BLOCK_N
    upper = _first_upper_half(q, R_h, W_h, sr_n, R_rows, first, key_base, query_pos0, REL_POS,
                              BLOCK_T, BLOCK_D, HEAD_DIM, PRECISION)
    for start in range(first, hi, BLOCK_N):
        s, _, upper, pos = _query_major_scores(
            q, upper, Kp, sk_n, Pad, spad_n, start, size, valid_lo, key_base, query_pos0, R_h,
            W_h, sr_n, R_rows, IS_SEGMENT, HAS_PAD, CAUSAL, REL_POS, BLOCK_M,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_T, PRECISION)
        if STORE_POS:  # whole tiles (keys past the source land in its padding)
            tl.store(PS_src + start + tl.arange(0, BLOCK_N)[None, :],
                     pos.to(PS_src.dtype.element_ty), mask=row_ok[:, None])
        # rescale the running state (log2 domain: the maximum of the raw scores is scaled
        # per row, each score in the exponent's FMA); a row with no key yet keeps m = -inf,
        # l = 0, acc = 0
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s * scale_log2 - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        offs_n = start + tl.arange(0, BLOCK_N)
        v = tl.load(Vp + offs_n[:, None] * sv_n + offs_d[None, :],
                    mask=_in_head_dim((offs_n < size)[:, None], offs_d[None, :], HEAD_DIM,
                                      BLOCK_D), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, MK, MV, CK, CV, Out, Lse, MemLens, CmemLens, Pad, R, W, PS,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    smk_b, smk_n, smk_h, smv_b, smv_n, smv_h, sck_b, sck_n, sck_h, scv_b, scv_n, scv_h,
    so_b, so_n, so_h, spad_b, spad_n, sr_h, sr_n, sps_n, ps_col_m, ps_col_s,
    H, n, m, cm, R_rows, scale_log2,
    HAS_MEM_LENS: tl.constexpr, HAS_CMEM_LENS: tl.constexpr, HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, REL_POS: tl.constexpr, STORE_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):
    # query tile (q + u with relative positions)
    (pid_bh, b, h, offs_m, offs_d, row_ok, q, valid_lo_c, valid_lo_m, query_pos0, seg_hi, R_h,
     W_h, Pad_b) = _query_program(
        Q, MemLens, CmemLens, R, W, Pad, sq_b, sq_n, sq_h, spad_b, sr_h, H, n, m, cm, R_rows,
        HAS_MEM_LENS, HAS_CMEM_LENS, CAUSAL, BLOCK_M, BLOCK_D, HEAD_DIM)
    # with STORE_POS: this tile's rows of the position scores by key (the layout of the
    # stored score gradients, _Call.score_grad_columns)
    PS_rows = PS + pid_bh.to(tl.int64) * n * sps_n + offs_m[:, None].to(tl.int64) * sps_n

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # the three key sources, oldest first: cmem, mem, segment
    acc, m_i, l_i = _fwd_source(
        acc, m_i, l_i, q, CK + b * sck_b + h * sck_h, CV + b * scv_b + h * scv_h,
        sck_n, scv_n, Pad_b, spad_n, cm, valid_lo_c, cm, 0, query_pos0, R_h, W_h, sr_n, R_rows,
        PS_rows, row_ok, scale_log2, False, HAS_PAD, CAUSAL, REL_POS, STORE_POS, BLOCK_M,
        BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_T, PRECISION)
    acc, m_i, l_i = _fwd_source(
        acc, m_i, l_i, q, MK + b * smk_b + h * smk_h, MV + b * smv_b + h * smv_h,
        smk_n, smv_n, Pad_b, spad_n, m, valid_lo_m, m, cm, query_pos0, R_h, W_h, sr_n, R_rows,
        PS_rows + ps_col_m, row_ok, scale_log2, False, HAS_PAD, CAUSAL, REL_POS, STORE_POS,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_T, PRECISION)
    acc, m_i, l_i = _fwd_source(
        acc, m_i, l_i, q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
        sk_n, sv_n, Pad_b, spad_n, n, 0, seg_hi, cm + m, query_pos0, R_h, W_h, sr_n, R_rows,
        PS_rows + ps_col_s, row_ok, scale_log2, True, HAS_PAD, CAUSAL, REL_POS, STORE_POS,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_T, PRECISION)

    # epilogue: normalise; rows that saw no key output zeros and store LSE = +inf
    no_key = l_i == 0.0
    out = acc / tl.where(no_key, 1.0, l_i)[:, None]
    tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
             out.to(Out.dtype.element_ty),
             mask=_in_head_dim(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D))
    lse = tl.where(no_key, float("inf"), m_i + tl.math.log2(tl.where(no_key, 1.0, l_i)))
    tl.store(Lse + pid_bh.to(tl.int64) * n + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward: dQ
@triton.jit
def _row_delta(Out, DO, Delta, b, h, pid_bh, offs_m, offs_d, row_ok, so_b, so_n, so_h, sdo_b,
               sdo_n, sdo_h, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A query tile's dO, and delta = rowsum(dO * O), stored for the dK/dV pass."""
    tile_ok = _in_head_dim(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :],
                 mask=tile_ok, other=0.0)
    o = tl.load(Out + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
                mask=tile_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * n + offs_m, delta, mask=row_ok)
    return do, delta


@triton.jit
def _store_dq(DQ, DQSUM, dq, b, h, offs_m, offs_d, row_ok, n, H, REL_POS: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores a query tile's dq (contiguous [B, n, H, D]); with relative positions its sum
    over rows (the gradient of q + u) is added into DQSUM (fp32 atomics)."""
    tl.store(DQ + b * n * H * HEAD_DIM + h * HEAD_DIM + offs_m[:, None] * H * HEAD_DIM
             + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=_in_head_dim(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D))
    if REL_POS:
        tl.atomic_add(DQSUM + h * HEAD_DIM + offs_d, tl.sum(dq, 0),
                      mask=_in_head_dim(offs_d >= 0, offs_d, HEAD_DIM, BLOCK_D), sem="relaxed")


@triton.jit
def _position_gradients(dq, grad, q, R_h, DR_h, DW_h, sr_n, R_rows, first,
                        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Adds the position part of dQ for the BLOCK_T distances first.. (grad: their score
    gradients per query, fp32 [BLOCK_M, BLOCK_T]) and their dr, dw contributions (atomics)."""
    r, rows, in_r = _position_rows(R_h, sr_n, R_rows, first, BLOCK_T, BLOCK_D, HEAD_DIM)
    g = grad.to(q.dtype)
    dq += _dot(g, r, PRECISION)
    dr = _dot(tl.trans(g), q, PRECISION)  # [BLOCK_T, D]
    offs_d = tl.arange(0, BLOCK_D)
    tl.atomic_add(DR_h + rows[:, None] * HEAD_DIM + offs_d[None, :], dr,
                  mask=_in_head_dim(in_r[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D),
                  sem="relaxed")
    tl.atomic_add(DW_h + rows, tl.sum(grad, 0), mask=in_r, sem="relaxed")
    return dq


@triton.jit
def _dq_source(dq, q, do, lse, delta, Kp, Vp, sk_n, sv_n, Pad, spad_n, size, valid_lo, hi,
               key_base, query_pos0, R_h, W_h, DR_h, DW_h, sr_n, R_rows, scale_log2, scale,
               HEAD_DIM: tl.constexpr, IS_SEGMENT: tl.constexpr, HAS_PAD: tl.constexpr,
               CAUSAL: tl.constexpr, REL_POS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
               PRECISION: tl.constexpr):
    """dQ (content and position parts in one accumulator) and the dr, dw contributions of
    one key source, tiles as in the forward. A distance is shared by two consecutive tiles
    (the lower half of one is the upper half of the next): its score gradients are summed
    over both before they meet r, q and the atomics."""
    offs_d = tl.arange(0, BLOCK_D)
    first = valid_lo // BLOCK_N * BLOCK_N
    upper = _first_upper_half(q, R_h, W_h, sr_n, R_rows, first, key_base, query_pos0, REL_POS,
                              BLOCK_T, BLOCK_D, HEAD_DIM, PRECISION)
    if REL_POS:
        grad_upper = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    for start in range(first, hi, BLOCK_N):
        s, kt, upper, _ = _query_major_scores(
            q, upper, Kp, sk_n, Pad, spad_n, start, size, valid_lo, key_base, query_pos0, R_h,
            W_h, sr_n, R_rows, IS_SEGMENT, HAS_PAD, CAUSAL, REL_POS, BLOCK_M,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_T, PRECISION)
        p = tl.math.exp2(s * scale_log2 - lse[:, None])
        offs_n = start + tl.arange(0, BLOCK_N)
        vt = tl.load(Vp + offs_n[None, :] * sv_n + offs_d[:, None],
                     mask=_in_head_dim((offs_n < size)[None, :], offs_d[:, None], HEAD_DIM,
                                       BLOCK_D), other=0.0)
        dp = _dot(do, vt, PRECISION)
        # gradient of the unscaled score (q + u).k (+ position term); without relative
        # positions the softmax scale is applied to dq once, at the end
        ds = p * (dp - delta[:, None])
        if REL_POS:  # the position gradients take ds per distance: scaled here
            ds = ds * scale
        ds = ds.to(kt.dtype)
        dq += _dot(ds, tl.trans(kt), PRECISION)
        if REL_POS:
            # this tile's upper distances are complete (no later tile reaches them)
            grad_lower, grad_tile_upper = _band_gradient(ds, BLOCK_M, BLOCK_T)
            dq = _position_gradients(dq, grad_upper + grad_tile_upper, q, R_h, DR_h, DW_h,
                                     sr_n, R_rows, query_pos0 - key_base - start, HEAD_DIM,
                                     BLOCK_T, BLOCK_D, PRECISION)
            grad_upper = grad_lower
    if REL_POS:
        if hi > first:  # the last tile's lower distances
            last = first + (hi - 1 - first) // BLOCK_N * BLOCK_N
            dq = _position_gradients(dq, grad_upper, q, R_h, DR_h, DW_h, sr_n, R_rows,
                                     query_pos0 - key_base - last - BLOCK_T, HEAD_DIM,
                                     BLOCK_T, BLOCK_D, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, MK, MV, CK, CV, Out, DO, DQ, Lse, Delta, MemLens, CmemLens, Pad, R, W,
    DR, DW, DQSUM,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    smk_b, smk_n, smk_h, smv_b, smv_n, smv_h, sck_b, sck_n, sck_h, scv_b, scv_n, scv_h,
    so_b, so_n, so_h, sdo_b, sdo_n, sdo_h, spad_b, spad_n, sr_h, sr_n,
    H, n, m, cm, R_rows, scale_log2, scale,
    HAS_MEM_LENS: tl.constexpr, HAS_CMEM_LENS: tl.constexpr, HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, REL_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):
    (pid_bh, b, h, offs_m, offs_d, row_ok, q, valid_lo_c, valid_lo_m, query_pos0, seg_hi, R_h,
     W_h, Pad_b) = _query_program(
        Q, MemLens, CmemLens, R, W, Pad, sq_b, sq_n, sq_h, spad_b, sr_h, H, n, m, cm, R_rows,
        HAS_MEM_LENS, HAS_CMEM_LENS, CAUSAL, BLOCK_M, BLOCK_D, HEAD_DIM)

    do, delta = _row_delta(Out, DO, Delta, b, h, pid_bh, offs_m, offs_d, row_ok, so_b, so_n,
                           so_h, sdo_b, sdo_n, sdo_h, n, HEAD_DIM, BLOCK_D)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * n + offs_m, mask=row_ok, other=float("inf"))
    DR_h = DR + h * R_rows * HEAD_DIM
    DW_h = DW + h * R_rows

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_source(
        dq, q, do, lse, delta, CK + b * sck_b + h * sck_h, CV + b * scv_b + h * scv_h,
        sck_n, scv_n, Pad_b, spad_n, cm, valid_lo_c, cm, 0, query_pos0, R_h, W_h, DR_h, DW_h,
        sr_n, R_rows, scale_log2, scale, HEAD_DIM, False, HAS_PAD, CAUSAL, REL_POS,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_T, PRECISION)
    dq = _dq_source(
        dq, q, do, lse, delta, MK + b * smk_b + h * smk_h, MV + b * smv_b + h * smv_h,
        smk_n, smv_n, Pad_b, spad_n, m, valid_lo_m, m, cm, query_pos0, R_h, W_h, DR_h, DW_h,
        sr_n, R_rows, scale_log2, scale, HEAD_DIM, False, HAS_PAD, CAUSAL, REL_POS,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_T, PRECISION)
    dq = _dq_source(
        dq, q, do, lse, delta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
        sk_n, sv_n, Pad_b, spad_n, n, 0, seg_hi, cm + m, query_pos0, R_h, W_h, DR_h, DW_h,
        sr_n, R_rows, scale_log2, scale, HEAD_DIM, True, HAS_PAD, CAUSAL, REL_POS,
        BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_T, PRECISION)

    if not REL_POS:
        dq = dq * scale
    _store_dq(DQ, DQSUM, dq, b, h, offs_m, offs_d, row_ok, n, H, REL_POS, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- backward: dQ from
# stored score gradients (relative positions, ``store_score_grads``): the dK/dV pass runs first
# and keeps the scaled score gradients twice, by key (DS [B*H, n, row], each source's columns
# in a block padded to SCORE_GRAD_COLUMNS, from columns 0, ds_col_m, ds_col_s) and by distance
# (DG, row i's key j at column cm + m + i - j); this pass reads them back instead of
# recomputing scores, probabilities and dP: DS against K, DG against r, with no re-alignment
# in registers, both as whole aligned rows (vector loads; a sheared read of DS alone costs
# more than the second store), the entries the dK/dV pass did not write dropped after loading.
@triton.jit
def _bwd_delta_kernel(Out, DO, Delta, so_b, so_n, so_h, sdo_b, sdo_n, sdo_h, H, n,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O), for a backward whose dK/dV pass runs before its dQ pass."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    _row_delta(Out, DO, Delta, (pid_bh // H).to(tl.int64), pid_bh % H, pid_bh, offs_m,
               tl.arange(0, BLOCK_D), offs_m < n, so_b, so_n, so_h, sdo_b, sdo_n, sdo_h, n,
               HEAD_DIM, BLOCK_D)


@triton.jit
def _stored_dq_source(dq, DS_src, Kp, sk_n, size, valid_lo, hi, key_base, query_pos, row_ok,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PRECISION: tl.constexpr):
    """The content part of dQ from one key source: stored dS [BLOCK_M, keys] @ K over its
    slots [valid_lo, hi) (DS_src: the query rows' pointers to the source's first column). Only
    entries the dK/dV pass wrote are used (valid slots, keys at or before the query)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(valid_lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= valid_lo) & (offs_n < size)
        written = (row_ok[:, None] & key_ok[None, :]
                   & (key_base + offs_n[None, :] <= query_pos[:, None]))
        # whole aligned rows (vector loads), the entries not written dropped after the load
        ds = tl.where(written, tl.load(DS_src + offs_n[None, :], mask=row_ok[:, None]), 0.0)
        k = tl.load(Kp + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=_in_head_dim(key_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D),
                    other=0.0)
        dq += _dot(ds.to(k.dtype), k, PRECISION)  # (stored in fp32 for float16 inputs)
    return dq


@triton.jit
def _bwd_dq_stored_kernel(
    Q, K, MK, CK, DS, DG, DQ, MemLens, CmemLens, R, W, DR, DW, DQSUM,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, smk_b, smk_n, smk_h, sck_b, sck_n, sck_h, sr_h, sr_n,
    sds_n, ds_col_m, ds_col_s,
    H, n, m, cm, R_rows,
    HAS_MEM_LENS: tl.constexpr, HAS_CMEM_LENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    (pid_bh, b, h, offs_m, offs_d, row_ok, q, valid_lo_c, valid_lo_m, query_pos0, seg_hi, R_h,
     W_h, _) = _query_program(
        Q, MemLens, CmemLens, R, W, Q, sq_b, sq_n, sq_h, 0, sr_h, H, n, m, cm, R_rows,
        HAS_MEM_LENS, HAS_CMEM_LENS, True, BLOCK_M, BLOCK_D, HEAD_DIM)
    query_pos = query_pos0 + tl.arange(0, BLOCK_M)
    rows = pid_bh.to(tl.int64) * n * sds_n + offs_m[:, None].to(tl.int64) * sds_n
    DS_rows, DG_rows = DS + rows, DG + rows

    # content part: dS against the keys of each source, oldest first
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _stored_dq_source(dq, DS_rows, CK + b * sck_b + h * sck_h, sck_n, cm, valid_lo_c, cm,
                           0, query_pos, row_ok, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
    dq = _stored_dq_source(dq, DS_rows + ds_col_m, MK + b * smk_b + h * smk_h, smk_n, m,
                           valid_lo_m, m, cm, query_pos, row_ok, BLOCK_N, BLOCK_D, HEAD_DIM,
                           PRECISION)
    dq = _stored_dq_source(dq, DS_rows + ds_col_s, K + b * sk_b + h * sk_h, sk_n, n, 0, seg_hi,
                           cm + m, query_pos, row_ok, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)

    # position part: the gradients by distance d (DG), in tiles of BLOCK_N up to the oldest
    # valid key's distance from the tile's last row; only entries written are used (row i's
    # key j = cm + m + i - d exists, and is not a memory slot before the valid ones)
    oldest = tl.where(valid_lo_c < cm, valid_lo_c,
                      tl.where(valid_lo_m < m, cm + valid_lo_m, cm + m))
    DR_h = DR + h * R_rows * HEAD_DIM
    DW_h = DW + h * R_rows
    for first in range(0, query_pos0 + BLOCK_M - oldest, BLOCK_N):
        dist = first + tl.arange(0, BLOCK_N)
        j = query_pos[:, None] - dist[None, :]
        written = row_ok[:, None] & (j >= 0)
        written = written & tl.where(j < cm, j >= valid_lo_c,
                                     (j >= cm + m) | (j - cm >= valid_lo_m))
        grad = tl.load(DG_rows + dist[None, :], mask=row_ok[:, None] & (dist < sds_n)[None, :])
        grad = tl.where(written, grad.to(tl.float32), 0.0)
        dq = _position_gradients(dq, grad, q, R_h, DR_h, DW_h, sr_n, R_rows, first, HEAD_DIM,
                                 BLOCK_N, BLOCK_D, PRECISION)
    _store_dq(DQ, DQSUM, dq, b, h, offs_m, offs_d, row_ok, n, H, True, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- backward: dK/dV
@triton.jit
def _kept_position_scores(DS_src, qs, offs_n, n, sds_n, BLOCK_M: tl.constexpr):
    """The position scores that the forward kept by key ([keys, BLOCK_M] of the query tile
    at qs; zeros past n)."""
    offs_m = qs + tl.arange(0, BLOCK_M)
    return tl.load(DS_src + offs_m[None, :].to(tl.int64) * sds_n + offs_n[:, None],
                   mask=(offs_m < n)[None, :], other=0.0)


@triton.jit
def _dkdv_tile(Q, DO, Lse, Delta, Usage, DS_src, DG_bh, sds_n, sq_n, sdo_n, Kp, Vp, sk_n, sv_n,
               DKp, DVp, row_stride, Pad, spad_n, size, valid_lo, key_base, start, is_segment, n,
               query_base, R_h, W_h, sr_n, R_rows, scale_log2, scale,
               HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, REL_POS: tl.constexpr,
               USAGE: tl.constexpr, STORE_DS: tl.constexpr, POS_KEPT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile (slots start.. of a source) against every query tile that sees it:
    writes dK, dV into the source's gradient tensors (contiguous [B, S, H, D]), or with
    USAGE the per-key softmax mass into Usage (this head's row of [B, H, L]). With
    STORE_DS (relative positions) it also stores the scaled score gradients into this head's
    rows (stride sds_n) of DS, by key (DS_src: the source's first column), and of DG, by
    distance; with POS_KEPT it first reads the position scores that the forward kept in DS
    (the entries it overwrites are this program's keys: each is read before it is
    overwritten)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_src = offs_n < size
    # key-major tiles ([keys, queries]): P^T and dS^T feed the dV / dK products directly
    k, key_ok, partial = _key_tile(Kp, sk_n, Pad, spad_n, start, size, valid_lo, is_segment,
                                   True, HAS_PAD, BLOCK_N, BLOCK_D, HEAD_DIM)
    kv_ok = _in_head_dim(in_src[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D)
    if not USAGE:
        v = tl.load(Vp + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    usage = tl.zeros([BLOCK_N], dtype=tl.float32)

    # memory keys are seen by every query; segment key s by queries i >= s (causal);
    # a tile without any valid key is skipped (its gradients are zero)
    q_lo = start * 0
    if CAUSAL:
        q_lo = tl.where(is_segment, start // BLOCK_M * BLOCK_M, q_lo)
    q_lo = tl.where(start + BLOCK_N <= valid_lo, n, q_lo)
    if POS_KEPT:  # the first query tile's kept position scores; each next one's is loaded a
        # tile ahead (Triton's pipelining leaves a load that feeds no product in place)
        pos_next = _kept_position_scores(DS_src, q_lo, offs_n, n, sds_n, BLOCK_M)
    for qs in range(q_lo, n, BLOCK_M):
        offs_m = qs + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n
        q_ok = _in_head_dim(row_ok[:, None], offs_d[None, :], HEAD_DIM, BLOCK_D)
        q = tl.load(Q + offs_m[:, None] * sq_n + offs_d[None, :], mask=q_ok, other=0.0)
        lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))
        apply_mask = partial
        if CAUSAL:  # the diagonal band: some segment key after some query
            apply_mask = apply_mask | (is_segment & (start + BLOCK_N - 1 > qs))
        pos = 0.0
        if POS_KEPT:  # the forward's (masked entries may be unwritten: dropped by _scores)
            pos = pos_next.to(tl.float32)
            pos_next = _kept_position_scores(DS_src, qs + BLOCK_M, offs_n, n, sds_n, BLOCK_M)
        elif REL_POS:  # the query tile changes every step: the whole band is new
            first = query_base + qs - key_base - start - BLOCK_T
            band = _position_band(
                _position_scores(q, R_h, W_h, sr_n, R_rows, first, True, BLOCK_T, BLOCK_D,
                                 HEAD_DIM, PRECISION),
                _position_scores(q, R_h, W_h, sr_n, R_rows, first + BLOCK_T, True, BLOCK_T,
                                 BLOCK_D, HEAD_DIM, PRECISION), q)
            pos = _sheared_position_scores(band, True, BLOCK_M, BLOCK_N, BLOCK_T)
        s_t = _scores(q, k, pos, query_base + qs, key_base + start, key_ok, apply_mask,
                      True, CAUSAL, REL_POS, BLOCK_M, BLOCK_N, PRECISION)
        p_t = tl.math.exp2(s_t * scale_log2 - lse[None, :])
        if USAGE:
            usage += tl.sum(p_t, 1)
        else:
            do = tl.load(DO + offs_m[:, None] * sdo_n + offs_d[None, :], mask=q_ok, other=0.0)
            delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
            dv += _dot(p_t.to(do.dtype), do, PRECISION)
            dp_t = _dot(v, tl.trans(do), PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])  # the softmax scale is applied to dk at the end
            dk += _dot(ds_t.to(q.dtype), q, PRECISION)
            if STORE_DS:  # as the dQ pass uses them: scaled, in the inputs' dtype
                ds_kept = (ds_t * scale).to(q.dtype)
                rows = offs_m[None, :].to(tl.int64) * sds_n
                # by key: whole columns (keys past the source land in its padding, never read)
                tl.store(DS_src + rows + offs_n[:, None], ds_kept.to(DS_src.dtype.element_ty),
                         mask=row_ok[None, :])
                dist = query_base + offs_m[None, :] - key_base - offs_n[:, None]
                tl.store(DG_bh + rows + dist, ds_kept,
                         mask=in_src[:, None] & row_ok[None, :] & (dist >= 0))

    if USAGE:
        tl.store(Usage + key_base + offs_n, usage, mask=in_src)
    else:
        tile = offs_n[:, None] * row_stride + offs_d[None, :]
        tl.store(DKp + tile, (dk * scale).to(DKp.dtype.element_ty), mask=kv_ok)
        tl.store(DVp + tile, dv.to(DVp.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=["sk_n", "sv_n", "smk_n", "smv_n", "sck_n", "scv_n", "n", "m", "cm",
                               "tiles_c", "tiles_m"])
def _bwd_dkdv_kernel(
    Q, K, V, MK, MV, CK, CV, DO, Lse, Delta, DK, DV, DMK, DMV, DCK, DCV, Usage, DS, DG,
    MemLens, CmemLens, Pad, R, W,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    smk_b, smk_n, smk_h, smv_b, smv_n, smv_h, sck_b, sck_n, sck_h, scv_b, scv_n, scv_h,
    sdo_b, sdo_n, sdo_h, spad_b, spad_n, sr_h, sr_n, sds_n, ds_col_m, ds_col_s,
    H, n, m, cm, R_rows, tiles_c, tiles_m, scale_log2, scale,
    HAS_MEM_LENS: tl.constexpr, HAS_CMEM_LENS: tl.constexpr, HAS_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, REL_POS: tl.constexpr, USAGE: tl.constexpr, STORE_DS: tl.constexpr,
    POS_KEPT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    L = cm + m + n
    Qb = Q + b * sq_b + h * sq_h
    DOb = DO + b * sdo_b + h * sdo_h
    stats = Lse + pid_bh.to(tl.int64) * n
    delta = Delta + pid_bh.to(tl.int64) * n
    usage = Usage + pid_bh.to(tl.int64) * L
    DS_bh = DS + pid_bh.to(tl.int64) * n * sds_n
    DG_bh = DG + pid_bh.to(tl.int64) * n * sds_n
    R_h = R + h * sr_h
    W_h = W + h * R_rows
    Pad_b = Pad + b * spad_b
    head = h * HEAD_DIM  # offset of this (b, h) in a contiguous [B, S, H, D] gradient
    # the program's key tile lies in exactly one source: pick its tensors and bounds with
    # scalar selects, so that the tile code (and its shared memory) exists once
    is_segment = pid_n >= tiles_c + tiles_m
    Kp, Vp, sk, sv = K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, sk_n, sv_n
    DKp, DVp = DK + b * n * H * HEAD_DIM + head, DV + b * n * H * HEAD_DIM + head
    size, valid_lo, key_base, DS_src = n, n * 0, cm + m, DS_bh + ds_col_s
    start = (pid_n - tiles_c - tiles_m) * BLOCK_N
    if pid_n < tiles_c:
        Kp, Vp, sk, sv = CK + b * sck_b + h * sck_h, CV + b * scv_b + h * scv_h, sck_n, scv_n
        DKp, DVp = DCK + b * cm * H * HEAD_DIM + head, DCV + b * cm * H * HEAD_DIM + head
        size, valid_lo, key_base, DS_src = cm, cm * 0, cm * 0, DS_bh
        if HAS_CMEM_LENS:
            valid_lo = cm - tl.load(CmemLens + b)
        start = pid_n * BLOCK_N
    elif pid_n < tiles_c + tiles_m:
        Kp, Vp, sk, sv = MK + b * smk_b + h * smk_h, MV + b * smv_b + h * smv_h, smk_n, smv_n
        DKp, DVp = DMK + b * m * H * HEAD_DIM + head, DMV + b * m * H * HEAD_DIM + head
        size, valid_lo, key_base, DS_src = m, m * 0, cm, DS_bh + ds_col_m
        if HAS_MEM_LENS:
            valid_lo = m - tl.load(MemLens + b)
        start = (pid_n - tiles_c) * BLOCK_N
    _dkdv_tile(Qb, DOb, stats, delta, usage, DS_src, DG_bh, sds_n, sq_n, sdo_n, Kp, Vp, sk, sv,
               DKp, DVp, H * HEAD_DIM, Pad_b, spad_n, size, valid_lo, key_base, start,
               is_segment, n, cm + m, R_h, W_h, sr_n, R_rows, scale_log2, scale, HAS_PAD,
               CAUSAL, REL_POS, USAGE, STORE_DS, POS_KEPT, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM,
               BLOCK_T, PRECISION)


# ----------------------------------------------------------------------------- host side
def _empty(shape, dtype, device):
    """Outputs the kernels write completely (tests replace this to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t):
    return t.stride()[:3] if t is not None else (0, 0, 0)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype):
    if dtype == torch.float32:
        return "ieee"  # full fp32 products, so fp32 inputs meet the error rule
    if dtype == torch.bfloat16 and dispatch.triton_interpreted():
        return "upcast"
    return "tf32"  # ignored for 16-bit operands


class _Call:
    """The kernels' view of one call: pointers (the query tensor stands in for absent
    sources, which are never read), strides, sizes, constexpr flags and launch config.
    With relative positions the Triton kernels' query is q + u and their per-distance bias
    w = (v - u).r, both formed on first use (``q``, ``rel``): the sm_90 forward forms q + u
    and q + v itself from q, r, u and v (``rel_inputs``) and needs no w."""

    def __init__(self, q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens,
                 key_padding_mask, r, u, v_bias, causal, scale, store_score_grads=False,
                 store_position_scores=False):
        self.query = _last_dim_contiguous(q)
        self.B, self.n, self.H, self.D = q.shape
        self.m = 0 if mem_k is None else mem_k.shape[1]
        self.cm = 0 if cmem_k is None else cmem_k.shape[1]
        present = lambda t: _last_dim_contiguous(t) if t is not None and t.numel() else None  # noqa: E731
        sources = [present(t) for t in (k, v, mem_k, mem_v, cmem_k, cmem_v)]
        if any(t is not None and t.shape[1] * t.stride(1) >= 2**31 for t in sources + [q]):
            raise ValueError("a key/value tensor spans 2**31 elements or more along its "
                             "sequence dimension (per batch and head); split the batch")
        self.sources = [self.query if t is None else t for t in sources]
        self.memories = sources[2:]  # mem_k, mem_v, cmem_k, cmem_v, None where absent
        self.source_strides = [s for t in sources for s in _strides(t)]
        self.lengths = tuple(None if t is None else t.to(torch.int32).contiguous()
                             for t in (mem_lens, cmem_lens))
        self.lens = tuple(self.query if t is None else t for t in self.lengths)
        if key_padding_mask is None:
            self.pad, self.pad_strides = self.query, (0, 0)
        else:
            self.pad = key_padding_mask.view(torch.uint8)
            self.pad_strides = (self.pad.stride(0), self.pad.stride(1))
        rel_pos = r is not None
        if rel_pos:
            r = _last_dim_contiguous(r)
            self.rel_inputs = (r, u.contiguous(), v_bias.contiguous())  # u, v: q's dtype (the API checks)
            self.r_strides, self.R_rows = (r.stride(0), r.stride(1)), r.shape[1]
        else:
            self.rel_inputs = (None, None, None)
            self.r_strides, self.R_rows = (0, 0), 0
        self.dtype, self.scale = q.dtype, scale
        self.store_score_grads = rel_pos and store_score_grads
        self.keep_pos_scores = self.store_score_grads and store_position_scores
        self.flags = dict(
            HAS_MEM_LENS=mem_lens is not None, HAS_CMEM_LENS=cmem_lens is not None,
            HAS_PAD=key_padding_mask is not None, CAUSAL=causal, REL_POS=rel_pos,
            BLOCK_D=padded_head_dim(self.D), HEAD_DIM=self.D, PRECISION=_dot_precision(q.dtype))

    def meta(self, pass_name):
        """Constexpr flags and launch configuration of one pass."""
        rel_pos = self.flags["REL_POS"]
        block_m, block_n, warps, stages = launch_config(
            pass_name + ("_rel" if rel_pos else ""), self.D, self.dtype)
        # BLOCK_T: half the width of a tile's position band. The query-major passes carry
        # half a band from one key tile to the next, BLOCK_N keys on, so T = BLOCK_N there.
        block_t = max(block_m, block_n) if pass_name.startswith("dkdv") else block_n
        if rel_pos and pass_name in ("fwd", "dq") and block_m > block_t:
            raise ValueError(f"relative positions need BLOCK_M <= BLOCK_N in the {pass_name} "
                             f"pass, got the configuration {(block_m, block_n)}")
        return dict(self.flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=block_t,
                    num_warps=warps, num_stages=stages)

    @functools.cached_property
    def score_grad_columns(self):
        return score_grad_columns(self.n, self.m, self.cm)

    def pos_scores(self):
        """A buffer for the position scores by key (``pos_scores_layout``): those the
        forward keeps (which the Triton backward overwrites with the score gradients), or
        those scored for the sm_90 backward (``_position_scores_by_key``)."""
        return _empty(*pos_scores_layout(self.B, self.H, self.n, self.m, self.cm, self.dtype),
                      self.query.device)

    @functools.cached_property
    def q(self):
        """The Triton kernels' query: q + u with relative positions, else q."""
        if not self.flags["REL_POS"]:
            return self.query
        return _last_dim_contiguous(self.query + self.rel_inputs[1])

    @functools.cached_property
    def r32(self):
        """r in fp32 (w and the backward's gradients of r, u and v)."""
        return self.rel_inputs[0].float()

    @functools.cached_property
    def bias_diff(self):
        """v - u [H, D] in fp32."""
        _, u, v_bias = self.rel_inputs
        return v_bias.float() - u.float()

    @functools.cached_property
    def rel(self):
        """(r, w = (v - u).r [H, R] fp32) with relative positions; stand-ins otherwise."""
        if not self.flags["REL_POS"]:
            return self.query, self.query
        # in fp32 also where the caller runs under autocast (which would make it bfloat16)
        with torch.autocast(self.query.device.type, enabled=False):
            w = torch.bmm(self.r32, self.bias_diff.unsqueeze(-1))  # [H, R, 1]
        return self.rel_inputs[0], w.view(w.shape[0], -1)

    @property
    def sizes(self):
        return (self.H, self.n, self.m, self.cm, self.R_rows)


def score_grad_columns(n: int, m: int, cm: int):
    """(row length, first column of the memory's keys, of the segment's) of the position
    scores and score gradients stored by key: each source's columns padded to a multiple of
    SCORE_GRAD_COLUMNS, so that a key tile's entries are stored and read as aligned vectors,
    unmasked along the keys (a tile's keys past its source land in the padding)."""
    col_m = cdiv(cm, SCORE_GRAD_COLUMNS) * SCORE_GRAD_COLUMNS
    col_s = col_m + cdiv(m, SCORE_GRAD_COLUMNS) * SCORE_GRAD_COLUMNS
    return col_s + cdiv(n, SCORE_GRAD_COLUMNS) * SCORE_GRAD_COLUMNS, col_m, col_s


def pos_scores_layout(B: int, H: int, n: int, m: int, cm: int, dtype: torch.dtype):
    """(shape, dtype) of the position scores by key (those the forward keeps, or those
    scored for the sm_90 backward): [B * H, n, row length of ``score_grad_columns``], rounded
    as the forward adds them (bfloat16 for bfloat16 inputs, fp32 otherwise: _position_band)."""
    return ((B * H, n, score_grad_columns(n, m, cm)[0]),
            torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


def _launch_fwd(c, out, lse, pos_scores=None):
    """The forward pass: writes out and lse, and with relative positions the position scores
    by key into pos_scores if given (``_Call.pos_scores``)."""
    meta = c.meta("fwd")
    grid = (cdiv(c.n, meta["BLOCK_M"]), c.B * c.H)
    stored, columns = (lse, (0, 0, 0)) if pos_scores is None else (pos_scores,
                                                                   c.score_grad_columns)
    launch(_fwd_kernel, grid, (
        c.q, *c.sources, out, lse, *c.lens, c.pad, *c.rel, stored,
        *_strides(c.q), *c.source_strides, *_strides(out), *c.pad_strides, *c.r_strides,
        *columns, *c.sizes, c.scale * LOG2E), dict(meta, STORE_POS=pos_scores is not None))


# The Hopper kernels (csrc/attention_sm90.cu): a forward (head dims 64 and 128; with relative
# positions for bfloat16, from q, r, u and v: the op forms q + u and q + v), and a backward (head dim 128; with
# relative positions and store_score_grads it reads their scores by key,
# _sm90_relpos_backward) that computes dQ, dK
# and dV in one pass over key blocks, dQ added into an fp32 workspace
# (sm90_backward_workspace). They run where they apply (below) unless
# SM90_FORWARD / SM90_BACKWARD is False (the benchmarks compare them with the Triton passes
# that way).
SM90_FORWARD = True
SM90_BACKWARD = True
SM90_FORWARD_HEAD_DIMS = (64, 128)
SM90_BACKWARD_HEAD_DIMS = (128,)


def sm90_backward_workspace(B: int, H: int, n: int, device) -> torch.Tensor:
    """The fp32 workspace of ``attention_bwd_sm90`` (uninitialised: the op writes it): dQ's
    sums, 64 x 128 elements per 64-query tile and batch-head, then delta, one per query and
    batch-head."""
    return torch.empty(B * H * (cdiv(n, 64) * 64 * 128 + n), dtype=torch.float32, device=device)


def _sm90_loaded() -> bool:
    return dispatch.extension_has("attention_fwd_sm90", "attention_bwd_sm90")


if _sm90_loaded():
    @torch.library.register_fake("ct_kernels::attention_fwd_sm90")
    def _attention_fwd_sm90_fake(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens,
                                 rel_r, rel_u, rel_v, rel_scores, causal, scale, out, lse,
                                 block_window=0):
        return None  # it writes out and lse (and rel_scores, if given)

    @torch.library.register_fake("ct_kernels::attention_bwd_sm90")
    def _attention_bwd_sm90_fake(grad_out, q, k, v, mem_k, mem_v, cmem_k, cmem_v, out, lse,
                                 mem_lens, cmem_lens, causal, scale, dq, dk, dv, dmem_k, dmem_v,
                                 dcmem_k, dcmem_v, workspace, block_window=0, rel_scores=None,
                                 rel_score_grads=None):
        return None  # it writes the gradients (and the score gradients by distance, if asked)


def _sm90_applies(c, switch: bool, head_dims: tuple, rel_pos: bool = False) -> bool:
    """Whether the call runs on a Hopper kernel (switch: SM90_FORWARD or SM90_BACKWARD, with
    its head dims): float16/bfloat16 CUDA inputs on an sm_90 GPU, without key padding, and
    without relative positions unless the kernel takes them (rel_pos: for bfloat16 causal
    calls)."""
    if c.flags["REL_POS"] and not (rel_pos and c.dtype == torch.bfloat16 and c.flags["CAUSAL"]):
        return False
    return (switch and c.query.is_cuda and c.dtype in (torch.float16, torch.bfloat16)
            and c.D in head_dims and not c.flags["HAS_PAD"]
            and _sm90_loaded() and dispatch.on_sm90())


def _forward(*inputs):
    """(out, lse, position scores or None) of the inputs of ``attention_fwd``."""
    return _forward_call(_Call(*inputs))


def _forward_call(c):
    """(out, lse, pos_scores): with relative positions, ``store_score_grads`` and
    ``store_position_scores`` the forward also keeps its position scores by key
    (``_Call.pos_scores``), which the backward reads instead of recomputing them; None
    otherwise."""
    out = _empty((c.B, c.n, c.H, c.D), c.dtype, c.query.device)
    lse = _empty((c.B, c.H, c.n), torch.float32, c.query.device)
    pos_scores = c.pos_scores() if c.keep_pos_scores else None
    if _sm90_applies(c, SM90_FORWARD, SM90_FORWARD_HEAD_DIMS, rel_pos=True):
        torch.ops.ct_kernels.attention_fwd_sm90(c.query, *c.sources[:2], *c.memories, *c.lengths,
                                                *c.rel_inputs, pos_scores, c.flags["CAUSAL"], c.scale,
                                                out, lse)
    else:
        _launch_fwd(c, out, lse, pos_scores)
    return out, lse, pos_scores


def _key_tiles(c, block_n):
    return cdiv(c.cm, block_n), cdiv(c.m, block_n), cdiv(c.n, block_n)


def _launch_dq(c, out, grad_out, lse, delta, dq, rel_grads=None):
    """The dQ pass (also stores delta); with relative positions adds into rel_grads =
    (dr [H, R, D], dw [H, R], dq_sum [H, D]: the sum of dq over rows), fp32."""
    meta = c.meta("dq")
    grid = (cdiv(c.n, meta["BLOCK_M"]), c.B * c.H)
    launch(_bwd_dq_kernel, grid, (
        c.q, *c.sources, out, grad_out, dq, lse, delta, *c.lens, c.pad, *c.rel,
        *(rel_grads or (c.q,) * 3),
        *_strides(c.q), *c.source_strides, *_strides(out), *_strides(grad_out),
        *c.pad_strides, *c.r_strides, *c.sizes, c.scale * LOG2E, c.scale), meta)


def _launch_dkdv(c, grad_out, lse, delta, grads, score_grads=None, pos_kept=False):
    """The dK/dV pass; grads = (dk, dv, dmem_k, dmem_v, dcmem_k, dcmem_v). Given score_grads
    = (by key, by distance), two [B * H, n, >= L] buffers, it stores the scaled score
    gradients into both; with pos_kept the first holds the forward's position scores
    (``_Call.pos_scores``), which it reads first."""
    meta = c.meta("dkdv" if score_grads is None else "dkdv_kept" if pos_kept else "dkdv_stored")
    if score_grads is not None and meta["BLOCK_N"] > SCORE_GRAD_COLUMNS:
        raise ValueError(f"the storing dK/dV pass takes key tiles of at most "
                         f"{SCORE_GRAD_COLUMNS}, got {meta['BLOCK_N']}")
    # pointers to the by-key and by-distance buffers and their column layout (placeholders
    # when nothing is stored)
    stored, columns = ((lse, lse), (0, 0, 0)) if score_grads is None else (
        score_grads, c.score_grad_columns)
    tiles_c, tiles_m, tiles_s = _key_tiles(c, meta["BLOCK_N"])
    launch(_bwd_dkdv_kernel, (tiles_c + tiles_m + tiles_s, c.B * c.H), (
        c.q, *c.sources, grad_out, lse, delta, *grads, lse, *stored, *c.lens, c.pad, *c.rel,
        *_strides(c.q), *c.source_strides, *_strides(grad_out), *c.pad_strides, *c.r_strides,
        *columns, *c.sizes, tiles_c, tiles_m, c.scale * LOG2E, c.scale),
        dict(meta, USAGE=False, STORE_DS=score_grads is not None, POS_KEPT=pos_kept))


def _launch_delta(c, out, grad_out, delta):
    """delta = rowsum(dO * O) alone (the dQ pass computes it otherwise)."""
    block_m = 64
    launch(_bwd_delta_kernel, (cdiv(c.n, block_m), c.B * c.H), (
        out, grad_out, delta, *_strides(out), *_strides(grad_out), c.H, c.n),
        dict(BLOCK_M=block_m, BLOCK_D=c.flags["BLOCK_D"], HEAD_DIM=c.D, num_warps=4,
             num_stages=1))


def _launch_dq_stored(c, score_grads, dq, rel_grads):
    """dQ and the relative-position gradients rel_grads = (dr, dw, dq_sum) (added into)
    from the score gradients the dK/dV pass stored."""
    meta = c.meta("dq_stored")
    k, _, mem_k, _, cmem_k, _ = c.sources
    flags = {name: meta[name] for name in ("HAS_MEM_LENS", "HAS_CMEM_LENS", "BLOCK_M", "BLOCK_N",
                                           "BLOCK_D", "HEAD_DIM", "PRECISION", "num_warps",
                                           "num_stages")}
    launch(_bwd_dq_stored_kernel, (cdiv(c.n, meta["BLOCK_M"]), c.B * c.H), (
        c.q, k, mem_k, cmem_k, *score_grads, dq, *c.lens, *c.rel, *rel_grads,
        *_strides(c.q), *c.source_strides[0:3], *c.source_strides[6:9],
        *c.source_strides[12:15], *c.r_strides, *c.score_grad_columns, *c.sizes), flags)


def _backward(grad_out, q, k, v, mem_k, mem_v, cmem_k, cmem_v, out, lse, pos_scores, mem_lens,
              cmem_lens, key_padding_mask, r, u, v_bias, causal, scale, store_score_grads,
              store_position_scores):
    c = _Call(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens, key_padding_mask,
              r, u, v_bias, causal, scale, store_score_grads, store_position_scores)
    return _backward_call(c, grad_out, out, lse, pos_scores if pos_scores.numel() else None)


def _backward_call(c, grad_out, out, lse, pos_scores=None):
    """The gradients of ``attention_bwd`` for the forward's call c (None for r, u and v
    without relative positions). pos_scores: the forward's position scores (with
    ``store_position_scores``), consumed here (the Triton dK/dV pass overwrites them with
    the score gradients by key; the sm_90 backward reads them only)."""
    B, n, H, D, m, cm = c.B, c.n, c.H, c.D, c.m, c.cm
    dtype, device = c.dtype, c.query.device
    grad_out, out = _last_dim_contiguous(grad_out), _last_dim_contiguous(out)
    empty = lambda S: _empty((B, S, H, D), dtype, device)  # noqa: E731
    dq, dk, dv, dmk, dmv, dck, dcv = empty(n), empty(n), empty(n), empty(m), empty(m), empty(cm), empty(cm)
    grad_ptr = lambda t: t if t.numel() else dq  # noqa: E731  (absent sources: never written)
    grads = (dk, dv, grad_ptr(dmk), grad_ptr(dmv), grad_ptr(dck), grad_ptr(dcv))
    if not c.flags["REL_POS"] and _sm90_applies(c, SM90_BACKWARD, SM90_BACKWARD_HEAD_DIMS):
        # delta computed inside the op
        torch.ops.ct_kernels.attention_bwd_sm90(
            grad_out, c.q, *c.sources[:2], *c.memories, out, lse, *c.lengths, c.flags["CAUSAL"],
            c.scale, dq, dk, dv, dmk, dmv, dck, dcv, sm90_backward_workspace(B, H, n, device))
        return dq, dk, dv, dmk, dmv, dck, dcv, None, None, None
    if c.keep_pos_scores and (pos_scores is None or
                              pos_scores.shape != (B * H, n, c.score_grad_columns[0])):
        raise ValueError("store_position_scores=True: the backward needs the position "
                         "scores of its forward")
    if c.store_score_grads and _sm90_applies(c, SM90_BACKWARD, SM90_BACKWARD_HEAD_DIMS,
                                             rel_pos=True):
        return _sm90_relpos_backward(c, grad_out, out, lse, pos_scores, dq, grads[:2],
                                     (dmk, dmv, dck, dcv))
    delta = _empty((B, H, n), torch.float32, device)
    if not c.flags["REL_POS"]:
        _launch_dq(c, out, grad_out, lse, delta, dq)
        _launch_dkdv(c, grad_out, lse, delta, grads)
        return dq, dk, dv, dmk, dmv, dck, dcv, None, None, None
    # gradients of r (band part), of w = (v - u).r and of q + u summed over rows: fp32
    # atomics into one zeroed buffer
    R = c.R_rows
    rel_grads = torch.zeros(H * (R * D + R + D), dtype=torch.float32, device=device)
    dr, dw, dq_sum = rel_grads.split([H * R * D, H * R, H * D])
    dr, dw, dq_sum = dr.view(H, R, D), dw.view(H, R), dq_sum.view(H, D)
    if c.store_score_grads:
        _launch_delta(c, out, grad_out, delta)
        # by key (in the position scores' place, if kept) and by distance (read where written)
        buffer = lambda: _empty((B * H, n, c.score_grad_columns[0]), dtype, device)  # noqa: E731
        score_grads = (pos_scores if c.keep_pos_scores else buffer(), buffer())
        _launch_dkdv(c, grad_out, lse, delta, grads, score_grads, c.keep_pos_scores)
        if c.keep_pos_scores:  # a second backward must not read them
            torch.autograd.graph.increment_version(pos_scores)
        _launch_dq_stored(c, score_grads, dq, (dr, dw, dq_sum))
    else:
        _launch_dq(c, out, grad_out, lse, delta, dq, (dr, dw, dq_sum))
        _launch_dkdv(c, grad_out, lse, delta, grads)
    dvb = torch.bmm(dw.unsqueeze(1), c.r32).squeeze(1)  # sum over distances of dw r
    du = dq_sum - dvb
    dr = dr + dw[:, :, None] * c.bias_diff[:, None, :]
    return dq, dk, dv, dmk, dmv, dck, dcv, dr.to(dtype), du.to(dtype), dvb.to(dtype)


# ----------------------------------------------------------------------------- backward: the
# position part after the sm_90 backward with relative positions (_sm90_relpos_backward)
@triton.jit
def _clear_unwritten_distances_kernel(G, MemLens, CmemLens, row_length, rows, B, n, m, cm,
                                      distances, HAS_MEM_LENS: tl.constexpr,
                                      HAS_CMEM_LENS: tl.constexpr, ROWS: tl.constexpr,
                                      BLOCK: tl.constexpr):
    """Zeros in ROWS rows of the score gradients by distance ([H, B * n, row_length], row
    b n + i of head h at h B n + b n + i) where no key block of the sm_90 backward writes,
    over the distances d < distances: keys j = cm + m + i - d before the first (past the row's
    oldest key) and slots of a memory before its valid ones (blocks without a valid key are
    skipped)."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    b = (row // n) % B
    i = row % n
    # each row's newest unwritten key slot: its last invalid memory slot, else -1 (before the
    # first)
    newest = tl.full([ROWS], -1, tl.int32)
    if HAS_CMEM_LENS:
        valid_lo_c = cm - tl.load(CmemLens + b, mask=live, other=cm)
        newest = tl.maximum(newest, valid_lo_c - 1)
    if HAS_MEM_LENS:
        valid_lo_m = m - tl.load(MemLens + b, mask=live, other=m)
        newest = tl.where(valid_lo_m > 0, cm + valid_lo_m - 1, newest)
    G_rows = G + row.to(tl.int64)[:, None] * row_length
    # the rows' distances from the smallest unwritten one on
    for first in range(tl.min(tl.where(live, cm + m + i - newest, distances), 0), distances,
                       BLOCK):
        d = first + tl.arange(0, BLOCK)[None, :]
        j = (cm + m + i)[:, None] - d
        unwritten = j < 0
        if HAS_CMEM_LENS:
            unwritten = unwritten | (j < valid_lo_c[:, None])
        if HAS_MEM_LENS:
            unwritten = unwritten | ((j >= cm) & (j < cm + valid_lo_m[:, None]))
        tl.store(G_rows + d, tl.zeros([ROWS, BLOCK], G.dtype.element_ty),
                 mask=unwritten & (d < distances) & live[:, None])


@triton.jit
def _position_part_kernel(Accum, Position, DQ, Sums, B, H, n, tiles_m, scale,
                          D: tl.constexpr):
    """dQ of one 64-query tile of batch-head (b, h) (program (b H + h) tiles_m + tile): scale
    times its content part (Accum: the sm_90 backward's fp32 sums, per tile two [64, 64]
    column halves, each in the order its threads added them: csrc dq_from_accum_kernel) plus
    its position part (Position: G r, fp32 [H, B n, D]), stored in dQ's dtype and layout
    [B, n, H, D]; the rows' sums of each part added into Sums: [0, h] the content part's
    (the gradient of u), [1, h] the position part's (the gradient of v)."""
    tile = tl.program_id(0)
    bh = tile // tiles_m
    b, h = bh // H, bh % H
    r = tl.arange(0, 64)
    col = tl.arange(0, D)
    i = (tile % tiles_m) * 64 + r
    ok = (i < n)[:, None]
    # element (r, c) of a half: thread 32 (r / 16) + 4 (r % 8) + (c % 8) / 2 of its float4
    # 128 (c / 8) + thread, component 2 ((r / 8) % 2) + c % 2; read as column pairs (c / 2,
    # c % 2), each pair 8 contiguous bytes
    pair = tl.arange(0, D // 2)
    at_r = 128 * (r // 16) + 16 * (r % 8) + 2 * ((r // 8) % 2)
    at_pair = (pair // 32) * 4096 + 512 * ((pair % 32) // 4) + 4 * (pair % 4)
    at = at_r[:, None, None] + at_pair[None, :, None] + tl.arange(0, 2)[None, None, :]
    content = tl.reshape(tl.load(Accum + tile.to(tl.int64) * (64 * D) + at), (64, D))
    content = tl.where(ok, content * scale, 0.0)  # (rows past n hold sums of padding)
    rows = (b * n + i).to(tl.int64)
    position = tl.load(Position + (h * B * n + rows[:, None]) * D + col[None, :], mask=ok,
                       other=0.0)
    tl.store(DQ + (rows[:, None] * H + h) * D + col[None, :],
             (content + position).to(DQ.dtype.element_ty), mask=ok)
    tl.atomic_add(Sums + h * D + col, tl.sum(content, 0), sem="relaxed")
    tl.atomic_add(Sums + (H + h) * D + col, tl.sum(position, 0), sem="relaxed")


@triton.jit
def _biased_queries_kernel(Q, U, V, QU, QV, rows, H, n, stride_b, stride_n, stride_h,
                           D: tl.constexpr, BLOCK_R: tl.constexpr):
    """q + u and q + v (contiguous [B, n, H, D], q's dtype, each sum rounded once as torch
    rounds it) of BLOCK_R rows (b, i, h) of q, read once."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    ok = (row < rows)[:, None]
    h = row % H
    i = (row // H) % n
    b = row // (H * n)
    q = tl.load(Q + (b.to(tl.int64) * stride_b + i * stride_n + h * stride_h)[:, None]
                + d[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + h[:, None] * D + d[None, :]).to(tl.float32)
    v = tl.load(V + h[:, None] * D + d[None, :]).to(tl.float32)
    at = row.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(QU + at, (q + u).to(QU.dtype.element_ty), mask=ok)
    tl.store(QV + at, (q + v).to(QV.dtype.element_ty), mask=ok)


def _biased_queries(c):
    """(q + u, q + v) of a call with relative positions at a power-of-two head dim
    (``_biased_queries_kernel``)."""
    _, u, v_bias = c.rel_inputs
    q = c.query
    query_u, query_v = (_empty((c.B, c.n, c.H, c.D), c.dtype, q.device) for _ in range(2))
    rows = c.B * c.n * c.H
    launch(_biased_queries_kernel, (cdiv(rows, 32),), (
        q, u, v_bias, query_u, query_v, rows, c.H, c.n, q.stride(0), q.stride(1), q.stride(2)),
        dict(D=c.D, BLOCK_R=32, num_warps=4, num_stages=1))
    return query_u, query_v


@triton.jit
def _position_scores_by_key_kernel(QV, R, Out, H, n, m, cm, R_rows, sr_h, sr_n, row_length,
                                   col_m, col_s, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                                   PRECISION: tl.constexpr):
    """The position scores (q_i + v).r_d of BLOCK_M queries of batch-head (b, h) and BLOCK_T
    distances, stored by key ([B * H, n, row_length] in the columns of
    ``score_grad_columns``): the key at distance d of query i is j = cm + m + i - d (entries
    with j < 0 are no key). The chunk's distances run down from its top, so that each row's
    keys, and its stores, run up. Distances past r's rows score 0, as in the forward."""
    tile_m, chunk, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    i = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    top = (chunk + 1) * BLOCK_T - 1
    t = tl.arange(0, BLOCK_T)
    d = top - t
    dd = tl.arange(0, BLOCK_D)
    in_head = (dd < HEAD_DIM)[None, :]
    row_ok = (i < n)[:, None]
    # (q + v) of the rows (contiguous [B, n, H, D]) and r of the chunk's distances
    qv = tl.load(QV + ((b * n + i) * H + h).to(tl.int64)[:, None] * HEAD_DIM + dd[None, :],
                 mask=row_ok & in_head, other=0.0)
    r = tl.load(R + h * sr_h + d.to(tl.int64)[:, None] * sr_n + dd[None, :],
                mask=(d < R_rows)[:, None] & in_head, other=0.0)
    scores = _dot(qv, tl.trans(r), PRECISION).to(Out.dtype.element_ty)
    # each (query, distance) to its key's column in its source's block of columns: one store
    # per source, so that each store's columns run on with the distances' order (coalesced)
    j = (cm + m + i - top)[:, None] + t[None, :]
    rows = Out + (bh * n + i).to(tl.int64)[:, None] * row_length
    tl.store(rows + j, scores, mask=row_ok & (j >= 0) & (j < cm))
    tl.store(rows + (col_m - cm) + j, scores, mask=row_ok & (j >= cm) & (j < cm + m))
    tl.store(rows + (col_s - cm - m) + j, scores, mask=row_ok & (j >= cm + m))


def _position_scores_by_key(c, query_v):
    """The position scores of call c by key, as the forward adds them
    (``pos_scores_layout``), from q + v (contiguous [B, n, H, D]): every entry of a key
    that a query can see is written (``_position_scores_by_key_kernel``)."""
    scores = c.pos_scores()
    r = c.rel_inputs[0]
    columns, col_m, col_s = c.score_grad_columns
    block_m, block_t = 64, 64
    grid = (cdiv(c.n, block_m), cdiv(c.cm + c.m + c.n, block_t), c.B * c.H)
    launch(_position_scores_by_key_kernel, grid, (
        query_v, r, scores, c.H, c.n, c.m, c.cm, c.R_rows, *c.r_strides, columns, col_m, col_s),
        dict(HEAD_DIM=c.D, BLOCK_D=c.flags["BLOCK_D"], BLOCK_M=block_m, BLOCK_T=block_t,
             PRECISION=c.flags["PRECISION"], num_warps=8, num_stages=1))
    return scores


def _clear_unwritten_distances(c, by_distance, distances):
    """Zeros where the sm_90 backward writes no score gradient by distance
    (``_clear_unwritten_distances_kernel``), in place."""
    rows = by_distance.shape[0] * by_distance.shape[1]
    launch(_clear_unwritten_distances_kernel, (cdiv(rows, 16),), (
        by_distance, *c.lens, by_distance.shape[2], rows, c.B, c.n, c.m, c.cm, distances),
        dict(HAS_MEM_LENS=c.flags["HAS_MEM_LENS"], HAS_CMEM_LENS=c.flags["HAS_CMEM_LENS"],
             ROWS=16, BLOCK=512, num_warps=4, num_stages=1))


def _position_part(accum, position, dq, scale):
    """dq from dQ's content part left by the sm_90 backward (accum, its fp32 sums in the
    kernel's order; times scale) and the position part (position: [H, B * n, D] fp32), and
    (du, dv): the row sums of each head's content and position parts, fp32 [H, D] each."""
    B, n, H, D = dq.shape
    if D != 128:  # the order of the sums is the sm_90 backward's, which runs head dim 128
        raise ValueError(f"the position part needs head dim 128, got {D}")
    tiles_m = cdiv(n, 64)
    sums = torch.zeros(2, H, D, dtype=torch.float32, device=dq.device)
    launch(_position_part_kernel, (B * H * tiles_m,), (accum, position, dq, sums, B, H, n,
                                                       tiles_m, scale),
           dict(D=D, num_warps=8, num_stages=1))
    return sums[0], sums[1]


def _sm90_relpos_backward(c, grad_out, out, lse, pos_scores, dq, dk_dv, memory_grads):
    """The gradients of a call with relative positions and ``store_score_grads`` on the
    sm_90 backward. It takes the position scores by key, from pos_scores if the forward kept
    them, else scored here (``_position_scores_by_key``); the sm_90 backward reads them into
    its scores, computes dK, dV and dQ's content part (its query is q + u; left in its
    workspace), and stores the score gradients G by distance per head ([H, B * n, columns],
    zero where not written: distances past a row's oldest key, slots of memories before
    their valid ones: ``_clear_unwritten_distances``). The position part is then two
    products per head over the distances d < L: G r (added to the content part,
    ``_position_part``) and dr = G^T (q + v) (the position score is (q + v).r_d); the
    gradient of v is the sum of G r over the rows, that of u the sum of the content part."""
    B, n, H, D = c.B, c.n, c.H, c.D
    device = c.query.device
    r = c.rel_inputs[0]
    distances = min(c.R_rows, c.cm + c.m + n)  # the distances a query can see: at most L
    query_u, query_v = _biased_queries(c)
    scores = _position_scores_by_key(c, query_v) if pos_scores is None else pos_scores
    by_distance = _empty((H, B * n, c.score_grad_columns[0]), c.dtype, device)
    _clear_unwritten_distances(c, by_distance, distances)
    workspace = sm90_backward_workspace(B, H, n, device)
    torch.ops.ct_kernels.attention_bwd_sm90(
        grad_out, query_u, *c.sources[:2], *c.memories, out, lse, *c.lengths, True, c.scale,
        dq.new_empty(0), *dk_dv, *memory_grads, workspace, 0, scores, by_distance)
    if pos_scores is not None:  # consumed: a second backward raises
        torch.autograd.graph.increment_version(pos_scores)
    grads = by_distance[:, :, :distances]
    position = torch.bmm(grads, r[:, :distances], out_dtype=torch.float32)  # [H, B * n, D]
    du, dv_bias = _position_part(workspace, position, dq, c.scale)
    query_v = query_v.view(B * n, H, D).transpose(0, 1)  # [H, B * n, D]
    dr = torch.bmm(grads.transpose(1, 2), query_v)  # [H, distances, D]
    dr = torch.nn.functional.pad(dr, (0, 0, 0, c.R_rows - distances))
    return dq, *dk_dv, *memory_grads, dr, du.to(c.dtype), dv_bias.to(c.dtype)


def _key_usage(q, k, mem_k, cmem_k, lse, mem_lens, cmem_lens, key_padding_mask, r, u, v_bias,
               causal, scale):
    c = _Call(q, k, k, mem_k, mem_k, cmem_k, cmem_k, mem_lens, cmem_lens, key_padding_mask,
              r, u, v_bias, causal, scale)
    usage = _empty((c.B, c.H, c.cm + c.m + c.n), torch.float32, q.device)
    meta = c.meta("dkdv")
    tiles_c, tiles_m, tiles_s = _key_tiles(c, meta["BLOCK_N"])
    launch(_bwd_dkdv_kernel, (tiles_c + tiles_m + tiles_s, c.B * c.H), (
        c.q, *c.sources, c.q, lse, lse, *([c.q] * 6), usage, usage, usage, *c.lens, c.pad,
        *c.rel, *_strides(c.q), *c.source_strides, 0, 0, 0, *c.pad_strides, *c.r_strides,
        0, 0, 0,
        *c.sizes, tiles_c, tiles_m, scale * LOG2E, scale),
        dict(meta, USAGE=True, STORE_DS=False, POS_KEPT=False))
    return usage.sum(dim=1).to(q.dtype)  # heads reduced here: deterministic


# ----------------------------------------------------------------------------- torch.library
Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


def _lengths_copy(lens, like):
    """A copy of per-sample lengths for the backward (empty for None)."""
    return like.new_empty(0, dtype=torch.int32) if lens is None else lens.to(torch.int32, copy=True)


@torch.library.custom_op("ct_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mem_k: OptTensor, mem_v: OptTensor,
                  cmem_k: OptTensor, cmem_v: OptTensor, mem_lens: OptTensor,
                  cmem_lens: OptTensor, key_padding_mask: OptTensor, r: OptTensor,
                  u: OptTensor, v_bias: OptTensor, causal: bool, scale: float,
                  store_score_grads: bool, store_position_scores: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [B, n, H, D], lse [B, H, n] in log2 units, +inf for rows that see no key, the
    position scores by key for the backward (``_forward_call``; empty unless kept), and
    int32 copies of mem_lens and cmem_lens (empty when absent)). The backward reads the
    copies: a caller may update its length buffers in place after the call (the model's
    memories do), and inductor can drop the caller's own defensive clone of them.
    store_score_grads, store_position_scores: how the backward runs
    (``compressive_attention``)."""
    out, lse, pos_scores = _forward(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens,
                                    key_padding_mask, r, u, v_bias, causal, scale,
                                    store_score_grads, store_position_scores)
    return (out, lse, q.new_empty(0) if pos_scores is None else pos_scores,
            _lengths_copy(mem_lens, q), _lengths_copy(cmem_lens, q))


@attention_fwd.register_fake
def _(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens, key_padding_mask, r, u,
      v_bias, causal, scale, store_score_grads, store_position_scores):
    B, n, H, D = q.shape
    lengths = lambda t: q.new_empty(0 if t is None else t.shape[0], dtype=torch.int32)  # noqa: E731
    pos_scores = q.new_empty(0)
    if r is not None and store_score_grads and store_position_scores:
        shape, dtype = pos_scores_layout(B, H, n, 0 if mem_k is None else mem_k.shape[1],
                                         0 if cmem_k is None else cmem_k.shape[1], q.dtype)
        pos_scores = q.new_empty(shape, dtype=dtype)
    return (q.new_empty(B, n, H, D), q.new_empty(B, H, n, dtype=torch.float32), pos_scores,
            lengths(mem_lens), lengths(cmem_lens))


@torch.library.custom_op("ct_kernels::attention_bwd", mutates_args=("pos_scores",))
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mem_k: OptTensor,
                  mem_v: OptTensor, cmem_k: OptTensor, cmem_v: OptTensor, out: Tensor,
                  lse: Tensor, pos_scores: Tensor, mem_lens: OptTensor, cmem_lens: OptTensor,
                  key_padding_mask: OptTensor, r: OptTensor, u: OptTensor, v_bias: OptTensor,
                  causal: bool, scale: float, store_score_grads: bool,
                  store_position_scores: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                             Tensor, Tensor]:
    """(dq, dk, dv, dmem_k, dmem_v, dcmem_k, dcmem_v, dr, du, dv_bias); absent inputs get
    empty gradients. pos_scores: the forward's (empty unless it kept them), overwritten by
    the score gradients."""
    grads = _backward(grad_out, q, k, v, mem_k, mem_v, cmem_k, cmem_v, out, lse, pos_scores,
                      mem_lens, cmem_lens, key_padding_mask, r, u, v_bias, causal, scale,
                      store_score_grads, store_position_scores)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@attention_bwd.register_fake
def _(grad_out, q, k, v, mem_k, mem_v, cmem_k, cmem_v, out, lse, pos_scores, mem_lens,
      cmem_lens, key_padding_mask, r, u, v_bias, causal, scale, store_score_grads,
      store_position_scores):
    B, n, H, D = q.shape
    like = lambda t, *empty: q.new_empty(t.shape) if t is not None else q.new_empty(*empty)  # noqa: E731
    return (q.new_empty(B, n, H, D), q.new_empty(B, n, H, D), q.new_empty(B, n, H, D),
            like(mem_k, B, 0, H, D), like(mem_v, B, 0, H, D), like(cmem_k, B, 0, H, D),
            like(cmem_v, B, 0, H, D), like(r, 0), like(u, 0), like(v_bias, 0))


def _setup_context(ctx, inputs, output):
    (q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens, key_padding_mask, r, u,
     v_bias, causal, scale, store_score_grads, store_position_scores) = inputs
    out, lse, pos_scores, *lengths = output
    if lengths:  # the custom op's copies
        mem_lens, cmem_lens = (None if t.numel() == 0 else t for t in lengths)
    if pos_scores is None:
        pos_scores = q.new_empty(0)
    ctx.save_for_backward(q, k, v, mem_k, mem_v, cmem_k, cmem_v, out, lse, pos_scores,
                          mem_lens, cmem_lens, key_padding_mask, r, u, v_bias)
    ctx.causal, ctx.scale = causal, scale
    ctx.store = (store_score_grads, store_position_scores)


def _gradients(ctx, grad_out, backward):
    """The inputs' gradients (None for absent or non-differentiable ones) from the saved
    tensors, by ``backward`` (the custom op, or ``_backward`` itself on the eager path)."""
    saved = ctx.saved_tensors
    dq, dk, dv, dmk, dmv, dck, dcv, dr, du, dvb = backward(grad_out, *saved, ctx.causal, ctx.scale,
                                                           *ctx.store)
    (_, _, _, mem_k, mem_v, cmem_k, cmem_v, _, _, _, _, _, _, r, u, v_bias) = saved
    given = lambda t, g: g if t is not None else None  # noqa: E731
    return (dq, dk, dv, given(mem_k, dmk), given(mem_v, dmv), given(cmem_k, dck),
            given(cmem_v, dcv), None, None, None, given(r, dr), given(u, du),
            given(v_bias, dvb), None, None, None, None)


def _attention_backward(ctx, grad_out, *_):  # lse, the position scores, the lengths: none
    return _gradients(ctx, grad_out, attention_bwd)


torch.library.register_autograd("ct_kernels::attention_fwd", _attention_backward,
                                setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: an autograd
    Function skips the torch.library dispatch layers (tens of microseconds of host time per
    call, which the GPU waits for at small shapes). Traced code uses the custom ops."""

    @staticmethod
    def forward(ctx, *inputs):
        c = _Call(*inputs)
        out, lse, pos_scores = _forward_call(c)
        _setup_context(ctx, inputs, (out, lse, pos_scores))
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        # the backward reuses the forward's view of the call (host time), except with
        # relative positions: its q + u would stay alive between the passes
        ctx.call = None if c.flags["REL_POS"] else c
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        c, ctx.call = ctx.call, None  # released with the saved tensors; rebuilt if run again
        if c is None:
            return _gradients(ctx, grad_out, _backward)
        return _gradients(ctx, grad_out, lambda grad_out, q, k, v, mem_k, mem_v, cmem_k, cmem_v,
                          out, lse, *_: _backward_call(c, grad_out, out, lse))


@torch.library.custom_op("ct_kernels::attention_key_usage", mutates_args=())
def attention_key_usage(q: Tensor, k: Tensor, mem_k: OptTensor, cmem_k: OptTensor,
                        lse: Tensor, mem_lens: OptTensor, cmem_lens: OptTensor,
                        key_padding_mask: OptTensor, r: OptTensor, u: OptTensor,
                        v_bias: OptTensor, causal: bool, scale: float) -> Tensor:
    """[B, cm + m + n]: softmax mass each key received, summed over heads and queries."""
    return _key_usage(q, k, mem_k, cmem_k, lse, mem_lens, cmem_lens, key_padding_mask, r, u,
                      v_bias, causal, scale)


@attention_key_usage.register_fake
def _(q, k, mem_k, cmem_k, lse, mem_lens, cmem_lens, key_padding_mask, r, u, v_bias, causal,
      scale):
    size = lambda t: 0 if t is None else t.shape[1]  # noqa: E731
    return q.new_empty(q.shape[0], size(cmem_k) + size(mem_k) + q.shape[1])


# ----------------------------------------------------------------------------- dispatch
def _unsupported(dtype=None, head_dim=None, **_):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (needs float16, bfloat16 or float32)"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} (needs at most {MAX_HEAD_DIM})"
    if dtype == torch.float32 and head_dim is not None and head_dim > FP32_MAX_HEAD_DIM:
        return f"float32 with head dim {head_dim} (float32 needs at most {FP32_MAX_HEAD_DIM})"
    return None


@dispatch.register("attention", "triton", unsupported=_unsupported)
def compressive_attention(q, k, v, mem_k=None, mem_v=None, cmem_k=None, cmem_v=None, *,
                          mem_lens=None, cmem_lens=None, key_padding_mask=None, causal=True,
                          scale=None, rel_pos=None, return_key_usage=False,
                          store_score_grads=False, store_position_scores=False):
    """Same arguments and results as ``reference.compressive_attention``; with relative
    positions, store_score_grads and store_position_scores select the backward
    (``functional.compressive_attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    r, u, v_bias = rel_pos if rel_pos is not None else (None, None, None)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q, k, v, mem_k, mem_v, cmem_k, cmem_v, r, u, v_bias))
    if torch.compiler.is_compiling():  # (traced: the grad mode and requires_grad are known)
        attention = lambda *inputs: attention_fwd(*inputs)[:2]  # noqa: E731
    elif needs_grad:
        attention = _EagerAttention.apply
    else:  # nothing to differentiate: no autograd node
        attention = _forward
    # nothing kept for a backward that will not run
    out, lse = attention(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens,
                         key_padding_mask, r, u, v_bias, causal, scale,
                         bool(store_score_grads), bool(store_position_scores) and needs_grad)[:2]
    if not return_key_usage:
        return out
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    usage = attention_key_usage(q.detach(), k.detach(), detach(mem_k), detach(cmem_k),
                                lse.detach(), mem_lens, cmem_lens, key_padding_mask,
                                detach(r), detach(u), detach(v_bias), causal, scale)
    return out, usage
