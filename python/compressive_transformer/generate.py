"""Sampling with cached keys/values of the compressed memory, memory and segment so far.

The model reads text in segments of n tokens; a sampled token extends the current segment.
Per layer the cache holds the projected K/V of [compressed memory | memory | segment so far]
in one buffer of static size S = cm + m + n - 1 (every key a query sees besides its own),
right-aligned: the newest key sits in the last slot, and a length on the device counts the
valid slots. The valid keys are contiguous and end next to the query, as in the segment
forward (the compressed memory only fills once the memory is full), so distances by buffer
slot are the true ones. Feeding k tokens attends the buffer's last S - k + 1 slots (the
``mem`` source of ``compressive_attention``, with the length) and the k new keys, then
writes the buffer shifted left by k, the new K/V at its right end, into a second buffer;
the two alternate, so no copy overlaps itself. Each token costs one projection of itself
and one attention call (the decode kernel on GPU). When the segment is complete, its
attention inputs enter the layer memories exactly as in training
(``CompressiveLayer.push_memory``); the new memory's K/V already sit at the buffer's right
end, the surviving compressed slots move up next to them and only the new compressed slots
are projected. Memory K/V are never recomputed while the weights stay fixed. The
relative-position rows r = W_R · sinusoid(0..cm+m+n-1) are projected once per layer.

On CUDA, the one-token step (all layers, final norm and head) is captured as a CUDA graph
per buffer parity and replayed: its shapes are static, and the token's position and the
lengths live on the device, advanced by the step itself. Prompt chunks (k > 1) and the end
of a segment run eagerly. A model with most-used compression always steps eagerly: it sums
the attention mass of every key, which the decode kernel does not return.
"""
from __future__ import annotations

import time

import torch

from compressive_transformer.evaluate import autocast
from compressive_transformer.model import CompressiveTransformer, sinusoids


class LayerCache:
    """One layer's cached state, in buffers whose shapes never change.

    kv: two buffers [B, S, 2, H, D], S = cm + m + n - 1; the current one holds the K/V of
    [compressed memory | memory | segment so far], right-aligned. lens [B] int32: its valid
    slots. x [B, n, d]: the segment's attention inputs (None without memory). key_usage
    [B, m + n]: the attention mass the memory slots and the segment's tokens received this
    segment (most-used only). rel_pos: the relative positions."""

    def __init__(self, layer, memory, batch, device, dtype, rel_pos):
        c = layer.config
        self.m = memory.mem.shape[1] if memory is not None else 0
        self.cm = memory.cmem.shape[1] if memory is not None else 0
        size = self.cm + self.m + c.seg_len - 1
        self.kv = [torch.zeros(batch, size, 2, c.heads, c.head_dim, device=device, dtype=dtype)
                   for _ in range(2)]
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.x = None if memory is None else torch.zeros(batch, c.seg_len, c.dim, device=device,
                                                         dtype=dtype)
        self.key_usage = torch.zeros(batch, self.m + c.seg_len, device=device)
        self.rel_pos = rel_pos


def shift_in(current, other, new):
    """other <- the last S slots of [current | new] along dim 1 (S = other.shape[1])."""
    S, k = current.shape[1], new.shape[1]
    keep = max(S - k, 0)  # slots of current that stay
    other[:, :keep].copy_(current[:, S - keep:])
    other[:, keep:].copy_(new[:, k - (S - keep):])


class DecodeState:
    """Feeds tokens to a model one chunk at a time, keeping the per-layer caches.

    ``cuda_graph``: on CUDA, replay the one-token step as a CUDA graph, captured on first use
    per buffer parity (models with most-used compression step eagerly)."""

    def __init__(self, model: CompressiveTransformer, batch, device, amp=True, cuda_graph=True):
        self.model, self.device, self.amp = model, torch.device(device), amp
        c = model.config
        with torch.no_grad(), autocast(self.device, amp):
            use_bf16 = amp and self.device.type == "cuda"
            dtype = torch.bfloat16 if use_bf16 else model.embed.weight.dtype
            sinusoid = sinusoids(model.max_distance(c.seg_len), c.dim, self.device)
            self.memories = model.init_memories(batch, self.device, dtype)
            self.caches = [LayerCache(layer, memory, batch, self.device, dtype,
                                      layer.relative_position(sinusoid, dtype))
                           for layer, memory in zip(model.layers, self.memories.layers)]
        self.t = 0  # tokens of the current segment so far
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # t, on the device
        self.offsets = torch.arange(c.seg_len, device=self.device)
        self.parity = 0  # which kv buffer of each cache is the current one
        graphs = (cuda_graph and self.device.type == "cuda"
                  and all(usage is None for usage in self.memories.usage))
        self.graphs = [None, None] if graphs else None  # per parity
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # their input
        self.logits = [None, None]  # and their outputs

    @torch.no_grad()
    def feed(self, tokens):
        """tokens [B, k] -> logits [B, k, vocab]; any k (split at segment boundaries)."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [B, k] with k >= 1, got {tuple(tokens.shape)}")
        n = self.model.config.seg_len
        out = []
        while tokens.shape[1]:
            k = min(tokens.shape[1], n - self.t)
            out.append(self._feed_chunk(tokens[:, :k]))
            tokens = tokens[:, k:]
        return torch.cat(out, dim=1)  # a copy: never a graph's static output

    def _feed_chunk(self, tokens):
        k = tokens.shape[1]
        if k == 1 and self.graphs is not None:
            with torch.cuda.device(self.device):
                logits = self._replay(tokens)
        else:
            with autocast(self.device, self.amp):
                logits = self._step(tokens)
        self.parity ^= 1
        self.t += k
        if self.t == self.model.config.seg_len:
            self._end_segment()
        return logits

    def _step(self, tokens):
        """Logits [B, k, vocab] of tokens [B, k] at the device's ``position``: attends the
        current kv buffers, writes the other ones, advances ``position`` and the lengths by k.
        Its shapes depend on k only, and without key usage it reads nothing from the host."""
        model, k = self.model, tokens.shape[1]
        rows = self.position + self.offsets[:k]  # the tokens' rows in x
        h = model.embed(tokens)
        for layer, usage, cache in zip(model.layers, self.memories.usage, self.caches):
            x = layer.attention_input(h)
            if cache.x is not None:
                cache.x.index_copy_(1, rows, x.to(cache.x.dtype))
            q = layer.project_q(x)
            new = layer.kv_proj(x).unflatten(-1, (2, layer.heads, layer.head_dim))
            current, other = cache.kv[self.parity], cache.kv[1 - self.parity]
            past = current[:, k - 1:]  # the keys the k queries see besides their own
            attn_out, key_usage = layer.attend(q, new[:, :, 0], new[:, :, 1],
                                               (past[:, :, 0], past[:, :, 1]), (None, None),
                                               cache.lens, None, cache.rel_pos,
                                               want_usage=usage is not None)
            if key_usage is not None:  # [B, past | new]; key_usage starts at the memory
                start = past.shape[1] - cache.m - self.t
                cache.key_usage[:, :cache.m + self.t + k] += key_usage[:, start:].float()
            shift_in(current, other, new)
            cache.lens += k
            h = layer.residual(h, attn_out)
        self.position += k
        return model.head(model.norm(h)).float()

    def _replay(self, tokens):
        """The one-token step as a graph replay. A parity's first step runs eagerly on a side
        stream (the warm-up; its logits are returned), then is captured (recorded, not run)."""
        self.token.copy_(tokens)
        graph = self.graphs[self.parity]
        if graph is not None:
            graph.replay()
            return self.logits[self.parity]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast(self.device, self.amp):
            logits = self._step(self.token)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # no cast cache: a weight cast before the capture would be read but not recorded
        with torch.cuda.graph(graph), autocast(self.device, self.amp, cache_enabled=False):
            self.logits[self.parity] = self._step(self.token)
        self.graphs[self.parity] = graph
        return logits

    def _end_segment(self):
        """Push the finished segment into the memories; lay out each current kv buffer as
        [compressed memory | memory], right-aligned, in place."""
        n, rate = self.model.config.seg_len, self.model.config.rate
        with autocast(self.device, self.amp):
            for layer, memory, usage, cache in zip(self.model.layers, self.memories.layers,
                                                   self.memories.usage, self.caches):
                if memory is None:  # attends over the segment only
                    cache.lens.zero_()
                    continue
                layer.push_memory(memory, usage, cache.x, cache.key_usage)
                cache.key_usage.zero_()
                kv, cm = cache.kv[self.parity], cache.cm
                if cm:
                    # kv holds the last S slots of [compressed memory | memory | segment]: the
                    # new memory (the last m slots) is in place; the old compressed memory ends
                    # n slots earlier, and its surviving slots move up to just before the new
                    # ones (the only K/V projected here)
                    end = kv.shape[1] - cache.m  # where the compressed memory ends
                    fresh = min(cm, n // rate)
                    kv[:, end - cm:end - fresh] = kv[:, end - n - cm + fresh:end - n].clone()
                    kv[:, end - fresh:end] = layer.kv_proj(memory.cmem[:, cm - fresh:]).unflatten(
                        -1, (2, layer.heads, layer.head_dim))
                cache.lens.copy_(memory.cmem_lens + memory.mem_lens)
        self.t = 0
        self.position.zero_()


def sample(logits, temperature=1.0, top_k=None, generator=None):
    """One token per row of logits [B, vocab]: argmax at temperature 0, else softmax sampling
    over the top_k most likely tokens (all when None)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: CompressiveTransformer, prompt, length, *, temperature=1.0, top_k=None,
             amp=True, generator=None, cuda_graph=True):
    """Continue ``prompt`` [B, P] (P >= 1) by ``length`` tokens. Returns (tokens [B, length],
    tokens per second of the sampling loop, counting all B streams). ``cuda_graph``: on CUDA,
    each sampled token's step is a CUDA graph replay (see ``DecodeState``)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape [B, P] with P >= 1, got {tuple(prompt.shape)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    state = DecodeState(model, prompt.shape[0], prompt.device, amp, cuda_graph)
    logits = state.feed(prompt)[:, -1]
    synchronize = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    out = []
    for _ in range(length):
        token = sample(logits, temperature, top_k, generator)
        out.append(token)
        logits = state.feed(token[:, None])[:, -1]
    synchronize()
    return torch.stack(out, dim=1), prompt.shape[0] * length / (time.perf_counter() - start)
