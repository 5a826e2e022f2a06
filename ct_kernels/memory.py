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
sizes, never on lens: a slot's distance to a query is fixed by where it sits in the buffer,
and every slot moves n (mem) or n / rate (cmem) places left per segment, exactly as the
distances of the keys it holds grow. Everything here is detached (the paper's stop-gradient).

Why chronological buffers and not ring buffers: attention takes keys oldest-first, and the
model recomputes the memories' keys/values from ``mem``/``cmem`` every segment. A ring
buffer would need either a rotation (a copy of the whole buffer) or a second, mirrored copy
of every write and twice the memory to hand out a chronological view; and for the paper's
n = m the whole memory is rewritten every segment anyway. Instead the update moves rows in
place in one pass with no temporary: shifting left by s is done along the chains of rows
congruent modulo s (row t <- row t + s, walking upwards), which are independent, so one
thread per (sample, new compressed slot, 16 bytes of columns) does the whole update: it
reads the rows its slot summarises, pools them, walks its cmem chain, writes the slot at the
chain's end, then walks the ``rate`` mem chains whose heads it just read. Traffic is the
minimum of the chronological layout: read the n evicted rows, the n segment rows and the
cm - n/rate surviving cmem rows; write m + cm rows.

Backends (``update``/``push``): "cuda" (csrc/compress.cu), "triton" (the same algorithm),
"reference" (plain torch, used on CPU). Pooling is one kernel; conv is the cmem shift, one
GEMM writing straight into cmem's freed tail, then the mem shift; other methods compress the
evicted rows with ``ct_kernels.compress`` and copy them in during the shift.
"""
from __future__ import annotations

import torch

from ct_kernels import dispatch, reference

_METHODS = ("mean", "max", "conv", "dilated_conv", "most_used")


def evicted_rows(mem, h):
    """The n oldest rows of [mem | h] (n = h.shape[1]): a view of ``mem`` when m >= n."""
    n, m = h.shape[1], mem.shape[1]
    if m >= n:
        return mem[:, :n]
    return torch.cat([mem, h[:, : n - m]], dim=1)


@dispatch.register("memory_update", "reference")
def _update_reference(mem, cmem, mem_lens, cmem_lens, h, rate, method, *, compressed=None,
                      weight=None, bias=None, usage=None, **options):
    """The update rule in plain torch: compress, then shift each buffer and append."""
    n, m, cm = h.shape[1], mem.shape[1], cmem.shape[1]
    if compressed is None:
        compressed = reference.compress(evicted_rows(mem, h), rate, method, weight=weight,
                                        bias=bias, usage=usage, **options)
    evicted = (mem_lens + n - m).clamp(min=0)
    nc = compressed.shape[1]
    if cm > nc:
        cmem[:, : cm - nc] = cmem[:, nc:].clone()
    if cm:
        cmem[:, max(0, cm - nc):] = compressed[:, max(0, nc - cm):]
    if m > n:
        mem[:, : m - n] = mem[:, n:].clone()
    if m:
        mem[:, max(0, m - n):] = h[:, max(0, n - m):]
    mem_lens.copy_((mem_lens + n).clamp(max=m))
    cmem_lens.copy_((cmem_lens + evicted // rate).clamp(max=cm))


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
        self._impls = {}  # (method, backend) -> resolved update; device and dtype are fixed

    @property
    def batch(self):
        return self.mem.shape[0]

    def _segment(self, h):
        """h detached, in the buffers' dtype, with a contiguous last dimension."""
        B, m, d = self.mem.shape
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
        if h.dim() != 3 or h.shape[0] != B or h.shape[2] != d:
            raise ValueError(f"h must have shape [B, n, d] = [{B}, n, {d}], got {tuple(h.shape)}")
        if h.shape[1] == 0 or h.shape[1] % self.rate != 0:
            raise ValueError(f"the segment length ({h.shape[1]}) must be a positive multiple "
                             f"of the compression rate ({self.rate})")
        if h.device != self.mem.device:
            raise ValueError(f"h must be on device {self.mem.device}, got {h.device}")
        if h.requires_grad:
            h = h.detach()
        if h.dtype != self.mem.dtype:
            h = h.to(self.mem.dtype)
        return h if h.stride(2) == 1 else h.contiguous()

    def evicted(self, h):
        """The n rows that leave the memory when segment h [B, n, d] is appended: a view of
        ``mem`` when m >= n (no copy). ``push``/``update`` overwrite it in place (and bump
        ``mem``'s version, so autograd refuses a graph that saved it): clone it if it must
        outlive the update."""
        return evicted_rows(self.mem, self._segment(h))

    def push(self, h, compressed, *, backend="auto"):
        """Append segment h [B, n, d] and its evicted rows' compression [B, n // rate, d]."""
        h = self._segment(h)
        B, _, d = self.mem.shape
        expected = (B, h.shape[1] // self.rate, d)
        if not isinstance(compressed, torch.Tensor) or tuple(compressed.shape) != expected:
            got = tuple(compressed.shape) if isinstance(compressed, torch.Tensor) else type(compressed).__name__
            raise ValueError(f"compressed must have shape [B, n // rate, d] = {expected}, got {got}")
        compressed = compressed.detach().to(device=self.mem.device, dtype=self.mem.dtype)
        if torch.compiler.is_compiling():  # storages are not inspectable while tracing
            compressed = compressed.clone()
        elif compressed.untyped_storage().data_ptr() in {
                t.untyped_storage().data_ptr() for t in (self.mem, self.cmem)}:
            compressed = compressed.clone()  # the update overwrites the rows it is read from
        self._apply(h, None, backend, compressed=compressed)

    def update(self, h, method, *, weight=None, bias=None, usage=None, backend="auto", **options):
        """Append segment h [B, n, d], compressing the evicted rows with ``method`` in place.

        ``method``, ``weight``, ``bias``, ``usage`` (over the n evicted rows) and ``options``
        mean what they mean in ``ct_kernels.compress``; the compressor's output width must be
        d. No gradient flows (use evicted/compress/push when the compressor trains on it).
        Pooling runs as one fused kernel on CUDA; conv's GEMM writes straight into cmem.
        """
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        h = self._segment(h)
        d = self.mem.shape[2]
        if method in ("conv", "dilated_conv"):
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d, d, self.rate):
                got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(f"weight must have shape [d, d, rate] = {(d, d, self.rate)}, got {got}")
            # no detach (the update runs under no_grad): the same weight object keeps its
            # permuted GEMM operand cached across segments
            weight = weight.to(device=self.mem.device, dtype=self.mem.dtype)
            if bias is not None:
                bias = bias.to(device=self.mem.device, dtype=self.mem.dtype)
        elif weight is not None or bias is not None:
            raise ValueError(f"weight/bias are only used by the conv methods, not {method!r}")
        self._apply(h, method, backend, weight=weight, bias=bias, usage=usage, **options)

    def _apply(self, h, method, backend, **kwargs):
        if torch.compiler.is_compiling():  # resolved while tracing: no guard on the cache
            impl = self._resolve(method, backend)
        else:
            impl = self._impls.get((method, backend))
            if impl is None:
                impl = self._impls[(method, backend)] = self._resolve(method, backend)
        with torch.no_grad():
            impl(self.mem, self.cmem, self.mem_lens, self.cmem_lens, h, self.rate, method,
                 **kwargs)
        for buffer in (self.mem, self.cmem):  # kernels write through raw pointers
            torch.autograd.graph.increment_version(buffer)

    def _resolve(self, method, backend):
        return dispatch.resolve("memory_update", backend, self.mem.device, method=method,
                                dtype=self.mem.dtype)

    def reset(self, which=None):
        """Empty the memories of the samples where ``which`` [B] (bool) is True (all if None)."""
        if which is None:
            self.mem_lens.zero_()
            self.cmem_lens.zero_()
        else:
            keep = ~which.to(self.mem_lens.device)
            self.mem_lens.mul_(keep)
            self.cmem_lens.mul_(keep)
