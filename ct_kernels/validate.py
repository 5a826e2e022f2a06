"""``python -m ct_kernels.validate``: check every op on every backend of this machine.

Each op runs forward and backward on fresh random inputs of several shapes. Fast backends
are held to the error rule of ``ct_kernels.testing.error_rule`` (2x the reference's own
error at the backend's precision for outputs, 3x for gradients); the reference backend is
checked in float64 against independent formulations (a row-by-row loop for attention,
torch.nn.functional for compression and the reconstruction loss). Prints a table and exits
with status 1 if anything fails.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

import ct_kernels
from ct_kernels import reference, testing

# (name, B, n, H, D, m, cm, partial, padding, rel_pos)
ATTENTION_SHAPES = [
    ("n1-empty", 2, 1, 2, 32, 0, 0, False, False, False),
    ("n7-m5-cm4-partial-pad", 3, 7, 2, 32, 5, 4, True, True, False),
    ("n13-m8-cm6-relpos", 2, 13, 2, 64, 8, 6, True, False, True),
    ("n33-m40-cm24", 1, 33, 1, 64, 40, 24, False, False, False),
]
# (name, B, ns, d, rate)
COMPRESS_SHAPES = [("B2-ns12-d24-c3", 2, 12, 24, 3), ("B3-ns32-d40-c4", 3, 32, 40, 4)]
# (name, B, n, ns, rate, H, D)
RECON_SHAPES = [("B2-n7-ns12-c3-D32", 2, 7, 12, 3, 2, 32), ("B1-n33-ns40-c4-D64", 1, 33, 40, 4, 2, 64)]


@dataclass
class Case:
    op: str
    shape: str
    inputs: Callable[[torch.dtype, str, torch.Generator], Dict]  # fresh inputs
    run: Callable[..., torch.Tensor]                         # (backend, **inputs) -> output
    independent: Callable[..., torch.Tensor]                 # float64 second formulation


def _attention_cases():
    for name, B, n, H, D, m, cm, partial, padding, rel in ATTENTION_SHAPES:
        def inputs(dtype, device, g, B=B, n=n, H=H, D=D, m=m, cm=cm, p=partial, pad=padding, r=rel):
            return testing.random_attention_inputs(B, n, H, D, m, cm, dtype=dtype, device=device,
                                                   partial=p, padding=pad, rel_pos=r, generator=g)
        yield Case("attention", name, inputs,
                   lambda backend, **kw: ct_kernels.compressive_attention(**kw, backend=backend),
                   lambda **kw: testing.naive_attention(**kw)[0])


def _compress_cases():
    for name, B, ns, d, rate in COMPRESS_SHAPES:
        for method in ct_kernels.COMPRESS_METHODS:
            def inputs(dtype, device, g, B=B, ns=ns, d=d, rate=rate, method=method):
                randn = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
                kw = dict(x=randn(B, ns, d), rate=rate, method=method)
                if method in ("conv", "dilated_conv"):
                    kw.update(weight=randn(d, d, rate) / (d * rate) ** 0.5, bias=randn(d))
                if method == "most_used":
                    kw.update(usage=torch.rand(B, ns, generator=g).to(device, torch.float32))
                return kw
            yield Case("compress", f"{name}-{method}", inputs,
                       lambda backend, **kw: ct_kernels.compress(**kw, backend=backend),
                       testing.independent_compress)


def _loss_cases():
    for name, B, n, ns, rate, H, D in RECON_SHAPES:
        def inputs(dtype, device, g, B=B, n=n, ns=ns, rate=rate, H=H, D=D):
            randn = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
            return dict(q=randn(B, n, H, D), old_k=randn(B, ns, H, D), old_v=randn(B, ns, H, D),
                        comp_k=randn(B, ns // rate, H, D), comp_v=randn(B, ns // rate, H, D))
        yield Case("recon_loss", name, inputs,
                   lambda backend, **kw: ct_kernels.attention_reconstruction_loss(**kw, backend=backend),
                   testing.independent_recon_loss)

        def ae_inputs(dtype, device, g, B=B, ns=ns, rate=rate, d=H * D):
            randn = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
            return dict(old=randn(B, ns, d), compressed=randn(B, ns // rate, d),
                        dec_weight=randn(d, d, rate) / d ** 0.5, dec_bias=randn(d))

        def ae_independent(old, compressed, dec_weight, dec_bias):
            import torch.nn.functional as F
            recon = F.conv_transpose1d(compressed.transpose(1, 2), dec_weight, dec_bias,
                                       stride=dec_weight.shape[2])
            return F.mse_loss(recon.transpose(1, 2), old.detach())
        yield Case("autoencoding_loss", f"B{B}-ns{ns}-d{H * D}-c{rate}", ae_inputs,
                   lambda backend, **kw: ct_kernels.autoencoding_loss(**kw, backend=backend),
                   ae_independent)


def all_cases() -> List[Case]:
    return [*_attention_cases(), *_compress_cases(), *_loss_cases()]


def _forward_backward(fn, inputs, grad_seed):
    """Output and gradients of every floating input that requires grad (in dict order)."""
    leaves = {k: v for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "usage"}
    if "rel_pos" in inputs and inputs["rel_pos"] is not None:
        leaves.update({f"rel_pos.{f}": t for f, t in inputs["rel_pos"]._asdict().items()})
    for t in leaves.values():
        t.requires_grad_(True)
    out = fn(**inputs)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    results = {"out": out.detach()}
    if not out.requires_grad:  # a non-differentiable formulation (the row-by-row loop)
        return results
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    for name, grad in zip(leaves, grads):
        if grad is not None:
            results[f"d{name}"] = grad
    return results


def _cast(inputs, dtype, device=None):
    """Fresh leaf copies of the floating inputs in ``dtype`` (integer/bool ones only moved)."""
    def cast(v):
        if isinstance(v, reference.RelativePosition):
            return reference.RelativePosition(*(cast(t) for t in v))
        if isinstance(v, torch.Tensor):
            v = v.detach().to(device or v.device)
            return v.to(dtype) if v.is_floating_point() else v
        return v
    return {k: cast(v) for k, v in inputs.items()}


def check(case: Case, backend: str, dtype: torch.dtype, device: str, seed: int):
    """Rows (op, backend, shape, quantity, error, allowed, ok) for one case."""
    g = torch.Generator().manual_seed(seed)
    base = case.inputs(torch.float32, "cpu", g)
    run = lambda **kw: case.run(backend, **kw)  # noqa: E731
    rows = []
    if backend == "reference":
        exact = _forward_backward(lambda **kw: case.run("reference", **kw), _cast(base, torch.float64), seed)
        other = _forward_backward(case.independent, _cast(base, torch.float64), seed)
        for name in other:  # the loop formulation gives outputs only; gradcheck covers grads
            ref = exact[name]
            err = testing.max_abs_error(ref, other[name])
            allowed = 1e-9 * max(1.0, other[name].abs().max().item())
            rows.append((name, err, allowed))
    else:
        actual = _forward_backward(run, _cast(base, dtype, device), seed)
        lowp = _forward_backward(lambda **kw: case.run("reference", **kw), _cast(base, dtype, device), seed)
        exact = _forward_backward(lambda **kw: case.run("reference", **kw), _cast(base, torch.float64, device), seed)
        for name, ref in exact.items():
            factor = 2 if name == "out" else 3
            err, allowed = testing.error_rule(actual[name], lowp[name], ref, factor)
            rows.append((name, err, allowed))
    return [(case.op, backend, case.shape, name, err, allowed, err <= allowed) for name, err, allowed in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="*", help="backends to check (default: all available)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="dtype for fast backends (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    backends = args.backend or ct_kernels.available_backends()
    print(f"ct_kernels {ct_kernels.__version__}  torch {torch.__version__}  device {device}  "
          f"backends {backends}  dtype {dtype}  seed {seed}")
    print(f"{'op':18s} {'backend':10s} {'shape':34s} {'quantity':14s} {'max error':>10s} {'allowed':>10s}  result")
    failures = 0
    for backend in backends:
        for i, case in enumerate(all_cases()):
            try:
                rows = check(case, backend, dtype, device, seed + i)
            except ValueError as error:  # this backend does not take these inputs
                print(f"{case.op:18s} {backend:10s} {case.shape:34s} skipped: {error}")
                continue
            for op, be, shape, name, err, allowed, ok in rows:
                failures += not ok
                print(f"{op:18s} {be:10s} {shape:34s} {name:14s} {err:10.3e} {allowed:10.3e}  "
                      f"{'pass' if ok else 'FAIL'}")
    print("all checks passed" if failures == 0 else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
