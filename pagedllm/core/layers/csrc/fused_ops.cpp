// Fused CPU kernels of the layer helpers: RMSNorm (with the residual add), SiLU-and-mul and
// in-place RoPE; and the sampler's row-wise argmax. Each replaces 3-9 torch ops (and their temporaries) by one pass over the
// rows; at decode batch sizes the ops are tiny, so dispatch, not arithmetic, was the cost.
//
// Arithmetic follows the torch reference op by op (float32 compute, no FMA contraction,
// no fast-math), so results match it to float32 rounding of the row sums.
// Registered as torch ops pagedllm_ops::* (light headers: fast to build). The vector loops
// live in small noexcept row functions: inside the dtype-dispatch lambdas GCC does not
// vectorise them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_math.h"

namespace {

using pagedllm_cpu::exp_approx;
using pagedllm_cpu::silu_mul_row;

// Rows per task: parallel only when a task has enough work (~50 us) to pay for waking a
// thread, so decode-sized calls (tens of rows) stay on the calling thread.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(row_elems, 1)); }

// out = x * rsqrt(mean(x^2) + eps) * weight, one row.
template <typename T>
inline void norm_row(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(static_cast<T>(static_cast<float>(x[i]) * r)));
}

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "expected [rows, hidden] with contiguous rows");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(), "weight: [hidden], x's dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("pagedllm::rms_norm", std::vector<c10::IValue>({x}));
  check_rows(x, weight);
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) norm_row(xp + r * ld, wp, op + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// residual += x, one row.
template <typename T>
inline void add_row(const T* __restrict__ x, T* __restrict__ residual, int64_t n) noexcept {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) residual[i] = static_cast<T>(static_cast<float>(residual[i]) + static_cast<float>(x[i]));
}

// residual += x; x = rms_norm(residual) * weight — both in place.
void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("pagedllm::add_rms_norm_", std::vector<c10::IValue>({x}));
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.stride(1) == 1 && residual.scalar_type() == x.scalar_type(),
              "residual: x's shape and dtype");
  const int64_t rows = x.size(0), n = x.size(1), ldx = x.stride(0), ldr = residual.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_row(xp + r * ldx, rp + r * ldr, n);
        norm_row(rp + r * ldr, wp, xp + r * ldx, n, static_cast<float>(eps));
      }
    });
  });
}

// [rows, 2 * d] (gate | up) -> silu(gate) * up, [rows, d].
at::Tensor silu_and_mul(const at::Tensor& x) {
  RECORD_FUNCTION("pagedllm::silu_and_mul", std::vector<c10::IValue>({x}));
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "expected [rows, 2 * d] with contiguous rows");
  const int64_t rows = x.size(0), d = x.size(1) / 2, ld = x.stride(0);
  auto out = at::empty({rows, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(2 * d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(xp + r * ld, xp + r * ld + d, op + r * d, d);
    });
  });
  return out;
}

// One head [2 * half]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); like the reference,
// cos and sin are first rounded to x's dtype, and each product too.
template <typename T>
inline void rotate_head(T* __restrict__ x1, const float* __restrict__ c, const float* __restrict__ s, int64_t half) noexcept {
  T* __restrict__ x2 = x1 + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float ci = static_cast<float>(static_cast<T>(c[i])), si = static_cast<float>(static_cast<T>(s[i]));
    const float a = static_cast<float>(x1[i]), b = static_cast<float>(x2[i]);
    const float a_cos = static_cast<float>(static_cast<T>(a * ci)), b_sin = static_cast<float>(static_cast<T>(b * si));
    const float b_cos = static_cast<float>(static_cast<T>(b * ci)), a_sin = static_cast<float>(static_cast<T>(a * si));
    x1[i] = static_cast<T>(a_cos - b_sin);
    x2[i] = static_cast<T>(b_cos + a_sin);
  }
}

// Rotate-half RoPE in place on heads [0, num_heads) of each row of x [tokens, >= num_heads *
// head_dim] (e.g. the q and k part of a fused qkv row). cos, sin: [max_positions, head_dim / 2].
void rotary_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads) {
  RECORD_FUNCTION("pagedllm::rotary_", std::vector<c10::IValue>({x}));
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "expected [tokens, width] with contiguous rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.scalar_type() == at::kFloat,
              "cos, sin: contiguous float32 [max_positions, head_dim / 2]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == x.size(0),
              "positions: int64 [tokens]");
  const int64_t half = cos.size(1), head_dim = 2 * half, tokens = x.size(0), ld = x.stride(0);
  TORCH_CHECK(num_heads * head_dim <= x.size(1), "rotary_: rows narrower than num_heads * head_dim");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rotary_: position out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain(num_heads * head_dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* __restrict__ c = cp + pos[t] * half;
        const float* __restrict__ s = sp + pos[t] * half;
        for (int64_t h = 0; h < num_heads; ++h) rotate_head(xp + t * ld + h * head_dim, c, s, half);
      }
    });
  });
}

// Index of each row's maximum, the first one on ties (NaN counts as the maximum), like
// torch.argmax: [rows, n] float32 -> [rows] int64, instead of torch's index-carrying
// reduction (3-6x slower here). With AVX2 two vectorised passes: the maximum, with four
// independent accumulators (the compiler's one-accumulator loop ran at 17 GB/s on a row in
// L2), then its first position, read back from L1/L2. With AVX-512 one pass (below). On 64
// cold 49,152-float rows, 2 threads of a Zen 4: 0.33-0.45 ms, about the memory bandwidth.
inline int64_t first_equal_scalar(const float* x, int64_t start, int64_t n, float m) {
  for (int64_t i = start; i < n; ++i)
    if (x[i] == m) return i;
  return -1;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// Logits are cold (a whole batch is 12.6 MB for a 49k vocabulary): ask for the two cache lines
// 4 KiB ahead of each 32-float step, as hardware prefetchers stop at 4 KiB pages. On 64 cold rows,
// 2 threads of an AVX-512 Xeon: 0.77 -> 0.40-0.50 ms, the speed of torch.sum over the same data.
inline void prefetch_ahead(const float* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 1024 + 16), _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__)
// One pass: each of 32 lanes keeps its maximum and the first index it was reached at (a
// strict > never moves the index on a tie); the row's answer is the smallest index among the
// lanes holding the overall maximum. (0.39 -> 0.33 ms on 64 cold 49k-float rows against the
// two-pass version: the row is read once.) A NaN anywhere sends the row to the scalar search.
inline int64_t argmax_row(const float* __restrict__ x, int64_t n) {
  const float lowest = -std::numeric_limits<float>::infinity();
  __m512 m0 = _mm512_set1_ps(lowest), m1 = m0;
  __m512i i0 = _mm512_setzero_si512(), i1 = i0;
  __m512i at0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i at1 = _mm512_add_epi32(at0, _mm512_set1_epi32(16));
  const __m512i step = _mm512_set1_epi32(32);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 32 <= n && n <= INT32_MAX; i += 32) {
    prefetch_ahead(x + i);
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    const __mmask16 ga = _mm512_cmp_ps_mask(a, m0, _CMP_GT_OQ), gb = _mm512_cmp_ps_mask(b, m1, _CMP_GT_OQ);
    m0 = _mm512_mask_mov_ps(m0, ga, a), m1 = _mm512_mask_mov_ps(m1, gb, b);
    i0 = _mm512_mask_mov_epi32(i0, ga, at0), i1 = _mm512_mask_mov_epi32(i1, gb, at1);
    at0 = _mm512_add_epi32(at0, step), at1 = _mm512_add_epi32(at1, step);
  }
  alignas(64) float lane_max[32];
  alignas(64) int32_t lane_at[32];
  _mm512_store_ps(lane_max, m0), _mm512_store_ps(lane_max + 16, m1);
  _mm512_store_si512(lane_at, i0), _mm512_store_si512(lane_at + 16, i1);
  float best = lane_max[0];
  int64_t best_at = lane_at[0];
  for (int l = 1; l < 32; ++l)
    if (lane_max[l] > best || (lane_max[l] == best && lane_at[l] < best_at)) best = lane_max[l], best_at = lane_at[l];
  bool has_nan = nan != 0;
  for (; i < n; ++i) {
    has_nan |= x[i] != x[i];
    if (x[i] > best) best = x[i], best_at = i;
  }
  if (!has_nan) return best_at;
  for (int64_t j = 0; j < n; ++j)
    if (x[j] != x[j]) return j;
  return 0;
}
#elif defined(__AVX2__)
inline int64_t argmax_row(const float* __restrict__ x, int64_t n) {
  const float lowest = -std::numeric_limits<float>::infinity();
  __m256 m0 = _mm256_set1_ps(lowest), m1 = m0, m2 = m0, m3 = m0, nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(x + i);
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a), m1 = _mm256_max_ps(m1, b), m2 = _mm256_max_ps(m2, c), m3 = _mm256_max_ps(m3, d);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  float m = lowest;
  for (float v : lanes) m = m > v ? m : v;
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = i; j < n; ++j) {
    has_nan |= x[j] != x[j];
    m = m > x[j] ? m : x[j];
  }
  if (!has_nan) {
    const __m256 mv = _mm256_set1_ps(m);
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
      const uint32_t hits = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k), mv, _CMP_EQ_OQ))) |
                            static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k + 8), mv, _CMP_EQ_OQ))) << 8 |
                            static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k + 16), mv, _CMP_EQ_OQ))) << 16 |
                            static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k + 24), mv, _CMP_EQ_OQ))) << 24;
      if (hits) return k + __builtin_ctz(hits);
    }
    return first_equal_scalar(x, k, n, m);
  }
  for (int64_t j = 0; j < n; ++j)
    if (x[j] != x[j]) return j;
  return 0;
}
#else
inline int64_t argmax_row(const float* __restrict__ x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = m > x[i] ? m : x[i];
    nan |= x[i] != x[i] ? 1 : 0;
  }
  if (!nan) return first_equal_scalar(x, 0, n, m);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return i;
  return 0;
}
#endif

at::Tensor argmax_rows(const at::Tensor& x) {
  RECORD_FUNCTION("pagedllm::argmax_rows", std::vector<c10::IValue>({x}));
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "expected float32 [rows, n > 0] with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, grain(n / 4), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * ld, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pagedllm_ops, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin, int num_heads) -> ()");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("add_rms_norm_", c10::DispatchKey::CPU, &add_rms_norm_);
  m.impl("silu_and_mul", c10::DispatchKey::CPU, &silu_and_mul);
  m.impl("rotary_", c10::DispatchKey::CPU, &rotary_);
  m.impl("argmax_rows", c10::DispatchKey::CPU, &argmax_rows);
}
