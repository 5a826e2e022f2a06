"""Test helpers shared by tests/, benchmarks/ and ``python -m ct_kernels.validate``.

- ``naive_attention``: an independent loop implementation of DESIGN.md's attention
  (row by row, float64), used to check the reference itself.
- ``random_attention_inputs``: fresh random inputs (never zeros) for any configuration.
- ``error_rule``: FlashAttention's acceptance rule. A kernel's max error against the
  float64 reference may be at most ``factor`` (2 for outputs, 3 for gradients) times the
  error of the same math done by the reference at the kernel's precision, plus 8 ulps of
  the output's magnitude in the kernel's dtype (roundings a lucky reference can avoid when
  the maximum runs over few elements, e.g. a scalar loss or a single query) and 8 fp32 ulps
  at unit scale (exact zeros).
- ``compile_for_sm90`` / ``run_without_interpreter``: compile Triton kernels for sm_90 on a
  machine without a GPU, in a fresh process with the interpreter off (the interpreter is
  dynamically typed, so typing errors only show when compiling).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Callable, Optional

import torch

from ct_kernels.reference import RelativePosition


def naive_attention(q, k, v, mem_k=None, mem_v=None, cmem_k=None, cmem_v=None, *,
                    mem_lens=None, cmem_lens=None, key_padding_mask=None, causal=True,
                    scale=None, rel_pos: Optional[RelativePosition] = None):
    """Loop over (b, h, i), in float64. Returns (out, usage) like the reference."""
    B, n, H, D = q.shape
    f = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    q, k, v = f(q), f(k), f(v)
    cmem_k, cmem_v, mem_k, mem_v = f(cmem_k), f(cmem_v), f(mem_k), f(mem_v)
    cm = 0 if cmem_k is None else cmem_k.shape[1]
    m = 0 if mem_k is None else mem_k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, n, H, D, dtype=torch.float64)
    usage = torch.zeros(B, cm + m + n, dtype=torch.float64)
    for b in range(B):
        keys, values, visible = [], [], []
        for s in range(cm):
            keys.append(cmem_k[b, s]); values.append(cmem_v[b, s])
            visible.append(cmem_lens is None or s >= cm - int(cmem_lens[b]))
        for s in range(m):
            keys.append(mem_k[b, s]); values.append(mem_v[b, s])
            visible.append(mem_lens is None or s >= m - int(mem_lens[b]))
        for s in range(n):
            keys.append(k[b, s]); values.append(v[b, s])
            visible.append(key_padding_mask is None or not bool(key_padding_mask[b, s]))
        for h in range(H):
            for i in range(n):
                js = [j for j in range(cm + m + n)
                      if visible[j] and (not causal or j <= cm + m + i)]
                if not js:
                    continue
                scores = []
                for j in js:
                    if rel_pos is None:
                        s = q[b, i, h] @ keys[j][h]
                    else:
                        r, u, vb = (t.detach().double().cpu() for t in rel_pos)
                        s = (q[b, i, h] + u[h]) @ keys[j][h] + (q[b, i, h] + vb[h]) @ r[h, cm + m + i - j]
                    scores.append(float(s) * scale)
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, w in zip(js, weights):
                    out[b, i, h] += (w / total) * values[j][h]
                    usage[b, j] += w / total
    return out, usage


def random_attention_inputs(B, n, H, D, m=0, cm=0, *, dtype=torch.float32, device="cpu",
                            partial=False, padding=False, rel_pos=False, extra_rows=3,
                            requires_grad=False, generator=None):
    """Keyword arguments for ``compressive_attention`` drawn fresh from N(0, 1).

    partial: random per-sample mem_lens/cmem_lens in [0, size] (both ends included).
    padding: a random key_padding_mask over the segment.
    rel_pos: a RelativePosition with R = cm + m + n + extra_rows.
    """
    g = generator

    def randn(*size):
        t = torch.randn(*size, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    args = dict(q=randn(B, n, H, D), k=randn(B, n, H, D), v=randn(B, n, H, D))
    if m:
        args.update(mem_k=randn(B, m, H, D), mem_v=randn(B, m, H, D))
    if cm:
        args.update(cmem_k=randn(B, cm, H, D), cmem_v=randn(B, cm, H, D))
    if partial:
        if m:
            lens = torch.randint(0, m + 1, (B,), generator=g)
            lens[0] = 0  # always cover an empty and a full buffer
            lens[-1] = m if B > 1 else lens[-1]
            args["mem_lens"] = lens.to(device)
        if cm:
            args["cmem_lens"] = torch.randint(0, cm + 1, (B,), generator=g).to(device)
    if padding:
        args["key_padding_mask"] = (torch.rand(B, n, generator=g) < 0.3).to(device)
    if rel_pos:
        R = cm + m + n + extra_rows
        args["rel_pos"] = RelativePosition(randn(H, R, D), randn(H, D), randn(H, D))
    return args


def max_abs_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_rule(actual, lowp_reference, exact_reference, factor):
    """(error, allowed): actual is accepted iff error <= allowed (see module docstring)."""
    error = max_abs_error(actual, exact_reference)
    if not math.isfinite(error):
        return error, 0.0
    torch_error = max_abs_error(lowp_reference, exact_reference)
    magnitude = exact_reference.abs().max().item() if exact_reference.numel() else 0.0
    # a few ulps of the output's magnitude in the kernel's dtype (roundings the reference
    # may happen to avoid on a handful of elements), plus a few fp32 ulps at unit scale for
    # exact zeros that fp32 arithmetic misses (e.g. dq of a query that sees a single key)
    floor = 8 * torch.finfo(actual.dtype).eps * magnitude
    floor += 8 * torch.finfo(torch.float32).eps if actual.dtype != torch.float64 else 1e-12
    return error, factor * torch_error + floor


def poison_(t):
    """Fill an output buffer with NaN so that unwritten elements fail every check."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


def independent_compress(x, rate, method, *, weight=None, bias=None, usage=None, dilation=2):
    """compress() through torch.nn.functional's pooling/convolution (channels-first) and
    a per-sample loop for most_used: a second formulation to check the reference."""
    import torch.nn.functional as F

    xt = x.transpose(1, 2)  # [B, d, ns]
    if method == "mean":
        return F.avg_pool1d(xt, rate, rate).transpose(1, 2)
    if method == "max":
        return F.max_pool1d(xt, rate, rate).transpose(1, 2)
    if method == "conv":
        return F.conv1d(xt, weight, bias, stride=rate).transpose(1, 2)
    if method == "dilated_conv":
        out = []
        for t in range(x.shape[1] // rate):
            acc = 0 if bias is None else bias
            for k in range(rate):
                row = t * rate + rate - 1 - (rate - 1 - k) * dilation
                if row >= 0:
                    acc = acc + x[:, row] @ weight[:, :, k].T
            out.append(acc)  # the tap k = rate - 1 (the window's last row) always exists
        return torch.stack(out, dim=1)
    if method == "most_used":
        rows = []
        for b in range(x.shape[0]):
            order = sorted(range(x.shape[1]), key=lambda s: -float(usage[b, s]))
            keep = sorted(order[: x.shape[1] // rate])
            rows.append(x[b, keep])
        return torch.stack(rows)
    raise ValueError(method)


def independent_recon_loss(q, old_k, old_v, comp_k, comp_v, *, scale=None):
    """attention_reconstruction_loss through F.scaled_dot_product_attention ([B, H, N, D])."""
    import torch.nn.functional as F

    t = lambda x: x.transpose(1, 2)  # noqa: E731
    target = F.scaled_dot_product_attention(t(q.detach()), t(old_k.detach()), t(old_v.detach()), scale=scale)
    approx = F.scaled_dot_product_attention(t(q.detach()), t(comp_k), t(comp_v), scale=scale)
    return F.mse_loss(approx, target)


def compile_for_sm90(kernel, arg_type: Callable[[str], str], **constexprs) -> None:
    """Compile a Triton kernel for sm_90 (front end, PTX, ptxas; no GPU needed).
    arg_type(name): the signature type of each runtime argument ("*bf16", "i32", "fp64", ...);
    constexprs: the constexpr arguments by name."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
    triton.compile(ASTSource(fn=kernel, signature=signature,
                             constexprs={(names.index(k),): v for k, v in constexprs.items()}),
                   target=GPUTarget("cuda", 90, 32))


def run_without_interpreter(script: str, *args: str, timeout: float = 600):
    """Run ``python -c script args...`` in a fresh process with TRITON_INTERPRET unset and this
    repository importable; returns the CompletedProcess (stdout and stderr captured)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
