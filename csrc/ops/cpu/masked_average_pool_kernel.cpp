// CPU kernels of masked_average_pool: bilinear resampling of mask planes (and its adjoint) and
// the weighted channel reduction. Threads split planes / (batch, channel) rows; the inner dot
// products are vectorised by the compiler, one clone per instruction set (cpu_dispatch.h).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "common/cpu_dispatch.h"
#include "common/divide.h"
#include "common/resample.h"
#include "ops/masked_average_pool.h"

namespace fsskern {
namespace {

template <typename T>
std::vector<LinearTap<T>> taps_for(int64_t in_size, int64_t out_size, bool align_corners) {
  std::vector<LinearTap<T>> taps(out_size);
  for (int64_t o = 0; o < out_size; ++o) taps[o] = linear_tap<T>(o, in_size, out_size, align_corners);
  return taps;
}

template <typename T>
void resample_gather(const T* src, T* dst, int64_t planes, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                     bool align_corners) {
  const auto ty = taps_for<T>(in_h, out_h, align_corners);
  const auto tx = taps_for<T>(in_w, out_w, align_corners);
  at::parallel_for(0, planes * out_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* plane = src + (r / out_h) * in_h * in_w;
      const LinearTap<T>& y = ty[r % out_h];
      T* row = dst + r * out_w;
      for (int64_t ox = 0; ox < out_w; ++ox) row[ox] = bilinear_combine(plane, in_w, y, tx[ox]);
    }
  });
}

// Adjoint of sampling an (out_h, out_w) grid to (src_h, src_w): every source pixel scatters its
// value back along its four taps. One thread owns a whole plane, so the order of additions is
// fixed and the result deterministic.
template <typename T>
void resample_adjoint(const T* src, T* dst, int64_t planes, int64_t src_h, int64_t src_w, int64_t out_h,
                      int64_t out_w, bool align_corners) {
  const auto ty = taps_for<T>(out_h, src_h, align_corners);
  const auto tx = taps_for<T>(out_w, src_w, align_corners);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const T* in = src + p * src_h * src_w;
      T* out = dst + p * out_h * out_w;
      for (int64_t y = 0; y < src_h; ++y) {
        const LinearTap<T>& a = ty[y];
        T* r0 = out + a.i0 * out_w;
        T* r1 = out + a.i1 * out_w;
        for (int64_t x = 0; x < src_w; ++x) {
          const LinearTap<T>& b = tx[x];
          const T v = in[y * src_w + x];
          r0[b.i0] += a.l0 * b.l0 * v;
          r0[b.i1] += a.l0 * b.l1 * v;
          r1[b.i0] += a.l1 * b.l0 * v;
          r1[b.i1] += a.l1 * b.l1 * v;
        }
      }
    }
  });
}

at::Tensor resample_cpu(const at::Tensor& planes, int64_t out_h, int64_t out_w, bool align_corners, bool transpose) {
  const auto src = planes.contiguous();
  const int64_t P = src.size(0), H = src.size(1), W = src.size(2);
  auto dst = at::zeros({P, out_h, out_w}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "fsskern_resample_cpu", [&] {
    if (transpose) {
      resample_adjoint(src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), P, H, W, out_h, out_w,
                       align_corners);
    } else {
      resample_gather(src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), P, H, W, out_h, out_w,
                      align_corners);
    }
  });
  return dst;
}

template <typename T>
FSSKERN_CPU_CLONES T dot(const T* a, const T* b, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename scalar_t>
void weighted_sum_typed(const at::Tensor& features, const at::Tensor& weights, const at::Tensor& denom,
                        at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), C = features.size(1), P = features.size(2), N = weights.size(1);
  const scalar_t* f = features.const_data_ptr<scalar_t>();
  const acc_t* w = weights.const_data_ptr<acc_t>();
  const acc_t* d = denom.const_data_ptr<acc_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P * N, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    // Reduced-precision rows are widened once into a per-thread buffer, then reduced in fp32.
    std::vector<acc_t> widened(std::is_same_v<scalar_t, acc_t> ? 0 : P);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const acc_t* row;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        row = f + bc * P;
      } else {
        for (int64_t p = 0; p < P; ++p) widened[p] = static_cast<acc_t>(f[bc * P + p]);
        row = widened.data();
      }
      for (int64_t n = 0; n < N; ++n) {
        const acc_t s = dot(row, w + (b * N + n) * P, P);
        o[(b * N + n) * C + c] = static_cast<scalar_t>(divide_or_zero(s, d[b * N + n]));
      }
    }
  });
}

void weighted_sum_cpu(const at::Tensor& features, const at::Tensor& weights, const at::Tensor& denom,
                      at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fsskern_weighted_sum_cpu",
                                  [&] { weighted_sum_typed<scalar_t>(features, weights, denom, out); });
}

constexpr MapKernels kCpuKernels{&resample_cpu, &weighted_sum_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { register_masked_average_pool<kCpuKernels>(m); }

}  // namespace fsskern
