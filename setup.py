"""Build ct_kernels (+ the optional C++/CUDA extension ct_kernels._C) and compressive_transformer.

The extension is built only where nvcc and a CUDA-enabled torch are both present; elsewhere
the pure-Python package installs and ``ct_kernels.available_backends()`` omits "cuda".
Set CT_KERNELS_NO_EXTENSION=1 to skip it, CT_KERNELS_CUDA_ARCHS to choose archs
(default "90a": sm_90a machine code, which the Hopper warpgroup-MMA kernels need, plus
compute_90 PTX for other GPUs; those kernels compile to a trap there and are never launched).
"""
import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    """The CUDAExtension for csrc/, or None (with the reason printed) where it cannot build."""
    if os.environ.get("CT_KERNELS_NO_EXTENSION") == "1":
        return None, "CT_KERNELS_NO_EXTENSION=1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return None, "no sources in csrc/"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not installed in the build environment"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "nvcc not found (set CUDA_HOME)"
    # CUDA wheels of torch ship cuBLAS/cuSPARSE headers under site-packages/nvidia/*/include
    include_dirs = [os.path.join(HERE, "csrc")]
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        include_dirs += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")))
    archs = os.environ.get("CT_KERNELS_CUDA_ARCHS", "90a").split(",")
    gencode = []
    for arch in archs:
        gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    ptx = archs[-1].rstrip("a")  # arch-specific features ("90a") have no portable PTX
    gencode += [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]
    ext = CUDAExtension(
        name="ct_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr", *gencode],
        },
    )
    return (ext, BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)), None


built, why_not = _cuda_extension()
if built is None:
    print(f"ct_kernels: building without the CUDA extension ({why_not})", file=sys.stderr)

setup(
    name="ct_kernels",
    version="0.1.0",
    description="Fused kernels for the Compressive Transformer (attention over compressed "
                "memories, compression, reconstruction losses) with a PyTorch model layer.",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ct_kernels", "ct_kernels.*"])
    + find_packages("python", include=["compressive_transformer", "compressive_transformer.*"]),
    package_dir={"compressive_transformer": "python/compressive_transformer"},
    install_requires=["torch>=2.4", "triton>=3.2", "ninja", "pybind11", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
    },
    ext_modules=[built[0]] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
    zip_safe=False,
)
