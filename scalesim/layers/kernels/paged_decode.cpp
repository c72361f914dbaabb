// Decode attention over a paged KV cache, read in place (no gather of whole contexts).
//
// One query token per sequence. For each (sequence, kv head) task: the scores of the group of
// query heads that share the kv head against every cached key of the sequence, walked block by
// block through its block table; a softmax per head; the weighted sum of the values. Each key
// and value row is read once for the whole group (grouped-query attention). The cache holds
// float32 or bfloat16 (read as float32: its bits are the top half of a float32's); queries,
// scores and sums are float32.
//
// Written so that the compiler vectorizes every inner loop (-O3 -march=native): the head size
// is a template parameter for the common sizes (fully unrolled dot products), slots come from
// the block table once per block (no division per token), and the softmax uses an exp that is
// a polynomial (relative error 1.6e-7, below float32's rounding of the sums that follow)
// instead of std::exp, which the compiler cannot vectorize. The softmax is not normalised in
// place: the weighted values are divided by the sum once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) split into an integer power,
// built in the exponent bits, and 2^f for f in [0, 1) by a degree-5 polynomial.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 1.8762329e-3f;
  p = p * f + 8.9925844e-3f;
  p = p * f + 5.5823606e-2f;
  p = p * f + 2.4015453e-1f;
  p = p * f + 6.9315296e-1f;
  p = p * f + 9.9999994e-1f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return p * power;
}

inline float widen(float x) { return x; }
inline float widen(uint16_t bf16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// T: the cache's element, float or uint16_t holding bfloat16 bits.
template <typename T>
struct Args {
  const float* q;
  const T* k;
  const T* v;
  const int64_t* tables;
  const int64_t* lens;
  float* out;
  int64_t heads, kv_heads, group, dim, max_blocks, block_size, num_slots;
  float scale;
};

// One (sequence b, kv head g) task; `scores` is this thread's scratch. DIM > 0 fixes the head
// size at compile time; DIM == 0 reads it from the arguments.
template <typename T, int64_t DIM>
void attend(const Args<T>& a, int64_t b, int64_t g, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t dim = DIM > 0 ? DIM : a.dim, group = a.group, len = a.lens[b], bs = a.block_size;
  const int64_t* table = a.tables + b * a.max_blocks;
  const float* qg = a.q + (b * a.heads + g * group) * dim;
  const int64_t row_stride = a.kv_heads * dim;
  scores.resize(group * len);
  acc.assign(group * dim, 0.f);
  const int64_t blocks = (len + bs - 1) / bs;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t first = table[blk] * bs, start = blk * bs, n = std::min(bs, len - start);
    TORCH_CHECK(table[blk] >= 0 && first + n <= a.num_slots, "block out of range");
    const T* krows = a.k + first * row_stride + g * dim;
    for (int64_t i = 0; i < n; ++i) {
      const T* krow = krows + i * row_stride;
      for (int64_t h = 0; h < group; ++h) {
        const float* qh = qg + h * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qh[d] * widen(krow[d]);
        scores[h * len + start + i] = dot * a.scale;
      }
    }
  }
  std::vector<float> sums(group);
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores.data() + h * len;
    float top = s[0];
#pragma omp simd reduction(max : top)
    for (int64_t pos = 0; pos < len; ++pos) top = std::max(top, s[pos]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t pos = 0; pos < len; ++pos) {
      s[pos] = exp_nonpositive(s[pos] - top);
      sum += s[pos];
    }
    sums[h] = sum;
  }
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t first = table[blk] * bs, start = blk * bs, n = std::min(bs, len - start);
    const T* vrows = a.v + first * row_stride + g * dim;
    for (int64_t i = 0; i < n; ++i) {
      const T* vrow = vrows + i * row_stride;
      for (int64_t h = 0; h < group; ++h) {
        const float p = scores[h * len + start + i];
        float* out = acc.data() + h * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) out[d] += p * widen(vrow[d]);
      }
    }
  }
  float* out = a.out + (b * a.heads + g * group) * dim;
  for (int64_t h = 0; h < group; ++h) {
    const float inv = 1.f / sums[h];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = acc[h * dim + d] * inv;
  }
}

template <typename T, int64_t DIM>
void run(const Args<T>& a, int64_t batch) {
  at::parallel_for(0, batch * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc;
    for (int64_t task = begin; task < end; ++task) attend<T, DIM>(a, task / a.kv_heads, task % a.kv_heads, scores, acc);
  });
}

template <typename T>
void dispatch(const Args<T>& a, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(a.lens[b] > 0 && a.lens[b] <= a.max_blocks * a.block_size, "context length out of range");
  }
  if (a.dim == 64) {
    run<T, 64>(a, batch);
  } else if (a.dim == 128) {
    run<T, 128>(a, batch);
  } else {
    run<T, 0>(a, batch);
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "q [B, H, D], k_cache and v_cache [slots, KVH, D]");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_cache.scalar_type() == cache_type &&
              (cache_type == at::kFloat || cache_type == at::kBFloat16),
              "float32 queries; float32 or bfloat16 caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "int64 block tables and lengths");
  TORCH_CHECK(block_size > 0, "positive block size");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  const int64_t batch = qc.size(0), heads = qc.size(1), dim = qc.size(2);
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dim && heads % kv_heads == 0, "head shapes");
  TORCH_CHECK(tables.size(0) == batch && lens.size(0) == batch, "one table and length per sequence");
  auto out = at::empty_like(qc);
  const auto common = [&](auto* k, auto* v) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
    return Args<T>{qc.data_ptr<float>(), k, v, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                   out.data_ptr<float>(), heads, kv_heads, heads / kv_heads, dim, tables.size(1), block_size,
                   k_cache.size(0), static_cast<float>(scale)};
  };
  if (cache_type == at::kFloat) {
    dispatch(common(k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>()), batch);
  } else {
    dispatch(common(static_cast<const uint16_t*>(k_cache.const_data_ptr()),
                    static_cast<const uint16_t*>(v_cache.const_data_ptr())), batch);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(scalesim, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
