// Numbers and shapes in TORCH_CHECK messages, formatted as std::string.
//
// On the H200 machine (extension built with its own toolchain, torch 2.11) a failing check
// that streamed an integer into its message crashed the process (SIGSEGV) instead of
// raising, while checks that streamed only text, dtypes and devices raised as they should.
// So the checks here stream numbers only through these helpers (std::to_string), never as
// integers or IntArrayRefs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace ct_kernels {

inline std::string num(int64_t value) { return std::to_string(value); }

inline std::string real(double value) { return std::to_string(value); }

inline std::string shape(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

}  // namespace ct_kernels
