"""Registers, spills and shared memory of the attention kernels for sm_90, without a GPU.

Compiles each pass at its launch configuration (or the one given) for an H100/H200 target
with Triton's own compiler and reads the cubin's resource usage with cuobjdump:

    python scripts/kernel_resources.py [--rel-pos] [--head-dim 128] [--config fwd=64,64,4,3 ...]

Needs a CUDA build of torch and Triton (the GPU itself is not used). Shapes are multiples
of 16, as in the benchmarks, so the compiled specialisation is the one the GPU runs.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rel-pos", action="store_true")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--config", nargs="*", default=[],
                        help="pass=BLOCK_M,BLOCK_N,warps,stages overrides, e.g. dq=64,64,4,2")
    options = parser.parse_args()
    suffix = "_rel" if options.rel_pos else ""
    for item in options.config:
        name, values = item.split("=")
        attention.GPU_CONFIGS[(name + suffix, options.head_dim)] = tuple(int(v) for v in values.split(","))
    triton.runtime.driver.set_active(_Sm90Driver())
    compiled = []
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        setattr(attention, name, _CompileOnly(getattr(attention, name), compiled))
    attention.dispatch.triton_interpreted = lambda: False
    args = bench_attention.make_inputs((1, 1, 128, 128, 128, options.head_dim), torch.bfloat16,
                                       "cpu", options.rel_pos)
    for pass_name, launch in bench_attention.pass_launchers(args).items():
        del compiled[:]
        launch()
        kernel = compiled[-1]
        regs, stack = resource_usage(kernel)
        config = attention.GPU_CONFIGS[(pass_name + suffix, options.head_dim)]
        print(f"{pass_name + suffix:9s} D={options.head_dim} {config}: {regs} registers, "
              f"{stack} B stack, {kernel.metadata.shared} B shared", flush=True)


if __name__ == "__main__":
    main()
