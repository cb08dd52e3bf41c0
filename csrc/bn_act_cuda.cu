// CUDA kernels of bn_act: batch norm (+ residual) (+ ReLU), NCHW or NHWC, fp32/fp16/bf16.
//
// Forward: a reduction pass writes per-(split, channel) partial sums of x shifted by
// each channel's first value (fp32), a one-thread-per-channel finalise turns them into
// mean, invstd, the running-stat update and an affine pair, and an elementwise pass
// writes relu(x * scale + offset + residual). Backward mirrors it: a reduction pass for
// sum(g) and sum(g * (x - mean)) (writing the ReLU-masked gradient when the residual
// needs it), a finalise into dx = g * k_g + x * k_x + k_0, and an elementwise pass.
// Partial sums instead of atomics keep results deterministic run to run.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers
// that a bare CUDA toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "bn_act.h"

namespace engine {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSplits = 256;

// The dtypes the checks accept: no kernels are compiled for the others (double).
#define ENGINE_DISPATCH_BN_ACT_TYPES(TYPE, NAME, ...)                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                 \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// A reduction block covers CHANNELS channels by ROW_LANES rows per step; NHWC puts
// channels on consecutive threads, NCHW puts pixels there, so loads coalesce in both.
template <bool CL>
struct Tile {
  static constexpr int CHANNELS = CL ? 32 : 8;
  static constexpr int ROW_LANES = kThreads / CHANNELS;
  __device__ static int channel_lane() { return CL ? threadIdx.x % CHANNELS : threadIdx.x / ROW_LANES; }
  __device__ static int row_lane() { return CL ? threadIdx.x / CHANNELS : threadIdx.x % ROW_LANES; }
  __device__ static int64_t offset(int64_t row, int64_t c, int64_t C, int64_t S) {
    if (CL) return row * C + c;
    int64_t image = row / S;
    return (image * C + c) * S + (row - image * S);
  }
};

// Sums over the ROW_LANES lanes of each channel; the result is valid for row lane 0.
template <bool CL>
__device__ void reduce_rows(float& a, float& b, float (*scratch)[kThreads]) {
  using T = Tile<CL>;
  scratch[0][threadIdx.x] = a;
  scratch[1][threadIdx.x] = b;
  __syncthreads();
  if (T::row_lane() == 0) {
    for (int lane = 1; lane < T::ROW_LANES; ++lane) {
      int other = CL ? lane * T::CHANNELS + T::channel_lane() : T::channel_lane() * T::ROW_LANES + lane;
      a += scratch[0][other];
      b += scratch[1][other];
    }
  }
}

template <typename scalar_t, bool CL>
__global__ void stats_kernel(const scalar_t* __restrict__ x, const float* __restrict__ shift,
                             float* __restrict__ psum, float* __restrict__ psq, int64_t M, int64_t C, int64_t S,
                             int64_t rows_per_split) {
  using T = Tile<CL>;
  __shared__ float scratch[2][kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * T::CHANNELS + T::channel_lane();
  const int64_t start = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t stop = min(start + rows_per_split, M);
  float sum = 0.f, sum_sq = 0.f;
  if (c < C) {
    const float s = shift[c];
    for (int64_t row = start + T::row_lane(); row < stop; row += T::ROW_LANES) {
      float d = static_cast<float>(x[T::offset(row, c, C, S)]) - s;
      sum += d;
      sum_sq += d * d;
    }
  }
  reduce_rows<CL>(sum, sum_sq, scratch);
  if (c < C && T::row_lane() == 0) {
    psum[blockIdx.y * C + c] = sum;
    psq[blockIdx.y * C + c] = sum_sq;
  }
}

template <typename stat_t>
__global__ void finalize_forward_kernel(const float* __restrict__ psum, const float* __restrict__ psq,
                                        const float* __restrict__ shift, const float* __restrict__ weight,
                                        const float* __restrict__ bias, stat_t* running_mean, stat_t* running_var,
                                        float* __restrict__ mean_out, float* __restrict__ invstd_out,
                                        float* __restrict__ scale_out, float* __restrict__ offset_out, int splits,
                                        int64_t C, int64_t M, float momentum, float eps, bool training) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float mean, var;
  if (training) {
    float total = 0.f, total_sq = 0.f;
    for (int s = 0; s < splits; ++s) {
      total += psum[s * C + c];
      total_sq += psq[s * C + c];
    }
    const float shifted_mean = total / M;
    var = fmaxf(total_sq / M - shifted_mean * shifted_mean, 0.f);
    mean = shifted_mean + shift[c];
    if (running_mean != nullptr) {
      const float unbiased = var * (static_cast<float>(M) / static_cast<float>(M > 1 ? M - 1 : 1));
      running_mean[c] = static_cast<stat_t>((1.f - momentum) * static_cast<float>(running_mean[c]) + momentum * mean);
      running_var[c] = static_cast<stat_t>((1.f - momentum) * static_cast<float>(running_var[c]) + momentum * unbiased);
    }
  } else {
    mean = static_cast<float>(running_mean[c]);
    var = static_cast<float>(running_var[c]);
  }
  const float invstd = rsqrtf(var + eps);
  const float scale = weight[c] * invstd;
  mean_out[c] = mean;
  invstd_out[c] = invstd;
  scale_out[c] = scale;
  offset_out[c] = bias[c] - mean * scale;
}

// The elementwise passes move VEC consecutive elements per access: 16 bytes when the host
// found every pointer 16-byte aligned (with_access), else VEC = 1. Elements past the last
// whole vector (numel % VEC) are the scalar tail, done by the first threads. MAP says how
// an access's elements find their channels (and per-channel coefficients):
//   kChannels  NHWC with C % VEC == 0: channels c .. c + VEC - 1, coefficients loaded as vectors;
//   kPlane     NCHW with S % VEC == 0: all in channel c, one coefficient;
//   kStep      otherwise: each element's channel stepped from the first one's (a wrap
//              where a row of C, or a plane of S, ends), one coefficient per element.
// Either way the 64-bit division that finds a channel runs once per access.
enum Mapping { kChannels, kPlane, kStep };

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <int VEC, int MAP>
struct Channels {
  static_assert(MAP != kChannels || VEC % 4 == 0, "vector coefficient loads take 4 floats at a time");
  int64_t c[VEC];

  __device__ Channels(int64_t e, int64_t C, int64_t S, bool channels_last) {
    if (MAP == kChannels) {
      c[0] = e % C;
    } else if (MAP == kPlane) {
      c[0] = (e / S) % C;
    } else {
      int64_t pos = 0;
      if (channels_last) {
        c[0] = e % C;
      } else {
        const int64_t plane = e / S;
        pos = e - plane * S;
        c[0] = plane % C;
      }
#pragma unroll
      for (int k = 1; k < VEC; ++k) {
        c[k] = c[k - 1];
        if (!channels_last && ++pos < S) continue;
        pos = 0;
        if (++c[k] == C) c[k] = 0;
      }
    }
  }

  // Each element's value of a per-channel table.
  __device__ void gather(const float* __restrict__ table, float (&out)[VEC]) const {
    if (MAP == kChannels) {
#pragma unroll
      for (int q = 0; q < VEC; q += 4) {
        const Vec<float, 4> v = *reinterpret_cast<const Vec<float, 4>*>(table + c[0] + q);
#pragma unroll
        for (int k = 0; k < 4; ++k) out[q + k] = v.v[k];
      }
    } else if (MAP == kPlane) {
      const float v = table[c[0]];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = v;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = table[c[k]];
    }
  }
};

template <typename scalar_t, int VEC, int MAP>
__device__ void apply_forward_at(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                 scalar_t* __restrict__ y, const float* __restrict__ scale,
                                 const float* __restrict__ offset, int64_t e, int64_t C, int64_t S,
                                 bool channels_last, bool relu) {
  using V = Vec<scalar_t, VEC>;
  const V in = *reinterpret_cast<const V*>(x + e);
  V res, out;
  if (residual != nullptr) res = *reinterpret_cast<const V*>(residual + e);
  const Channels<VEC, MAP> ch(e, C, S, channels_last);
  float sc[VEC], of[VEC];
  ch.gather(scale, sc);
  ch.gather(offset, of);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float v = static_cast<float>(in.v[k]) * sc[k] + of[k];
    if (residual != nullptr) v += static_cast<float>(res.v[k]);
    out.v[k] = static_cast<scalar_t>(relu ? fmaxf(v, 0.f) : v);
  }
  *reinterpret_cast<V*>(y + e) = out;
}

template <typename scalar_t, int VEC, int MAP>
__global__ void apply_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                     scalar_t* __restrict__ y, const float* __restrict__ scale,
                                     const float* __restrict__ offset, int64_t elements, int64_t C, int64_t S,
                                     bool channels_last, bool relu) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x, whole = elements / VEC * VEC;
  for (int64_t e = first * VEC; e < whole; e += step * VEC) {
    apply_forward_at<scalar_t, VEC, MAP>(x, residual, y, scale, offset, e, C, S, channels_last, relu);
  }
  if (VEC > 1 && whole + first < elements) {
    apply_forward_at<scalar_t, 1, kStep>(x, residual, y, scale, offset, whole + first, C, S, channels_last, relu);
  }
}

template <typename scalar_t, bool CL>
__global__ void backward_reduce_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ y,
                                       const scalar_t* __restrict__ x, const float* __restrict__ mean,
                                       scalar_t* __restrict__ masked_grad, float* __restrict__ psum,
                                       float* __restrict__ psumx, int64_t M, int64_t C, int64_t S,
                                       int64_t rows_per_split, bool relu) {
  using T = Tile<CL>;
  __shared__ float scratch[2][kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * T::CHANNELS + T::channel_lane();
  const int64_t start = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t stop = min(start + rows_per_split, M);
  float sum = 0.f, sum_x = 0.f;
  if (c < C) {
    const float m = mean[c];
    for (int64_t row = start + T::row_lane(); row < stop; row += T::ROW_LANES) {
      const int64_t o = T::offset(row, c, C, S);
      float g = static_cast<float>(grad_y[o]);
      if (relu && static_cast<float>(y[o]) <= 0.f) g = 0.f;
      if (masked_grad != nullptr) masked_grad[o] = static_cast<scalar_t>(g);
      sum += g;
      sum_x += g * (static_cast<float>(x[o]) - m);
    }
  }
  reduce_rows<CL>(sum, sum_x, scratch);
  if (c < C && T::row_lane() == 0) {
    psum[blockIdx.y * C + c] = sum;
    psumx[blockIdx.y * C + c] = sum_x;
  }
}

__global__ void finalize_backward_kernel(const float* __restrict__ psum, const float* __restrict__ psumx,
                                         const float* __restrict__ mean, const float* __restrict__ invstd,
                                         const float* __restrict__ weight, float* __restrict__ dweight,
                                         float* __restrict__ dbias, float* __restrict__ k_g, float* __restrict__ k_x,
                                         float* __restrict__ k_0, int splits, int64_t C, int64_t M, bool training) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sum_g = 0.f, sum_gx = 0.f;
  for (int s = 0; s < splits; ++s) {
    sum_g += psum[s * C + c];
    sum_gx += psumx[s * C + c];
  }
  const float is = invstd[c];
  const float sum_g_xhat = sum_gx * is;
  const float kg = weight[c] * is;
  dweight[c] = sum_g_xhat;
  dbias[c] = sum_g;
  k_g[c] = kg;
  // dx = k_g * (g - sum_g / M - xhat * sum_g_xhat / M), xhat = (x - mean) * invstd
  const float kx = training ? -kg * is * sum_g_xhat / M : 0.f;
  k_x[c] = kx;
  k_0[c] = training ? -kg * sum_g / M - kx * mean[c] : 0.f;
}

template <typename scalar_t, int VEC, int MAP>
__device__ void apply_backward_at(const scalar_t* __restrict__ g_in, const scalar_t* __restrict__ y,
                                  const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                  const float* __restrict__ k_g, const float* __restrict__ k_x,
                                  const float* __restrict__ k_0, int64_t e, int64_t C, int64_t S, bool channels_last,
                                  bool apply_mask) {
  using V = Vec<scalar_t, VEC>;
  const V g = *reinterpret_cast<const V*>(g_in + e), in = *reinterpret_cast<const V*>(x + e);
  V out, mask;
  if (apply_mask) mask = *reinterpret_cast<const V*>(y + e);
  const Channels<VEC, MAP> ch(e, C, S, channels_last);
  float kg[VEC], kx[VEC], k0[VEC];
  ch.gather(k_g, kg);
  ch.gather(k_x, kx);
  ch.gather(k_0, k0);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float gk = apply_mask && static_cast<float>(mask.v[k]) <= 0.f ? 0.f : static_cast<float>(g.v[k]);
    out.v[k] = static_cast<scalar_t>(gk * kg[k] + static_cast<float>(in.v[k]) * kx[k] + k0[k]);
  }
  *reinterpret_cast<V*>(dx + e) = out;
}

template <typename scalar_t, int VEC, int MAP>
__global__ void apply_backward_kernel(const scalar_t* __restrict__ g_in, const scalar_t* __restrict__ y,
                                      const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                      const float* __restrict__ k_g, const float* __restrict__ k_x,
                                      const float* __restrict__ k_0, int64_t elements, int64_t C, int64_t S,
                                      bool channels_last, bool apply_mask) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x, whole = elements / VEC * VEC;
  for (int64_t e = first * VEC; e < whole; e += step * VEC) {
    apply_backward_at<scalar_t, VEC, MAP>(g_in, y, x, dx, k_g, k_x, k_0, e, C, S, channels_last, apply_mask);
  }
  if (VEC > 1 && whole + first < elements) {
    apply_backward_at<scalar_t, 1, kStep>(g_in, y, x, dx, k_g, k_x, k_0, whole + first, C, S, channels_last,
                                          apply_mask);
  }
}

struct Geometry {
  int64_t rows, channels, pixels, elements;
  bool channels_last;
  int splits;
  int64_t rows_per_split;
  dim3 reduce_grid;
};

Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.channels = x.size(1);
  g.pixels = x.size(2) * x.size(3);
  g.elements = x.numel();
  g.rows = g.channels > 0 ? g.elements / g.channels : 0;
  g.channels_last = is_channels_last(x);
  const int64_t tile_channels = g.channels_last ? Tile<true>::CHANNELS : Tile<false>::CHANNELS;
  const int64_t channel_blocks = (g.channels + tile_channels - 1) / tile_channels;
  // About four blocks per SM of a large GPU, each taking at least 64 rows per lane.
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({kMaxSplits, (1024 + channel_blocks - 1) / channel_blocks,
                                                           (g.rows + 64 * 32 - 1) / (64 * 32)}));
  g.rows_per_split = (g.rows + splits - 1) / splits;
  g.splits = static_cast<int>(g.rows_per_split > 0 ? (g.rows + g.rows_per_split - 1) / g.rows_per_split : 1);
  g.reduce_grid = dim3(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(g.splits));
  return g;
}

unsigned elementwise_blocks(int64_t elements) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((elements + kThreads - 1) / kThreads, int64_t{sms} * 16)));
}

// Runs f(VEC, MAP) for an elementwise pass over x's geometry (see Mapping): 16 bytes per
// access when every pointer the pass touches (null: unused) is 16-byte aligned, as fresh
// allocations are, else one element (views).
template <typename scalar_t, typename F>
void with_access(const Geometry& geo, std::initializer_list<const void*> pointers, F&& f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool aligned = true;
  for (const void* p : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (!aligned) {
    f(std::integral_constant<int, 1>{}, std::integral_constant<int, kStep>{});
  } else if (geo.channels_last && geo.channels % kVec == 0) {
    f(std::integral_constant<int, kVec>{}, std::integral_constant<int, kChannels>{});
  } else if (!geo.channels_last && geo.pixels % kVec == 0) {
    f(std::integral_constant<int, kVec>{}, std::integral_constant<int, kPlane>{});
  } else {
    f(std::integral_constant<int, kVec>{}, std::integral_constant<int, kStep>{});
  }
}

unsigned channel_blocks(int64_t channels) { return static_cast<unsigned>((channels + kThreads - 1) / kThreads); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps, bool relu) {
  check_bn_act_forward(x, weight, bias, residual, running_mean, running_var, training);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry geo = geometry(x);
  const auto f32 = x.options().dtype(at::kFloat);
  auto y = at::empty_like(x);
  auto mean = at::empty({geo.channels}, f32), invstd = at::empty({geo.channels}, f32);
  if (geo.elements == 0) {
    mean.fill_(NAN);
    invstd.fill_(NAN);
    return {y, mean, invstd};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto scale = at::empty({geo.channels}, f32), offset = at::empty({geo.channels}, f32);
  auto w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  auto shift = at::empty({geo.channels}, f32), psum = at::empty({geo.splits, geo.channels}, f32);
  auto psq = at::empty({geo.splits, geo.channels}, f32);
  ENGINE_DISPATCH_BN_ACT_TYPES(x.scalar_type(), "bn_act_forward", [&] {
    if (training) {
      shift.copy_(x.select(0, 0).select(1, 0).select(1, 0));
      if (geo.channels_last) {
        stats_kernel<scalar_t, true><<<geo.reduce_grid, kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), shift.data_ptr<float>(), psum.data_ptr<float>(), psq.data_ptr<float>(),
            geo.rows, geo.channels, geo.pixels, geo.rows_per_split);
      } else {
        stats_kernel<scalar_t, false><<<geo.reduce_grid, kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), shift.data_ptr<float>(), psum.data_ptr<float>(), psq.data_ptr<float>(),
            geo.rows, geo.channels, geo.pixels, geo.rows_per_split);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // Running statistics are updated in their own dtype; a non-float32 pair goes through a float32 copy.
  std::optional<at::Tensor> rm, rv;
  if (running_mean.has_value()) {
    rm = running_mean->scalar_type() == at::kFloat && running_mean->is_contiguous() ? *running_mean
                                                                                    : running_mean->to(at::kFloat).contiguous();
    rv = running_var->scalar_type() == at::kFloat && running_var->is_contiguous() ? *running_var
                                                                                  : running_var->to(at::kFloat).contiguous();
  }
  finalize_forward_kernel<float><<<channel_blocks(geo.channels), kThreads, 0, stream>>>(
      psum.data_ptr<float>(), psq.data_ptr<float>(), shift.data_ptr<float>(), w.data_ptr<float>(),
      b.data_ptr<float>(), rm ? rm->data_ptr<float>() : nullptr, rv ? rv->data_ptr<float>() : nullptr,
      mean.data_ptr<float>(), invstd.data_ptr<float>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
      training ? geo.splits : 0, geo.channels, geo.rows, static_cast<float>(momentum), static_cast<float>(eps),
      training);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (training && running_mean.has_value() && !rm->is_same(*running_mean)) running_mean->copy_(*rm);
  if (training && running_var.has_value() && !rv->is_same(*running_var)) running_var->copy_(*rv);
  ENGINE_DISPATCH_BN_ACT_TYPES(x.scalar_type(), "bn_act_apply", [&] {
    const scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    with_access<scalar_t>(geo, {x.data_ptr(), res, y.data_ptr()}, [&](auto vec, auto map) {
      constexpr int VEC = decltype(vec)::value, MAP = decltype(map)::value;
      apply_forward_kernel<scalar_t, VEC, MAP><<<elementwise_blocks(geo.elements / VEC + 1), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), res, y.data_ptr<scalar_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
          geo.elements, geo.channels, geo.pixels, geo.channels_last, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu, bool write_masked_grad) {
  check_bn_act_backward(grad_y, x, y, weight, mean, invstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry geo = geometry(x);
  const auto f32 = x.options().dtype(at::kFloat);
  auto dx = at::empty_like(x);
  auto masked = write_masked_grad ? at::empty_like(x) : x.new_empty({0});
  auto dweight = at::zeros({geo.channels}, f32), dbias = at::zeros({geo.channels}, f32);
  if (geo.elements == 0) return {dx, dweight, dbias, masked};
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto psum = at::empty({geo.splits, geo.channels}, f32), psumx = at::empty({geo.splits, geo.channels}, f32);
  auto k_g = at::empty({geo.channels}, f32), k_x = at::empty({geo.channels}, f32);
  auto k_0 = at::empty({geo.channels}, f32);
  auto w = weight.to(at::kFloat).contiguous();
  ENGINE_DISPATCH_BN_ACT_TYPES(x.scalar_type(), "bn_act_backward", [&] {
    scalar_t* masked_ptr = write_masked_grad ? masked.data_ptr<scalar_t>() : nullptr;
    if (geo.channels_last) {
      backward_reduce_kernel<scalar_t, true><<<geo.reduce_grid, kThreads, 0, stream>>>(
          grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<float>(),
          masked_ptr, psum.data_ptr<float>(), psumx.data_ptr<float>(), geo.rows, geo.channels, geo.pixels,
          geo.rows_per_split, relu);
    } else {
      backward_reduce_kernel<scalar_t, false><<<geo.reduce_grid, kThreads, 0, stream>>>(
          grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<float>(),
          masked_ptr, psum.data_ptr<float>(), psumx.data_ptr<float>(), geo.rows, geo.channels, geo.pixels,
          geo.rows_per_split, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_backward_kernel<<<channel_blocks(geo.channels), kThreads, 0, stream>>>(
        psum.data_ptr<float>(), psumx.data_ptr<float>(), mean.data_ptr<float>(), invstd.data_ptr<float>(),
        w.data_ptr<float>(), dweight.data_ptr<float>(), dbias.data_ptr<float>(), k_g.data_ptr<float>(),
        k_x.data_ptr<float>(), k_0.data_ptr<float>(), geo.splits, geo.channels, geo.rows, training);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // When the masked gradient is already in memory, read it instead of grad_y and y.
    const scalar_t* g_in = write_masked_grad ? masked_ptr : grad_y.data_ptr<scalar_t>();
    const bool apply_mask = relu && !write_masked_grad;
    const void* mask = apply_mask ? y.data_ptr() : nullptr;
    with_access<scalar_t>(geo, {g_in, mask, x.data_ptr(), dx.data_ptr()}, [&](auto vec, auto map) {
      constexpr int VEC = decltype(vec)::value, MAP = decltype(map)::value;
      apply_backward_kernel<scalar_t, VEC, MAP><<<elementwise_blocks(geo.elements / VEC + 1), kThreads, 0, stream>>>(
          g_in, y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), k_g.data_ptr<float>(),
          k_x.data_ptr<float>(), k_0.data_ptr<float>(), geo.elements, geo.channels, geo.pixels, geo.channels_last,
          apply_mask);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dweight, dbias, masked};
}

}  // namespace
}  // namespace engine

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("bn_act_fwd", &engine::bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &engine::bn_act_bwd_cuda);
}
