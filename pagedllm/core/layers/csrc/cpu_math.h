// Arithmetic shared by the CPU kernels of this extension (fused_ops.cpp, dense_gemm.cpp).
// Both are compiled with -ffp-contract=off: the same expression rounds the same in each.
// Not for files built with -ffast-math: it folds exp_approx's rounding trick away.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pagedllm_cpu {

// exp(x), vectorisable: e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2
// split in two for an exact reduction), |r| <= ln(2) / 2, e^r by its degree-7 Taylor
// polynomial. Relative error ~1e-7, like a libm expf.
__attribute__((always_inline)) inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  // round to nearest by adding and removing 1.5 * 2^23 (vectorises, unlike nearbyint)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// silu(gate) * up, as the torch reference computes it in T: silu rounded to T, then the product.
template <typename T>
inline void silu_mul_row(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t d) noexcept {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const float g = static_cast<float>(gate[i]);
    const T silu = static_cast<T>(g / (1.f + exp_approx(-g)));
    out[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
  }
}

}  // namespace pagedllm_cpu
