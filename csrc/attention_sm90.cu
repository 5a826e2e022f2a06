// Compressive attention for Hopper (sm_90a), float16 and bfloat16, without key padding: the
// forward (head dims 64 and 128; also with Transformer-XL relative positions, bfloat16 and
// causal), and the backward (dQ, dK, dV; head dim 128; without relative positions, or from the
// position scores that the forward kept) from the forward's output and log2-domain LSE (the
// same LSE as the Triton forward's, ct_kernels/ops/attention.py).
//
// Forward: one block per (128 queries, batch, head), two warpgroups of 64 queries each, whose
// Q and fp32 O stay put while the key tiles (128 keys; 64 at head dim 64, fwd::Layout) of the
// three sources stream past (oldest first: cmem, mem, segment; the tiles before a memory's
// first valid slot are skipped, and with causal the segment's tiles after the block's last
// query). K and V of each tile come through rings of fwd::Layout::kStages stages that both
// warpgroups read; the warpgroup that releases a stage second refills it (K once the scores
// are done, V once P V is). Per key tile j, in each warpgroup:
//   S_j = Q K_j^T and O += P_{j-1} V_{j-1}            (issued together, P from registers)
//   P_j = exp2(S_j * scale * log2(e) - row max)       (online softmax, log2 domain, while
//                                                      the second product runs)
//   O *= exp2(old max - new max)                      (once that product is done, where a
//                                                      row maximum moved)
// The two warpgroups take turns issuing their products, so that one's softmax runs while the
// tensor cores do the other's (at head dim 128; at 64 two blocks share an SM instead, or with
// relative positions the warpgroups issue as they are ready). At the end O / row sum goes
// out through the TMA and the LSE (row max + log2(row sum)) per row.
// With relative positions (the score of query i and key j is (q_i + u).k_j + (q_i + v).r_d,
// d = cm + m + i - j; each warpgroup keeps q + v of its rows in registers and adds u to its Q
// tile in place once it arrives), the key tiles have 64 keys and each warpgroup also scores
// the tile's new 64 distances, (Q + v) r_chunk^T (its A operand from registers), issued with
// S_j; r comes in chunks of 64 rows through a third TMA ring (ChunkStream). The scored half
// band goes to the warp's shared memory in bfloat16 (as the Triton kernels round it), and
// each thread reads its (i, j) entries sheared from the two halves there into S_j; if asked
// (kKeep), it also stores them by key, for a backward that reads them instead of scoring the
// positions again (ct_kernels/ops/attention.py, store_position_scores).
//
// Backward: one block per (128 keys of one source, batch, head): two warpgroups of 64 keys
// each, whose K, V and fp32 dK, dV stay put while the 64-query tiles that see them stream
// past. Q and dO of each tile come through a ring of bwd::kStages stages that both
// warpgroups read; the warpgroup that releases a stage second refills it (one thread issues
// the TMA copies, no producer warpgroup). Per query tile j, in each warpgroup (the loop is
// rotated as in the reconstruction loss's backward, csrc/recon_loss_sm90.cu):
//   dV += P_{j-1}^T dO_{j-1}, dK += dS_{j-1}^T Q_{j-1}    (P from registers, dS from
//                                                          shared memory)
//   S_j^T = K Q_j^T, dP_j^T = V dO_j^T                     (issued with them, one wait)
//   dQ_{j-1} = dS_{j-1} K: both warpgroups' dS^T wait in shared memory; each warpgroup
//     multiplies all 128 keys into half the head dim, 32 columns at a time (one quarter
//     with the next tile's products above), and adds the fp32 result into a global buffer
//     straight from its registers (vector reductions in L2, red.global.add.v4.f32)
//   P_j^T = exp2(S_j^T * scale * log2(e) - lse_j), dS_j^T = P_j^T (dP_j^T - delta_j)
// So dQ costs one product per tile instead of a second pass that recomputes S and dP.
// With the kept position scores (kPos; bfloat16, causal), each warpgroup also reads its
// [64 queries, 64 keys] box of them through the TMA, a tile ahead, adds it to S^T before the
// softmax (the query is q + u), and stores dS^T by distance for the position part, which two
// products per head over the distances add afterwards (ct_kernels/ops/attention.py).
// Block order, in both: windows of batch-heads, the longest blocks of all a window's
// batch-heads first (sm90.cuh, block_work), so that fewer SMs idle at the end while long
// blocks finish.
// Masks, in both: keys outside the valid part of their memory (mem_lens, cmem_lens) or past the
// source's end, and, with causal, segment keys after the query (the diagonal tiles only).
// Query rows past n and keys past the source's end arrive as zeros from the TMA (lse and
// delta of rows past n as zeros too), and the TMA does not store the rows past the ends.
// Around the key blocks: a kernel before them computes delta = rowsum(dO * O) and zeroes the
// fp32 buffer, and one after them turns the buffer into dQ times the softmax scale; each of the
// three starts while the one before it finishes (programmatic dependent launch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "sm90.cuh"

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

namespace ct_kernels::attention_sm90 {

using namespace ct_kernels::sm90;

// Whether a key scores -inf for a query, in both kernels' masked tiles: outside its source's
// valid slots [lo, size) (a memory's newest lens slots, or past the source's end), or, on a
// diagonal tile of the causal segment, after the query.
__device__ __forceinline__ bool key_masked(int key, int query, int lo, int size, bool diagonal) {
  return key < lo || key >= size || (diagonal && key > query);
}

// ---- forward -------------------------------------------------------------------------------
namespace fwd {

constexpr int kThreads = 256;      // two warpgroups

// Tiles and shared memory of a block at head dim D (64 or 128; rows of D / 64 boxes of 64
// columns), with Transformer-XL relative positions if kRel. At D = 64, tiles of 64 keys keep a
// thread's registers to 128, so that two blocks share an SM (one's softmax, set-up and epilogue
// overlapping the other's products). With relative positions the key tiles have 64 keys, a
// ring of kRSlots chunks of 64 rows of r follows the K and V rings, and each warp has a
// [16 rows, 128 distances] bfloat16 band of position scores (rows kBandStride apart: the
// stores conflict-free, the sheared loads at most 2-way).
template <int D, bool kRel = false>
struct Layout {
  static constexpr int kKeyTile = D == 64 || kRel ? 64 : 128;  // keys per tile
  static constexpr int kStages = 3;                           // of the K and V rings
  static constexpr int kBlocksPerSm = D == 64 && !kRel ? 2 : 1;
  // the largest block-order window (block_work), 0: as many batch-heads as the L2 holds. At
  // head dim 128 without relative positions 8: in the op alone 1.5% and 3.6% faster than the
  // L2's 32 at pg19-like and enwik8-like, through the API the same and 2.1% faster
  // (benchmarks/NOTES.md, Attention sections 22 and 28); at head dim 64 (two blocks per SM)
  // and with relative positions the L2's choice was the fastest.
  static constexpr int kMaxWindow = D == 128 && !kRel ? 8 : 0;
  static constexpr int kBoxes = D / 64;
  static constexpr int kQBytes = 64 * D * 2;                  // a warpgroup's [64, D] query tile
  static constexpr int kKvBytes = kKeyTile * D * 2;           // a [kKeyTile, D] key or value tile
  static constexpr int kKvBoxBytes = kKeyTile * 128;          // its boxes: kKeyTile rows x 64 columns
  static constexpr int kRSlots = kRel ? 4 : 0;                // chunks of r in the ring
  static constexpr int kRBytes = 64 * D * 2;                  // a chunk: 64 distances x D
  static constexpr int kBandStride = 136;                     // elements between a band's rows
  static constexpr int kBandFront = 8;                        // elements before row 0 (its column -1)
  static constexpr int kBandBytes = kRel ? (kBandFront + 16 * kBandStride) * 2 : 0;  // a warp's band
  static constexpr int kQOffset = 0;                          // Q of each warpgroup, then its output
  static constexpr int kKOffset = kQOffset + 2 * kQBytes;     // the ring: K per stage
  static constexpr int kVOffset = kKOffset + kStages * kKvBytes;      // V per stage
  static constexpr int kROffset = kVOffset + kStages * kKvBytes;      // r per slot
  static constexpr int kBandOffset = kROffset + kRSlots * kRBytes;    // the 8 warps' bands
  static constexpr int kBarrierOffset = kBandOffset + 8 * kBandBytes;  // Q, K and V full per stage, r full per slot
  static constexpr int kCountOffset = kBarrierOffset + 8 * (1 + 2 * kStages + kRSlots);  // releases: K, V, r
  static constexpr int kSmemBytes = kCountOffset + 4 * (2 * kStages + kRSlots);
  static_assert(kSmemBytes * kBlocksPerSm <= 227 * 1024, "more shared memory than an sm_90 SM has");
};

struct AttnFwdParams {
  CUtensorMap q_map, out_map;        // [B, n, H, D], boxes of 64 rows x 64 columns
  CUtensorMap k_map[3], v_map[3];    // boxes of Layout::kKeyTile rows x 64 columns
  int size[3];                       // keys per source
  const int* lens[2];                // valid (newest) slots of cmem and mem per sample, or null
  int heads, n, tiles_m;             // tiles_m: 128-query tiles
  int batch_heads, window;           // the block order (block_work)
  int causal;
  float qk_scale;                    // softmax scale * log2(e)
  float* lse;                        // [B, H, n], log2 domain
  // relative positions: r [H, R, D] as the map (column, head, distance, 0) with boxes of 64
  // distances, and the biases u and v [H, D] (u added to the query tiles, v to the queries of
  // the band products)
  CUtensorMap r_map;
  const __nv_bfloat16* u;
  const __nv_bfloat16* v;
  // optionally, the position scores as added (bfloat16), kept by key for the backward:
  // query i of batch-head bh and key j of source s at pos_scores[(bh * n + i) * pos_stride +
  // pos_col[s] + j] (each source's columns padded to kScoreColumns), or null
  __nv_bfloat16* pos_scores;
  int pos_stride, pos_col[3];
};

// the column blocks of the kept position scores are padded to this (ct_kernels/ops/attention.py:
// SCORE_GRAD_COLUMNS), a multiple of the key tile
constexpr int kScoreColumns = 128;

// The key tiles a query tile visits, oldest first: tiles first_c.. of cmem (count_c), first_m..
// of mem (count_m), then 0.. of the segment (count_s); the tiles before a memory's first
// valid slot are skipped
template <int kKeyTile>
struct KeyTiles {
  int first_c, count_c, first_m, count_m, count_s;
  __device__ __forceinline__ int total() const { return count_c + count_m + count_s; }
  // source (0 cmem, 1 mem, 2 segment) and first key of tile j
  __device__ __forceinline__ void locate(int j, int& src, int& key0) const {
    if (j < count_c) {
      src = 0, key0 = (first_c + j) * kKeyTile;
    } else if (j < count_c + count_m) {
      src = 1, key0 = (first_m + j - count_c) * kKeyTile;
    } else {
      src = 2, key0 = (j - count_c - count_m) * kKeyTile;
    }
  }
  // source of tile j and its index among that source's visited tiles
  __device__ __forceinline__ void source_tile(int j, int& src, int& index) const {
    src = j < count_c ? 0 : j < count_c + count_m ? 1 : 2;
    index = j - (src > 0 ? count_c : 0) - (src > 1 ? count_m : 0);
  }
};

// a[src] of a per-source array (cmem, mem, segment) by selects: a run-time index would put
// the array in local memory
__device__ __forceinline__ int by_source(const int (&a)[3], int src) {
  return src == 0 ? a[0] : src == 1 ? a[1] : a[2];
}

// Relative positions: the chunks of 64 rows of r (64 distances each) that a block's band
// products read, in the order they are needed. Per key tile each warpgroup scores one new
// chunk, the lower half of its tile's band; the upper half is the previous tile's lower
// half. So warpgroup 0 scores chunk c(j) of tile j and warpgroup 1 (64 queries further,
// distances 64 higher) chunk c(j) - 1, the one warpgroup 0 scored a tile before. A source's
// first tile has no previous tile: its upper halves are chunks c(j) - 1 (warpgroup 0) and
// c(j) - 2 (warpgroup 1), two more chunks ahead of its tiles'. A source's chunks thus run down
// in steps of 64 distances from `top`, two more of them than its tiles.
struct ChunkStream {
  int first[3];  // per source: the index of its first chunk
  int top[3];    // and that chunk's first distance
  int total;
  // the first distance of chunk c
  __device__ __forceinline__ int distance(int c) const {
    const int src = c >= first[2] ? 2 : c >= first[1] ? 1 : 0;
    return by_source(top, src) - 64 * (c - by_source(first, src));
  }
  // warpgroup wg's lower-half chunk of the index-th tile of source src
  __device__ __forceinline__ int lower(int src, int index, int wg) const {
    return by_source(first, src) + 2 + index - wg;
  }
};

// kKeep (with kRel): the position scores also go to p.pos_scores
template <typename T, int D, bool kRel, bool kKeep>
__global__ void __launch_bounds__(kThreads, Layout<D, kRel>::kBlocksPerSm)
    attention_fwd_sm90_kernel(const __grid_constant__ AttnFwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<D, kRel>;
  constexpr int kKeyTile = L::kKeyTile, kStages = L::kStages, kRSlots = L::kRSlots;
  constexpr float kMaxSlack = 8.f;  // see softmax
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t smem0 = smem_addr(smem_raw);
  if (smem0 % 1024 != 0) __trap();
  const int wg = warpgroup_index(), warp = warp_in_warpgroup(), lane = threadIdx.x % 32, x = threadIdx.x % 128;
  // the query tiles of a batch-head, the longest (the last, causal) first, in windows of
  // batch-heads (block_work)
  const BlockWork work = block_work(blockIdx.x, p.tiles_m, p.window, p.batch_heads);
  const int bh = work.bh, b = bh / p.heads, h = bh % p.heads;
  const int tile_m = p.tiles_m - 1 - work.item;
  const int query0 = tile_m * 128 + 64 * wg;  // this warpgroup's first query

  // the memories' valid slots [valid_lo, size) and the key tiles that hold them
  int valid_lo[2];
  KeyTiles<kKeyTile> tiles;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int size = p.size[s];
    valid_lo[s] = p.lens[s] == nullptr ? 0 : max(size - p.lens[s][b], 0);
    const int first = valid_lo[s] / kKeyTile;
    const int count = valid_lo[s] < size ? (size + kKeyTile - 1) / kKeyTile - first : 0;
    (s == 0 ? tiles.first_c : tiles.first_m) = first;
    (s == 0 ? tiles.count_c : tiles.count_m) = count;
  }
  // the segment's keys up to the block's last query (causal), or all
  tiles.count_s = ((p.causal ? min(p.n, 128 * (tile_m + 1)) : p.n) + kKeyTile - 1) / kKeyTile;
  const int num_tiles = tiles.total();

  // relative positions: the distance of query i to key j (global position over [cmem | mem |
  // segment]) is cm + m + i - j; a source's first visited tile starts `top` - 64 below its
  // first chunk's distance (ChunkStream)
  ChunkStream chunks{};
  if constexpr (kRel) {
    const int count[3] = {tiles.count_c, tiles.count_m, tiles.count_s};
    const int first_key[3] = {tiles.first_c * kKeyTile, p.size[0] + tiles.first_m * kKeyTile, p.size[0] + p.size[1]};
    int c = 0;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      chunks.first[s] = c;
      chunks.top[s] = p.size[0] + p.size[1] + tile_m * 128 - first_key[s] + 64;
      c += count[s] > 0 ? count[s] + 2 : 0;
    }
    chunks.total = c;
  }

  const uint32_t q_bar = smem0 + L::kBarrierOffset;
  auto k_full = [&](int stage) { return q_bar + 8 + 8 * stage; };
  auto v_full = [&](int stage) { return q_bar + 8 + 8 * (kStages + stage); };
  auto r_full = [&](int slot) { return q_bar + 8 + 8 * (2 * kStages + slot); };
  int* k_releases = reinterpret_cast<int*>(smem_raw + L::kCountOffset);
  int* v_releases = k_releases + kStages;
  int* r_releases = v_releases + kStages;
  // key tile j of a ring (K or V: its shared memory, maps and full barrier) into its stage
  auto load_tile = [&](int j, uint32_t ring, const CUtensorMap* maps, uint32_t full) {
    int src, key0;
    tiles.locate(j, src, key0);
    barrier_expect(full, L::kKvBytes);
    tma_load_boxes<L::kBoxes>(ring + (j % kStages) * L::kKvBytes, L::kKvBoxBytes, &maps[src], h, key0, b, full);
  };
  auto load_keys = [&](int j) { load_tile(j, smem0 + L::kKOffset, p.k_map, k_full(j % kStages)); };
  auto load_values = [&](int j) { load_tile(j, smem0 + L::kVOffset, p.v_map, v_full(j % kStages)); };
  // chunk c of r into its slot (distances outside [0, R) arrive as zeros)
  auto load_chunk = [&](int c) {
    if constexpr (kRel) {
      const int slot = c % kRSlots;
      barrier_expect(r_full(slot), L::kRBytes);
      tma_load_boxes<L::kBoxes>(smem0 + L::kROffset + slot * L::kRBytes, kBoxBytes, &p.r_map, h, chunks.distance(c),
                                0, r_full(slot));
    }
  };
  if (threadIdx.x == 0) {
    barrier_init(q_bar, 1);
    for (int stage = 0; stage < kStages; ++stage) {
      barrier_init(k_full(stage), 1), barrier_init(v_full(stage), 1);
      k_releases[stage] = v_releases[stage] = 0;
    }
    for (int slot = 0; slot < kRSlots; ++slot) barrier_init(r_full(slot), 1), r_releases[slot] = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    barrier_expect(q_bar, 2 * L::kQBytes);
    for (int g = 0; g < 2; ++g) {
      tma_load_boxes<L::kBoxes>(smem0 + L::kQOffset + g * L::kQBytes, kBoxBytes, &p.q_map, h, tile_m * 128 + 64 * g, b,
                                q_bar);
    }
    for (int j = 0; j < num_tiles && j < kStages; ++j) load_keys(j), load_values(j);
    if constexpr (kRel) {
      for (int c = 0; c < chunks.total && c < kRSlots; ++c) load_chunk(c);
    }
  }
  __syncthreads();  // barriers and counters initialised

  float o[D / 2];   // output [64 queries, D] fp32, unnormalised
  float s[kKeyTile / 2];    // scores [64 queries, kKeyTile keys], then probabilities
  uint32_t pk[kKeyTile / 4];  // probabilities as packed pairs (A operand of O += P V)
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, of this thread's two rows
  float row_sum[2] = {0.f, 0.f};              // this thread's part of each row's sum
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;

  // descriptors: Q and K as K-major operands of the scores (rows of the head dim), V as the
  // MN-major B operand of O += P V (rows of keys: +2048 bytes per 16 keys, the column halves a
  // box apart); r's chunks K-major like K
  const uint64_t q_desc = descriptor(smem0 + L::kQOffset + wg * L::kQBytes, 0, 1024);
  const uint64_t k_desc = descriptor(smem0 + L::kKOffset, 0, 1024);
  const uint64_t v_desc = descriptor(smem0 + L::kVOffset, L::kKvBoxBytes, 1024);
  const uint64_t r_desc = descriptor(smem0 + L::kROffset, 0, 1024);
  // S = Q K_j^T, once K of tile j has arrived
  auto issue_scores = [&](int j) {
    const int stage = j % kStages;
    barrier_wait(k_full(stage), (j / kStages) & 1);
    const uint32_t at = stage * L::kKvBytes >> 4;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Mma<T>::scores(s, q_desc + k_step(kk, kBoxBytes), k_desc + at + k_step(kk, L::kKvBoxBytes), kk);
    }
  };
  // V of tile j has arrived (waited for apart from K, see the loop)
  auto wait_values = [&](int j) { barrier_wait(v_full(j % kStages), (j / kStages) & 1); };
  // O += P_j V_j (k-step kk: keys 16 kk..16 kk + 15)
  auto issue_values = [&](int j) {
    const uint32_t at = (j % kStages) * L::kKvBytes >> 4;
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      const uint32_t step[4] = {pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]};
      Mma<T>::values(o, step, v_desc + at + (kk * 2048 >> 4));
    }
  };

  // Relative positions (kRel). A tile's position scores (q_i + v).r_d, d = distance, span 128
  // distances per warpgroup, its band: the lower half (the new chunk) scored here,
  // the upper half a tile earlier. Each warp keeps its 16 rows of the band in shared memory as
  // two 64-column slots, the newer half in slot `band_slot`, and reads them sheared: (query
  // i, key j) of the tile is column (64 band_slot + 64 + i - j) mod 128.
  float band[kRel ? 32 : 1];      // a half band [64 queries, 64 distances]
  uint32_t qv[kRel ? D / 4 : 1];  // q + v of this thread's rows: the A operand of the band products
  int band_slot = 1;              // slot of the last half written
  int released_chunks = 0;        // chunks below this one released by this warpgroup
  const uint32_t band_smem = smem0 + L::kBandOffset + (4 * wg + warp) * L::kBandBytes + 2 * L::kBandFront;
  // chunk c of r has arrived (waited for before the products are issued: a wait between two
  // products would make ptxas serialise every product of the kernel)
  auto wait_chunk = [&](int c) {
    if constexpr (kRel) barrier_wait(r_full(c % kRSlots), (c / kRSlots) & 1);
  };
  // the band product of chunk c
  auto issue_band = [&](int c) {
    if constexpr (kRel) {
      const uint32_t at = (c % kRSlots) * L::kRBytes >> 4;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t step[4] = {qv[4 * kk], qv[4 * kk + 1], qv[4 * kk + 2], qv[4 * kk + 3]};
        Mma<T>::scores(band, step, r_desc + at + k_step(kk, kBoxBytes), kk);
      }
    }
  };
  // the half band, rounded to bfloat16, into the other slot; column 127 also goes to
  // column -1 (the row's front), so that a sheared read of columns c and c - 1 needs no wrap
  auto store_band = [&]() {
    if constexpr (kRel) {
      __syncwarp();  // the warp's reads of that slot (a tile ago) are done
      band_slot ^= 1;
      const uint32_t at = band_smem + 2 * ((lane / 4) * L::kBandStride + 64 * band_slot + 2 * (lane % 4));
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t pair = pack<__nv_bfloat16>(band[4 * jj + 2 * r], band[4 * jj + 2 * r + 1]);
          const uint32_t to = at + 2 * (8 * r * L::kBandStride + 8 * jj);
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(to), "r"(pair) : "memory");
          if (jj == 7 && band_slot == 1 && lane % 4 == 3) {
            asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(to - 2 * 127), "h"(uint16_t(pair >> 16)) : "memory");
          }
        }
      }
      __syncwarp();  // the half, visible to the warp
    }
  };
  // S += tile j's position scores, read sheared from the band (and kept by key, if asked)
  auto add_positions = [&](int j) {
    if constexpr (kRel) {
      // this thread's first entry of the kept scores: its first row, the tile's first key
      __nv_bfloat16* kept = nullptr;
      if constexpr (kKeep) {
        int src, key0;
        tiles.locate(j, src, key0);
        kept = p.pos_scores + (int64_t(bh) * p.n + query0 + 16 * warp + lane / 4) * p.pos_stride +
               by_source(p.pos_col, src) + key0 + 2 * (lane % 4);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = lane / 4 + 8 * r;  // in the warp's band; 16 warp + row in the warpgroup's
        const int col0 = 64 * band_slot + 64 + 16 * warp + row - 2 * (lane % 4);
        const uint32_t at = band_smem + 2 * row * L::kBandStride;
        const bool keep = kKeep && query0 + 16 * warp + row < p.n;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          // columns c and c - 1 (c = 0: column -1, the copy of column 127): keys k and k + 1
          const uint32_t from = at + 2 * ((col0 - 8 * jj) & 127);
          uint16_t bits[2];
          asm volatile("ld.shared.u16 %0, [%2];\nld.shared.u16 %1, [%3];\n"
                       : "=h"(bits[0]), "=h"(bits[1])
                       : "r"(from), "r"(from - 2)
                       : "memory");
#pragma unroll
          for (int e = 0; e < 2; ++e) s[4 * jj + 2 * r + e] += __uint_as_float(uint32_t(bits[e]) << 16);
          if (keep) {
            *reinterpret_cast<uint32_t*>(kept + 8 * r * int64_t(p.pos_stride) + 8 * jj) =
                uint32_t(bits[0]) | uint32_t(bits[1]) << 16;
          }
        }
      }
    }
  };
  // the lowest chunk that this warpgroup reads from tile j on (a source's first tile also
  // reads the chunk below its lower half's)
  auto lowest_chunk = [&](int j) {
    if (j == num_tiles) return chunks.total;
    int src, index;
    tiles.source_tile(j, src, index);
    return chunks.lower(src, index, wg) - (index == 0);
  };
  // this warpgroup is done with the chunks below `limit`: the second warpgroup to release a
  // chunk refills its slot
  auto release_chunks = [&](int limit) {
    if constexpr (kRel) {
      for (; released_chunks < limit; ++released_chunks) {
        release_stage(r_releases, released_chunks, kRSlots, chunks.total, x == 64, load_chunk);
      }
    }
  };
  // tile j's band products: at a source's first tile the upper half first (waited for here,
  // before the tile's turn), then the lower half (issue_lower, with the scores)
  auto upper_half = [&](int j) {
    if constexpr (kRel) {
      int src, index;
      tiles.source_tile(j, src, index);
      if (index == 0) {
        const int c = chunks.lower(src, 0, wg) - 1;
        wait_chunk(c);
        wgmma_fence();
        issue_band(c);
        wgmma_commit();
        wgmma_wait<0>();
        touch(band);
        store_band();
      }
    }
  };
  auto lower_chunk = [&](int j) {
    int src, index;
    tiles.source_tile(j, src, index);
    return chunks.lower(src, index, wg);
  };
  // after tile j's products: the lower half into the band, the position scores into S,
  // and the chunks that the next tiles do not read released
  auto positions = [&](int j) {
    if constexpr (kRel) {
      touch(band);
      store_band();
      add_positions(j);
      release_chunks(lowest_chunk(j + 1));
    }
  };

  // this thread's rows (accumulator layout, sm90.cuh): 16 warp + lane / 4 and 8 below
  const int row0 = query0 + 16 * warp + lane / 4;
  // P_j = exp2(S_j * scale * log2(e) - row max) with the running maxima and sums updated;
  // masked keys (outside their memory's valid slots, past the source's end, after the query
  // in the causal segment: only on the tiles that hold such keys) score -inf. Returns the
  // factors that rescale the rows of O.
  auto softmax = [&](int j, float (&alpha)[2]) {
    int src, key0;
    tiles.locate(j, src, key0);
    const int size = src == 0 ? p.size[0] : src == 1 ? p.size[1] : p.n;
    const int lo = src == 0 ? valid_lo[0] : src == 1 ? valid_lo[1] : 0;
    const bool diagonal = p.causal && src == 2 && key0 + kKeyTile - 1 > query0;
    if (key0 < lo || key0 + kKeyTile > size || diagonal) {
#pragma unroll
      for (int jj = 0; jj < kKeyTile / 8; ++jj) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * jj + 2 * (lane % 4) + (e & 1), query = row0 + 8 * (e / 2);
          if (key_masked(key, query, lo, size, diagonal)) s[4 * jj + e] = -INFINITY;
        }
      }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kKeyTile / 2; ++i) tile_max[(i / 2) % 2] = fmaxf(tile_max[(i / 2) % 2], s[i]);
    // A row's running maximum moves only where the tile's exceeds it by more than kMaxSlack
    // (as in the reconstruction loss's forward): the probabilities stay below 2^kMaxSlack,
    // and O needs no rescale on most tiles.
    float neg_max[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float tile = quad_max(tile_max[r]) * p.qk_scale;
      const float new_max = tile > row_max[r] + kMaxSlack ? tile : row_max[r];
      alpha[r] = new_max == row_max[r] ? 1.f : exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
      neg_max[r] = new_max == -INFINITY ? 0.f : -new_max;  // a row with no key yet
    }
    float tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kKeyTile / 2; ++i) {
      s[i] = exp2f(fmaf(s[i], p.qk_scale, neg_max[(i / 2) % 2]));
      tile_sum[(i / 2) % 2] += s[i];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = fmaf(row_sum[r], alpha[r], tile_sum[r]);
  };
  auto scale_rows = [&](const float (&factor)[2]) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= factor[(i / 2) % 2];
  };
  // O times the factors of the last softmax, where a row maximum of this warp moved
  auto rescale = [&](const float (&alpha)[2]) {
    if (__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f)) scale_rows(alpha);
  };
  // At head dim 128 (one block per SM) the warpgroups take turns issuing (take_turn); at 64 two
  // blocks per SM interleave four warpgroups without them, and with relative positions (one
  // block) turns measured slower at 64 and 1% faster at 128 (benchmarks/NOTES.md, Attention 19,
  // 20 and 30)
  constexpr bool kTurns = D == 128;
  auto my_turn = [&]() {
    if constexpr (kTurns) take_turn(wg);
  };
  auto your_turn = [&]() {
    if constexpr (kTurns) pass_turn(wg);
  };
  // both warpgroups are done with K (V) of tile j: the second to say so refills its stage, K
  // as soon as the scores are done, a tile before V. Thread 0 of a warpgroup releases K,
  // thread 32 V and thread 64 the chunks of r, so that no one warp's chain carries them all.
  auto release_keys = [&](int j) { release_stage(k_releases, j, kStages, num_tiles, x == 0, load_keys); };
  auto release_values = [&](int j) { release_stage(v_releases, j, kStages, num_tiles, x == 32, load_values); };

  if constexpr (kRel) release_chunks(lowest_chunk(0));
  barrier_wait(q_bar, 0);
  if constexpr (kRel) {
    // q + v of this thread's rows of the warpgroup's tile (16 warp + lane / 4 and 8 below) as
    // the band products' A operand (pack_chunk's layout: column group j in qv[2 j], qv[2 j + 1]),
    // an fp32 sum rounded to bfloat16; read before u is added in place
    const uint32_t tile = smem0 + L::kQOffset + wg * L::kQBytes;
#pragma unroll
    for (int chunk = 0; chunk < D / 8; ++chunk) {
      const float2 vf = unpack<T>(*reinterpret_cast<const uint32_t*>(p.v + h * D + 8 * chunk + 2 * (lane % 4)));
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t q_pair;
        asm volatile("ld.shared.b32 %0, [%1];\n"
                     : "=r"(q_pair)
                     : "r"(tile + swizzled_offset(16 * warp + lane / 4 + 8 * r, chunk, lane)));
        const float2 qf = unpack<T>(q_pair);
        qv[2 * chunk + r] = pack<T>(qf.x + vf.x, qf.y + vf.y);
      }
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");  // the tile read before it changes
    // Q + u in place: thread x adds u's 16-byte piece `piece` (columns 8 piece..) to rows
    // x / (D / 8) + 16 i.. of the tile (in the maps' swizzle, swizzled_chunk), rounded as q + u
    // on the host
    constexpr int kPieces = D / 8;
    const int piece = x % kPieces;
    const uint4 u4 = *reinterpret_cast<const uint4*>(p.u + h * D + 8 * piece);
    const uint32_t u_pairs[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
    for (int i = 0; i < 64 * kPieces / 128; ++i) {
      const int row = (128 / kPieces) * i + x / kPieces;
      const uint32_t at = tile + swizzled_chunk(row, piece);
      uint32_t q_pairs[4];
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(q_pairs[0]), "=r"(q_pairs[1]), "=r"(q_pairs[2]), "=r"(q_pairs[3])
                   : "r"(at));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 qf = unpack<T>(q_pairs[e]), uf = unpack<T>(u_pairs[e]);
        q_pairs[e] = pack<T>(qf.x + uf.x, qf.y + uf.y);
      }
      asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(q_pairs[0]), "r"(q_pairs[1]),
                   "r"(q_pairs[2]), "r"(q_pairs[3])
                   : "memory");
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the products
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
  }
  if (wg == 1) your_turn();  // the first turn is warpgroup 0's
  float alpha[2];
  upper_half(0);
  if constexpr (kRel) wait_chunk(lower_chunk(0));
  my_turn();
  wgmma_fence();
  issue_scores(0);
  if constexpr (kRel) issue_band(lower_chunk(0));
  wgmma_commit();
  your_turn();
  wgmma_wait<0>();
  touch(s);
  release_keys(0);
  positions(0);
  softmax(0, alpha);
  pack_operand<T>(s, pk);
  wait_values(0);
  // Iteration j: S_j (and the band's lower half) and O += P_{j-1} V_{j-1} in flight together;
  // the softmax of S_j runs while the second product finishes, then O is rescaled and P_j
  // packed.
  for (int j = 1; j < num_tiles; ++j) {
    upper_half(j);
    if constexpr (kRel) wait_chunk(lower_chunk(j));
    my_turn();
    wgmma_fence();
    issue_scores(j);
    if constexpr (kRel) issue_band(lower_chunk(j));
    wgmma_commit();
    issue_values(j - 1);
    wgmma_commit();
    your_turn();
    wgmma_wait<1>();
    touch(s);
    release_keys(j);
    positions(j);
    softmax(j, alpha);
    // V of tile j, for the next iteration. Waiting for it here also ends a basic block between
    // the softmax and the wait below, which ptxas would otherwise hoist above the softmax
    // (the whole product's latency then exposed), as in the reconstruction loss's forward.
    wait_values(j);
    wgmma_wait<0>();
    touch(o);
    release_values(j - 1);
    rescale(alpha);
    pack_operand<T>(s, pk);
  }
  my_turn();
  wgmma_fence();
  issue_values(num_tiles - 1);
  wgmma_commit();
  your_turn();
  wgmma_wait<0>();
  touch(o);
  if (wg == 0) my_turn();  // the last turn warpgroup 1 handed over

  // epilogue: O / row sum over this warpgroup's Q tile (its last reader, the scores of the
  // last tile, is done), stored by the TMA (rows past n are dropped); the LSE of each row
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);  // > 0: every row sees a key (no padding here)
    inv_sum[r] = 1.f / sum;
    const int row = row0 + 8 * r;
    if (lane % 4 == 0 && row < p.n) p.lse[int64_t(bh) * p.n + row] = row_max[r] + log2f(sum);
  }
  scale_rows(inv_sum);
  const uint32_t out_tile = smem0 + L::kQOffset + wg * L::kQBytes;
  write_tile<T>(o, 1.f, out_tile, warp, lane);
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the writes, visible to the TMA
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
  if (x == 0) {
    for (int box = 0; box < L::kBoxes; ++box) tma_store(&p.out_map, out_tile + box * kBoxBytes, 64 * box, h, query0, b);
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the tile read before the block ends
  }
#else
  __trap();  // built without sm_90a: the host never launches this
#endif
}

}  // namespace fwd

// ---- backward ------------------------------------------------------------------------------
namespace bwd {

constexpr int kStages = 3;
constexpr int kThreads = 256;                           // two warpgroups
// batch-heads per window of the block order (block_work), measured: 8 of 1-64 (windows of 64
// 3-4% slower than of 8; benchmarks/NOTES.md, Attention section 22)
constexpr int kWindow = 8;
constexpr int kDsBytes = 64 * 64 * 2;                   // a warpgroup's dS^T [64 keys, 64 queries]
constexpr int kDqBytes = 64 * 64 * 4;                   // a warpgroup's fp32 half of dQ [64, 64]
constexpr int kDqFloats = kDqBytes / 4;
constexpr int kKOffset = 0;                             // K of each warpgroup, 16 KiB
constexpr int kVOffset = kKOffset + 2 * kQTileBytes;    // V of each warpgroup
constexpr int kQOffset = kVOffset + 2 * kQTileBytes;    // the ring: Q per stage
constexpr int kDoOffset = kQOffset + kStages * kQTileBytes;  // dO per stage
constexpr int kDsOffset = kDoOffset + kStages * kQTileBytes;  // dS^T: 2 tiles x 2 warpgroups
// The rest of the block's shared memory; with the kept position scores (kPos) also their two
// slots per warpgroup ([64 queries, 64 keys] boxes, the maps' swizzle) and a barrier per slot.
template <bool kPos>
struct Smem {
  static constexpr int kPosOffset = kDsOffset + 4 * kDsBytes;
  static constexpr int kStatsOffset = kPosOffset + (kPos ? 4 * kDsBytes : 0);  // per warpgroup [2][128] fp32
  static constexpr int kBarrierOffset = kStatsOffset + 2 * 2 * 128 * 4;  // K/V full, then per stage full
  static constexpr int kPosBarrierOffset = kBarrierOffset + 8 * (1 + kStages);  // per warpgroup and slot
  static constexpr int kCountOffset = kPosBarrierOffset + (kPos ? 8 * 4 : 0);  // per stage: releases so far
  static constexpr int kBytes = kCountOffset + 4 * kStages;
  static_assert(kBytes <= 227 * 1024, "more shared memory than an sm_90 block may have");
};

struct AttnBwdParams {
  CUtensorMap q_map, do_map;  // [B, n, H, 128], boxes of 64 rows x 64 columns
  CUtensorMap k_map[3], v_map[3];
  CUtensorMap dk_map[3], dv_map[3];  // the gradients, contiguous like their sources
  int size[3];                // keys per source
  int blocks[3];              // 128-key blocks per source
  const int* lens[2];         // valid (newest) slots of cmem and mem per sample, or null
  int heads, n, tiles_m;      // tiles_m: 64-query tiles
  int key_blocks;             // blocks[0] + blocks[1] + blocks[2]
  int batch_heads, window;    // the block order (block_work)
  int causal;
  float qk_scale;             // softmax scale * log2(e)
  float sm_scale;
  const float* lse;           // [B, H, n], log2 domain
  const float* delta;         // [B, H, n], rowsum(dO * O), written by prepare_kernel
  float* dq_accum;            // [B * H, tiles_m, 2, kDqFloats], zeroed by prepare_kernel
  // with the kept position scores (kPos): the forward's, by key ([B * H, n, pos_stride], source
  // s from column pos_col[s], as a [B * H, n, 1, pos_stride] map), and the score gradients by
  // distance written here, per head ([H, B * n, pos_stride], row i's key j at column
  // cm + m + i - j)
  CUtensorMap pos_map;
  __nv_bfloat16* dist_grads;
  int pos_col[3];
  int pos_stride;
};

// Before the key blocks: delta = rowsum(dO * O) of one 64-query tile of a batch-head (fp32
// sums of the inputs' products), and the tile's two dQ chunks of the fp32 buffer zeroed. One
// block of kPrepareThreads threads per (batch-head, query tile), all of them resident at once
// (at most 32 registers); thread x sums a quarter of row x / 4 (four 16-byte pieces of O and
// of dO), its three neighbours the rest. Rows are 16-byte aligned (rows_aligned); strides in
// elements.
constexpr int kPrepareThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kPrepareThreads, 8)
    prepare_kernel(const T* out, const T* grad_out, int64_t out_b, int64_t out_n, int64_t out_h, int64_t do_b,
                   int64_t do_n, int64_t do_h, int heads, int n, int tiles_m, float* delta, float* dq_accum) {
  // the key-block kernel may launch now: it waits for this grid (griddepcontrol.wait) before
  // it reads delta or adds into the buffer
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const int chunk = blockIdx.x, tile_m = chunk % tiles_m, bh = chunk / tiles_m;
  const int b = bh / heads, h = bh % heads, x = threadIdx.x;
  // the tile's 2 x kDqFloats sums start at zero (the stores first: the writes go out while
  // the loads below wait)
  float4* zero = reinterpret_cast<float4*>(dq_accum + int64_t(chunk) * 2 * kDqFloats);
#pragma unroll
  for (int i = 0; i < 2 * kDqFloats / 4 / kPrepareThreads; ++i) {
    zero[kPrepareThreads * i + x] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const int row = 64 * tile_m + x / 4, column = 32 * (x % 4);
  float sum = 0.f;
  if (row < n) {
    const uint4* o = reinterpret_cast<const uint4*>(out + b * out_b + row * out_n + h * out_h + column);
    const uint4* d = reinterpret_cast<const uint4*>(grad_out + b * do_b + row * do_n + h * do_h + column);
    uint4 o4[4], d4[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) o4[i] = o[i], d4[i] = d[i];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t ow[4] = {o4[i].x, o4[i].y, o4[i].z, o4[i].w}, dw[4] = {d4[i].x, d4[i].y, d4[i].z, d4[i].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 of = unpack<T>(ow[e]), df = unpack<T>(dw[e]);
        sum = fmaf(of.x, df.x, fmaf(of.y, df.y, sum));
      }
    }
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if (x % 4 == 0 && row < n) delta[int64_t(bh) * n + row] = sum;
}

// S^T [64 keys, 64 queries] += the position scores of a [64 queries, 64 keys] bfloat16 box in
// the maps' swizzle (the forward's, by key), read transposed into S^T's accumulator layout:
// load g's matrix m (lanes 8m..8m+7 give its rows) has queries 8 (2g + m / 2).. as rows and
// keys 16 warp + 8 (m % 2).. as columns; .trans hands each thread its (key, query pair)
__device__ __forceinline__ void add_kept_scores(float (&s)[32], uint32_t box, int warp, int lane) {
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const int m = lane / 8, row = 8 * (2 * g + m / 2) + lane % 8, chunk = 2 * warp + m % 2;
    uint32_t d[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(box + row * 128 + ((chunk ^ (row % 8)) * 16))
                 : "memory");
#pragma unroll
    for (int mm = 0; mm < 4; ++mm) {
      float* pair = s + 4 * (2 * g + mm / 2) + 2 * (mm % 2);
      pair[0] += __uint_as_float(d[mm] << 16);
      pair[1] += __uint_as_float(d[mm] & 0xffff0000u);
    }
  }
}

// kPos: with relative positions, from the position scores that the forward kept (the query is
// q + u, see attention_bwd_sm90)
template <typename T, bool kPos>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_sm90_kernel(const __grid_constant__ AttnBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sm = Smem<kPos>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t smem0 = smem_addr(smem_raw);
  if (smem0 % 1024 != 0) __trap();
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, x = threadIdx.x % 128;
  // dq_from_accum_kernel may launch now: it waits for this grid before it reads the buffer
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  // the key blocks of a batch-head, in windows of batch-heads (block_work)
  const BlockWork work = block_work(blockIdx.x, p.key_blocks, p.window, p.batch_heads);
  const int bh = work.bh, b = bh / p.heads, h = bh % p.heads;
  // the block's source (the three oldest first: cmem, mem, segment; the segment's causal
  // blocks, which see ever fewer queries, last) and its first key there
  constexpr int kCmem = 0, kSegment = 2;
  int src = kCmem, block = work.item;
  while (src < kSegment && block >= p.blocks[src]) block -= p.blocks[src++];
  const int start = block * 128, size = p.size[src];
  const int* lens = src == kSegment ? nullptr : p.lens[src];
  const int valid_lo = lens == nullptr ? 0 : max(size - lens[b], 0);
  // memory keys are seen by every query, segment key s by queries i >= s (causal); a block
  // without a valid key sees no query (its gradients are zero)
  const bool segment = src == kSegment;
  int q_lo = p.causal && segment ? start / 64 : 0;
  if (start + 128 <= valid_lo) q_lo = p.tiles_m;
  const int tiles = p.tiles_m - q_lo;
  const bool mask_keys = start < valid_lo || start + 128 > size;

  const uint32_t kv_bar = smem0 + Sm::kBarrierOffset;
  auto full = [&](int stage) { return stage_full(kv_bar, stage); };
  int* releases = reinterpret_cast<int*>(smem_raw + Sm::kCountOffset);
  // this warpgroup's lse (64) and delta (64) of a query tile, double-buffered
  float* stats = reinterpret_cast<float*>(smem_raw + Sm::kStatsOffset) + wg * 256;
  // kPos: warpgroup g's kept position scores of query tile j, in slot j % 2 (TMA, zeros past n)
  auto pos_full = [&](int g, int j) { return smem0 + Sm::kPosBarrierOffset + 8 * (2 * g + j % 2); };
  auto pos_box = [&](int g, int j) { return smem0 + Sm::kPosOffset + (2 * (j % 2) + g) * kDsBytes; };
  auto load_positions = [&](int j, int g) {
    barrier_expect(pos_full(g, j), kDsBytes);
    tma_load(pos_box(g, j), &p.pos_map, p.pos_col[src] + start + 64 * g, 0, 64 * (q_lo + j), bh, pos_full(g, j));
  };

  // Q and dO of the block's query tile j into its ring stage
  auto load_query_tile = [&](int j) {
    const int stage = j % kStages, row = 64 * (q_lo + j);
    barrier_expect(full(stage), 2 * kQTileBytes);
    tma_load_tile(smem0 + kQOffset + stage * kQTileBytes, kQTileBytes / 2, &p.q_map, h, row, b, full(stage));
    tma_load_tile(smem0 + kDoOffset + stage * kQTileBytes, kQTileBytes / 2, &p.do_map, h, row, b, full(stage));
  };
  if (threadIdx.x == 0) {
    if constexpr (kPos) {
      for (int i = 0; i < 4; ++i) barrier_init(pos_full(i / 2, i), 1);
    }
    init_key_block_barriers(kv_bar, kStages, releases);
    // K and V of both warpgroups, then the first query tiles (none for a block that no
    // query sees: it only stores zeros)
    if (tiles > 0) load_key_block(smem0 + kKOffset, smem0 + kVOffset, &p.k_map[src], &p.v_map[src], h, start, b, kv_bar);
    for (int j = 0; j < tiles && j < kStages; ++j) load_query_tile(j);
    if constexpr (kPos) {
      for (int j = 0; j < tiles && j < 2; ++j) load_positions(j, 0), load_positions(j, 1);
    }
  }
  __syncthreads();  // barriers and counters initialised

  float dk[64], dv[64];      // [64 keys, 128] fp32 accumulators
  float s[32];               // S^T of a tile [64 keys, 64 queries], then P^T
  float dp[32];              // dP^T, then dS^T
  float dq[16];              // a quarter of dQ of a tile [64 queries, 32]
  uint32_t pk[16];           // P^T as packed pairs (A operand)
#pragma unroll
  for (int i = 0; i < 64; ++i) dk[i] = dv[i] = 0.f;

  // descriptors of this warpgroup's operands; for dQ, dS (stored as dS^T, rows of keys) and K
  // (rows of keys, this warpgroup's column half) as MN-major operands
  const KeyMajorOperands op = key_major_operands(smem0 + kKOffset, smem0 + kVOffset, smem0 + kQOffset, smem0 + kDoOffset, wg);
  const uint64_t ds_desc = descriptor(smem0 + kDsOffset, kDsBytes, 1024);
  const uint64_t ds_k_desc = descriptor(smem0 + kDsOffset, 0, 1024);  // dS^T as K-major A of dK
  const uint64_t k_half_desc = descriptor(smem0 + kKOffset + wg * (kQTileBytes / 2), kQTileBytes / 2, 1024);

  // S^T and dP^T of query tile j, once its stage has arrived
  auto issue_scores = [&](int j) {
    const int stage = j % kStages;
    barrier_wait(full(stage), (j / kStages) & 1);
    const uint32_t at = stage * kQTileBytes >> 4;
    key_major_scores<T>(s, dp, op.k, op.v, op.q + at, op.dout + at);
  };
  // dV += P^T dO and dK += dS^T Q of query tile j (k-step kk: queries 16kk..16kk+15; P^T from
  // registers, dS^T from its shared-memory buffer)
  auto issue_gradients = [&](int j) {
    const uint32_t at = (j % kStages) * kQTileBytes >> 4;
    const uint32_t ds_at = ((j % 2) * 2 + wg) * kDsBytes >> 4;
    key_major_gradient<T>(dv, pk, op.dout_mn + at);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) Mma<T>::gradients(dk, ds_k_desc + ds_at + (kk * 32 >> 4), op.q_mn + at + (kk * 2048 >> 4));
  };
  // quarter `part` of dQ of tile j (this warpgroup's column half, its 32 columns 32 part..):
  // dS_j [64 queries, 128 keys] K [128 keys, those columns] (k-step kk: keys 16kk..16kk+15,
  // of warpgroup kk / 4). Two products of 32 columns keep the accumulator at 16 registers.
  auto issue_dq = [&](int j, int part) {
    const uint32_t at = (j % 2) * 2 * kDsBytes;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const uint32_t row = (kk % 4) * 2048;
      Mma<T>::mn_major(dq, ds_desc + ((at + (kk / 4) * kDsBytes + row) >> 4),
                       k_half_desc + (((kk / 4) * kQTileBytes + row + part * 64) >> 4), kk);
    }
  };
  // lse (threads 0-63 of the warpgroup) or delta (64-127) of one row of query tile j, zero
  // past n; fetched before a wait, written to the tile's buffer after it
  auto fetch_stat = [&](int j) {
    const int row = 64 * (q_lo + j) + x % 64;
    return row < p.n ? (x < 64 ? p.lse : p.delta)[int64_t(bh) * p.n + row] : 0.f;
  };
  auto wg_sync = [&]() { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };
  auto my_turn = [&]() { take_turn(wg); };  // the warpgroups take turns issuing (take_turn)
  auto your_turn = [&]() { pass_turn(wg); };
  auto both_sync = [&]() { asm volatile("bar.sync 5, 256;\n" ::: "memory"); };
  // the keys of this thread's two accumulator rows (S^T rows are keys)
  const int key0 = start + 64 * wg + 16 * warp + lane / 4;
  // kPos: dS^T of tile j by distance, for the position part of the gradients (products over
  // the distances, ct_kernels/ops/attention.py): scaled, rounded to bfloat16, row b n + i of
  // head h, key j (over all sources) at column cm + m + i - j. Edge tiles store only rows
  // before n, keys of the source and keys at or before the query.
  const int key_offset = src == kCmem ? 0 : src == kSegment ? p.size[0] + p.size[1] : p.size[0];
  auto store_by_distance = [&](int j, bool edge) {
    const int query = 64 * (q_lo + j) + 2 * (lane % 4);  // this thread's first query
    const int distance = p.size[0] + p.size[1] + query - (key_offset + key0);  // of its first entry
    const int64_t row_step = p.pos_stride + 1;  // a query further on, the same key
    const int64_t row = (int64_t(h) * (p.batch_heads / p.heads) + b) * p.n + query;
    uint16_t* to = reinterpret_cast<uint16_t*>(p.dist_grads) + row * p.pos_stride + distance;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int qi = 8 * (i / 4) + (i & 1), ki = 8 * ((i % 4) / 2);  // the entry's query and key offsets
      const bool stored = !edge || (query + qi < p.n && key0 + ki < size && distance + qi - ki >= 0);
      if (stored) to[qi * row_step - ki] = uint16_t(pack<T>(dp[i] * p.sm_scale, 0.f));
    }
  };
  // P^T and dS^T of tile j from S^T, dP^T and the tile's statistics: P^T packed as an A
  // operand, dS^T into the tile's shared-memory buffer for dK and dQ (rows of keys, the
  // maps' swizzle)
  auto score_gradients = [&](int j) {
    const float* lse = stats + (j % 2) * 128;
    const float* delta = lse + 64;
    const int query0 = 64 * (q_lo + j);
    // causal: some segment key of this warpgroup comes after some query of the tile
    const bool diagonal = p.causal && segment && start + 64 * wg + 63 > query0;
    const bool masked = mask_keys || diagonal;
    const uint32_t ds_tile = smem0 + kDsOffset + ((j % 2) * 2 + wg) * kDsBytes;
    if constexpr (kPos) {
      barrier_wait(pos_full(wg, j), (j / 2) & 1);
      add_kept_scores(s, pos_box(wg, j), warp, lane);
    }
    // masked keys score -inf, so that their P and dS come out zero: a branch that only the
    // tiles holding such keys take (a mask inside the loop below would compile into selects
    // that every tile runs)
    if (masked) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int key = key0 + 8 * ((i % 4) / 2), query = query0 + 8 * (i / 4) + 2 * (lane % 4) + (i & 1);
        if (key_masked(key, query, valid_lo, size, diagonal)) s[i] = -INFINITY;
      }
    }
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
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_tile + swizzled_offset(warp * 16 + lane / 4 + 8 * r, jj, lane)),
                     "r"(pack<T>(dp[4 * jj + 2 * r], dp[4 * jj + 2 * r + 1]))
                     : "memory");
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the products
    if constexpr (kPos) store_by_distance(j, masked || query0 + 64 > p.n);
  };
  // A quarter of dQ of tile j added into the global buffer straight from the accumulator by
  // vector reductions (red.global.add.v4.f32, in L2), in the accumulator's order: thread x's
  // elements 4i..4i+3 at float4 128 (4 part + i) + x of the warpgroup's chunk, so that one
  // instruction of a warp adds 512 consecutive bytes. No shared memory, no barrier.
  auto add_dq = [&](int j, int part) {
    const int64_t chunk = (int64_t(bh) * p.tiles_m + q_lo + j) * 2 + wg;
    float* to = p.dq_accum + chunk * kDqFloats + 4 * (128 * 4 * part + x);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(to + 4 * 128 * i), "f"(dq[4 * i]),
                   "f"(dq[4 * i + 1]), "f"(dq[4 * i + 2]), "f"(dq[4 * i + 3])
                   : "memory");
    }
  };
  // both warpgroups are done with tile j's stage: the second to say so refills it
  auto release = [&](int j) { release_stage(releases, j, kStages, tiles, x == 0, load_query_tile); };

  if (tiles > 0) {
    // prepare_kernel is done (delta written, the dQ buffer zeroed; this grid may have started
    // before it ended), then tile 0's statistics load while K, V and Q arrive
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
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
    // Iteration j: the gradient products of tile j - 1, the second quarter of dQ of tile
    // j - 2 and the score products of tile j in flight together (the statistics of tile j
    // load meanwhile); then the first quarter of dQ of tile j - 1, and the scores of tile j
    // become P and dS. (Two quarters' accumulators alive at once spill. The step rewrites
    // S^T and dP^T, accumulators, in place, which under a product in flight makes ptxas
    // serialise every product (C7515); a step that only reads them can run under the first
    // quarter, and measured the same: benchmarks/NOTES.md, Attention section 27.)
    for (int j = 1; j <= tiles + 1; ++j) {
      my_turn();
      wgmma_fence();
      if (j <= tiles) issue_gradients(j - 1);
      if (j >= 2) issue_dq(j - 2, 1);
      if (j < tiles) issue_scores(j);
      wgmma_commit();
      your_turn();
      // kPos: every thread of the warpgroup is past score_gradients(j - 1) (the turn's
      // barrier), so its slot takes tile j + 1
      if (kPos && x == 0 && j + 1 < tiles) load_positions(j + 1, wg);
      const float stat = j < tiles ? fetch_stat(j) : 0.f;
      wgmma_wait<0>();
      touch(dk), touch(dv), touch(s), touch(dp), touch(dq);
      if (j < tiles) stats[(j % 2) * 128 + x] = stat;
      if (j >= 2) add_dq(j - 2, 1);
      // both warpgroups are past tile j - 1's products (its stage may go) and tile j - 2's
      // dQ, their dS^T of tile j - 1 is in shared memory, and tile j's statistics are in place
      both_sync();
      if (j <= tiles) {  // (the product and its wait in one branch: see NOTES, C7515)
        release(j - 1);
        wgmma_fence();
        issue_dq(j - 1, 0);
        wgmma_commit();
        wgmma_wait<0>();
        touch(dq);
        add_dq(j - 1, 0);
        if (j < tiles) score_gradients(j);
      }
    }
    if (wg == 0) my_turn();  // the last turn warpgroup 1 handed over
  }
  both_sync();  // the dQ products (which read both warpgroups' K) are done

  // dK = scale * dS^T Q and dV = P^T dO, written over this warpgroup's K and V in the maps'
  // swizzle (swizzled_offset), then stored by the TMA, which drops the rows past the source
  const uint32_t dk_tile = smem0 + kKOffset + wg * kQTileBytes;
  const uint32_t dv_tile = smem0 + kVOffset + wg * kQTileBytes;
  write_key_gradients<T>(dk, dv, p.sm_scale, 1.f, dk_tile, dv_tile, warp, lane);
  wg_sync();
  if (x == 0) {
    store_key_gradients(&p.dk_map[src], &p.dv_map[src], dk_tile, dv_tile, h, start + wg * 64, b);
    // the stores have read shared memory (the kernel's end completes their writes to global
    // memory before any later kernel reads them)
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  }
#else
  __trap();  // built without sm_90a: the host never launches this
#endif
}

// dQ [B, n, H, 128] (contiguous) = scale * the fp32 buffer: one block of 128 threads per
// (batch-head, query tile, column half). Thread x reads the elements that thread x of the
// warpgroup added (see add_dq: rows 16 warp + lane / 4 and 8 below, column pairs
// 8 i + 2 (lane % 4)), converted into a [64 rows, 64 columns] tile in shared memory (rows
// kRowBytes apart: the pair stores conflict-free), then written out in 16-byte pieces, each
// row's 128 bytes by 8 consecutive threads.
template <typename T>
__global__ void __launch_bounds__(128) dq_from_accum_kernel(const float* accum, T* dq, int heads, int n, int tiles_m,
                                                            float scale) {
  constexpr int kRowBytes = 144;
  __shared__ __align__(16) uint8_t tile[64 * kRowBytes];
  const int chunk = blockIdx.x, half = chunk % 2, tile_m = (chunk / 2) % tiles_m, bh = chunk / (2 * tiles_m);
  const int b = bh / heads, h = bh % heads;
  const int x = threadIdx.x, warp = x / 32, lane = x % 32;
  // the key-block kernel is done (this grid may have started during its last blocks)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const float4* src = reinterpret_cast<const float4*>(accum + int64_t(chunk) * kDqFloats);
  float4 v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = src[128 * i + x];
  // the accumulator's pairs into the tile
  const int row = 16 * warp + lane / 4;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint8_t* at = tile + row * kRowBytes + (8 * i + 2 * (lane % 4)) * 2;
    *reinterpret_cast<uint32_t*>(at) = pack<T>(v[i].x * scale, v[i].y * scale);
    *reinterpret_cast<uint32_t*>(at + 8 * kRowBytes) = pack<T>(v[i].z * scale, v[i].w * scale);
  }
  __syncthreads();
  // the tile's rows out: piece c = 128 k + x is row c / 8, columns 8 (c % 8)..
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int piece = 128 * k + x, r = piece / 8, col = 64 * half + 8 * (piece % 8);
    const int query = 64 * tile_m + r;
    if (query < n) {
      *reinterpret_cast<uint4*>(dq + ((int64_t(b) * n + query) * heads + h) * kHeadDim + col) =
          *reinterpret_cast<const uint4*>(tile + r * kRowBytes + 16 * (piece % 8));
    }
  }
}

}  // namespace bwd

}  // namespace ct_kernels::attention_sm90

// ---- host ----------------------------------------------------------------------------------
namespace {

using namespace ct_kernels::attention_sm90;
using namespace ct_kernels::sm90;

constexpr const char* kFwdOp = "attention_fwd_sm90";
constexpr const char* kBwdOp = "attention_bwd_sm90";

// The key sources in the kernels' order (cmem, mem, segment), checked: keys and values as the
// TMA can read them (rows_aligned), their lengths and the memories' per-sample valid slots
// (null where not given). Absent memories (None) have no rows. Head dim 128, or also 64 with
// head_dim_64.
struct KeySources {
  at::Tensor k[3], v[3];
  int size[3] = {0, 0, 0};
  const int* lens[2] = {nullptr, nullptr};
};

// a per-sample length tensor: contiguous int32 [B] on q's device
void check_lens(const char* op, const at::Tensor& lens, const char* name, const at::Tensor& q) {
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.device() == q.device() && lens.dim() == 1 &&
                  lens.size(0) == q.size(0) && lens.is_contiguous(),
              op, ": ", name, " must be a contiguous int32 tensor of shape [", ct_kernels::num(q.size(0)), "] on ",
              q.device(), ", got ", lens.scalar_type(), " ", ct_kernels::shape(lens.sizes()), " on ", lens.device());
}

KeySources key_sources(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mem_k, const std::optional<at::Tensor>& mem_v,
                       const std::optional<at::Tensor>& cmem_k, const std::optional<at::Tensor>& cmem_v,
                       const std::optional<at::Tensor>& mem_lens, const std::optional<at::Tensor>& cmem_lens,
                       bool head_dim_64) {
  check_q(op, q, head_dim_64);
  check_input(op, k, "k", q);
  check_input(op, v, "v", q);
  const int64_t n = q.size(1);
  TORCH_CHECK(k.size(1) == n && v.size(1) == n, op, ": k and v must have q's ", ct_kernels::num(n), " rows, got ",
              ct_kernels::shape(k.sizes()), " / ", ct_kernels::shape(v.sizes()));
  const std::optional<at::Tensor>* keys[2] = {&cmem_k, &mem_k};
  const std::optional<at::Tensor>* values[2] = {&cmem_v, &mem_v};
  const std::optional<at::Tensor>* lens[2] = {&cmem_lens, &mem_lens};
  const char* names[2][3] = {{"cmem_k", "cmem_v", "cmem_lens"}, {"mem_k", "mem_v", "mem_lens"}};
  KeySources sources;
  for (int s = 0; s < 2; ++s) {
    TORCH_CHECK(keys[s]->has_value() == values[s]->has_value(), op, ": ", names[s][0], " and ", names[s][1],
                " must be given together");
    const int64_t rows = keys[s]->has_value() ? (*keys[s])->size(1) : 0;
    if (rows > 0) {
      check_input(op, **keys[s], names[s][0], q);
      check_input(op, **values[s], names[s][1], q);
      TORCH_CHECK((*values[s])->size(1) == rows, op, ": ", names[s][1], " must have as many rows as ", names[s][0]);
      sources.k[s] = rows_aligned(**keys[s]), sources.v[s] = rows_aligned(**values[s]);
    }
    if (lens[s]->has_value()) {
      check_lens(op, **lens[s], names[s][2], q);
      sources.lens[s] = (*lens[s])->data_ptr<int>();
    }
    TORCH_CHECK(rows < (1 << 30), op, ": sizes out of range");
    sources.size[s] = int(rows);
  }
  TORCH_CHECK(n < (1 << 30), op, ": sizes out of range");
  sources.k[2] = rows_aligned(k), sources.v[2] = rows_aligned(v);
  sources.size[2] = int(n);
  return sources;
}

// The columns of the position scores kept by key (and of the score gradients by distance): each
// source's block padded to kScoreColumns (ct_kernels/ops/attention.py, score_grad_columns):
// the first column of each source's block, and the row length
struct KeptColumns {
  int col[3] = {0, 0, 0};
  int64_t stride = 0;
};
KeptColumns kept_columns(const KeySources& sources) {
  auto padded = [](int64_t size) { return (size + fwd::kScoreColumns - 1) / fwd::kScoreColumns * fwd::kScoreColumns; };
  KeptColumns c;
  for (int s = 1; s < 3; ++s) c.col[s] = int(c.col[s - 1] + padded(sources.size[s - 1]));
  c.stride = c.col[2] + padded(sources.size[2]);
  return c;
}

// Writes out ([B, n, H, D], D = 64 or 128, contiguous, q's dtype) and lse ([B, H, n] fp32, log2 domain).
// Absent memories: None. With Transformer-XL relative positions (bfloat16, causal): rel_r the
// projected positions r [H, R, D], rel_u and rel_v the biases u and v ([H, D], contiguous), all
// of q's dtype (the score of query i and key j at distance d is (q_i + u).k_j + (q_i + v).r_d,
// each query sum rounded to q's dtype); else all three None. rel_scores, if given
// (with relative positions): the position scores as added, by key, for the backward
// (bfloat16 [B * H, n, columns], each source's columns padded to kScoreColumns; entries of keys
// that a query does not see may stay unwritten). window: the batch-heads per window of the
// block order (block_work; the results do not depend on it), 0 for the L2's choice (at most
// the layout's kMaxWindow).
void attention_fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mem_k, const std::optional<at::Tensor>& mem_v,
                        const std::optional<at::Tensor>& cmem_k, const std::optional<at::Tensor>& cmem_v,
                        const std::optional<at::Tensor>& mem_lens, const std::optional<at::Tensor>& cmem_lens,
                        const std::optional<at::Tensor>& rel_r, const std::optional<at::Tensor>& rel_u,
                        const std::optional<at::Tensor>& rel_v, const std::optional<at::Tensor>& rel_scores,
                        bool causal, double scale, at::Tensor out,
                        at::Tensor lse, int64_t window) {
  const KeySources sources = key_sources(kFwdOp, q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens, true);
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2);
  check_exact(kFwdOp, out, "out", q.sizes(), q.scalar_type(), q);
  check_exact(kFwdOp, lse, "lse", {batch, heads, n}, at::kFloat, q);
  const int64_t tiles_m = (n + 127) / 128;
  TORCH_CHECK(tiles_m * batch * heads < (int64_t(1) << 31), kFwdOp, ": sizes out of range");
  const bool rel = rel_r.has_value();
  TORCH_CHECK(rel == rel_u.has_value() && rel == rel_v.has_value(), kFwdOp,
              ": rel_r, rel_u and rel_v must be given together");
  at::Tensor r_rows;    // r as [1, R, H, D], where the TMA can read it
  at::Tensor u, v_bias;  // u and v where the kernel's 16-byte (u) and 4-byte (v) loads can read them
  if (rel) {
    const at::Tensor& r = *rel_r;
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, kFwdOp, ": relative positions need bfloat16 inputs, got ",
                q.scalar_type());
    TORCH_CHECK(causal, kFwdOp, ": relative positions need causal=True");
    TORCH_CHECK(r.dim() == 3 && r.size(0) == heads && r.size(1) >= 1 && r.size(2) == q.size(3), kFwdOp,
                ": rel_r must be [H, R, D] with q's H and D and R >= 1, got ", ct_kernels::shape(r.sizes()));
    TORCH_CHECK(r.scalar_type() == q.scalar_type() && r.device() == q.device(), kFwdOp, ": rel_r must be a ",
                q.scalar_type(), " tensor on ", q.device(), ", got ", r.scalar_type(), " on ", r.device());
    TORCH_CHECK(r.size(1) < (1 << 30), kFwdOp, ": sizes out of range");
    check_exact(kFwdOp, *rel_u, "rel_u", {heads, q.size(3)}, q.scalar_type(), q);
    check_exact(kFwdOp, *rel_v, "rel_v", {heads, q.size(3)}, q.scalar_type(), q);
    r_rows = rows_aligned(r.unsqueeze(0).transpose(1, 2));
    u = reinterpret_cast<uintptr_t>(rel_u->data_ptr()) % 16 == 0 ? *rel_u : rel_u->clone();
    v_bias = reinterpret_cast<uintptr_t>(rel_v->data_ptr()) % 4 == 0 ? *rel_v : rel_v->clone();
  }
  const KeptColumns columns = kept_columns(sources);
  const int64_t pos_stride = columns.stride;
  if (rel_scores.has_value()) {
    TORCH_CHECK(rel, kFwdOp, ": rel_scores needs relative positions (rel_r, rel_u and rel_v)");
    TORCH_CHECK(pos_stride < (int64_t(1) << 31), kFwdOp, ": sizes out of range");
    check_exact(kFwdOp, *rel_scores, "rel_scores", {batch * heads, n, pos_stride}, at::kBFloat16, q);
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaDeviceProp* props = sm90_properties(kFwdOp);

  fwd::AttnFwdParams p{};
  const int key_tile = q.size(3) == 64 || rel ? 64 : fwd::Layout<kHeadDim>::kKeyTile;
  const at::Tensor q_rows = rows_aligned(q);
  make_map(p.q_map, q_rows, 64);
  make_map(p.out_map, out, 64);
  for (int s = 0; s < 3; ++s) {
    p.size[s] = sources.size[s];
    if (p.size[s] == 0) continue;
    make_map(p.k_map[s], sources.k[s], key_tile);
    make_map(p.v_map[s], sources.v[s], key_tile);
  }
  if (rel) {
    make_map(p.r_map, r_rows, 64);
    p.u = reinterpret_cast<const __nv_bfloat16*>(u.data_ptr());
    p.v = reinterpret_cast<const __nv_bfloat16*>(v_bias.data_ptr());
  }
  if (rel_scores.has_value()) {
    p.pos_scores = reinterpret_cast<__nv_bfloat16*>(rel_scores->data_ptr());
    p.pos_stride = int(pos_stride);
    for (int s = 0; s < 3; ++s) p.pos_col[s] = columns.col[s];
  }
  p.lens[0] = sources.lens[0], p.lens[1] = sources.lens[1];
  p.heads = int(heads), p.n = int(n), p.tiles_m = int(tiles_m);
  // a window's blocks share the keys and values of its batch-heads (benchmarks/NOTES.md,
  // Attention section 22): as many as the L2 holds, at most the layout's kMaxWindow (set below)
  const int64_t keys = int64_t(sources.size[0]) + sources.size[1] + sources.size[2];
  p.batch_heads = int(batch * heads);
  const int64_t fitting = l2_window(props, keys * q.size(3) * 2 * q.element_size());
  p.causal = causal;
  p.qk_scale = float(scale * 1.4426950408889634);
  p.lse = lse.data_ptr<float>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto type, auto head_dim, auto rel_pos, auto keep) {
    constexpr int kD = decltype(head_dim)::value;
    constexpr bool kRel = decltype(rel_pos)::value;
    using L = fwd::Layout<kD, kRel>;
    constexpr int kSmemBytes = L::kSmemBytes;
    const int64_t chosen = L::kMaxWindow > 0 ? std::min<int64_t>(fitting, L::kMaxWindow) : fitting;
    p.window = block_window(window > 0 ? window : chosen, batch * heads);
    auto kernel = fwd::attention_fwd_sm90_kernel<decltype(type), kD, kRel, decltype(keep)::value>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    kernel<<<int(tiles_m * batch * heads), fwd::kThreads, kSmemBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto run = [&](auto type, auto rel_pos, auto keep) {
    if (q.size(3) == 64) {
      launch(type, std::integral_constant<int, 64>{}, rel_pos, keep);
    } else {
      launch(type, std::integral_constant<int, kHeadDim>{}, rel_pos, keep);
    }
  };
  if (rel) {
    // relative positions: bfloat16 only (checked)
    if (rel_scores.has_value()) {
      run(__nv_bfloat16{}, std::true_type{}, std::true_type{});
    } else {
      run(__nv_bfloat16{}, std::true_type{}, std::false_type{});
    }
  } else {
    with_element_type(q, [&](auto type) { run(type, std::false_type{}, std::false_type{}); });
  }
}

// Writes dq, dk, dv and the memories' gradients (contiguous, shaped like their inputs, q's
// dtype) from the forward's output and lse ([B, H, n], log2 domain). workspace: fp32, dQ's
// sums (B * H * ceil(n / 64) * 8192 elements) and delta = rowsum(grad_out * out) (B * H * n),
// both written here. Three kernels: prepare_kernel (delta, the sums zeroed), the key blocks
// and dq_from_accum_kernel, the last two launched as programmatic dependents of the one
// before (each starts while the one before finishes and waits for it where it needs its
// results). Absent memories: None, with empty gradients. window: as in attention_fwd_sm90
// (0: bwd::kWindow; only dQ's fp32 sums depend on it, by their order).
// With rel_scores (Transformer-XL relative positions, bfloat16, causal): the position scores
// that attention_fwd_sm90 kept (its rel_scores); q is then q + u, the content scores' query,
// dq must be empty: the content part of the gradient of q + u stays in the workspace's sums
// (unscaled, in the order that dq_from_accum_kernel reads), and rel_score_grads (bfloat16,
// [H, B * n, columns]) gets the scaled score gradients by distance (head h, row b n + i: key j
// at column cm + m + i - j, written where i < n sees j; the rest left as it was) for the
// products that add the position part.
void attention_bwd_sm90(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mem_k, const std::optional<at::Tensor>& mem_v,
                        const std::optional<at::Tensor>& cmem_k, const std::optional<at::Tensor>& cmem_v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mem_lens,
                        const std::optional<at::Tensor>& cmem_lens, bool causal, double scale, at::Tensor dq,
                        at::Tensor dk, at::Tensor dv, at::Tensor dmem_k, at::Tensor dmem_v, at::Tensor dcmem_k,
                        at::Tensor dcmem_v, at::Tensor workspace, int64_t window,
                        const std::optional<at::Tensor>& rel_scores, const std::optional<at::Tensor>& rel_score_grads) {
  const KeySources sources = key_sources(kBwdOp, q, k, v, mem_k, mem_v, cmem_k, cmem_v, mem_lens, cmem_lens, false);
  const bool kept = rel_scores.has_value();
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2);
  check_input(kBwdOp, grad_out, "grad_out", q);
  check_input(kBwdOp, out, "out", q);
  TORCH_CHECK(grad_out.size(1) == n && out.size(1) == n, kBwdOp, ": grad_out and out must have q's shape ",
              ct_kernels::shape(q.sizes()), ", got ", ct_kernels::shape(grad_out.sizes()), " / ",
              ct_kernels::shape(out.sizes()));
  check_exact(kBwdOp, lse, "lse", {batch, heads, n}, at::kFloat, q);
  if (kept) {
    TORCH_CHECK(dq.numel() == 0, kBwdOp, ": with rel_scores dQ's content part stays in the workspace, dq must be ",
                "empty, got shape ", ct_kernels::shape(dq.sizes()));
  } else {
    check_exact(kBwdOp, dq, "dq", q.sizes(), q.scalar_type(), q);
  }
  check_exact(kBwdOp, dk, "dk", q.sizes(), q.scalar_type(), q);
  check_exact(kBwdOp, dv, "dv", q.sizes(), q.scalar_type(), q);
  const int64_t tiles_m = (n + 63) / 64;
  const int64_t accum_floats = batch * heads * tiles_m * 2 * bwd::kDqFloats;
  check_exact(kBwdOp, workspace, "workspace", {accum_floats + batch * heads * n}, at::kFloat, q);

  // the gradients of the sources in the kernel's order (cmem, mem, segment)
  at::Tensor grad_k[3] = {dcmem_k, dmem_k, dk}, grad_v[3] = {dcmem_v, dmem_v, dv};
  const char* grad_names[2][2] = {{"dcmem_k", "dcmem_v"}, {"dmem_k", "dmem_v"}};
  for (int s = 0; s < 2; ++s) {
    const int64_t grad_shape[4] = {batch, sources.size[s], heads, int64_t(kHeadDim)};
    check_exact(kBwdOp, grad_k[s], grad_names[s][0], grad_shape, q.scalar_type(), q);
    check_exact(kBwdOp, grad_v[s], grad_names[s][1], grad_shape, q.scalar_type(), q);
  }
  bwd::AttnBwdParams p{};
  int64_t key_blocks = 0;
  for (int s = 0; s < 3; ++s) {
    p.size[s] = sources.size[s];
    p.blocks[s] = (p.size[s] + 127) / 128;
    key_blocks += p.blocks[s];
  }
  p.lens[0] = sources.lens[0], p.lens[1] = sources.lens[1];
  TORCH_CHECK(key_blocks * batch * heads < (int64_t(1) << 31) && tiles_m * batch * heads * 2 < (int64_t(1) << 31),
              kBwdOp, ": sizes out of range");
  TORCH_CHECK(kept == rel_score_grads.has_value(), kBwdOp, ": rel_scores and rel_score_grads must be given together");
  if (kept) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, kBwdOp, ": rel_scores needs bfloat16 inputs, got ", q.scalar_type());
    TORCH_CHECK(causal, kBwdOp, ": rel_scores needs causal=True");
    const KeptColumns columns = kept_columns(sources);
    TORCH_CHECK(columns.stride < (int64_t(1) << 31) && batch * heads * n * columns.stride < (int64_t(1) << 62), kBwdOp,
                ": sizes out of range");
    const int64_t kept_shape[3] = {batch * heads, n, columns.stride};
    const int64_t grads_shape[3] = {heads, batch * n, columns.stride};
    check_exact(kBwdOp, *rel_scores, "rel_scores", kept_shape, at::kBFloat16, q);
    check_exact(kBwdOp, *rel_score_grads, "rel_score_grads", grads_shape, at::kBFloat16, q);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(rel_scores->data_ptr()) % 16 == 0, kBwdOp,
                ": rel_scores must start 16-byte aligned");
    make_map(p.pos_map, rel_scores->view({batch * heads, n, 1, columns.stride}), 64);
    p.dist_grads = reinterpret_cast<__nv_bfloat16*>(rel_score_grads->data_ptr());
    for (int s = 0; s < 3; ++s) p.pos_col[s] = columns.col[s];
    p.pos_stride = int(columns.stride);
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  sm90_properties(kBwdOp);

  const at::Tensor q_rows = rows_aligned(q);
  make_map(p.q_map, q_rows, 64);
  const at::Tensor do_rows = rows_aligned(grad_out);
  make_map(p.do_map, do_rows, 64);
  for (int s = 0; s < 3; ++s) {
    if (p.size[s] == 0) continue;
    make_map(p.k_map[s], sources.k[s], 64);
    make_map(p.v_map[s], sources.v[s], 64);
    make_map(p.dk_map[s], grad_k[s], 64);
    make_map(p.dv_map[s], grad_v[s], 64);
  }
  p.heads = int(heads), p.n = int(n), p.tiles_m = int(tiles_m), p.key_blocks = int(key_blocks);
  p.batch_heads = int(batch * heads);
  p.window = block_window(window > 0 ? window : bwd::kWindow, batch * heads);
  p.causal = causal;
  p.qk_scale = float(scale * 1.4426950408889634);
  p.sm_scale = float(scale);
  p.lse = lse.data_ptr<float>();
  float* delta = workspace.data_ptr<float>() + accum_floats;
  p.dq_accum = workspace.data_ptr<float>();
  p.delta = delta;
  const at::Tensor out_rows = rows_aligned(out);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // the prepare kernel, then the key blocks and (without kept scores) the dQ conversion, each a
  // programmatic dependent of the kernel before it
  auto run = [&](auto type, auto pos) {
    using T = decltype(type);
    constexpr bool kPos = decltype(pos)::value;
    constexpr int kSmemBytes = bwd::Smem<kPos>::kBytes;
    bwd::prepare_kernel<T><<<int(batch * heads * tiles_m), bwd::kPrepareThreads, 0, stream>>>(
        reinterpret_cast<const T*>(out_rows.data_ptr()), reinterpret_cast<const T*>(do_rows.data_ptr()),
        out_rows.stride(0), out_rows.stride(1), out_rows.stride(2), do_rows.stride(0), do_rows.stride(1),
        do_rows.stride(2), int(heads), int(n), int(tiles_m), delta, p.dq_accum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto kernel = bwd::attention_bwd_sm90_kernel<T, kPos>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    launch_dependent(kernel, int(key_blocks * batch * heads), bwd::kThreads, kSmemBytes, stream, p);
    if constexpr (!kPos) {  // (kPos: dQ's content part stays in the workspace)
      launch_dependent(bwd::dq_from_accum_kernel<T>, int(batch * heads * tiles_m * 2), 128, 0, stream,
                       static_cast<const float*>(p.dq_accum), reinterpret_cast<T*>(dq.data_ptr()), int(heads),
                       int(n), int(tiles_m), float(scale));
    }
  };
  if (kept) {
    run(__nv_bfloat16{}, std::true_type{});  // bfloat16 only (checked)
  } else {
    with_element_type(q, [&](auto type) { run(type, std::false_type{}); });
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ct_kernels, m) {
  m.def(
      "attention_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? mem_k, Tensor? mem_v, Tensor? cmem_k, "
      "Tensor? cmem_v, Tensor? mem_lens, Tensor? cmem_lens, Tensor? rel_r, Tensor? rel_u, Tensor? rel_v, "
      "Tensor(c!)? rel_scores, bool causal, float scale, Tensor(a!) out, Tensor(b!) lse, int block_window=0) -> ()");
  m.def(
      "attention_bwd_sm90(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mem_k, Tensor? mem_v, "
      "Tensor? cmem_k, Tensor? cmem_v, Tensor out, Tensor lse, Tensor? mem_lens, Tensor? cmem_lens, bool causal, "
      "float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) dmem_k, Tensor(e!) dmem_v, "
      "Tensor(f!) dcmem_k, Tensor(g!) dcmem_v, Tensor(h!) workspace, int block_window=0, Tensor? rel_scores=None, "
      "Tensor(i!)? rel_score_grads=None) -> ()");
}

TORCH_LIBRARY_IMPL(ct_kernels, CUDA, m) {
  m.impl("attention_fwd_sm90", &attention_fwd_sm90);
  m.impl("attention_bwd_sm90", &attention_bwd_sm90);
}
