// CUDA kernels of mildnet::gap_concat_forward / gap_concat_backward.
//
// Forward, stream-ordered on the current stream: one zero-fill of the fp32 sum buffer (at::zeros), then for each
// group of up to 16 maps (a by-value descriptor table of pointers/shapes/strides, as apex's multi_tensor_apply)
// one pooling launch and one tiny finalize launch that divides by H*W, applies the optional L2 normalisation and
// casts. The usual 3-5 taps: 3 launches; 17 maps: 5.
// Pooling paths, chosen per map on the host:
//   kPlanes        NCHW: one warp per (n, c, segment of <= 4096 elements): 128-bit loads with scalar head/tail,
//                  warp-shuffle reduction, one atomicAdd per warp (only big planes are split into segments).
//   kChannelsLast  NHWC with V | C (V = elements per 128-bit load), 16-byte-aligned data and batch stride: one
//                  block per (n, chunk of rows, slice of <= 256 * V channels). Thread t reads one 128-bit vector
//                  per row, always the same V channels of the slice (t mod G, G = vectors per slice row), rows
//                  t / G, t / G + L / G, ... (L = the largest multiple of G <= 256 threads; the rest idle), so it
//                  keeps V register accumulators; a shared-memory pass folds the threads that share channels.
//                  The headline taps (C = 24, 40, 112, 320, 1280) take this path in every dtype.
//   kStrided       anything else: one warp per (n, 32 channels, segment of hw), lane = channel, read by strides.
// Backward: after grad_of_pooled (a few ATen ops), one launch per group of up to 16 maps writes grad_out[n, c] / (H*W) into each dense NCHW / NHWC gradient with
// 128-bit stores where the layout allows (HW or C divisible by V), scalar stores otherwise.
#include "../gap_concat.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>

namespace mildnet {
namespace {

constexpr int kMaxMaps = 16;     // descriptors per launch (~2 KiB of kernel parameters)
constexpr int kThreads = 256;    // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int64_t kPlaneSegment = 4096;  // elements per warp task on the NCHW path
constexpr int64_t kRowsChunk = 16384;    // elements per block task on the channels_last path
constexpr int64_t kStridedSegment = 256; // hw positions per warp task on the strided path
constexpr int64_t kStoreUnitsPerBlock = kThreads * 4;

enum PathKind : int { kPathPlanes = 0, kPathChannelsLast = 1, kPathStrided = 2 };

struct MapDesc {
  const void* data;  // forward: the input map; backward: the gradient to fill
  int64_t N, C, HW, W, sN, sC, sH, sW;
  int64_t col;          // first column of this map in the [N, sum C] output
  int64_t first_block;  // first block of this map in the launch
  int64_t tasks;        // warp tasks (planes/strided), block tasks (channels_last), vector units (backward)
  int64_t splits;       // segments per plane / row chunks per image / hw segments
  int64_t seg;          // elements per segment / rows per chunk / hw per segment
  int64_t slices;       // channels_last: channel slices per row chunk
  int64_t slice_vecs;   // channels_last: 128-bit vectors per slice row (G)
  int path;             // PathKind (forward); 1 = vectorised (backward)
};

struct MapTable {
  MapDesc maps[kMaxMaps];
  int count;
  int64_t ld;  // row length of the [N, sum C] buffers
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// ---- 128-bit vectors: V elements of T in one uint4 ----
template <typename T> constexpr int vec_width() { return 16 / sizeof(T); }

template <typename T, typename A>
__device__ __forceinline__ void unpack(const uint4& r, A* out);
template <> __device__ __forceinline__ void unpack<float, float>(const uint4& r, float* o) {
  o[0] = __uint_as_float(r.x), o[1] = __uint_as_float(r.y), o[2] = __uint_as_float(r.z), o[3] = __uint_as_float(r.w);
}
template <> __device__ __forceinline__ void unpack<double, double>(const uint4& r, double* o) {
  o[0] = __hiloint2double(r.y, r.x), o[1] = __hiloint2double(r.w, r.z);
}
template <> __device__ __forceinline__ void unpack<at::Half, float>(const uint4& r, float* o) {
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}
template <> __device__ __forceinline__ void unpack<at::BFloat16, float>(const uint4& r, float* o) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}

template <typename T, typename A>
__device__ __forceinline__ A vec_sum(const uint4& r) {
  constexpr int V = vec_width<T>();
  A v[V];
  unpack<T, A>(r, v);
  A s = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `count` contiguous elements by one warp: scalar head up to 16-byte alignment, 128-bit body, scalar tail.
template <typename T, typename A>
__device__ __forceinline__ A warp_sum_contiguous(const T* p, int64_t count, int lane) {
  constexpr int V = vec_width<T>();
  const int64_t misalign = (reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T);
  const int64_t head = misalign == 0 ? 0 : min64(V - misalign, count);
  A acc = 0;
  if (lane < head) acc += static_cast<A>(p[lane]);
  const uint4* body = reinterpret_cast<const uint4*>(p + head);
  const int64_t nvec = (count - head) / V;
  int64_t i = lane;
  for (; i + 3 * 32 < nvec; i += 4 * 32) {  // four independent 128-bit loads in flight per lane
    const uint4 r0 = body[i], r1 = body[i + 32], r2 = body[i + 64], r3 = body[i + 96];
    acc += (vec_sum<T, A>(r0) + vec_sum<T, A>(r1)) + (vec_sum<T, A>(r2) + vec_sum<T, A>(r3));
  }
  for (; i < nvec; i += 32) acc += vec_sum<T, A>(body[i]);
  for (int64_t j = head + nvec * V + lane; j < count; j += 32) acc += static_cast<A>(p[j]);
  return warp_sum(acc);
}

__device__ __forceinline__ int find_map(const MapTable& table, int64_t block) {
  int k = 0;
  while (k + 1 < table.count && table.maps[k + 1].first_block <= block) ++k;
  return k;
}

// Sums (not yet means) of every (n, c) of every map into sums[n * ld + col + c]; sums must start at zero.
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_kernel(const MapTable table, typename Acc<T>::type* sums) {
  using A = typename Acc<T>::type;
  constexpr int V = vec_width<T>();
  const int64_t block = blockIdx.x;
  const MapDesc& d = table.maps[find_map(table, block)];
  const int64_t local = block - d.first_block;
  const T* base = static_cast<const T*>(d.data);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (d.path == kPathPlanes) {
    const int64_t task = local * kWarps + warp;  // (n, c, segment)
    if (task >= d.tasks) return;
    const int64_t plane = task / d.splits, s = task % d.splits;
    const int64_t n = plane / d.C, c = plane % d.C;
    const int64_t e0 = s * d.seg, count = min64(d.seg, d.HW - e0);
    const A total = warp_sum_contiguous<T, A>(base + n * d.sN + c * d.sC + e0, count, lane);
    if (lane == 0) {
      if (d.splits == 1) sums[n * table.ld + d.col + c] = total;  // sole writer: deterministic
      else atomicAdd(&sums[n * table.ld + d.col + c], total);
    }
  } else if (d.path == kPathChannelsLast) {
    __shared__ A partial[kThreads * V];
    const int64_t slice = local % d.slices, nchunk = local / d.slices;
    const int64_t n = nchunk / d.splits, chunk = nchunk % d.splits;
    const int64_t G = min64(d.slice_vecs, d.C / V - slice * d.slice_vecs);  // the last slice may be narrower
    const int64_t rows_per_step = kThreads / G;  // L = rows_per_step * G threads work, the rest idle
    const int64_t r0 = chunk * d.seg, r1 = min64(d.HW, r0 + d.seg);
    const uint4* vecs = reinterpret_cast<const uint4*>(base + n * d.sN) + slice * d.slice_vecs;
    const int64_t row_vecs = d.C / V, g = threadIdx.x % G;
    A acc[V] = {};
    if (threadIdx.x < rows_per_step * G) {
      for (int64_t r = r0 + threadIdx.x / G; r < r1; r += rows_per_step) {
        A v[V];
        unpack<T, A>(vecs[r * row_vecs + g], v);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += v[j];
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) partial[threadIdx.x * V + j] = acc[j];
    __syncthreads();
    // threads g, g + G, g + 2G, ... (< L) hold the same V channels of the slice.
    for (int64_t c = threadIdx.x; c < G * V; c += kThreads) {
      A total = 0;
      for (int64_t m = 0; m < rows_per_step; ++m) total += partial[(c / V + m * G) * V + c % V];
      A* dst = &sums[n * table.ld + d.col + slice * d.slice_vecs * V + c];
      if (d.splits == 1) *dst = total;  // sole writer: deterministic
      else atomicAdd(dst, total);
    }
  } else {  // kPathStrided: lane = channel
    const int64_t task = local * kWarps + warp;  // (n, channel group, hw segment)
    if (task >= d.tasks) return;
    const int64_t groups = (d.C + 31) / 32;
    const int64_t s = task % d.splits, ng = task / d.splits;
    const int64_t n = ng / groups, c = (ng % groups) * 32 + lane;
    if (c >= d.C) return;
    const int64_t hw0 = s * d.seg, hw1 = min64(d.HW, hw0 + d.seg);
    const T* p = base + n * d.sN + c * d.sC;
    A acc = 0;
    for (int64_t hw = hw0; hw < hw1; ++hw) acc += static_cast<A>(p[(hw / d.W) * d.sH + (hw % d.W) * d.sW]);
    if (d.splits == 1) sums[n * table.ld + d.col + c] = acc;
    else atomicAdd(&sums[n * table.ld + d.col + c], acc);
  }
}

// One block per (n, map): means = sums / HW (kept as `pooled` for the backward), optional L2, cast to T.
template <typename T>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const MapTable table, typename Acc<T>::type* pooled,
                                                           T* out, bool l2_normalize, double eps) {
  using A = typename Acc<T>::type;
  __shared__ A warp_totals[kWarps];
  const int64_t n = blockIdx.x;
  const MapDesc& d = table.maps[blockIdx.y];
  A* p = pooled + n * table.ld + d.col;
  const A inv_hw = A(1) / static_cast<A>(d.HW);
  A sq = 0;
  for (int64_t c = threadIdx.x; c < d.C; c += kThreads) {
    const A mean = p[c] * inv_hw;
    p[c] = mean;
    sq += mean * mean;
  }
  A scale = 1;
  if (l2_normalize) {  // block-wide sum of squares: warp shuffles, then one shared-memory step
    sq = warp_sum(sq);
    if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = sq;
    __syncthreads();
    A total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_totals[w];
    scale = A(1) / max(sqrt(total), static_cast<A>(eps));
  }
  T* o = out + n * table.ld + d.col;
  for (int64_t c = threadIdx.x; c < d.C; c += kThreads) o[c] = static_cast<T>(p[c] * scale);
}

// grad_in[n, c, h, w] = gp[n, col + c] / HW for every map, into dense NCHW (path 0) or NHWC (path 1) gradients.
// d.tasks = store units (V elements when d.seg == V, else 1 element).
template <typename T>
__global__ void __launch_bounds__(kThreads) broadcast_kernel(const MapTable table,
                                                            const typename Acc<T>::type* gp) {
  using A = typename Acc<T>::type;
  constexpr int V = vec_width<T>();
  const int64_t block = blockIdx.x;
  const MapDesc& d = table.maps[find_map(table, block)];
  const int64_t local = block - d.first_block;
  T* base = static_cast<T*>(const_cast<void*>(d.data));
  const A inv_hw = A(1) / static_cast<A>(d.HW);
  const int64_t u_end = min64(d.tasks, (local + 1) * kStoreUnitsPerBlock);
  const bool channels_last = d.path == kPathChannelsLast;
  const int width = static_cast<int>(d.seg);  // V or 1
  for (int64_t u = local * kStoreUnitsPerBlock + threadIdx.x; u < u_end; u += kThreads) {
    const int64_t e = u * width;
    int64_t n, c;
    if (channels_last) n = e / (d.HW * d.C), c = e % d.C;
    else n = e / (d.HW * d.C), c = (e / d.HW) % d.C;
    const A* g = gp + n * table.ld + d.col;
    if (width == V) {
      union { uint4 raw; T v[V]; } pack;
#pragma unroll
      for (int j = 0; j < V; ++j) pack.v[j] = static_cast<T>(g[channels_last ? c + j : c] * inv_hw);
      reinterpret_cast<uint4*>(base)[u] = pack.raw;
    } else {
      base[e] = static_cast<T>(g[c] * inv_hw);
    }
  }
}

MapDesc describe(const at::Tensor& f, int64_t col) {
  MapDesc d{};
  d.data = f.const_data_ptr();
  d.N = f.size(0), d.C = f.size(1), d.HW = f.size(2) * f.size(3), d.W = f.size(3);
  d.sN = f.stride(0), d.sC = f.stride(1), d.sH = f.stride(2), d.sW = f.stride(3);
  d.col = col;
  return d;
}

// Plans the forward work of one map: path, splits and number of blocks.
int64_t plan_pool(MapDesc& d, const at::Tensor& f) {
  const int64_t V = 16 / f.element_size();
  const MapLayout layout = classify_layout(f);
  // 128-bit loads need every row start 16-byte aligned: the data pointer (storage offset included), the batch
  // stride (irrelevant when N == 1: a size-1 dim may carry any stride) and the row length C * element size.
  const bool aligned = reinterpret_cast<uintptr_t>(f.const_data_ptr()) % 16 == 0 &&
                       (d.N == 1 || (d.sN * f.element_size()) % 16 == 0) && d.C % V == 0;
  if (d.N == 0 || d.C == 0) return 0;
  if (layout == MapLayout::kPlanes) {
    d.path = kPathPlanes;
    d.splits = ceil_div(d.HW, kPlaneSegment);
    d.seg = ceil_div(d.HW, d.splits);
    d.tasks = d.N * d.C * d.splits;
    return ceil_div(d.tasks, kWarps);
  }
  if (layout == MapLayout::kChannelsLast && aligned && d.C / V <= kThreads * kThreads) {  // slices stay non-empty
    d.path = kPathChannelsLast;
    const int64_t row_vecs = d.C / V;
    d.slices = ceil_div(row_vecs, kThreads);
    d.slice_vecs = ceil_div(row_vecs, d.slices);  // balanced slices, each <= kThreads vectors wide
    d.splits = std::max<int64_t>(1, ceil_div(d.HW * d.slice_vecs * V, kRowsChunk));
    d.seg = ceil_div(d.HW, d.splits);
    d.tasks = d.N * d.splits * d.slices;
    return d.tasks;
  }
  d.path = kPathStrided;
  d.splits = ceil_div(d.HW, kStridedSegment);
  d.seg = ceil_div(d.HW, d.splits);
  d.tasks = d.N * ceil_div(d.C, 32) * d.splits;
  return ceil_div(d.tasks, kWarps);
}

std::tuple<at::Tensor, at::Tensor> gap_concat_forward_cuda(at::TensorList features, bool l2_normalize, double eps) {
  check_features(features);
  const at::Tensor& first = features[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = first.size(0);
  int64_t total = 0;
  for (const at::Tensor& f : features) total += f.size(1);
  // Sums land here (zeroed: split planes/rows meet through atomicAdd), then become the means in place.
  at::Tensor pooled = at::zeros({N, total}, first.options().dtype(accumulate_type(first.scalar_type())));
  at::Tensor out = at::empty({N, total}, first.options());
  if (N == 0 || total == 0) return {out, pooled};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "gap_concat_forward_cuda", [&] {
    using A = typename Acc<scalar_t>::type;
    int64_t col = 0;
    for (size_t k0 = 0; k0 < features.size(); k0 += kMaxMaps) {
      MapTable table{};
      table.ld = total;
      int64_t blocks = 0;
      for (size_t k = k0; k < std::min(features.size(), k0 + kMaxMaps); ++k) {
        MapDesc d = describe(features[k], col);
        d.first_block = blocks;
        blocks += plan_pool(d, features[k]);
        table.maps[table.count++] = d;
        col += d.C;
      }
      if (blocks > 0) {
        pool_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(table, pooled.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(table.count));
      finalize_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(table, pooled.mutable_data_ptr<A>(),
                                                               out.mutable_data_ptr<scalar_t>(), l2_normalize, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, pooled};
}

std::vector<at::Tensor> gap_concat_backward_cuda(const at::Tensor& grad_out, const at::Tensor& pooled,
                                                 at::TensorList features, bool l2_normalize, double eps) {
  check_features(features);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gp = grad_of_pooled(grad_out, pooled, features, l2_normalize, eps);  // (N, sum C), accumulate dtype
  std::vector<at::Tensor> grads;
  for (const at::Tensor& f : features)
    grads.push_back(at::empty(f.sizes(), f.options().memory_format(grad_memory_format(f))));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "gap_concat_backward_cuda", [&] {
    using A = typename Acc<scalar_t>::type;
    constexpr int64_t V = vec_width<scalar_t>();
    int64_t col = 0;
    for (size_t k0 = 0; k0 < grads.size(); k0 += kMaxMaps) {
      MapTable table{};
      table.ld = gp.size(1);
      int64_t blocks = 0;
      for (size_t k = k0; k < std::min(grads.size(), k0 + kMaxMaps); ++k) {
        const at::Tensor& g = grads[k];
        MapDesc d = describe(g, col);
        d.data = g.data_ptr();
        d.path = g.is_contiguous() ? kPathPlanes : kPathChannelsLast;
        const bool vectorised = d.path == kPathPlanes ? d.HW % V == 0 : d.C % V == 0;  // fresh tensors: aligned
        d.seg = vectorised ? V : 1;
        d.tasks = g.numel() / d.seg;
        d.first_block = blocks;
        blocks += ceil_div(d.tasks, kStoreUnitsPerBlock);
        table.maps[table.count++] = d;
        col += d.C;
      }
      if (blocks > 0) {
        broadcast_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(table, gp.const_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mildnet, CUDA, m) {
  m.impl("gap_concat_forward", &gap_concat_forward_cuda);
  m.impl("gap_concat_backward", &gap_concat_backward_cuda);
}

}  // namespace mildnet
