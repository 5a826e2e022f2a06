"""Load ct_kernels._C (no GPU needed) and check that every op csrc/ defines registered a
CUDA kernel with the dispatcher."""
import glob
import os
import re
import sys

import torch

import ct_kernels._C  # noqa: F401

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sources = "".join(open(path).read() for path in glob.glob(os.path.join(root, "csrc", "*.c*")))
# schemas look like m.def("name(...)" or m.def("name.overload(...)"
defined = sorted(set(re.findall(r'm\.def\(\s*"([\w.]+)\(', sources)))
missing = [name for name in defined
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ct_kernels::{name}", "CUDA")]
print("ct_kernels._C ops with CUDA kernels:", [name for name in defined if name not in missing])
if not defined or missing:
    print("defined in csrc/ but without a CUDA kernel:", missing or "(no ops defined)")
    sys.exit(1)
