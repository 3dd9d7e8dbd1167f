// Schema of the mildnet ops, shared input checks, and the device-agnostic pieces of the backward.
//
//   mildnet::gap_concat(Tensor[] features, bool l2_normalize=False, float eps=1e-12) -> Tensor
//       The public op. CompositeImplicitAutograd: it calls gap_concat_forward and drops the pooled means, so
//       autograd, torch.compile and torch.export all see the forward/backward pair below.
//   mildnet::gap_concat_forward(Tensor[] features, bool l2_normalize, float eps) -> (Tensor out, Tensor pooled)
//       out: Tensor[N, sum C_k] in the input dtype; pooled: the means before normalisation, Tensor[N, sum C_k] in
//       the accumulation dtype, kept for the backward (the L2 jacobian needs the norms that `out` no longer has).
//   mildnet::gap_concat_backward(Tensor grad_out, Tensor pooled, Tensor[] features, bool l2_normalize, float eps)
//       -> Tensor[]   gradients w.r.t. each feature map, in each map's layout.
#include "gap_concat.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace mildnet {

void check_features(at::TensorList features) {
  TORCH_CHECK_VALUE(!features.empty(), "mildnet::gap_concat: expected at least one feature map, got an empty list");
  const at::Tensor& first = features[0];
  for (size_t k = 0; k < features.size(); ++k) {
    const at::Tensor& t = features[k];
    TORCH_CHECK_VALUE(t.dim() == 4, "mildnet::gap_concat: feature map ", k, " has shape ", t.sizes(),
                      "; expected a 4-D tensor [N, C, H, W]");
    const auto dt = t.scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                      "mildnet::gap_concat: feature map ", k, " has dtype ", dt,
                      "; expected float32, float64, float16 or bfloat16");
    TORCH_CHECK_VALUE(dt == first.scalar_type(), "mildnet::gap_concat: mixed dtypes: feature map 0 is ",
                      first.scalar_type(), " but feature map ", k, " is ", dt);
    TORCH_CHECK_VALUE(t.device() == first.device(), "mildnet::gap_concat: mixed devices: feature map 0 is on ",
                      first.device(), " but feature map ", k, " is on ", t.device());
    TORCH_CHECK_VALUE(t.size(0) == first.size(0), "mildnet::gap_concat: differing batch sizes: feature map 0 has N=",
                      first.size(0), " but feature map ", k, " has N=", t.size(0));
    TORCH_CHECK_VALUE(t.size(2) > 0 && t.size(3) > 0, "mildnet::gap_concat: feature map ", k,
                      " has zero-size spatial dims ", t.sizes(), "; the mean over H*W = 0 elements is undefined");
  }
}

MapLayout classify_layout(const at::Tensor& t) {
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  // Size-1 dims may carry any stride; compare strides only where the dim has more than one element.
  const bool w_ok = W == 1 || t.stride(3) == 1;
  const bool h_ok = H == 1 || t.stride(2) == W;
  if (w_ok && h_ok) return MapLayout::kPlanes;
  const bool c_ok = C == 1 || t.stride(1) == 1;
  const bool w_cl = W == 1 || t.stride(3) == C;
  const bool h_cl = H == 1 || t.stride(2) == W * C;
  if (c_ok && w_cl && h_cl) return MapLayout::kChannelsLast;
  return MapLayout::kStrided;
}

at::MemoryFormat grad_memory_format(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor grad_of_pooled(const at::Tensor& grad_out, const at::Tensor& pooled, at::TensorList features,
                          bool l2_normalize, double eps) {
  at::Tensor g = grad_out.to(pooled.scalar_type()).contiguous();  // (N, sum C)
  if (!l2_normalize) return g;
  // y = p / max(||p||, eps)  =>  dp = (g - y <g, y>) / ||p||  if ||p|| > eps,  else g / eps   (as F.normalize).
  at::Tensor gp = at::empty_like(g);
  int64_t offset = 0;
  for (const at::Tensor& f : features) {
    const int64_t C = f.size(1);
    at::Tensor p = pooled.narrow(1, offset, C), gk = g.narrow(1, offset, C);  // (N, C)
    at::Tensor norm = at::linalg_vector_norm(p, 2, {1}, /*keepdim=*/true);      // (N, 1)
    at::Tensor denom = norm.clamp_min(eps);
    at::Tensor y = p / denom;
    at::Tensor projected = (gk - y * (gk * y).sum(1, /*keepdim=*/true)) / denom;
    gp.narrow(1, offset, C).copy_(at::where(norm > eps, projected, gk / eps));
    offset += C;
  }
  return gp;
}

namespace {

at::Tensor gap_concat_composite(at::TensorList features, bool l2_normalize, double eps) {
  // An empty list has no tensor to dispatch on, so say what is wrong here; the kernels check the rest (and the
  // fake kernels under torch.compile, where sizes may be symbolic).
  TORCH_CHECK_VALUE(!features.empty(), "mildnet::gap_concat: expected at least one feature map, got an empty list");
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("mildnet::gap_concat_forward", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, bool, double)>();
  return std::get<0>(forward.call(features, l2_normalize, eps));
}

}  // namespace

TORCH_LIBRARY(mildnet, m) {
  m.def("gap_concat(Tensor[] features, bool l2_normalize=False, float eps=1e-12) -> Tensor");
  m.def("gap_concat_forward(Tensor[] features, bool l2_normalize, float eps) -> (Tensor, Tensor)");
  m.def("gap_concat_backward(Tensor grad_out, Tensor pooled, Tensor[] features, bool l2_normalize, float eps)"
        " -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mildnet, CompositeImplicitAutograd, m) { m.impl("gap_concat", &gap_concat_composite); }

}  // namespace mildnet
