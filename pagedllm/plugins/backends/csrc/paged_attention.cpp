// Decode attention over the paged KV cache, read in place: no gather, no padding.
//
// One work item is (request, kv head): it scores the request's queries of that head's
// group against every cached key (walking the block table), soft-maxes, and sums the
// values. Keys and values of one position and head are head_dim contiguous floats,
// so the inner loops vectorise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for x <= 0, vectorisable (std::exp is a scalar call here): 2^(x log2 e) as
// 2^integer (exponent bits) times a degree-6 polynomial of 2^fraction; relative error
// about 2e-7, below float32 rounding of the softmax that follows.
inline float fast_exp(float x) {
  x = std::max(x, -87.f);
  const float t = x * 1.44269504088896341f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// One work item: one request, kv heads [0, num_heads_here) of the pointers given (the
// caller offsets k, v, queries and out to the first head). Walking all of a request's kv
// heads in one item reads each cached position's row contiguously.
template <int HEAD_DIM>
void attend(const float* __restrict__ queries, const float* __restrict__ k, const float* __restrict__ v,
            const int64_t* __restrict__ table, int64_t len, int64_t num_heads_here, int64_t group,
            int64_t head_dim_rt, int64_t block_size, int64_t pos_stride, int64_t block_stride, float scale,
            float* __restrict__ scores, float* __restrict__ acc, float* __restrict__ out) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : head_dim_rt;
  const int64_t num_queries = num_heads_here * group;  // query heads, in order; kv head kv serves [kv * group, (kv + 1) * group)
  // Walk the block table block by block (no division per position).
  for (int64_t start = 0; start < len; start += block_size) {
    const float* __restrict__ block = k + table[start / block_size] * block_stride;
    const int64_t count = std::min(block_size, len - start);
    for (int64_t i = 0; i < count; ++i) {
      const float* __restrict__ row = block + i * pos_stride;
      for (int64_t kv = 0; kv < num_heads_here; ++kv) {
        const float* __restrict__ key = row + kv * head_dim;
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
          const float* __restrict__ qh = queries + h * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * key[d];
          scores[h * len + start + i] = dot * scale;
        }
      }
    }
  }
  for (int64_t h = 0; h < num_queries; ++h) {
    float* __restrict__ s = scores + h * len;
    float max_score = s[0];
    for (int64_t pos = 1; pos < len; ++pos) max_score = std::max(max_score, s[pos]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t pos = 0; pos < len; ++pos) {
      s[pos] = fast_exp(s[pos] - max_score);
      total += s[pos];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t pos = 0; pos < len; ++pos) s[pos] *= inv;
  }
  std::fill(acc, acc + num_queries * head_dim, 0.f);
  for (int64_t start = 0; start < len; start += block_size) {
    const float* __restrict__ block = v + table[start / block_size] * block_stride;
    const int64_t count = std::min(block_size, len - start);
    for (int64_t i = 0; i < count; ++i) {
      const float* __restrict__ row = block + i * pos_stride;
      for (int64_t kv = 0; kv < num_heads_here; ++kv) {
        const float* __restrict__ value = row + kv * head_dim;
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
          const float p = scores[h * len + start + i];
          float* __restrict__ a = acc + h * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * value[d];
        }
      }
    }
  }
  std::copy(acc, acc + num_queries * head_dim, out);
}

}  // namespace

torch::Tensor paged_decode_attention(
    torch::Tensor query,         // [num_reqs, num_heads, head_dim] float32
    torch::Tensor key_cache,     // [num_blocks, block_size, num_kv_heads, head_dim] float32
    torch::Tensor value_cache,   // same
    torch::Tensor block_tables,  // [num_reqs, max_blocks] int64
    torch::Tensor seq_lens,      // [num_reqs] int64
    double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && key_cache.scalar_type() == torch::kFloat32,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "paged_decode_attention: contiguous caches only");
  query = query.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t num_reqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  auto out = torch::empty_like(query);

  const float* q = query.data_ptr<float>();
  const float* k = key_cache.data_ptr<float>();
  const float* v = value_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // Strides of the cache: one position of one head is head_dim floats.
  const int64_t pos_stride = num_kv_heads * head_dim, block_stride = block_size * pos_stride;

  // Whole requests per work item when there are enough of them to keep every thread busy;
  // otherwise (few requests: single-stream decode) one kv head per item.
  const int64_t heads_per_item = num_reqs >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t items_per_req = num_kv_heads / heads_per_item;
  const int64_t num_items = num_reqs * items_per_req;
  // Dynamic schedule: requests differ in length, so equal static shares would leave a
  // thread idle while another finishes the long ones.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores;
    std::vector<float> acc(heads_per_item * group * head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const int64_t r = item / items_per_req, kv_head = (item % items_per_req) * heads_per_item;
      const int64_t len = lens[r];
      scores.resize(heads_per_item * group * len);
      const float* queries = q + (r * num_heads + kv_head * group) * head_dim;
      const float* kh = k + kv_head * head_dim;
      const float* vh = v + kv_head * head_dim;
      const int64_t* table = tables + r * max_blocks;
      float* out_r = o + (r * num_heads + kv_head * group) * head_dim;
      switch (head_dim) {
        case 64:
          attend<64>(queries, kh, vh, table, len, heads_per_item, group, head_dim, block_size, pos_stride, block_stride,
                     fscale, scores.data(), acc.data(), out_r);
          break;
        case 128:
          attend<128>(queries, kh, vh, table, len, heads_per_item, group, head_dim, block_size, pos_stride,
                      block_stride, fscale, scores.data(), acc.data(), out_r);
          break;
        default:
          attend<0>(queries, kh, vh, table, len, heads_per_item, group, head_dim, block_size, pos_stride, block_stride,
                    fscale, scores.data(), acc.data(), out_r);
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (CPU, float32)");
}
