// Shared pieces of the Hopper (sm_90a) kernels: element packing, mbarriers, TMA copies,
// warpgroup MMAs (wgmma) and their shared-memory descriptors, and the host side of the TMA
// maps. Tiles are [rows, D] of 2-byte elements (D = 128, or 64 in the attention forward),
// stored by the TMA as D / 64 boxes of 64 columns with the 128-byte swizzle.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>
#include "check_message.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace ct_kernels::sm90 {

constexpr int kHeadDim = 128;
constexpr int kQTileBytes = 64 * kHeadDim * 2;  // a [64, 128] tile (a warpgroup's rows), 16 KiB
constexpr int kBoxBytes = 64 * 128;              // a box of 64 rows x 64 columns, 8 KiB

// ---- element types -------------------------------------------------------------------------

// fp32 pairs to a packed pair of T (the lower column in the low half) and back
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  T2 x;
  if constexpr (std::is_same_v<T, __half>) {
    x = __floats2half2_rn(lo, hi);
  } else {
    x = __floats2bfloat162_rn(lo, hi);
  }
  return *reinterpret_cast<uint32_t*>(&x);
}
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  } else {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
}

// The warpgroup of this thread (blocks of two warpgroups) and its warp within the warpgroup,
// read from lane 0: the compiler then knows them to be the same across the warp and keeps
// what derives from them (the products' descriptors, tile addresses) in uniform registers
// instead of moving it there before every product. (The attention forward uses them; in the
// sm_90 backwards the same change measured no faster and spilled a register, benchmarks/
// NOTES.md, Attention section 30.)
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffff, int(threadIdx.x / 128), 0); }
__device__ __forceinline__ int warp_in_warpgroup() { return __shfl_sync(0xffffffff, int(threadIdx.x / 32 % 4), 0); }

// ---- TMA copies and mbarriers --------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// the one arrival of a phase, announcing the bytes the copies will bring
__device__ __forceinline__ void barrier_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t phase) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
  }
}
// a box of 64 columns at (column, head, row, batch) of a 4-d map; rows past the
// tensor's end arrive as zeros
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int col, int head, int row,
                                         int batch, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(head), "r"(row), "r"(batch), "r"(bar)
      : "memory");
}
// the kBoxes 64-column boxes of a [rows, 64 kBoxes] tile, box_bytes apart (the map's box has
// the rows)
template <int kBoxes>
__device__ __forceinline__ void tma_load_boxes(uint32_t dst, uint32_t box_bytes, const CUtensorMap* map, int head,
                                               int row, int batch, uint32_t bar) {
#pragma unroll
  for (int i = 0; i < kBoxes; ++i) tma_load(dst + i * box_bytes, map, 64 * i, head, row, batch, bar);
}
// both column halves of a [rows, 128] tile
__device__ __forceinline__ void tma_load_tile(uint32_t dst, uint32_t half_bytes, const CUtensorMap* map, int head,
                                              int row, int batch, uint32_t bar) {
  tma_load_boxes<2>(dst, half_bytes, map, head, row, batch, bar);
}

// a box of 64 columns from shared memory to (column, head, row, batch) of a 4-d map; rows
// past the tensor's end are not written
__device__ __forceinline__ void tma_store(const CUtensorMap* map, uint32_t src, int col, int head, int row,
                                          int batch) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(col), "r"(head), "r"(row), "r"(batch)
               : "memory");
}

// ---- warpgroup MMA -------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Tells the compiler that the accumulators change here (an async MMA writes them until the
// wait), so it neither reads them earlier nor keeps copies across the wait.
template <int N>
__device__ __forceinline__ void touch(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

template <typename T>
struct Mma;

#define CT_WGMMA_SS_64x64(TY)                                                                          \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                              \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,"  \
  "%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n"
#define CT_WGMMA_SS_64x32_MN(TY)                                                                       \
  "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY                                              \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 1, 1;\n"
#define CT_WGMMA_SS_64x128(TY)                                                                         \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                                             \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,"  \
  "%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,"  \
  "%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n"
#define CT_WGMMA_SS_64x128_B_MN(TY)                                                                    \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                                             \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,"  \
  "%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,"  \
  "%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, 1, 1, 1, 0, 1;\n"
#define CT_WGMMA_RS_64x64(TY)                                                                          \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                              \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,"  \
  "%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 1;\n"
#define CT_WGMMA_RS_64x128(TY)                                                                         \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                                             \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,"  \
  "%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,"  \
  "%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 1, 1, 1, 1;\n"

#define CT_WGMMA_RS_64x64_K(TY)                                                                        \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                              \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,"  \
  "%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n"

#define CT_ACC16(a)                                                                                   \
  "+f"(a[0]), "+f"(a[1]), "+f"(a[2]), "+f"(a[3]), "+f"(a[4]), "+f"(a[5]), "+f"(a[6]), "+f"(a[7]),   \
      "+f"(a[8]), "+f"(a[9]), "+f"(a[10]), "+f"(a[11]), "+f"(a[12]), "+f"(a[13]), "+f"(a[14]),       \
      "+f"(a[15])

#define CT_ACC32(a)                                                                                   \
  CT_ACC16(a), "+f"(a[16]), "+f"(a[17]), "+f"(a[18]), "+f"(a[19]), "+f"(a[20]), "+f"(a[21]),     \
      "+f"(a[22]), "+f"(a[23]), "+f"(a[24]), "+f"(a[25]), "+f"(a[26]), "+f"(a[27]), "+f"(a[28]),     \
      "+f"(a[29]), "+f"(a[30]), "+f"(a[31])

#define CT_ACC64(a)                                                                                   \
  CT_ACC32(a), "+f"(a[32]), "+f"(a[33]), "+f"(a[34]), "+f"(a[35]), "+f"(a[36]), "+f"(a[37]),          \
      "+f"(a[38]), "+f"(a[39]), "+f"(a[40]), "+f"(a[41]), "+f"(a[42]), "+f"(a[43]), "+f"(a[44]),     \
      "+f"(a[45]), "+f"(a[46]), "+f"(a[47]), "+f"(a[48]), "+f"(a[49]), "+f"(a[50]), "+f"(a[51]),     \
      "+f"(a[52]), "+f"(a[53]), "+f"(a[54]), "+f"(a[55]), "+f"(a[56]), "+f"(a[57]), "+f"(a[58]),     \
      "+f"(a[59]), "+f"(a[60]), "+f"(a[61]), "+f"(a[62]), "+f"(a[63])

#define CT_DEFINE_MMA(T, TY)                                                                          \
  template <>                                                                                         \
  struct Mma<T> {                                                                                     \
    /* s[64x64] (+)= A[64x16] B[16x64], both from shared memory; accumulate=0 overwrites */          \
    static __device__ __forceinline__ void scores(float (&s)[32], uint64_t a, uint64_t b,            \
                                                  int accumulate) {                                   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" CT_WGMMA_SS_64x64(TY) "}\n"           \
                   : CT_ACC32(s)                                                                      \
                   : "l"(a), "l"(b), "r"(accumulate));                                                \
    }                                                                                                 \
    /* s[64x64] (+)= A[64x16] (registers) B[16x64] (shared memory, K-major); accumulate=0 */       \
    /* overwrites */                                                                                  \
    static __device__ __forceinline__ void scores(float (&s)[32], const uint32_t (&a)[4], uint64_t b, \
                                                  int accumulate) {                                   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" CT_WGMMA_RS_64x64_K(TY) "}\n"       \
                   : CT_ACC32(s)                                                                      \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));            \
    }                                                                                                 \
    /* d[64x32] (+)= A[64x16] B[16x32], both from shared memory stored MN-major (rows of the */  \
    /* k dimension) */                                                                                \
    static __device__ __forceinline__ void mn_major(float (&d)[16], uint64_t a, uint64_t b,          \
                                                    int accumulate) {                                 \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" CT_WGMMA_SS_64x32_MN(TY) "}\n"        \
                   : CT_ACC16(d)                                                                      \
                   : "l"(a), "l"(b), "r"(accumulate));                                                \
    }                                                                                                 \
    /* s[64x128] (+)= A[64x16] B[16x128], both from shared memory */                                 \
    static __device__ __forceinline__ void scores(float (&s)[64], uint64_t a, uint64_t b,            \
                                                  int accumulate) {                                   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" CT_WGMMA_SS_64x128(TY) "}\n"          \
                   : CT_ACC64(s)                                                                      \
                   : "l"(a), "l"(b), "r"(accumulate));                                                \
    }                                                                                                 \
    /* g[64x128] += A[64x16] (K-major) B[16x128] (MN-major), both from shared memory */         \
    static __device__ __forceinline__ void gradients(float (&g)[64], uint64_t a, uint64_t b) {     \
      asm volatile(CT_WGMMA_SS_64x128_B_MN(TY) : CT_ACC64(g) : "l"(a), "l"(b));                     \
    }                                                                                                 \
    /* o[64x128] += P[64x16] (registers) V[16x128] (shared memory, rows of V = keys) */              \
    static __device__ __forceinline__ void values(float (&o)[64], const uint32_t (&p)[4],           \
                                                  uint64_t b) {                                       \
      asm volatile(CT_WGMMA_RS_64x128(TY)                                                             \
                   : CT_ACC64(o)                                                                      \
                   : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(b));                            \
    }                                                                                                 \
    /* o[64x64] += P[64x16] (registers) V[16x64] (shared memory, rows of V = keys) */                \
    static __device__ __forceinline__ void values(float (&o)[32], const uint32_t (&p)[4],           \
                                                  uint64_t b) {                                       \
      asm volatile(CT_WGMMA_RS_64x64(TY)                                                              \
                   : CT_ACC32(o)                                                                      \
                   : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(b));                            \
    }                                                                                                 \
  };

CT_DEFINE_MMA(__nv_bfloat16, "bf16")
CT_DEFINE_MMA(__half, "f16")

// ---- accumulators and shared-memory operands --------------------------------------------

// Accumulator layout of an m64nN wgmma (per thread, warp w of the warpgroup, lane l):
// element 4j + e sits at row 16w + l/4 + 8 (e >= 2), column 8j + 2 (l % 4) + (e & 1).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Shared-memory matrix descriptor with the 128-byte swizzle; leading/stride byte offsets.
// Adding (bytes >> 4) to it moves its start address.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t leading, uint32_t stride) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(leading >> 4) << 16) |
         (uint64_t(stride >> 4) << 32) | (uint64_t(1) << 62);
}

// Descriptor step (in 16-byte units) to k-step kk of a K-major [rows, 128] tile stored as two
// 64-column boxes of box_bytes each: +32 bytes per 16 columns, the second 64 columns a box
// further.
__device__ __forceinline__ uint32_t k_step(int kk, uint32_t box_bytes) {
  return ((kk / 4) * box_bytes + (kk % 4) * 32) >> 4;
}

// Byte offset of 16-byte chunk `chunk` (columns 8 chunk..8 chunk + 7, 0..15) of row `row` in
// a [64, 128] tile of 2-byte elements in the TMA maps' layout: two 64-column boxes, 128-byte
// rows, chunk c of row x stored at chunk c ^ (x % 8) (a [64, 64] tile: chunks 0..7 only)
__device__ __forceinline__ uint32_t swizzled_chunk(int row, int chunk) {
  return (chunk / 8) * (kQTileBytes / 2) + row * 128 + (((chunk % 8) ^ (row % 8)) * 16);
}
// Byte offset of a thread's 4-byte column pair in that layout. chunk: the accumulator's
// 8-column group j (0..15) of that row.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk, int lane) {
  return swizzled_chunk(row, chunk) + 4 * (lane % 4);
}

// An m64nN accumulator (fp32) as the A operand of a register-A wgmma over its N columns:
// packed pairs, k-step kk in a[4kk..4kk+3]; pack_chunk does the 8 columns of group j
template <typename T, int N>
__device__ __forceinline__ void pack_chunk(const float (&acc)[N], uint32_t (&a)[N / 2], int j) {
  a[2 * j] = pack<T>(acc[4 * j], acc[4 * j + 1]);
  a[2 * j + 1] = pack<T>(acc[4 * j + 2], acc[4 * j + 3]);
}
template <typename T, int N>
__device__ __forceinline__ void pack_operand(const float (&acc)[N], uint32_t (&a)[N / 2]) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) pack_chunk<T>(acc, a, j);
}

// ---- block order ---------------------------------------------------------------------------

// The work of a grid whose blocks do per_bh items of one batch-head each, numbered longest
// first within the batch-head, in windows of `window` batch-heads: inside a window the i-th
// items of all its batch-heads come before the (i + 1)-th. In batch-head order the last
// blocks launched include each batch-head's longest, which leave SMs idle while they finish;
// so the longest items go first, and the window (chosen on the host to fit in L2, block_window)
// keeps the keys its blocks share in L2.
struct BlockWork {
  int bh, item;
};
__device__ __forceinline__ BlockWork block_work(int block, int per_bh, int window, int batch_heads) {
  const int per_window = window * per_bh;
  const int first_bh = block / per_window * window, r = block % per_window;
  const int width = min(window, batch_heads - first_bh);
  return {first_bh + r % width, r / width};
}

// ---- key-major backward pieces (dK and dV of 64 keys per warpgroup) ----------------------

// Shared memory of a block of two warpgroups of 64 keys each: its K and V tiles (key_offset,
// value_offset: [64, 128] per warpgroup), a ring of Q and dO (or diff) tiles (query_offset,
// dout_offset: one [64, 128] tile per stage) and their mbarriers: kv_bar for K and V, then
// one per stage (full) at kv_bar + 8 + 8 stage, with a counter of releases per stage.
__device__ __forceinline__ uint32_t stage_full(uint32_t kv_bar, int stage) { return kv_bar + 8 + 8 * stage; }

// (one thread) the barriers and release counters of a block's ring of `stages` stages
__device__ __forceinline__ void init_key_block_barriers(uint32_t kv_bar, int stages, int* releases) {
  barrier_init(kv_bar, 1);
  for (int stage = 0; stage < stages; ++stage) {
    barrier_init(stage_full(kv_bar, stage), 1);
    releases[stage] = 0;
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// (one thread) K and V of both warpgroups: rows key0.. of head h, batch b
__device__ __forceinline__ void load_key_block(uint32_t k_tiles, uint32_t v_tiles, const CUtensorMap* k_map,
                                               const CUtensorMap* v_map, int h, int key0, int b, uint32_t kv_bar) {
  barrier_expect(kv_bar, 4 * kQTileBytes);
  for (int g = 0; g < 2; ++g) {
    tma_load_tile(k_tiles + g * kQTileBytes, kQTileBytes / 2, k_map, h, key0 + 64 * g, b, kv_bar);
    tma_load_tile(v_tiles + g * kQTileBytes, kQTileBytes / 2, v_map, h, key0 + 64 * g, b, kv_bar);
  }
}

// Both warpgroups are done with query tile j's ring stage: the second to say so (one thread of
// its warpgroup, `issuer`) refills the stage with tile j + stages by load(j + stages). The count
// is a plain shared-memory atomic (atomicAdd would add a warp-aggregation sequence around it).
template <typename Load>
__device__ __forceinline__ void release_stage(int* releases, int j, int stages, int tiles, bool issuer, Load&& load) {
  if (issuer) {
    int before;
    asm volatile("atom.shared.add.u32 %0, [%1], 1;\n" : "=r"(before) : "r"(smem_addr(&releases[j % stages])) : "memory");
    if (before % 2 == 1 && j + stages < tiles) load(j + stages);
  }
}

// The two warpgroups take turns issuing their products (named barrier 3 + w: warpgroup w's
// turn), so that one's elementwise work runs while the tensor cores do the other's products.
__device__ __forceinline__ void take_turn(int wg) { asm volatile("bar.sync %0, 256;\n" ::"r"(3 + wg) : "memory"); }
__device__ __forceinline__ void pass_turn(int wg) { asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - wg) : "memory"); }

// Descriptors of warpgroup wg's operands: K, V, Q and dO as K-major operands of the score
// products (rows of the head dim; Q and dO at the ring's stage 0); Q and dO as MN-major B
// operands of dK and dV (rows of queries: +2048 bytes per 16 queries, the two column halves a
// box apart)
struct KeyMajorOperands {
  uint64_t k, v, q, dout, q_mn, dout_mn;
};
__device__ __forceinline__ KeyMajorOperands key_major_operands(uint32_t k_tiles, uint32_t v_tiles, uint32_t q_ring,
                                                               uint32_t dout_ring, int wg) {
  return {descriptor(k_tiles + wg * kQTileBytes, 0, 1024), descriptor(v_tiles + wg * kQTileBytes, 0, 1024),
          descriptor(q_ring, 0, 1024),
          descriptor(dout_ring, 0, 1024),
          descriptor(q_ring, kQTileBytes / 2, 1024),
          descriptor(dout_ring, kQTileBytes / 2, 1024)};
}

// S^T = K Q^T and dP^T = V dO^T of a [64 keys, 64 queries] tile, over the head dim: K, V, Q
// and dO as K-major [64, 128] tiles (descriptors at their starts)
template <typename T>
__device__ __forceinline__ void key_major_scores(float (&s)[32], float (&dp)[32], uint64_t k, uint64_t v,
                                                 uint64_t q, uint64_t dout) {
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    Mma<T>::scores(s, k + k_step(kk, kQTileBytes / 2), q + k_step(kk, kQTileBytes / 2), kk);
  }
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    Mma<T>::scores(dp, v + k_step(kk, kQTileBytes / 2), dout + k_step(kk, kQTileBytes / 2), kk);
  }
}

// acc [64 keys, 128] += A^T B over 64 queries: A^T packed in registers (pack_operand of a
// [64 keys, 64 queries] accumulator), B an MN-major [64 queries, 128] tile (k-step kk:
// queries 16kk..16kk+15, 2048 bytes further)
template <typename T>
__device__ __forceinline__ void key_major_gradient(float (&acc)[64], const uint32_t (&a)[16], uint64_t b) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t step[4] = {a[4 * kk], a[4 * kk + 1], a[4 * kk + 2], a[4 * kk + 3]};
    Mma<T>::values(acc, step, b + (kk * 2048 >> 4));
  }
}

// acc * coef in the input type over a warpgroup's [64, N / 2] tile at `tile` (N: the m64 accumulator's
// registers), in the TMA maps' swizzle (swizzled_offset); the caller fences before a TMA store reads it
template <typename T, int N>
__device__ __forceinline__ void write_tile(const float (&acc)[N], float coef, uint32_t tile, int warp, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int tile_row = warp * 16 + lane / 4 + 8 * r;
#pragma unroll
    for (int jj = 0; jj < N / 4; ++jj) {
      const int i = 4 * jj + 2 * r;
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(tile + swizzled_offset(tile_row, jj, lane)),
                   "r"(pack<T>(acc[i] * coef, acc[i + 1] * coef))
                   : "memory");
    }
  }
}

// dK * k_coef and dV * v_coef over a warpgroup's tiles at dk_tile and dv_tile, for a TMA store
template <typename T>
__device__ __forceinline__ void write_key_gradients(const float (&dk)[64], const float (&dv)[64], float k_coef,
                                                    float v_coef, uint32_t dk_tile, uint32_t dv_tile, int warp,
                                                    int lane) {
  write_tile<T>(dk, k_coef, dk_tile, warp, lane);
  write_tile<T>(dv, v_coef, dv_tile, warp, lane);
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the writes, visible to the TMA
}

// The TMA stores of a warpgroup's dK and dV tiles (written by write_key_gradients) to rows
// row.. of head h, batch b of the gradients' maps, as one bulk group of the calling thread
__device__ __forceinline__ void store_key_gradients(const CUtensorMap* dk_map, const CUtensorMap* dv_map,
                                                    uint32_t dk_tile, uint32_t dv_tile, int h, int row, int b) {
  for (int half = 0; half < 2; ++half) {
    tma_store(dk_map, dk_tile + half * (kQTileBytes / 2), 64 * half, h, row, b);
    tma_store(dv_map, dv_tile + half * (kQTileBytes / 2), 64 * half, h, row, b);
  }
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// ---- host ----------------------------------------------------------------------------------

// t: [B, S, H, D] with q's B, H and D, q's dtype and device, at least one row
inline void check_input(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(2) == q.size(2) && t.size(3) == q.size(3),
              op, ": ", name, " must be [B, S, H, ", ct_kernels::num(q.size(3)), "] with B, H as q's ",
              ct_kernels::shape(q.sizes()), ", got ", ct_kernels::shape(t.sizes()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), op, ": ", name,
              " must be a ", q.scalar_type(), " tensor on ", q.device(), ", got ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK(t.size(1) >= 1, op, ": ", name, " needs at least one row");
}

// q: a [B, n, H, 128] (or, with head_dim_64, [B, n, H, 64]) bfloat16 or float16 CUDA tensor
inline void check_q(const char* op, const at::Tensor& q, bool head_dim_64 = false) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4 && (q.size(3) == kHeadDim || (head_dim_64 && q.size(3) == 64)), op,
              ": q must be [B, n, H, ", head_dim_64 ? "64 or 128" : "128", "], got ", ct_kernels::shape(q.sizes()));
  check_input(op, q, "q", q);
}

// the current device's properties, which must be those of an sm_90 GPU
inline const cudaDeviceProp* sm90_properties(const char* op) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major == 9 && props->minor == 0, op, ": needs an sm_90 GPU, got sm_",
              ct_kernels::num(props->major * 10 + props->minor));
  return props;
}

// t itself where the TMA can read it (16-byte-aligned start and row strides), else a
// contiguous copy
inline at::Tensor rows_aligned(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// cuTensorMapEncodeTiled from the driver (the extension links the runtime only)
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "ct_kernels: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A TMA map of a [B, S, H, D] tensor (checked by check_input, D = 64 or 128) as the 4-d array
// (column, head, row, batch): boxes of 64 columns x box_rows rows of one head, 128-byte
// swizzle.
inline void make_map(CUtensorMap& map, const at::Tensor& t, int box_rows) {
  const cuuint64_t dims[4] = {cuuint64_t(t.size(3)), cuuint64_t(t.size(2)), cuuint64_t(t.size(1)),
                              cuuint64_t(t.size(0))};
  // byte strides of dims 1..3; a dimension of size 1 takes the next-inner extent (any
  // multiple of 16 would do)
  cuuint64_t strides[3];
  cuuint64_t extent = cuuint64_t(t.size(3)) * 2;
  for (int d = 0; d < 3; ++d) {
    const int dim = 2 - d;  // head, row, batch
    strides[d] = t.size(dim) == 1 ? extent : cuuint64_t(t.stride(dim)) * 2;
    extent = strides[d] * dims[d + 1];
  }
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode_tiled()(
      &map, t.scalar_type() == at::kHalf ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
      t.data_ptr(), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "ct_kernels: cuTensorMapEncodeTiled failed with error ",
              ct_kernels::num(int64_t(result)), " for a tensor of shape ", ct_kernels::shape(t.sizes()));
}

// The batch-heads of a block_work window whose blocks share bytes_per_bh of data each (what
// all of a batch-head's blocks read): the largest power of two of them that fits in the L2
inline int64_t l2_window(const cudaDeviceProp* props, int64_t bytes_per_bh) {
  const int64_t fit = int64_t(props->l2CacheSize) / std::max<int64_t>(bytes_per_bh, 1);
  int64_t window = 1;
  while (2 * window <= fit) window *= 2;
  return window;
}
// a block_work window of `window` batch-heads, at least one, at most all
inline int block_window(int64_t window, int64_t batch_heads) {
  return int(std::clamp<int64_t>(window, 1, batch_heads));
}

// kernel<<<blocks, threads, smem_bytes, stream>>>(args...) as a programmatic dependent of the
// kernel launched before it on the stream: it may start once every block of that kernel has
// run griddepcontrol.launch_dependents (or ended), and waits for that kernel's results with
// griddepcontrol.wait where it reads them
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), int blocks, int threads, int smem_bytes, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks), config.blockDim = dim3(threads), config.dynamicSmemBytes = smem_bytes;
  config.stream = stream, config.attrs = &dependent, config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// run(T{}) with T the CUDA type of q's dtype (float16 or bfloat16, as check_q requires)
template <typename Run>
void with_element_type(const at::Tensor& q, Run&& run) {
  if (q.scalar_type() == at::kHalf) {
    run(__half{});
  } else {
    run(__nv_bfloat16{});
  }
}

// t: a contiguous tensor of exactly this shape and dtype on q's device
inline void check_exact(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                 at::ScalarType dtype, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.device() == q.device() && t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dtype, " tensor of shape ",
              ct_kernels::shape(shape), " on ", q.device(), ", got ", t.scalar_type(), " ",
              ct_kernels::shape(t.sizes()), " on ", t.device());
}

}  // namespace ct_kernels::sm90
