"""The one dispatch point: which backend runs an op on given inputs.

Backends register implementations per op with ``register``. ``backend="auto"`` picks the
first backend in ``PREFERENCE`` that is available, runs on the inputs' device and accepts
the inputs; naming a backend that cannot run the inputs is a ``ValueError`` saying why.
CUDA inputs that only the reference accepts get a warning (once per op and reasons).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional

import torch

PREFERENCE = ("cuda", "triton", "reference")


class _Impl(NamedTuple):
    fn: Callable
    # returns None when the inputs are supported, else a short reason
    unsupported: Optional[Callable[..., Optional[str]]]


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}


def register(op: str, backend: str, unsupported: Optional[Callable[..., Optional[str]]] = None):
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in PREFERENCE:
        raise ValueError(f"unknown backend {backend!r}")

    def wrap(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, unsupported)
        return fn

    return wrap


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_extension_loaded() -> bool:
    try:
        from ct_kernels import _C  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)  # asked at every dispatch
def extension_has(*ops: str) -> bool:
    """Whether ct_kernels._C loaded and registered every one of these torch.ops.ct_kernels ops."""
    return _cuda_extension_loaded() and all(hasattr(torch.ops.ct_kernels, op) for op in ops)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple:
    return torch.cuda.get_device_capability(device_index)


@torch.compiler.assume_constant_result  # torch.compile asks once, traces no device query
def on_sm90() -> bool:
    """Whether the current CUDA device is a Hopper GPU (compute capability 9.0), which the
    extension's sm_90 kernels need."""
    return _capability(torch.cuda.current_device()) == (9, 0)


@torch.compiler.assume_constant_result  # torch.compile runs it eagerly, traces no import
def available_backends() -> list:
    """Backends this machine can run: "reference" always, "triton" where Triton runs
    (a CUDA GPU, or the CPU interpreter with TRITON_INTERPRET=1), "cuda" where the
    C++/CUDA extension loaded and a GPU is present."""
    return list(_available(triton_interpreted()))


@functools.lru_cache(maxsize=None)
def _available(interpreted: bool) -> tuple:
    backends = []
    if _cuda_extension_loaded() and torch.cuda.is_available():
        backends.append("cuda")
    if importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or interpreted):
        backends.append("triton")
    backends.append("reference")
    return tuple(backends)


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return device.type == "cuda"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=5)  # the caller of a ct_kernels.functional op


def _warn_reference_fallback(op: str, declined: tuple) -> None:
    """Warns (once per op and reasons) that CUDA inputs run on the reference implementation,
    which materialises what the kernels avoid; silent while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    reasons = "; ".join(f"{name}: {reason}" for name, reason in declined)
    _warn_once(f"ct_kernels: {op} on CUDA tensors falls back to the reference implementation "
               f"(unsupported by {reasons})")


def resolve(op: str, backend: str, device: torch.device, **inputs) -> Callable:
    """The implementation of ``op`` that runs ``inputs`` (keyword facts about them)."""
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        available = available_backends()
        declined = []  # (backend, reason) of faster backends that cannot run these inputs
        for name in PREFERENCE:
            impl = impls.get(name)
            if impl is None or name not in available or not _runs_on(name, device):
                continue
            reason = impl.unsupported(**inputs) if impl.unsupported is not None else None
            if reason is None:
                if name == "reference" and declined and device.type == "cuda":
                    _warn_reference_fallback(op, tuple(declined))
                return impl.fn
            declined.append((name, reason))
        raise AssertionError("the reference backend accepts every valid input")  # unreachable
    if backend not in PREFERENCE:
        raise ValueError(f"backend must be 'auto' or one of {PREFERENCE}, got {backend!r}")
    if backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available on this machine "
                         f"(available: {available_backends()})")
    impl = impls.get(backend)
    if impl is None:
        have = [name for name in PREFERENCE if name in impls]
        raise ValueError(f"op {op!r} has no {backend!r} implementation (it has: {have})")
    if not _runs_on(backend, device):
        raise ValueError(f"backend {backend!r} cannot run on device {device} "
                         "(tensors must be on a CUDA device"
                         + (", or TRITON_INTERPRET=1 for CPU tensors)" if backend == "triton" else ")"))
    reason = impl.unsupported(**inputs) if impl.unsupported is not None else None
    if reason is not None:
        raise ValueError(f"backend {backend!r} does not support these inputs for {op!r}: {reason}")
    return impl.fn
