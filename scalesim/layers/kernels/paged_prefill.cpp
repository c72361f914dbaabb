// Prefill attention over a paged KV cache, read in place: no gather of a cached prefix, no mask
// tensor, and no fp32 copy of the keys and values.
//
// A chunk is `count` new tokens of one sequence whose keys and values are already written to the
// cache, at the end of its `len` cached tokens; new token i (absolute position len - count + i)
// attends causally to positions 0 .. its own. A fresh prompt is the case count == len. Every
// chunk, fresh or behind a cached prefix, takes the same path, so a token's attention does not
// depend on whether its prefix was computed in this step or read back.
//
// A task is a tile of 32 consecutive new tokens of one chunk for all query heads of one KV
// head. It walks the cached rows 16 at a time (within a block): the 16 keys are widened to
// float32 and transposed once, so each query's 16 scores are broadcast FMAs with no horizontal
// sum; then each query's online softmax (running maximum, sum, and weighted values rescaled when
// the maximum grows, as FlashAttention does) and the 16 weighted value rows, up to 4 query heads
// at a time sharing every load. Scores and sums are float32; queries and outputs are float32 or
// bfloat16 (a bfloat16 model's, widened per task and rounded on the way out), and the cache holds
// float32 or bfloat16 (read as float32, as the decode kernel does). A NaN score (from a NaN query
// or key) makes that query's output NaN, as in PyTorch's attention, so the sampler's check still
// sees it. This is the vector path; on CPUs with AMX-BF16 a bfloat16 cache takes the tile path
// of paged_prefill_amx.h instead (unless the caller passes tiles=False).
//
// Tasks differ in cost (a later tile sees more keys): threads take them one at a time from a
// shared counter, longest first. A task's result depends only on its own inputs, so results do
// not depend on the thread count or on what else is in the step.
//
// AVX-512 and head sizes that are multiples of 16 only: `paged_prefill_supported` says whether
// this build has it; the caller keeps its SDPA path otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "avx512_rows.h"
#include "float_bits.h"
#include "paged_prefill_amx.h"

namespace {

constexpr int64_t QUERY_TILE = 32;
constexpr int64_t KEY_TILE = 16;  // one vector of scores

bool supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512F__)
template <typename T, typename Q>
struct Args {
  using Cache = T;
  using Query = Q;        // float32 or bfloat16 (uint16_t): q and out
  const Q* q;             // [T, heads, dim]
  const T* k;             // [slots, kv_heads, dim]
  const T* v;
  const int64_t* tables;  // [chunks, max_blocks]
  const int64_t* lens;    // [chunks]: cached tokens including the chunk's own
  const int64_t* starts;  // [chunks]: the chunk's first row in q and out
  const int64_t* counts;  // [chunks]: its new tokens
  Q* out;                 // [T, heads, dim]
  int64_t heads, group, max_blocks, block_size, num_slots;
  float scale;
};

// Per-thread scratch of a task: every row's running softmax and weighted values.
struct Scratch {
  std::vector<float> top, sum, acc, q;  // q: the task's bfloat16 queries widened
};

// One key tile for G query heads at one position (scratch rows i, i + nq, ...; q: their G
// consecutive head rows): scores, the online softmax update, and the weighted value rows. The G
// heads share every load of the tile, and each score keeps two independent FMA chains.
template <int64_t DIM, int G>
inline void rows_step(const float* q, const float* kt, const float* vt, int64_t visible, float scale, Scratch& w,
                      int64_t i, int64_t nq) {
  constexpr int64_t CHUNKS = DIM / 16;
  const __mmask16 valid = static_cast<__mmask16>((1u << visible) - 1u);
  __m512 even[G], odd[G];
  for (int j = 0; j < G; ++j) even[j] = odd[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < DIM; d += 2) {
    const __m512 k0 = _mm512_load_ps(kt + d * 16), k1 = _mm512_load_ps(kt + (d + 1) * 16);
    for (int j = 0; j < G; ++j) {
      even[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * DIM + d]), k0, even[j]);
      odd[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * DIM + d + 1]), k1, odd[j]);
    }
  }
  alignas(64) float weights[G][16];
  float rescale[G];
  for (int j = 0; j < G; ++j) {
    const int64_t row = i + j * nq;
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                        _mm512_mul_ps(_mm512_add_ps(even[j], odd[j]), _mm512_set1_ps(scale)));
    if (_mm512_mask_cmp_ps_mask(valid, s, s, _CMP_UNORD_Q)) w.sum[row] = NAN;  // stays NaN: the output is NaN
    const float top = w.top[row], new_top = std::max(top, _mm512_reduce_max_ps(s));
    rescale[j] = top == -INFINITY ? 0.f : scalesim::exp_nonpositive(top - new_top);
    const __m512 p = _mm512_maskz_mov_ps(valid, scalesim::exp16_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(new_top))));
    w.sum[row] = w.sum[row] * rescale[j] + _mm512_reduce_add_ps(p);
    w.top[row] = new_top;
    _mm512_store_ps(weights[j], p);
  }
  __m512 acc[G][CHUNKS];
  for (int j = 0; j < G; ++j) {
    const __m512 factor = _mm512_set1_ps(rescale[j]);
    for (int64_t c = 0; c < CHUNKS; ++c) acc[j][c] = _mm512_mul_ps(_mm512_loadu_ps(w.acc.data() + (i + j * nq) * DIM + 16 * c), factor);
  }
  for (int64_t t = 0; t < visible; ++t) {
    for (int64_t c = 0; c < CHUNKS; ++c) {
      const __m512 v = _mm512_load_ps(vt + t * DIM + 16 * c);
      for (int j = 0; j < G; ++j) acc[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j][t]), v, acc[j][c]);
    }
  }
  for (int j = 0; j < G; ++j) {
    for (int64_t c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(w.acc.data() + (i + j * nq) * DIM + 16 * c, acc[j][c]);
  }
}

template <typename A, int64_t DIM>
void attend_tile(const A& a, int64_t chunk, int64_t tile, int64_t g, Scratch& w) {
  using T = typename A::Cache;
  const int64_t group = a.group, kv_row = a.heads / group * DIM, bs = a.block_size, q_row = a.heads * DIM;
  const int64_t len = a.lens[chunk], count = a.counts[chunk], first = len - count + tile * QUERY_TILE;
  const int64_t nq = std::min(QUERY_TILE, count - tile * QUERY_TILE), last = first + nq - 1, rows = group * nq;
  const int64_t* table = a.tables + chunk * a.max_blocks;
  const int64_t row0 = a.starts[chunk] + tile * QUERY_TILE;
  w.top.assign(rows, -INFINITY);
  w.sum.assign(rows, 0.f);
  w.acc.assign(rows * DIM, 0.f);
  const auto query = [&](int64_t r, int64_t hh) -> const float* {  // token r's query of head g * group + hh
    if constexpr (std::is_same_v<typename A::Query, float>) {
      return a.q + (row0 + r) * q_row + (g * group + hh) * DIM;
    } else {
      return w.q.data() + (r * group + hh) * DIM;
    }
  };
  if constexpr (!std::is_same_v<typename A::Query, float>) {
    w.q.resize(rows * DIM);
    for (int64_t r = 0; r < nq; ++r) {
      const auto* src = a.q + (row0 + r) * q_row + g * group * DIM;
#pragma omp simd
      for (int64_t e = 0; e < group * DIM; ++e) w.q[r * group * DIM + e] = scalesim::widen(src[e]);
    }
  }
  alignas(64) float kt[DIM * 16];  // the key tile transposed, float32: kt[d * 16 + t]
  alignas(64) float vt[16 * DIM];  // the value tile, float32
  for (int64_t key = 0; key <= last;) {
    const int64_t blk = key / bs, within = key % bs;
    const int64_t m = std::min({KEY_TILE, bs - within, last + 1 - key});
    TORCH_CHECK(table[blk] >= 0 && (table[blk] + 1) * bs <= a.num_slots, "block out of range");
    const int64_t slot = table[blk] * bs + within;
    const T* keys = a.k + slot * kv_row + g * DIM;
    const T* values = a.v + slot * kv_row + g * DIM;
    for (int64_t t = 0; t < 16; ++t) {  // transposed keys: kt[d * 16 + t]; rows past m are zero
      for (int64_t d = 0; d < DIM; ++d) kt[d * 16 + t] = t < m ? scalesim::widen(keys[t * kv_row + d]) : 0.f;
    }
    for (int64_t t = 0; t < m; ++t) {
#pragma omp simd
      for (int64_t d = 0; d < DIM; ++d) vt[t * DIM + d] = scalesim::widen(values[t * kv_row + d]);
    }
    for (int64_t r = std::max<int64_t>(0, key - first); r < nq; ++r) {
      const int64_t visible = std::min(m, first + r - key + 1);  // causal: keys up to the query's position
      for (int64_t hh = 0; hh < group; hh += 4) {
        const int64_t heads = std::min<int64_t>(4, group - hh);
        const float* q = query(r, hh);
        const auto step = [&](auto G) {
          rows_step<DIM, decltype(G)::value>(q, kt, vt, visible, a.scale, w, hh * nq + r, nq);
        };
        switch (heads) {
          case 1: step(std::integral_constant<int, 1>{}); break;
          case 2: step(std::integral_constant<int, 2>{}); break;
          case 3: step(std::integral_constant<int, 3>{}); break;
          default: step(std::integral_constant<int, 4>{}); break;
        }
      }
    }
    key += m;
  }
  for (int64_t hh = 0; hh < group; ++hh) {
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = hh * nq + r;
      const float inv = 1.f / w.sum[i];
      auto* out = a.out + (row0 + r) * q_row + (g * group + hh) * DIM;
      const float* acc = w.acc.data() + i * DIM;
#pragma omp simd
      for (int64_t d = 0; d < DIM; ++d) scalesim::narrow(acc[d] * inv, out[d]);
    }
  }
}

template <typename A, int64_t DIM>
void run(const A& a, int64_t chunks, bool use_tiles) {
  struct Task { int64_t chunk, tile, kv_head, keys; };
  std::vector<Task> tasks;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t tiles = (a.counts[c] + QUERY_TILE - 1) / QUERY_TILE;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t keys = a.lens[c] - a.counts[c] + std::min(a.counts[c], (t + 1) * QUERY_TILE);
      for (int64_t g = 0; g < a.heads / a.group; ++g) tasks.push_back({c, t, g, keys});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.keys > y.keys; });
#if defined(SCALESIM_AMX)
  if constexpr (std::is_same_v<typename A::Cache, uint16_t> && DIM % 32 == 0) {
    if (use_tiles && scalesim::amx::permitted()) return scalesim::amx::run<A, DIM>(a, tasks);
  }
#endif
  std::atomic<int64_t> next{0};
  const int64_t total = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t i = next++; i < total; i = next++) {
      attend_tile<A, DIM>(a, tasks[i].chunk, tasks[i].tile, tasks[i].kv_head, scratch);
    }
  });
}

template <typename A>
void dispatch(const A& a, int64_t chunks, int64_t dim, bool tiles) {
  switch (dim) {
    case 64: return run<A, 64>(a, chunks, tiles);
    case 128: return run<A, 128>(a, chunks, tiles);
    case 32: return run<A, 32>(a, chunks, tiles);
    case 96: return run<A, 96>(a, chunks, tiles);
    default: TORCH_CHECK(false, "paged_prefill: head size ", dim, " not built (32, 64, 96, 128)");
  }
}
#endif

// out[starts[c] + i] = attention of q[starts[c] + i] for every chunk c and i < counts[c].
void paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& query_starts,
                   const at::Tensor& query_counts, int64_t block_size, double scale, at::Tensor& out, bool tiles) {
  TORCH_CHECK(supported(), "paged_prefill: this build has no AVX-512");
#if defined(__AVX512F__)
  TORCH_CHECK(q.dim() == 3 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) && q.is_contiguous(),
              "q: contiguous float32 or bfloat16 [T, H, D]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(), "out like q");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == cache_type &&
              (cache_type == at::kFloat || cache_type == at::kBFloat16) && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "caches: contiguous float32 or bfloat16 [slots, KVH, D]");
  const int64_t heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dim && kv_heads > 0 && heads % kv_heads == 0, "head shapes");
  const auto tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const auto starts = query_starts.contiguous(), counts = query_counts.contiguous();
  for (const auto* t : {&tables, &lens, &starts, &counts}) TORCH_CHECK(t->scalar_type() == at::kLong, "int64 indices");
  const int64_t chunks = lens.size(0);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == chunks && starts.size(0) == chunks && counts.size(0) == chunks,
              "one table, length, start and count per chunk");
  TORCH_CHECK(block_size > 0, "positive block size");
  const int64_t* l = lens.data_ptr<int64_t>();
  const int64_t* s = starts.data_ptr<int64_t>();
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < chunks; ++i) {
    TORCH_CHECK(c[i] > 0 && c[i] <= l[i] && l[i] <= tables.size(1) * block_size && s[i] >= 0 && s[i] + c[i] <= q.size(0),
                "chunk out of range");
  }
  const auto with_query = [&](auto* k, auto* v, auto* query) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
    using Q = std::remove_pointer_t<decltype(query)>;
    dispatch(Args<T, Q>{query, k, v, tables.data_ptr<int64_t>(), l, s, c, static_cast<Q*>(out.data_ptr()), heads,
                        heads / kv_heads, tables.size(1), block_size, k_cache.size(0), static_cast<float>(scale)},
             chunks, dim, tiles);
  };
  const auto with_cache = [&](auto* k, auto* v) {
    if (q.scalar_type() == at::kFloat) {
      with_query(k, v, q.data_ptr<float>());
    } else {
      with_query(k, v, static_cast<uint16_t*>(q.data_ptr()));
    }
  };
  if (cache_type == at::kFloat) {
    with_cache(k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>());
  } else {
    with_cache(static_cast<const uint16_t*>(k_cache.const_data_ptr()), static_cast<const uint16_t*>(v_cache.const_data_ptr()));
  }
#endif
}

bool paged_prefill_supported(int64_t head_dim) {
  return supported() && (head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128);
}

// Whether a bfloat16 cache of this head size takes the AMX tile path (paged_prefill_amx.h).
bool paged_prefill_tiles(int64_t head_dim) {
#if defined(SCALESIM_AMX)
  return paged_prefill_supported(head_dim) && head_dim % 32 == 0 && scalesim::amx::permitted();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor query_starts, Tensor query_counts, int block_size, float scale, Tensor(a!) out, bool tiles=True) -> ()");
  m.impl("paged_prefill", c10::DispatchKey::CPU, TORCH_FN(paged_prefill));
  m.def("paged_prefill_supported(int head_dim) -> bool", TORCH_FN(paged_prefill_supported));
  m.def("paged_prefill_tiles(int head_dim) -> bool", TORCH_FN(paged_prefill_tiles));
}
