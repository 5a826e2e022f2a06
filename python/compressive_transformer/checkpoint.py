"""Checkpoints: atomic writes (temp file + rename) and loading a model back."""
from __future__ import annotations

import dataclasses
import os

import torch

from compressive_transformer.config import ModelConfig
from compressive_transformer.model import CompressiveTransformer


def save(path, model, optimizer, step, model_config, train_config, **extra):
    """Write the training state to ``path`` so that a crash never leaves a torn file."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "model_config": dataclasses.asdict(model_config),
             "train_config": dataclasses.asdict(train_config), **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path, device="cpu"):
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location=device, weights_only=False)


def load_model(path, device="cpu", backend=None):
    """(model in eval mode, checkpoint dict); ``backend`` overrides the ops' backend."""
    state = load(path, device)
    config = ModelConfig(**state["model_config"])
    if backend is not None:
        config.backend = backend
    model = CompressiveTransformer(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state
