// Does one warpgroup's elementwise work slow another warpgroup's wgmma stream on the same SM?
// (benchmarks/NOTES.md, Attention section 26.) One block per SM, two warpgroups; mode bits:
//   1  warpgroup 0 issues SS wgmma: 16 m64n64k16 per iteration, as S^T and dP^T of a tile
//   2  warpgroup 1 runs the sm_90 backward's elementwise step: per iteration 32 elements
//      (exp2, dS), packs, 16 4-byte shared stores, 8 16-byte shared loads, a proxy fence
//   4  warpgroup 1 issues the same SS wgmma stream (instead of the step)
//   8  warpgroup 0's stream is RS wgmma (A from registers) instead of SS
//   16, 32, 64  the step without its proxy fence, its shared stores, its shared loads
//   128  warpgroup 1 streams shared memory instead: per iteration 16 conflict-free 16-byte
//        loads per thread (32 KiB, half the bytes that warpgroup 0's 16 SS products read)
// Self-contained (nvcc only, no torch): on an sm_90 GPU
//   nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/probes/sm90_overlap.cu -o sm90_overlap && ./sm90_overlap
// prints the ms of each mode, twice (event-timed, after a warm-up launch), and the mean time
// each active warpgroup spent in its own loop (%globaltimer), which tells which one was slowed.
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdio>
#include <utility>

__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t leading, uint32_t stride) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(leading >> 4) << 16) | (uint64_t(stride >> 4) << 32) |
         (uint64_t(1) << 62);
}
#define ACC32(a)                                                                                         \
  "+f"(a[0]), "+f"(a[1]), "+f"(a[2]), "+f"(a[3]), "+f"(a[4]), "+f"(a[5]), "+f"(a[6]), "+f"(a[7]),      \
      "+f"(a[8]), "+f"(a[9]), "+f"(a[10]), "+f"(a[11]), "+f"(a[12]), "+f"(a[13]), "+f"(a[14]),          \
      "+f"(a[15]), "+f"(a[16]), "+f"(a[17]), "+f"(a[18]), "+f"(a[19]), "+f"(a[20]), "+f"(a[21]),        \
      "+f"(a[22]), "+f"(a[23]), "+f"(a[24]), "+f"(a[25]), "+f"(a[26]), "+f"(a[27]), "+f"(a[28]),        \
      "+f"(a[29]), "+f"(a[30]), "+f"(a[31])
__device__ __forceinline__ void ss(float (&d)[32], uint64_t a, uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,"
               "%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, 1, 1, 1, 0, 0;\n"
               : ACC32(d) : "l"(a), "l"(b));
}
__device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&p)[4], uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,"
               "%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, "
               "1, 1, 1, 0;\n"
               : ACC32(d) : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(b));
}
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&x);
}

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t)::"memory");
  return t;
}

template <int mode>
__global__ void __launch_bounds__(256, 1) probe(float* out, uint64_t* loop_ns, int mma_iters, int step_iters) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t s0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  for (int i = threadIdx.x; i < 65536 / 4; i += 256) reinterpret_cast<float*>(smem)[i] = 1e-3f * (i % 97);
  __syncthreads();
  const int wg = threadIdx.x / 128, x = threadIdx.x % 128, lane = threadIdx.x % 32, warp = x / 32;
  float a[32], b[32];
  for (int i = 0; i < 32; ++i) a[i] = b[i] = 1e-3f * (i + x);
  const bool mma = (wg == 0 && (mode & (1 | 8))) || (wg == 1 && (mode & 4));
  const uint64_t t0 = now_ns();
  if (mma) {
    const uint64_t ad = desc(s0, 0, 1024), bd = desc(s0 + 16384, 0, 1024);
    uint32_t p[4] = {pack(a[0], a[1]), pack(a[2], a[3]), pack(a[4], a[5]), pack(a[6], a[7])};
    for (int it = 0; it < mma_iters; ++it) {
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
      for (int kk = 0; kk < 8; ++kk) {
        const uint32_t step = ((kk / 4) * 8192 + (kk % 4) * 32) >> 4;
        if constexpr ((mode & 8) != 0) rs(a, p, bd + step), rs(b, p, bd + step);
        else ss(a, ad + step, bd + step), ss(b, ad + 2048 + step, bd + step);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
  } else if (wg == 1 && (mode & 128)) {
    for (int it = 0; it < step_iters; ++it) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        float4 v;
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                     : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                     : "r"(s0 + 32768 + uint32_t((128 * i + x) * 16)));
        a[i % 8] += v.x, a[8 + i % 8] += v.y, a[16 + i % 8] += v.z, a[24 + i % 8] += v.w;
      }
    }
  } else if (wg == 1 && (mode & 2)) {
    const float* stats = reinterpret_cast<const float*>(smem + 49152);
    const uint32_t tile = s0 + 32768 + 0;  // an 8 KiB dS^T tile
    for (int it = 0; it < step_iters; ++it) {
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int col = 8 * jj + 2 * (lane % 4);
        const float4 ld = (mode & 64) ? make_float4(0.5f, 0.25f, 0.125f, 0.0625f)
                                      : *reinterpret_cast<const float4*>(stats + col * 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& prob = a[4 * jj + e];
          prob = exp2f(fmaf(prob, 0.0883883f, -((e & 1) ? ld.y : ld.x)));
          b[4 * jj + e] = prob * (b[4 * jj + e] - ((e & 1) ? ld.w : ld.z));
        }
#pragma unroll
        for (int r = 0; r < 2 && !(mode & 32); ++r) {
          const int row = warp * 16 + lane / 4 + 8 * r;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(tile + row * 128 + ((jj ^ (row % 8)) * 16) + 4 * (lane % 4)),
                       "r"(pack(b[4 * jj + 2 * r], b[4 * jj + 2 * r + 1]))
                       : "memory");
        }
      }
      if constexpr (!(mode & 16)) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
  }
  if (x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(loop_ns + wg), now_ns() - t0);
  float sum = 0.f;
  for (int i = 0; i < 32; ++i) sum += a[i] + b[i];
  out[blockIdx.x * 256 + threadIdx.x] = sum;
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* out;
  uint64_t* loop_ns;  // per warpgroup: the sum over blocks of its loop's time
  cudaMalloc(&out, sms * 256 * sizeof(float));
  cudaMalloc(&loop_ns, 2 * sizeof(uint64_t));
  auto kernels = {std::pair{1, probe<1>}, {2, probe<2>}, {3, probe<3>}, {5, probe<5>}, {8, probe<8>},
                  {10, probe<10>}, {7, probe<7>}, {18, probe<18>}, {19, probe<19>}, {34, probe<34>},
                  {35, probe<35>}, {66, probe<66>}, {67, probe<67>}, {114, probe<114>}, {115, probe<115>},
                  {128, probe<128>}, {129, probe<129>}, {136, probe<136>}};
  for (auto [mode, k] : kernels) cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 65536);
  const int mma_iters = 20000, step_iters = 20000;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  for (int rep = 0; rep < 2; ++rep) {
    for (auto [mode, k] : kernels) {
      k<<<sms, 256, 65536>>>(out, loop_ns, mma_iters, step_iters);  // warm-up
      cudaMemset(loop_ns, 0, 2 * sizeof(uint64_t));
      cudaEventRecord(e0);
      k<<<sms, 256, 65536>>>(out, loop_ns, mma_iters, step_iters);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0.f;
      cudaEventElapsedTime(&ms, e0, e1);
      uint64_t ns[2];
      cudaMemcpy(ns, loop_ns, sizeof(ns), cudaMemcpyDeviceToHost);
      printf("mode %3d: %.3f ms; loops: warpgroup 0 %.3f ms, warpgroup 1 %.3f ms (%s)\n", mode, ms,
             ns[0] * 1e-6 / sms, ns[1] * 1e-6 / sms, cudaGetErrorString(cudaGetLastError()));
    }
  }
  return 0;
}
