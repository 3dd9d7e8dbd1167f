// CPU kernels of mildnet::gap_concat_forward / gap_concat_backward.
//
// One pass over each input. Work is split with at::parallel_for; the hot loops are plain loops over contiguous
// memory with many independent accumulators, which the compiler turns into SIMD code. They are compiled for three
// x86 levels (AVX-512, AVX2+F16C, baseline) with target_clones and picked at load time, because an extension is
// built once without -march but must match ATen's own dispatched kernels (x.sum() is our bandwidth roof).
#include "../gap_concat.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MILDNET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MILDNET_HAS_FLOAT16 1
#else
#define MILDNET_CLONES
#define MILDNET_HAS_FLOAT16 0
#endif
#define MILDNET_INLINE inline __attribute__((always_inline))

namespace mildnet {
namespace {

// ---- element -> accumulator conversions that vectorise (c10::Half's portable conversion does not) ----
MILDNET_INLINE float to_acc(float x) { return x; }
MILDNET_INLINE double to_acc(double x) { return x; }
MILDNET_INLINE float to_acc(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
MILDNET_INLINE float to_acc(c10::Half x) {
#if MILDNET_HAS_FLOAT16
  _Float16 h;  // compiles to vcvtph2ps where F16C exists
  std::memcpy(&h, &x.x, sizeof(h));
  return static_cast<float>(h);
#else
  return static_cast<float>(x);
#endif
}

// sum of n contiguous elements; L independent accumulators so the loop vectorises without reassociation flags.
template <typename T, typename A>
MILDNET_INLINE A sum_contiguous_impl(const T* x, int64_t n) {
  constexpr int L = 64 / sizeof(A) * 2;  // two 512-bit registers of accumulators
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) acc[j] += to_acc(x[i + j]);
  A tail = 0;
  for (; i < n; ++i) tail += to_acc(x[i]);
  for (int width = L / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0] + tail;
}

// dst[c] += x[c] for one channels_last row of C channels.
template <typename T, typename A>
MILDNET_INLINE void accumulate_row_impl(A* __restrict dst, const T* __restrict x, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] += to_acc(x[c]);
}

// dst[r * C + c] += x[r * C + c] for `rows` consecutive channels_last rows (kept in registers/L1 between rows).
template <typename T, typename A>
MILDNET_INLINE void accumulate_rows_impl(A* __restrict dst, const T* __restrict x, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) accumulate_row_impl<T, A>(dst, x + r * C, C);
}

#define MILDNET_DEFINE_PRIMITIVES(T, A, SUFFIX)                                                            \
  MILDNET_CLONES A sum_contiguous_##SUFFIX(const T* x, int64_t n) { return sum_contiguous_impl<T, A>(x, n); } \
  MILDNET_CLONES void accumulate_rows_##SUFFIX(A* dst, const T* x, int64_t rows, int64_t C) {              \
    accumulate_rows_impl<T, A>(dst, x, rows, C);                                                           \
  }                                                                                                        \
  MILDNET_INLINE A sum_contiguous(const T* x, int64_t n) { return sum_contiguous_##SUFFIX(x, n); }          \
  MILDNET_INLINE void accumulate_rows(A* dst, const T* x, int64_t rows, int64_t C) {                       \
    accumulate_rows_##SUFFIX(dst, x, rows, C);                                                             \
  }

MILDNET_DEFINE_PRIMITIVES(float, float, f32)
MILDNET_DEFINE_PRIMITIVES(double, double, f64)
MILDNET_DEFINE_PRIMITIVES(c10::Half, float, f16)
MILDNET_DEFINE_PRIMITIVES(c10::BFloat16, float, bf16)
#undef MILDNET_DEFINE_PRIMITIVES

constexpr int64_t kGrainElements = 32768;  // ~64-128 KiB of input per parallel task

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// pooled[n * ld + c] = mean over (h, w) of f[n, c, h, w], for one map. pooled is in the accumulation dtype.
template <typename T, typename A>
void pool_map(const at::Tensor& f, A* pooled, int64_t ld) {
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), HW = H * W;
  const int64_t sN = f.stride(0), sC = f.stride(1), sH = f.stride(2), sW = f.stride(3);
  const T* base = f.const_data_ptr<T>();
  const A inv_hw = A(1) / static_cast<A>(HW);
  if (N == 0 || C == 0) return;

  switch (classify_layout(f)) {
    case MapLayout::kPlanes: {  // NCHW: one contiguous reduction per (n, c) plane
      at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElements / HW), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t n = i / C, c = i % C;
          pooled[n * ld + c] = sum_contiguous(base + n * sN + c * sC, HW) * inv_hw;
        }
      });
      return;
    }
    case MapLayout::kChannelsLast: {  // NHWC: per (n, chunk of rows) accumulate C-length rows into a buffer
      // With small N, split the rows of each image so that every thread gets work; partial sums meet below.
      const int64_t threads = at::get_num_threads();
      const int64_t chunks = std::max<int64_t>(
          1, std::min({HW, ceil_div(2 * threads, N), ceil_div(HW * C, kGrainElements)}));
      const int64_t rows_per_chunk = ceil_div(HW, chunks);
      std::vector<A> partial(static_cast<size_t>(N * chunks * C), A(0));  // (N, chunks, C)
      at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / chunks, chunk = task % chunks;
          const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(HW, r0 + rows_per_chunk);
          if (r0 < r1) accumulate_rows(partial.data() + task * C, base + n * sN + r0 * C, r1 - r0, C);
        }
      });
      for (int64_t n = 0; n < N; ++n) {
        A* dst = pooled + n * ld;
        for (int64_t c = 0; c < C; ++c) dst[c] = partial[(n * chunks) * C + c];
        for (int64_t chunk = 1; chunk < chunks; ++chunk)
          for (int64_t c = 0; c < C; ++c) dst[c] += partial[(n * chunks + chunk) * C + c];
        for (int64_t c = 0; c < C; ++c) dst[c] *= inv_hw;
      }
      return;
    }
    case MapLayout::kStrided: {  // arbitrary strides: read through them, no copy
      at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElements / HW), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t n = i / C, c = i % C;
          const T* plane = base + n * sN + c * sC;
          A acc = 0;
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) acc += to_acc(plane[h * sH + w * sW]);
          pooled[n * ld + c] = acc * inv_hw;
        }
      });
      return;
    }
  }
}

// out[n, segment k] = pooled / max(||pooled||, eps) (or pooled as is), cast to the input dtype.
template <typename T, typename A>
void finalize(const A* pooled, T* out, int64_t N, int64_t ld, const std::vector<int64_t>& channels, bool l2,
              double eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t offset = 0;
      for (int64_t C : channels) {
        const A* p = pooled + n * ld + offset;
        T* o = out + n * ld + offset;
        A scale = 1;
        if (l2) {
          A sq = 0;
          for (int64_t c = 0; c < C; ++c) sq += p[c] * p[c];
          scale = A(1) / std::max<A>(std::sqrt(sq), static_cast<A>(eps));
        }
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(p[c] * scale);
        offset += C;
      }
    }
  });
}

// grad_in = gp[n, c] broadcast over (h, w), written in grad_in's layout (NCHW or channels_last, both dense).
template <typename T, typename A>
void broadcast_map(const A* gp, int64_t ld, at::Tensor& grad_in) {
  const int64_t N = grad_in.size(0), C = grad_in.size(1), HW = grad_in.size(2) * grad_in.size(3);
  const A inv_hw = A(1) / static_cast<A>(HW);
  T* base = grad_in.mutable_data_ptr<T>();
  if (N == 0 || C == 0) return;
  if (grad_in.is_contiguous()) {  // NCHW: fill each plane with one value
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElements / HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / C, c = i % C;
        std::fill_n(base + i * HW, HW, static_cast<T>(gp[n * ld + c] * inv_hw));
      }
    });
    return;
  }
  // channels_last: convert each image's C-vector once, then copy it into every (h, w) row.
  std::vector<T> rows(static_cast<size_t>(N * C));  // (N, C)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) rows[n * C + c] = static_cast<T>(gp[n * ld + c] * inv_hw);
  at::parallel_for(0, N * HW, std::max<int64_t>(1, kGrainElements / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(base + r * C, rows.data() + (r / HW) * C, C * sizeof(T));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gap_concat_forward_cpu(at::TensorList features, bool l2_normalize, double eps) {
  check_features(features);
  const at::Tensor& first = features[0];
  const int64_t N = first.size(0);
  std::vector<int64_t> channels;
  int64_t total = 0;
  for (const at::Tensor& f : features) channels.push_back(f.size(1)), total += f.size(1);
  at::Tensor pooled = at::empty({N, total}, first.options().dtype(accumulate_type(first.scalar_type())));
  at::Tensor out = at::empty({N, total}, first.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gap_concat_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    A* p = pooled.mutable_data_ptr<A>();
    int64_t offset = 0;
    for (const at::Tensor& f : features) {
      pool_map<scalar_t, A>(f, p + offset, total);
      offset += f.size(1);
    }
    finalize<scalar_t, A>(p, out.mutable_data_ptr<scalar_t>(), N, total, channels, l2_normalize, eps);
  });
  return {out, pooled};
}

std::vector<at::Tensor> gap_concat_backward_cpu(const at::Tensor& grad_out, const at::Tensor& pooled,
                                                at::TensorList features, bool l2_normalize, double eps) {
  check_features(features);
  at::Tensor gp = grad_of_pooled(grad_out, pooled, features, l2_normalize, eps);  // (N, sum C), accumulate dtype
  const int64_t ld = gp.size(1);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "gap_concat_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const A* g = gp.const_data_ptr<A>();
    int64_t offset = 0;
    for (const at::Tensor& f : features) {
      at::Tensor gi = at::empty(f.sizes(), f.options().memory_format(grad_memory_format(f)));
      broadcast_map<scalar_t, A>(g + offset, ld, gi);
      grads.push_back(gi);
      offset += f.size(1);
    }
  });
  return grads;
}

TORCH_LIBRARY_IMPL(mildnet, CPU, m) {
  m.impl("gap_concat_forward", &gap_concat_forward_cpu);
  m.impl("gap_concat_backward", &gap_concat_backward_cpu);
}

}  // namespace mildnet
