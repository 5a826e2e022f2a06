// Python module of the ct_kernels C++/CUDA extension.
// Each kernel file registers its own ops with TORCH_LIBRARY_FRAGMENT(ct_kernels, m), so they
// appear as torch.ops.ct_kernels.<name> once this module is imported.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ct_kernels C++/CUDA kernels (ops registered under torch.ops.ct_kernels)";
}
