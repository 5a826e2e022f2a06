"""ct_kernels: fused kernels for the Compressive Transformer.

Public ops (layout [B, N, H, D]):
    compressive_attention, compress, attention_reconstruction_loss, autoencoding_loss
Backends: "reference" (pure PyTorch, any device/dtype), "triton", "cuda";
``available_backends()`` lists the ones this machine runs.
"""
from ct_kernels.dispatch import available_backends
from ct_kernels.functional import (
    COMPRESS_METHODS,
    attention_reconstruction_loss,
    autoencoding_loss,
    compress,
    compressive_attention,
)
from ct_kernels.reference import RelativePosition
from ct_kernels import ops  # noqa: F401  (registers the fast backends)

__version__ = "0.1.0"

__all__ = [
    "COMPRESS_METHODS",
    "RelativePosition",
    "attention_reconstruction_loss",
    "autoencoding_loss",
    "available_backends",
    "compress",
    "compressive_attention",
]
