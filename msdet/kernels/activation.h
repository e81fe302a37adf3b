// The activations shared by the activation kernels and the norms fused with one (activations.cc, batch_norm.cc,
// group_norm.cc): a vectorisable sigmoid, and LeakyReLU and swish with their derivatives as one function per
// activation code. Build with -fno-trapping-math (else GCC will not vectorise the clamp and the sign select) and
// -ffp-contract=off (no fused multiply-adds: every instruction-set copy gives the same bits).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// e^x for x <= 0, relative error ~2e-7 (Cephes expf): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// constants), e^r by its degree-7 polynomial, 2^n written into the exponent bits. x is clamped to >= -87.3, where
// 2^n is still a normal float (e^-87.3 = 1.2e-38: nothing next to the 1 it is added to).
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  const int32_t scale_bits = (bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * scale;
}

// 1 / (1 + e^-x) from e = e^-|x| <= 1, so the exponential never overflows: e / (1 + e) for x < 0.
[[gnu::always_inline]] inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

// The activation a norm applies after its affine transform (the ``act`` code in its cfg input):
//   LeakyReLU: y = p > 0 ? p : slope p,  dy/dp = p > 0 ? 1 : slope;
//   swish: y = p s,  dy/dp = s (1 + p (1 - s)),  s = sigmoid(p) (Ramachandran et al. 2017; torch.nn.SiLU).
enum Act { kNone = 0, kLeaky = 1, kSwish = 2 };

template <int A>
[[gnu::always_inline]] inline float act_fwd(float p, float slope) {
  if (A == kLeaky) return p > 0.0f ? p : slope * p;
  if (A == kSwish) return p * sigmoid(p);
  return p;
}

// dy * act'(p)
template <int A>
[[gnu::always_inline]] inline float act_grad(float p, float dy, float slope) {
  if (A == kLeaky) return p > 0.0f ? dy : slope * dy;
  if (A == kSwish) {
    const float s = sigmoid(p);
    return dy * s * (1.0f + p * (1.0f - s));
  }
  return dy;
}

// fn(std::integral_constant<int, A>) for the activation code `act` (a compile-time A for the templates above);
// false for an unknown code
template <class Fn>
bool with_act(int act, Fn fn) {
  switch (act) {
    case kNone: fn(std::integral_constant<int, kNone>{}); return true;
    case kLeaky: fn(std::integral_constant<int, kLeaky>{}); return true;
    case kSwish: fn(std::integral_constant<int, kSwish>{}); return true;
    default: return false;
  }
}

}  // namespace
