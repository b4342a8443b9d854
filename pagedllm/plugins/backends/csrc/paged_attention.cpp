// Attention over the paged KV cache, read in place: cache writes, decodes and prefill
// chunks of one step in one call, without gathers or padding.
//
// Cache layout, per layer: [2, num_blocks, num_kv_heads, block_size * head_dim]. One
// (block, kv head) tile is contiguous; a key tile is stored transposed, [head_dim][block_size],
// a value tile as is, [block_size][head_dim]. So both products are AXPYs over contiguous
// rows: scores[pos] += q[d] * key_tile[d][pos] (vectorised over positions) and
// out[d] += p[pos] * value_tile[pos][d] (vectorised over head_dim), with no horizontal sums.
//
// A work item is (request, kv head[, part of the sequence]): all query heads of a GQA group
// are scored against one read of the kv head's tiles. Softmax is online (running max and
// sum, one pass over the keys). Compute is float32 whatever the cache dtype.
//
// An fp8 cache (float8_e4m3fn or float8_e5m2) holds k / k_scale and v / v_scale (per-tensor
// scales, saturated at the format's largest value, rounded as torch's conversion rounds).
// Reading it costs no multiply by the scale: k_scale is folded into the pre-scaled query and
// v_scale into the final normalisation.
// Registered as the torch op pagedllm_attention::paged_attention (light headers: fast to build).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x), vectorisable: e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2
// split in two for an exact reduction), |r| <= ln(2) / 2, e^r by its degree-7 Taylor
// polynomial. Relative error ~1e-7, like a libm expf. exp_reduced gives r and e^r for a float
// or a vector of floats; the callers below build 2^n.
template <typename V>
__attribute__((always_inline)) inline V exp_reduced(V x, V n) {
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = r * (1.f / 5040.f) + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

__attribute__((always_inline)) inline float fast_exp(float x) {
  x = std::max(x, -87.f);  // (only x <= 0 here)
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return exp_reduced(x, n) * scale;
}

template <typename T>
inline void prefetch_tile(const T* tile, int64_t num_elems) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int64_t off = 0; off < num_elems * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// The same into L2 only (prefetcht1): for tiles needed a chunk from now.
template <typename T>
inline void prefetch_tile_l2(const T* tile, int64_t num_elems) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int64_t off = 0; off < num_elems * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 2);
}

// The tiles one thread will read, in the order it reads them, so that the product on each
// tile can ask for the one kStreamAhead tiles later, a line per row it reads. Decode reads
// scattered 4 KiB tiles from memory and computes little on each: the reads must overlap
// the arithmetic. A tile's 64 prefetches issued in one burst fill the core's miss queue and
// stall it (a quarter of the kernel's samples sat on them); spread over the tile's
// arithmetic they keep the queue busy without stopping it.
constexpr int64_t kStreamAhead = 4;

struct TileStream {
  std::vector<const char*> tiles;
  int64_t tile_bytes = 0, pos = 0;
  // Called as each tile is about to be read: the tile to prefetch while reading it, or null.
  const char* next() {
    const int64_t ahead = pos + kStreamAhead;
    ++pos;
    return ahead < static_cast<int64_t>(tiles.size()) ? tiles[ahead] : nullptr;
  }
};

// Strided [tokens, heads, head_dim] view of q, k or v (rows of a fused qkv tensor).
template <typename T>
struct Rows {
  const T* data;
  int64_t token_stride, head_stride;
  const T* at(int64_t token, int64_t head) const { return data + token * token_stride + head * head_stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "expected [tokens, heads, head_dim] with contiguous head_dim");
  return {x.data_ptr<T>(), x.stride(0), x.stride(1)};
}

struct Geometry {
  int64_t num_kv_heads, group, head_dim, block_size;
  int64_t tile() const { return head_dim * block_size; }
};

// One SIMD register of floats: 16 lanes with AVX-512, else 8. A 16-position block row is
// kLanesPerBlock of them.
#ifdef __AVX512F__
constexpr int kVL = 16;
#else
constexpr int kVL = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kVL)));
typedef float vf_unaligned __attribute__((vector_size(4 * kVL), aligned(4)));
constexpr int kBlock = 16;  // the fast path's block size
constexpr int kLanesPerBlock = kBlock / kVL;

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }

// Loads kVL consecutive cache elements as float32; specialised for bfloat16 further down.
template <typename T>
struct LoadVec {
  static vf apply(const T* p) {
    vf v;
    for (int i = 0; i < kVL; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
};
template <>
struct LoadVec<float> {
  static vf apply(const float* p) { return load(p); }
};

typedef int32_t vi __attribute__((vector_size(4 * kVL)));

// fast_exp on a vector (same method); round-to-nearest by the 1.5 * 2^23 trick.
__attribute__((always_inline)) inline vf fast_exp(vf x) {
  const vf lowest = x - x - 87.f;
  x = x < lowest ? lowest : x;
  const vf magic = x - x + 12582912.f;
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return exp_reduced(x, n) * reinterpret_cast<const vf&>(bits);
}

// Lane indices 0..kVL-1.
inline vi lane_index() {
  vi idx;
  for (int i = 0; i < kVL; ++i) idx[i] = i;
  return idx;
}

// One row of a chunk's scores (width floats, a multiple of kVL) into probabilities for
// positions [lo, hi) (the others become 0), against the running max m and sum l; acc
// (D floats) is rescaled when the max grows.
inline void softmax_row(float* __restrict__ sr, int64_t width, int64_t lo, int64_t hi, float& m, float& l,
                        float* __restrict__ acc, int64_t D) {
  const vi idx = lane_index();
  vf mx = vf{} + kNegInf;
  for (int64_t p = 0; p < width; p += kVL) {
    const vi pos = idx + static_cast<int32_t>(p);
    const vf x = load(sr + p);
    const vf masked = (pos >= static_cast<int32_t>(lo)) & (pos < static_cast<int32_t>(hi)) ? x : vf{} + kNegInf;
    mx = masked > mx ? masked : mx;
  }
  float chunk_max = kNegInf;
  for (int i = 0; i < kVL; ++i) chunk_max = std::max(chunk_max, mx[i]);
  if (chunk_max > m) {
    const float correction = l == 0.f ? 0.f : fast_exp(m - chunk_max);
    l *= correction;
    for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
    m = chunk_max;
  }
  vf sum{};
  for (int64_t p = 0; p < width; p += kVL) {
    const vi pos = idx + static_cast<int32_t>(p);
    const vf e = fast_exp(load(sr + p) - m);
    const vf kept = (pos >= static_cast<int32_t>(lo)) & (pos < static_cast<int32_t>(hi)) ? e : vf{};
    store(sr + p, kept);
    sum += kept;
  }
  for (int i = 0; i < kVL; ++i) l += sum[i];
}

// Scores of NR query rows (q [NR][D]) against one key tile [D][16] into s (row stride
// ldq). The accumulators stay in registers; S interleaved partial sums over d give the
// FMA pipes enough independent chains when NR is small.
// pf: a tile to prefetch into L2 meanwhile (or null), one line per key row.
template <typename T, int D, int NR>
inline void score_rows(const float* __restrict__ q, const T* __restrict__ kt, float* __restrict__ s, int64_t lds,
                       const char* pf) {
  constexpr int S = NR * kLanesPerBlock >= 8 ? 1 : (NR * kLanesPerBlock >= 4 ? 2 : 4);
  vf a[S][NR][kLanesPerBlock] = {};
  for (int d = 0; d < D; d += S) {
    for (int i = 0; i < S; ++i) {
      if (pf != nullptr) __builtin_prefetch(pf + (d + i) * kBlock * sizeof(T), 0, 2);
      vf k[kLanesPerBlock];
      for (int c = 0; c < kLanesPerBlock; ++c) k[c] = LoadVec<T>::apply(kt + (d + i) * kBlock + c * kVL);
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < kLanesPerBlock; ++c) a[i][r][c] += q[r * D + d + i] * k[c];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < kLanesPerBlock; ++c) {
      vf sum = a[0][r][c];
      for (int i = 1; i < S; ++i) sum += a[i][r][c];
      store(s + r * lds + c * kVL, sum);
    }
}

// acc [NR][D] += sum over positions [p0, p1) of probs[r][p] * value[p] (probs row stride
// ldp), value tile [16][D].
// pf: as in score_rows, one line per value row's 64 bytes (a short block prefetches less).
template <typename T, int D, int NR>
inline void accumulate_rows(const float* __restrict__ probs, int64_t ldp, const T* __restrict__ vt, int64_t p0,
                            int64_t p1, float* __restrict__ acc, const char* pf) {
  constexpr int C = D / kVL;
  vf a[NR][C];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = load(acc + r * D + c * kVL);
  for (int64_t p = p0; p < p1; ++p) {
    for (int c = 0; c < C; ++c) {
      if (pf != nullptr && c * kVL * sizeof(T) % 64 == 0) __builtin_prefetch(pf + (p * D + c * kVL) * sizeof(T), 0, 2);
      const vf v = LoadVec<T>::apply(vt + p * D + c * kVL);
      for (int r = 0; r < NR; ++r) a[r][c] += probs[r * ldp + p] * v;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < C; ++c) store(acc + r * D + c * kVL, a[r][c]);
}

// Row blocking: at most ~12 accumulator registers per micro-kernel call.
template <int D>
constexpr int value_rows() {
  return std::max(1, std::min(4, 12 / (D / kVL)));
}
constexpr int kScoreRows = 8 / kLanesPerBlock;

// The row blocks of one tile; the first of them prefetches pf.
template <typename T, int D, int NR>
inline void score_all(const float* q, int64_t rows, const T* kt, float* s, int64_t lds, const char* pf) {
  int64_t r = 0;
  for (; r + NR <= rows; r += NR, pf = nullptr) score_rows<T, D, NR>(q + r * D, kt, s + r * lds, lds, pf);
  if constexpr (NR > 1) {
    if (r < rows) score_all<T, D, NR - 1>(q + r * D, rows - r, kt, s + r * lds, lds, pf);
  }
}

template <typename T, int D, int NR>
inline void accumulate_all(const float* s, int64_t lds, int64_t rows, const T* vt, int64_t p0, int64_t p1,
                           float* acc, const char* pf) {
  int64_t r = 0;
  for (; r + NR <= rows; r += NR, pf = nullptr) accumulate_rows<T, D, NR>(s + r * lds, lds, vt, p0, p1, acc + r * D, pf);
  if constexpr (NR > 1) {
    if (r < rows) accumulate_all<T, D, NR - 1>(s + r * lds, lds, rows - r, vt, p0, p1, acc + r * D, pf);
  }
}

// Generic sizes: the same products with runtime head_dim and block_size.
template <typename T>
void score_generic(const float* q, int64_t rows, const T* kt, float* s, int64_t lds, int64_t D, int64_t BS) {
  for (int64_t r = 0; r < rows; ++r) std::fill(s + r * lds, s + r * lds + BS, 0.f);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = 0; r < rows; ++r) {
      const float qd = q[r * D + d];
      float* __restrict__ sr = s + r * lds;
      for (int64_t p = 0; p < BS; ++p) sr[p] += qd * static_cast<float>(kt[d * BS + p]);
    }
}

template <typename T>
void accumulate_generic(const float* s, int64_t lds, int64_t rows, const T* vt, int64_t p0, int64_t p1, float* acc,
                        int64_t D) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t r = 0; r < rows; ++r) {
      const float w = s[r * lds + p];
      float* __restrict__ ar = acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] += w * static_cast<float>(vt[p * D + d]);
    }
}

// Scores are soft-maxed a chunk of this many blocks at a time: long enough for the
// vector loops, short enough to stay in L1.
constexpr int64_t kChunkBlocks = 8;

// Attends `rows` query rows (q [rows][D], pre-scaled) to keys [key_begin, key_end) of one kv
// head, continuing the online-softmax state: running max m, running sum l, unnormalised
// output acc [rows][D]. Row r (query token r / group) sees keys up to limit[r / group]
// inclusive. Scratch s: [rows][kChunkBlocks * block_size].
// D_ > 0: the fast path (block_size 16, D_ a multiple of the vector width); 0: any sizes.
template <typename T, int D_>
void attend_rows(const float* q, int64_t rows, const T* key_base, const T* value_base, const int64_t* table,
                 int64_t key_begin, int64_t key_end, const int64_t* limit, const Geometry& g, int64_t kv_head,
                 float* m, float* l, float* acc, float* s, TileStream* stream) {
  const int64_t D = D_ > 0 ? D_ : g.head_dim;
  const int64_t BS = D_ > 0 ? kBlock : g.block_size;
  const int64_t tile = D * BS, group = g.group, lds = kChunkBlocks * BS;
  const int64_t end_block = (key_end + BS - 1) / BS;
  for (int64_t b0 = key_begin / BS; b0 < end_block; b0 += kChunkBlocks) {
    const int64_t num_blocks = std::min(kChunkBlocks, end_block - b0);
    const int64_t base = b0 * BS;  // position of the chunk's first key
    const T* key_tiles[kChunkBlocks];
    const T* value_tiles[kChunkBlocks];
    for (int64_t i = 0; i < num_blocks; ++i) {
      const int64_t tile_index = table[b0 + i] * g.num_kv_heads + kv_head;
      key_tiles[i] = key_base + tile_index * tile;      // [D][BS]
      value_tiles[i] = value_base + tile_index * tile;  // [BS][D]
    }
    // Each tile is its own 4 KiB page, which hardware prefetchers do not cross: ask for the
    // whole next chunk (and, on the first, this chunk's keys and values) while this one is
    // computed. In a model the cache is cold (a layer's weights went through since this
    // layer's last step): one request for every line keeps many misses in flight at once.
    // (With a stream, it looks ahead across chunks and work items instead.)
    if (stream == nullptr && b0 == key_begin / BS) {
      for (int64_t i = 1; i < num_blocks; ++i) prefetch_tile_l2(key_tiles[i], tile);
      for (int64_t i = 0; i < num_blocks; ++i) prefetch_tile_l2(value_tiles[i], tile);
    }
    for (int64_t i = b0 + kChunkBlocks; stream == nullptr && i < std::min(b0 + 2 * kChunkBlocks, end_block); ++i) {
      const int64_t tile_index = table[i] * g.num_kv_heads + kv_head;
      prefetch_tile_l2(key_base + tile_index * tile, tile);
      prefetch_tile_l2(value_base + tile_index * tile, tile);
    }
    for (int64_t i = 0; i < num_blocks; ++i) {
      // The tiles are scattered 4 KiB pieces: fetch the next one while this one is used.
      const char* pf = nullptr;
      if (stream != nullptr)
        pf = stream->next();
      else
        prefetch_tile(i + 1 < num_blocks ? key_tiles[i + 1] : value_tiles[0], tile);
      if constexpr (D_ > 0)
        score_all<T, D_, kScoreRows>(q, rows, key_tiles[i], s + i * BS, lds, pf);
      else {
        if (pf != nullptr) prefetch_tile_l2(pf, tile);
        score_generic<T>(q, rows, key_tiles[i], s + i * BS, lds, D, BS);
      }
    }
    // Online softmax over the chunk: row r sees chunk positions [lo, hi_r).
    const int64_t lo = std::max(key_begin - base, int64_t(0));
    const int64_t chunk_end = std::min(key_end - base, num_blocks * BS);
    for (int64_t r = 0; r < rows; ++r) {
      float* __restrict__ sr = s + r * lds;
      const int64_t hi = std::min(chunk_end, limit[r / group] - base + 1);
      if (hi <= lo) {
        std::fill(sr, sr + lds, 0.f);
        continue;
      }
      if constexpr (D_ > 0) {
        softmax_row(sr, kChunkBlocks * kBlock, lo, hi, m[r], l[r], acc + r * D, D);
        continue;
      }
      float chunk_max = kNegInf;
      for (int64_t p = lo; p < hi; ++p) chunk_max = std::max(chunk_max, sr[p]);
      if (chunk_max > m[r]) {
        const float correction = l[r] == 0.f ? 0.f : fast_exp(m[r] - chunk_max);
        l[r] *= correction;
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= correction;
        m[r] = chunk_max;
      }
      for (int64_t p = 0; p < lds; ++p) {
        sr[p] = p >= lo && p < hi ? fast_exp(sr[p] - m[r]) : 0.f;
        l[r] += sr[p];
      }
    }
    for (int64_t i = 0; i < num_blocks; ++i) {
      const int64_t p0 = std::max(lo - i * BS, int64_t(0)), p1 = std::min(chunk_end - i * BS, BS);
      const char* pf = nullptr;
      if (stream != nullptr)
        pf = stream->next();
      else if (i + 1 < num_blocks)
        prefetch_tile(value_tiles[i + 1], tile);
      else if (b0 + num_blocks < end_block)
        prefetch_tile(key_base + (table[b0 + num_blocks] * g.num_kv_heads + kv_head) * tile, tile);
      if constexpr (D_ > 0)
        accumulate_all<T, D_, value_rows<D_>()>(s + i * BS, lds, rows, value_tiles[i], p0, p1, acc, pf);
      else {
        if (pf != nullptr) prefetch_tile_l2(pf, tile);
        accumulate_generic<T>(s + i * BS, lds, rows, value_tiles[i], p0, p1, acc, D);
      }
    }
  }
}

// bfloat16 is the top half of a float32: widen and shift, vectorised.
template <>
struct LoadVec<c10::BFloat16> {
  static vf apply(const c10::BFloat16* p) {
    typedef uint16_t vu16 __attribute__((vector_size(2 * kVL), aligned(2)));
    typedef uint32_t vu32 __attribute__((vector_size(4 * kVL)));
    const vu32 wide = __builtin_convertvector(*reinterpret_cast<const vu16*>(p), vu32) << 16;
    return reinterpret_cast<const vf&>(wide);
  }
};

// An fp8 byte's magnitude bits shifted into a float32's exponent and mantissa give the
// value times 2^-(127 - bias), subnormals included (they become float32 subnormals); one
// multiply restores it. kShift: float32 mantissa bits minus the format's.
template <int kShift, int kBias>
inline vf load_fp8(const uint8_t* p) {
  typedef uint8_t vu8 __attribute__((vector_size(kVL), aligned(1)));
  typedef uint32_t vu32 __attribute__((vector_size(4 * kVL)));
  const vu32 w = __builtin_convertvector(*reinterpret_cast<const vu8*>(p), vu32);
  const vu32 bits = ((w & 0x7Fu) << kShift) | ((w & 0x80u) << 24);
  return reinterpret_cast<const vf&>(bits) * (vf{} + __builtin_ldexpf(1.f, 127 - kBias));
}
template <>
struct LoadVec<c10::Float8_e4m3fn> {
  static vf apply(const c10::Float8_e4m3fn* p) { return load_fp8<20, 7>(reinterpret_cast<const uint8_t*>(p)); }
};
template <>
struct LoadVec<c10::Float8_e5m2> {
  static vf apply(const c10::Float8_e5m2* p) { return load_fp8<21, 15>(reinterpret_cast<const uint8_t*>(p)); }
};

// Cache element types: the compute dtype itself (no scaling), or fp8 (x / scale, saturated).
template <typename C>
struct CacheCast {
  template <typename T>
  static C apply(T x, float) { return static_cast<C>(x); }
};
template <typename C>
struct Fp8Cast {
  template <typename T>
  static C apply(T x, float scale) {
    const float max = static_cast<float>(std::numeric_limits<C>::max());
    return C(std::min(std::max(static_cast<float>(x) / scale, -max), max));
  }
};
template <>
struct CacheCast<c10::Float8_e4m3fn> : Fp8Cast<c10::Float8_e4m3fn> {};
template <>
struct CacheCast<c10::Float8_e5m2> : Fp8Cast<c10::Float8_e5m2> {};

template <typename T, typename C>
void write_kv(const Rows<T>& k, const Rows<T>& v, int64_t num_tokens, const int64_t* slots, C* key_base,
              C* value_base, const Geometry& g, float k_scale, float v_scale) {
  const int64_t D = g.head_dim, BS = g.block_size, tile = g.tile();
  at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t] / BS, offset = slots[t] % BS;
      for (int64_t h = 0; h < g.num_kv_heads; ++h) {
        const int64_t tile_index = block * g.num_kv_heads + h;
        C* kt = key_base + tile_index * tile + offset;
        C* vt = value_base + tile_index * tile + offset * D;
        const T* kr = k.at(t, h);
        const T* vr = v.at(t, h);
        for (int64_t d = 0; d < D; ++d) kt[d * BS] = CacheCast<C>::apply(kr[d], k_scale);
        for (int64_t d = 0; d < D; ++d) vt[d] = CacheCast<C>::apply(vr[d], v_scale);
      }
    }
  });
}

// One step's attention. Requests [0, num_decodes) have one query token each; the others
// are prefill chunks whose queries are the last tokens of their sequence.
// T: the dtype of q and out; C: the cache's. k_scale and v_scale: the fp8 scales (1 otherwise).
template <typename T, typename C, int D_>
void attention(const Rows<T>& q, T* out, const C* key_base, const C* value_base, const int64_t* tables,
               int64_t max_blocks, const int64_t* seq_lens, const int64_t* query_start, int64_t num_reqs,
               int64_t num_decodes, const Geometry& g, float scale, float k_scale, float v_scale) {
  const float q_scale = scale * k_scale;
  const int64_t D = g.head_dim, BS = g.block_size, group = g.group, num_heads = g.num_kv_heads * group;
  const int64_t num_threads = at::get_num_threads();
  // Query tile of a prefill item: this many tokens of one request share each key tile read.
  constexpr int64_t kQueryTile = 8;
  // Decodes get their sequence split into parts when there are too few requests to keep
  // every thread busy (single-stream decode); parts are merged after.
  int64_t parts = 1;
  if (num_decodes > 0 && num_decodes * g.num_kv_heads < 4 * num_threads) {
    int64_t max_len = 0;
    for (int64_t r = 0; r < num_decodes; ++r) max_len = std::max(max_len, seq_lens[r]);
    const int64_t want = (4 * num_threads + num_decodes * g.num_kv_heads - 1) / (num_decodes * g.num_kv_heads);
    parts = std::max<int64_t>(1, std::min(want, max_len / (8 * BS)));  // at least 8 blocks a part
  }
  struct Item {
    int64_t req, kv_head, begin, end;  // decode: part [begin, end) of keys; prefill: query tokens [begin, end)
  };
  std::vector<Item> items;
  for (int64_t r = 0; r < num_decodes; ++r) {
    const int64_t len = seq_lens[r];
    const int64_t blocks = (len + BS - 1) / BS;
    const int64_t n = std::min(parts, blocks);
    for (int64_t h = 0; h < g.num_kv_heads; ++h)
      for (int64_t i = 0; i < n; ++i) items.push_back({r, h, std::min(len, blocks * i / n * BS), std::min(len, blocks * (i + 1) / n * BS)});
  }
  const int64_t num_decode_items = items.size();
  for (int64_t r = num_decodes; r < num_reqs; ++r)
    for (int64_t t = query_start[r]; t < query_start[r + 1]; t += kQueryTile)
      for (int64_t h = 0; h < g.num_kv_heads; ++h) items.push_back({r, h, t, std::min(t + kQueryTile, query_start[r + 1])});
  // Longest prefill tiles (latest queries) first, then decodes: the dynamic schedule ends balanced.
  std::reverse(items.begin() + num_decode_items, items.end());
  std::rotate(items.begin(), items.begin() + num_decode_items, items.end());
  const int64_t num_items = items.size();

  // Partial results of split decodes: [num_decode_items][group] x (m, l, acc[D]).
  std::vector<float> partial(parts > 1 ? num_decode_items * group * (D + 2) : 0);
  const int64_t first_decode_item = num_items - num_decode_items;

  // Work units, handed out dynamically: each prefill item alone (longest first), then the
  // decode items in runs of about equal key count, each run read as one prefetched stream.
  struct Unit {
    int64_t begin, end;  // items [begin, end)
    bool stream;
  };
  std::vector<Unit> units;
  for (int64_t i = 0; i < first_decode_item; ++i) units.push_back({i, i + 1, false});
  auto decode_blocks = [&](const Item& it) { return (it.end + BS - 1) / BS - it.begin / BS; };
  int64_t total_blocks = 0;
  for (int64_t i = first_decode_item; i < num_items; ++i) total_blocks += decode_blocks(items[i]);
  const int64_t num_runs = std::max<int64_t>(1, std::min(num_decode_items, 4 * num_threads));
  for (int64_t i = first_decode_item, start = first_decode_item, done = 0, run = 1; i < num_items; ++i) {
    done += decode_blocks(items[i]);
    if (done * num_runs >= run * total_blocks || i + 1 == num_items) {
      units.push_back({start, i + 1, true});
      start = i + 1;
      while (done * num_runs >= run * total_blocks && run < num_runs) ++run;
    }
  }
  const int64_t num_units = units.size();

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> qf(kQueryTile * group * D), m(kQueryTile * group), l(kQueryTile * group),
        acc(kQueryTile * group * D), s(kQueryTile * group * kChunkBlocks * BS);
    int64_t limit[kQueryTile];
    TileStream stream;
    stream.tile_bytes = g.tile() * static_cast<int64_t>(sizeof(C));
    // The tiles of a run of decode items, in attend_rows' order: per chunk, its key tiles, then its value tiles.
    auto list_tiles = [&](const Unit& unit) {
      stream.tiles.clear();
      stream.pos = 0;
      for (int64_t index = unit.begin; index < unit.end; ++index) {
        const Item it = items[index];
        const int64_t* table = tables + it.req * max_blocks;
        const int64_t end_block = (it.end + BS - 1) / BS;
        for (int64_t b0 = it.begin / BS; b0 < end_block; b0 += kChunkBlocks) {
          const int64_t b1 = std::min(b0 + kChunkBlocks, end_block);
          for (const C* base : {key_base, value_base})
            for (int64_t b = b0; b < b1; ++b)
              stream.tiles.push_back(reinterpret_cast<const char*>(base + (table[b] * g.num_kv_heads + it.kv_head) * g.tile()));
        }
      }
      // The first tiles: nothing read before them asked for them.
      for (int64_t i = 0; i < std::min<int64_t>(kStreamAhead, stream.tiles.size()); ++i)
        prefetch_tile_l2(stream.tiles[i], stream.tile_bytes);
    };
    // One work item: its query rows attend its keys; the result is written out (or kept, for a part).
    auto run_item = [&](int64_t index, TileStream* tile_stream) {
      const Item it = items[index];
      const bool is_decode = it.req < num_decodes;
      const int64_t first_token = is_decode ? it.req : it.begin;
      const int64_t num_tokens = is_decode ? 1 : it.end - it.begin;
      const int64_t rows = num_tokens * group;
      const int64_t len = seq_lens[it.req];
      // Query token j of a request sits at position len - (query tokens after it) - 1.
      const int64_t last_query = is_decode ? it.req : query_start[it.req + 1] - 1;
      for (int64_t j = 0; j < num_tokens; ++j) {
        limit[j] = len - 1 - (last_query - (first_token + j));
        for (int64_t hg = 0; hg < group; ++hg) {
          const T* src = q.at(first_token + j, it.kv_head * group + hg);
          float* dst = qf.data() + (j * group + hg) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * q_scale;
        }
      }
      std::fill(m.begin(), m.begin() + rows, kNegInf);
      std::fill(l.begin(), l.begin() + rows, 0.f);
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      const int64_t key_begin = is_decode ? it.begin : 0;
      const int64_t key_end = is_decode ? it.end : limit[num_tokens - 1] + 1;
      attend_rows<C, D_>(qf.data(), rows, key_base, value_base, tables + it.req * max_blocks, key_begin, key_end,
                         limit, g, it.kv_head, m.data(), l.data(), acc.data(), s.data(), tile_stream);
      if (is_decode && parts > 1) {
        float* dst = partial.data() + (index - first_decode_item) * group * (D + 2);
        for (int64_t r = 0; r < rows; ++r) {
          dst[r * (D + 2)] = m[r];
          dst[r * (D + 2) + 1] = l[r];
          std::copy(acc.data() + r * D, acc.data() + (r + 1) * D, dst + r * (D + 2) + 2);
        }
        return;
      }
      for (int64_t j = 0; j < num_tokens; ++j) {
        for (int64_t hg = 0; hg < group; ++hg) {
          const int64_t r = j * group + hg;
          const float inv = v_scale / l[r];
          T* dst = out + ((first_token + j) * num_heads + it.kv_head * group + hg) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[r * D + d] * inv);
        }
      }
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < num_units; ++u) {
      const Unit unit = units[u];
      if (unit.stream) list_tiles(unit);
      for (int64_t index = unit.begin; index < unit.end; ++index) run_item(index, unit.stream ? &stream : nullptr);
    }
  }
  if (parts == 1) return;
  // Merge the parts of each (request, kv head): items of one pair are consecutive.
  int64_t index = 0;
  while (index < num_decode_items) {
    const Item first = items[first_decode_item + index];
    int64_t n = 1;
    while (index + n < num_decode_items && items[first_decode_item + index + n].req == first.req &&
           items[first_decode_item + index + n].kv_head == first.kv_head)
      ++n;
    for (int64_t hg = 0; hg < group; ++hg) {
      float mx = kNegInf;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, partial[((index + i) * group + hg) * (D + 2)]);
      float total = 0.f;
      std::vector<float> sum(D, 0.f);
      for (int64_t i = 0; i < n; ++i) {
        const float* part = partial.data() + ((index + i) * group + hg) * (D + 2);
        if (part[1] == 0.f) continue;
        const float w = fast_exp(part[0] - mx);
        total += w * part[1];
        for (int64_t d = 0; d < D; ++d) sum[d] += w * part[2 + d];
      }
      T* dst = out + (first.req * num_heads + first.kv_head * group + hg) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(sum[d] / total * v_scale);
    }
    index += n;
  }
}

template <typename T, typename C>
void dispatch(const Rows<T>& q, T* out, const C* key_base, const C* value_base, const int64_t* tables,
              int64_t max_blocks, const int64_t* seq_lens, const int64_t* query_start, int64_t num_reqs,
              int64_t num_decodes, const Geometry& g, float scale, float k_scale, float v_scale) {
#define PAGEDLLM_ATTEND(D)                                                                                    \
  attention<T, C, D>(q, out, key_base, value_base, tables, max_blocks, seq_lens, query_start, num_reqs, num_decodes, \
                     g, scale, k_scale, v_scale)
  if (g.block_size == 16 && g.head_dim == 64)
    PAGEDLLM_ATTEND(64);
  else if (g.block_size == 16 && g.head_dim == 128)
    PAGEDLLM_ATTEND(128);
  else
    PAGEDLLM_ATTEND(0);
#undef PAGEDLLM_ATTEND
}

}  // namespace

// q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (may be
// strided views of one fused qkv tensor); kv_cache: [2, num_blocks, num_kv_heads,
// block_size * head_dim], of q's dtype or fp8; kv_scales: float32 [2] (k_scale, v_scale), read
// only for an fp8 cache. Writes k and v at slot_mapping, returns [num_tokens, num_heads, head_dim].
at::Tensor paged_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, at::Tensor kv_scales,
                           at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor seq_lens,
                           at::Tensor query_start_loc, int64_t num_decodes, int64_t block_size, double scale) {
  RECORD_FUNCTION("pagedllm::paged_attention", std::vector<c10::IValue>({q}));
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 4 && kv_cache.size(0) == 2, "kv_cache: [2, num_blocks, num_kv_heads, tile]");
  const auto cache_type = kv_cache.scalar_type();
  const bool fp8 = cache_type == at::kFloat8_e4m3fn || cache_type == at::kFloat8_e5m2;
  TORCH_CHECK((fp8 || cache_type == q.scalar_type()) && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "paged_attention: q, k and v share a dtype, and the cache has it too or is fp8");
  TORCH_CHECK(kv_scales.scalar_type() == at::kFloat && kv_scales.numel() == 2, "paged_attention: kv_scales is float32 [2]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong &&
                  seq_lens.scalar_type() == at::kLong && query_start_loc.scalar_type() == at::kLong,
              "paged_attention: int64 metadata");
  slot_mapping = slot_mapping.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  query_start_loc = query_start_loc.contiguous();
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k.size(1);
  TORCH_CHECK(kv_cache.size(2) == num_kv_heads && kv_cache.size(3) == block_size * head_dim, "kv_cache shape mismatch");
  const Geometry g{num_kv_heads, num_heads / num_kv_heads, head_dim, block_size};
  auto out = at::empty({num_tokens, num_heads, head_dim}, q.options());
  const int64_t half = kv_cache.stride(0);
  const float k_scale = fp8 ? kv_scales.contiguous().data_ptr<float>()[0] : 1.f;
  const float v_scale = fp8 ? kv_scales.contiguous().data_ptr<float>()[1] : 1.f;
  TORCH_CHECK(k_scale > 0.f && v_scale > 0.f, "paged_attention: kv_scales must be positive");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto* key_base) {
      using C = std::remove_pointer_t<decltype(key_base)>;
      C* value_base = key_base + half;
      write_kv<scalar_t, C>(rows_of<scalar_t>(k), rows_of<scalar_t>(v), num_tokens, slot_mapping.data_ptr<int64_t>(),
                            key_base, value_base, g, k_scale, v_scale);
      dispatch<scalar_t, C>(rows_of<scalar_t>(q), out.data_ptr<scalar_t>(), key_base, value_base,
                            block_tables.data_ptr<int64_t>(), block_tables.size(1), seq_lens.data_ptr<int64_t>(),
                            query_start_loc.data_ptr<int64_t>(), seq_lens.size(0), num_decodes, g,
                            static_cast<float>(scale), k_scale, v_scale);
    };
    if (cache_type == at::kFloat8_e4m3fn)
      run(static_cast<c10::Float8_e4m3fn*>(kv_cache.data_ptr()));
    else if (cache_type == at::kFloat8_e5m2)
      run(static_cast<c10::Float8_e5m2*>(kv_cache.data_ptr()));
    else
      run(kv_cache.data_ptr<scalar_t>());
  });
  return out;
}

TORCH_LIBRARY(pagedllm_attention, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor kv_scales, Tensor slot_mapping, "
        "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, int num_decodes, int block_size, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, &paged_attention);
}
