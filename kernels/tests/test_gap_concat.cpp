// C++ test of libmildnet_ops (run by ctest): calls mildnet::gap_concat and mildnet::gap_concat_backward through
// the dispatcher, with no Python, and checks them against ATen math on CPU (and on CUDA when a GPU is present).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

at::Tensor reference(const std::vector<at::Tensor>& features, bool l2, double eps) {
  std::vector<at::Tensor> pooled;
  for (const at::Tensor& f : features) {
    at::Tensor p = f.to(f.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).mean({2, 3});  // (N, C)
    if (l2) p = p / at::linalg_vector_norm(p, 2, {1}, true).clamp_min(eps);
    pooled.push_back(p);
  }
  return at::cat(pooled, 1).to(features[0].scalar_type());
}

double tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 1e-5;
    default: return 1e-2;  // float16 / bfloat16: one rounding of the output
  }
}

// layout 0: NCHW, 1: channels_last, 2: strided (every other channel of a wider map)
std::vector<at::Tensor> make_features(at::ScalarType dtype, int layout, const at::Device& device) {
  const std::vector<std::vector<int64_t>> shapes = {{3, 8, 7, 7}, {3, 16, 1, 1}, {3, 24, 3, 5}, {3, 64, 40, 40}};
  std::vector<at::Tensor> features;
  for (const auto& s : shapes) {
    at::Tensor f = at::randn({s[0], layout == 2 ? 2 * s[1] : s[1], s[2], s[3]}, at::device(device).dtype(dtype));
    if (layout == 1) f = f.contiguous(at::MemoryFormat::ChannelsLast);
    if (layout == 2) f = f.slice(1, 0, c10::nullopt, 2);
    features.push_back(f);
  }
  return features;
}

void run_device(const at::Device& device) {
  auto gap_concat = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("mildnet::gap_concat", "")
                        .typed<at::Tensor(at::TensorList, bool, double)>();
  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("mildnet::gap_concat_forward", "")
                     .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, bool, double)>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("mildnet::gap_concat_backward", "")
                      .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList, bool,
                                                     double)>();
  const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  for (at::ScalarType dtype : dtypes) {
    for (int layout = 0; layout < 3; ++layout) {
      for (bool l2 : {false, true}) {
        const std::string name = device.str() + " " + std::string(c10::toString(dtype)) + " layout=" +
                                 std::to_string(layout) + " l2=" + std::to_string(l2);
        std::vector<at::Tensor> features = make_features(dtype, layout, device);
        at::Tensor out = gap_concat.call(features, l2, 1e-12);
        at::Tensor ref = reference(features, l2, 1e-12);
        expect(out.sizes() == ref.sizes() && out.scalar_type() == dtype, name + ": shape/dtype");
        const double err = (out.to(at::kDouble) - ref.to(at::kDouble)).abs().max().item<double>();
        expect(err <= tolerance(dtype), name + ": forward error " + std::to_string(err));

        // backward without L2: every grad element is grad_out[n, c] / (H * W), in the input's layout
        if (!l2) {
          auto [o, pooled] = forward.call(features, false, 1e-12);
          at::Tensor grad_out = at::randn(o.sizes(), o.options());
          std::vector<at::Tensor> grads = backward.call(grad_out, pooled, features, false, 1e-12);
          int64_t col = 0;
          for (size_t k = 0; k < features.size(); ++k) {
            const at::Tensor& f = features[k];
            const int64_t C = f.size(1);
            at::Tensor expected = (grad_out.narrow(1, col, C).to(at::kDouble) / double(f.size(2) * f.size(3)))
                                      .view({f.size(0), C, 1, 1})
                                      .expand(f.sizes());
            const double gerr = (grads[k].to(at::kDouble) - expected).abs().max().item<double>();
            expect(gerr <= tolerance(dtype), name + ": backward map " + std::to_string(k) + " error " +
                                                 std::to_string(gerr));
            if (layout == 1) expect(grads[k].is_contiguous(at::MemoryFormat::ChannelsLast),
                                    name + ": channels_last gradient layout");
            col += C;
          }
        }
      }
    }
  }
  // bad input: a clear ValueError, not a crash
  bool threw = false;
  try {
    gap_concat.call(std::vector<at::Tensor>{}, false, 1e-12);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("empty list") != std::string::npos;
  } catch (const std::exception& e) {
    std::printf("empty list raised the wrong error: %.200s\n", e.what());
  }
  expect(threw, device.str() + ": empty list raises ValueError");
  threw = false;
  try {
    gap_concat.call({at::ones({2, 3, 4, 4}, at::device(device)), at::ones({3, 3, 4, 4}, at::device(device))}, false,
                    1e-12);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("batch sizes") != std::string::npos;
  } catch (const std::exception& e) {
    std::printf("differing batch sizes raised the wrong error: %.200s\n", e.what());
  }
  expect(threw, device.str() + ": differing batch sizes raise ValueError");
}

}  // namespace

int main() {
  at::manual_seed(0);
  run_device(at::Device(at::kCPU));
  if (at::hasCUDA()) run_device(at::Device(at::kCUDA));
  else std::printf("no CUDA device: CPU checks only\n");
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
