"""Sampling with cached keys/values of the memory, compressed memory and segment so far.

The model reads text in segments of n tokens; a sampled token extends the current segment.
Per layer the cache holds the projected K/V of [memory | segment so far] in one buffer
(memory slots first) and of the compressed memory in another, so each new token costs one
projection of itself and one attention call with a few queries (``compressive_attention``
with small n and no gradient: the decode kernels on GPU). When the segment is complete,
its attention inputs enter the layer memories exactly as in training
(``CompressiveLayer.push_memory``); the cached K/V then shift by n slots (memory) and
n / rate slots (compressed memory; only the new compressed slots are projected). Memory
K/V are never recomputed while the weights stay fixed. The relative-position rows
r = W_R · sinusoid(0..cm+m+n-1) are projected once per layer.
"""
from __future__ import annotations

import time

import torch

from compressive_transformer.evaluate import autocast
from compressive_transformer.model import CompressiveTransformer, sinusoids


class LayerCache:
    """One layer's cached state: kv [B, m + n, 2, H, D] (memory slots, then the segment's
    tokens so far), ckv [B, cm, 2, H, D], the segment's attention inputs x [B, n, d], the
    attention mass its keys received this segment [B, m + n] (most-used only), rel_pos."""

    def __init__(self, layer, memory, batch, device, dtype, rel_pos):
        c = layer.config
        m = memory.mem.shape[1] if memory is not None else 0
        cm = memory.cmem.shape[1] if memory is not None else 0
        self.m, self.cm = m, cm
        self.kv = torch.zeros(batch, m + c.seg_len, 2, c.heads, c.head_dim, device=device, dtype=dtype)
        self.ckv = torch.zeros(batch, cm, 2, c.heads, c.head_dim, device=device, dtype=dtype)
        self.x = None
        self.key_usage = torch.zeros(batch, m + c.seg_len, device=device)
        self.rel_pos = rel_pos


class DecodeState:
    """Feeds tokens to a model one chunk at a time, keeping the per-layer caches."""

    def __init__(self, model: CompressiveTransformer, batch, device, amp=True):
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
        self._read_lengths()

    def _read_lengths(self):
        """Per layer, (valid memory slots, valid compressed slots), read from the device once
        per segment. Every stream is fed the same tokens, so the lengths are the same for
        all samples, and the valid slots are the newest: the caches are attended as the
        slices of their valid slots, without per-sample lengths (whose check is a
        device-to-host read per call). Distances are unchanged, because the compressed
        memory only fills once the memory is full."""
        lengths = [torch.stack([memory.mem_lens[0], memory.cmem_lens[0]])
                   for memory in self.memories.layers if memory is not None]
        lengths = iter(torch.stack(lengths).tolist() if lengths else [])
        # a layer without memory attends over the segment only
        self.valid = [(0, 0) if memory is None else tuple(next(lengths))
                      for memory in self.memories.layers]

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
        return torch.cat(out, dim=1)

    def _feed_chunk(self, tokens):
        model, t = self.model, self.t
        k = tokens.shape[1]
        with autocast(self.device, self.amp):
            h = model.embed(tokens)
            for layer, usage, cache, valid in zip(model.layers, self.memories.usage, self.caches,
                                                  self.valid):
                x = layer.attention_input(h)
                if cache.x is None:
                    cache.x = x.new_zeros(x.shape[0], model.config.seg_len, x.shape[2])
                cache.x[:, t:t + k] = x
                q = layer.project_q(x)
                new = cache.kv[:, cache.m + t:cache.m + t + k]
                new.copy_(layer.kv_proj(x).unflatten(-1, (2, layer.heads, layer.head_dim)))
                # the valid slices of [memory | segment so far] and of the compressed memory
                mem_valid, cmem_valid = valid
                past = cache.kv[:, cache.m - mem_valid:cache.m + t]
                cmem = cache.ckv[:, cache.cm - cmem_valid:]
                mem_kv = (past[:, :, 0], past[:, :, 1]) if past.shape[1] else (None, None)
                cmem_kv = (cmem[:, :, 0], cmem[:, :, 1]) if cmem.shape[1] else (None, None)
                attn_out, key_usage = layer.attend(q, new[:, :, 0], new[:, :, 1], mem_kv, cmem_kv,
                                                   None, None, cache.rel_pos,
                                                   want_usage=usage is not None)
                if key_usage is not None:  # usage [B, cmem | memory | segment so far]
                    cache.key_usage[:, cache.m - mem_valid:cache.m + t + k] += \
                        key_usage[:, cmem.shape[1]:].float()
                h = layer.residual(h, attn_out)
            logits = model.head(model.norm(h)).float()
        self.t += k
        if self.t == model.config.seg_len:
            self._end_segment()
        return logits

    def _end_segment(self):
        """Push the finished segment into the memories and shift the cached K/V."""
        n = self.model.config.seg_len
        with autocast(self.device, self.amp):
            for layer, memory, usage, cache in zip(self.model.layers, self.memories.layers,
                                                   self.memories.usage, self.caches):
                if memory is None:
                    continue
                layer.push_memory(memory, usage, cache.x, cache.key_usage)
                m, cm = cache.m, cache.cm
                if m:  # [memory | segment][-m:]: the K/V are already cached
                    cache.kv[:, :m] = cache.kv[:, n:n + m].clone()
                if cm:  # project only the new compressed slots
                    fresh = min(cm, n // self.model.config.rate)
                    cache.ckv[:, :cm - fresh] = cache.ckv[:, fresh:].clone()
                    cache.ckv[:, cm - fresh:] = layer.kv_proj(memory.cmem[:, cm - fresh:]).unflatten(
                        -1, (2, layer.heads, layer.head_dim))
                cache.key_usage.zero_()
        self.t = 0
        self._read_lengths()


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
             amp=True, generator=None):
    """Continue ``prompt`` [B, P] (P >= 1) by ``length`` tokens. Returns (tokens [B, length],
    tokens per second of the sampling loop, counting all B streams)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape [B, P] with P >= 1, got {tuple(prompt.shape)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    state = DecodeState(model, prompt.shape[0], prompt.device, amp)
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
