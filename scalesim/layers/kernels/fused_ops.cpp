// The elementwise work of a decoder layer, one pass each, as vLLM's CPU backend does it
// (silu_and_mul, fused_add_rms_norm, rotary_embedding), and greedy sampling's pass over the
// logits (greedy_rows): in PyTorch each is two to six ops,
// each reading and writing the whole activation, plus float32 copies of bfloat16 inputs.
//
// Every result is computed in float32 from the inputs' values and rounded to the inputs' dtype
// where PyTorch's layers round it, so float32 results are those of the plain-PyTorch layers up
// to the order of additions, and bfloat16 ones differ only where PyTorch rounds an intermediate
// that stays float32 here:
// - silu_and_mul(x): x = [gate | up] per row -> silu(gate) * up, rounded once;
// - rms_norm(x, w): w * round(x / rms(x)), as Hugging Face's Llama does (the normalised row is
//   rounded to the dtype before the weight multiplies it);
// - add_rms_norm(x, residual, w): residual <- round(residual + x), then rms_norm(residual, w);
// - rotary_(q, k, cos, sin): the rotate-half rotation of every head, in place.
// Rows are spread over the threads; a row's result never depends on the others or on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <tuple>

#include "float_bits.h"

namespace {

using scalesim::exp_nonpositive;
using scalesim::narrow;
using scalesim::widen;

constexpr int64_t GRAIN_ELEMENTS = 1 << 14;  // below this much work per thread, one thread does it

int64_t grain_rows(int64_t row_elements) { return std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(1, row_elements)); }

// Calls f with a typed null pointer of the tensor's element type: float, or uint16_t holding bfloat16 bits.
template <typename F>
void dispatch(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) {
    f(static_cast<float*>(nullptr));
  } else if (x.scalar_type() == at::kBFloat16) {
    f(static_cast<uint16_t*>(nullptr));
  } else {
    TORCH_CHECK(false, "float32 or bfloat16 only, got ", x.scalar_type());
  }
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, name, ": CPU [rows, width], rows contiguous");
}

// One row (values as parameters, not captured by reference, so the loop vectorizes).
template <typename T>
void silu_row(const T* gate, T* o, int64_t width) {
  const T* up = gate + width;
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = widen(gate[i]);
    const float e = exp_nonpositive(-std::fabs(g));  // e^-|g|: no overflow either side
    const float sigmoid = (g >= 0.f ? 1.f : e) / (1.f + e);  // a select, no branch: vectorizes
    narrow(g * sigmoid * widen(up[i]), o[i]);
  }
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: even width");
  const int64_t rows = x.size(0), width = x.size(1) / 2, stride = x.stride(0);
  auto out = at::empty({rows, width}, x.options());
  dispatch(x, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* src = static_cast<const T*>(x.const_data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        silu_row(src + r * stride, dst + r * width, width);
      }
    });
  });
  return out;
}

template <typename T>
void norm_row(const T* x, const T* w, T* o, int64_t width, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < width; ++i) squares += widen(x[i]) * widen(x[i]);
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    T normed;
    narrow(widen(x[i]) * inv, normed);
    narrow(widen(w[i]) * widen(normed), o[i]);
  }
}

// rms_norm of x, or, given a residual, of residual + x (stored into residual).
at::Tensor norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
              weight.scalar_type() == x.scalar_type(), "rms_norm: weight [width] of x's dtype");
  if (residual != nullptr) {
    check_rows(*residual, "add_rms_norm residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual of x's shape and dtype");
  }
  const int64_t rows = x.size(0), width = x.size(1);
  auto out = at::empty({rows, width}, x.options());
  dispatch(x, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* src = static_cast<const T*>(x.const_data_ptr());
    const T* w = static_cast<const T*>(weight.const_data_ptr());
    T* res = residual == nullptr ? nullptr : static_cast<T*>(residual->data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    const int64_t xs = x.stride(0), rs = residual == nullptr ? 0 : residual->stride(0);
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = src + r * xs;
        if (res != nullptr) {
          T* sum = res + r * rs;
#pragma omp simd
          for (int64_t i = 0; i < width; ++i) narrow(widen(sum[i]) + widen(row[i]), sum[i]);
          row = sum;
        }
        norm_row(row, w, dst + r * width, width, static_cast<float>(eps));
      }
    });
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return norm(x, nullptr, weight, eps); }

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  return norm(x, &residual, weight, eps);
}

template <typename T>
void rotate_head(T* x1, const float* c, const float* s, int64_t half) {
  T* x2 = x1 + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = widen(x1[i]), b = widen(x2[i]);
    narrow(a * c[i] - b * s[i], x1[i]);
    narrow(b * c[i] + a * s[i], x2[i]);
  }
}

// x [T, heads, D] (head rows contiguous), turned in place by cos/sin [T, D / 2] (float32).
template <typename T>
void rotate(const at::Tensor& x, const float* cos, const float* sin, int64_t half) {
  T* base = static_cast<T*>(x.data_ptr());
  const int64_t tokens = x.size(0), heads = x.size(1), ts = x.stride(0), hs = x.stride(1);
  at::parallel_for(0, tokens, grain_rows(heads * 2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        rotate_head(base + t * ts + h * hs, c, s, half);
      }
    }
  });
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && q.device().is_cpu() &&
              k.device().is_cpu() && q.scalar_type() == k.scalar_type() && q.size(0) == k.size(0) &&
              q.size(2) == k.size(2) && q.size(2) % 2 == 0, "rotary_: q, k [T, heads, D] of one dtype, D even");
  const int64_t half = q.size(2) / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == q.size(0) * half && sin.numel() == cos.numel(),
              "rotary_: float32 cos, sin [T, D / 2]");
  dispatch(q, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    rotate<T>(q, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), half);
    rotate<T>(k, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), half);
  });
}

}  // namespace

// Per row of float32 logits [B, V]: the first index of the row's largest value (torch.argmax's
// choice) and whether no token can be drawn from the row (a NaN or +inf in it, or every value
// -inf: the row's maximum is not finite). One pass over the row instead of PyTorch's two (argmax,
// amax), each of which ran at about 1.4 GB/s here on 35 x 49,152 logits. A row whose flag is set
// has a meaningless index.
std::tuple<at::Tensor, at::Tensor> greedy_rows(const at::Tensor& logits) {
  check_rows(logits, "greedy_rows");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.size(1) > 0, "greedy_rows: float32 [rows, vocab > 0]");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  auto index = at::empty({rows}, logits.options().dtype(at::kLong));
  auto unusable = at::empty({rows}, logits.options().dtype(at::kBool));
  const float* src = logits.const_data_ptr<float>();
  int64_t* best = index.data_ptr<int64_t>();
  bool* bad = unusable.data_ptr<bool>();
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = src + r * stride;
      float top = x[0];
      int64_t at = 0;
      bool nan = false;
      int64_t i = 0;
#if defined(__AVX512F__)
      if (vocab >= 16) {
        __m512 top16 = _mm512_loadu_ps(x);
        __m512i at16 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i idx16 = at16;
        __mmask16 unordered = _mm512_cmp_ps_mask(top16, top16, _CMP_UNORD_Q);
        const __m512i step = _mm512_set1_epi32(16);
        for (i = 16; i + 16 <= vocab; i += 16) {
          idx16 = _mm512_add_epi32(idx16, step);
          const __m512 v = _mm512_loadu_ps(x + i);
          unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          const __mmask16 greater = _mm512_cmp_ps_mask(v, top16, _CMP_GT_OQ);  // strictly: the first stays
          top16 = _mm512_mask_mov_ps(top16, greater, v);
          at16 = _mm512_mask_mov_epi32(at16, greater, idx16);
        }
        nan = unordered != 0;
        top = _mm512_reduce_max_ps(top16);
        const __mmask16 holders = _mm512_cmp_ps_mask(top16, _mm512_set1_ps(top), _CMP_EQ_OQ);
        at = _mm512_mask_reduce_min_epi32(holders, at16);  // the smallest index among lanes at the max
      }
#endif
      for (; i < vocab; ++i) {
        nan |= x[i] != x[i];
        if (x[i] > top) top = x[i], at = i;
      }
      if (nan) {  // torch.argmax's choice: the first NaN (the lanes' maxima ignored them)
        at = 0;
        while (x[at] == x[at]) ++at;
      }
      best[r] = at;
      bad[r] = nan || !std::isfinite(top);
    }
  });
  return {index, unusable};
}

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("greedy_rows(Tensor logits) -> (Tensor, Tensor)");
  m.impl("greedy_rows", c10::DispatchKey::CPU, TORCH_FN(greedy_rows));
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.impl("rotary_", c10::DispatchKey::CPU, TORCH_FN(rotary_));
}
