"""Registers, spills and shared memory of the attention kernels for sm_90, without a GPU.

Compiles each pass at its launch configuration (or the one given) for an H100/H200 target
with Triton's own compiler and reads the cubin's resource usage with cuobjdump:

    python scripts/kernel_resources.py [--rel-pos] [--head-dim 128] [--dtype float16]
                                       [--config fwd=64,64,4,3 ...]
    python scripts/kernel_resources.py --check   # every head dim, with and without positions,
                                                 # in bfloat16; float16 and float32 at D = 128

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


def report(head_dim, rel_pos, compiled, dtype=torch.bfloat16):
    """Compile the passes for one head dim; print their resources; True if all fit."""
    suffix = "_rel" if rel_pos else ""
    args = bench_attention.make_inputs((1, 1, 128, 128, 128, head_dim), dtype, "cpu", rel_pos)
    fits = True
    for pass_name, launch in bench_attention.pass_launchers(args).items():
        config = attention.launch_config(pass_name + suffix, head_dim, dtype)
        label = pass_name + suffix + ("" if dtype == torch.bfloat16 else
                                      " " + str(dtype).split(".")[-1])
        del compiled[:]
        try:
            launch()
        except Exception as error:  # noqa: BLE001  (reported, and fails --check)
            print(f"{label:9s} D={head_dim} {config}: does not compile: "
                  f"{type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
            fits = False
            continue
        kernel = compiled[-1]
        regs, stack = resource_usage(kernel)
        shared = kernel.metadata.shared
        fits &= shared <= SM90_MAX_SHARED
        print(f"{label:9s} D={head_dim} {config}: {regs} registers, {stack} B stack, "
              f"{shared} B shared{'' if shared <= SM90_MAX_SHARED else ' (too much)'}", flush=True)
    return fits


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
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_dq_stored_kernel"):
        setattr(attention, name, _CompileOnly(getattr(attention, name), compiled))
    attention.dispatch.triton_interpreted = lambda: False
    dtype = getattr(torch, options.dtype)
    cases = ([(d, rel, torch.bfloat16) for d in attention.HEAD_DIMS for rel in (False, True)]
             # the other dtypes' code paths (fp32 position pairs, fp32 products) at one head dim
             + [(128, rel, dt) for dt in (torch.float16, torch.float32) for rel in (False, True)]
             if options.check else [(options.head_dim, options.rel_pos, dtype)])
    fits = [report(head_dim, rel_pos, compiled, dt) for head_dim, rel_pos, dt in cases]
    if not all(fits):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
