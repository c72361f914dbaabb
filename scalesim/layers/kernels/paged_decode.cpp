// Decode attention over a paged KV cache, read in place (no gather of whole contexts).
//
// One query token per sequence: the scores of every query head against the sequence's cached
// keys, walked block by block through its block table; a softmax per head; the weighted sum of
// the values. Each key and value row is read once for the group of query heads that share it
// (grouped-query attention). The cache holds
// float32 or bfloat16 (read as float32: its bits are the top half of a float32's); queries,
// scores and sums are float32.
//
// A task is one range of one sequence's blocks with all its heads (ranges merged at the end),
// so that rows are read whole and in order and a long context is spread over the cores.
// Written so that the compiler vectorizes every inner loop (-O3 -march=native): the head size
// is a template parameter for the common sizes (fully unrolled dot products), slots come from
// the block table once per block (no division per token), and the softmax uses an exp that is
// a polynomial (relative error 1.6e-7, below float32's rounding of the sums that follow)
// instead of std::exp, which the compiler cannot vectorize. The softmax is not normalised in
// place: the weighted values are divided by the sum once at the end.
//
// On AVX-512 and head sizes that are multiples of 16, the two inner loops are written with
// intrinsics: the scores of 16 consecutive cached rows are summed by one transposing reduction
// instead of one horizontal sum per dot product (the compiler's version spent most of its time
// there), and each head's weighted sum stays in registers over a block's rows. Measured on the
// AVX-512 EPYC, bfloat16 pages, 16 sequences x 160 tokens: 230-270 -> 110-130 us per call; one
// sequence of 2,560 tokens: 275 -> 80 us. Elsewhere the plain loops run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx512_rows.h"
#include "float_bits.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>


namespace {

using scalesim::exp_nonpositive;
using scalesim::widen;

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

// The partial result of one task: every head's running maximum, sum of exponentials and
// unnormalised weighted values over one range of a sequence's blocks.
struct Partial {
  std::vector<float> top, sum, acc;  // [heads], [heads], [heads * dim]
};

// Asks for `bytes` from `p` to be brought into the core's caches (L2), one request per 64-byte line.
inline void prefetch_rows(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// Task (sequence b, block range [blk_begin, blk_end)): all heads at once, so each cached row
// (every kv head of a token) is read whole and in order. DIM > 0 fixes the head size at
// compile time; DIM == 0 reads it from the arguments. `scores` is this thread's scratch.
template <typename T, int64_t DIM>
void attend(const Args<T>& a, int64_t b, int64_t blk_begin, int64_t blk_end, std::vector<float>& scores,
            Partial& part) {
  const int64_t dim = DIM > 0 ? DIM : a.dim, heads = a.heads, group = a.group, kvh = a.kv_heads;
  const int64_t len = a.lens[b], bs = a.block_size, row = kvh * dim;
  const int64_t* table = a.tables + b * a.max_blocks;
  const float* qb = a.q + b * heads * dim;
  const int64_t first_pos = blk_begin * bs, n_pos = std::min(len, blk_end * bs) - first_pos;
  scores.resize(heads * n_pos);  // every range holds at least one token (run() splits by length)
  part.top.resize(heads);
  part.sum.resize(heads);
  part.acc.assign(heads * dim, 0.f);
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t slot0 = table[blk] * bs, n = std::min(bs, len - blk * bs), at = blk * bs - first_pos;
    TORCH_CHECK(table[blk] >= 0 && slot0 + n <= a.num_slots, "block out of range");
    const T* krows = a.k + slot0 * row;
    // The pages of a context lie anywhere in the pool: ask for the keys two blocks ahead (both
    // next ones at a range's start) and this block's values now, so that their loads overlap this
    // block's scores. Entries out of range are left to the check when their block is read.
    for (int64_t ahead = blk == blk_begin ? blk + 1 : blk + 2; ahead < std::min(blk_end, blk + 3); ++ahead) {
      if (table[ahead] >= 0 && (table[ahead] + 1) * bs <= a.num_slots) prefetch_rows(a.k + table[ahead] * bs * row, std::min(bs, len - ahead * bs) * row * sizeof(T));
    }
    prefetch_rows(a.v + slot0 * row, n * row * sizeof(T));
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
      for (int64_t i = 0; i < n; i += 16) {
        for (int64_t h = 0; h < heads; ++h) {
          scalesim::scores16<T, DIM>(qb + h * dim, krows + i * row + (h / group) * dim, row, std::min<int64_t>(16, n - i),
                           a.scale, scores.data() + h * n_pos + at + i);
        }
      }
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t g = 0; g < kvh; ++g) {
        const T* krow = krows + i * row + g * dim;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const float* qh = qb + h * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * widen(krow[d]);
          scores[h * n_pos + at + i] = dot * a.scale;
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sc = scores.data() + h * n_pos;
    float top = sc[0];
#pragma omp simd reduction(max : top)
    for (int64_t pos = 0; pos < n_pos; ++pos) top = std::max(top, sc[pos]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t pos = 0; pos < n_pos; ++pos) {
      sc[pos] = exp_nonpositive(sc[pos] - top);
      sum += sc[pos];
    }
    part.top[h] = top;
    part.sum[h] = sum;
  }
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t slot0 = table[blk] * bs, n = std::min(bs, len - blk * bs), at = blk * bs - first_pos;
    const T* vrows = a.v + slot0 * row;
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
      for (int64_t h = 0; h < heads; ++h) {
        scalesim::weighted_sum<T, DIM>(scores.data() + h * n_pos + at, vrows + (h / group) * dim, row, n,
                                       part.acc.data() + h * dim, 1.f);
      }
      continue;
    }
#endif
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t g = 0; g < kvh; ++g) {
        const T* vrow = vrows + i * row + g * dim;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const float p = scores[h * n_pos + at + i];
          float* out = part.acc.data() + h * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) out[d] += p * widen(vrow[d]);
        }
      }
    }
  }
}

// A sequence is split into ranges of PART_TOKENS (rounded to whole blocks), so that a long
// context alone still uses every core; the ranges' partial results are merged per head by their
// maxima (the log-sum-exp rule). The split depends on the sequence's own length only, never on
// the batch or the thread count, so a sequence's result is the same whatever it is batched with.
constexpr int64_t PART_TOKENS = 256;

template <typename T, int64_t DIM>
void run(const Args<T>& a, int64_t batch) {
  const int64_t bs = a.block_size, part_blocks = std::max<int64_t>(1, PART_TOKENS / bs);
  std::vector<int64_t> first_task(batch + 1, 0);  // sequence b's tasks are [first_task[b], first_task[b + 1])
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t blocks = (a.lens[b] + bs - 1) / bs;
    first_task[b + 1] = first_task[b] + (blocks + part_blocks - 1) / part_blocks;
  }
  std::vector<Partial> partials(first_task[batch]);
  at::parallel_for(0, first_task[batch], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t blocks = (a.lens[b] + bs - 1) / bs, blk = (task - first_task[b]) * part_blocks;
      attend<T, DIM>(a, b, blk, std::min(blocks, blk + part_blocks), scores, partials[task]);
    }
  });
  const int64_t dim = a.dim;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t h = 0; h < a.heads; ++h) {
        float top = -INFINITY;
        for (int64_t t = first_task[b]; t < first_task[b + 1]; ++t) top = std::max(top, partials[t].top[h]);
        float* out = a.out + (b * a.heads + h) * dim;
        std::fill(out, out + dim, 0.f);
        float sum = 0.f;
        for (int64_t t = first_task[b]; t < first_task[b + 1]; ++t) {
          const Partial& part = partials[t];
          const float weight = std::exp(part.top[h] - top);
          sum += weight * part.sum[h];
          const float* acc = part.acc.data() + h * dim;
          for (int64_t d = 0; d < dim; ++d) out[d] += weight * acc[d];
        }
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < dim; ++d) out[d] *= inv;
      }
    }
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
  TORCH_CHECK(k_cache.size(2) == dim && kv_heads > 0 && heads % kv_heads == 0, "head shapes");
  TORCH_CHECK(tables.size(0) == batch && lens.size(0) == batch, "one table and length per sequence");
  auto out = at::empty_like(qc);
  if (batch == 0) return out;
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

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
