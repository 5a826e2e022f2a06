"""Compression of evicted memories and the fused memory update.

Which backend serves which ``compress`` method:

| method | "cuda" | "triton" |
|---|---|---|
| mean, max | CUDA kernels (csrc/compress.cu), 16-byte accesses | Triton kernels below |
| conv | one cuBLAS GEMM ``x.view(B*T, rate*d) @ W`` (W permuted once per weight version) | same |
| dilated_conv | the overlapping windows gathered once, then conv's GEMM | same |
| most_used | reference (top-k + sort + gather already is the minimal work) | reference |

Pooling reads [B, ns, d] in place (any batch/row strides, contiguous d); backward recomputes
from x (mean: grad / rate to every row; max: grad shared evenly by the rows equal to the
maximum, torch.amax's rule), so nothing but x and the output is saved.

``memory_update`` (used by ``ct_kernels.memory.LayerMemory``) shifts mem and cmem left in
place and appends the new rows in one kernel for pooling and for given compressed slots; for
conv the GEMM writes straight into the freed tail of cmem between the cmem and mem shifts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ct_kernels import dispatch, reference
from ct_kernels.launch import cdiv, launch, next_power_of_2

# memory_update's pool modes (csrc/compress.cu: enum Pool)
POOL_NONE, POOL_MEAN, POOL_MAX, POOL_GIVEN = 0, 1, 2, 3
POOL_MODES = {"mean": POOL_MEAN, "max": POOL_MAX}


def _launch(kernel, rows, d, dtype, *args, **meta):
    """One program per (row, BLOCK_D columns). Every element is owned by one thread (no
    replication, which the in-place update relies on), 8 bf16 per thread at full width;
    accumulation in fp32 (fp64 for fp64)."""
    block = max(32, min(1024, next_power_of_2(d)))
    launch(kernel, (rows, cdiv(d, block)), args,
           dict(meta, ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK_D=block,
                num_warps=max(1, min(4, block // 256))))


# ---------------------------------------------------------------------------- Triton pooling
@triton.jit
def _pool_forward_kernel(x_ptr, out_ptr, T, d, x_sb, x_sr, RATE: tl.constexpr,
                         IS_MAX: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (b, t, BLOCK_D columns): reduce the window's RATE rows
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < d
    src = x_ptr + b.to(tl.int64) * x_sb + (t * RATE).to(tl.int64) * x_sr + cols
    acc = tl.load(src, mask=ok).to(ACC)
    for k in tl.static_range(1, RATE):
        row = tl.load(src + k * x_sr, mask=ok).to(ACC)
        if IS_MAX:
            acc = tl.maximum(acc, row, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc += row
    if not IS_MAX:
        acc = acc / RATE
    tl.store(out_ptr + bt.to(tl.int64) * d + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pool_backward_kernel(grad_ptr, x_ptr, out_ptr, dx_ptr, T, d, g_sb, g_sr, x_sb, x_sr,
                          RATE: tl.constexpr, IS_MAX: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # one program per (b, t, BLOCK_D columns): spread grad[b, t] over the window's rows
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < d
    g = tl.load(grad_ptr + b.to(tl.int64) * g_sb + t.to(tl.int64) * g_sr + cols, mask=ok).to(ACC)
    dst = dx_ptr + bt.to(tl.int64) * RATE * d + cols  # dx is contiguous [B, ns, d]
    if IS_MAX:
        top = tl.load(out_ptr + bt.to(tl.int64) * d + cols, mask=ok)
        src = x_ptr + b.to(tl.int64) * x_sb + (t * RATE).to(tl.int64) * x_sr + cols
        ties = tl.zeros([BLOCK_D], dtype=ACC)
        for k in tl.static_range(RATE):  # rows equal to the maximum share the gradient
            ties += tl.where(tl.load(src + k * x_sr, mask=ok) == top, 1.0, 0.0).to(ACC)
        for k in tl.static_range(RATE):
            hit = tl.load(src + k * x_sr, mask=ok) == top
            share = tl.where(hit, g / ties, 0.0)
            tl.store(dst + k * d, share.to(dx_ptr.dtype.element_ty), mask=ok)
    else:
        share = (g / RATE).to(dx_ptr.dtype.element_ty)
        for k in tl.static_range(RATE):
            tl.store(dst + k * d, share, mask=ok)


def _rows_last_contiguous(x):
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def triton_pool(x, rate, is_max):
    x = _rows_last_contiguous(x)
    B, ns, d = x.shape
    T = ns // rate
    out = torch.empty(B, T, d, dtype=x.dtype, device=x.device)
    if out.numel():
        _launch(_pool_forward_kernel, B * T, d, x.dtype, x, out, T, d, x.stride(0), x.stride(1),
                RATE=rate, IS_MAX=is_max)
    return out


def triton_pool_backward(grad, x, out, rate, is_max):
    grad = _rows_last_contiguous(grad)
    B, ns, d = x.shape
    T = ns // rate
    dx = torch.empty(B, ns, d, dtype=x.dtype, device=x.device)
    if dx.numel():
        _launch(_pool_backward_kernel, B * T, d, x.dtype, grad, x, out, dx, T, d, grad.stride(0),
                grad.stride(1), x.stride(0), x.stride(1), RATE=rate, IS_MAX=is_max)
    return dx


def cuda_pool(x, rate, is_max):
    return torch.ops.ct_kernels.pool_compress(_rows_last_contiguous(x), rate, is_max)


def cuda_pool_backward(grad, x, out, rate, is_max):
    return torch.ops.ct_kernels.pool_compress_backward(_rows_last_contiguous(grad), x, out,
                                                       rate, is_max)


class _Pool(torch.autograd.Function):
    """Mean/max pooling with kernel = stride = rate; ``kernels`` = (forward, backward)."""

    @staticmethod
    def forward(ctx, x, rate, is_max, kernels):
        x = _rows_last_contiguous(x)
        out = kernels[0](x, rate, is_max)
        ctx.rate, ctx.is_max, ctx.backward_kernel = rate, is_max, kernels[1]
        ctx.save_for_backward(x, out if is_max else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        return ctx.backward_kernel(grad, x, out, ctx.rate, ctx.is_max), None, None, None


# ---------------------------------------------------------------------------- conv as a GEMM
_WEIGHT_MATRICES = WeakIdKeyDictionary()  # weight -> (its _version, [rate * d, d_out] copy)


def weight_matrix(weight):
    """nn.Conv1d weight [d_out, d, rate] as the GEMM operand [rate * d, d_out], permuted once
    per weight version (optimizer steps bump the version)."""
    if torch.compiler.is_compiling():  # no cache while tracing: the compiled graph permutes
        return reference.conv_weight_as_matrix(weight.detach()).contiguous()
    cached = _WEIGHT_MATRICES.get(weight)
    if cached is None or cached[0] != weight._version:
        cached = (weight._version, reference.conv_weight_as_matrix(weight.detach()).contiguous())
        _WEIGHT_MATRICES[weight] = cached
    return cached[1]


def window_rows(x, rate):
    """[B, ns, d] -> [B, ns // rate, rate * d], a view when rows are contiguous."""
    B, ns, d = x.shape
    if x.stride(1) != d or (d > 1 and x.stride(2) != 1):
        x = x.contiguous()
    return x.view(B, ns // rate, rate * d)


def gemm_rows(rows, wmat, bias=None, out=None):
    """rows [B, T, K] @ wmat [K, N] (+ bias) in one cuBLAS call: folded into a single matrix
    when the batch is dense, else strided-batched (so ``out`` may be a slice of a buffer)."""
    B, T, K = rows.shape
    if out is None and rows.stride(0) == T * rows.stride(1):
        flat = rows.reshape(B * T, K)
        res = flat @ wmat if bias is None else torch.addmm(bias, flat, wmat)
        return res.view(B, T, -1)
    w = wmat.expand(B, *wmat.shape)
    if bias is None:
        return torch.bmm(rows, w, out=out)
    return torch.baddbmm(bias.expand(B, T, -1), rows, w, out=out)


class _ConvGemm(torch.autograd.Function):
    """nn.Conv1d(d, d_out, rate, stride=rate) on [B, ns, d] as [B*T, rate*d] x [rate*d, d_out]."""

    @staticmethod
    def forward(ctx, x, weight, bias, rate):
        rows = window_rows(x, rate)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return gemm_rows(rows, weight_matrix(weight), bias)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        d_out, d, rate = weight.shape
        B, T, K = rows.shape
        g = grad.reshape(B * T, d_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight_matrix(weight).t()).view(B, T * rate, d)
        if ctx.needs_input_grad[1]:
            dw = (rows.reshape(B * T, K).t() @ g).view(rate, d, d_out).permute(2, 1, 0).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None


def dilated_conv(x, rate, weight, bias, dilation):
    """reference.compress's dilated_conv through conv's GEMM: with (rate-1)*(dilation-1) zero
    rows in front of x, slot t's taps are rows t*rate + k*dilation. The windows overlap, so
    they are gathered once (one copy of x's size, in tap order) for a single GEMM that
    accumulates all taps in fp32 and rounds once, as a convolution does."""
    B, ns, d = x.shape
    span = (rate - 1) * dilation + 1
    padded = F.pad(x, (0, 0, span - rate, 0))
    windows = padded.unfold(1, span, rate)[..., ::dilation]  # [B, T, d, rate]
    return _ConvGemm.apply(windows.transpose(2, 3).reshape(B, ns, d), weight, bias, rate)


# ---------------------------------------------------------------------------- registration
def _compress_with(pool_kernels):
    def compress(x, rate, method, *, weight=None, bias=None, usage=None, dilation=2):
        if method in ("mean", "max"):
            if not (torch.is_grad_enabled() and x.requires_grad):  # no autograd node needed
                return pool_kernels[0](x, rate, method == "max")
            return _Pool.apply(x, rate, method == "max", pool_kernels)
        if method == "conv":
            return _ConvGemm.apply(x, weight, bias, rate)
        return dilated_conv(x, rate, weight, bias, dilation)
    return compress


def _compress_unsupported(method=None, **_):
    if method == "most_used":
        return "most_used is a top-k + gather, served by the reference backend"
    return None


dispatch.register("compress", "triton", unsupported=_compress_unsupported)(
    _compress_with((triton_pool, triton_pool_backward)))
dispatch.register("compress", "cuda", unsupported=_compress_unsupported)(
    _compress_with((cuda_pool, cuda_pool_backward)))


# ---------------------------------------------------------------------------- memory update
@triton.jit
def _memory_update_kernel(mem_ptr, cmem_ptr, h_ptr, given_ptr, mem_lens_ptr, cmem_lens_ptr,
                          m, cm, n, d, mem_sb, mem_sr, cmem_sb, cmem_sr, h_sb, h_sr,
                          given_sb, given_sr, RATE: tl.constexpr, POOL: tl.constexpr,
                          SHIFT_CMEM: tl.constexpr, SHIFT_MEM: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # One program per (b, new slot j, BLOCK_D columns); programs own disjoint rows, and every
    # chain walks upwards, so each row is read before it is overwritten (csrc/compress.cu's
    # memory_update_kernel is the same algorithm). Row offsets within one sample fit in int32.
    nc = n // RATE
    pid = tl.program_id(0)
    b, j = pid // nc, pid % nc
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < d
    mem = mem_ptr + b.to(tl.int64) * mem_sb + cols
    cmem = cmem_ptr + b.to(tl.int64) * cmem_sb + cols
    h = h_ptr + b.to(tl.int64) * h_sb + cols

    # 1. new slot j from the rows about to leave: stream rows j*RATE.., stream = [mem | h]
    if POOL == 1 or POOL == 2:
        for k in tl.static_range(RATE):
            s = j * RATE + k
            if s < m:
                old_row = tl.load(mem + s * mem_sr, mask=ok).to(ACC)
            else:
                old_row = tl.load(h + (s - m) * h_sr, mask=ok).to(ACC)
            if k == 0:
                acc = old_row
            elif POOL == 2:
                acc = tl.maximum(acc, old_row, propagate_nan=tl.PropagateNan.ALL)
            else:
                acc += old_row
        if POOL == 1:
            acc = acc / RATE
        slot = acc
    if POOL == 3:
        slot = tl.load(given_ptr + b.to(tl.int64) * given_sb + j.to(tl.int64) * given_sr + cols,
                       mask=ok)

    # 2. cmem: shift left by nc along the chain ending at slot j's row, then append it
    if SHIFT_CMEM:
        last = cm - nc + j
        if cm > nc:
            for t in range(last % nc, cm - nc, nc):
                kept_row = tl.load(cmem + (t + nc) * cmem_sr, mask=ok)
                tl.store(cmem + t * cmem_sr, kept_row, mask=ok)
        if POOL != 0:
            if last >= 0:
                tl.store(cmem + last * cmem_sr,
                         slot.to(cmem_ptr.dtype.element_ty), mask=ok)

    # 3. mem: shift left by n along the RATE chains starting at the old rows read above
    if SHIFT_MEM:
        for k in tl.static_range(RATE):
            for t in range(j * RATE + k, m, n):
                s = t + n
                if s < m:
                    moved_row = tl.load(mem + s * mem_sr, mask=ok)
                else:
                    moved_row = tl.load(h + (s - m) * h_sr, mask=ok)
                tl.store(mem + t * mem_sr, moved_row, mask=ok)
        if (j == 0) & (tl.program_id(1) == 0):  # fill lengths, once per sample
            filled = tl.load(mem_lens_ptr + b)
            evicted = tl.maximum(filled + n - m, 0)
            tl.store(mem_lens_ptr + b, tl.minimum(filled + n, m))
            cfilled = tl.load(cmem_lens_ptr + b) + evicted // RATE
            tl.store(cmem_lens_ptr + b, tl.minimum(cfilled, cm))


def triton_memory_update(mem, cmem, mem_lens, cmem_lens, h, compressed, rate, pool,
                         shift_cmem, shift_mem):
    """Same contract as torch.ops.ct_kernels.memory_update."""
    B, n, d = h.shape
    nc = n // rate
    if B * nc == 0 or d == 0:
        return
    # empty buffers are never dereferenced: hand the kernel a real pointer instead
    mem_arg = mem if mem.numel() else h
    cmem_arg = cmem if cmem.numel() else h
    given = compressed if compressed is not None else h
    _launch(_memory_update_kernel, B * nc, d, h.dtype, mem_arg, cmem_arg, h, given, mem_lens,
            cmem_lens, mem.shape[1], cmem.shape[1], n, d, mem.stride(0), mem.stride(1),
            cmem.stride(0), cmem.stride(1), h.stride(0), h.stride(1), given.stride(0),
            given.stride(1), RATE=rate, POOL=pool, SHIFT_CMEM=shift_cmem, SHIFT_MEM=shift_mem)


def _cuda_memory_update(*args):
    torch.ops.ct_kernels.memory_update(*args)


def _memory_update_with(kernel):
    def update(mem, cmem, mem_lens, cmem_lens, h, rate, method, *, compressed=None,
               weight=None, bias=None, usage=None, **options):
        """In-place update of one layer's memory (ct_kernels.memory documents the rule)."""
        from ct_kernels.memory import evicted_rows
        state = (mem, cmem, mem_lens, cmem_lens, h)
        if compressed is None and method in POOL_MODES:  # evict + pool + write: one kernel
            kernel(*state, None, rate, POOL_MODES[method], True, True)
        elif compressed is None and method == "conv":
            # cmem moves left first, the GEMM writes the new slots into its freed tail, and
            # only then does mem move (its oldest rows are the GEMM's input)
            kernel(*state, None, rate, POOL_NONE, True, False)
            nc, cm = h.shape[1] // rate, cmem.shape[1]
            kept = min(nc, cm)
            if kept:
                rows = window_rows(evicted_rows(mem, h), rate)[:, nc - kept:]
                gemm_rows(rows, weight_matrix(weight), bias, out=cmem[:, cm - kept:])
            kernel(*state, None, rate, POOL_NONE, False, True)
        else:  # compressed slots given, or computed by compress(): copied in with the shift
            if compressed is None:
                from ct_kernels.functional import compress
                compressed = compress(evicted_rows(mem, h), rate, method, weight=weight,
                                      bias=bias, usage=usage, **options)
            compressed = _rows_last_contiguous(compressed)
            kernel(*state, compressed, rate, POOL_GIVEN, True, True)
    return update


dispatch.register("memory_update", "triton")(_memory_update_with(triton_memory_update))
dispatch.register("memory_update", "cuda")(_memory_update_with(_cuda_memory_update))
