// Decode attention: n <= 16 new queries over [cmem | mem | segment], split-KV forward.
//
// Stage 1 (decode_split_kernel): the visible keys of one (batch, head) are cut into splits;
// each block streams one split of K/V straight from the three source tensors (each with its
// own pointer and strides) with 16-byte loads and keeps an online softmax per group of
// threads, then merges its groups in shared memory. With one split it writes the output;
// otherwise it writes a normalised partial output and its log-sum-exp (base 2).
// Stage 2 (decode_combine_kernel): one warp per query row rescales and sums the partials.
//
// Only the valid (newest) slots of each memory are visited, so partially filled memories
// cost nothing for the empty slots.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#include "check_message.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 128;        // 4 warps per block
constexpr int kElemsPerThread = 8;   // one 16-byte vector of fp16/bf16
constexpr int kMaxQueries = 16;
constexpr int kMaxSplits = 128;
constexpr float kLog2e = 1.4426950408889634f;

// Key rows each thread group loads per step: more in flight for one query, fewer registers
// for a chunk of four.
constexpr int keys_per_group_step(int queries_per_block) { return queries_per_block == 1 ? 4 : 2; }

// One key/value source (cmem, mem or the segment) of a decode step, layout [B, S, H, D].
struct KeySource {
  const void* k;
  const void* v;
  int64_t k_batch, k_row, k_head;
  int64_t v_batch, v_row, v_head;
  int size;          // S, slots in the buffer
  const int* lens;   // per-sample valid (newest) slots, or nullptr = all valid
};

struct DecodeParams {
  const void* q;
  int64_t q_batch, q_row, q_head;
  KeySource src[3];  // cmem, mem, segment (in attention order)
  const bool* key_padding;  // [B, n] True = padded segment key, or nullptr
  bool causal;
  float scale_log2;  // softmax scale * log2(e): scores live in base 2
  // Transformer-XL relative positions (used only by the REL instantiations)
  const void* rel_r;
  int64_t r_head, r_row;
  const void* rel_u;
  const void* rel_v;
  int64_t u_head, v_head;
  int batch, heads, n;
  int num_splits, keys_per_split, query_chunks;
  void* out;             // [B, n, H, D] contiguous
  float* partial_out;    // [splits, B*H, n, D]
  float* partial_lse;    // [splits, B*H, n]
};

// Element pairs of a 16-bit type and their fp32 conversions.
template <typename T>
struct Pair;

template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type x) { return __half22float2(x); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type x) { return __bfloat1622float2(x); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// One 16-byte vector (8 elements) to fp32 and back.
template <typename T>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&f)[8]) {
  const typename Pair<T>::type* pairs = reinterpret_cast<const typename Pair<T>::type*>(&raw);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 x = Pair<T>::to_float2(pairs[e]);
    f[2 * e] = x.x;
    f[2 * e + 1] = x.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 from_float8(const float (&f)[8]) {
  uint4 raw;
  typename Pair<T>::type* pairs = reinterpret_cast<typename Pair<T>::type*>(&raw);
#pragma unroll
  for (int e = 0; e < 4; ++e) pairs[e] = Pair<T>::from_floats(f[2 * e], f[2 * e + 1]);
  return raw;
}

// K/V are read exactly once: read-only path, no L1 allocation, 256-byte L2 prefetch.
// volatile: the load is issued only where the code asks for it (never speculated).
__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

__device__ __forceinline__ uint4 load_cached(const void* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

// Sum over the LANES consecutive lanes that hold one key row.
template <int LANES>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Online-softmax state of one thread group for QB queries (8 output elements per query).
template <int QB>
struct RowState {
  float max[QB];
  float sum[QB];
  float acc[QB][kElemsPerThread];
};

// Streams keys [first, last) of one source (buffer slots) into the group states.
// Key `slot` is visible to query i iff slot <= i + causal_shift and it is not padded;
// its concatenated position is j_offset + slot.
template <typename T, int D, int QB, bool REL, int KU>
__device__ __forceinline__ void attend_source(
    const DecodeParams& p, const KeySource& src, int b, int h, int first, int last,
    int j_offset, int causal_shift, const bool* padding, int q_first,
    const float (&qu)[QB][kElemsPerThread], const float (&qv)[QB][kElemsPerThread],
    RowState<QB>& state) {
  constexpr int kLanes = D / kElemsPerThread;   // threads per key row
  constexpr int kGroups = kThreads / kLanes;    // key rows in flight per block step
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const char* k_base = static_cast<const char*>(src.k) +
                       (b * src.k_batch + h * src.k_head + lane * kElemsPerThread) * sizeof(T);
  const char* v_base = static_cast<const char*>(src.v) +
                       (b * src.v_batch + h * src.v_head + lane * kElemsPerThread) * sizeof(T);
  const char* r_base = nullptr;
  if constexpr (REL) {
    r_base = static_cast<const char*>(p.rel_r) + (h * p.r_head + lane * kElemsPerThread) * sizeof(T);
  }
  // distance of query q_first + qi to key at position j is delta_base + qi - j
  const int delta_base = p.src[0].size + p.src[1].size + q_first;

  for (int step = first; step < last; step += kGroups * KU) {
    // 1. issue every load of this step before the first use
    uint4 k_raw[KU], v_raw[KU];
    uint4 r_raw[REL ? KU : 1][REL ? QB : 1];
    bool live[KU];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      const int slot = step + u * kGroups + group;
      live[u] = slot < last;
      k_raw[u] = live[u] ? load_stream(k_base + slot * src.k_row * int64_t(sizeof(T))) : make_uint4(0, 0, 0, 0);
      v_raw[u] = live[u] ? load_stream(v_base + slot * src.v_row * int64_t(sizeof(T))) : make_uint4(0, 0, 0, 0);
      if constexpr (REL) {
#pragma unroll
        for (int qi = 0; qi < QB; ++qi) {
          const int delta = delta_base + qi - (j_offset + slot);
          const bool in_range = live[u] && delta >= 0 && q_first + qi < p.n;
          r_raw[u][qi] = in_range ? load_cached(r_base + delta * p.r_row * int64_t(sizeof(T))) : make_uint4(0, 0, 0, 0);
        }
      }
    }
    // 2. scores (base 2) of each key against each query; masked pairs get -inf
    float score[KU][QB];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      const int slot = step + u * kGroups + group;
      float k_f[kElemsPerThread];
      to_float8<T>(k_raw[u], k_f);
      const bool padded = live[u] && padding != nullptr && padding[slot];
#pragma unroll
      for (int qi = 0; qi < QB; ++qi) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kElemsPerThread; ++e) dot = fmaf(qu[qi][e], k_f[e], dot);
        if constexpr (REL) {
          float r_f[kElemsPerThread];
          to_float8<T>(r_raw[u][qi], r_f);
#pragma unroll
          for (int e = 0; e < kElemsPerThread; ++e) dot = fmaf(qv[qi][e], r_f[e], dot);
        }
        dot = group_sum<kLanes>(dot);
        const int i = q_first + qi;
        const bool visible = live[u] && !padded && i < p.n && slot <= i + causal_shift;
        score[u][qi] = visible ? dot : -INFINITY;
      }
    }
    // 3. online softmax update and P·V
    float v_f[KU][kElemsPerThread];
#pragma unroll
    for (int u = 0; u < KU; ++u) to_float8<T>(v_raw[u], v_f[u]);
#pragma unroll
    for (int qi = 0; qi < QB; ++qi) {
      float new_max = state.max[qi];
#pragma unroll
      for (int u = 0; u < KU; ++u) new_max = fmaxf(new_max, score[u][qi]);
      const float base = new_max == -INFINITY ? 0.f : new_max;  // nothing visible yet
      const float correction = exp2f(state.max[qi] - base);
      state.max[qi] = new_max;
      state.sum[qi] *= correction;
#pragma unroll
      for (int e = 0; e < kElemsPerThread; ++e) state.acc[qi][e] *= correction;
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const float prob = exp2f(score[u][qi] - base);
        state.sum[qi] += prob;
#pragma unroll
        for (int e = 0; e < kElemsPerThread; ++e) state.acc[qi][e] = fmaf(prob, v_f[u][e], state.acc[qi][e]);
      }
    }
  }
}

// Grid: one block per (query chunk, split, batch*head), query chunk fastest so that the
// chunks of one split read the same K/V close together in time (L2 hits).
template <typename T, int D, int QB, bool REL>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  constexpr int kLanes = D / kElemsPerThread;
  constexpr int kGroups = kThreads / kLanes;
  constexpr int KU = keys_per_group_step(QB);
  __shared__ __align__(16) float s_acc[kGroups][QB][D];
  __shared__ float s_max[kGroups][QB];
  __shared__ float s_sum[kGroups][QB];
  __shared__ float s_weight[kGroups][QB];
  __shared__ float s_total[QB];
  __shared__ float s_block_max[QB];

  const int chunk = blockIdx.x % p.query_chunks;
  const int split = (blockIdx.x / p.query_chunks) % p.num_splits;
  const int bh = blockIdx.x / (p.query_chunks * p.num_splits);
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int lane = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const int q_first = chunk * QB;

  // 1. this sample's visible keys, in attention order: cmem_len + mem_len + n
  int valid[3];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const KeySource& src = p.src[s];
    valid[s] = src.lens == nullptr ? src.size : min(max(src.lens[b], 0), src.size);
  }
  valid[2] = p.n;
  const int split_begin = split * p.keys_per_split;
  const int split_end = min(split_begin + p.keys_per_split, valid[0] + valid[1] + valid[2]);

  // 2. queries of this chunk, pre-scaled into base 2: qu = q + u, qv = q + v
  float qu[QB][kElemsPerThread], qv[QB][kElemsPerThread];
  RowState<QB> state;
#pragma unroll
  for (int qi = 0; qi < QB; ++qi) {
    const int i = q_first + qi;
    float q_f[kElemsPerThread] = {};
    if (i < p.n) {
      to_float8<T>(load_cached(static_cast<const T*>(p.q) + b * p.q_batch + i * p.q_row +
                                    h * p.q_head + lane * kElemsPerThread), q_f);
    }
    float u_f[kElemsPerThread] = {}, v_f[kElemsPerThread] = {};
    if constexpr (REL) {
      to_float8<T>(load_cached(static_cast<const T*>(p.rel_u) + h * p.u_head + lane * kElemsPerThread), u_f);
      to_float8<T>(load_cached(static_cast<const T*>(p.rel_v) + h * p.v_head + lane * kElemsPerThread), v_f);
    }
#pragma unroll
    for (int e = 0; e < kElemsPerThread; ++e) {
      qu[qi][e] = (q_f[e] + u_f[e]) * p.scale_log2;
      qv[qi][e] = (q_f[e] + v_f[e]) * p.scale_log2;
      state.acc[qi][e] = 0.f;
    }
    state.max[qi] = -INFINITY;
    state.sum[qi] = 0.f;
  }

  // 3. stream the part of each source that falls into this split
  const int always = 1 << 30;  // memories are visible to every query
  const int segment_shift = p.causal ? 0 : always;
  const bool* padding = p.key_padding == nullptr ? nullptr : p.key_padding + int64_t(b) * p.n;
  int source_begin = 0;  // first visible key of the source, in split coordinates
  int j_offset = 0;      // concatenated position of the source's slot 0
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const int first_slot = p.src[s].size - valid[s];  // valid slots are the newest ones
    const int begin = max(split_begin, source_begin);
    const int end = min(split_end, source_begin + valid[s]);
    if (begin < end) {
      attend_source<T, D, QB, REL, KU>(
          p, p.src[s], b, h, first_slot + begin - source_begin, first_slot + end - source_begin,
          j_offset, s == 2 ? segment_shift : always, s == 2 ? padding : nullptr, q_first, qu, qv, state);
    }
    source_begin += valid[s];
    j_offset += p.src[s].size;
  }

  // 4. merge the groups of the block: per query the block max, group weights, total mass
#pragma unroll
  for (int qi = 0; qi < QB; ++qi) {
    if (lane == 0) {
      s_max[group][qi] = state.max[qi];
      s_sum[group][qi] = state.sum[qi];
    }
    float4* dst = reinterpret_cast<float4*>(&s_acc[group][qi][lane * kElemsPerThread]);
    dst[0] = make_float4(state.acc[qi][0], state.acc[qi][1], state.acc[qi][2], state.acc[qi][3]);
    dst[1] = make_float4(state.acc[qi][4], state.acc[qi][5], state.acc[qi][6], state.acc[qi][7]);
  }
  __syncthreads();
  if (threadIdx.x < QB) {
    const int qi = threadIdx.x;
    float block_max = -INFINITY;
    for (int g = 0; g < kGroups; ++g) block_max = fmaxf(block_max, s_max[g][qi]);
    const float base = block_max == -INFINITY ? 0.f : block_max;
    float total = 0.f;
    for (int g = 0; g < kGroups; ++g) {
      const float weight = exp2f(s_max[g][qi] - base);
      s_weight[g][qi] = weight;
      total += weight * s_sum[g][qi];
    }
    s_total[qi] = total;
    s_block_max[qi] = block_max;
  }
  __syncthreads();

  // 5. write 8 elements of one query per thread: the output, or this split's partial
  for (int item = threadIdx.x; item < QB * kLanes; item += kThreads) {
    const int qi = item / kLanes;
    const int d0 = (item % kLanes) * kElemsPerThread;
    const int i = q_first + qi;
    if (i >= p.n) continue;
    const float total = s_total[qi];
    const float inv_total = total > 0.f ? 1.f / total : 0.f;  // a row that sees nothing is 0
    float o[kElemsPerThread] = {};
    for (int g = 0; g < kGroups; ++g) {
      const float weight = s_weight[g][qi] * inv_total;
#pragma unroll
      for (int e = 0; e < kElemsPerThread; ++e) o[e] = fmaf(weight, s_acc[g][qi][d0 + e], o[e]);
    }
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + ((int64_t(b) * p.n + i) * p.heads + h) * D + d0;
      *reinterpret_cast<uint4*>(out) = from_float8<T>(o);
    } else {
      const int64_t row = (int64_t(split) * p.batch * p.heads + bh) * p.n + i;
      float4* dst = reinterpret_cast<float4*>(p.partial_out + row * D + d0);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (d0 == 0) p.partial_lse[row] = total > 0.f ? s_block_max[qi] + __log2f(total) : -INFINITY;
    }
  }
}

// One warp per (batch*head, query) row: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const DecodeParams p) {
  constexpr int kPerLane = D / 32;
  constexpr int kWarps = kThreads / 32;
  const int rows = p.batch * p.heads * p.n;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int i = row % p.n;
  const int bh = row / p.n;
  const int b = bh / p.heads;
  const int h = bh % p.heads;

  // 1. the largest split log-sum-exp
  float max_lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) max_lse = fmaxf(max_lse, p.partial_lse[int64_t(s) * rows + row]);
  const float base = max_lse == -INFINITY ? 0.f : max_lse;

  // 2. weighted sum of the split outputs
  float acc[kPerLane] = {};
  float total = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const int64_t split_row = int64_t(s) * rows + row;
    const float weight = exp2f(p.partial_lse[split_row] - base);
    if (weight == 0.f) continue;  // empty split
    total += weight;
    const float* o = p.partial_out + split_row * D + lane * kPerLane;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = fmaf(weight, o[e], acc[e]);
  }

  // 3. normalise; a row that sees nothing is 0
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out) + ((int64_t(b) * p.n + i) * p.heads + h) * D + lane * kPerLane;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out[e] = Pair<T>::from_float(acc[e] * inv_total);
}

// Splits per (batch*head, query chunk): enough blocks to fill the resident slots of the
// GPU in whole waves, each split at least two block steps long.
int choose_num_splits(int work, int max_keys, int keys_per_step, int resident_blocks) {
  const int max_splits = std::max(1, std::min(kMaxSplits, (max_keys + 2 * keys_per_step - 1) / (2 * keys_per_step)));
  float best = 0.f;
  std::vector<float> efficiency(max_splits + 1, 0.f);
  for (int splits = 1; splits <= max_splits; ++splits) {
    const float waves = float(work) * splits / resident_blocks;
    efficiency[splits] = waves / std::ceil(waves);
    best = std::max(best, efficiency[splits]);
  }
  for (int splits = 1; splits <= max_splits; ++splits) {
    if (efficiency[splits] >= 0.85f * best) return splits;
  }
  return 1;
}

template <typename T, int D, int QB, bool REL>
void launch_decode(DecodeParams& p, int num_splits, const at::Tensor& q) {
  constexpr int kLanes = D / kElemsPerThread;
  constexpr int kGroups = kThreads / kLanes;
  constexpr int kKeysPerStep = kGroups * keys_per_group_step(QB);
  auto kernel = decode_split_kernel<T, D, QB, REL>;
  const int max_keys = p.src[0].size + p.src[1].size + p.n;
  const int work = p.batch * p.heads * p.query_chunks;
  if (num_splits == 0) {
    // asked once per instantiation (the answer depends only on the kernel and the sm_90
    // target), so later calls, e.g. under CUDA graph capture, make no occupancy query
    static const int blocks_per_sm = [kernel] {
      int blocks = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
      return blocks;
    }();
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    num_splits = choose_num_splits(work, max_keys, kKeysPerStep, std::max(1, blocks_per_sm) * sms);
  }
  // whole block steps per split; drop splits that would start past the last key
  const int per_split = (max_keys + num_splits - 1) / num_splits;
  p.keys_per_split = (per_split + kKeysPerStep - 1) / kKeysPerStep * kKeysPerStep;
  p.num_splits = (max_keys + p.keys_per_split - 1) / p.keys_per_split;

  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.num_splits) * p.batch * p.heads * p.n;
    partial_out = at::empty({rows, D}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({rows}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = int64_t(work) * p.num_splits;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "decode_attention: too many blocks (", ct_kernels::num(blocks), ")");
  kernel<<<unsigned(blocks), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.heads * p.n;
    const int64_t combine_blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
    decode_combine_kernel<T, D><<<unsigned(combine_blocks), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void launch_for_head_dim(DecodeParams& p, int num_splits, bool rel, const at::Tensor& q) {
  // one query per block for n = 1, else chunks of 4 queries
  if (p.n == 1) {
    p.query_chunks = 1;
    rel ? launch_decode<T, D, 1, true>(p, num_splits, q) : launch_decode<T, D, 1, false>(p, num_splits, q);
  } else {
    p.query_chunks = (p.n + 3) / 4;
    rel ? launch_decode<T, D, 4, true>(p, num_splits, q) : launch_decode<T, D, 4, false>(p, num_splits, q);
  }
}

// Checks one [B, S, H, D] operand: dtype, device, shape and 16-byte-aligned rows.
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rows) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "decode_attention: ", name, " must have dtype ",
              q.scalar_type(), " (as q), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "decode_attention: ", name, " must be on ", q.device(),
              " (as q), got ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == rows && t.size(2) == q.size(2) &&
                  t.size(3) == q.size(3),
              "decode_attention: ", name, " must have shape [B, ", ct_kernels::num(rows), ", H, D] = ",
              ct_kernels::shape({q.size(0), rows, q.size(2), q.size(3)}), ", got ", ct_kernels::shape(t.sizes()));
  TORCH_CHECK(t.stride(3) == 1, "decode_attention: ", name, " must have a contiguous last dimension");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "decode_attention: ", name,
              " must be 16-byte aligned");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) % kElemsPerThread == 0, "decode_attention: ", name,
                ".stride(", ct_kernels::num(d), ") must be a multiple of ", ct_kernels::num(kElemsPerThread),
                " (16-byte rows), got ", ct_kernels::num(t.stride(d)));
  }
}

KeySource make_source(const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                      const std::optional<at::Tensor>& lens, const char* prefix, const at::Tensor& q) {
  KeySource src{};
  TORCH_CHECK(k.has_value() == v.has_value(), "decode_attention: ", prefix, "_k and ", prefix,
              "_v must be given together");
  if (!k.has_value()) {
    TORCH_CHECK(!lens.has_value(), "decode_attention: ", prefix, "_lens given without ", prefix, "_k");
    return src;  // size 0: no keys from this source
  }
  const std::string name_k = std::string(prefix) + "_k", name_v = std::string(prefix) + "_v";
  check_operand(*k, name_k.c_str(), q, k->size(1));
  check_operand(*v, name_v.c_str(), q, k->size(1));
  TORCH_CHECK(k->size(1) < (int64_t(1) << 30), "decode_attention: ", prefix, "_k has too many slots");
  src.k = k->data_ptr();
  src.v = v->data_ptr();
  src.k_batch = k->stride(0), src.k_row = k->stride(1), src.k_head = k->stride(2);
  src.v_batch = v->stride(0), src.v_row = v->stride(1), src.v_head = v->stride(2);
  src.size = int(k->size(1));
  if (lens.has_value()) {
    TORCH_CHECK(lens->scalar_type() == at::kInt, "decode_attention: ", prefix, "_lens must be int32, got ",
                lens->scalar_type());
    TORCH_CHECK(lens->device() == q.device(), "decode_attention: ", prefix, "_lens must be on ", q.device());
    TORCH_CHECK(lens->dim() == 1 && lens->size(0) == q.size(0) && lens->is_contiguous(), "decode_attention: ",
                prefix, "_lens must be a contiguous [B] tensor, got ", ct_kernels::shape(lens->sizes()));
    src.lens = lens->data_ptr<int>();
  }
  return src;
}

at::Tensor& decode_attention_out(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mem_k,
    const std::optional<at::Tensor>& mem_v, const std::optional<at::Tensor>& cmem_k,
    const std::optional<at::Tensor>& cmem_v, const std::optional<at::Tensor>& mem_lens,
    const std::optional<at::Tensor>& cmem_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, const std::optional<at::Tensor>& rel_r, const std::optional<at::Tensor>& rel_u,
    const std::optional<at::Tensor>& rel_v, int64_t num_splits, at::Tensor& out) {
  TORCH_CHECK(q.is_cuda(), "decode_attention: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "decode_attention: q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, "decode_attention: q must be [B, n, H, D], got ", ct_kernels::shape(q.sizes()));
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(n >= 1 && n <= kMaxQueries, "decode_attention: q must hold 1..", ct_kernels::num(kMaxQueries),
              " queries (q.shape[1]), got ", ct_kernels::num(n));
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "decode_attention: head dim (q.shape[3]) must be 64 or 128, got ",
              ct_kernels::num(head_dim));
  TORCH_CHECK(batch * heads < (int64_t(1) << 30), "decode_attention: B * H too large");
  check_operand(q, "q", q, n);
  check_operand(k, "k", q, n);
  check_operand(v, "v", q, n);
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.device() == q.device() && out.sizes() == q.sizes() &&
                  out.is_contiguous() && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
              "decode_attention: out must be a contiguous, 16-byte-aligned ", q.scalar_type(), " tensor of shape ",
              ct_kernels::shape(q.sizes()),
              " on ", q.device());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "decode_attention: scale must be positive and finite, got ",
              ct_kernels::real(scale));
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "decode_attention: num_splits must lie in [0, ",
              ct_kernels::num(kMaxSplits), "] (0 = automatic), got ", ct_kernels::num(num_splits));

  DecodeParams p{};
  p.q = q.data_ptr();
  p.q_batch = q.stride(0), p.q_row = q.stride(1), p.q_head = q.stride(2);
  p.src[0] = make_source(cmem_k, cmem_v, cmem_lens, "cmem", q);
  p.src[1] = make_source(mem_k, mem_v, mem_lens, "mem", q);
  p.src[2] = make_source(k, v, std::nullopt, "segment", q);
  TORCH_CHECK(int64_t(p.src[0].size) + p.src[1].size + n < (int64_t(1) << 30), "decode_attention: too many keys");
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.device() == q.device() && mask.dim() == 2 &&
                    mask.size(0) == batch && mask.size(1) == n && mask.is_contiguous(),
                "decode_attention: key_padding_mask must be a contiguous bool [B, n] = ",
                ct_kernels::shape({batch, n}), " tensor on ", q.device(), ", got ", mask.scalar_type(), " ",
                ct_kernels::shape(mask.sizes()));
    p.key_padding = mask.data_ptr<bool>();
  }
  p.causal = causal;
  p.scale_log2 = float(scale) * kLog2e;

  const bool rel = rel_r.has_value();
  TORCH_CHECK(rel_u.has_value() == rel && rel_v.has_value() == rel,
              "decode_attention: rel_r, rel_u and rel_v must be given together");
  if (rel) {
    TORCH_CHECK(causal, "decode_attention: relative positions need causal=True");
    const at::Tensor &r = *rel_r, &u = *rel_u, &pv = *rel_v;
    const int64_t keys = p.src[0].size + p.src[1].size + n;
    auto check_rel = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), "decode_attention: ", name,
                  " must be a ", q.scalar_type(), " tensor on ", q.device());
      TORCH_CHECK(t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "decode_attention: ",
                  name, " must have a contiguous, 16-byte-aligned last dimension");
      for (int d = 0; d + 1 < t.dim(); ++d) {
        TORCH_CHECK(t.size(d) <= 1 || t.stride(d) % kElemsPerThread == 0, "decode_attention: ", name, ".stride(",
                    ct_kernels::num(d), ") must be a multiple of ", ct_kernels::num(kElemsPerThread));
      }
    };
    check_rel(r, "rel_r");
    check_rel(u, "rel_u");
    check_rel(pv, "rel_v");
    TORCH_CHECK(r.dim() == 3 && r.size(0) == heads && r.size(1) >= keys && r.size(2) == head_dim,
                "decode_attention: rel_r must be [H, R, D] = [", ct_kernels::num(heads), ", >=", ct_kernels::num(keys),
                ", ", ct_kernels::num(head_dim), "], got ", ct_kernels::shape(r.sizes()));
    TORCH_CHECK(u.dim() == 2 && u.size(0) == heads && u.size(1) == head_dim, "decode_attention: rel_u must be [H, D] = ",
                ct_kernels::shape({heads, head_dim}), ", got ", ct_kernels::shape(u.sizes()));
    TORCH_CHECK(pv.dim() == 2 && pv.size(0) == heads && pv.size(1) == head_dim,
                "decode_attention: rel_v must be [H, D] = ", ct_kernels::shape({heads, head_dim}), ", got ",
                ct_kernels::shape(pv.sizes()));
    p.rel_r = r.data_ptr(), p.r_head = r.stride(0), p.r_row = r.stride(1);
    p.rel_u = u.data_ptr(), p.u_head = u.stride(0);
    p.rel_v = pv.data_ptr(), p.v_head = pv.stride(0);
  }
  p.batch = int(batch), p.heads = int(heads), p.n = int(n);
  p.out = out.data_ptr();
  if (out.numel() == 0) return out;

  const c10::cuda::CUDAGuard device_guard(q.device());
  if (q.scalar_type() == at::kHalf) {
    head_dim == 64 ? launch_for_head_dim<__half, 64>(p, int(num_splits), rel, q)
                   : launch_for_head_dim<__half, 128>(p, int(num_splits), rel, q);
  } else {
    head_dim == 64 ? launch_for_head_dim<__nv_bfloat16, 64>(p, int(num_splits), rel, q)
                   : launch_for_head_dim<__nv_bfloat16, 128>(p, int(num_splits), rel, q);
  }
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mem_k, const std::optional<at::Tensor>& mem_v,
                            const std::optional<at::Tensor>& cmem_k, const std::optional<at::Tensor>& cmem_v,
                            const std::optional<at::Tensor>& mem_lens, const std::optional<at::Tensor>& cmem_lens,
                            const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
                            const std::optional<at::Tensor>& rel_r, const std::optional<at::Tensor>& rel_u,
                            const std::optional<at::Tensor>& rel_v, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4, "decode_attention: q must be [B, n, H, D], got ", ct_kernels::shape(q.sizes()));
  at::Tensor out = at::empty(q.sizes(), q.options());
  decode_attention_out(q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens, key_padding_mask, causal, scale,
                       rel_r, rel_u, rel_v, num_splits, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ct_kernels, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mem_k, Tensor? mem_v, Tensor? cmem_k, "
      "Tensor? cmem_v, Tensor? mem_lens, Tensor? cmem_lens, Tensor? key_padding_mask, bool causal, "
      "float scale, Tensor? rel_r, Tensor? rel_u, Tensor? rel_v, int num_splits=0) -> Tensor");
  m.def(
      "decode_attention.out(Tensor q, Tensor k, Tensor v, Tensor? mem_k, Tensor? mem_v, Tensor? cmem_k, "
      "Tensor? cmem_v, Tensor? mem_lens, Tensor? cmem_lens, Tensor? key_padding_mask, bool causal, "
      "float scale, Tensor? rel_r, Tensor? rel_u, Tensor? rel_v, int num_splits=0, *, Tensor(a!) out) "
      "-> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(ct_kernels, CUDA, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention.out", &decode_attention_out);
}
