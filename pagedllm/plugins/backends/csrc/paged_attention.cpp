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
#include <vector>

torch::Tensor paged_decode_attention(
    torch::Tensor query,         // [num_reqs, num_heads, head_dim] float32
    torch::Tensor key_cache,     // [num_blocks, block_size, num_kv_heads, head_dim] float32
    torch::Tensor value_cache,   // same
    torch::Tensor block_tables,  // [num_reqs, max_blocks] int64
    torch::Tensor seq_lens,      // [num_reqs] int64
    double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && key_cache.scalar_type() == torch::kFloat32,
              "paged_decode_attention: float32 only");
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

  at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = lens[r];
      const int64_t* table = tables + r * max_blocks;
      const float* qr = q + (r * num_heads + kv_head * group) * head_dim;  // [group, head_dim]
      scores.assign(group * len, 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const float* key = k + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kv_head * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qr + g * head_dim;
          float dot = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * key[d];
          scores[g * len + pos] = dot * fscale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        const float max_score = *std::max_element(s, s + len);
        float total = 0.f;
        for (int64_t pos = 0; pos < len; ++pos) {
          s[pos] = std::exp(s[pos] - max_score);
          total += s[pos];
        }
        const float inv = 1.f / total;
        for (int64_t pos = 0; pos < len; ++pos) s[pos] *= inv;
      }
      acc.assign(group * head_dim, 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const float* value = v + table[pos / block_size] * block_stride + (pos % block_size) * pos_stride + kv_head * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + pos];
          float* a = acc.data() + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * value[d];
        }
      }
      float* out_r = o + (r * num_heads + kv_head * group) * head_dim;
      std::copy(acc.begin(), acc.end(), out_r);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (CPU, float32)");
}
