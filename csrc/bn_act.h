// bn_act: batch norm (+ residual) (+ ReLU). Shared declarations of the host entry
// points; the CPU loop lives in bn_act.cpp, the CUDA kernels in bn_act_cuda.cu.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace engine {

// Checks shared by every device. They run before any kernel so a bad call fails
// with a message naming the argument, never with a launch error.
void check_bn_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, bool training);

void check_bn_act_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd);

// True for NHWC (channels_last) dense storage, false for NCHW; anything else was rejected by the checks.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace engine
