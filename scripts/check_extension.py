"""Load ct_kernels._C (no GPU needed) and check that every C++/CUDA op registered."""
import sys

import torch

import ct_kernels._C  # noqa: F401

# ask the dispatcher: dir(torch.ops.ct_kernels) lists only ops already looked up from Python
ops = sorted({name.split("::", 1)[1].split(".")[0]  # drop overload names (op.out)
              for name in torch._C._dispatch_get_all_op_names() if name.startswith("ct_kernels::")})
registered = [name for name in ops if hasattr(getattr(torch.ops.ct_kernels, name), "default")]
print("ct_kernels._C ops:", registered)
sys.exit(0 if registered else 1)
