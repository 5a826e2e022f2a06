// Reconstruction loss for Hopper (sm_90a). Forward: both attentions of a query tile on
// warpgroup MMAs (wgmma), the squared difference summed per work item, then into the loss by
// a one-block kernel that launches as the forward's programmatic dependent. Backward: dK and
// dV of the compressed keys and values (see "backward" below).
//
//   loss = mean((attn(q, old_k, old_v) - attn(q, comp_k, comp_v))^2)
//
// Persistent blocks, as many as the SMs hold at once, each taking (query tile, batch, head)
// work items in turn: one or two consumer warpgroups of 64 query rows each, and a producer
// warpgroup. The key tiles of both attentions (old first, then compressed) stream through
// two rings of shared-memory stages (K and V) that the tensor memory accelerator (TMA)
// fills: one producer thread issues the copies as soon as the consumers have released a
// stage (an mbarrier per stage each way), so the consumer warps never wait on each other,
// and the next item's first tiles arrive while the consumers finish the current one. Per
// key tile t, in each consumer warpgroup:
//   S_t = Q K_t^T            (wgmma, Q and K from shared memory)
//   O rescaled by the softmax of tile t - 1, while the tensor cores do S_t
//   O  += P_{t-1} V_{t-1}    (wgmma, P from registers), issued right after, so that the
//                             softmax of tile t runs while the tensor cores do P V
//   online softmax of S_t in the log2 domain -> P_t; a row's running maximum moves only
//   when a tile's exceeds it by more than 8 (a factor 256), so O is rarely rescaled
// The TMA writes the tiles with the 128-byte swizzle that the wgmma descriptors name, and
// stores diff from shared memory at the end.
//
// Outputs match the Triton forward (ct_kernels/ops/recon_loss.py): the loss in the input
// dtype, one fp32 partial of the mean per item; with save_for_backward also
// diff = O_old - O_comp in the input dtype ([B, n, H, D] contiguous), the compressed
// attention's log2-domain LSE and delta = rowsum(diff * O_comp) ([B, H, n] fp32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>
#include <torch/library.h>
#include "sm90.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace ct_kernels::recon_sm90 {

using namespace ct_kernels::sm90;

// A block of WarpGroups consumer warpgroups (64 query rows each) and one producer
// warpgroup; K and V rings of Stages tiles of BlockN keys each. The producer gives its
// registers to the consumers (setmaxnreg): with one consumer warpgroup two blocks share an
// SM. With 128-key tiles the old attention's output waits in shared memory (fp32) instead of
// registers.
template <int WarpGroups, int Stages, int BlockN>
struct Shape {
  static constexpr int kWarpGroups = WarpGroups, kStages = Stages, kBlockN = BlockN;
  static_assert(Stages >= 2 && Stages <= 3);
  static constexpr int kBlockM = 64 * WarpGroups;
  static constexpr int kTileBytes = BlockN * kHeadDim * 2;  // a [BlockN, 128] K or V tile
  static constexpr int kHalfBytes = kTileBytes / 2;         // one TMA box: 64 of its columns
  static constexpr bool kOldInSmem = BlockN == 128;
  static constexpr int kConsumers = 128 * WarpGroups;
  static constexpr int kThreads = kConsumers + 128;
  static constexpr int kBlocksPerSm = WarpGroups == 1 ? 2 : 1;
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = WarpGroups == 1 ? 232 : 240;
  static constexpr int kQBytes = WarpGroups * kQTileBytes;
  static constexpr int kKOffset = kQBytes;
  static constexpr int kVOffset = kKOffset + Stages * kTileBytes;
  // mbarriers: the query tile full and empty; per stage K full, V full, K empty, V empty
  static constexpr int kBarrierOffset = kVOffset + Stages * kTileBytes;
  static constexpr int kSumsOffset = kBarrierOffset + 8 * (2 + 4 * Stages);  // one float per consumer warp
  static constexpr int kOldOffset = kSumsOffset + 4 * 4 * WarpGroups;
  static constexpr int kSmemBytes = kOldOffset + (kOldInSmem ? kConsumers * 64 * 4 : 0);
};

struct ReconParams {
  CUtensorMap q_map;     // [B, n, H, 128] viewed as 4-d, boxes of 64 rows x 64 columns
  CUtensorMap k_map[2];  // old, compressed
  CUtensorMap v_map[2];
  CUtensorMap diff_map;  // [B, n, H, 128] like q (written only with save_for_backward)
  int keys[2];           // ns, nc
  int heads, n;
  int tiles_m, items;    // query tiles per (batch, head); work items: tiles_m x B x H
  float qk_scale;        // softmax scale * log2(e)
  float inv_numel;
  float* partial;        // [B * H * tiles_m], item by item
  bool save;             // write diff, lse and delta
  float* lse;            // [B, H, n]
  float* delta;          // [B, H, n]
};

// ---- forward -------------------------------------------------------------------------------

template <typename T, typename S>
__global__ void __launch_bounds__(S::kThreads, S::kBlocksPerSm) recon_loss_fwd_sm90_kernel(const __grid_constant__ ReconParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStages = S::kStages, kBlockN = S::kBlockN, kTileBytes = S::kTileBytes;
  constexpr int kHalfBytes = S::kHalfBytes;
  // the swizzle pattern repeats every 1024 bytes: the tiles start at a multiple of it
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t smem0 = smem_addr(smem_raw);
  if (smem0 % 1024 != 0) __trap();
  const uint32_t q_bar = smem0 + S::kBarrierOffset;
  const uint32_t q_empty = q_bar + 8;
  auto k_bar = [&](int stage) { return q_bar + 16 + 8 * stage; };
  auto v_bar = [&](int stage) { return q_bar + 16 + 8 * (kStages + stage); };
  auto k_empty = [&](int stage) { return q_bar + 16 + 8 * (2 * kStages + stage); };
  auto v_empty = [&](int stage) { return q_bar + 16 + 8 * (3 * kStages + stage); };
  float* warp_sums = reinterpret_cast<float*>(smem_raw + S::kSumsOffset);

  // Persistent: work item i (query tile i % tiles_m of batch-head i / tiles_m) is the
  // block's when i % gridDim.x == blockIdx.x; the key tiles of consecutive items run through
  // the same rings without a break.
  struct Item {
    int bh, b, h, row0;  // batch-head, batch, head, first query row
  };
  auto locate = [&](int item) {
    const int bh = item / p.tiles_m;
    return Item{bh, bh / p.heads, bh % p.heads, (item % p.tiles_m) * S::kBlockM};
  };
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int tiles_old = (p.keys[0] + kBlockN - 1) / kBlockN;
  const int tiles = tiles_old + (p.keys[1] + kBlockN - 1) / kBlockN;
  // key tile t: its first key within its source (old, then compressed)
  auto tile_start = [&](int t) { return (t < tiles_old ? t : t - tiles_old) * kBlockN; };

  if (threadIdx.x == 0) {
    barrier_init(q_bar, 1);
    barrier_init(q_empty, S::kWarpGroups);
    for (int stage = 0; stage < kStages; ++stage) {
      barrier_init(k_bar(stage), 1), barrier_init(v_bar(stage), 1);
      barrier_init(k_empty(stage), S::kConsumers / 32), barrier_init(v_empty(stage), S::kConsumers / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the barriers are initialised before anyone waits on them
  // the sum of the partials may launch now (it waits for this grid to finish)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");

  if (threadIdx.x >= S::kConsumers) {
    // the producer warpgroup (one thread of it): per item the query tile and K and V of
    // every key tile, each copy as soon as the consumers have released its buffer. From the
    // second item on, the key tiles whose ring slots free first go before the query tile;
    // the slot of the previous item's last tile frees only once diff has been stored from it.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(S::kProducerRegisters));
    if (threadIdx.x == S::kConsumers) {
      int ring = 0;  // key tiles issued so far, over all items
      int k = 0;     // items of this block so far
      for (int item = blockIdx.x; item < p.items; item += gridDim.x, ++k) {
        const auto [bh, b, h, row0] = locate(item);
        // an item has at least two key tiles (both sources hold a key)
        const int q_after = k == 0 ? 0 : std::min(kStages - 1, tiles - 1);
        for (int t = 0; t < tiles; ++t, ++ring) {
          if (t == q_after) {
            if (k > 0) barrier_wait(q_empty, (k - 1) & 1);
            barrier_expect(q_bar, S::kQBytes);
            for (int g = 0; g < S::kWarpGroups; ++g) {
              tma_load_tile(smem0 + g * kQTileBytes, kQTileBytes / 2, &p.q_map, h, row0 + 64 * g, b, q_bar);
            }
          }
          const int stage = ring % kStages, round = ring / kStages;
          const int source = t >= tiles_old;
          if (round > 0) barrier_wait(k_empty(stage), (round - 1) & 1);
          barrier_expect(k_bar(stage), kTileBytes);
          tma_load_tile(smem0 + S::kKOffset + stage * kTileBytes, kHalfBytes, &p.k_map[source], h, tile_start(t), b,
                        k_bar(stage));
          if (round > 0) barrier_wait(v_empty(stage), (round - 1) & 1);
          barrier_expect(v_bar(stage), kTileBytes);
          tma_load_tile(smem0 + S::kVOffset + stage * kTileBytes, kHalfBytes, &p.v_map[source], h, tile_start(t), b,
                        v_bar(stage));
        }
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(S::kConsumerRegisters));

  float o[64];        // running P V of the attention in progress (fp32)
  float o_old[S::kOldInSmem ? 1 : 64];  // the old attention's output, once finished
  float s[kBlockN / 2];                 // scores of the current tile, then its probabilities
  uint32_t pk[kBlockN / 4];             // previous tile's probabilities, packed pairs (A of P V)
  // the old attention's output in shared memory: element i of consumer thread x at [i][x]
  float* old_smem = reinterpret_cast<float*>(smem_raw + S::kOldOffset) + threadIdx.x;
  float m[2];   // running maxima of rows l/4 and l/4 + 8 (log2 domain)
  float l[2];   // this thread's share of the running sums
  float l_old[2];

  // descriptors: Q and K are K-major (rows of the head dim; +32 bytes per 16 columns, the
  // second 64 columns a box further); V is MN-major (rows of keys: +2048 bytes per 16 keys,
  // its two column halves a box apart)
  const uint64_t q_desc = descriptor(smem0 + wg * kQTileBytes, 0, 1024);
  const uint64_t k_desc = descriptor(smem0 + S::kKOffset, 0, 1024);
  const uint64_t v_desc = descriptor(smem0 + S::kVOffset, kHalfBytes, 1024);
  // a consumer warp is done with a ring stage: the producer may refill it
  auto release = [&](uint32_t empty_bar) {
    if (lane == 0) barrier_arrive(empty_bar);
  };
  // key tile t of the current item sits in ring slot ring0 + t
  int ring0 = 0;
  auto issue_scores = [&](int t) {
    const int slot = ring0 + t;
    barrier_wait(k_bar(slot % kStages), (slot / kStages) & 1);
    const uint64_t k_stage = k_desc + ((slot % kStages) * kTileBytes >> 4);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      Mma<T>::scores(s, q_desc + k_step(kk, kQTileBytes / 2), k_stage + k_step(kk, kHalfBytes), kk);
    }
    wgmma_commit();
  };
  // V of tile t in its ring stage (waited for separately, see the loop)
  auto wait_values = [&](int t) {
    const int slot = ring0 + t;
    barrier_wait(v_bar(slot % kStages), (slot / kStages) & 1);
  };
  auto issue_values = [&](int t) {
    const uint64_t v_stage = v_desc + (((ring0 + t) % kStages) * kTileBytes >> 4);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]};
      Mma<T>::values(o, a, v_stage + (kk * 2048 >> 4));
    }
    wgmma_commit();
  };
  auto k_empty_of = [&](int t) { return k_empty((ring0 + t) % kStages); };
  auto v_empty_of = [&](int t) { return v_empty((ring0 + t) % kStages); };
  // online softmax of S_t (log2 domain): -inf past a partial tile's keys, new row maxima,
  // probabilities in s, the running sums; the rescale factors of O in alpha
  constexpr float kMaxSlack = 8.f;
  auto softmax = [&](int t, float (&alpha)[2]) {
    const int valid = (t >= tiles_old ? p.keys[1] : p.keys[0]) - tile_start(t);
    if (valid < kBlockN) {
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i) {
        const int col = 8 * (i / 4) + 2 * (lane % 4) + (i & 1);
        if (col >= valid) s[i] = -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      // The running maximum moves only where the tile's exceeds it by more than kMaxSlack:
      // the probabilities then stay below 2^kMaxSlack (exact enough in fp32 and in the P V
      // operand's type, whose relative precision does not depend on the magnitude), and O
      // needs no rescale on most tiles.
      const float tile_max = quad_max(mx) * p.qk_scale;
      const float m_new = tile_max > m[r] + kMaxSlack ? tile_max : m[r];
      alpha[r] = m_new == m[r] ? 1.f : exp2f(m[r] - m_new);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[4 * j + 2 * r + e];
          x = exp2f(fmaf(x, p.qk_scale, -m_new));
          sum += x;
        }
      }
      l[r] = l[r] * alpha[r] + sum;
    }
  };
  // P_t as the A operand of the next P V: k-step kk covers columns 16kk..16kk+15
  auto pack_probabilities = [&]() { pack_operand<T>(s, pk); };

  float alpha[2] = {1.f, 1.f};
  // O times the rescale factors of the last softmax, where a row maximum moved (in this
  // warp's rows)
  auto rescale = [&]() {
    if (__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] *= (i & 2) ? alpha[1] : alpha[0];
    }
    touch(o);
  };
  const int wg_barrier = 2 + wg;  // 0: the block, 1: all consumers
  // The thread that stores a warpgroup's diff lets its warp release the staging slot once
  // the TMA has read it: checked after the next item's first score product is issued (or
  // at the end), so that the warpgroup does not wait for the store.
  const bool stores_diff = p.save && threadIdx.x % 128 == 0;
  int staged_stage = -1;  // the slot of a store not yet known to be read
  auto release_staging_slot = [&]() {
    if (stores_diff && staged_stage >= 0) {
      asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      barrier_arrive(k_empty(staged_stage));
      barrier_arrive(v_empty(staged_stage));
      staged_stage = -1;
    }
  };

  int k = 0;  // items of this block so far
  for (int item = blockIdx.x; item < p.items; item += gridDim.x, ++k, ring0 += tiles) {
    const auto [bh, b, h, row0] = locate(item);
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;

    barrier_wait(q_bar, k & 1);
    issue_scores(0);
    release_staging_slot();
    wgmma_wait<0>();
    touch(s);
    release(k_empty_of(0));
    softmax(0, alpha);
    alpha[0] = alpha[1] = 1.f;  // O is still zero
    pack_probabilities();
    wait_values(0);
    for (int t = 1; t < tiles; ++t) {
      // the scores of tile t; while the tensor cores do them, O takes the rescale of tile
      // t - 1's softmax, then P V of tile t - 1 follows, so that the softmax below overlaps it
      issue_scores(t);
      rescale();
      issue_values(t - 1);
      wgmma_wait<1>();  // the scores (committed first) are done
      touch(s);
      if (t < tiles - 1 || !p.save) release(k_empty_of(t));  // the last one: see the epilogue
      if (t == tiles_old) {  // first compressed tile: the old attention's sums are complete
        l_old[0] = l[0], l_old[1] = l[1];
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.f;
      }
      softmax(t, alpha);
      // V of tile t for the next P V. Waiting for it here also ends a basic block between the
      // softmax and the wait for P V below, which the compiler would otherwise schedule ahead
      // of the softmax (the whole product's latency then exposed).
      wait_values(t);
      wgmma_wait<0>();  // P V of tile t - 1 done: O and the packed probabilities are free
      touch(o);
      release(v_empty_of(t - 1));
      if (t == tiles_old) {
        // the old attention is finished: keep its normalised output, start the compressed one
        const float inv0 = 1.f / quad_sum(l_old[0]), inv1 = 1.f / quad_sum(l_old[1]);
#pragma unroll
        for (int i = 0; i < 64; ++i) {
          const float normalised = o[i] * ((i & 2) ? inv1 : inv0);
          if constexpr (S::kOldInSmem) {
            old_smem[i * S::kConsumers] = normalised;
          } else {
            o_old[i] = normalised;
          }
          o[i] = 0.f;
        }
        alpha[0] = alpha[1] = 1.f;  // O is zero again
      }
      pack_probabilities();
    }
    rescale();
    issue_values(tiles - 1);
    wgmma_wait<0>();
    touch(o);
    if (!p.save) release(v_empty_of(tiles - 1));

    // epilogue: O_comp, diff, the partial of the mean, and what the backward needs. Every
    // consumer warp is past its last product: the producer may load the next item's query
    // tile. diff goes out through the last key tile's ring slot (K; for the second warpgroup
    // V, where a K tile holds one warpgroup's diff only), which is released after the store:
    // written there in the maps' swizzle (swizzled_offset: a store instruction of a warp hits
    // every bank once), then stored by the TMA, which drops the rows past n
    asm volatile("bar.sync 1, %0;\n" ::"n"(S::kConsumers) : "memory");
    if (threadIdx.x % 128 == 0) barrier_arrive(q_empty);
    const int last_stage = (ring0 + tiles - 1) % kStages;
    const uint32_t diff_tile =
        kTileBytes >= S::kWarpGroups * kQTileBytes
            ? smem0 + S::kKOffset + last_stage * kTileBytes + wg * kQTileBytes
            : smem0 + (wg == 0 ? S::kKOffset : S::kVOffset) + last_stage * kTileBytes;
    auto old_at = [&](int i) {
      if constexpr (S::kOldInSmem) {
        return old_smem[i * S::kConsumers];
      } else {
        return o_old[i];
      }
    };
    const float l_comp[2] = {quad_sum(l[0]), quad_sum(l[1])};
    const int rows[2] = {row0 + wg * 64 + warp * 16 + lane / 4, row0 + wg * 64 + warp * 16 + lane / 4 + 8};
    float sq = 0.f;
    float delta[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool row_ok = rows[r] < p.n;
      const float inv = 1.f / l_comp[r];
      const int tile_row = warp * 16 + lane / 4 + 8 * r;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float c0 = o[4 * j + 2 * r] * inv, c1 = o[4 * j + 2 * r + 1] * inv;
        const int i = 4 * j + 2 * r;
        const float d0 = old_at(i) - c0, d1 = old_at(i + 1) - c1;
        if (row_ok) sq += d0 * d0 + d1 * d1;
        if (p.save) {
          const uint32_t packed = pack<T>(d0, d1);
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(diff_tile + swizzled_offset(tile_row, j, lane)),
                       "r"(packed)
                       : "memory");
          const float2 rounded = unpack<T>(packed);
          delta[r] += rounded.x * c0 + rounded.y * c1;
        }
      }
      delta[r] = quad_sum(delta[r]);
      if (p.save && row_ok && lane % 4 == 0) {
        const int64_t at = int64_t(bh) * p.n + rows[r];
        p.lse[at] = m[r] + log2f(l_comp[r]);
        p.delta[at] = delta[r];
      }
    }
    if (p.save) {
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the writes, visible to the TMA
      asm volatile("bar.sync %0, 128;\n" ::"r"(wg_barrier) : "memory");
      if (threadIdx.x % 128 == 0) {
        tma_store(&p.diff_map, diff_tile, 0, h, row0 + wg * 64, b);
        tma_store(&p.diff_map, diff_tile + kQTileBytes / 2, 64, h, row0 + wg * 64, b);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        staged_stage = last_stage;  // released once read, see release_staging_slot
      } else if (lane == 0) {
        // the producer may refill the slot once the storing warp has released it too
        barrier_arrive(k_empty(last_stage));
        barrier_arrive(v_empty(last_stage));
      }
    }
    // the item's share of the mean: warps, then the warp sums in a fixed order
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffff, sq, off);
    if (lane == 0) warp_sums[threadIdx.x / 32] = sq;
    asm volatile("bar.sync 1, %0;\n" ::"n"(S::kConsumers) : "memory");  // the consumer warps only
    if (threadIdx.x == 0) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < S::kConsumers / 32; ++w) total += warp_sums[w];
      p.partial[item] = total * p.inv_numel;
    }
    asm volatile("bar.sync 1, %0;\n" ::"n"(S::kConsumers) : "memory");  // warp_sums read before reuse
  }
  release_staging_slot();  // the last store has read shared memory before the block exits
#else
  __trap();  // built without sm_90a: the host never launches this
#endif
}

// The loss: the items' partials summed in a fixed order (each thread a strided share, then
// a tree over the threads) and rounded once to the inputs' type. One block, launched as a
// programmatic dependent of the forward: it may start while the forward runs and waits here
// until the forward has finished and its partials are visible.
constexpr int kSumThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kSumThreads) sum_partials_kernel(const float* partial, int count, T* loss) {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  __shared__ float sums[kSumThreads];
  float sum = 0.f;
  for (int i = threadIdx.x; i < count; i += kSumThreads) sum += partial[i];
  sums[threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (int half = kSumThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if constexpr (std::is_same_v<T, __half>) {
      *loss = __float2half_rn(sums[0]);
    } else {
      *loss = __float2bfloat16_rn(sums[0]);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------
//
// dK and dV of the compressed attention (q and the old keys/values are constants of the
// loss), from what the forward saved: diff = O_old - O_comp (dO up to the factor
// -2 g / numel), the log2-domain LSE and delta = rowsum(diff * O_comp).
//
// One block per (128 compressed keys, batch, head): two warpgroups of 64 keys each, whose
// K, V and fp32 dK, dV stay put while the query tiles stream past. No producer warpgroup:
// one thread issues the TMA copies, so every thread may hold 255 registers. Q and diff of
// each 64-query tile come through a ring of kBwdStages stages that both warpgroups read;
// the warpgroup that releases a stage second refills it. Per query tile j, in each
// warpgroup (the loop is rotated so that no product is in flight across its back edge):
//   dV += P_{j-1}^T diff_{j-1}, dK += dS_{j-1}^T Q_{j-1}   (P, dS from registers)
//   S_j^T = K Q_j^T, dP_j^T = V diff_j^T                    (issued with them, one wait)
//   P_j^T = exp2(S_j^T * scale * log2(e) - lse_j), dS_j^T = P_j^T (dP_j^T - delta_j)
// Query rows past n and keys past nc arrive as zeros from the TMA (lse and delta of rows
// past n as zeros too): their probabilities meet zero rows of diff and Q, and the rows of
// keys past nc are not stored. At the end dK takes the softmax scale and both -2 g / numel.

constexpr int kBwdStages = 4;
constexpr int kBwdThreads = 256;  // two warpgroups
constexpr int kBwdKOffset = 0;                                 // K of each warpgroup, 16 KiB
constexpr int kBwdVOffset = kBwdKOffset + 2 * kQTileBytes;     // V of each warpgroup
constexpr int kBwdQOffset = kBwdVOffset + 2 * kQTileBytes;     // the ring: Q per stage
constexpr int kBwdDiffOffset = kBwdQOffset + kBwdStages * kQTileBytes;  // diff per stage
constexpr int kBwdStatsOffset = kBwdDiffOffset + kBwdStages * kQTileBytes;  // per warpgroup [2][128] fp32
constexpr int kBwdBarrierOffset = kBwdStatsOffset + 2 * 2 * 128 * 4;  // K/V full, then per stage full
constexpr int kBwdCountOffset = kBwdBarrierOffset + 8 * (1 + kBwdStages);  // per stage: releases so far
constexpr int kBwdSmemBytes = kBwdCountOffset + 4 * kBwdStages;

template <typename T>
struct ReconBwdParams {
  CUtensorMap q_map, diff_map, k_map, v_map;  // [B, rows, H, 128], boxes of 64 rows x 64 columns
  CUtensorMap dk_map, dv_map;                 // the gradients, [B, nc, H, 128] like comp_k
  int heads, n, nc;
  int key_tiles, tiles_m;  // 128-key tiles per (batch, head), 64-query tiles
  float qk_scale;          // softmax scale * log2(e)
  float sm_scale;
  float inv_numel;
  const T* grad_loss;      // the loss's gradient g (0-d)
  const float* lse;        // [B, H, n]
  const float* delta;      // [B, H, n]
};

template <typename T>
__global__ void __launch_bounds__(kBwdThreads, 1)
    recon_loss_bwd_sm90_kernel(const __grid_constant__ ReconBwdParams<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t smem0 = smem_addr(smem_raw);
  if (smem0 % 1024 != 0) __trap();
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, x = threadIdx.x % 128;
  const int key_tile = blockIdx.x % p.key_tiles, bh = blockIdx.x / p.key_tiles;
  const int b = bh / p.heads, h = bh % p.heads;
  const uint32_t kv_bar = smem0 + kBwdBarrierOffset;
  auto full = [&](int stage) { return stage_full(kv_bar, stage); };
  int* releases = reinterpret_cast<int*>(smem_raw + kBwdCountOffset);
  // this warpgroup's lse (64) and delta (64) of a query tile, double-buffered
  float* stats = reinterpret_cast<float*>(smem_raw + kBwdStatsOffset) + wg * 256;
  const int tiles = p.tiles_m;

  // Q and diff of query tile j into its ring stage
  auto load_query_tile = [&](int j) {
    const int stage = j % kBwdStages;
    barrier_expect(full(stage), 2 * kQTileBytes);
    tma_load_tile(smem0 + kBwdQOffset + stage * kQTileBytes, kQTileBytes / 2, &p.q_map, h, 64 * j, b, full(stage));
    tma_load_tile(smem0 + kBwdDiffOffset + stage * kQTileBytes, kQTileBytes / 2, &p.diff_map, h, 64 * j, b,
                  full(stage));
  };
  if (threadIdx.x == 0) {
    init_key_block_barriers(kv_bar, kBwdStages, releases);
    // K and V of both warpgroups, then the first query tiles
    load_key_block(smem0 + kBwdKOffset, smem0 + kBwdVOffset, &p.k_map, &p.v_map, h, key_tile * 128, b, kv_bar);
    for (int j = 0; j < tiles && j < kBwdStages; ++j) load_query_tile(j);
  }
  __syncthreads();  // barriers and counters initialised

  float dk[64], dv[64];  // [64 keys, 128] fp32 accumulators
  float s[32];           // S^T of a tile [64 keys, 64 queries], then P^T
  float dp[32];          // dP^T, then dS^T
  uint32_t pk[16], dsk[16];  // P^T and dS^T as packed pairs (A operands)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk[i] = dv[i] = 0.f;

  // descriptors of this warpgroup's operands (diff in the place of dO)
  const KeyMajorOperands op =
      key_major_operands(smem0 + kBwdKOffset, smem0 + kBwdVOffset, smem0 + kBwdQOffset, smem0 + kBwdDiffOffset, wg);

  // S^T and dP^T of query tile j, once its stage has arrived
  auto issue_scores = [&](int j) {
    const int stage = j % kBwdStages;
    barrier_wait(full(stage), (j / kBwdStages) & 1);
    const uint32_t at = stage * kQTileBytes >> 4;
    key_major_scores<T>(s, dp, op.k, op.v, op.q + at, op.dout + at);
  };
  // dV += P^T diff and dK += dS^T Q of query tile j
  auto issue_gradients = [&](int j) {
    const uint32_t at = (j % kBwdStages) * kQTileBytes >> 4;
    key_major_gradient<T>(dv, pk, op.dout_mn + at);
    key_major_gradient<T>(dk, dsk, op.q_mn + at);
  };
  // lse (threads 0-63 of the warpgroup) or delta (64-127) of one row of query tile j, zero
  // past n; fetched before a wait, written to the tile's buffer after it
  auto fetch_stat = [&](int j) {
    const int row = 64 * j + x % 64;
    return row < p.n ? (x < 64 ? p.lse : p.delta)[int64_t(bh) * p.n + row] : 0.f;
  };
  auto wg_sync = [&]() { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };
  auto my_turn = [&]() { take_turn(wg); };  // the warpgroups take turns issuing (take_turn)
  auto your_turn = [&]() { pass_turn(wg); };
  // P^T and dS^T of tile j from S^T, dP^T and the tile's statistics, packed as A operands
  auto score_gradients = [&](int j) {
    const float* lse = stats + (j % 2) * 128;
    const float* delta = lse + 64;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int col = 8 * jj + 2 * (lane % 4);  // the query columns of this thread
      const float2 l2 = *reinterpret_cast<const float2*>(lse + col);
      const float2 d2 = *reinterpret_cast<const float2*>(delta + col);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float& prob = s[4 * jj + e];
        prob = exp2f(fmaf(prob, p.qk_scale, -((e & 1) ? l2.y : l2.x)));
        dp[4 * jj + e] = prob * (dp[4 * jj + e] - ((e & 1) ? d2.y : d2.x));
      }
      pack_chunk<T>(s, pk, jj);
      pack_chunk<T>(dp, dsk, jj);
    }
  };
  // both warpgroups are done with tile j's stage: the second to say so refills it
  auto release = [&](int j) { release_stage(releases, j, kBwdStages, tiles, x == 0, load_query_tile); };

  // the loss's gradient and tile 0's statistics load while K, V and Q arrive
  const float g = to_float(*p.grad_loss);
  stats[x] = fetch_stat(0);
  barrier_wait(kv_bar, 0);
  if (wg == 1) your_turn();  // the first turn is warpgroup 0's
  my_turn();
  wgmma_fence();
  issue_scores(0);
  wgmma_commit();
  your_turn();
  wg_sync();  // tile 0's statistics are in place
  wgmma_wait<0>();
  touch(s), touch(dp);
  score_gradients(0);
  for (int j = 1; j <= tiles; ++j) {
    // tile j - 1's gradient products and tile j's score products in flight together; the
    // statistics of tile j load meanwhile
    my_turn();
    wgmma_fence();
    issue_gradients(j - 1);
    if (j < tiles) issue_scores(j);
    wgmma_commit();
    your_turn();
    const float stat = j < tiles ? fetch_stat(j) : 0.f;
    wgmma_wait<0>();
    touch(dk), touch(dv), touch(s), touch(dp);
    if (j < tiles) stats[(j % 2) * 128 + x] = stat;
    wg_sync();  // the warpgroup is past tile j - 1 (its stage may go) and tile j's statistics are in place
    release(j - 1);
    if (j < tiles) score_gradients(j);
  }
  if (wg == 0) my_turn();  // the last turn warpgroup 1 handed over

  // dK = scale * dS^T Q and dV = P^T dO with dO = -2 g diff / numel, written over this
  // warpgroup's K and V (no longer read) in the maps' swizzle (swizzled_offset), then stored
  // by the TMA, which drops the rows past nc
  const float coef = -2.f * g * p.inv_numel;
  const uint32_t dk_tile = smem0 + kBwdKOffset + wg * kQTileBytes;
  const uint32_t dv_tile = smem0 + kBwdVOffset + wg * kQTileBytes;
  write_key_gradients<T>(dk, dv, coef * p.sm_scale, coef, dk_tile, dv_tile, warp, lane);
  wg_sync();
  if (x == 0) {
    store_key_gradients(&p.dk_map, &p.dv_map, dk_tile, dv_tile, h, key_tile * 128 + wg * 64, b);
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // shared memory read before the block exits
  }
#else
  __trap();  // built without sm_90a: the host never launches this
#endif
}

}  // namespace ct_kernels::recon_sm90

// ---- host ----------------------------------------------------------------------------------
namespace {

using namespace ct_kernels::recon_sm90;
using namespace ct_kernels::sm90;

constexpr const char* kFwd = "recon_loss_fwd_sm90";
constexpr const char* kBwd = "recon_loss_bwd_sm90";


// Returns the loss (a 0-d tensor of q's dtype, the sum of the partials). Writes partial
// [B * H * ceil(n / block_m)] (fp32 shares of the mean) and, with save_for_backward, diff
// [B, n, H, D] (q's dtype), lse and delta [B, H, n] (fp32); without it diff, lse and delta
// are not touched. scale: the softmax scale. block_m (64 or 128) and block_n (keys per
// tile) and stages: the launch configuration, one of (64, 64, 3), (128, 64, 3),
// (128, 128, 2).
at::Tensor recon_loss_fwd_sm90(const at::Tensor& q, const at::Tensor& old_k, const at::Tensor& old_v,
                               const at::Tensor& comp_k, const at::Tensor& comp_v, double scale,
                               at::Tensor partial, at::Tensor diff, at::Tensor lse, at::Tensor delta,
                               bool save_for_backward, int64_t block_m, int64_t block_n, int64_t stages) {
  check_q(kFwd, q);
  check_input(kFwd, old_k, "old_k", q);
  check_input(kFwd, old_v, "old_v", q);
  check_input(kFwd, comp_k, "comp_k", q);
  check_input(kFwd, comp_v, "comp_v", q);
  TORCH_CHECK(old_v.size(1) == old_k.size(1) && comp_v.size(1) == comp_k.size(1),
              kFwd, ": values must have as many rows as their keys, got old ",
              ct_kernels::shape(old_k.sizes()), " / ", ct_kernels::shape(old_v.sizes()), ", compressed ",
              ct_kernels::shape(comp_k.sizes()), " / ", ct_kernels::shape(comp_v.sizes()));
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaDeviceProp* props = sm90_properties(kFwd);

  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2);
  const int config = block_m == 64 && block_n == 64 && stages == 3     ? 0
                     : block_m == 128 && block_n == 64 && stages == 3  ? 1
                     : block_m == 128 && block_n == 128 && stages == 2 ? 2
                                                                        : -1;
  TORCH_CHECK(config >= 0,
              kFwd, ": (block_m, block_n, stages) must be (64, 64, 3), (128, 64, 3) or (128, 128, 2), "
              "got (", ct_kernels::num(block_m), ", ", ct_kernels::num(block_n), ", ", ct_kernels::num(stages), ")");
  const int64_t tiles_m = (n + block_m - 1) / block_m;
  TORCH_CHECK(tiles_m * batch * heads < (int64_t(1) << 31) && n < (int64_t(1) << 30) &&
                  old_k.size(1) < (int64_t(1) << 30) &&
                  comp_k.size(1) < (int64_t(1) << 30),
              kFwd, ": sizes out of range");
  check_exact(kFwd, partial, "partial", {batch * heads * tiles_m}, at::kFloat, q);
  if (save_for_backward) {
    check_exact(kFwd, diff, "diff", q.sizes(), q.scalar_type(), q);
    check_exact(kFwd, lse, "lse", {batch, heads, n}, at::kFloat, q);
    check_exact(kFwd, delta, "delta", {batch, heads, n}, at::kFloat, q);
  }

  ReconParams p{};
  const at::Tensor q_rows = rows_aligned(q);  // copies live until the launch
  make_map(p.q_map, q_rows, 64);
  const at::Tensor ks[2] = {rows_aligned(old_k), rows_aligned(comp_k)};
  const at::Tensor vs[2] = {rows_aligned(old_v), rows_aligned(comp_v)};
  for (int s = 0; s < 2; ++s) {
    make_map(p.k_map[s], ks[s], int(block_n));
    make_map(p.v_map[s], vs[s], int(block_n));
    p.keys[s] = int(ks[s].size(1));
  }
  p.heads = int(heads), p.n = int(n);
  p.qk_scale = float(scale * 1.4426950408889634);
  p.inv_numel = float(1.0 / double(q.numel()));
  p.partial = partial.data_ptr<float>();
  p.save = save_for_backward;
  if (save_for_backward) make_map(p.diff_map, diff, 64);
  p.lse = save_for_backward ? lse.data_ptr<float>() : nullptr;
  p.delta = save_for_backward ? delta.data_ptr<float>() : nullptr;

  p.tiles_m = int(tiles_m), p.items = int(tiles_m * batch * heads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto type, auto shape) {
    using S = decltype(shape);
    auto kernel = recon_loss_fwd_sm90_kernel<decltype(type), S>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes));
    // persistent: as many blocks as the SMs hold at once, none without an item
    const int blocks = std::min(p.items, props->multiProcessorCount * S::kBlocksPerSm);
    kernel<<<blocks, S::kThreads, S::kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  at::Tensor loss = at::empty({}, q.options());
  // the forward, then the sum of its partials as its programmatic dependent
  auto run = [&](auto type) {
    if (config == 0) {
      launch(type, Shape<1, 3, 64>{});
    } else if (config == 1) {
      launch(type, Shape<2, 3, 64>{});
    } else {
      launch(type, Shape<2, 2, 128>{});
    }
    using T = decltype(type);
    launch_dependent(sum_partials_kernel<T>, 1, kSumThreads, 0, stream, static_cast<const float*>(p.partial), p.items,
                     reinterpret_cast<T*>(loss.data_ptr()));
  };
  with_element_type(q, run);
  return loss;
}


// Writes d_comp_k and d_comp_v (contiguous [B, nc, H, 128], q's dtype): the gradients of the
// loss given its gradient grad_loss (0-d, q's dtype) and what the forward saved with
// save_for_backward (diff [B, n, H, 128], lse and delta [B, H, n]). scale: the forward's.
void recon_loss_bwd_sm90(const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& comp_k,
                         const at::Tensor& comp_v, const at::Tensor& diff, const at::Tensor& lse,
                         const at::Tensor& delta, double scale, at::Tensor d_comp_k, at::Tensor d_comp_v) {
  check_q(kBwd, q);
  check_input(kBwd, comp_k, "comp_k", q);
  check_input(kBwd, comp_v, "comp_v", q);
  TORCH_CHECK(comp_v.size(1) == comp_k.size(1), kBwd, ": comp_v must have as many rows as comp_k, got ",
              ct_kernels::shape(comp_k.sizes()), " / ", ct_kernels::shape(comp_v.sizes()));
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2), nc = comp_k.size(1);
  check_exact(kBwd, diff, "diff", q.sizes(), q.scalar_type(), q);
  check_exact(kBwd, lse, "lse", {batch, heads, n}, at::kFloat, q);
  check_exact(kBwd, delta, "delta", {batch, heads, n}, at::kFloat, q);
  check_exact(kBwd, grad_loss, "grad_loss", {}, q.scalar_type(), q);
  check_exact(kBwd, d_comp_k, "d_comp_k", comp_k.sizes(), q.scalar_type(), q);
  check_exact(kBwd, d_comp_v, "d_comp_v", comp_k.sizes(), q.scalar_type(), q);
  const int64_t key_tiles = (nc + 127) / 128;
  TORCH_CHECK(key_tiles * batch * heads < (int64_t(1) << 31) && n < (int64_t(1) << 30) && nc < (int64_t(1) << 30),
              kBwd, ": sizes out of range");
  const c10::cuda::CUDAGuard device_guard(q.device());
  sm90_properties(kBwd);

  const at::Tensor q_rows = rows_aligned(q), k_rows = rows_aligned(comp_k), v_rows = rows_aligned(comp_v);
  auto run = [&](auto type) {
    using T = decltype(type);
    ReconBwdParams<T> p{};
    make_map(p.q_map, q_rows, 64);
    make_map(p.diff_map, diff, 64);
    make_map(p.k_map, k_rows, 64);
    make_map(p.v_map, v_rows, 64);
    p.heads = int(heads), p.n = int(n), p.nc = int(nc);
    p.key_tiles = int(key_tiles), p.tiles_m = int((n + 63) / 64);
    p.qk_scale = float(scale * 1.4426950408889634);
    p.sm_scale = float(scale);
    p.inv_numel = float(1.0 / double(q.numel()));
    p.grad_loss = reinterpret_cast<const T*>(grad_loss.data_ptr());
    p.lse = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    make_map(p.dk_map, d_comp_k, 64);
    make_map(p.dv_map, d_comp_v, 64);
    auto kernel = recon_loss_bwd_sm90_kernel<T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBwdSmemBytes));
    kernel<<<int(key_tiles * batch * heads), kBwdThreads, kBwdSmemBytes, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  with_element_type(q, run);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ct_kernels, m) {
  m.def(
      "recon_loss_fwd_sm90(Tensor q, Tensor old_k, Tensor old_v, Tensor comp_k, Tensor comp_v, float scale, "
      "Tensor(a!) partial, Tensor(b!) diff, Tensor(c!) lse, Tensor(d!) delta, bool save_for_backward, int block_m, "
      "int block_n, int stages) -> Tensor");
  m.def(
      "recon_loss_bwd_sm90(Tensor grad_loss, Tensor q, Tensor comp_k, Tensor comp_v, Tensor diff, Tensor lse, "
      "Tensor delta, float scale, Tensor(a!) d_comp_k, Tensor(b!) d_comp_v) -> ()");
}

TORCH_LIBRARY_IMPL(ct_kernels, CUDA, m) {
  m.impl("recon_loss_fwd_sm90", &recon_loss_fwd_sm90);
  m.impl("recon_loss_bwd_sm90", &recon_loss_bwd_sm90);
}
