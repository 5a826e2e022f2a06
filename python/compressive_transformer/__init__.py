"""compressive_transformer: the model layer on top of ct_kernels.

    from compressive_transformer import CompressiveTransformer, ModelConfig
    model = CompressiveTransformer(ModelConfig(dim=256, layers=4, heads=4, seg_len=128,
                                               mem_len=128, cmem_len=64, rate=2))
    logits, memories, aux_loss = model(tokens)            # tokens [B, n]
    logits, memories, aux_loss = model(next_tokens, memories)
"""
from compressive_transformer.config import PRESETS, ModelConfig, TrainConfig, preset
from compressive_transformer.model import CompressiveTransformer, Memories

__all__ = ["CompressiveTransformer", "Memories", "ModelConfig", "PRESETS", "TrainConfig", "preset"]
