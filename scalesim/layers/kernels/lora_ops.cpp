// Multi-LoRA without stacked copies: out[t] += scale_i * B_i (A_i x[t]) for every token t whose
// adapter is i, reading each adapter's own A [rank, in] and B^T [rank, out] where they lie (the
// BGMV/SGMV idea of Punica and S-LoRA). The plain-PyTorch path (layers/lora.py) concatenates the
// batch's adapters into stacked A/B tensors first, which doubles the device bytes of every
// adapter in the batch; this one needs no room beyond the adapters themselves.
//
// A run of consecutive tokens of one adapter (a sequence's prompt chunk) of at least
// MATMUL_MIN_TOKENS tokens goes through two matmuls (oneDNN/MKL); shorter runs (decode tokens)
// are computed here row by row in float32, rounded once into `out`. Results equal the plain
// path's up to the order of additions in float32; in bfloat16 the plain path rounds the
// intermediate x A^T and the delta, the row path only the sum (the matmul path rounds x A^T).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "float_bits.h"

namespace {

using scalesim::narrow;
using scalesim::widen;

constexpr int64_t MATMUL_MIN_TOKENS = 8;

template <typename T>
void token_rows(const T* x, int64_t x_stride, T* out, int64_t out_stride, const T* a, const T* bt, int64_t rank,
                int64_t in_features, int64_t out_features, float scale, int64_t count, float* h, float* acc) {
  for (int64_t t = 0; t < count; ++t) {
    const T* xr = x + t * x_stride;
    for (int64_t j = 0; j < rank; ++j) {  // shrink: h = scale * A x
      const T* ar = a + j * in_features;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < in_features; ++k) dot += widen(ar[k]) * widen(xr[k]);
      h[j] = dot * scale;
    }
    for (int64_t o = 0; o < out_features; ++o) acc[o] = 0.f;
    for (int64_t j = 0; j < rank; ++j) {  // expand: acc = B h, one contiguous row of B^T at a time
      const T* br = bt + j * out_features;
      const float hj = h[j];
#pragma omp simd
      for (int64_t o = 0; o < out_features; ++o) acc[o] += hj * widen(br[o]);
    }
    T* orow = out + t * out_stride;
#pragma omp simd
    for (int64_t o = 0; o < out_features; ++o) narrow(widen(orow[o]) + acc[o], orow[o]);
  }
}

template <typename T>
T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void lora_add_(at::Tensor out, const at::Tensor& x, at::TensorList a, at::TensorList bt, at::ArrayRef<double> scales,
               const at::Tensor& token_adapter) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.stride(1) == 1, "lora_add_: out must be CPU [T, out], rows contiguous");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, "lora_add_: x must be CPU [T, in], rows contiguous");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "lora_add_: x and out differ in dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "lora_add_: float32 or bfloat16 only");
  TORCH_CHECK(x.size(0) == out.size(0), "lora_add_: x and out differ in tokens");
  TORCH_CHECK(token_adapter.scalar_type() == at::kLong && token_adapter.is_contiguous() && token_adapter.numel() == x.size(0),
              "lora_add_: token_adapter must be int64 [T]");
  TORCH_CHECK(a.size() == bt.size() && a.size() == scales.size(), "lora_add_: a, bt and scales differ in length");
  const int64_t tokens = x.size(0), in_features = x.size(1), out_features = out.size(1);
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() == 0) continue;  // this adapter does not target the projection
    TORCH_CHECK(a[i].is_contiguous() && bt[i].is_contiguous() && a[i].scalar_type() == x.scalar_type() &&
                    bt[i].scalar_type() == x.scalar_type(), "lora_add_: adapter ", i, " must be contiguous, in x's dtype");
    TORCH_CHECK(a[i].dim() == 2 && a[i].size(1) == in_features && bt[i].dim() == 2 && bt[i].size(1) == out_features &&
                    bt[i].size(0) == a[i].size(0), "lora_add_: adapter ", i, " has the wrong shape");
  }
  const int64_t* owner = token_adapter.data_ptr<int64_t>();
  const int64_t adapters = static_cast<int64_t>(a.size());
  int64_t max_rank = 0;
  for (const auto& ai : a) max_rank = std::max<int64_t>(max_rank, ai.numel() ? ai.size(0) : 0);
  std::vector<float> h(max_rank), acc(out_features);
  for (int64_t t = 0; t < tokens;) {
    const int64_t i = owner[t];
    int64_t end = t + 1;
    while (end < tokens && owner[end] == i) ++end;
    TORCH_CHECK(i < adapters, "lora_add_: token ", t, " names adapter ", i, " of ", adapters);
    if (i >= 0 && a[i].numel() > 0) {
      const float scale = static_cast<float>(scales[i]);
      const int64_t count = end - t, rank = a[i].size(0);
      if (count >= MATMUL_MIN_TOKENS) {
        out.narrow(0, t, count).addmm_(at::mm(x.narrow(0, t, count), a[i].t()), bt[i], 1.0, scale);
      } else if (x.scalar_type() == at::kFloat) {
        token_rows(data<float>(x) + t * x.stride(0), x.stride(0), data<float>(out) + t * out.stride(0), out.stride(0),
                   data<float>(a[i]), data<float>(bt[i]), rank, in_features, out_features, scale, count, h.data(), acc.data());
      } else {
        token_rows(data<uint16_t>(x) + t * x.stride(0), x.stride(0), data<uint16_t>(out) + t * out.stride(0),
                   out.stride(0), data<uint16_t>(a[i]), data<uint16_t>(bt[i]), rank, in_features, out_features, scale,
                   count, h.data(), acc.data());
      }
    }
    t = end;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalesim, m) {
  m.def("lora_add_(Tensor(a!) out, Tensor x, Tensor[] a, Tensor[] bt, float[] scales, Tensor token_adapter) -> ()");
  m.impl("lora_add_", c10::DispatchKey::CPU, TORCH_FN(lora_add_));
}
