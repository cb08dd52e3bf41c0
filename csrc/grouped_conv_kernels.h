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
// Blocks per SM the weight gradient's row split aims for.
constexpr int kWgradBlocksPerSM = 4;
// Output rows per block (and per statistics partial) of the data gradient, which has no statistics.
constexpr int kDgradRowsPerBlock = 512;

// Row `dest` of the output (forward) or of the input gradient (transposed), through tap
// `k` of one spatial axis: the row of the source it reads, or -1 where that is padding
// (forward) or no output pixel lands (transposed, stride 2 skips every other one).
template <bool TRANSPOSED>
ENGINE_HOST_DEVICE inline int source_row(int dest, int k, int stride, int source_size) {
  int s;
  if (TRANSPOSED) {
    const int t = dest + 1 - k;
    if (t < 0 || t % stride != 0) return -1;
    s = t / stride;
  } else {
    s = dest * stride - 1 + k;
  }
  return (s >= 0 && s < source_size) ? s : -1;
}

// Groups per block: a power of two so that lanes divide the block, at most 32 (a warp
// spans whole pixels), and at width 8 at most 16 to keep the weights under 48 KiB.
inline int groups_per_block(int64_t groups, int width) {
  const int64_t cap = std::min<int64_t>(groups, width == 8 ? 16 : 32);
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
  int Hs, Ws, Hd, Wd, C, G, GB, stride, rows_per_part, tiles;
};

// Shared floats the conv kernel needs: its weights, then the statistics merge.
inline int conv_shared_floats(int width, int gb, int threads) {
  return std::max(9 * width * width * gb, threads * (1 + 2 * width));
}

// Phase 1: the block's weights into shared memory as [tap][source j][destination o][group
// lane], fp32, so that the lanes of a warp read consecutive words.
template <typename T, int CG, bool TRANSPOSED>
ENGINE_HOST_DEVICE inline void conv_load_weights(const ConvArgs<T>& a, int block_y, int thread, int threads,
                                                 float* smem) {
  for (int e = thread; e < 9 * CG * CG * a.GB; e += threads) {
    const int gl = e % a.GB, o = (e / a.GB) % CG, j = (e / (a.GB * CG)) % CG, tap = e / (a.GB * CG * CG);
    const int group = block_y * a.GB + gl;
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
template <typename T, int CG, bool TRANSPOSED>
ENGINE_HOST_DEVICE inline RowStats<CG> conv_rows(const ConvArgs<T>& a, int block_x, int block_y, int thread,
                                                 int threads, const float* smem) {
  constexpr int PX = conv_pixels_per_thread<CG>();
  RowStats<CG> stats;
  const Lane lane(thread, threads, a.GB);
  const int group = block_y * a.GB + lane.group_lane;
  if (group >= a.G) return stats;
  const bool prologue = a.in_scale != nullptr;
  float scale[CG], shift[CG];
  ENGINE_UNROLL
  for (int j = 0; j < CG; ++j) {
    scale[j] = prologue ? a.in_scale[group * CG + j] : 1.f;
    shift[j] = prologue ? a.in_shift[group * CG + j] : 0.f;
  }
  const int64_t first = static_cast<int64_t>(block_x) * a.rows_per_part;
  const int64_t last = first + a.rows_per_part < a.M ? first + a.rows_per_part : a.M;
  const int64_t plane = static_cast<int64_t>(a.Hd) * a.Wd;
  for (int64_t base = first + lane.pixel_lane; base < last; base += PX * lane.pixel_lanes) {
    int64_t row[PX], image[PX];
    int dh[PX], dw[PX];
    bool ok[PX];
    float acc[PX][CG];
    ENGINE_UNROLL
    for (int k = 0; k < PX; ++k) {
      row[k] = base + k * lane.pixel_lanes;
      ok[k] = row[k] < last;
      const int64_t r = ok[k] ? row[k] : base;
      image[k] = r / plane;
      const int pixel = static_cast<int>(r - image[k] * plane);
      dh[k] = pixel / a.Wd;
      dw[k] = pixel - dh[k] * a.Wd;
      ENGINE_UNROLL
      for (int o = 0; o < CG; ++o) acc[k][o] = 0.f;
    }
    // Taps one at a time: unrolling them would hold 9 x PX loaded vectors in registers.
    ENGINE_NO_UNROLL
    for (int tap = 0; tap < 9; ++tap) {
      const int kh = tap / 3, kw = tap - kh * 3;
      float h[PX][CG];
      bool any = false;
      ENGINE_UNROLL
      for (int k = 0; k < PX; ++k) {
        const int sh = source_row<TRANSPOSED>(dh[k], kh, a.stride, a.Hs);
        const int sw = source_row<TRANSPOSED>(dw[k], kw, a.stride, a.Ws);
        const bool valid = ok[k] && sh >= 0 && sw >= 0;
        any |= valid;
        Pack<T, CG> in;
        if (valid) in = load_pack<T, CG>(a.src + ((image[k] * a.Hs + sh) * a.Ws + sw) * a.C + group * CG);
        ENGINE_UNROLL
        for (int j = 0; j < CG; ++j) {
          float v = valid ? static_cast<float>(in.v[j]) : 0.f;
          // The padding is zero after the prologue, as for a stored normalised tensor.
          if (prologue && valid) v = round_to<T>(fmaxf(fmaf(v, scale[j], shift[j]), 0.f));
          h[k][j] = v;
        }
      }
      if (!any) continue;
      const float* w = smem + tap * CG * CG * a.GB + lane.group_lane;
      ENGINE_UNROLL
      for (int j = 0; j < CG; ++j) {
        ENGINE_UNROLL
        for (int o = 0; o < CG; ++o) {
          const float wv = w[(j * CG + o) * a.GB];
          ENGINE_UNROLL
          for (int k = 0; k < PX; ++k) acc[k][o] = fmaf(h[k][j], wv, acc[k][o]);
        }
      }
    }
    ENGINE_UNROLL
    for (int k = 0; k < PX; ++k) {
      if (!ok[k]) continue;
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

inline WgradPlan wgrad_plan(int64_t m, int64_t groups, int taps, int gb, int64_t sms) {
  WgradPlan plan;
  plan.tap_chunks = 9 / taps;
  plan.group_chunks = (groups + gb - 1) / gb;
  const int64_t lanes = kThreads / gb, per_split = plan.tap_chunks * plan.group_chunks;
  int64_t splits = (kWgradBlocksPerSM * sms + per_split - 1) / per_split;
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
      const int ih = source_row<false>(oh, kh, a.stride, a.H), iw = source_row<false>(ow, kw, a.stride, a.W);
      if (ih < 0 || iw < 0) continue;
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

}  // namespace direct
}  // namespace engine
