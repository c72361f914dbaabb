// The paged prefill kernel's tile path: the two products of attention on AMX tiles, for a
// bfloat16 cache on CPUs with AMX-BF16 (Sapphire Rapids and later), where the vector path's
// float32 FMAs bound prefill attention to a fraction of the linears' speed.
//
// A task is the same as the vector path's (32 new tokens of one chunk, all query heads of one
// KV head), its rows token-major (row i = token i / group, head i % group) and padded to tiles
// of 16. It walks the cached rows 32 at a time. Each block of 32 keys is packed once for all
// the task's rows: keys as the B operand of Q.K^T (pairs of dimensions side by side) and values
// as the B operand of P.V (pairs of keys side by side). Then for each tile of 16 rows:
//   S = Q.K^T on tiles (queries rounded to bfloat16, sums in float32);
//   the online softmax in AVX-512 float32, as the vector path does, per row over the block;
//   P, rounded to bfloat16, times V on tiles, added to the row's float32 sums after the rescale.
// Queries and weights in bfloat16 are what PyTorch's flash attention and vLLM's CPU kernels use
// for bfloat16 models; a float32 cache keeps the vector path. A NaN score makes its row's output
// NaN, as on the vector path, and so does a NaN or infinite value in a row the query sees; such
// a value is packed as 0, as a tile product would carry it (weight 0 times NaN) into the rows
// that do not see it: earlier tokens, whose cached pages another request may share.
//
// Tiles are per thread: each worker configures them before its first task and releases them
// after its last, so oneDNN (which configures its own) and this kernel can share threads.
#pragma once

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define SCALESIM_AMX 1
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "amx_tiles.h"
#include "avx512_rows.h"

namespace scalesim::amx {

constexpr int64_t KEYS = 32;   // keys per block: one K step of P.V
constexpr int64_t PAIRS = 16;  // 32-bit pairs in a tile row (64 bytes)

// Per-thread scratch of a task.
struct Scratch {
  std::vector<uint16_t> q;        // [rows padded, DIM] bfloat16
  std::vector<float> top, sums, acc, rescale;  // sums: 16 partial sums per row, added at the end
  alignas(64) uint32_t kpack[4][2][PAIRS][16];   // [dim step][key half][pair r][key n]: K[n][2r, 2r+1]
  alignas(64) uint32_t vpack[8][PAIRS][16];      // [16 dims][key pair r][dim n]: V[2r][n], V[2r+1][n]
  alignas(64) float s[ROWS][KEYS];
  alignas(64) uint16_t p[ROWS][KEYS];
  alignas(64) float o[ROWS][64];  // P.V of up to 4 x 16 dimensions
};

// out[r][n] = rows[n][r] for 16 x 16 32-bit values (three rounds of shuffles, no scalar moves).
inline void transpose16x16_epi32(const __m512i (&rows)[16], uint32_t* out) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved by 32 bits
    a[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + j], lane L: column 4L + j of rows 4i .. 4i + 3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // column 4L + j: lane L of b[j], b[4 + j], b[8 + j], b[12 + j]
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    _mm512_store_si512(out + 16 * j, _mm512_shuffle_i32x4(c0, c2, 0x88));
    _mm512_store_si512(out + 16 * (4 + j), _mm512_shuffle_i32x4(c1, c3, 0x88));
    _mm512_store_si512(out + 16 * (8 + j), _mm512_shuffle_i32x4(c0, c2, 0xDD));
    _mm512_store_si512(out + 16 * (12 + j), _mm512_shuffle_i32x4(c1, c3, 0xDD));
  }
}

template <typename Args, int64_t DIM>
void attend_tile(const Args& a, int64_t chunk, int64_t tile, int64_t g, Scratch& w) {
  using Q = typename Args::Query;
  static_assert(DIM % 32 == 0 && DIM <= 128, "dim steps of 32 bfloat16, up to 4");
  constexpr int64_t STEPS = DIM / 32, COLS = DIM / 16, GROUP = COLS % 4 == 0 ? 4 : 2;
  const int64_t group = a.group, kv_row = a.heads / group * DIM, bs = a.block_size, q_row = a.heads * DIM;
  const int64_t len = a.lens[chunk], count = a.counts[chunk], first = len - count + tile * 32;
  const int64_t nq = std::min<int64_t>(32, count - tile * 32), last = first + nq - 1;
  const int64_t rows = group * nq, padded = (rows + ROWS - 1) / ROWS * ROWS;
  const int64_t* table = a.tables + chunk * a.max_blocks;
  const int64_t row0 = a.starts[chunk] + tile * 32;
  w.q.assign(padded * DIM, 0);
  for (int64_t r = 0; r < nq; ++r) {  // token r's heads of this KV head are adjacent in q
    const Q* src = a.q + (row0 + r) * q_row + g * group * DIM;
    if constexpr (std::is_same_v<Q, float>) {
      for (int64_t e = 0; e < group * DIM; ++e) narrow(src[e], w.q[r * group * DIM + e]);
    } else {
      std::memcpy(w.q.data() + r * group * DIM, src, group * DIM * sizeof(Q));
    }
  }
  w.top.assign(padded, -INFINITY);
  w.sums.assign(padded * 16, 0.f);
  w.rescale.assign(padded, 0.f);
  w.acc.assign(padded * DIM, 0.f);
  for (int64_t key0 = 0; key0 <= last; key0 += KEYS) {
    const int64_t m = std::min(KEYS, last + 1 - key0);
    // The pages of a context lie anywhere in the pool: ask for the next block's rows of this KV
    // head now, so that their loads overlap this block's work.
    for (int64_t key = key0 + KEYS; key < std::min(last + 1, key0 + 2 * KEYS); ++key) {
      const int64_t slot = table[key / bs] * bs + key % bs;
      if (slot < 0 || slot >= a.num_slots) break;  // checked when the block is read
      for (int64_t line = 0; line < DIM * 2; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(a.k + slot * kv_row + g * DIM) + line, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(a.v + slot * kv_row + g * DIM) + line, _MM_HINT_T1);
      }
    }
    // pack the block's keys (transposed 16 x 16 pairs at a time) and values; rows past m are zero
    const uint16_t* krows[KEYS];
    for (int64_t t = 0; t < KEYS; ++t) {
      const int64_t key = key0 + t, blk = key / bs;
      if (t < m) TORCH_CHECK(table[blk] >= 0 && (table[blk] + 1) * bs <= a.num_slots, "block out of range");
      krows[t] = t < m ? a.k + (table[blk] * bs + key % bs) * kv_row + g * DIM : nullptr;
    }
    for (int64_t step = 0; step < STEPS; ++step) {
      for (int64_t half = 0; half < 2; ++half) {
        __m512i rows16[16];
        for (int64_t n = 0; n < 16; ++n) {
          const uint16_t* src = krows[half * 16 + n];
          rows16[n] = src ? _mm512_loadu_si512(src + step * 32) : _mm512_setzero_si512();
        }
        transpose16x16_epi32(rows16, &w.kpack[step][half][0][0]);
      }
    }
    int64_t poisoned = m;  // the block's first key whose value holds a NaN or an infinity
    for (int64_t r = 0; r < PAIRS; ++r) {  // keys 2r and 2r + 1
      const uint16_t* rows2[2];
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t key = key0 + 2 * r + j, blk = key / bs;
        rows2[j] = 2 * r + j < m ? a.v + (table[blk] * bs + key % bs) * kv_row + g * DIM : nullptr;
      }
      for (int64_t c = 0; c < COLS; ++c) {
        const __m512i lo = rows2[0] ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows2[0] + 16 * c)))
                                    : _mm512_setzero_si512();
        const __m512i hi = rows2[1] ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows2[1] + 16 * c)))
                                    : _mm512_setzero_si512();
        // a non-finite value would reach the rows that do not see its key too (weight 0 times
        // NaN or infinity): it is packed as 0, and the rows that see it are made NaN below
        const __m512i exponent = _mm512_set1_epi32(0x7F80);
        const __mmask16 bad_lo = _mm512_cmpeq_epi32_mask(_mm512_and_si512(lo, exponent), exponent);
        const __mmask16 bad_hi = _mm512_cmpeq_epi32_mask(_mm512_and_si512(hi, exponent), exponent);
        if (bad_lo | bad_hi) poisoned = std::min(poisoned, 2 * r + (bad_lo ? 0 : 1));
        _mm512_store_si512(w.vpack[c][r], _mm512_or_si512(_mm512_maskz_mov_epi32(static_cast<__mmask16>(~bad_lo), lo),
                                                          _mm512_slli_epi32(_mm512_maskz_mov_epi32(static_cast<__mmask16>(~bad_hi), hi), 16)));
      }
    }
    for (int64_t row = 0; row < padded; row += ROWS) {
      const int64_t token_last = std::min(nq - 1, (row + ROWS - 1) / group);
      if (key0 > first + token_last) continue;  // every key of the block is after these rows
      // S = Q.K^T
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t step = 0; step < STEPS; ++step) {
        _tile_loadd(2, w.q.data() + row * DIM + step * 32, DIM * 2);
        _tile_loadd(4, w.kpack[step][0], 64);
        _tile_loadd(5, w.kpack[step][1], 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 2, 5);
      }
      _tile_stored(0, &w.s[0][0], KEYS * 4);
      _tile_stored(1, &w.s[0][16], KEYS * 4);
      // the online softmax of each row over the block
      for (int64_t i = 0; i < ROWS; ++i) {
        const int64_t rowi = row + i;
        const int64_t visible = rowi < rows ? std::min(m, first + rowi / group - key0 + 1) : m;
        const __mmask16 v0 = visible >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(visible, 0)) - 1u);
        const __mmask16 v1 = visible >= 32 ? 0xFFFF : visible <= 16 ? 0 : static_cast<__mmask16>((1u << (visible - 16)) - 1u);
        const __m512 scale = _mm512_set1_ps(a.scale), ninf = _mm512_set1_ps(-INFINITY);
        const __m512 s0 = _mm512_mask_mov_ps(ninf, v0, _mm512_mul_ps(_mm512_load_ps(w.s[i]), scale));
        const __m512 s1 = _mm512_mask_mov_ps(ninf, v1, _mm512_mul_ps(_mm512_load_ps(w.s[i] + 16), scale));
        if ((_mm512_mask_cmp_ps_mask(v0, s0, s0, _CMP_UNORD_Q) | _mm512_mask_cmp_ps_mask(v1, s1, s1, _CMP_UNORD_Q)) ||
            visible > poisoned) {
          w.sums[rowi * 16] = NAN;  // stays NaN: the output is NaN
        }
        const float top = w.top[rowi];
        const float new_top = std::max(top, _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
        const float rescale = top == -INFINITY ? 0.f : exp_nonpositive(top - new_top);
        const __m512 shift = _mm512_set1_ps(new_top == -INFINITY ? 0.f : new_top);
        const __m512 p0 = _mm512_maskz_mov_ps(v0, exp16_nonpositive(_mm512_sub_ps(s0, shift)));
        const __m512 p1 = _mm512_maskz_mov_ps(v1, exp16_nonpositive(_mm512_sub_ps(s1, shift)));
        float* sums = w.sums.data() + rowi * 16;
        _mm512_storeu_ps(sums, _mm512_fmadd_ps(_mm512_loadu_ps(sums), _mm512_set1_ps(rescale), _mm512_add_ps(p0, p1)));
        w.top[rowi] = new_top;
        w.rescale[rowi] = rescale;
        _mm512_store_si512(w.p[i], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
      }
      // acc = acc * rescale + P.V, GROUP x 16 dimensions at a time (products in flight together)
      _tile_loadd(3, &w.p[0][0], KEYS * 2);
      for (int64_t c0 = 0; c0 < COLS; c0 += GROUP) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(6, w.vpack[c0], 64);
        _tile_loadd(7, w.vpack[c0 + 1], 64);
        _tile_dpbf16ps(0, 3, 6);
        _tile_dpbf16ps(1, 3, 7);
        if constexpr (GROUP == 4) {
          _tile_zero(4);
          _tile_zero(5);
          _tile_loadd(6, w.vpack[c0 + 2], 64);
          _tile_loadd(7, w.vpack[c0 + 3], 64);
          _tile_dpbf16ps(4, 3, 6);
          _tile_dpbf16ps(5, 3, 7);
        }
        _tile_stored(0, &w.o[0][0], 64 * 4);
        _tile_stored(1, &w.o[0][16], 64 * 4);
        if constexpr (GROUP == 4) {
          _tile_stored(4, &w.o[0][32], 64 * 4);
          _tile_stored(5, &w.o[0][48], 64 * 4);
        }
        for (int64_t i = 0; i < ROWS; ++i) {
          const __m512 factor = _mm512_set1_ps(w.rescale[row + i]);
          float* acc = w.acc.data() + (row + i) * DIM + 16 * c0;
          for (int64_t j = 0; j < GROUP; ++j) {
            _mm512_storeu_ps(acc + 16 * j, _mm512_fmadd_ps(_mm512_loadu_ps(acc + 16 * j), factor, _mm512_load_ps(w.o[i] + 16 * j)));
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t i = r * group + hh;
      const float inv = 1.f / _mm512_reduce_add_ps(_mm512_loadu_ps(w.sums.data() + i * 16));
      Q* out = a.out + (row0 + r) * q_row + (g * group + hh) * DIM;
      const float* acc = w.acc.data() + i * DIM;
#pragma omp simd
      for (int64_t d = 0; d < DIM; ++d) narrow(acc[d] * inv, out[d]);
    }
  }
}

// Runs `tasks` (see paged_prefill.cpp's run) on every thread, tiles configured per thread.
template <typename Args, int64_t DIM, typename Task>
void run(const Args& a, const std::vector<Task>& tasks) {
  std::atomic<int64_t> next{0};
  const int64_t total = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto scratch = std::make_unique<Scratch>();
    const TileSession tiles;
    for (int64_t i = next++; i < total; i = next++) {
      attend_tile<Args, DIM>(a, tasks[i].chunk, tasks[i].tile, tasks[i].kv_head, *scratch);
    }
  });
}

}  // namespace scalesim::amx
#endif
