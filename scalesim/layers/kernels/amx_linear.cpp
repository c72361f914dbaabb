// bfloat16 linears of few rows on AMX tiles: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),
// for the decode and verify steps of a bfloat16 model (1 to about 128 rows), which are bound by
// the bytes of weights they read. oneDNN's inner product on this CPU reads them at well below the
// memory's rate there, and slows further as the rows grow past 16 (drafted rows of speculation);
// layers/amx_linear.py measures both and says where each serves.
//
// The weight is packed once (amx_linear_pack) as the B operand of the tile product: output
// channels in blocks of 16, each block k-major in steps of 32, [N/16, K/32, 16, 32], so that one
// (block, step) is a 1 KiB tile whose row r holds the pairs (w[n][2r], w[n][2r + 1]) of its 16
// channels n. A thread takes a contiguous range of pairs of blocks (32 channels), so its weights
// stream from memory in order, and for each pair passes over the rows 32 at a time: two A tiles
// (16 rows of x each) times two B tiles into four float32 C tiles, summed over all of K in the
// tiles, then rounded to bfloat16 once. Rows go in chunks of 256, so a weight byte is read from
// memory once per chunk and x's chunk stays in the core's cache.
//
// Sums run in float32 over k in the same order whatever the rows, so a row's result does not
// depend on the rows batched with it. Built everywhere; on a CPU without AMX-BF16 the operator
// refuses (amx_linear_supported() is false).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "amx_tiles.h"

namespace {

constexpr int64_t BLOCK = 16;       // output channels per packed block (a B tile's columns)
constexpr int64_t STEP = 32;        // k per tile step (a bfloat16 A tile's columns)
constexpr int64_t ROW_CHUNK = 256;  // rows of x per pass over the weights (768 KiB at K = 1536)

bool amx_linear_supported() {
#if defined(SCALESIM_AMX_TILES)
  return scalesim::amx::permitted();
#else
  return false;
#endif
}

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.device().is_cpu(),
              "amx_linear_pack takes a bfloat16 [N, K] CPU weight, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.size(1) % STEP == 0, "amx_linear_pack needs K a multiple of ", STEP, ", got ", w.size(1));
}

// [N, K] -> [ceil(N / 16), K / 32, 16, 32]; channels past N are zero.
at::Tensor amx_linear_pack(const at::Tensor& weight) {
  check_weight(weight);
  const int64_t n_total = weight.size(0), k_total = weight.size(1);
  const int64_t blocks = (n_total + BLOCK - 1) / BLOCK, steps = k_total / STEP;
  auto packed = at::zeros({blocks, steps, BLOCK, STEP}, weight.options());
  const auto w = weight.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t n = b * BLOCK; n < std::min(n_total, (b + 1) * BLOCK); ++n) {
        for (int64_t k = 0; k < k_total; ++k) {
          const int64_t step = k / STEP, pair = k % STEP / 2;
          dst[((b * steps + step) * BLOCK + pair) * STEP + (n % BLOCK) * 2 + k % 2] = src[n * k_total + k];
        }
      }
    }
  });
  return packed;
}

#if defined(SCALESIM_AMX_TILES)

// R row tiles (1 or 2) x C channel blocks (1 or 2) over all `steps`: C tiles 0..3 (row * 2 +
// block), A tiles 4 and 5, B tiles 6 and 7. Each loaded tile serves two products.
template <int R, int C>
inline void product(const uint16_t* a0, const uint16_t* a1, int64_t lda_bytes, const uint16_t* b0, const uint16_t* b1,
                    int64_t steps) {
  _tile_zero(0);
  if constexpr (C > 1) _tile_zero(1);
  if constexpr (R > 1) _tile_zero(2);
  if constexpr (R > 1 && C > 1) _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a0 + s * STEP, lda_bytes);
    _tile_loadd(6, b0 + s * BLOCK * STEP, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (C > 1) {
      _tile_loadd(7, b1 + s * BLOCK * STEP, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (R > 1) {
      _tile_loadd(5, a1 + s * STEP, lda_bytes);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (R > 1 && C > 1) _tile_dpbf16ps(3, 5, 7);
  }
}

inline void store_sums(int tile, float* sums) {
  switch (tile) {
    case 0: _tile_stored(0, sums, 64); break;
    case 1: _tile_stored(1, sums, 64); break;
    case 2: _tile_stored(2, sums, 64); break;
    default: _tile_stored(3, sums, 64); break;
  }
}

#endif

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      int64_t out_features) {
  TORCH_CHECK(amx_linear_supported(), "amx_linear: this CPU or kernel build has no AMX-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "amx_linear takes bfloat16 CPU tensors, got ", x.scalar_type(), " and ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == BLOCK && packed.size(3) == STEP && packed.is_contiguous(),
              "amx_linear: packed weight must come from amx_linear_pack");
  const int64_t k_total = packed.size(1) * STEP, blocks = packed.size(0), n_total = out_features;
  TORCH_CHECK(x.size(-1) == k_total, "amx_linear: x has ", x.size(-1), " features, the weight ", k_total);
  TORCH_CHECK(n_total > (blocks - 1) * BLOCK && n_total <= blocks * BLOCK, "amx_linear: ", n_total,
              " outputs do not match ", blocks, " packed blocks");
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n_total, "amx_linear: bias has ", bias->numel(), " values for ", n_total, " outputs");
    bias_f = bias->to(at::kFloat).contiguous();  // no copy for the float32 bias AmxPacked keeps
  }
  auto sizes = x.sizes().vec();
  sizes.back() = n_total;
  const auto x2 = x.reshape({-1, k_total}).contiguous();
  const int64_t m_total = x2.size(0);
  auto out = at::empty({m_total, n_total}, x.options());
  if (m_total == 0) return out.view(sizes);
#if defined(SCALESIM_AMX_TILES)
  const auto* xs = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  const auto* ws = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* ys = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* bs = bias_f ? bias_f->data_ptr<float>() : nullptr;
  const int64_t steps = k_total / STEP, whole = m_total / 16, tail_rows = m_total % 16;
  const int64_t tiles = whole + (tail_rows ? 1 : 0);
  // The last tile's rows past m_total read zeros from a copy, not past x's end.
  std::vector<uint16_t> tail(tail_rows ? 16 * k_total : 0, 0);
  if (tail_rows) std::memcpy(tail.data(), xs + whole * 16 * k_total, tail_rows * k_total * 2);
  auto rows_of = [&](int64_t tile) { return tile < whole ? xs + tile * 16 * k_total : tail.data(); };
  const int64_t pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    const scalesim::amx::TileSession session;
    alignas(64) float sums[16][16];
    for (int64_t chunk = 0; chunk < tiles; chunk += ROW_CHUNK / 16) {
      const int64_t chunk_end = std::min(tiles, chunk + ROW_CHUNK / 16);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t block = 2 * p, nc = std::min<int64_t>(2, blocks - block);
        const uint16_t* b0 = ws + block * steps * BLOCK * STEP;
        const uint16_t* b1 = b0 + steps * BLOCK * STEP;
        for (int64_t t = chunk; t < chunk_end; t += 2) {
          const int64_t nr = std::min<int64_t>(2, chunk_end - t);
          const uint16_t* a0 = rows_of(t);
          const uint16_t* a1 = nr > 1 ? rows_of(t + 1) : nullptr;
          // the tail tile is a copy with rows of k_total values, like x's
          const int64_t lda = k_total * 2;
          if (nr == 2 && nc == 2) product<2, 2>(a0, a1, lda, b0, b1, steps);
          else if (nr == 2) product<2, 1>(a0, a1, lda, b0, b1, steps);
          else if (nc == 2) product<1, 2>(a0, a1, lda, b0, b1, steps);
          else product<1, 1>(a0, a1, lda, b0, b1, steps);
          for (int64_t i = 0; i < nr; ++i) {
            for (int64_t j = 0; j < nc; ++j) {
              store_sums(static_cast<int>(i * 2 + j), &sums[0][0]);
              const int64_t row0 = (t + i) * 16, rows = std::min<int64_t>(16, m_total - row0);
              const int64_t col0 = (block + j) * BLOCK, cols = std::min<int64_t>(BLOCK, n_total - col0);
              const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
              const __m512 add = bs ? _mm512_maskz_loadu_ps(mask, bs + col0) : _mm512_setzero_ps();
              for (int64_t r = 0; r < rows; ++r) {
                const __m512 v = _mm512_add_ps(_mm512_load_ps(sums[r]), add);
                _mm256_mask_storeu_epi16(ys + (row0 + r) * n_total + col0, mask, (__m256i)_mm512_cvtneps_pbh(v));
              }
            }
          }
        }
      }
    }
  });
#endif
  return out.view(sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("amx_linear_supported() -> bool", TORCH_FN(amx_linear_supported));
  m.def("amx_linear_pack(Tensor weight) -> Tensor");
  m.impl("amx_linear_pack", c10::DispatchKey::CPU, TORCH_FN(amx_linear_pack));
  m.def("amx_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.impl("amx_linear", c10::DispatchKey::CPU, TORCH_FN(amx_linear));
}
