"""Load ct_kernels._C (no GPU needed) and check that every C++/CUDA op registered."""
import sys

import torch

import ct_kernels._C  # noqa: F401

ops = sorted(name for name in dir(torch.ops.ct_kernels) if not name.startswith("_"))
registered = [name for name in ops if hasattr(getattr(torch.ops.ct_kernels, name), "default")]
print("ct_kernels._C ops:", registered)
sys.exit(0 if registered else 1)
