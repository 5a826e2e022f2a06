"""The Compressive Transformer (Rae et al. 2019) on top of ct_kernels' ops.

Per layer and segment (DESIGN.md §1): queries from the segment, keys/values from
``[cmem | mem | segment]`` projected with the current weights, Transformer-XL relative
positions ``r = W_R · sinusoid(distance)`` with content/position biases u, v. After the
layer, the segment's attention inputs enter the memory and the rows it evicts are
compressed into the compressed memory; both memories are stop-gradient.

Layer norm: post-LN by default (as the paper and Transformer-XL: ``h = LN(h + sublayer(h))``),
pre-LN with ``pre_ln=True`` (``h = h + sublayer(LN(h))`` and a final LN). Memories store the
attention inputs (the normalised ones under pre-LN), so memory keys are projected exactly
like segment keys. Dropout applies to embeddings, sublayer outputs and the feed-forward
hidden layer (the fused attention has no attention-probability dropout).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ct_kernels
from ct_kernels import RelativePosition
from ct_kernels.memory import LayerMemory

from compressive_transformer.config import LEARNED_METHODS, ModelConfig


def sinusoids(length, dim, device=None):
    """[length, dim] encodings of the distances 0..length-1: [sin | cos] with inverse
    frequencies 10000^(-2k/dim), as Transformer-XL."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim]


class Memories:
    """The memory state of every layer.

    ``layers[i]``: layer i's ``LayerMemory`` (None for a layer without memory).
    ``usage[i]``: [B, m] float32, the attention mass each of layer i's memory slots has
    received while in memory (summed over queries, heads and segments); kept only for
    most-used compression, else None.
    """

    def __init__(self, layers: List[Optional[LayerMemory]], usage: List[Optional[torch.Tensor]]):
        self.layers = layers
        self.usage = usage
        # known on the host: every buffer of every sample is full, so the ops get no lengths
        # (and need no device-to-host read to check them)
        self.full = False
        # False: never read the fill state on the host (a CUDA graph replays the same work
        # whatever it is); the ops then always get the lengths
        self.host_checks = True

    def check_full(self):
        """Set ``full`` once every buffer is full (one host sync per call until then). The
        model's forward asks only when it runs eagerly: under torch.compile the sync would be
        a graph break, and the traced forward passes the lengths whatever they are."""
        if not self.full:
            flags = [(mem.mem_lens == mem.mem.shape[1]).all() & (mem.cmem_lens == mem.cmem.shape[1]).all()
                     for mem in self.layers if mem is not None]
            self.full = bool(torch.stack(flags).all()) if flags else True
        return self.full

    @property
    def batch(self):
        return next((mem.batch for mem in self.layers if mem is not None), None)

    def reset(self, which=None):
        """Empty the memories of the samples where ``which`` [B] (bool) is True (all if None)."""
        for memory in self.layers:
            if memory is not None:
                memory.reset(which)
        self.full = False


class Compressor(nn.Module):
    """f_c of one layer: evicted memories [B, n, d] -> [B, n / rate, d] via ct_kernels.compress.

    The convolutions start as mean pooling (weight = identity / rate), so compressed
    memories carry information from the first step while the compressor learns. The
    dilated convolution (the paper gives no setting) uses ``dilation`` (default 2, the
    smallest that reaches across window boundaries): slot t ends at the last row of its own
    window and reaches (rate - 1) * dilation rows back, so neighbouring slots overlap.
    The auto-encoding decoder g (also unspecified by the paper; ``dec_weight``,
    nn.ConvTranspose1d layout, kernel = stride = rate) mirrors the convolution: each
    compressed slot reconstructs exactly the ``rate`` rows it summarises. It is linear, so
    the loss rewards what the compressor keeps rather than what a deep decoder could
    invent, and it starts as "repeat the slot".
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.method, self.rate, self.loss = config.compress_method, config.rate, config.compress_loss
        self.dilation, self.backend = config.dilation, config.backend
        d = config.dim
        identity = torch.eye(d)[:, :, None].repeat(1, 1, self.rate)
        if self.method in LEARNED_METHODS:
            self.weight = nn.Parameter(identity / self.rate)
            self.bias = nn.Parameter(torch.zeros(d))
        if self.loss == "autoencoding":
            self.dec_weight = nn.Parameter(identity.clone())
            self.dec_bias = nn.Parameter(torch.zeros(d))

    def options(self, usage=None):
        """Keyword arguments of ``ct_kernels.compress`` besides the rows to compress."""
        options = {}
        if self.method in LEARNED_METHODS:
            options.update(weight=self.weight, bias=self.bias)
        if self.method == "dilated_conv":
            options["dilation"] = self.dilation
        if self.method == "most_used":
            options["usage"] = usage
        return options

    def forward(self, old, usage=None):
        options = self.options(usage)
        if self.method in LEARNED_METHODS:
            options.update(weight=self.weight.to(old.dtype), bias=self.bias.to(old.dtype))
        return ct_kernels.compress(old, self.rate, self.method, backend=self.backend, **options)


class CompressiveLayer(nn.Module):
    """Relative multi-head attention over [cmem | mem | segment], then a feed-forward block."""

    def __init__(self, config: ModelConfig, has_memory: bool):
        super().__init__()
        d, H, D = config.dim, config.heads, config.head_dim
        self.config, self.heads, self.head_dim = config, H, D
        self.has_memory = has_memory
        self.q_proj = nn.Linear(d, d, bias=False)
        self.kv_proj = nn.Linear(d, 2 * d, bias=False)
        self.pos_proj = nn.Linear(d, d, bias=False)  # W_R
        self.u = nn.Parameter(torch.zeros(H, D))
        self.v = nn.Parameter(torch.zeros(H, D))
        self.out_proj = nn.Linear(d, d, bias=False)
        self.ff = nn.Sequential(nn.Linear(d, config.ff_mult * d), nn.GELU(),
                                nn.Dropout(config.dropout), nn.Linear(config.ff_mult * d, d))
        self.attn_norm = nn.LayerNorm(d)
        self.ff_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        self.compressor = Compressor(config) if has_memory and config.cmem_len else None

    # ---- pieces shared by the segment forward and cached generation
    def attention_input(self, h):
        return self.attn_norm(h) if self.config.pre_ln else h

    def project_q(self, x):
        return self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))

    def project_kv(self, x):
        """Keys and values [B, S, H, D] of rows x [B, S, d] (views of one projection)."""
        kv = self.kv_proj(x).unflatten(-1, (2, self.heads, self.head_dim))
        return kv[:, :, 0], kv[:, :, 1]

    def relative_position(self, sinusoid, dtype):
        """RelativePosition(r [H, R, D], u, v) in ``dtype`` for distances 0..R-1."""
        R = sinusoid.shape[0]
        r = self.pos_proj(sinusoid).view(R, self.heads, self.head_dim).transpose(0, 1)
        return RelativePosition(r.to(dtype), self.u.to(dtype), self.v.to(dtype))

    def attend(self, q, k, v, mem_kv, cmem_kv, mem_lens, cmem_lens, rel_pos, want_usage=False):
        """Attention output [B, n, d] (after the output projection) and, if asked, the
        attention mass [B, cm + m + n] each key received."""
        result = ct_kernels.compressive_attention(
            q, k, v, *mem_kv, *cmem_kv, mem_lens=mem_lens, cmem_lens=cmem_lens,
            rel_pos=rel_pos, return_key_usage=want_usage, backend=self.config.backend,
            store_score_grads=self.config.store_score_grads,
            store_position_scores=self.config.store_position_scores)
        out, usage = result if want_usage else (result, None)
        return self.dropout(self.out_proj(out.flatten(2))), usage

    def residual(self, h, attn_out):
        """Add the attention output to the residual stream and apply the feed-forward block."""
        if self.config.pre_ln:
            h = h + attn_out
            return h + self.dropout(self.ff(self.ff_norm(h)))
        h = self.attn_norm(h + attn_out)
        return self.ff_norm(h + self.dropout(self.ff(h)))

    def memory_kv(self, memory: Optional[LayerMemory], full=False):
        """((mem_k, mem_v), (cmem_k, cmem_v), mem_lens, cmem_lens) for compressive_attention;
        no lengths when the buffers are known to be ``full``.

        Keys/values come from one projection of a copy of [cmem | mem], and the lengths are
        copies too: push() rewrites the buffers in place while autograd still needs them."""
        none = (None, None)
        if memory is None:
            return none, none, None, None
        cm, m = memory.cmem.shape[1], memory.mem.shape[1]
        k, v = self.project_kv(torch.cat([memory.cmem, memory.mem], dim=1))
        lens = (None, None) if full else (memory.mem_lens.clone() if m else None,
                                          memory.cmem_lens.clone() if cm else None)
        return ((k[:, cm:], v[:, cm:]) if m else none, (k[:, :cm], v[:, :cm]) if cm else none, *lens)

    def push_memory(self, memory: LayerMemory, usage, x, key_usage, keep_evicted=False):
        """Append the segment's attention inputs x [B, n, d] to the memory, compressing the
        rows it evicts. key_usage [B, m + n]: attention mass received this segment by the
        memory slots and the segment's rows (most-used only). ``keep_evicted``: return
        (old, compressed), the evicted rows and their compression with its graph, for the
        compressor's loss; otherwise the update runs fused in place and returns (None, None)."""
        B, n, d = x.shape
        backend = self.config.backend
        if self.compressor is None:  # Transformer-XL: evicted rows are discarded
            memory.push(x, x.new_empty(B, n // memory.rate, d), backend=backend)
            return None, None
        evicted_usage = None
        if usage is not None:
            m = usage.shape[1]
            stream = torch.cat([usage + key_usage[:, :m].float(), key_usage[:, m:].float()], dim=1)
            evicted_usage = stream[:, :n]
            usage.copy_(stream[:, n:])
        if not keep_evicted:
            with torch.no_grad():
                memory.update(x, self.compressor.method, backend=backend,
                              **self.compressor.options(evicted_usage))
            return None, None
        old = memory.evicted(x).clone()  # a view of the buffer that push() rewrites
        compressed = self.compressor(old, evicted_usage)
        memory.push(x, compressed, backend=backend)
        return old, compressed

    def compressor_loss(self, old, compressed, q):
        """The compressor's training loss; gradients reach the compressor (and decoder) only."""
        loss = self.compressor.loss
        if loss == "attention":  # paper Algorithm 2, with this layer's K/V projection frozen
            w = self.kv_proj.weight.detach()
            old_k, old_v = F.linear(old, w).unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)
            comp_k, comp_v = F.linear(compressed, w).unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)
            return ct_kernels.attention_reconstruction_loss(q, old_k, old_v, comp_k, comp_v,
                                                            backend=self.config.backend)
        if loss == "autoencoding":
            c = self.compressor
            return ct_kernels.autoencoding_loss(old, compressed.to(old.dtype), c.dec_weight.to(old.dtype),
                                                c.dec_bias.to(old.dtype), backend=self.config.backend)
        return None

    # ---- one whole segment
    def forward(self, h, memory: Optional[LayerMemory], usage, sinusoid, full=False):
        """h [B, n, d] -> (layer output [B, n, d], compressor loss or None); updates memory.
        ``full``: the memory buffers are known to be full."""
        x = self.attention_input(h)
        q = self.project_q(x)
        k, v = self.project_kv(x)
        mem_kv, cmem_kv, mem_lens, cmem_lens = self.memory_kv(memory, full)
        L = x.shape[1] + sum(t.shape[1] for t in (mem_kv[0], cmem_kv[0]) if t is not None)
        rel_pos = self.relative_position(sinusoid[:L], q.dtype)
        attn_out, key_usage = self.attend(q, k, v, mem_kv, cmem_kv, mem_lens, cmem_lens, rel_pos,
                                          want_usage=usage is not None)
        aux = None
        if memory is not None:
            cm = memory.cmem.shape[1]
            # the loss counts once every sample's evicted rows hold data (no host sync)
            evicted_valid = full or (memory.mem_lens == memory.mem.shape[1]).all()
            train_compressor = (self.compressor is not None and self.compressor.loss != "none"
                                and torch.is_grad_enabled())
            old, compressed = self.push_memory(memory, usage, x,
                                               None if key_usage is None else key_usage[:, cm:],
                                               keep_evicted=train_compressor)
            if train_compressor:
                aux = self.compressor_loss(old, compressed, q) * evicted_valid
        return self.residual(h, attn_out), aux


class CompressiveTransformer(nn.Module):
    """Language model: ``forward(tokens, memories=None) -> (logits, memories, aux_loss)``.

    tokens [B, n] (n a multiple of the compression rate when there is compressed memory);
    memories: the state returned by the previous call (None: fresh, empty memories);
    aux_loss: the compressor losses summed over layers (a scalar; add it to the task loss —
    it only trains the compressors).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(CompressiveLayer(config, config.has_memory(i))
                                    for i in range(config.layers))
        self.norm = nn.LayerNorm(config.dim) if config.pre_ln else nn.Identity()
        self.head = nn.Linear(config.dim, config.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_memories(self, batch, device=None, dtype=None) -> Memories:
        """Empty memories for ``batch`` streams (dtype defaults to the parameters')."""
        c = self.config
        param = self.embed.weight
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        layers, usage = [], []
        for layer in self.layers:
            memory = None
            if layer.has_memory:
                memory = LayerMemory(batch, c.mem_len, c.cmem_len, c.dim, c.rate if c.cmem_len else 1,
                                     dtype=dtype, device=device)
            layers.append(memory)
            track = memory is not None and c.cmem_len and c.compress_method == "most_used"
            usage.append(torch.zeros(batch, c.mem_len, device=device) if track else None)
        return Memories(layers, usage)

    def max_distance(self, n):
        """Rows of relative positions a segment of n tokens needs: cm + m + n."""
        return self.config.cmem_len + self.config.mem_len + n

    def forward(self, tokens, memories: Optional[Memories] = None):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError("tokens must be an int64 or int32 tensor [B, n]")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [B, n] with n >= 1, got {tuple(tokens.shape)}")
        B, n = tokens.shape
        if memories is None:
            memories = self.init_memories(B, tokens.device)
        elif not isinstance(memories, Memories):
            raise TypeError("memories must be the Memories returned by a previous call (or None)")
        elif memories.batch not in (None, B):
            raise ValueError(f"memories hold {memories.batch} streams but tokens has batch {B}")
        sinusoid = sinusoids(self.max_distance(n), self.config.dim, tokens.device)
        h = self.dropout(self.embed(tokens))
        aux = torch.zeros((), device=tokens.device)
        # Eagerly, full buffers skip the lengths (and their checks, which read them on the
        # host). Traced code has no host-side fill state to branch on without a graph break,
        # nor has a CUDA graph: they always pass the lengths, which mask nothing once the
        # buffers are full (the same result), and the compressor loss waits for full memories
        # on the device.
        full = (False if torch.compiler.is_compiling() or not memories.host_checks
                else memories.check_full())
        for layer, memory, usage in zip(self.layers, memories.layers, memories.usage):
            h, layer_aux = layer(h, memory, usage, sinusoid, full)
            if layer_aux is not None:
                aux = aux + layer_aux.float()
        return self.head(self.norm(h)), memories, aux
