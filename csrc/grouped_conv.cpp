// grouped_conv3x3 direct kernels: argument checks and the CPU kernels (the ops' schemas are in
// module.cpp).
//
// The CPU implementation runs the CUDA kernels' own bodies (grouped_conv_kernels.h), block
// by block and phase by phase, so that tests without a GPU execute their indexing, shared
// memory layouts, reductions and rounding, and the whole op path, checks included.
#include "grouped_conv.h"

#include <vector>

namespace engine {

namespace {

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "grouped_conv3x3: ", name, " must be 4-D [N, C, H, W], got ", t.dim(), "-D");
  TORCH_CHECK(t.numel() > 0, "grouped_conv3x3: ", name, " is empty, shape ", t.sizes());
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "grouped_conv3x3: ", name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "grouped_conv3x3: ", name,
              " must be channels_last (NHWC) contiguous, got strides ", t.strides());
}

// The kernels load a group's channels of a pixel as one vector, so they must start aligned.
void check_aligned(const at::Tensor& t, const char* name, int64_t width) {
  const int64_t bytes = width * t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, "grouped_conv3x3: ", name,
              " must start on a ", bytes, "-byte boundary (one group of ", width, " channels), got address ",
              t.data_ptr(), "; pass a fresh tensor (e.g. .clone(memory_format=torch.channels_last))");
}

void check_width(int64_t width, int64_t channels) {
  TORCH_CHECK(direct_conv_width_supported(width) && channels % width == 0, "grouped_conv3x3: the direct kernels ",
              "take group widths 1, 2, 4 or 8 dividing the channels, got width ", width, " for ", channels,
              " channels");
}

// weight [C, width, 3, 3] for an activation of C channels: returns the group width.
int64_t check_weight(const at::Tensor& weight, const at::Tensor& x, const char* x_name) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(2) == 3 && weight.size(3) == 3,
              "grouped_conv3x3: weight must have shape [", channels, ", width, 3, 3] (", x_name, " has ", channels,
              " channels; the direct kernels keep each group's width in and out), got ", weight.sizes());
  const int64_t width = weight.size(1);
  check_width(width, channels);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "grouped_conv3x3: weight must be ", x.scalar_type(), " on ", x.device(), " like ", x_name, ", got ",
              weight.scalar_type(), " on ", weight.device());
  check_aligned(x, x_name, width);
  return width;
}

void check_prologue(const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
                    const at::Tensor& x) {
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(),
              "grouped_conv3x3: pass both in_scale and in_shift (the prologue), or neither");
  for (const auto* t : {&in_scale, &in_shift}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    const char* name = t == &in_scale ? "in_scale" : "in_shift";
    TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1) && v.scalar_type() == at::kFloat && v.is_contiguous() &&
                    v.device() == x.device(),
                "grouped_conv3x3: ", name, " must be a contiguous float32 [", x.size(1), "] on ", x.device(),
                ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
  }
}

void check_stride(int64_t stride) {
  TORCH_CHECK(stride == 1 || stride == 2, "grouped_conv3x3: stride must be 1 or 2, got ", stride);
}

}  // namespace

void check_direct_conv_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
                           const std::optional<at::Tensor>& in_shift, int64_t stride, int64_t rows_per_part) {
  check_activation(x, "x");
  check_weight(weight, x, "x");
  check_prologue(in_scale, in_shift, x);
  check_stride(stride);
  TORCH_CHECK(rows_per_part > 0, "grouped_conv3x3: rows_per_part must be positive, got ", rows_per_part);
}

void check_direct_conv_dgrad(const at::Tensor& grad_y, const at::Tensor& weight, at::IntArrayRef input_hw,
                             int64_t stride) {
  check_activation(grad_y, "grad_y");
  check_weight(weight, grad_y, "grad_y");
  check_stride(stride);
  TORCH_CHECK(input_hw.size() == 2 && input_hw[0] > 0 && input_hw[1] > 0 &&
                  strided_size(input_hw[0], stride) == grad_y.size(2) &&
                  strided_size(input_hw[1], stride) == grad_y.size(3),
              "grouped_conv3x3: input_hw ", input_hw, " with stride ", stride, " does not give grad_y's ",
              grad_y.size(2), "x", grad_y.size(3), " output");
}

void check_direct_conv_wgrad(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                             const std::optional<at::Tensor>& in_shift, int64_t width, int64_t stride) {
  check_activation(grad_y, "grad_y");
  check_activation(x, "x");
  check_stride(stride);
  check_width(width, x.size(1));
  check_aligned(x, "x", width);
  check_aligned(grad_y, "grad_y", width);
  TORCH_CHECK(grad_y.size(0) == x.size(0) && grad_y.size(1) == x.size(1) &&
                  grad_y.size(2) == strided_size(x.size(2), stride) &&
                  grad_y.size(3) == strided_size(x.size(3), stride),
              "grouped_conv3x3: grad_y must have shape [", x.size(0), ", ", x.size(1), ", ",
              strided_size(x.size(2), stride), ", ", strided_size(x.size(3), stride), "] for x of shape ", x.sizes(),
              " and stride ", stride, ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "grouped_conv3x3: grad_y must be ", x.scalar_type(), " on ", x.device(), " like x, got ",
              grad_y.scalar_type(), " on ", grad_y.device());
  check_prologue(in_scale, in_shift, x);
}

namespace {

// Runs a kernel's blocks one after the other, each phase for every thread of the block
// before the next phase, as __syncthreads() orders them on a GPU.
struct CpuBlocks {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  // A small "device" (2 SMs of 4 blocks): the weight gradient still splits its rows, so
  // tests cover the split sum.
  template <typename T, int CG, int TAPS>
  static int64_t wgrad_resident_blocks(const at::Tensor&) {
    return 8;
  }

  template <typename T, int CG, bool TRANSPOSED, int STRIDE, bool PROLOGUE>
  static void conv(const direct::ConvArgs<T>& a, int group_chunks) {
    const int threads = direct::kThreads;
    std::vector<float> smem(direct::conv_shared_floats(CG, threads));
    std::vector<direct::RowStats<CG>> stats(threads);
    for (int by = 0; by < group_chunks; ++by) {
      for (int bx = 0; bx < a.tiles; ++bx) {
        for (int t = 0; t < threads; ++t) {
          direct::conv_load_weights<T, CG, TRANSPOSED>(a, by, t, threads, smem.data());
        }
        for (int t = 0; t < threads; ++t) {
          stats[t] = direct::conv_rows<T, CG, TRANSPOSED, STRIDE, PROLOGUE>(a, bx, by, t, threads, smem.data());
        }
        if (a.part == nullptr) continue;
        for (int t = 0; t < threads; ++t) direct::conv_share_stats<CG>(stats[t], t, smem.data());
        for (int t = 0; t < threads; ++t) direct::conv_write_stats<T, CG>(a, bx, by, t, threads, smem.data());
      }
    }
  }

  template <typename T, int CG, int TAPS>
  static void wgrad(const direct::WgradArgs<T>& a, const direct::WgradPlan& plan) {
    const int threads = direct::kThreads;
    std::vector<float> smem(threads * CG);
    std::vector<direct::WgradSums<CG, TAPS>> sums(threads);
    for (int64_t gz = 0; gz < plan.group_chunks; ++gz)
      for (int64_t split = 0; split < plan.splits; ++split)
        for (int64_t tx = 0; tx < plan.tap_chunks; ++tx) {
          for (int t = 0; t < threads; ++t) sums[t] = direct::wgrad_rows<T, CG, TAPS>(a, tx, split, gz, t, threads);
          for (int tap = 0; tap < TAPS; ++tap)
            for (int o = 0; o < CG; ++o) {
              for (int t = 0; t < threads; ++t) direct::wgrad_share<CG, TAPS>(sums[t], tap, o, t, smem.data());
              for (int t = 0; t < threads; ++t)
                direct::wgrad_write<T, CG, TAPS>(a, tx, split, gz, tap, o, t, threads, smem.data());
            }
        }
  }
};

}  // namespace

}  // namespace engine

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("grouped_conv3x3_fwd", &engine::direct_conv_fwd<engine::CpuBlocks>);
  m.impl("grouped_conv3x3_dgrad", &engine::direct_conv_dgrad<engine::CpuBlocks>);
  m.impl("grouped_conv3x3_wgrad", &engine::direct_conv_wgrad<engine::CpuBlocks>);
}
