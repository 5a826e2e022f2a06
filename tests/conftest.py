"""Without a GPU, Triton kernels run in the CPU interpreter: set it before anything imports
triton, so the same tests exercise the kernels in CI."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
