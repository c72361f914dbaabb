// Weight-only linears: out[m, n] = scale[n] * sum_k x[m, k] * w[n, k], with x and out float32 and
// w stored smaller: int8 (one symmetric scale per output channel) or float16 (no scale). A decode
// step of a few rows is bound by the bytes of weights it reads, and these read a quarter (int8) or
// a half (float16) of float32's; a prefill step is bound by its multiply-adds, which this kernel
// issues at about the rate of oneDNN's float32 kernel.
//
// The weight comes packed (layers/weight_only.py): output channels in panels of 16, each panel
// stored k-major, [N/16, K, 16], so one k step of a panel is 16 contiguous values. A thread takes a
// panel and a slice of K_SLICE k steps (a few KiB, kept in cache), and passes every block of up to
// 6 rows of x over it: for each k the slice's 16 weights are widened to float32 in two 8-wide
// registers, and each row adds x[m, k] times them into its own two accumulators (12 accumulators,
// no horizontal sums). Widening again for every block of rows measured faster than widening a
// slice once into float32 scratch and reading that back. Rows go in chunks of 512, so a weight
// byte is read from memory once per call up to 512 rows (a decode step), once per chunk beyond.
// Sums run in float32 over k in order, so results differ from a float32 matmul over the
// dequantized weight by float32 rounding only, and a row's result does not depend on the others.
//
// Written for AVX2 with FMA and F16C; on a CPU without them the source does not build and the
// weight-only formats are refused (layers/weight_only.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "weight_only_linear needs AVX2, FMA and F16C"
#endif

namespace {

constexpr int64_t PANEL = 16;     // output channels per packed panel
constexpr int64_t ROW_BLOCK = 6;  // rows of x per pass over a slice: 12 accumulators + 2 weights + 1 broadcast registers
constexpr int64_t K_SLICE = 256;  // k steps per slice of a panel (4 KiB of int8, 8 KiB of float16)
constexpr int64_t ROW_CHUNK = 512;  // rows of x per pass over all panels (up to 3 MiB of float32 at K = 1536)

// Eight stored weights as eight float32.
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 widen8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Rows of x [ROWS, k_count] times a panel slice [k_count, 16], added into `tile`'s 16 columns
// (`accumulate`) or written there.
template <int64_t ROWS, typename W>
void slice_rows(const float* x, int64_t x_stride, const W* slice, int64_t k_count, float* tile, bool accumulate) {
  __m256 lo[ROWS], hi[ROWS];
  for (int64_t m = 0; m < ROWS; ++m) {
    lo[m] = accumulate ? _mm256_loadu_ps(tile + m * PANEL) : _mm256_setzero_ps();
    hi[m] = accumulate ? _mm256_loadu_ps(tile + m * PANEL + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < k_count; ++k) {
    const __m256 w_lo = widen8(slice + k * PANEL), w_hi = widen8(slice + k * PANEL + 8);
    for (int64_t m = 0; m < ROWS; ++m) {
      const __m256 v = _mm256_broadcast_ss(x + m * x_stride + k);
      lo[m] = _mm256_fmadd_ps(v, w_lo, lo[m]);
      hi[m] = _mm256_fmadd_ps(v, w_hi, hi[m]);
    }
  }
  for (int64_t m = 0; m < ROWS; ++m) {
    _mm256_storeu_ps(tile + m * PANEL, lo[m]);
    _mm256_storeu_ps(tile + m * PANEL + 8, hi[m]);
  }
}

template <typename W>
void all_rows(const float* x, int64_t x_stride, int64_t m_rows, const W* slice, int64_t k_count, float* tile,
              bool accumulate) {
  int64_t m = 0;
  for (; m + ROW_BLOCK <= m_rows; m += ROW_BLOCK)
    slice_rows<ROW_BLOCK, W>(x + m * x_stride, x_stride, slice, k_count, tile + m * PANEL, accumulate);
  const float* xr = x + m * x_stride;
  float* rest = tile + m * PANEL;
  switch (m_rows - m) {
    case 5: slice_rows<5, W>(xr, x_stride, slice, k_count, rest, accumulate); break;
    case 4: slice_rows<4, W>(xr, x_stride, slice, k_count, rest, accumulate); break;
    case 3: slice_rows<3, W>(xr, x_stride, slice, k_count, rest, accumulate); break;
    case 2: slice_rows<2, W>(xr, x_stride, slice, k_count, rest, accumulate); break;
    case 1: slice_rows<1, W>(xr, x_stride, slice, k_count, rest, accumulate); break;
    default: break;
  }
}

// The product for one stored type; `scale` is null for float16 (no scale).
template <typename W>
void linear_rows(const float* xp, int64_t x_stride, int64_t m_rows, int64_t k_dim, const W* wp, int64_t panels,
                 const float* sp, int64_t out_features, float* op, int64_t out_stride) {
  // Rows go in chunks of ROW_CHUNK, each over every panel: a chunk of x stays in cache while the
  // panels pass, where all of a long prefill's rows would be read again from memory per panel.
  for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_CHUNK) {
    const int64_t rows = std::min(ROW_CHUNK, m_rows - m0);
    const float* xc = xp + m0 * x_stride;
    float* oc = op + m0 * out_stride;
    at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(rows * PANEL);  // this panel's 16 columns of the chunk's rows, before scaling
      for (int64_t p = begin; p < end; ++p) {
        const W* panel = wp + p * k_dim * PANEL;
        for (int64_t k0 = 0; k0 < k_dim; k0 += K_SLICE)
          all_rows(xc + k0, x_stride, rows, panel + k0 * PANEL, std::min(K_SLICE, k_dim - k0), tile.data(), k0 > 0);
        const int64_t n0 = p * PANEL, channels = std::min(PANEL, out_features - n0);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t j = 0; j < channels; ++j)
            oc[m * out_stride + n0 + j] = sp ? tile[m * PANEL + j] * sp[n0 + j] : tile[m * PANEL + j];
      }
    });
  }
}

at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                              int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && (x.stride(1) == 1 || x.size(1) == 1),
              "weight_only_linear: x must be CPU float32 [M, K], rows contiguous");
  const bool is_int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(packed.device().is_cpu() && (is_int8 || packed.scalar_type() == at::kHalf) && packed.dim() == 3 &&
                  packed.size(2) == PANEL && packed.is_contiguous(),
              "weight_only_linear: the weight must be packed CPU int8 or float16 [N/16, K, 16], contiguous");
  TORCH_CHECK(packed.size(1) == x.size(1), "weight_only_linear: x has ", x.size(1), " features, the weight ",
              packed.size(1));
  TORCH_CHECK(out_features > (packed.size(0) - 1) * PANEL && out_features <= packed.size(0) * PANEL,
              "weight_only_linear: ", out_features, " output features do not fill ", packed.size(0), " panels");
  TORCH_CHECK(is_int8 == scale.has_value(), "weight_only_linear: int8 weights take a scale, float16 weights none");
  if (is_int8)
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == out_features,
                "weight_only_linear: scale must be CPU float32 [N], contiguous");
  const int64_t m_rows = x.size(0), k_dim = x.size(1), panels = packed.size(0);
  at::Tensor out = at::empty({m_rows, out_features}, x.options());
  if (m_rows == 0 || out_features == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (is_int8)
    linear_rows(xp, x.stride(0), m_rows, k_dim, packed.data_ptr<int8_t>(), panels, scale->data_ptr<float>(),
                out_features, op, out.stride(0));
  else
    linear_rows(xp, x.stride(0), m_rows, k_dim, packed.data_ptr<at::Half>(), panels, nullptr, out_features, op,
                out.stride(0));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("weight_only_linear(Tensor x, Tensor packed, Tensor? scale, int out_features) -> Tensor");
  m.impl("weight_only_linear", c10::DispatchKey::CPU, TORCH_FN(weight_only_linear));
}
