// AVX-512 building blocks of the attention kernels, for head sizes that are multiples of 16: the
// scores of up to 16 consecutive cached rows against one query, and a weighted sum of rows.
// Compiled only where the compiler targets AVX-512 (-march=native on such a CPU); the kernels
// keep plain loops elsewhere.
#pragma once

#include <cstdint>

#include "float_bits.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace scalesim {

// 16 cached values as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Lane t of the result is the sum of v[t]'s 16 lanes: a transposing reduction, about 50 shuffles
// and adds for 16 sums where one horizontal sum per vector costs about 10 each.
inline __m512 lane_sums(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane k: the lane-k sums of v[4j .. 4j + 3]
    const __m512d lo = _mm512_castps_pd(pairs[2 * j]), hi = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)), _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  // add the four 128-bit lanes: blocks (0, 2) + (1, 3) of each pair of quads, twice
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

// scores[t] = scale * (q . key row t) for the m <= 16 consecutive rows from `keys` (rows `row`
// elements apart): the dot products without a horizontal sum each.
template <typename T, int64_t DIM>
inline void scores16(const float* q, const T* keys, int64_t row, int64_t m, float scale, float* scores) {
  constexpr int64_t CHUNKS = DIM / 16;
  __m512 qv[CHUNKS], acc[16];
  for (int64_t c = 0; c < CHUNKS; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int64_t t = 0; t < 16; ++t) {
    acc[t] = _mm512_setzero_ps();
    if (t < m) {
      for (int64_t c = 0; c < CHUNKS; ++c) acc[t] = _mm512_fmadd_ps(qv[c], load16(keys + t * row + 16 * c), acc[t]);
    }
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1u);
  _mm512_mask_storeu_ps(scores, valid, _mm512_mul_ps(lane_sums(acc), _mm512_set1_ps(scale)));
}

// out <- out * rescale + sum over the n rows t from `values` (rows `row` elements apart) of
// p[t] * row t, with out held in registers over the rows (rescale: an online softmax's correction).
template <typename T, int64_t DIM>
inline void weighted_sum(const float* p, const T* values, int64_t row, int64_t n, float* out, float rescale) {
  constexpr int64_t CHUNKS = DIM / 16;
  __m512 acc[CHUNKS];
  const __m512 factor = _mm512_set1_ps(rescale);
  for (int64_t c = 0; c < CHUNKS; ++c) acc[c] = _mm512_mul_ps(_mm512_loadu_ps(out + 16 * c), factor);
  for (int64_t t = 0; t < n; ++t) {
    const __m512 weight = _mm512_set1_ps(p[t]);
    for (int64_t c = 0; c < CHUNKS; ++c) acc[c] = _mm512_fmadd_ps(weight, load16(values + t * row + 16 * c), acc[c]);
  }
  for (int64_t c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
}

// exp_nonpositive (float_bits.h) on 16 lanes.
inline __m512 exp16_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512i whole = _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(t, _mm512_set1_ps(128.0f))),
                                         _mm512_set1_epi32(128));
  const __m512 f = _mm512_sub_ps(t, _mm512_cvtepi32_ps(whole));
  __m512 p = _mm512_set1_ps(1.8762329e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9925844e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5823606e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015453e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315296e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
  const __m512i power = _mm512_slli_epi32(_mm512_add_epi32(whole, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(power));
}

}  // namespace scalesim

#endif
