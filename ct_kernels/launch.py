"""Kernel launches with less host work than ``kernel[grid](*args, **meta)``.

On every call Triton's launcher works out again how each argument specialises the kernel
(dtype and 16-byte alignment of pointers; divisibility by 16, equality to 1 and width of
integers), builds a cache key from that and looks the compiled kernel up: about a hundred
microseconds per launch on a slow host, for kernels with sixty arguments. ``launch`` keys its
own cache on the raw values of the non-tensor arguments and the tensors' dtypes, and takes
it only when every pointer is 16-byte aligned. Equal keys then mean equal specialisations
(the key is finer than Triton's), so a hit launches exactly the kernel Triton would have
picked, through the compiled kernel's own launcher. Misses, unaligned pointers, launch hooks
(profilers), the CPU interpreter and code being traced by torch.compile (which captures the
Triton kernel itself) go through Triton's path, which compiles and caches as usual.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import triton
from triton.runtime import driver

from ct_kernels import dispatch

_COMPILED: dict = {}
_MAX_ENTRIES = 4096  # distinct shapes and kernels; cleared when exceeded


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain integer arithmetic: ``triton.cdiv`` called from Python goes
    through Triton's JIT-function machinery, microseconds per call on the host."""
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    """The smallest power of two >= x (x >= 1); host-side, as ``cdiv``."""
    return 1 << (x - 1).bit_length()


def specialization_key(args: Sequence[Any]):
    """(key, aligned): the non-tensor arguments as they are (with their type where ``==``
    would confuse 1, 1.0 and True), each tensor's dtype; and whether every tensor's data
    pointer is a multiple of 16 bytes."""
    key = []
    aligned = True
    for arg in args:
        if type(arg) is int:
            key.append(arg)
        elif isinstance(arg, torch.Tensor):
            key.append(arg.dtype)
            aligned = aligned and arg.data_ptr() % 16 == 0
        else:
            key.append((type(arg), arg))
    return tuple(key), aligned


def _hooks_set() -> bool:
    """Whether a launch hook (e.g. a profiler's) is registered: a callable, or a non-empty
    chain of them (Triton >= 3.5 keeps an empty chain when none is)."""
    runtime = triton.knobs.runtime
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def launch(kernel, grid: tuple, args: Sequence[Any], meta: dict) -> None:
    """``kernel[grid](*args, **meta)``: ``args`` the positional (run-time) arguments,
    ``meta`` the constexpr arguments and launch options (num_warps, num_stages)."""
    if torch.compiler.is_compiling() or dispatch.triton_interpreted():
        kernel[grid](*args, **meta)  # traced by torch.compile as a user Triton kernel
        return
    device = driver.active.get_current_device()
    key, aligned = specialization_key(args)
    # by identity (a JIT function hashes its source under a lock); the entry keeps the kernel
    # alive, so its id is not reused while the entry exists
    key = (id(kernel), device, tuple(meta.items()), key)
    entry = _COMPILED.get(key) if aligned else None
    if entry is None or _hooks_set():
        compiled = kernel[grid](*args, **meta)
        if aligned and all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            # the constexpr arguments after the positional ones, in signature order, as
            # Triton's own launch passes them (the launcher skips them)
            tail = tuple(meta[p.name] if p.name in meta else p.default
                         for p in kernel.params[len(args):])
            if len(_COMPILED) >= _MAX_ENTRIES:
                _COMPILED.clear()
            _COMPILED[key] = (kernel, compiled.run, compiled.function, compiled.packed_metadata,
                              tail)
        return
    _, run, function, packed_metadata, tail = entry
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    run(grid[0], grid_1, grid_2, driver.active.get_current_stream(device), function,
        packed_metadata, None, None, None, *args, *tail)
