// mildnet::gap_concat: global-average-pool K feature maps, optionally L2-normalise each pooled vector, concatenate.
// Shared declarations for the schema file, the CPU kernels and the CUDA kernels. No Python anywhere in here.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace mildnet {

// Validates the feature list; raises c10::ValueError (Python ValueError) naming the problem.
void check_features(at::TensorList features);

// Layout of one 4-D map, as the kernels see it. kPlanes: every (n, c) plane of H*W elements is contiguous (NCHW).
// kChannelsLast: every (n, h, w) row of C channels is contiguous and rows follow each other (NHWC).
// kStrided: anything else (sliced, transposed, ...), read through its strides without a copy.
enum class MapLayout : int { kPlanes = 0, kChannelsLast = 1, kStrided = 2 };
MapLayout classify_layout(const at::Tensor& t);

// Gradients come back in the input's layout: channels_last for channels_last-contiguous inputs, else NCHW.
at::MemoryFormat grad_memory_format(const at::Tensor& t);

// Accumulation dtype: float64 for float64 inputs, float32 for everything else.
at::ScalarType accumulate_type(at::ScalarType t);

// d loss / d pooled (before the 1/(H*W) of the mean), Tensor[N, sum C_k] in the accumulation dtype.
// Applies the L2-normalise jacobian per map when l2_normalize. Small [N, sum C] work; device-agnostic ATen.
at::Tensor grad_of_pooled(const at::Tensor& grad_out, const at::Tensor& pooled, at::TensorList features,
                          bool l2_normalize, double eps);

// Device kernels, registered with TORCH_LIBRARY_IMPL in cpu/ and cuda/.
// Returns (out Tensor[N, sum C] in the input dtype, pooled means Tensor[N, sum C] in the accumulation dtype).
std::tuple<at::Tensor, at::Tensor> gap_concat_forward_cpu(at::TensorList features, bool l2_normalize, double eps);
std::vector<at::Tensor> gap_concat_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pooled,
                                                at::TensorList features, bool l2_normalize, double eps);

}  // namespace mildnet
