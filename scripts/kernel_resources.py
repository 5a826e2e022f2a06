"""Registers, spills and shared memory of the attention kernels for sm_90, without a GPU.

Compiles each pass at its launch configuration (or the one given) for an H100/H200 target
with Triton's own compiler and reads the cubin's resource usage with cuobjdump:

    python scripts/kernel_resources.py [--rel-pos] [--head-dim 128] [--dtype float16]
                                       [--config fwd=64,64,4,3 ...]
    python scripts/kernel_resources.py --check   # every head dim, with and without positions,
                                                 # in bfloat16; float16 and float32 at D = 128;
                                                 # the passes around the sm_90 backward

Needs a CUDA build of torch and Triton (the GPU itself is not used). Shapes are multiples
of 16, as in the benchmarks, so the compiled specialisation is the one the GPU runs.
``--check`` exits with status 1 if a pass at its launch configuration does not compile or
needs more shared memory than an sm_90 block may have (CI runs it). Compiling catches what
the CPU interpreter cannot (e.g. a helper whose branches return different types).
"""
import argparse
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from benchmarks import bench_attention
from ct_kernels.ops import attention


class _Sm90Driver:
    """Just enough of Triton's driver interface to compile (not launch) for sm_90."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda


class _CompileOnly:
    """Stands in for a JIT kernel: ``kernel[grid](...)`` compiles and keeps the result."""

    def __init__(self, kernel, compiled):
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            self.compiled.append(self.kernel.warmup(*args, grid=grid, **kwargs))
        return compile_only


def resource_usage(compiled):
    """(registers, stack bytes) of a compiled kernel, from cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(part.split(":") for part in text.split("Resource usage:")[-1].split() if ":" in part)
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0))


SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt in to on sm_90


def compile_and_report(label, launch, compiled):
    """Compile one pass (launch: its launcher, compiled: where _CompileOnly keeps the
    result); print its resources under label; True if it compiles and fits."""
    del compiled[:]
    try:
        launch()
    except Exception as error:  # noqa: BLE001  (reported, and fails --check)
        print(f"{label}: does not compile: {type(error).__name__}: "
              f"{str(error).splitlines()[0][:120]}", flush=True)
        return False
    kernel = compiled[-1]
    regs, stack = resource_usage(kernel)
    shared = kernel.metadata.shared
    print(f"{label}: {regs} registers, {stack} B stack, {shared} B shared"
          f"{'' if shared <= SM90_MAX_SHARED else ' (too much)'}", flush=True)
    return shared <= SM90_MAX_SHARED


def report(head_dim, rel_pos, compiled, dtype=torch.bfloat16):
    """Compile the passes for one head dim; print their resources; True if all fit."""
    suffix = "_rel" if rel_pos else ""
    args = bench_attention.make_inputs((1, 1, 128, 128, 128, head_dim), dtype, "cpu", rel_pos)
    fits = True
    for pass_name, launch in bench_attention.pass_launchers(args).items():
        config = attention.launch_config(pass_name + suffix, head_dim, dtype)
        label = pass_name + suffix + ("" if dtype == torch.bfloat16 else
                                      " " + str(dtype).split(".")[-1])
        fits &= compile_and_report(f"{label:9s} D={head_dim} {config}", launch, compiled)
    return fits


def report_position_passes(compiled):
    """Compile the passes around the sm_90 backward with relative positions (head dim 128,
    bfloat16: q + u and q + v, the position scores by key, the zeros by distance, the position
    part of dQ); print their resources; True if all fit."""
    B, H, n, m, cm, D = 2, 2, 128, 128, 128, 128
    args = bench_attention.make_inputs((B, H, n, m, cm, D), torch.bfloat16, "cpu", True)
    t = {k: a.detach() for k, a in args.items() if isinstance(a, torch.Tensor)}
    call = attention._Call(t["q"], t["k"], t["v"], t["mem_k"], t["mem_v"], t["cmem_k"],
                           t["cmem_v"], None, None, None,
                           *(a.detach() for a in args["rel_pos"]), True, D ** -0.5)
    query_v = torch.empty_like(t["q"])
    by_distance = torch.empty(H, B * n, call.score_grad_columns[0], dtype=torch.bfloat16)
    workspace = attention.sm90_backward_workspace(B, H, n, "cpu")
    position = torch.empty(H, B * n, D)
    passes = {
        "_biased_queries_kernel": lambda: attention._biased_queries(call),
        "_position_scores_by_key_kernel": lambda: attention._position_scores_by_key(call, query_v),
        "_clear_unwritten_distances_kernel": lambda: attention._clear_unwritten_distances(
            call, by_distance, cm + m + n),
        "_position_part_kernel": lambda: attention._position_part(workspace, position,
                                                                   torch.empty_like(t["q"]), 0.1),
    }
    return all([compile_and_report(f"{name} D={D}", launch, compiled)
                for name, launch in passes.items()])


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_resources.py compiles for sm_90: run it without TRITON_INTERPRET "
                         "(the kernels are interpreter functions when it is set)")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rel-pos", action="store_true")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--config", nargs="*", default=[],
                        help="pass=BLOCK_M,BLOCK_N,warps,stages overrides, e.g. dq=64,64,4,2")
    parser.add_argument("--check", action="store_true",
                        help="every head dim with and without relative positions; exit 1 on failure")
    options = parser.parse_args()
    suffix = "_rel" if options.rel_pos else ""
    for item in options.config:
        name, values = item.split("=")
        attention.GPU_CONFIGS[(name + suffix, options.head_dim)] = tuple(
            int(v) for v in values.split(","))
    triton.runtime.driver.set_active(_Sm90Driver())
    compiled = []
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_dq_stored_kernel",
                 "_biased_queries_kernel", "_position_scores_by_key_kernel",
                 "_clear_unwritten_distances_kernel", "_position_part_kernel"):
        setattr(attention, name, _CompileOnly(getattr(attention, name), compiled))
    attention.dispatch.triton_interpreted = lambda: False
    dtype = getattr(torch, options.dtype)
    cases = ([(d, rel, torch.bfloat16) for d in attention.HEAD_DIMS for rel in (False, True)]
             # the other dtypes' code paths (fp32 position pairs, fp32 products) at one head dim
             + [(128, rel, dt) for dt in (torch.float16, torch.float32) for rel in (False, True)]
             if options.check else [(options.head_dim, options.rel_pos, dtype)])
    fits = [report(head_dim, rel_pos, compiled, dt) for head_dim, rel_pos, dt in cases]
    if options.check:
        fits.append(report_position_passes(compiled))
    if not all(fits):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
