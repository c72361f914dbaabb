// Decode attention over a paged KV cache, read in place (no gather of whole contexts).
//
// One query token per sequence. For each (sequence, kv head) task: the scores of the group of
// query heads that share the kv head against every cached key of the sequence, found through
// its block table; a softmax per head; the weighted sum of the values. Each key and value row
// is read once for the whole group (grouped-query attention), in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "q [B, H, D], k_cache and v_cache [slots, KVH, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "int64 block tables and lengths");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  const int64_t batch = qc.size(0), heads = qc.size(1), dim = qc.size(2);
  const int64_t kv_heads = k_cache.size(1), num_slots = k_cache.size(0);
  TORCH_CHECK(k_cache.size(2) == dim && heads % kv_heads == 0, "head shapes");
  TORCH_CHECK(tables.size(0) == batch && lens.size(0) == batch, "one table and length per sequence");
  const int64_t group = heads / kv_heads, max_blocks = tables.size(1);
  auto out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] > 0 && lp[b] <= max_blocks * block_size, "context length out of range");
  }

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, len = lp[b];
      const int64_t* table = tp + b * max_blocks;
      const float* qg = qp + (b * heads + g * group) * dim;
      scores.assign(group * len, 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        TORCH_CHECK(slot >= 0 && slot < num_slots, "slot out of range");
        const float* krow = kp + (slot * kv_heads + g) * dim;
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qg + h * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * krow[d];
          scores[h * len + pos] = dot * fscale;
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        float* s = scores.data() + h * len;
        const float top = *std::max_element(s, s + len);
        float sum = 0.f;
        for (int64_t pos = 0; pos < len; ++pos) {
          s[pos] = std::exp(s[pos] - top);
          sum += s[pos];
        }
        const float inv = 1.f / sum;
        for (int64_t pos = 0; pos < len; ++pos) s[pos] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const float* vrow = vp + (slot * kv_heads + g) * dim;
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * len + pos];
          float* a = acc.data() + h * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * vrow[d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + (b * heads + g * group) * dim);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(scalesim, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
