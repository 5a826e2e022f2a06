// Compression of evicted memories and the in-place memory update (DESIGN.md §1).
//
// Ops (torch.ops.ct_kernels.*):
//   pool_compress(x, rate, is_max)                     [B, ns, d] -> [B, ns / rate, d]
//   pool_compress_backward(grad, x, out, rate, is_max)  -> dx [B, ns, d]
//   memory_update(mem!, cmem!, mem_lens!, cmem_lens!, h, compressed?, rate, pool,
//                 shift_cmem, shift_mem)                in place, see memory_update_kernel
//
// Every kernel reads the [B, rows, d] layout directly (any batch/row strides, contiguous d)
// and moves 16 bytes per access when d, the strides and the pointers allow it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "check_message.h"

namespace ct_kernels {
namespace {

constexpr int kThreads = 256;

// How the new compressed slots of memory_update are produced.
enum Pool : int64_t { kNone = 0, kMean = 1, kMax = 2, kGiven = 3 };

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packet {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Packet<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Packet<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Packet<T, VEC>& x) {
  *reinterpret_cast<Packet<T, VEC>*>(p) = x;
}

// max that propagates NaN, as torch.amax
template <typename A>
__device__ __forceinline__ A nan_max(A acc, A x) {
  return (x != x || x > acc) ? x : acc;
}

// Reduce `rate` consecutive rows starting at `src` (row stride `row_stride`) into acc.
template <typename T, int VEC, bool IS_MAX>
__device__ __forceinline__ void pool_rows(const T* src, int64_t row_stride, int rate,
                                          at::opmath_type<T> (&acc)[VEC]) {
  using A = at::opmath_type<T>;
  auto first = load<T, VEC>(src);
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = static_cast<A>(first.v[e]);
  for (int k = 1; k < rate; ++k) {
    auto row = load<T, VEC>(src + k * row_stride);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const A x = static_cast<A>(row.v[e]);
      acc[e] = IS_MAX ? nan_max(acc[e], x) : acc[e] + x;
    }
  }
  if (!IS_MAX) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] /= static_cast<A>(rate);
  }
}

// One thread per (b, t, VEC columns): out[b, t] = pool(x[b, t*rate : (t+1)*rate]).
template <typename T, int VEC, bool IS_MAX>
__global__ void pool_forward_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t T_out,
                                    int64_t d, int rate, int64_t x_sb, int64_t x_sr,
                                    int64_t total) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int64_t vecs = d / VEC;
  const int64_t col = (idx % vecs) * VEC;
  const int64_t t = (idx / vecs) % T_out;
  const int64_t b = idx / vecs / T_out;
  at::opmath_type<T> acc[VEC];
  pool_rows<T, VEC, IS_MAX>(x + b * x_sb + t * rate * x_sr + col, x_sr, rate, acc);
  Packet<T, VEC> result;
#pragma unroll
  for (int e = 0; e < VEC; ++e) result.v[e] = static_cast<T>(acc[e]);
  store<T, VEC>(out + (b * T_out + t) * d + col, result);
}

// One thread per (b, t, VEC columns). Mean: every row of the window gets grad / rate.
// Max: the rows equal to the maximum share grad evenly (torch.amax's rule for ties).
template <typename T, int VEC, bool IS_MAX>
__global__ void pool_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                     const T* __restrict__ out, T* __restrict__ dx,
                                     int64_t T_out, int64_t d, int rate, int64_t g_sb,
                                     int64_t g_sr, int64_t x_sb, int64_t x_sr, int64_t total) {
  using A = at::opmath_type<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int64_t vecs = d / VEC;
  const int64_t col = (idx % vecs) * VEC;
  const int64_t t = (idx / vecs) % T_out;
  const int64_t b = idx / vecs / T_out;
  const auto g = load<T, VEC>(grad + b * g_sb + t * g_sr + col);
  T* dst = dx + (b * T_out + t) * rate * d + col;  // dx is contiguous [B, ns, d]
  if (!IS_MAX) {
    Packet<T, VEC> share;
#pragma unroll
    for (int e = 0; e < VEC; ++e) share.v[e] = static_cast<T>(static_cast<A>(g.v[e]) / rate);
    for (int k = 0; k < rate; ++k) store<T, VEC>(dst + k * d, share);
    return;
  }
  // count the ties first, then hand out the shares
  const auto top = load<T, VEC>(out + (b * T_out + t) * d + col);
  const T* src = x + b * x_sb + t * rate * x_sr + col;
  A ties[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) ties[e] = A(0);
  for (int k = 0; k < rate; ++k) {
    const auto row = load<T, VEC>(src + k * x_sr);
#pragma unroll
    for (int e = 0; e < VEC; ++e) ties[e] += (row.v[e] == top.v[e]) ? A(1) : A(0);
  }
  for (int k = 0; k < rate; ++k) {
    const auto row = load<T, VEC>(src + k * x_sr);
    Packet<T, VEC> share;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      share.v[e] = (row.v[e] == top.v[e]) ? static_cast<T>(static_cast<A>(g.v[e]) / ties[e])
                                          : static_cast<T>(0);
    store<T, VEC>(dst + k * d, share);
  }
}

struct Buffer {  // a [B, rows, d] tensor seen through its batch and row strides
  void* ptr;
  int64_t sb, sr;
};

// In-place memory update of one segment (n rows of h, nc = n / rate new compressed slots).
// One thread per (b, j < nc, VEC columns), so every thread owns disjoint rows:
//   1. new slot j = pool(stream rows j*rate ..), stream = [mem | h]   (or compressed[j])
//   2. cmem shifts left by nc: row t <- row t + nc along the chain t = rho, rho + nc, ...
//      (rho = (cm - nc + j) mod nc), ending in the chain's last row cm - nc + j <- slot j.
//   3. mem shifts left by n: for the rate residues r = j*rate + k, row t <- stream row t + n
//      along t = r, r + n, ... < m.
// Each chain walks upwards, so every row is read before it is overwritten, and the old rows
// of step 1 are exactly the chain heads of step 3. The thread of (b, j = 0, cols 0) also
// updates the fill lengths when the memory moves.
template <typename T, int VEC, int POOL>
__global__ void memory_update_kernel(Buffer mem_buf, Buffer cmem_buf, Buffer h_buf,
                                     Buffer given_buf, int* __restrict__ mem_lens,
                                     int* __restrict__ cmem_lens, int64_t m, int64_t cm,
                                     int64_t n, int64_t d, int rate, bool shift_cmem,
                                     bool shift_mem, int64_t total) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int64_t nc = n / rate;
  const int64_t vecs = d / VEC;
  const int64_t col = (idx % vecs) * VEC;
  const int64_t j = (idx / vecs) % nc;
  const int64_t b = idx / vecs / nc;
  T* mem = static_cast<T*>(mem_buf.ptr) + b * mem_buf.sb + col;
  T* cmem = static_cast<T*>(cmem_buf.ptr) + b * cmem_buf.sb + col;
  const T* h = static_cast<const T*>(h_buf.ptr) + b * h_buf.sb + col;
  auto stream_row = [&](int64_t s) -> const T* {  // row s of [mem | h]
    return s < m ? mem + s * mem_buf.sr : h + (s - m) * h_buf.sr;
  };

  // 1. the new compressed slot, from the rows about to leave the memory
  Packet<T, VEC> slot;
  if (POOL == kMean || POOL == kMax) {
    at::opmath_type<T> acc[VEC];
    const int64_t r0 = j * rate;
    if (r0 + rate <= m || r0 >= m) {  // the window lies in one buffer: strided rows
      const bool in_mem = r0 < m;
      pool_rows<T, VEC, POOL == kMax>(stream_row(r0), in_mem ? mem_buf.sr : h_buf.sr, rate,
                                      acc);
    } else {  // the window straddles mem and h: gather row by row
      using A = at::opmath_type<T>;
      for (int k = 0; k < rate; ++k) {
        const auto row = load<T, VEC>(stream_row(r0 + k));
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A x = static_cast<A>(row.v[e]);
          acc[e] = k == 0 ? x : (POOL == kMax ? nan_max(acc[e], x) : acc[e] + x);
        }
      }
      if (POOL == kMean) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] /= static_cast<A>(rate);
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) slot.v[e] = static_cast<T>(acc[e]);
  } else if (POOL == kGiven) {
    slot = load<T, VEC>(static_cast<const T*>(given_buf.ptr) + b * given_buf.sb +
                        j * given_buf.sr + col);
  }

  // 2. compressed memory: shift left by nc along this thread's chain, then append the slot
  if (shift_cmem) {
    const int64_t last = cm - nc + j;  // where slot j lands (< 0: it falls off a short cmem)
    if (cm > nc) {
      for (int64_t t = ((last % nc) + nc) % nc; t < cm - nc; t += nc)
        store<T, VEC>(cmem + t * cmem_buf.sr, load<T, VEC>(cmem + (t + nc) * cmem_buf.sr));
    }
    if (POOL != kNone && last >= 0) store<T, VEC>(cmem + last * cmem_buf.sr, slot);
  }

  // 3. memory: shift left by n, the segment's rows enter at the right end
  if (shift_mem) {
    for (int k = 0; k < rate; ++k)
      for (int64_t t = j * rate + k; t < m; t += n)
        store<T, VEC>(mem + t * mem_buf.sr, load<T, VEC>(stream_row(t + n)));
    if (j == 0 && col == 0) {
      const int64_t filled = mem_lens[b];
      const int64_t evicted = filled + n - m > 0 ? filled + n - m : 0;
      mem_lens[b] = static_cast<int>(filled + n < m ? filled + n : m);
      const int64_t cfilled = cmem_lens[b] + evicted / rate;
      cmem_lens[b] = static_cast<int>(cfilled < cm ? cfilled : cm);
    }
  }
}

// Widest vector (16 bytes, else scalar) that every pointer, stride and d allow.
template <typename T>
int vector_width(int64_t d, std::initializer_list<const void*> ptrs,
                 std::initializer_list<int64_t> strides) {
  constexpr int wide = 16 / sizeof(T);
  if (wide <= 1 || d % wide != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  for (int64_t s : strides)
    if (s % wide != 0) return 1;
  return wide;
}

// Calls launch(vector width, is_max) with both as compile-time constants.
template <typename T, typename Launch>
void with_width_and_mode(bool wide, bool is_max, Launch&& launch) {
  using Wide = std::integral_constant<int, 16 / sizeof(T)>;
  using One = std::integral_constant<int, 1>;
  if (wide) is_max ? launch(Wide{}, std::true_type{}) : launch(Wide{}, std::false_type{});
  else is_max ? launch(One{}, std::true_type{}) : launch(One{}, std::false_type{});
}

int64_t blocks_for(int64_t total) { return (total + kThreads - 1) / kThreads; }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, name, " must have shape [B, rows, d], got ", ct_kernels::shape(t.sizes()));
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " must have a contiguous last dimension");
}

at::Tensor pool_compress(const at::Tensor& x, int64_t rate, bool is_max) {
  check_rows(x, "x");
  TORCH_CHECK(rate >= 1 && x.size(1) % rate == 0, "rate (", ct_kernels::num(rate),
              ") must divide the number of rows (", ct_kernels::num(x.size(1)), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T_out = x.size(1) / rate, d = x.size(2);
  auto out = at::empty({B, T_out, d}, x.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_compress", [&] {
    auto launch = [&](auto vec_tag, auto max_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t total = B * T_out * (d / VEC);
      pool_forward_kernel<scalar_t, VEC, decltype(max_tag)::value>
          <<<blocks_for(total), kThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T_out, d, static_cast<int>(rate),
              x.stride(0), x.stride(1), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool wide = vector_width<scalar_t>(d, {x.data_ptr()}, {x.stride(0), x.stride(1)}) > 1;
    with_width_and_mode<scalar_t>(wide, is_max, launch);
  });
  return out;
}

at::Tensor pool_compress_backward(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& out, int64_t rate, bool is_max) {
  check_rows(x, "x");
  check_rows(grad, "grad");
  const int64_t B = x.size(0), T_out = x.size(1) / rate, d = x.size(2);
  TORCH_CHECK(rate >= 1 && x.size(1) % rate == 0, "rate must divide the number of rows");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B, T_out, d}), "grad must have shape [B, ns / rate, d]");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have the dtype of x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty({B, x.size(1), d}, x.options());
  if (dx.numel() == 0) return dx;
  // out is only read by max: it must be the contiguous result of pool_compress
  const at::Tensor top = is_max ? out.contiguous() : out;
  if (is_max)
    TORCH_CHECK(top.sizes() == grad.sizes() && top.scalar_type() == x.scalar_type(),
                "out must be pool_compress's result");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_compress_backward", [&] {
    auto launch = [&](auto vec_tag, auto max_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t total = B * T_out * (d / VEC);
      pool_backward_kernel<scalar_t, VEC, decltype(max_tag)::value>
          <<<blocks_for(total), kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
              is_max ? top.data_ptr<scalar_t>() : nullptr, dx.data_ptr<scalar_t>(), T_out, d,
              static_cast<int>(rate), grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
              total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool wide = vector_width<scalar_t>(
                          d, {x.data_ptr(), grad.data_ptr(), is_max ? top.data_ptr() : nullptr},
                          {x.stride(0), x.stride(1), grad.stride(0), grad.stride(1)}) > 1;
    with_width_and_mode<scalar_t>(wide, is_max, launch);
  });
  return dx;
}

void memory_update(at::Tensor mem, at::Tensor cmem, at::Tensor mem_lens, at::Tensor cmem_lens,
                   const at::Tensor& h, const c10::optional<at::Tensor>& compressed,
                   int64_t rate, int64_t pool, bool shift_cmem, bool shift_mem) {
  check_rows(mem, "mem");
  check_rows(cmem, "cmem");
  check_rows(h, "h");
  const int64_t B = h.size(0), n = h.size(1), d = h.size(2);
  const int64_t m = mem.size(1), cm = cmem.size(1);
  TORCH_CHECK(mem.size(0) == B && cmem.size(0) == B && mem.size(2) == d && cmem.size(2) == d,
              "mem, cmem and h must agree in B and d");
  TORCH_CHECK(mem.scalar_type() == h.scalar_type() && cmem.scalar_type() == h.scalar_type(),
              "mem, cmem and h must have one dtype");
  TORCH_CHECK(rate >= 1 && n >= 1 && n % rate == 0, "rate (", ct_kernels::num(rate),
              ") must divide the segment length (", ct_kernels::num(n), ")");
  TORCH_CHECK(pool >= kNone && pool <= kGiven, "pool must be 0 (none), 1 (mean), 2 (max) or 3 (given)");
  for (const at::Tensor* lens : {&mem_lens, &cmem_lens})
    TORCH_CHECK(lens->is_cuda() && lens->scalar_type() == at::kInt && lens->is_contiguous() &&
                    lens->numel() == B,
                "mem_lens and cmem_lens must be contiguous int32 CUDA tensors [B]");
  at::Tensor given;
  if (pool == kGiven) {
    TORCH_CHECK(compressed.has_value(), "pool = 3 (given) needs the compressed slots");
    given = *compressed;
    check_rows(given, "compressed");
    TORCH_CHECK(given.size(0) == B && given.size(1) == n / rate && given.size(2) == d &&
                    given.scalar_type() == h.scalar_type(),
                "compressed must have shape [B, n / rate, d] and h's dtype");
  }
  const int64_t nc = n / rate;
  const int64_t total_rows = B * nc;
  if (total_rows == 0 || d == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "memory_update", [&] {
    const void* given_ptr = given.defined() ? given.data_ptr() : nullptr;
    const int vec = vector_width<scalar_t>(
        d, {mem.data_ptr(), cmem.data_ptr(), h.data_ptr(), given_ptr},
        {mem.stride(0), mem.stride(1), cmem.stride(0), cmem.stride(1), h.stride(0), h.stride(1),
         given.defined() ? given.stride(0) : 0, given.defined() ? given.stride(1) : 0});
    const Buffer mem_buf{mem.data_ptr(), mem.stride(0), mem.stride(1)};
    const Buffer cmem_buf{cmem.data_ptr(), cmem.stride(0), cmem.stride(1)};
    const Buffer h_buf{h.data_ptr(), h.stride(0), h.stride(1)};
    const Buffer given_buf{given.defined() ? given.data_ptr() : nullptr,
                           given.defined() ? given.stride(0) : 0,
                           given.defined() ? given.stride(1) : 0};
    auto launch = [&](auto vec_tag, auto pool_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t total = total_rows * (d / VEC);
      memory_update_kernel<scalar_t, VEC, decltype(pool_tag)::value>
          <<<blocks_for(total), kThreads, 0, stream>>>(
              mem_buf, cmem_buf, h_buf, given_buf, mem_lens.data_ptr<int>(),
              cmem_lens.data_ptr<int>(), m, cm, n, d, static_cast<int>(rate), shift_cmem,
              shift_mem, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_vec = [&](auto vec_tag) {
      switch (pool) {
        case kMean: return launch(vec_tag, std::integral_constant<int, kMean>{});
        case kMax: return launch(vec_tag, std::integral_constant<int, kMax>{});
        case kGiven: return launch(vec_tag, std::integral_constant<int, kGiven>{});
        default: return launch(vec_tag, std::integral_constant<int, kNone>{});
      }
    };
    if (vec > 1) with_vec(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else with_vec(std::integral_constant<int, 1>{});
  });
}

}  // namespace
}  // namespace ct_kernels

TORCH_LIBRARY_FRAGMENT(ct_kernels, m) {
  m.def("pool_compress(Tensor x, int rate, bool is_max) -> Tensor");
  m.def("pool_compress_backward(Tensor grad, Tensor x, Tensor out, int rate, bool is_max) -> Tensor");
  m.def("memory_update(Tensor(a!) mem, Tensor(b!) cmem, Tensor(c!) mem_lens, "
        "Tensor(d!) cmem_lens, Tensor h, Tensor? compressed, int rate, int pool, "
        "bool shift_cmem, bool shift_mem) -> ()");
}

TORCH_LIBRARY_IMPL(ct_kernels, CUDA, m) {
  m.impl("pool_compress", &ct_kernels::pool_compress);
  m.impl("pool_compress_backward", &ct_kernels::pool_compress_backward);
  m.impl("memory_update", &ct_kernels::memory_update);
}
