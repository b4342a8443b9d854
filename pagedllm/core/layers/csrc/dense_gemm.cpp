// Float32 linear layers on CPU: y = x @ W.T (+ bias), with W packed once into column panels.
//
// Packed layout: [num_panels][in_features][kNR], panel p holding output columns
// [p * kNR, (p + 1) * kNR) (the last one zero-padded), one row of kNR weights per input
// feature. The micro-kernel keeps an MR x kNR block of outputs in registers and, for each
// input feature k, adds x[r][k] (broadcast) times the panel's row k: kNR / lanes vector loads
// and MR * kNR / lanes FMAs per k, all loads contiguous.
//
// Why not oneDNN's own packed matmul: at decode batch sizes (tens of rows) its kernels wait on
// the weights. A model's weights do not stay in cache from one step to the next, and a core's
// own hardware prefetching does not keep enough lines in flight to hide DRAM's latency, so a
// 64-row matmul ran at about two thirds of its in-cache speed. Here the weights are read in
// the order they are used, and every call asks for the next panel chunk (prefetcht1, into L2)
// while it computes this one, so the memory traffic overlaps the arithmetic.
//
// Every output is one FMA chain over k = 0..in_features-1, in order, whatever the number of
// rows and however the work is split (rows, columns and the in_features chunks are blocked;
// a chunk continues the chain from the stored partial sum): a row's result does not depend
// on which other rows share the call. Registered as torch ops pagedllm_dense::*.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_math.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kNR = 48;  // three 16-float registers
constexpr int kMR = 8;   // 24 accumulators of 32 registers
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kNR = 16;  // two 8-float registers
constexpr int kMR = 6;   // 12 accumulators of 16 registers
#else
constexpr int kNR = 16;
constexpr int kMR = 4;
#endif

// in_features chunk: with AVX-512 a panel's chunk is kKC * kNR floats (192 KiB); it stays in
// L2 while a block of rows is computed. (SmolLM2's 576 inputs are one chunk, its 1536 two.)
constexpr int64_t kKC = 1024;
// Rows per block: their x chunks (at most kMC * kKC floats) stay in L2 while a thread walks its panels.
constexpr int64_t kMC = 192;

inline void prefetch_l2(const char* p, int64_t lines) {
  for (int64_t i = 0; i < lines; ++i) __builtin_prefetch(p + 64 * i, 0, 2);
}

// step(k) for k = 0..kc-1 in order, four at a time, asking for pf_lines cache lines from pf
// spread over the loop (an equal share every four k). The micro-kernels' shared loop.
template <typename Step>
__attribute__((always_inline)) inline void k_loop(int64_t kc, const char* pf, int64_t pf_lines, Step&& step) {
  const int64_t per = (pf_lines * 4 + kc - 1) / std::max<int64_t>(kc, 1);
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    if (pf_lines > 0) {
      const int64_t n = std::min(per, pf_lines);
      prefetch_l2(pf, n);
      pf += 64 * n;
      pf_lines -= n;
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) step(k + u);
  }
  for (; k < kc; ++k) step(k);
}

#if defined(__AVX512F__)
// c[MR][ncols] (row stride ldc) = (accumulate ? c : 0) + x[MR][kc] (row stride ldx) @ w[kc][kNR],
// asking for pf_lines cache lines from pf along the way.
template <int MR>
void micro_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, int64_t kc,
                  float* __restrict__ c, int64_t ldc, int ncols, bool accumulate, const char* pf, int64_t pf_lines) {
  __m512 acc[MR][3];
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : (1u << ncols) - 1;
  const __mmask16 m1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : (1u << (ncols - 16)) - 1;
  const __mmask16 m2 = ncols >= 48 ? 0xFFFF : ncols <= 32 ? 0 : (1u << (ncols - 32)) - 1;
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      acc[r][0] = _mm512_maskz_loadu_ps(m0, c + r * ldc);
      acc[r][1] = _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
      acc[r][2] = _mm512_maskz_loadu_ps(m2, c + r * ldc + 32);
    } else {
      acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_ps();
    }
  }
  k_loop(kc, pf, pf_lines, [&](int64_t k) __attribute__((always_inline)) {
    const float* wk = w + k * kNR;
    const __m512 b0 = _mm512_loadu_ps(wk), b1 = _mm512_loadu_ps(wk + 16), b2 = _mm512_loadu_ps(wk + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
    }
  });
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
    _mm512_mask_storeu_ps(c + r * ldc + 32, m2, acc[r][2]);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256i lane_mask(int n) {  // lanes [0, n) set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int MR>
void micro_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, int64_t kc,
                  float* __restrict__ c, int64_t ldc, int ncols, bool accumulate, const char* pf, int64_t pf_lines) {
  __m256 acc[MR][2];
  const __m256i m0 = lane_mask(std::min(ncols, 8)), m1 = lane_mask(std::max(ncols - 8, 0));
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      acc[r][0] = _mm256_maskload_ps(c + r * ldc, m0);
      acc[r][1] = _mm256_maskload_ps(c + r * ldc + 8, m1);
    } else {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    }
  }
  k_loop(kc, pf, pf_lines, [&](int64_t k) __attribute__((always_inline)) {
    const float* wk = w + k * kNR;
    const __m256 b0 = _mm256_loadu_ps(wk), b1 = _mm256_loadu_ps(wk + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  });
  for (int r = 0; r < MR; ++r) {
    _mm256_maskstore_ps(c + r * ldc, m0, acc[r][0]);
    _mm256_maskstore_ps(c + r * ldc + 8, m1, acc[r][1]);
  }
}
#else
template <int MR>
void micro_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, int64_t kc,
                  float* __restrict__ c, int64_t ldc, int ncols, bool accumulate, const char* pf, int64_t pf_lines) {
  float acc[MR][kNR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kNR; ++j) acc[r][j] = accumulate && j < ncols ? c[r * ldc + j] : 0.f;
  k_loop(kc, pf, pf_lines, [&](int64_t k) {
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < kNR; ++j) acc[r][j] = __builtin_fmaf(x[r * ldx + k], w[k * kNR + j], acc[r][j]);
  });
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < ncols; ++j) c[r * ldc + j] = acc[r][j];
}
#endif

using Kernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool, const char*, int64_t);

template <int... MR>
constexpr auto make_kernels(std::integer_sequence<int, MR...>) {
  return std::array<Kernel, sizeof...(MR)>{&micro_kernel<MR + 1>...};
}
// kernels[n - 1]: the micro-kernel for n rows.
constexpr auto kernels = make_kernels(std::make_integer_sequence<int, kMR>{});

// in_features split into chunks of at most kKC, as even as possible.
inline int64_t num_k_chunks(int64_t K) { return std::max<int64_t>(1, (K + kKC - 1) / kKC); }
inline int64_t k_chunk_begin(int64_t K, int64_t chunks, int64_t i) { return K * i / chunks; }

// Weights are streamed from memory on every call: on 2 MiB pages a panel stream crosses a
// page (a TLB miss, and the end of the hardware prefetchers' reach) every 2 MiB, not every
// 4 KiB. A hint (Linux, transparent huge pages in "madvise" mode); given before the pages
// are first touched, as the kernel only backs a fault with a huge page then.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) / kHuge * kHuge, last = end / kHuge * kHuge;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack: expected a float32 [out_features, in_features] CPU weight");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kNR - 1) / kNR;
  auto packed = at::empty({panels, K, kNR}, w.options());
  advise_huge_pages(packed);
  packed.zero_();
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < std::min<int64_t>(kNR, N - p * kNR); ++j) {
        const float* row = src + (p * kNR + j) * K;
        float* col = dst + p * K * kNR + j;
        for (int64_t k = 0; k < K; ++k) col[k * kNR] = row[k];
      }
  });
  return packed;
}

void check_operands(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && (x.stride(1) == 1 || x.size(1) <= 1),
              "dense linear: x must be float32 [rows, in_features] with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kNR && packed.is_contiguous() && packed.scalar_type() == at::kFloat,
              "dense linear: the weight was not packed by this build (panel width ", kNR, ")");
  const int64_t panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == x.size(1), "dense linear: x has ", x.size(1), " features, the weight ", packed.size(1));
  TORCH_CHECK(N > (panels - 1) * kNR && N <= panels * kNR, "dense linear: ", N, " outputs do not match ", panels, " panels");
}

// The product's work, split over the threads. The output columns come in groups of
// `group` panels read one after the other for the same rows (1: a plain product; 2: the
// panels j and j + panels / 2 of a gate | up weight). For each (row block, group) item,
// tile(m0, j, i, &c, &ldc) says where panel i of group j writes the columns of rows from m0
// on (row stride ldc; a row block has at most kMC rows), and done(m0, m1, j)
// runs once the group's panels are complete for rows [m0, m1).
template <typename Tile, typename Done>
void run_panels(const float* xp, int64_t ldx, int64_t M, int64_t K, const float* wp, int64_t panels, int64_t group,
                int64_t N, Tile&& tile, Done&& done) {
  const int64_t kchunks = num_k_chunks(K), groups = panels / group;
  // Row blocks of at most kMC rows, in whole micro-kernel blocks, as even as those allow. When
  // there are several, their number is a multiple of the thread count: the threads split the
  // (row block, group) items evenly, so each then takes whole row blocks of about equal size.
  const int64_t micro_blocks = (M + kMR - 1) / kMR;
  int64_t row_blocks = (M + kMC - 1) / kMC;
  if (row_blocks > 1) {
    const int64_t threads = at::get_num_threads();
    row_blocks = std::min(micro_blocks, (row_blocks + threads - 1) / threads * threads);
  }
  auto block_begin = [&](int64_t mb) { return std::min(M, micro_blocks * mb / row_blocks * kMR); };
  // The panel that group j's i-th read is.
  auto panel_of = [&](int64_t j, int64_t i) { return j + i * groups; };
  // Work items (row block, group), row block major: a thread takes a contiguous run, so it
  // keeps its rows' x in cache and walks the panels in memory order.
  const int64_t items = row_blocks * groups;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(2 * group * (M / row_blocks + 1) * K * kNR, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t mb = item / groups, j = item % groups;
      const int64_t m0 = block_begin(mb), m1 = block_begin(mb + 1);
      for (int64_t i = 0; i < group; ++i) {
        const int64_t p = panel_of(j, i);
        const int ncols = static_cast<int>(std::min<int64_t>(kNR, N - p * kNR));
        const float* panel = wp + p * K * kNR;
        float* c;
        int64_t ldc;
        tile(m0, j, i, &c, &ldc);
        for (int64_t kb = 0; kb < kchunks; ++kb) {
          const int64_t k0 = k_chunk_begin(K, kchunks, kb), k1 = k_chunk_begin(K, kchunks, kb + 1);
          // What this thread reads next: the panel's next chunk, or the next panel.
          const char* next = nullptr;
          int64_t next_lines = 0;
          if (kb + 1 < kchunks) {
            next = reinterpret_cast<const char*>(panel + k1 * kNR);
            next_lines = (k_chunk_begin(K, kchunks, kb + 2) - k1) * kNR * 4 / 64;
          } else if (i + 1 < group || item + 1 < end) {
            const int64_t np = i + 1 < group ? panel_of(j, i + 1) : panel_of((item + 1) % groups, 0);
            next = reinterpret_cast<const char*>(wp + np * K * kNR);
            next_lines = (k_chunk_begin(K, kchunks, 1)) * kNR * 4 / 64;
          }
          const int64_t blocks = (m1 - m0 + kMR - 1) / kMR;
          const int64_t lines_per_block = (next_lines + blocks - 1) / blocks;
          for (int64_t r = m0, b = 0; r < m1; r += kMR, ++b) {
            const int rows = static_cast<int>(std::min<int64_t>(kMR, m1 - r));
            const int64_t pf_lines = std::max<int64_t>(0, std::min(lines_per_block, next_lines - b * lines_per_block));
            kernels[rows - 1](xp + r * ldx + k0, ldx, panel + k0 * kNR, k1 - k0, c + (r - m0) * ldc, ldc, ncols, kb > 0,
                              next + 64 * b * lines_per_block, pf_lines);
          }
        }
      }
      done(m0, m1, j);
    }
  });
}

// x: [M, K] float32 with contiguous rows; packed: pack()'s [panels, K, kNR]; bias: [N] or
// undefined. Returns [M, N].
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N) {
  RECORD_FUNCTION("pagedllm::dense_linear", std::vector<c10::IValue>({x}));
  check_operands(x, packed, N);
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0);
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat, "dense linear: bias must be float32 [", N, "]");
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  float* op = out.data_ptr<float>();
  run_panels(x.data_ptr<float>(), x.stride(0), M, K, packed.data_ptr<float>(), panels, 1, N,
             [&](int64_t m0, int64_t p, int64_t, float** c, int64_t* ldc) {
               *c = op + m0 * N + p * kNR;
               *ldc = N;
             },
             [&](int64_t m0, int64_t m1, int64_t p) {
               if (b == nullptr) return;
               const int64_t ncols = std::min<int64_t>(kNR, N - p * kNR);
               for (int64_t r = m0; r < m1; ++r)
                 for (int64_t j = 0; j < ncols; ++j) op[r * N + p * kNR + j] += b[p * kNR + j];
             });
  return out;
}

// A thread's gate and up tiles of one row block: [2][kMC][kNR].
thread_local std::vector<float> glu_tiles;

// silu(x @ G.T) * (x @ U.T) for a packed [G; U] weight (gate | up, N = 2 * I outputs with I a
// multiple of the panel width): [M, I]. Each thread multiplies a row block by gate panel j,
// then by up panel j, and writes silu(gate) * up from the two tiles, as fused_ops'
// silu_and_mul computes it: the [M, 2 * I] product is never written out.
at::Tensor linear_silu_mul(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  RECORD_FUNCTION("pagedllm::dense_linear_silu_mul", std::vector<c10::IValue>({x}));
  check_operands(x, packed, N);
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), I = N / 2;
  TORCH_CHECK(N % 2 == 0 && I % kNR == 0, "linear_silu_mul: the gate and up halves (", N,
              " outputs) must each be whole panels of ", kNR);
  auto out = at::empty({M, I}, x.options());
  if (M == 0) return out;
  float* op = out.data_ptr<float>();
  run_panels(x.data_ptr<float>(), x.stride(0), M, K, packed.data_ptr<float>(), panels, 2, N,
             [&](int64_t, int64_t, int64_t i, float** c, int64_t* ldc) {
               glu_tiles.resize(2 * kMC * kNR);
               *c = glu_tiles.data() + i * kMC * kNR;
               *ldc = kNR;
             },
             [&](int64_t m0, int64_t m1, int64_t j) {
               const float* gate = glu_tiles.data();
               const float* up = gate + kMC * kNR;
               for (int64_t r = m0; r < m1; ++r)
                 pagedllm_cpu::silu_mul_row(gate + (r - m0) * kNR, up + (r - m0) * kNR, op + r * I + j * kNR, kNR);
             });
  return out;
}

int64_t panel_width() { return kNR; }

}  // namespace

TORCH_LIBRARY(pagedllm_dense, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("linear_silu_mul(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.impl("pack", c10::DispatchKey::CPU, &pack);
  m.impl("linear", c10::DispatchKey::CPU, &linear);
  m.impl("linear_silu_mul", c10::DispatchKey::CPU, &linear_silu_mul);
  m.def("panel_width() -> int", &panel_width);
}
