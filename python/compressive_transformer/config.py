"""Model and training configurations, and the named presets of the command line."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ct_kernels import COMPRESS_METHODS

COMPRESS_LOSSES = ("attention", "autoencoding", "none")
LEARNED_METHODS = ("conv", "dilated_conv")


@dataclass
class ModelConfig:
    """A byte-level (or any vocabulary) Compressive Transformer.

    seg_len (n), mem_len (m), cmem_len (cm), rate (c) as in the paper; cmem_len = 0 gives
    Transformer-XL, mem_len = cmem_len = 0 a plain segment-level transformer.
    compress_loss trains the compressor: "attention" (attention reconstruction, paper
    Algorithm 2), "autoencoding" (a transposed-convolution decoder), or "none" for the
    parameter-free methods (mean, max, most_used).
    memory_layers: 0-based indices of the layers with memories (None: all).
    pre_ln: layer norm before attention/feed-forward (default: after, as the paper).
    store_score_grads: the attention backward keeps each layer's score gradients
        (twice [B, H, n, cm + m + n], one layer at a time) instead of recomputing the scores
        (``ct_kernels.compressive_attention``): faster on the GPU, that much more memory.
    store_position_scores: with store_score_grads, each layer's attention forward also keeps
        its position scores ([B, H, n, cm + m + n]) until its backward, which then reads them
        instead of scoring the positions again: faster still, one such buffer per layer alive
        from the forward to the backward.
    """

    vocab_size: int = 256
    dim: int = 512
    layers: int = 8
    heads: int = 8
    ff_mult: int = 4
    seg_len: int = 512
    mem_len: int = 512
    cmem_len: int = 512
    rate: int = 4
    compress_method: str = "conv"
    compress_loss: str = "attention"
    dilation: int = 2
    memory_layers: Optional[Tuple[int, ...]] = None
    pre_ln: bool = False
    dropout: float = 0.1
    backend: str = "auto"
    store_score_grads: bool = True
    store_position_scores: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "layers", "heads", "ff_mult", "seg_len", "rate", "dilation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("mem_len", "cmem_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.compress_method not in COMPRESS_METHODS:
            raise ValueError(f"compress_method must be one of {COMPRESS_METHODS}, "
                             f"got {self.compress_method!r}")
        if self.compress_loss not in COMPRESS_LOSSES:
            raise ValueError(f"compress_loss must be one of {COMPRESS_LOSSES}, got {self.compress_loss!r}")
        learned = self.compress_method in LEARNED_METHODS
        if learned and self.compress_loss == "none":
            raise ValueError(f"compress_method {self.compress_method!r} is learned and needs "
                             "compress_loss 'attention' or 'autoencoding' (memories are "
                             "stop-gradient, so no task gradient reaches the compressor)")
        if not learned and self.compress_loss != "none":
            raise ValueError(f"compress_method {self.compress_method!r} has no parameters: "
                             "use compress_loss 'none'")
        if self.cmem_len and self.seg_len % self.rate:
            raise ValueError(f"rate ({self.rate}) must divide seg_len ({self.seg_len})")
        for name in ("store_score_grads", "store_position_scores"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.store_position_scores and not self.store_score_grads:
            raise ValueError("store_position_scores needs store_score_grads (the backward from "
                             "stored score gradients is what reads the kept position scores)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.memory_layers is not None:
            self.memory_layers = tuple(int(i) for i in self.memory_layers)
            bad = [i for i in self.memory_layers if not 0 <= i < self.layers]
            if bad:
                raise ValueError(f"memory_layers must be layer indices in [0, {self.layers}), got {bad}")

    @property
    def head_dim(self):
        return self.dim // self.heads

    def has_memory(self, layer):
        return bool(self.mem_len or self.cmem_len) and (
            self.memory_layers is None or layer in self.memory_layers)


@dataclass
class TrainConfig:
    """Optimisation and logging. Defaults are the paper's (Adam, warm-up 1e-6 -> lr, cosine
    decay to 1e-6, gradient-norm clipping 0.1); ``batch`` is per process."""

    steps: int = 100_000
    batch: int = 16
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup: int = 4000
    clip: float = 0.1
    weight_decay: float = 0.0
    eval_every: int = 1000
    eval_batch: int = 16
    eval_segments: Optional[int] = None  # per stream, for the periodic validation (None: all)
    log_every: int = 10
    val_fraction: float = 0.05
    seed: int = 0
    amp: bool = True
    compile: bool = False
    cuda_graph: bool = False  # replay each step as a CUDA graph (one GPU process; see train.py)
    max_minutes: Optional[float] = None  # stop training after this long (then validate)
    cpu_threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch's default)

    def __post_init__(self):
        for name in ("steps", "batch", "eval_every", "eval_batch", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup < 0 or self.lr <= 0 or self.min_lr < 0 or self.clip <= 0:
            raise ValueError("warmup must be >= 0, lr and clip > 0, min_lr >= 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS = {
    # the main command's model, for a 2-core CPU: training stops after 3.75 minutes at the
    # latest, then validates. One thread: its matrices are small, and two OpenMP threads
    # slow down many times over as soon as another process shares the two cores.
    "tiny": Preset(
        ModelConfig(dim=128, layers=4, heads=4, seg_len=64, mem_len=64, cmem_len=32, rate=2,
                    dropout=0.0),
        TrainConfig(steps=800, batch=16, lr=2e-3, warmup=60, eval_every=400, eval_batch=64,
                    eval_segments=20, log_every=10, max_minutes=3.75, cpu_threads=1)),
    # paper §5 enwik8: 24 layers, d 1024, 8 x 128 heads, n = m = 768, cm = 1152, c = 3
    "enwik8": Preset(
        ModelConfig(dim=1024, layers=24, heads=8, seg_len=768, mem_len=768, cmem_len=1152, rate=3),
        TrainConfig(steps=100_000, warmup=4000)),
    # paper §5 PG-19: 36 layers, n = m = cm = 512, c = 2 (width as enwik8)
    "pg19": Preset(
        ModelConfig(dim=1024, layers=36, heads=8, seg_len=512, mem_len=512, cmem_len=512, rate=2)),
    # the benchmark configurations (DESIGN.md §3)
    "d512-L8": Preset(
        ModelConfig(dim=512, layers=8, heads=8, seg_len=512, mem_len=512, cmem_len=128, rate=4)),
    "d1024-L4": Preset(
        ModelConfig(dim=1024, layers=4, heads=8, seg_len=768, mem_len=768, cmem_len=1152, rate=3),
        TrainConfig(batch=8)),
}


def preset(name, **overrides):
    """(ModelConfig, TrainConfig) of a preset with fields overridden (None = keep). A new
    compress_method without a compress_loss gets its natural one (attention reconstruction
    for the convolutions, none for the others)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    base = PRESETS[name]
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - model_fields - train_fields
    if unknown:
        raise TypeError(f"unknown configuration fields {sorted(unknown)}")
    model = {k: v for k, v in overrides.items() if k in model_fields and v is not None}
    if "compress_method" in model and "compress_loss" not in model:  # the method's natural loss
        model["compress_loss"] = "attention" if model["compress_method"] in LEARNED_METHODS else "none"
    train = {k: v for k, v in overrides.items() if k in train_fields and v is not None}
    return dataclasses.replace(base.model, **model), dataclasses.replace(base.train, **train)
