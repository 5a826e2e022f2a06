"""Input validation shared by every public op: clear ValueError/TypeError messages."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name, x, ndim=None, dtype=None, device=None, allow_none=False):
    """Check that ``x`` is a tensor of the given rank, float dtype and device."""
    if x is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtype is None:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64),"
                            f" got {x.dtype}")
    elif x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (as the other inputs), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on device {device} (as the other inputs), got {x.device}")


def shape(name, x, expected, meaning):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, "
                         f"got {tuple(x.shape)}")


def kv_pair(prefix, k, v, batch, heads, head_dim, dtype, device):
    """mem_k/mem_v or cmem_k/cmem_v: both or neither, [B, S, H, D]. Returns S."""
    if (k is None) != (v is None):
        raise ValueError(f"{prefix}_k and {prefix}_v must be given together")
    if k is None:
        return 0
    tensor(f"{prefix}_k", k, 4, dtype, device)
    tensor(f"{prefix}_v", v, 4, dtype, device)
    size = k.shape[1]
    shape(f"{prefix}_k", k, (batch, size, heads, head_dim), "[B, S, H, D]")
    shape(f"{prefix}_v", v, (batch, size, heads, head_dim), "[B, S, H, D]")
    return size


def lengths(name, lens, batch, size, buffer):
    """Per-sample fill lengths: int tensor [B] with 0 <= lens <= buffer size."""
    if lens is None:
        return
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [B], got {type(lens).__name__}")
    if lens.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {lens.dtype}")
    shape(name, lens, (batch,), "[B]")
    # the value check needs a host sync: none while tracing or capturing a CUDA graph
    if torch.compiler.is_compiling() or (lens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.stack(torch.aminmax(lens)).tolist() if batch else (0, 0)  # one host sync
    if lo < 0 or hi > size:
        raise ValueError(f"{name} must lie in [0, {size}] (the size of {buffer}), "
                         f"got values in [{lo}, {hi}]")


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def scale(value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {value}")
