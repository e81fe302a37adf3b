// The plane sum shared by the norm kernels and the SE block's mean (batch_norm.cc, group_norm.cc, activations.cc):
// one channel's H * W values summed in float across SIMD lanes, then across lanes; the callers add the planes'
// sums in double where they need more.
#pragma once

#include <cstdint>

#include "isa.h"

namespace {

MSDET_CLONES
float plane_sum(const float *x, int64_t hw) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < hw; ++i) s += x[i];
  return s;
}

}  // namespace
