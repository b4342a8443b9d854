// GGUF blocks on the CPU: y = x @ W.T straight from the raw blocks, and row dequantization.
//
// Each block is decoded to float32 exactly as gguf-py / ggml dequantize it (scale times
// value plus min, per block or sub-block), then multiplied with float32 activations. So the
// result is the float path's, up to summation order, while only the 4.5 - 8.5 bits per
// weight of the blocks are read from memory. The decode loops have fixed trip counts
// and vectorise (-O3 -march=native).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifndef PAGEDLLM_PF
#define PAGEDLLM_PF 512  // bytes ahead to prefetch: the weight stream is read once, from DRAM
#endif

namespace {

// ggml type ids (gguf.GGMLQuantizationType)
enum : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

struct Format {
  int64_t block_values;  // values per block
  int64_t block_bytes;
};

Format format_of(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "gguf kernels: unsupported ggml type ", type);
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Decode one block of `type` into `w` (block_values floats).
inline void decode(int64_t type, const uint8_t* b, float* w) {
  switch (type) {
    case Q4_0: {
      const float d = f16(b);
      for (int j = 0; j < 16; ++j) {
        w[j] = d * (float)((int)(b[2 + j] & 0xF) - 8);
        w[j + 16] = d * (float)((int)(b[2 + j] >> 4) - 8);
      }
      return;
    }
    case Q4_1: {
      const float d = f16(b), m = f16(b + 2);
      for (int j = 0; j < 16; ++j) {
        w[j] = d * (float)(b[4 + j] & 0xF) + m;
        w[j + 16] = d * (float)(b[4 + j] >> 4) + m;
      }
      return;
    }
    case Q5_0:
    case Q5_1: {
      const bool has_min = type == Q5_1;
      const float d = f16(b), m = has_min ? f16(b + 2) : 0.f;
      uint32_t qh;
      std::memcpy(&qh, b + (has_min ? 4 : 2), 4);
      const uint8_t* qs = b + (has_min ? 8 : 6);
      const int offset = has_min ? 0 : 16;
      for (int j = 0; j < 16; ++j) {
        const int lo = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
        const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        w[j] = d * (float)(lo - offset) + m;
        w[j + 16] = d * (float)(hi - offset) + m;
      }
      return;
    }
    case Q8_0: {
      const float d = f16(b);
      const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
      for (int j = 0; j < 32; ++j) w[j] = (float)q[j] * d;
      return;
    }
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const float d = f16(b), dmin = f16(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 8; ++j) {  // sub-blocks of 32: pairs share 32 bytes (low, high nibbles)
        uint8_t sc, mn;
        scale_min_k4(j, scales, &sc, &mn);
        const float scale = d * (float)sc, minimum = dmin * (float)mn;
        const uint8_t* q = qs + (j / 2) * 32;
        const int shift = (j % 2) * 4;
        for (int l = 0; l < 32; ++l) {
          int v = (q[l] >> shift) & 0xF;
          if (five) v |= ((qh[l] >> j) & 1) << 4;
          w[j * 32 + l] = scale * (float)v - minimum;
        }
      }
      return;
    }
    case Q6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16(b + 208);
      for (int j = 0; j < 8; ++j) {  // sub-blocks of 32 (two scales of 16 each)
        const int half = j / 4, quarter = j % 4;
        for (int l = 0; l < 32; ++l) {
          const int lo = (ql[half * 64 + (quarter % 2) * 32 + l] >> ((quarter / 2) * 4)) & 0xF;
          const int hi = (qh[half * 32 + l] >> (quarter * 2)) & 3;
          const int idx = j * 32 + l;
          w[idx] = d * (float)sc[idx / 16] * (float)((lo | (hi << 4)) - 32);
        }
      }
      return;
    }
  }
}

// The 32-value block types as w = d * q + min: q in 4 x 8 floats (unscaled), d and min per block.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

inline float f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// 16 bytes of nibbles: values 0..15 are the low nibbles, 16..31 the high ones.
inline void nibbles_to_float(const uint8_t* qs, __m256* v) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

template <int64_t TYPE>
inline void block_values(const uint8_t* b, __m256* q, float* d, float* minimum) {
  if constexpr (TYPE == Q8_0) {
    *d = f16c(b);
    *minimum = 0.f;
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i));
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
  } else if constexpr (TYPE == Q4_0) {
    *d = f16c(b);
    *minimum = -8.f * *d;
    nibbles_to_float(b + 2, q);
  } else {  // Q4_1
    *d = f16c(b);
    *minimum = f16c(b + 2);
    nibbles_to_float(b + 4, q);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [n0, n1) of y for up to kMaxRows rows of x: sum over blocks of d * (q . x) + min * sum(x).
constexpr int64_t kMaxRows = 8;

// The loop both 8-float kernels share: for each weight row n in [n0, n1), walk its blocks
// (prefetching the stream ahead) and let block(b, blk, acc, acc_min) add block blk's terms
// for every row of x; then y[m][n] = sum(acc[m]) + acc_min[m].
template <int ROWS, int64_t BYTES, typename Block>
inline void accumulate_rows(int64_t num_blocks, const uint8_t* raw, int64_t row_bytes, float* y, int64_t N,
                            int64_t n0, int64_t n1, Block&& block) {
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[ROWS];
    float acc_min[ROWS];
    for (int m = 0; m < ROWS; ++m) {
      acc[m] = _mm256_setzero_ps();
      acc_min[m] = 0.f;
    }
    const uint8_t* row = raw + n * row_bytes;
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      const uint8_t* b = row + blk * BYTES;
      _mm_prefetch(reinterpret_cast<const char*>(b + PAGEDLLM_PF), _MM_HINT_T0);
      block(b, blk, acc, acc_min);
    }
    for (int m = 0; m < ROWS; ++m) y[m * N + n] = hsum(acc[m]) + acc_min[m];
  }
}

template <int64_t TYPE>
constexpr int64_t block_bytes() {
  return TYPE == Q8_0 ? 34 : TYPE == Q4_0 ? 18 : 20;
}

template <int64_t TYPE, int ROWS>
void rows_avx2(const float* x, int64_t K, const float* xsum, const uint8_t* raw, int64_t row_bytes,
               float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t num_blocks = K / 32;
  accumulate_rows<ROWS, block_bytes<TYPE>()>(num_blocks, raw, row_bytes, y, N, n0, n1,
                                             [&](const uint8_t* b, int64_t blk, __m256* acc, float* acc_min) {
    __m256 q[4];
    float d, minimum;
    block_values<TYPE>(b, q, &d, &minimum);
    const __m256 vd = _mm256_set1_ps(d);
    for (int m = 0; m < ROWS; ++m) {
      const float* xb = x + m * K + blk * 32;
      __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
      t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), t);
      t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), t);
      t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), t);
      acc[m] = _mm256_fmadd_ps(vd, t, acc[m]);
      acc_min[m] += minimum * xsum[m * num_blocks + blk];
    }
  });
}
#else
constexpr int64_t kMaxRows = 8;
#endif

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The same with 16 floats per register (Q4_0 / Q4_1 take the table kernel below instead).
// A Q8_0 block: its 32 values, unscaled, and d.
inline void q8_0_values16(const uint8_t* b, __m512* q, float* d) {
  *d = f16c(b);
  for (int i = 0; i < 2; ++i) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * i));
    q[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
}

// Q4_0 / Q4_1 weights straight from a table: a block's 16 possible values, d * (q - 8) or
// d * q + m (as the dequantizer computes them), looked up for each nibble by vpermps, which
// reads only the low 4 bits of each lane, so the low nibbles need no mask. A row's scales are
// converted from float16 first, in a pass of their own. Per 32 weights that is one table, two
// lookups and two FMAs per row of x, where converting the nibbles to floats and scaling the
// block's sum costs more vector work (Zen 4, one row of x, one core, benchmarks/gguf_decode.py:
// 490-500 against 440 million blocks a second).
template <int64_t TYPE, int ROWS>
void rows_table_avx512(const float* x, int64_t K, const uint8_t* raw, int64_t row_bytes, float* y, int64_t N,
                       int64_t n0, int64_t n1) {
  constexpr int64_t bytes = TYPE == Q4_0 ? 18 : 20, qs_offset = TYPE == Q4_0 ? 2 : 4;
  constexpr int kSets = ROWS == 1 ? 2 : 1;  // one row of x: even and odd blocks accumulate apart
  constexpr int64_t kChunk = 64;             // blocks whose scales are converted at a time
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 eight = _mm512_set1_ps(8.f);
  const int64_t num_blocks = K / 32;
  alignas(64) float scales[2 * kChunk];  // d, m of each block of the chunk
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[kSets][ROWS][2];  // [set][row of x][low / high nibbles]
    for (int s = 0; s < kSets; ++s)
      for (int m = 0; m < ROWS; ++m) acc[s][m][0] = acc[s][m][1] = _mm512_setzero_ps();
    const uint8_t* row = raw + n * row_bytes;
    for (int64_t c0 = 0; c0 < num_blocks; c0 += kChunk) {
      const int64_t c1 = std::min(num_blocks, c0 + kChunk);
      for (int64_t blk = c0; blk < c1; ++blk) {
        int32_t bits;
        std::memcpy(&bits, row + blk * bytes, 4);  // d, m as float16 (Q4_0: d and the first values)
        _mm_storel_pi(reinterpret_cast<__m64*>(scales + 2 * (blk - c0)), _mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
      }
      auto block = [&](int64_t blk, __m512 (*a)[2]) {
        const uint8_t* b = row + blk * bytes;
        _mm_prefetch(reinterpret_cast<const char*>(b + PAGEDLLM_PF), _MM_HINT_T0);
        const __m512 vd = _mm512_set1_ps(scales[2 * (blk - c0)]);
        const __m512 table = TYPE == Q4_0 ? _mm512_mul_ps(vd, _mm512_sub_ps(iota, eight))
                                          : _mm512_add_ps(_mm512_mul_ps(vd, iota), _mm512_set1_ps(scales[2 * (blk - c0) + 1]));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + qs_offset)));
        const __m512 lo = _mm512_permutexvar_ps(q, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
        for (int m = 0; m < ROWS; ++m) {
          const float* xb = x + m * K + blk * 32;
          a[m][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), a[m][0]);
          a[m][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), a[m][1]);
        }
      };
      int64_t blk = c0;
      for (; blk + kSets <= c1; blk += kSets)
        for (int s = 0; s < kSets; ++s) block(blk + s, acc[s]);
      for (; blk < c1; ++blk) block(blk, acc[0]);
    }
    for (int m = 0; m < ROWS; ++m) {
      __m512 sum = _mm512_add_ps(acc[0][m][0], acc[0][m][1]);
      if constexpr (kSets == 2) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[1][m][0], acc[1][m][1]));
      y[m * N + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

// Q4_0 / Q4_1 go to the table kernel; Q8_0 (no min term) is the loop here. ROWS (rows of x) is
// a compile-time constant so the accumulators live in registers.
template <int64_t TYPE, int ROWS>
void rows_avx512(const float* x, int64_t K, const uint8_t* raw, int64_t row_bytes, float* y, int64_t N, int64_t n0,
                 int64_t n1) {
  if constexpr (TYPE == Q4_0 || TYPE == Q4_1) {
    rows_table_avx512<TYPE, ROWS>(x, K, raw, row_bytes, y, N, n0, n1);
  } else {
    static_assert(TYPE == Q8_0, "the AVX-512 block kernels take Q4_0, Q4_1 and Q8_0");
    constexpr int64_t bytes = block_bytes<TYPE>();
    const int64_t num_blocks = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
      __m512 acc[ROWS];
      for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
      const uint8_t* row = raw + n * row_bytes;
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        __m512 q[2];
        float d;
        _mm_prefetch(reinterpret_cast<const char*>(row + blk * bytes + PAGEDLLM_PF), _MM_HINT_T0);
        q8_0_values16(row + blk * bytes, q, &d);
        const __m512 vd = _mm512_set1_ps(d);
        for (int m = 0; m < ROWS; ++m) {
          const float* xb = x + m * K + blk * 32;
          const __m512 t = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xb + 16), _mm512_mul_ps(q[0], _mm512_loadu_ps(xb)));
          acc[m] = _mm512_fmadd_ps(vd, t, acc[m]);
        }
      }
      for (int m = 0; m < ROWS; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
    }
  }
}
#endif

// Any type: decode each block to floats once, then dot it with every row of x.
template <int64_t TYPE>
void rows_generic(const float* x, int64_t M, int64_t K, const uint8_t* raw, int64_t row_bytes, float* y, int64_t N,
                  int64_t n0, int64_t n1) {
  const Format f = format_of(TYPE);
  const int64_t num_blocks = K / f.block_values;
  float w[256];
  float acc[kMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
    const uint8_t* row = raw + n * row_bytes;
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      decode(TYPE, row + blk * f.block_bytes, w);
      for (int64_t m = 0; m < M; ++m) {
        const float* xb = x + m * K + blk * f.block_values;
        float sum = 0.f;
        for (int64_t j = 0; j < (TYPE >= Q4_K ? 256 : 32); ++j) sum += w[j] * xb[j];
        acc[m] += sum;
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = acc[m];
  }
}

// One block to floats (block_values of them), vectorised for the 32-value types on AVX2.
template <int64_t TYPE>
inline void dequantize_block(const uint8_t* b, float* w) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if constexpr (TYPE == Q4_0 || TYPE == Q4_1 || TYPE == Q8_0) {
    __m256 q[4];
    float d, minimum;
    block_values<TYPE>(b, q, &d, &minimum);
    // gguf-py's arithmetic: d * (q - 8), d * q + m, q * d
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(minimum), eight = _mm256_set1_ps(8.f);
    for (int i = 0; i < 4; ++i) {
      const __m256 v = TYPE == Q4_0 ? _mm256_mul_ps(vd, _mm256_sub_ps(q[i], eight))
                                    : _mm256_add_ps(_mm256_mul_ps(vd, q[i]), vm);
      _mm256_storeu_ps(w + 8 * i, v);
    }
    return;
  }
#endif
  decode(TYPE, b, w);
}

template <int64_t TYPE>
void dequantize_blocks(const uint8_t* raw, float* out, int64_t begin, int64_t end) {
  const Format f = format_of(TYPE);
  for (int64_t i = begin; i < end; ++i) dequantize_block<TYPE>(raw + i * f.block_bytes, out + i * f.block_values);
}

// Calls f(std::integral_constant<int64_t, TYPE>) for a block type (format_of has rejected others):
// kernels take the type as a template parameter, so each type's decode is inlined.
template <typename F>
void with_type(int64_t type, F&& f) {
  switch (type) {
    case Q4_0: return f(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return f(std::integral_constant<int64_t, Q4_1>{});
    case Q5_0: return f(std::integral_constant<int64_t, Q5_0>{});
    case Q5_1: return f(std::integral_constant<int64_t, Q5_1>{});
    case Q8_0: return f(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return f(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return f(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return f(std::integral_constant<int64_t, Q6_K>{});
  }
}

// Calls f(std::integral_constant<int, M>) for M in 1..kMaxRows: kernels take the number of
// rows of x as a compile-time constant, so their accumulators live in registers.
template <typename F>
void with_rows(int64_t M, F&& f) {
  switch (M) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)  // else only rows_generic exists
template <int64_t TYPE, int ROWS>
void rows_simd(const float* x, int64_t K, const float* xsum, const uint8_t* raw, int64_t row_bytes, float* y,
               int64_t N, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  rows_avx512<TYPE, ROWS>(x, K, raw, row_bytes, y, N, n0, n1);
#else
  rows_avx2<TYPE, ROWS>(x, K, xsum, raw, row_bytes, y, N, n0, n1);
#endif
}
#endif

template <int64_t TYPE>
void mul_mat_rows(const float* x, int64_t M, int64_t K, const float* xsum, const uint8_t* raw, int64_t row_bytes,
                  float* y, int64_t N, int64_t n0, int64_t n1) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if constexpr (TYPE == Q4_0 || TYPE == Q4_1 || TYPE == Q8_0) {
    return with_rows(M, [&](auto rows) { rows_simd<TYPE, decltype(rows)::value>(x, K, xsum, raw, row_bytes, y, N, n0, n1); });
  }
#endif
  rows_generic<TYPE>(x, M, K, raw, row_bytes, y, N, n0, n1);
}

// ---- int8 activations (llama.cpp's q8 dot products) ----
// x is quantized per 32 values to int8 with one float scale (d_x = max|x| / 127), then each
// block's dot product is an integer one: u8 x s8 -> int32 (VNNI's vpdpbusd, or AVX2's
// maddubs + madd). w . x = d_w * d_x * (q . q_x) + min_w * d_x * sum(q_x): exact for the rounded x.
// Rounding x to 8 bits moves the result by about 0.3% of |w| |x| per block, as in llama.cpp.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

struct QuantizedX {
  const int8_t* q;  // [M, K]
  const float* d;   // [M, K / 32]
  const float* s;   // [M, K / 32] d * sum(q): the sums of the rounded x
};

template <int64_t TYPE, int ROWS>
void rows_q8(const QuantizedX& x, int64_t K, const uint8_t* raw, int64_t row_bytes, float* y, int64_t N, int64_t n0,
             int64_t n1) {
  const int64_t num_blocks = K / 32;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  accumulate_rows<ROWS, block_bytes<TYPE>()>(num_blocks, raw, row_bytes, y, N, n0, n1,
                                             [&](const uint8_t* b, int64_t blk, __m256* acc, float* acc_min) {
    const float d = f16c(b);
    __m256i u, w;
    float minimum = 0.f;
    if constexpr (TYPE == Q8_0) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
      u = _mm256_sign_epi8(w, w);  // |w|; the sign moves onto x
    } else {
      const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (TYPE == Q4_0 ? 2 : 4)));
      u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), mask);  // values 0..15, 16..31
      minimum = TYPE == Q4_0 ? -8.f * d : f16c(b + 2);
    }
    for (int m = 0; m < ROWS; ++m) {
      const int64_t i = m * num_blocks + blk;
      __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + m * K + blk * 32));
      if constexpr (TYPE == Q8_0) s = _mm256_sign_epi8(s, w);
      const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(u, s));
      acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[i]), dot, acc[m]);
      if constexpr (TYPE != Q8_0) acc_min[m] += minimum * x.s[i];
    }
  });
}

// x [M, K] -> int8 per 32 values, their scales and the scaled sums of the int8 values.
void quantize_x(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < M * K / 32; ++i) {
    const float* xb = x + i * 32;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float scale = _mm_cvtss_f32(m4) / 127.f;
    d[i] = scale;
    const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m256i w[4];
    for (int j = 0; j < 4; ++j) w[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // int32 -> int8 with the lanes back in order (packs work within 128-bit halves)
    const __m256i a = _mm256_packs_epi32(w[0], w[1]), c = _mm256_packs_epi32(w[2], w[3]);
    __m256i bytes = _mm256_packs_epi16(a, c);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * 32), bytes);
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(w[0], w[1]), _mm256_add_epi32(w[2], w[3]));
    s[i] = scale * hsum(_mm256_cvtepi32_ps(sum32));  // the sum of the rounded x: w . x_q exactly
  }
}

template <int64_t TYPE>
void mul_mat_q8_rows(const QuantizedX& x, int64_t M, int64_t K, const uint8_t* raw, int64_t row_bytes, float* y,
                     int64_t N, int64_t n0, int64_t n1) {
  with_rows(M, [&](auto rows) { rows_q8<TYPE, decltype(rows)::value>(x, K, raw, row_bytes, y, N, n0, n1); });
}
#endif

}  // namespace

// ---- batches of rows: decode a few weight rows to floats once, then a register-blocked product ----
// For M rows of x past the decode kernels' 8: NR weight rows are dequantized into a small
// scratch (L1-resident) and multiplied with MR rows of x at a time, MR x NR accumulators of
// kVL floats over K. Each weight row is decoded once per call, however large M is, and the
// values are the dequantized float path's (same decode), so results match it up to summation order.
// kTiledMaxRows: up to this many rows of x the kernel beats dequantized tiles through oneDNN's
// GEMM (measured on SmolLM2's shapes; with AVX2 only, its fewer accumulators lose sooner).
#if defined(__AVX512F__)
constexpr int kVL = 16, kMR = 4, kNR = 4, kTiledMaxRows = 96;  // 16 accumulators of 32 registers
#elif defined(__AVX2__)
constexpr int kVL = 8, kMR = 2, kNR = 4, kTiledMaxRows = 32;  // 8 accumulators of 16 registers
#else
constexpr int kVL = 4, kMR = 2, kNR = 2, kTiledMaxRows = 16;
#endif
typedef float vfl __attribute__((vector_size(4 * kVL)));
typedef float vfl_unaligned __attribute__((vector_size(4 * kVL), aligned(4)));

inline vfl loadv(const float* p) { return *reinterpret_cast<const vfl_unaligned*>(p); }

inline float hsum_v(vfl v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512&>(v));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return hsum(reinterpret_cast<__m256&>(v));
#else
  float sum = 0.f;
  for (int l = 0; l < kVL; ++l) sum += v[l];
  return sum;
#endif
}

template <int MR, int NR>
inline void dot_tile(const float* __restrict__ x, int64_t K, const float* __restrict__ w, float* __restrict__ y,
                     int64_t N) {
  vfl acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vfl{};
  for (int64_t k = 0; k < K; k += kVL) {
    vfl wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = loadv(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const vfl xv = loadv(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * N + j] = hsum_v(acc[i][j]);
}

template <int NR>
inline void dot_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) dot_tile<kMR, NR>(x + m * K, K, w, y + m * N, N);
  if (m < M)  // fewer than kMR rows left
    with_rows(M - m, [&](auto rows) {
      constexpr int mr = decltype(rows)::value < kMR ? decltype(rows)::value : 1;
      dot_tile<mr, NR>(x + m * K, K, w, y + m * N, N);
    });
}

template <int64_t TYPE>
void mul_mat_tiled_rows(const float* x, int64_t M, int64_t K, const uint8_t* raw, int64_t row_bytes, float* y,
                        int64_t N, int64_t n0, int64_t n1) {
  const Format f = format_of(TYPE);
  const int64_t num_blocks = K / f.block_values;
  thread_local std::vector<float> scratch;
  scratch.resize(kNR * K);
  float* w = scratch.data();
  for (int64_t n = n0; n < n1; n += kNR) {
    const int64_t nr = std::min<int64_t>(kNR, n1 - n);
    for (int64_t j = 0; j < nr; ++j) dequantize_blocks<TYPE>(raw + (n + j) * row_bytes, w + j * K, 0, num_blocks);
    with_rows(nr, [&](auto cols) {
      constexpr int c = decltype(cols)::value <= kNR ? decltype(cols)::value : 1;
      dot_rows<c>(x, M, K, w, y + n, N);
    });
  }
}

// x [M, K] float32 (M <= 8), raw [N, K / block_values * block_bytes] uint8 -> y [M, N] float32.
// Every weight block is decoded once and used for all M rows of x (decode-sized batches).
// The operands of x @ W.T checked (x [M <= kMaxRows, K] float32, raw [N, blocks of K] uint8) and made contiguous.
struct MulMatArgs {
  torch::Tensor x, raw;
  int64_t M, K, N, row_bytes;
};

MulMatArgs mul_mat_args(torch::Tensor x, torch::Tensor raw, int64_t type, const char* name,
                        int64_t max_rows = kMaxRows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [M, K] float32");
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == torch::kUInt8, "raw must be [N, bytes] uint8");
  TORCH_CHECK(x.size(0) <= max_rows, name, " takes at most ", max_rows, " rows of x");
  const Format f = format_of(type);
  x = x.contiguous();
  raw = raw.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = raw.size(0), row_bytes = raw.size(1);
  TORCH_CHECK(K % f.block_values == 0 && row_bytes == K / f.block_values * f.block_bytes, "raw blocks do not match K");
  return {x, raw, M, K, N, row_bytes};
}

torch::Tensor gguf_mul_mat(torch::Tensor x_in, torch::Tensor raw_in, int64_t type) {
  const MulMatArgs a = mul_mat_args(x_in, raw_in, type, "gguf_mul_mat");
  const torch::Tensor &x = a.x, &raw = a.raw;
  const int64_t M = a.M, K = a.K, N = a.N, row_bytes = a.row_bytes;  // plain locals: lambdas capture them
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  // Per 32 values of x: the min term's factor, read only by the AVX2 kernels (AVX-512's fold the
  // min into their tables; the generic kernel decodes whole weights).
  thread_local std::vector<float> xsum;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
  xsum.resize(M * K / 32);
  for (int64_t i = 0; i < M * K / 32; ++i) {
    float sum = 0.f;
    for (int j = 0; j < 32; ++j) sum += xp[i * 32 + j];
    xsum[i] = sum;
  }
#endif
  const float* sp = xsum.data();
  const uint8_t* rp = raw.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    with_type(type, [&](auto t) { mul_mat_rows<decltype(t)::value>(xp, M, K, sp, rp, row_bytes, yp, N, n0, n1); });
  });
  return y;
}

// x @ W.T for any number of rows of x (meant for M > kMaxRows): weight rows decoded once each.
// K is a multiple of the block size (32 or 256), so of kVL.
torch::Tensor gguf_mul_mat_tiled(torch::Tensor x_in, torch::Tensor raw_in, int64_t type) {
  const MulMatArgs a = mul_mat_args(x_in, raw_in, type, "gguf_mul_mat_tiled", INT64_MAX);
  const torch::Tensor &x = a.x, &raw = a.raw;
  const int64_t M = a.M, K = a.K, N = a.N, row_bytes = a.row_bytes;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* rp = raw.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + kNR - 1) / kNR, 4, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kNR, n1 = std::min(N, t1 * kNR);
    with_type(type, [&](auto t) { mul_mat_tiled_rows<decltype(t)::value>(xp, M, K, rp, row_bytes, yp, N, n0, n1); });
  });
  return y;
}

// The same product with x rounded to int8 per 32 values (Q4_0, Q4_1, Q8_0; other types take
// gguf_mul_mat's float path). 1.4-2x faster: the blocks are never converted to floats.
torch::Tensor gguf_mul_mat_q8(torch::Tensor x_in, torch::Tensor raw_in, int64_t type) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (type == Q4_0 || type == Q4_1 || type == Q8_0) {
    const MulMatArgs a = mul_mat_args(x_in, raw_in, type, "gguf_mul_mat_q8");
    const torch::Tensor &x = a.x, &raw = a.raw;
    const int64_t M = a.M, K = a.K, N = a.N, row_bytes = a.row_bytes;
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> ds;
    q.resize(M * K);
    ds.resize(2 * M * K / 32);
    quantize_x(x.data_ptr<float>(), M, K, q.data(), ds.data(), ds.data() + M * K / 32);
    const QuantizedX qx{q.data(), ds.data(), ds.data() + M * K / 32};
    auto y = torch::empty({M, N}, x.options());
    const uint8_t* rp = raw.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
      switch (type) {
        case Q4_0: return mul_mat_q8_rows<Q4_0>(qx, M, K, rp, row_bytes, yp, N, n0, n1);
        case Q4_1: return mul_mat_q8_rows<Q4_1>(qx, M, K, rp, row_bytes, yp, N, n0, n1);
        case Q8_0: return mul_mat_q8_rows<Q8_0>(qx, M, K, rp, row_bytes, yp, N, n0, n1);
      }
    });
    return y;
  }
#endif
  return gguf_mul_mat(x_in, raw_in, type);
}

// raw [N, bytes] uint8 -> out [N, K] float32 (a caller's scratch buffer: no page faults per call).
torch::Tensor gguf_dequantize(torch::Tensor raw, int64_t type, torch::Tensor out) {
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == torch::kUInt8, "raw must be [N, bytes] uint8");
  const Format f = format_of(type);
  raw = raw.contiguous();
  const int64_t N = raw.size(0), num_blocks = raw.size(1) / f.block_bytes;
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
              out.size(1) == num_blocks * f.block_values, "out must be contiguous float32 [N, K]");
  const uint8_t* rp = raw.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * num_blocks, 256, [&](int64_t begin, int64_t end) {
    with_type(type, [&](auto t) { dequantize_blocks<decltype(t)::value>(rp, op, begin, end); });
  });
  return out;
}

// The products as torch ops too (torch.ops.pagedllm_gguf), so that a traced decode step
// (pagedllm/core/graphs.py) records them; eager calls take the Python bindings below.
TORCH_LIBRARY(pagedllm_gguf, m) {
  m.def("mul_mat(Tensor x, Tensor raw, int type) -> Tensor", &gguf_mul_mat);
  m.def("mul_mat_q8(Tensor x, Tensor raw, int type) -> Tensor", &gguf_mul_mat_q8);
  m.def("mul_mat_tiled(Tensor x, Tensor raw, int type) -> Tensor", &gguf_mul_mat_tiled);
  m.def("dequantize(Tensor raw, int type, Tensor(a!) out) -> Tensor(a!)", &gguf_dequantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_mul_mat", &gguf_mul_mat, "x @ W.T with W as raw GGUF blocks (float32, at most 8 rows of x)");
  m.def("gguf_mul_mat_q8", &gguf_mul_mat_q8, "gguf_mul_mat with x rounded to int8 per 32 values (llama.cpp's q8)");
  m.def("gguf_mul_mat_tiled", &gguf_mul_mat_tiled, "x @ W.T with W as raw GGUF blocks, any number of rows of x");
  m.def("gguf_tiled_max_rows", [] { return kTiledMaxRows; }, "rows of x up to which gguf_mul_mat_tiled is the faster path");
  m.def("gguf_dequantize", &gguf_dequantize, "raw GGUF blocks -> float32 rows");
}
