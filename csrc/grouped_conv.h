// grouped_conv3x3 direct kernels: a grouped 3x3 convolution (padding 1, stride 1 or 2) on
// channels_last tensors whose groups are 1, 2, 4 or 8 channels wide, where an implicit
// GEMM wastes most of a tensor-core tile. The ops' host side, shared by both devices: a
// `Blocks` policy runs a kernel's blocks, as CUDA launches (grouped_conv_cuda.cu) or one
// after the other on the CPU (grouped_conv.cpp); the kernels are grouped_conv_kernels.h.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "grouped_conv_kernels.h"

namespace engine {

// Widths the kernels are compiled for. Wider groups carry 9 x width multiply-adds per
// loaded value, past what CUDA cores do at memory speed; the tensor-core paths take them.
inline bool direct_conv_width_supported(int64_t width) {
  return width == 1 || width == 2 || width == 4 || width == 8;
}

// Checks shared by every device, before any work, naming the argument at fault.
void check_direct_conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
                           const std::optional<at::Tensor>& in_shift, int64_t stride, int64_t rows_per_part);
void check_direct_conv_dgrad(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_hw,
                             int64_t stride);
void check_direct_conv_wgrad(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                             const std::optional<at::Tensor>& in_shift, int64_t width, int64_t stride);

inline int64_t strided_size(int64_t size, int64_t stride) { return (size - 1) / stride + 1; }

inline at::Tensor nhwc_empty(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& options) {
  return at::empty({n, c, h, w}, options.memory_format(at::MemoryFormat::ChannelsLast));
}

namespace direct {

inline const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

template <class Blocks, bool TRANSPOSED>
void launch_conv(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
                 const std::optional<at::Tensor>& in_shift, at::Tensor& dest, float* part, int64_t rows_per_part,
                 int64_t stride) {
  const int64_t channels = src.size(1), width = weight.size(1), groups = channels / width;
  const int64_t m = dest.size(0) * dest.size(2) * dest.size(3);
  const int64_t tiles = (m + rows_per_part - 1) / rows_per_part;
  TORCH_CHECK(rows_per_part <= INT32_MAX && tiles <= INT32_MAX, "grouped_conv3x3: ", m, " rows in tiles of ",
              rows_per_part, " exceed the launch grid");
  // Module weights may be channels_last; the kernels index [C, width, 3, 3] densely.
  const at::Tensor w = weight.contiguous();
  with_dtype(src.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    with_width(width, [&](auto cg) {
      constexpr int CG = decltype(cg)::value;
      const int gb = groups_per_block(groups, CG);
      const ConvArgs<scalar_t> args{src.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), optional_ptr(in_scale),
                                    optional_ptr(in_shift), dest.data_ptr<scalar_t>(), part, m,
                                    static_cast<int>(src.size(2)), static_cast<int>(src.size(3)),
                                    static_cast<int>(dest.size(2)), static_cast<int>(dest.size(3)),
                                    static_cast<int>(channels), static_cast<int>(groups), gb,
                                    static_cast<int>(rows_per_part), static_cast<int>(tiles)};
      const int group_chunks = static_cast<int>((groups + gb - 1) / gb);
      with_stride(stride, [&](auto s) {
        constexpr int STRIDE = decltype(s)::value;
        // The data gradient has no prologue: no kernels for it.
        if constexpr (TRANSPOSED) {
          Blocks::template conv<scalar_t, CG, true, STRIDE, false>(args, group_chunks);
        } else if (in_scale.has_value()) {
          Blocks::template conv<scalar_t, CG, false, STRIDE, true>(args, group_chunks);
        } else {
          Blocks::template conv<scalar_t, CG, false, STRIDE, false>(args, group_chunks);
        }
      });
    });
  });
}

}  // namespace direct

template <class Blocks>
std::tuple<at::Tensor, at::Tensor> direct_conv_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& in_scale,
                                                   const std::optional<at::Tensor>& in_shift, int64_t stride,
                                                   bool stats, int64_t rows_per_part) {
  check_direct_conv_fwd(x, weight, in_scale, in_shift, stride, rows_per_part);
  const typename Blocks::Guard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t ho = strided_size(x.size(2), stride), wo = strided_size(x.size(3), stride);
  at::Tensor y = nhwc_empty(n, c, ho, wo, x.options());
  const int64_t tiles = (n * ho * wo + rows_per_part - 1) / rows_per_part;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part = stats ? at::empty({2, tiles, c}, f32) : at::empty({0}, f32);
  direct::launch_conv<Blocks, false>(x, weight, in_scale, in_shift, y, stats ? part.data_ptr<float>() : nullptr,
                                     rows_per_part, stride);
  return {y, part};
}

template <class Blocks>
at::Tensor direct_conv_dgrad(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_hw,
                             int64_t stride) {
  check_direct_conv_dgrad(grad_y, weight, input_hw, stride);
  const typename Blocks::Guard guard(grad_y.device());
  at::Tensor dx = nhwc_empty(grad_y.size(0), grad_y.size(1), input_hw[0], input_hw[1], grad_y.options());
  direct::launch_conv<Blocks, true>(grad_y, weight, std::nullopt, std::nullopt, dx, nullptr,
                                    direct::kDgradRowsPerBlock, stride);
  return dx;
}

template <class Blocks>
at::Tensor direct_conv_wgrad(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                             const std::optional<at::Tensor>& in_shift, int64_t width, int64_t stride) {
  check_direct_conv_wgrad(grad_y, x, in_scale, in_shift, width, stride);
  const typename Blocks::Guard guard(x.device());
  const int64_t channels = x.size(1), groups = channels / width;
  const int64_t m = grad_y.size(0) * grad_y.size(2) * grad_y.size(3);
  at::Tensor dw;
  direct::with_dtype(x.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    direct::with_width(width, [&](auto cg) {
      constexpr int CG = decltype(cg)::value;
      constexpr int TAPS = direct::wgrad_taps<CG>();
      const int gb = direct::groups_per_block(groups, CG);
      const direct::WgradPlan plan =
          direct::wgrad_plan(m, groups, TAPS, gb, Blocks::template wgrad_resident_blocks<scalar_t, CG, TAPS>(x));
      at::Tensor part = at::empty({plan.splits, 9, channels, CG}, x.options().dtype(at::kFloat));
      const direct::WgradArgs<scalar_t> args{grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                             direct::optional_ptr(in_scale), direct::optional_ptr(in_shift),
                                             part.data_ptr<float>(), m, plan.rows_per_split,
                                             static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                                             static_cast<int>(grad_y.size(2)), static_cast<int>(grad_y.size(3)),
                                             static_cast<int>(channels), static_cast<int>(groups), gb,
                                             static_cast<int>(stride)};
      Blocks::template wgrad<scalar_t, CG, TAPS>(args, plan);
      // The splits summed in order: the same result run to run.
      dw = part.sum(0).view({3, 3, channels, CG}).permute({2, 3, 0, 1}).contiguous();
    });
  });
  return dw;
}

}  // namespace engine
