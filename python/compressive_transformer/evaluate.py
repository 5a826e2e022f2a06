"""Bits per byte of a text, segment by segment with memories carried across segments."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compressive_transformer.data import eval_segments


def autocast(device, amp, cache_enabled=True):
    """bf16 autocast on CUDA when ``amp``; a no-op context elsewhere. ``cache_enabled``: keep
    the casts of weights for reuse inside the context."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, *, streams, device, amp=True, max_segments=None,
                  rank=0, world=1):
    """Mean bits per predicted byte of ``data`` (uint8 tensor) over ``streams`` contiguous
    slices (all processes' slices when torch.distributed is initialised), memories carried
    across segments. ``max_segments`` caps the segments read per slice (None: all)."""
    was_training = model.training
    model.eval()
    seg_len = model.config.seg_len
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [nats, bytes]
    memories = None
    for i, (inputs, targets, mask) in enumerate(eval_segments(data, streams, seg_len, rank, world)):
        if (max_segments is not None and i >= max_segments) or inputs.shape[0] == 0:
            break
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        with autocast(device, amp):
            logits, memories, _ = model(inputs, memories)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        total[0] += (nll * mask.flatten()).sum()
        total[1] += mask.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item() / math.log(2)
