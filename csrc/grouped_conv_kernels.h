// The bodies of the grouped_conv3x3 direct kernels, for group widths 1, 2, 4 and 8.
//
// At these widths a pixel's group is 2-32 bytes and its output takes 9 x width
// multiply-adds per input value, so the convolution is a stream over memory: each thread
// owns one (pixel, group), loads the group's channels of the 9 source pixels as vectors,
// and accumulates in fp32 on the CUDA cores, with the block's groups' weights in shared
// memory. Consecutive threads take consecutive groups of a pixel, so a warp's loads are
// contiguous, and the 3x3 neighbourhood's reuse comes from L1/L2.
//
//   conv      forward, with the previous batch norm + ReLU applied on load (rounded to
//             the input dtype, as a stored tensor would be) and Welford statistics of the
//             stored output merged per block into (sum, centred sum of squares) partials
//             per tile of rows; TRANSPOSED, the data gradient (the same gather, reversed).
//   wgrad     weight gradient: per (tap chunk, row split, group chunk) block, fp32
//             products of the output gradient and the recomputed input, reduced through
//             shared memory into per-split partials that the host sums in a fixed order
//             (deterministic, no atomics).
//
// Each kernel is written as phases between its barriers, each phase a function of (block,
// thread, shared memory). The CUDA kernels (grouped_conv_cuda.cu) run the phases with
// __syncthreads() between them; the CPU implementation (grouped_conv.cpp) runs the same
// functions block by block, every thread of a phase before the next phase, so the tests
// on a machine without a GPU execute the kernels' own indexing, reductions and rounding.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <type_traits>

#ifdef __CUDACC__
#define ENGINE_HOST_DEVICE __host__ __device__
#define ENGINE_UNROLL _Pragma("unroll")
#define ENGINE_NO_UNROLL _Pragma("unroll 1")
#else
#define ENGINE_HOST_DEVICE
#define ENGINE_UNROLL
#define ENGINE_NO_UNROLL
#endif

namespace engine {
namespace direct {

constexpr int kThreads = 256;
// Output rows per block (and per statistics partial) of the data gradient, which has no statistics.
constexpr int kDgradRowsPerBlock = 512;

// Row `dest` of the output (forward) or of the input gradient (transposed), through tap
// `k` of one spatial axis: the row of the source it reads, or -1 where that is padding
// (forward) or no output pixel lands (transposed, stride 2 skips every other one).
// STRIDE is a template parameter so that the transposed case's division and remainder
// compile to a shift and a mask instead of an integer division.
template <bool TRANSPOSED, int STRIDE>
ENGINE_HOST_DEVICE inline int source_row(int dest, int k, int source_size) {
  static_assert(STRIDE == 1 || STRIDE == 2, "the direct kernels take stride 1 or 2");
  int s;
  if (TRANSPOSED) {
    const int t = dest + 1 - k;
    if (t < 0) return -1;
    // Unsigned, so that the compiler needs no rounding fix-up for negative values.
    const unsigned u = static_cast<unsigned>(t);
    if (u % STRIDE != 0) return -1;
    s = static_cast<int>(u / STRIDE);
  } else {
    s = dest * STRIDE - 1 + k;
  }
  return (s >= 0 && s < source_size) ? s : -1;
}

// Wherever source_row is not -1 it is anchor_row(dest) + tap_shift(k): the anchor depends
// on the pixel only and the shift on the tap only (transposed, stride 2: the taps that
// land are k = 1 - (dest & 1) + 2i, and (dest + 1 - k) / 2 = (dest + 1) / 2 - k / 2 for
// them), so a tap's source address is a per-pixel offset plus one the whole block shares.
template <bool TRANSPOSED, int STRIDE>
ENGINE_HOST_DEVICE inline int anchor_row(int dest) {
  return TRANSPOSED ? static_cast<int>(static_cast<unsigned>(dest + 1) / STRIDE) : dest * STRIDE - 1;
}

template <bool TRANSPOSED, int STRIDE>
ENGINE_HOST_DEVICE inline int tap_shift(int k) {
  return TRANSPOSED ? -(k / STRIDE) : k;
}

// Groups per block: a power of two so that lanes divide the block, at most 32 (a warp
// spans whole pixels), and at width 8 at most 16 to keep the weights under 48 KiB.
ENGINE_HOST_DEVICE constexpr int max_groups_per_block(int width) { return width == 8 ? 16 : 32; }

inline int groups_per_block(int64_t groups, int width) {
  const int64_t cap = std::min<int64_t>(groups, max_groups_per_block(width));
  int gb = 1;
  while (gb * 2 <= cap) gb *= 2;
  return gb;
}

// A group's channels of one pixel, loaded and stored as one (or, past 16 bytes, two) vector accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename T, int N>
ENGINE_HOST_DEVICE inline Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T>
ENGINE_HOST_DEVICE inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// (count, mean, centred sum of squares) of two disjoint sets -> of their union.
ENGINE_HOST_DEVICE inline void chan_merge(float& n, float& mean, float& m2, float n_b, float mean_b, float m2_b) {
  if (n_b == 0.f) return;
  const float total = n + n_b;
  const float delta = mean_b - mean, frac = n_b / total;
  mean += delta * frac;
  m2 += m2_b + delta * delta * n * frac;
  n = total;
}

// Which (group, pixel lane) a thread is, in a block of `threads` threads over `gb` groups.
struct Lane {
  int group_lane, pixel_lane, pixel_lanes;
  ENGINE_HOST_DEVICE Lane(int thread, int threads, int gb)
      : group_lane(thread % gb), pixel_lane(thread / gb), pixel_lanes(threads / gb) {}
};

// ------------------------------------------------------------------ forward / data gradient

template <typename T>
struct ConvArgs {
  const T* src;           // [N, Hs, Ws, C]: x (forward) or dY (transposed)
  const T* weight;        // [C, CG, 3, 3], dense
  const float* in_scale;  // [C] or null: src = relu(src * scale + shift) on load
  const float* in_shift;  // [C] or null
  T* dest;                // [N, Hd, Wd, C]
  float* part;            // [2, tiles, C] or null: per tile, sum and centred sum of squares
  int64_t M;              // N * Hd * Wd
  int Hs, Ws, Hd, Wd, C, G, GB, rows_per_part, tiles;  // the stride is the kernels' STRIDE
};

// Weights a conv thread reads from shared memory at once: 4 (16 bytes) from width 4 up.
ENGINE_HOST_DEVICE constexpr int conv_weight_vector(int width) { return width < 4 ? width : 4; }

// Shared floats the conv kernel needs: its weights, then the statistics merge.
inline int conv_shared_floats(int width, int threads) {
  return std::max(9 * width * width * max_groups_per_block(width), threads * (1 + 2 * width));
}

// Phase 1: the block's weights into shared memory as fp32 [tap][source j][destination o /
// WV][group lane][o % WV], WV = conv_weight_vector: a thread reads WV outputs' weights as
// one vector, the lanes of a quarter warp read consecutive vectors (no bank conflicts), and
// the group lanes' stride is the compile-time maximum, not the block's GB, so that every
// read in the tap loop is at a constant offset from one per-thread address.
template <typename T, int CG, bool TRANSPOSED>
ENGINE_HOST_DEVICE inline void conv_load_weights(const ConvArgs<T>& a, int block_y, int thread, int threads,
                                                 float* smem) {
  constexpr int WV = conv_weight_vector(CG), GBMAX = max_groups_per_block(CG);
  for (int e = thread; e < 9 * CG * CG * GBMAX; e += threads) {
    const int gl = (e / WV) % GBMAX, o = (e / (WV * GBMAX)) % (CG / WV) * WV + e % WV;
    const int j = (e / (GBMAX * CG)) % CG, tap = e / (GBMAX * CG * CG);
    const int group = gl < a.GB ? block_y * a.GB + gl : a.G;
    // Forward: output o of the group reads input j through weight[o][j]; transposed: input
    // gradient o reads output gradient j through weight[j][o].
    const int w_out = TRANSPOSED ? j : o, w_in = TRANSPOSED ? o : j;
    smem[e] = group < a.G
                  ? static_cast<float>(a.weight[((static_cast<int64_t>(group) * CG + w_out) * CG + w_in) * 9 + tap])
                  : 0.f;
  }
}

template <int CG>
struct RowStats {
  float count = 0.f, mean[CG] = {}, m2[CG] = {};
};

// Pixels a conv thread computes at once: each weight read from shared memory feeds PX
// multiply-adds (one read per multiply-add would leave the kernel bound by shared memory).
template <int CG>
constexpr int conv_pixels_per_thread() {
  return CG >= 8 ? 2 : 4;
}

// Phase 2: the thread's rows of the tile (rows pixel_lane, pixel_lane + lanes, ... so a
// warp's loads stay contiguous), PX at a time, written to dest; returns the Welford
// statistics of what it stored (no rows for threads past the groups or the tile).
// PROLOGUE (the forward's batch norm + ReLU on load) is a template parameter so that the
// tap loop has one path; the host picks it from in_scale.
template <typename T, int CG, bool TRANSPOSED, int STRIDE, bool PROLOGUE>
ENGINE_HOST_DEVICE inline RowStats<CG> conv_rows(const ConvArgs<T>& a, int block_x, int block_y, int thread,
                                                 int threads, const float* smem) {
  constexpr int PX = conv_pixels_per_thread<CG>();
  constexpr int WV = conv_weight_vector(CG), GBMAX = max_groups_per_block(CG);
  RowStats<CG> stats;
  const Lane lane(thread, threads, a.GB);
  const int group = block_y * a.GB + lane.group_lane;
  if (group >= a.G) return stats;
  float scale[CG], shift[CG];
  ENGINE_UNROLL
  for (int j = 0; j < CG; ++j) {
    scale[j] = PROLOGUE ? a.in_scale[group * CG + j] : 1.f;
    shift[j] = PROLOGUE ? a.in_shift[group * CG + j] : 0.f;
  }
  const int64_t first = static_cast<int64_t>(block_x) * a.rows_per_part;
  const int64_t last = first + a.rows_per_part < a.M ? first + a.rows_per_part : a.M;
  const int64_t plane = static_cast<int64_t>(a.Hd) * a.Wd, source_plane = static_cast<int64_t>(a.Hs) * a.Ws;
  for (int64_t base = first + lane.pixel_lane; base < last; base += PX * lane.pixel_lanes) {
    int64_t row[PX], anchor[PX];  // anchor: element offset of the group at the pixel's source anchor
    unsigned taps[PX];            // bit tap: that tap reads a source pixel
    unsigned any_taps = 0;
    float acc[PX][CG];
    ENGINE_UNROLL
    for (int k = 0; k < PX; ++k) {
      row[k] = base + k * lane.pixel_lanes;
      const bool ok = row[k] < last;
      const int64_t r = ok ? row[k] : base;
      const int64_t image = r / plane;
      const int pixel = static_cast<int>(r - image * plane);
      const int dh = pixel / a.Wd, dw = pixel - dh * a.Wd;
      anchor[k] = (image * source_plane + static_cast<int64_t>(anchor_row<TRANSPOSED, STRIDE>(dh)) * a.Ws +
                   anchor_row<TRANSPOSED, STRIDE>(dw)) * a.C + group * CG;
      unsigned columns = 0;
      ENGINE_UNROLL
      for (int kw = 0; kw < 3; ++kw) columns |= (source_row<TRANSPOSED, STRIDE>(dw, kw, a.Ws) >= 0 ? 1u : 0u) << kw;
      taps[k] = 0;
      ENGINE_UNROLL
      for (int kh = 0; kh < 3; ++kh) {
        if (ok && source_row<TRANSPOSED, STRIDE>(dh, kh, a.Hs) >= 0) taps[k] |= columns << (kh * 3);
      }
      any_taps |= taps[k];
      ENGINE_UNROLL
      for (int o = 0; o < CG; ++o) acc[k][o] = 0.f;
    }
    // Taps one at a time: unrolling them would hold 9 x PX loaded vectors in registers.
    ENGINE_NO_UNROLL
    for (int tap = 0; tap < 9; ++tap) {
      if (!((any_taps >> tap) & 1u)) continue;
      const int kh = tap / 3, kw = tap - kh * 3;
      const int64_t step =
          static_cast<int64_t>(tap_shift<TRANSPOSED, STRIDE>(kh) * a.Ws + tap_shift<TRANSPOSED, STRIDE>(kw)) * a.C;
      float h[PX][CG];
      ENGINE_UNROLL
      for (int k = 0; k < PX; ++k) {
        const bool valid = (taps[k] >> tap) & 1u;
        Pack<T, CG> in;
        if (valid) in = load_pack<T, CG>(a.src + (anchor[k] + step));
        ENGINE_UNROLL
        for (int j = 0; j < CG; ++j) {
          float v = valid ? static_cast<float>(in.v[j]) : 0.f;
          // The padding is zero after the prologue, as for a stored normalised tensor.
          if (PROLOGUE && valid) v = round_to<T>(fmaxf(fmaf(v, scale[j], shift[j]), 0.f));
          h[k][j] = v;
        }
      }
      // One address per tap; every weight read below is at a constant offset from it.
      const float* w = smem + tap * CG * CG * GBMAX + lane.group_lane * WV;
      ENGINE_UNROLL
      for (int j = 0; j < CG; ++j) {
        ENGINE_UNROLL
        for (int ov = 0; ov < CG / WV; ++ov) {
          const Pack<float, WV> wv = load_pack<float, WV>(w + (j * (CG / WV) + ov) * GBMAX * WV);
          ENGINE_UNROLL
          for (int oi = 0; oi < WV; ++oi) {
            ENGINE_UNROLL
            for (int k = 0; k < PX; ++k) acc[k][ov * WV + oi] = fmaf(h[k][j], wv.v[oi], acc[k][ov * WV + oi]);
          }
        }
      }
    }
    ENGINE_UNROLL
    for (int k = 0; k < PX; ++k) {
      if (row[k] >= last) continue;
      Pack<T, CG> out;
      ENGINE_UNROLL
      for (int o = 0; o < CG; ++o) out.v[o] = static_cast<T>(acc[k][o]);
      *reinterpret_cast<Pack<T, CG>*>(a.dest + row[k] * a.C + group * CG) = out;
      if (a.part != nullptr) {
        // Statistics of the values as stored, which an unfused batch norm would read back.
        stats.count += 1.f;
        const float inv = 1.f / stats.count;
        ENGINE_UNROLL
        for (int o = 0; o < CG; ++o) {
          const float v = static_cast<float>(out.v[o]), d = v - stats.mean[o];
          stats.mean[o] += d * inv;
          stats.m2[o] += d * (v - stats.mean[o]);
        }
      }
    }
  }
  return stats;
}

// Phase 3 (statistics only): each thread's Welford state into shared memory.
template <int CG>
ENGINE_HOST_DEVICE inline void conv_share_stats(const RowStats<CG>& stats, int thread, float* smem) {
  float* mine = smem + thread * (1 + 2 * CG);
  mine[0] = stats.count;
  for (int o = 0; o < CG; ++o) {
    mine[1 + o] = stats.mean[o];
    mine[1 + CG + o] = stats.m2[o];
  }
}

// Phase 4 (statistics only): thread (o, group lane) merges that channel over the pixel
// lanes and writes the tile's partials.
template <typename T, int CG>
ENGINE_HOST_DEVICE inline void conv_write_stats(const ConvArgs<T>& a, int block_x, int block_y, int thread,
                                                int threads, const float* smem) {
  if (thread >= a.GB * CG) return;
  const int gl = thread % a.GB, o = thread / a.GB;
  const int group = block_y * a.GB + gl;
  if (group >= a.G) return;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int p = 0; p < threads / a.GB; ++p) {
    const float* other = smem + (p * a.GB + gl) * (1 + 2 * CG);
    chan_merge(n, mean, m2, other[0], other[1 + o], other[1 + CG + o]);
  }
  const int64_t c = static_cast<int64_t>(group) * CG + o;
  a.part[static_cast<int64_t>(block_x) * a.C + c] = mean * n;
  a.part[(static_cast<int64_t>(a.tiles) + block_x) * a.C + c] = m2;
}

// ------------------------------------------------------------------ weight gradient

// Taps a thread accumulates: TAPS x CG x CG fp32 sums in registers, all 9 up to width 2.
template <int CG>
constexpr int wgrad_taps() {
  return CG <= 2 ? 9 : (CG == 4 ? 3 : 1);
}

template <typename T>
struct WgradArgs {
  const T* grad_y;        // [N, Ho, Wo, C]
  const T* x;             // [N, H, W, C], before the prologue
  const float* in_scale;  // [C] or null
  const float* in_shift;  // [C] or null
  float* part;            // [splits, 9, C, CG]: dW per tap over each split's rows
  int64_t M;              // N * Ho * Wo
  int64_t rows_per_split;
  int H, W, Ho, Wo, C, G, GB, stride;
};

// Blocks of the weight gradient: (tap chunks, row splits, group chunks), the tap chunk
// fastest so that the chunks reading the same rows run together.
struct WgradPlan {
  int64_t tap_chunks, splits, group_chunks, rows_per_split;
};

// `resident` is how many of the kernel's blocks the device runs at once (the occupancy
// API's blocks per SM times the SMs): the rows are split so that the grid fills it.
inline WgradPlan wgrad_plan(int64_t m, int64_t groups, int taps, int gb, int64_t resident) {
  WgradPlan plan;
  plan.tap_chunks = 9 / taps;
  plan.group_chunks = (groups + gb - 1) / gb;
  const int64_t lanes = kThreads / gb, per_split = plan.tap_chunks * plan.group_chunks;
  int64_t splits = (std::max<int64_t>(resident, 1) + per_split - 1) / per_split;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, (m + lanes - 1) / lanes, 65535}));
  plan.rows_per_split = (m + splits - 1) / splits;
  plan.splits = (m + plan.rows_per_split - 1) / plan.rows_per_split;
  return plan;
}

template <int CG, int TAPS>
struct WgradSums {
  float v[TAPS][CG][CG] = {};  // [tap in chunk][output o][input j]
};

// Phase 1: the thread's rows of the split, all its taps.
template <typename T, int CG, int TAPS>
ENGINE_HOST_DEVICE inline WgradSums<CG, TAPS> wgrad_rows(const WgradArgs<T>& a, int tap_chunk, int64_t split,
                                                         int group_chunk, int thread, int threads) {
  WgradSums<CG, TAPS> sums;
  const Lane lane(thread, threads, a.GB);
  const int group = group_chunk * a.GB + lane.group_lane;
  if (group >= a.G) return sums;
  const bool prologue = a.in_scale != nullptr;
  float scale[CG], shift[CG];
  for (int j = 0; j < CG; ++j) {
    scale[j] = prologue ? a.in_scale[group * CG + j] : 1.f;
    shift[j] = prologue ? a.in_shift[group * CG + j] : 0.f;
  }
  const int64_t first = split * a.rows_per_split;
  const int64_t last = first + a.rows_per_split < a.M ? first + a.rows_per_split : a.M;
  const int64_t plane = static_cast<int64_t>(a.Ho) * a.Wo;
  for (int64_t r = first + lane.pixel_lane; r < last; r += lane.pixel_lanes) {
    const int64_t n = r / plane;
    const int pixel = static_cast<int>(r - n * plane);
    const int oh = pixel / a.Wo, ow = pixel - oh * a.Wo;
    const Pack<T, CG> gp = load_pack<T, CG>(a.grad_y + r * a.C + group * CG);
    float g[CG];
    ENGINE_UNROLL
    for (int o = 0; o < CG; ++o) g[o] = static_cast<float>(gp.v[o]);
    ENGINE_UNROLL
    for (int t = 0; t < TAPS; ++t) {
      const int tap = tap_chunk * TAPS + t, kh = tap / 3, kw = tap - kh * 3;
      // The stride multiplies here (no division), so it stays a runtime value.
      const int ih = oh * a.stride - 1 + kh, iw = ow * a.stride - 1 + kw;
      if (ih < 0 || ih >= a.H || iw < 0 || iw >= a.W) continue;
      const Pack<T, CG> in = load_pack<T, CG>(a.x + ((n * a.H + ih) * a.W + iw) * a.C + group * CG);
      ENGINE_UNROLL
      for (int j = 0; j < CG; ++j) {
        float h = static_cast<float>(in.v[j]);
        if (prologue) h = round_to<T>(fmaxf(fmaf(h, scale[j], shift[j]), 0.f));
        ENGINE_UNROLL
        for (int o = 0; o < CG; ++o) sums.v[t][o][j] = fmaf(g[o], h, sums.v[t][o][j]);
      }
    }
  }
  return sums;
}

// Phase 2, once per (t, o) of the chunk: each thread's row of sums into shared memory ...
template <int CG, int TAPS>
ENGINE_HOST_DEVICE inline void wgrad_share(const WgradSums<CG, TAPS>& sums, int t, int o, int thread, float* smem) {
  for (int j = 0; j < CG; ++j) smem[thread * CG + j] = sums.v[t][o][j];
}

// ... phase 3: thread (j, group lane) sums that weight over the pixel lanes into the split's partial.
template <typename T, int CG, int TAPS>
ENGINE_HOST_DEVICE inline void wgrad_write(const WgradArgs<T>& a, int tap_chunk, int64_t split, int group_chunk,
                                           int t, int o, int thread, int threads, const float* smem) {
  if (thread >= a.GB * CG) return;
  const int gl = thread % a.GB, j = thread / a.GB;
  const int group = group_chunk * a.GB + gl;
  if (group >= a.G) return;
  float total = 0.f;
  for (int p = 0; p < threads / a.GB; ++p) total += smem[(p * a.GB + gl) * CG + j];
  const int64_t c = static_cast<int64_t>(group) * CG + o;
  a.part[((split * 9 + tap_chunk * TAPS + t) * a.C + c) * CG + j] = total;
}

// Runs f with a value of the element type (float, c10::Half or c10::BFloat16; the checks
// reject the rest), so that kernels are compiled for the three types the ops take only.
template <typename F>
inline void with_dtype(c10::ScalarType type, F&& f) {
  switch (type) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "grouped_conv3x3: no direct kernel for ", type);
  }
}

// Runs f with the group width as a compile-time constant (widths direct_conv_width_supported takes).
template <typename F>
inline void with_width(int64_t width, F&& f) {
  switch (width) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "grouped_conv3x3: no direct kernel for group width ", width);
  }
}

// Runs f with the stride as a compile-time constant (1 or 2, what the checks accept).
template <typename F>
inline void with_stride(int64_t stride, F&& f) {
  switch (stride) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: TORCH_CHECK(false, "grouped_conv3x3: stride must be 1 or 2, got ", stride);
  }
}

}  // namespace direct
}  // namespace engine
