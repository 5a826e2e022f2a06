"""Per-layer memory state of a Compressive Transformer: memory + compressed memory.

Buffers are kept in chronological order (oldest slot first) so that they feed
``compressive_attention`` directly: project ``mem``/``cmem`` to keys/values and pass
``mem_lens``/``cmem_lens``. Per sample, the valid slots are the newest ``lens[b]`` ones
(the right end of each buffer); a reset sample has lens 0 and its stale slots are masked.

Update after a segment h [B, n, d] (DESIGN.md §1, written for any m, n):
  stream  = [mem | h]                       (m + n rows, per sample the last
                                             mem_lens + n of them are valid)
  old     = stream[:, :n]                    the n oldest rows leave the memory
  mem     <- stream[:, -m:]
  cmem    <- [cmem | compress(old)][-cm:]
  mem_lens  <- min(m, mem_lens + n)
  cmem_lens <- min(cm, cmem_lens + evicted // rate),  evicted = max(0, mem_lens + n - m)
A compressed slot counts as valid only when all ``rate`` rows it summarises were valid.
While a sample's memory is filling up its cmem_lens is 0, so the newest-slots-valid
invariant holds for both buffers. Positions (relative distances) depend only on buffer
sizes, never on lens. Everything here is detached (the paper's stop-gradient).
"""
from __future__ import annotations

import torch


class LayerMemory:
    """Memory and compressed memory of one layer for a batch of B streams."""

    def __init__(self, batch, mem_len, cmem_len, dim, rate, *, dtype=torch.float32, device="cpu"):
        if mem_len < 0 or cmem_len < 0:
            raise ValueError(f"mem_len and cmem_len must be >= 0, got {mem_len}, {cmem_len}")
        if rate < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        self.rate = rate
        self.mem = torch.zeros(batch, mem_len, dim, dtype=dtype, device=device)
        self.cmem = torch.zeros(batch, cmem_len, dim, dtype=dtype, device=device)
        self.mem_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.cmem_lens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def batch(self):
        return self.mem.shape[0]

    def _check_segment(self, h):
        B, m, d = self.mem.shape
        if h.dim() != 3 or h.shape[0] != B or h.shape[2] != d:
            raise ValueError(f"h must have shape [B, n, d] = [{B}, n, {d}], got {tuple(h.shape)}")
        if h.shape[1] % self.rate != 0:
            raise ValueError(f"the segment length ({h.shape[1]}) must be divisible by the "
                             f"compression rate ({self.rate})")

    def evicted(self, h):
        """The n rows that leave the memory when segment h [B, n, d] is appended: a view of
        ``mem`` when m >= n (no copy)."""
        self._check_segment(h)
        n, m = h.shape[1], self.mem.shape[1]
        h = h.detach().to(self.mem.dtype)
        if m >= n:
            return self.mem[:, :n]
        return torch.cat([self.mem, h[:, : n - m]], dim=1)

    def push(self, h, compressed):
        """Append segment h [B, n, d] and its evicted rows' compression [B, n // rate, d]."""
        self._check_segment(h)
        B, m, d = self.mem.shape
        n, cm = h.shape[1], self.cmem.shape[1]
        if compressed.shape != (B, n // self.rate, self.cmem.shape[2]):
            raise ValueError(f"compressed must have shape [B, n // rate, d] = "
                             f"{(B, n // self.rate, self.cmem.shape[2])}, got {tuple(compressed.shape)}")
        h = h.detach().to(self.mem.dtype)
        compressed = compressed.detach().to(self.cmem.dtype)
        evicted = (self.mem_lens + n - m).clamp(min=0)
        # memory: shift left by n in place, then write the segment's newest rows
        if m > n:
            self.mem[:, : m - n] = self.mem[:, n:].clone()
        if m:
            self.mem[:, max(0, m - n):] = h[:, max(0, n - m):]
        # compressed memory: shift left by n / rate, then write the new compressed slots
        nc = compressed.shape[1]
        if cm > nc:
            self.cmem[:, : cm - nc] = self.cmem[:, nc:].clone()
        if cm:
            self.cmem[:, max(0, cm - nc):] = compressed[:, max(0, nc - cm):]
        self.mem_lens.copy_((self.mem_lens + n).clamp(max=m))
        self.cmem_lens.copy_((self.cmem_lens + evicted // self.rate).clamp(max=cm))

    def reset(self, which=None):
        """Empty the memories of the samples where ``which`` [B] (bool) is True (all if None)."""
        if which is None:
            self.mem_lens.zero_()
            self.cmem_lens.zero_()
        else:
            keep = ~which.to(self.mem_lens.device)
            self.mem_lens.mul_(keep)
            self.cmem_lens.mul_(keep)
