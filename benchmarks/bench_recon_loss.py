"""Attention-reconstruction loss: ct_triton vs two SDPA calls + mse and the naive einsum.

Rows (benchmarks/results/recon_loss.csv), op ``recon_loss``, the shapes of issue 6 named
B{B}-H{H}-n{n}-ns{ns}-c{rate}-D{D}; providers ct_triton (the fused kernels), ct_cuda (on
sm_90: the forward and backward of ct_kernels._C's warpgroup-MMA kernels), sdpa
(attention over old and over compressed K/V with F.scaled_dot_product_attention, then
F.mse_loss), naive (the reference einsum); on the GPU also ct_triton-graph and sdpa-graph,
the same calls timed as CUDA graph replays (GPU time without the Python and launch work per
call, which a training step overlaps with the GPU work queued before it). Modes fwd (no grad) and fwd+bwd (gradients of
comp_k and comp_v only, as the loss defines). FLOPs counted for every provider alike:
fwd 4 B H n D (ns + nc), bwd 8 B H n nc D (scores, dV, dP, dK of the compressed attention).

``sweep()`` prints forward/backward times of a few block configurations of the fused
kernels at the first shape (how the defaults in ct_kernels/ops/recon_loss.py were chosen).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ct_kernels
from benchmarks import harness
from ct_kernels import reference
from ct_kernels.ops import recon_loss

# name -> (B, H, n, ns, rate, D)
SHAPES = {
    "B16-H8-n512-ns512-c2-D128": (16, 8, 512, 512, 2, 128),
    "B8-H8-n768-ns768-c3-D128": (8, 8, 768, 768, 3, 128),
}
CPU_SHAPES = {"B1-H2-n24-ns24-c2-D16": (1, 2, 24, 24, 2, 16)}
CSV = "recon_loss.csv"


def recon_loss_flops(B, H, n, ns, rate, D):
    """(fwd, fwd+bwd) FLOPs."""
    nc = ns // rate
    fwd = 4 * B * H * n * D * (ns + nc)
    return fwd, fwd + 8 * B * H * n * nc * D


def make_inputs(shape, dtype, device):
    """q, old_k, old_v (constants) and comp_k, comp_v (requiring grad), [B, N, H, D]."""
    B, H, n, ns, rate, D = shape
    randn = lambda size: torch.randn(*size, device=device, dtype=dtype)  # noqa: E731
    q, old_k, old_v = randn((B, n, H, D)), randn((B, ns, H, D)), randn((B, ns, H, D))
    comp_k, comp_v = (randn((B, ns // rate, H, D)).requires_grad_() for _ in range(2))
    return q, old_k, old_v, comp_k, comp_v


def sdpa_recon_loss(q, old_k, old_v, comp_k, comp_v):
    """What a user writes today: two SDPA calls on [B, H, N, D] views, then mse."""
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731
    q = heads_first(q)
    target = F.scaled_dot_product_attention(q, heads_first(old_k), heads_first(old_v))
    out = F.scaled_dot_product_attention(q, heads_first(comp_k), heads_first(comp_v))
    return F.mse_loss(out, target)


def providers():
    found = {"ct_triton": lambda *t: ct_kernels.attention_reconstruction_loss(*t, backend="triton")}
    if torch.cuda.is_available() and recon_loss._sm90_unsupported(dtype=torch.bfloat16,
                                                                  head_dim=128) is None:
        found["ct_cuda"] = lambda *t: ct_kernels.attention_reconstruction_loss(*t, backend="cuda")
    return {**found, "sdpa": sdpa_recon_loss, "naive": reference.attention_reconstruction_loss}


def cases(shapes, dtype, device):
    """(shape name, provider, mode, callable, flops) for every benchmark case."""
    for name, shape in shapes.items():
        tensors = make_inputs(shape, dtype, device)
        fwd_flops, fwd_bwd_flops = recon_loss_flops(*shape)
        for provider, loss_fn in providers().items():
            def forward(loss_fn=loss_fn):
                with torch.no_grad():
                    return loss_fn(*tensors)

            def forward_backward(loss_fn=loss_fn):
                return torch.autograd.grad(loss_fn(*tensors), tensors[3:])
            yield name, provider, "fwd", forward, fwd_flops
            yield name, provider, "fwd+bwd", forward_backward, fwd_bwd_flops
            if device == "cuda" and provider != "naive":  # captured when measured
                yield name, f"{provider}-graph", "fwd", forward, fwd_flops
                yield name, f"{provider}-graph", "fwd+bwd", forward_backward, fwd_bwd_flops


def run():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SHAPES if device == "cuda" else CPU_SHAPES
    rows = []
    for name, provider, mode, fn, flops in cases(shapes, torch.bfloat16, device):
        try:
            graph = provider.endswith("-graph")
            rows.append(harness.measure("recon_loss", name, provider, mode,
                                        harness.graphed(fn) if graph else fn, flops=flops,
                                        memory=not graph))
        except Exception as error:  # e.g. out of memory
            harness.failed_row("recon_loss", name, provider, mode, error)
        if device == "cuda":
            torch.cuda.empty_cache()
    harness.append_rows(rows, CSV)
    harness.plot(rows, "recon_loss", filename="recon_loss.png")
    return rows


FWD_CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
               (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 4, 1), (128, 64, 8, 1)]
BWD_CONFIGS = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3),
               (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 1)]


def sweep():
    """Print ms of the fused forward (saving for backward) and backward per block config."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, shape = next(iter((SHAPES if device == "cuda" else CPU_SHAPES).items()))
    q, old_k, old_v, comp_k, comp_v = make_inputs(shape, torch.bfloat16, device)
    scale = shape[-1] ** -0.5
    _, diff, lse, delta = recon_loss.recon_loss_forward(q, old_k, old_v, comp_k, comp_v, scale, True)
    grad = torch.ones((), device=device)
    if device == "cuda" and recon_loss._sm90_unsupported(dtype=q.dtype, head_dim=shape[-1]) is None:
        for config in recon_loss.SM90_CONFIGS:
            ms = harness.time_ms(lambda: recon_loss.recon_loss_forward_sm90(
                q, old_k, old_v, comp_k, comp_v, scale, True, config=config), rep_ms=100)
            print(f"sweep {name} fwd sm90 {config}: {ms:.4f} ms", flush=True)
    for config in FWD_CONFIGS:
        ms = harness.time_ms(lambda: recon_loss.recon_loss_forward(
            q, old_k, old_v, comp_k, comp_v, scale, True, config=config), rep_ms=100)
        print(f"sweep {name} fwd {config}: {ms:.4f} ms", flush=True)
    for config in BWD_CONFIGS:
        ms = harness.time_ms(lambda: recon_loss.recon_loss_backward(
            grad, q, comp_k, comp_v, diff, lse, delta, scale, config=config), rep_ms=100)
        print(f"sweep {name} bwd {config}: {ms:.4f} ms", flush=True)


if __name__ == "__main__":
    run()
