"""ct_kernels.launch: a launch through its own cache runs the same kernel Triton would pick.

The kernel below computes out[i] = x[i * stride] * scale + offset; its integer arguments
specialise it (equal to 1, multiple of 16) and its pointers may be unaligned, so launches
that differ only in those properties must not share a compiled kernel. Without a GPU it
runs in the interpreter, where ``launch`` hands every call to Triton; the cache's own path is
then checked with stand-ins for the kernel, the compiled kernel and the driver.
"""
import types

import pytest
import torch
import triton
import triton.language as tl

from ct_kernels import launch as launch_module, testing
from ct_kernels.launch import launch, specialization_key

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _strided_affine_kernel(X, Out, size, stride, offset, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    x = tl.load(X + i * stride, mask=ok, other=0.0)
    tl.store(Out + i, x * scale + offset, mask=ok)


def _run(x, size, stride, offset, scale):
    out = testing.poison_(torch.empty(size, dtype=x.dtype, device=x.device))
    launch(_strided_affine_kernel, (triton.cdiv(size, 64),), (x, out, size, stride, offset, scale),
           dict(BLOCK=64, num_warps=1))
    return out


@pytest.mark.parametrize("stride,offset", [(1, 1), (2, 16), (16, 1), (17, 3), (1, 32)])
@pytest.mark.parametrize("unaligned", [False, True])
def test_launch_matches_torch_across_specialisations(stride, offset, unaligned):
    base = torch.randn(113 * 17 + 8, device=DEVICE)
    x = base[1:] if unaligned else base  # 4 bytes past a 16-byte boundary
    for scale in (0.5, 1.0):  # the second call of a key takes the cached kernel on a GPU
        for _ in range(2):
            out = _run(x, 113, stride, offset, scale)
            torch.testing.assert_close(out, x[: 113 * stride: stride] * scale + offset)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_aligned_launches_are_cached_and_unaligned_ones_are_not():
    launch_module._COMPILED.clear()
    x = torch.randn(1000, device="cuda")
    _run(x, 100, 1, 2, 0.5)
    _run(x, 100, 1, 2, 0.5)
    assert len(launch_module._COMPILED) == 1
    _run(x[1:], 100, 1, 2, 0.5)
    assert len(launch_module._COMPILED) == 1


def test_specialization_key_separates_what_triton_specialises_on():
    x = torch.zeros(8)
    assert specialization_key([1])[0] != specialization_key([True])[0]
    assert specialization_key([1])[0] != specialization_key([1.0])[0]
    assert specialization_key([16])[0] != specialization_key([17])[0]
    assert specialization_key([x])[0] != specialization_key([x.double()])[0]
    assert specialization_key([x, 3])[1]
    assert not specialization_key([x[1:], 3])[1]


def test_a_cache_hit_calls_the_compiled_launcher_with_triton_s_arguments(monkeypatch):
    # the hit path without a GPU: a stand-in kernel, compiled kernel and driver record calls
    calls = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *launch_args):
            calls.append(("run", launch_args))

    class Param:
        def __init__(self, name, default=None):
            self.name, self.default = name, default

    class Kernel:
        params = [Param("X"), Param("n"), Param("BLOCK"), Param("FLAG", default=True)]

        def __getitem__(self, grid):
            def first_launch(*args, **meta):
                calls.append(("triton", grid, args, meta))
                return Compiled()
            return first_launch

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

    monkeypatch.setattr(launch_module.dispatch, "triton_interpreted", lambda: False)
    monkeypatch.setattr(launch_module, "driver", types.SimpleNamespace(active=Driver()))
    launch_module._COMPILED.clear()
    kernel, x = Kernel(), torch.zeros(4)
    for _ in range(2):
        launch(kernel, (3, 2), (x, 5), dict(BLOCK=16, num_warps=4))
    launch(kernel, (3,), (x, 6), dict(BLOCK=16, num_warps=4))  # another value: a miss
    assert [c[0] for c in calls] == ["triton", "run", "triton"]
    assert calls[1][1] == (3, 2, 1, 1234, "function", "metadata", None, None, None, x, 5, 16, True)
    launch_module._COMPILED.clear()
