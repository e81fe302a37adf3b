// The optimizer and EMA updates over all of a network's tensors, each as one MindSpore CPU "aot" Custom op that
// writes its Parameters in place (the op's own output is a 0-d flag to order it by).
//
// MindSpore runs AdamW as one AdamWeightDecay op per weight tensor and the EMA as a Sub and an
// ApplyGradientDescent per tensor: ~2,000 kernels a step for NanoDet-Plus (459 weights, 742 EMA tensors), each
// dispatched on its own (docs/performance.md). Here one call walks every tensor.
//
// adamw_update(hyper, decays, p_1..p_k, m_1..m_k, v_1..v_k, g_1..g_k) -> flag
//   hyper = [lr, beta1, beta2, eps, decay_factor, grad_scale] (float32); decays = per-tensor weight decay
//   (float32[k]). The arithmetic of MindSpore's CPU AdamWeightDecay kernel (nnacl) on the gradient times
//   grad_scale (the clipping factor: one multiply here instead of a Mul kernel per tensor, the same bits),
//   decay = decays[i] * decay_factor:
//     g = grad * grad_scale;  m += (g - m)(1 - beta1);  v += (g g - v)(1 - beta2);  p -= lr (m / (sqrt(v) + eps) + decay p)
//   with the same fused multiply-adds for m and v (bit for bit equal); p within one float32 rounding of it.
// ema_update(rate, s_1..s_k, x_1..x_k) -> flag
//   s -= rate (s - x), ApplyGradientDescent(s, rate, s - x) bit for bit.
// Compiled with -ffp-contract=off, so only the explicit std::fma calls fuse, on every target_clones copy, and
// -fno-math-errno, without which GCC does not vectorise the loop around std::sqrt (33 against ~4 ms a step).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "aot.h"
#include "isa.h"

namespace {

MSDET_CLONES_LEVEL
void adamw_one(float *p, float *m, float *v, const float *grad, int64_t n, float lr, float beta1_minus,
               float beta2_minus, float eps, float decay, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * scale;
    const float mi = std::fma(g - m[i], beta1_minus, m[i]);
    const float vi = std::fma(std::fma(g, g, -v[i]), beta2_minus, v[i]);
    m[i] = mi;
    v[i] = vi;
    p[i] = std::fma(-lr, std::fma(decay, p[i], mi / (std::sqrt(vi) + eps)), p[i]);
  }
}

MSDET_CLONES_LEVEL
void ema_one(float *s, const float *x, int64_t n, float rate) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] -= rate * (s[i] - x[i]);
}

}  // namespace

extern "C" int adamw_update(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  const int k = (nparam - 3) / 4;
  if (k < 1 || nparam != 4 * k + 3 || !float32_args(nparam, nparam, dtypes) || numel(ndims[0], shapes[0]) != 6 ||
      numel(ndims[1], shapes[1]) != k)
    return 1;
  const float *hyper = static_cast<const float *>(params[0]);
  const float *decays = static_cast<const float *>(params[1]);
  const float lr = hyper[0], beta1_minus = 1.0f - hyper[1], beta2_minus = 1.0f - hyper[2], eps = hyper[3];
  for (int t = 0; t < k; ++t) {
    const int ip = 2 + t, im = ip + k, iv = im + k, ig = iv + k;
    const int64_t n = numel(ndims[ip], shapes[ip]);
    if (numel(ndims[im], shapes[im]) != n || numel(ndims[iv], shapes[iv]) != n || numel(ndims[ig], shapes[ig]) != n)
      return 1;
    adamw_one(static_cast<float *>(params[ip]), static_cast<float *>(params[im]), static_cast<float *>(params[iv]),
              static_cast<const float *>(params[ig]), n, lr, beta1_minus, beta2_minus, eps, decays[t] * hyper[4],
              hyper[5]);
  }
  *static_cast<float *>(params[nparam - 1]) = 0.0f;
  return 0;
}

extern "C" int ema_update(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  const int k = (nparam - 2) / 2;
  if (k < 1 || nparam != 2 * k + 2 || !float32_args(nparam, nparam, dtypes) || numel(ndims[0], shapes[0]) != 1)
    return 1;
  const float rate = *static_cast<const float *>(params[0]);
  for (int t = 0; t < k; ++t) {
    const int64_t n = numel(ndims[1 + t], shapes[1 + t]);
    if (numel(ndims[1 + k + t], shapes[1 + k + t]) != n) return 1;
    ema_one(static_cast<float *>(params[1 + t]), static_cast<const float *>(params[1 + k + t]), n, rate);
  }
  *static_cast<float *>(params[nparam - 1]) = 0.0f;
  return 0;
}
