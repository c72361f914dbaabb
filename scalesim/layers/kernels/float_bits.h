// Scalar float helpers the kernels share, written so that GCC vectorizes the loops they sit in
// (with kernel_build.py's flags: -O3 -march=native -fno-trapping-math): bfloat16 <-> float32 by
// bit shifts, and an exp by a polynomial (std::exp and std::floor do not vectorize).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace scalesim {

// e^x for x <= 0: 2^(x log2 e) split into an integer power, built in the exponent bits, and 2^f
// for f in [0, 1) by a degree-5 polynomial (relative error 1.6e-7, below float32's rounding of
// the sums that follow). Inputs below -87 give e^-87 (about 1.6e-38) instead of smaller values.
// The integer part is the truncation of t + 128 (positive), not std::floor; t just below an
// integer may give f slightly below 0, where the polynomial is still accurate.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const int32_t whole = static_cast<int32_t>(t + 128.0f) - 128;
  const float f = t - static_cast<float>(whole);
  float p = 1.8762329e-3f;
  p = p * f + 8.9925844e-3f;
  p = p * f + 5.5823606e-2f;
  p = p * f + 2.4015453e-1f;
  p = p * f + 6.9315296e-1f;
  p = p * f + 9.9999994e-1f;
  return p * __builtin_bit_cast(float, (whole + 127) << 23);
}

inline float widen(float x) { return x; }
// bfloat16 is the top half of a float32's bits.
inline float widen(uint16_t bf16_bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bf16_bits) << 16); }

// float32 -> the element type, rounding to nearest even as PyTorch's cast does. Not NaN-safe:
// a NaN whose payload sits in the low half may come out as an infinity, and one with every
// mantissa bit set wraps to a zero; the kernels only narrow values computed from bfloat16 or
// float32 activations, and the sampler checks the logits for non-finite values.
inline void narrow(float x, float& out) { out = x; }
inline void narrow(float x, uint16_t& out) {
  uint32_t bits = __builtin_bit_cast(uint32_t, x);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  out = static_cast<uint16_t>(bits >> 16);
}

}  // namespace scalesim
