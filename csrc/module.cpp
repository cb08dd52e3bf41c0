// engine._C: the Python module, and the schemas of the extension's ops (torch.ops.engine.*).
//
// Each op has a kernel per dispatch key, registered beside its implementation: CPU in
// bn_act.cpp and grouped_conv.cpp (C++ loops that follow the CUDA kernels' plan, so tests
// without a GPU run the whole op path, checks included), CUDA in bn_act_cuda.cu and
// grouped_conv_cuda.cu when built with CUDA. The dispatcher picks one by the tensors'
// device, so the op names carry none. Each implementation checks its arguments first
// (bn_act.h, grouped_conv.h), so a bad call fails naming the argument on either device.
#include <torch/extension.h>

namespace engine {
namespace {

bool built_with_cuda() {
#ifdef ENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace engine

// A fragment: the engine namespace also holds the Triton ops torch.library.custom_op defines
// in Python (kernels/, engine/ops/).
TORCH_LIBRARY_FRAGMENT(engine, m) {
  // bn_act: batch norm (+ residual) (+ ReLU), NCHW or channels_last.
  m.def(
      "bn_act_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_bwd(Tensor grad_y, Tensor x, Tensor y, Tensor weight, Tensor mean, Tensor invstd, "
      "bool training, bool relu, bool write_masked_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // grouped_conv3x3's direct kernels: group widths 1, 2, 4 and 8, channels_last.
  m.def(
      "grouped_conv3x3_fwd(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, int stride, "
      "bool stats, int rows_per_part) -> (Tensor, Tensor)");
  m.def("grouped_conv3x3_dgrad(Tensor grad_y, Tensor weight, int[] input_hw, int stride) -> Tensor");
  m.def(
      "grouped_conv3x3_wgrad(Tensor grad_y, Tensor x, Tensor? in_scale, Tensor? in_shift, int width, "
      "int stride) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engine's compiled kernels; ops are registered under torch.ops.engine";
  m.def("built_with_cuda", &engine::built_with_cuda, "whether the CUDA kernels were compiled in");
}
