// bn_act: argument checks and the CPU kernels (the ops' schemas are in module.cpp).
//
// The CPU implementation follows the same plan as the CUDA kernels (shifted per-channel
// sums, a finalise into per-channel coefficients, one elementwise pass) so the whole
// extension path, checks included, is exercised by tests on machines without a GPU.
#include "bn_act.h"

#include <cmath>
#include <vector>

namespace engine {

namespace {

const char* layout_help = "contiguous NCHW or channels_last (NHWC)";

void check_dense_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "bn_act: ", name, " must be 4-D [N, C, H, W], got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast), "bn_act: ", name,
              " must be ", layout_help, ", got strides ", t.strides());
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "bn_act: ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

void check_vector(const at::Tensor& t, const char* name, int64_t channels, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "bn_act: ", name, " must have shape [", channels,
              "], got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), "bn_act: ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "bn_act: ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_same_layout(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "bn_act: ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "bn_act: ", name, " must be ",
              x.scalar_type(), " on ", x.device(), " like x, got ", t.scalar_type(), " on ", t.device());
  // Strides of size-1 dimensions may differ; what matters is the order of elements in memory.
  TORCH_CHECK((t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) &&
                  is_channels_last(t) == is_channels_last(x),
              "bn_act: ", name, " must have x's layout (", is_channels_last(x) ? "channels_last" : "NCHW",
              ", strides ", x.strides(), "), got strides ", t.strides());
}

}  // namespace

void check_bn_act_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, bool training) {
  check_dense_4d(x, "x");
  const int64_t channels = x.size(1);
  check_vector(weight, "weight", channels, x);
  check_vector(bias, "bias", channels, x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "bn_act: pass both running_mean and running_var, or neither");
  TORCH_CHECK(training || running_mean.has_value(), "bn_act: eval mode needs running_mean and running_var");
  if (running_mean.has_value()) {
    check_vector(*running_mean, "running_mean", channels, x);
    check_vector(*running_var, "running_var", channels, x);
  }
  if (residual.has_value()) check_same_layout(*residual, "residual", x);
  if (training && x.numel() > 0) {
    TORCH_CHECK(x.numel() / channels > 1, "bn_act: training needs more than 1 value per channel, got x of shape ",
                x.sizes());
  }
}

void check_bn_act_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd) {
  check_dense_4d(x, "x");
  check_same_layout(grad_y, "grad_y", x);
  check_same_layout(y, "y", x);
  const int64_t channels = x.size(1);
  check_vector(weight, "weight", channels, x);
  check_vector(mean, "mean", channels, x);
  check_vector(invstd, "invstd", channels, x);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && invstd.scalar_type() == at::kFloat,
              "bn_act: saved mean and invstd must be float32");
}

namespace {

// Element e of a dense 4-D tensor belongs to channel channel_of(e).
struct ChannelIndex {
  int64_t channels, pixels;
  bool channels_last;
  int64_t operator()(int64_t e) const { return channels_last ? e % channels : (e / pixels) % channels; }
};

ChannelIndex channel_index(const at::Tensor& x) {
  return {x.size(1), x.size(2) * x.size(3), is_channels_last(x)};
}

std::vector<float> as_floats(const at::Tensor& t) {
  auto f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps, bool relu) {
  check_bn_act_forward(x, weight, bias, residual, running_mean, running_var, training);
  const int64_t channels = x.size(1), elements = x.numel(), rows = elements / std::max<int64_t>(channels, 1);
  auto y = at::empty_like(x);
  auto mean = at::empty({channels}, x.options().dtype(at::kFloat));
  auto invstd = at::empty({channels}, x.options().dtype(at::kFloat));
  if (elements == 0) {
    mean.fill_(NAN);
    invstd.fill_(NAN);
    return {y, mean, invstd};
  }
  const auto xf = x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const ChannelIndex channel_of = channel_index(x);
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();
  if (training) {
    // Each channel's value at the first image's first pixel is its shift.
    std::vector<double> sum(channels, 0.0), sum_sq(channels, 0.0), shift(channels);
    for (int64_t c = 0; c < channels; ++c) shift[c] = xp[channel_of.channels_last ? c : c * channel_of.pixels];
    for (int64_t e = 0; e < elements; ++e) {
      int64_t c = channel_of(e);
      double d = xp[e] - shift[c];
      sum[c] += d;
      sum_sq[c] += d * d;
    }
    std::vector<float> new_mean(channels), new_var(channels);
    for (int64_t c = 0; c < channels; ++c) {
      double shifted_mean = sum[c] / rows;
      double var = std::max(sum_sq[c] / rows - shifted_mean * shifted_mean, 0.0);
      mp[c] = static_cast<float>(shifted_mean + shift[c]);
      ip[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
      new_var[c] = static_cast<float>(var * rows / std::max<int64_t>(rows - 1, 1));
    }
    if (running_mean.has_value()) {
      running_mean->mul_(1.0 - momentum).add_(mean.to(running_mean->scalar_type()), momentum);
      auto unbiased = at::from_blob(new_var.data(), {channels}, at::kFloat);
      running_var->mul_(1.0 - momentum).add_(unbiased.to(running_var->scalar_type()), momentum);
    }
  } else {
    auto rm = as_floats(*running_mean), rv = as_floats(*running_var);
    for (int64_t c = 0; c < channels; ++c) {
      mp[c] = rm[c];
      ip[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
    }
  }
  auto w = as_floats(weight), b = as_floats(bias);
  auto out = at::empty_like(xf);
  float* op = out.data_ptr<float>();
  at::Tensor rf;
  const float* rp = nullptr;
  if (residual.has_value()) {
    rf = residual->to(at::kFloat);
    rp = rf.data_ptr<float>();
  }
  for (int64_t e = 0; e < elements; ++e) {
    int64_t c = channel_of(e);
    float scale = w[c] * ip[c];
    float v = xp[e] * scale + (b[c] - mp[c] * scale);
    if (rp) v += rp[e];
    op[e] = relu ? std::max(v, 0.0f) : v;
  }
  y.copy_(out);
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu, bool write_masked_grad) {
  check_bn_act_backward(grad_y, x, y, weight, mean, invstd);
  const int64_t channels = x.size(1), elements = x.numel(), rows = elements / std::max<int64_t>(channels, 1);
  auto dx = at::empty_like(x);
  auto masked = write_masked_grad ? at::empty_like(x) : x.new_empty({0});
  auto dweight = at::zeros({channels}, x.options().dtype(at::kFloat));
  auto dbias = at::zeros({channels}, x.options().dtype(at::kFloat));
  if (elements == 0) return {dx, dweight, dbias, masked};
  const auto gf = grad_y.to(at::kFloat), xf = x.to(at::kFloat), yf = y.to(at::kFloat);
  const float *gp = gf.data_ptr<float>(), *xp = xf.data_ptr<float>(), *yp = yf.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  const ChannelIndex channel_of = channel_index(x);
  auto g = at::empty_like(gf);
  float* gm = g.data_ptr<float>();
  std::vector<double> sum_g(channels, 0.0), sum_gx(channels, 0.0);
  for (int64_t e = 0; e < elements; ++e) {
    int64_t c = channel_of(e);
    gm[e] = (relu && yp[e] <= 0.0f) ? 0.0f : gp[e];
    sum_g[c] += gm[e];
    sum_gx[c] += gm[e] * (static_cast<double>(xp[e]) - mp[c]);
  }
  auto w = as_floats(weight);
  float *dwp = dweight.data_ptr<float>(), *dbp = dbias.data_ptr<float>();
  std::vector<float> k_g(channels), k_x(channels, 0.0f), k_0(channels, 0.0f);
  for (int64_t c = 0; c < channels; ++c) {
    double sum_g_xhat = sum_gx[c] * ip[c];
    dwp[c] = static_cast<float>(sum_g_xhat);
    dbp[c] = static_cast<float>(sum_g[c]);
    k_g[c] = w[c] * ip[c];
    if (training) {
      k_x[c] = static_cast<float>(-k_g[c] * ip[c] * sum_g_xhat / rows);
      k_0[c] = static_cast<float>(-k_g[c] * sum_g[c] / rows - k_x[c] * mp[c]);
    }
  }
  auto dxf = at::empty_like(xf);
  float* dxp = dxf.data_ptr<float>();
  for (int64_t e = 0; e < elements; ++e) {
    int64_t c = channel_of(e);
    dxp[e] = gm[e] * k_g[c] + xp[e] * k_x[c] + k_0[c];
  }
  dx.copy_(dxf);
  if (write_masked_grad) masked.copy_(g);
  return {dx, dweight, dbias, masked};
}

}  // namespace
}  // namespace engine

TORCH_LIBRARY_IMPL(engine, CPU, m) {
  m.impl("bn_act_fwd", &engine::bn_act_fwd_cpu);
  m.impl("bn_act_bwd", &engine::bn_act_bwd_cpu);
}
