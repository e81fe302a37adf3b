// Training-mode BatchNorm (NCHW, float32) fused with the activation that follows it (none, LeakyReLU or swish,
// activation.h), forward and backward, for MindSpore's CPU "aot" Custom op.
//
// MindSpore 2.8 on CPU runs a conv's BatchNorm and activation as four kernels a step (BatchNorm, the activation,
// their two gradients), its BatchNorm forward at about twice PyTorch's time and its BatchNormGrad at three times
// (docs/performance.md); here they are two. Per channel c over its M = N * H * W values (Ioffe & Szegedy 2015;
// torch's batch_norm and batch_norm_backward):
//   mean, var = the batch mean and biased variance (two passes),  rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) * rstd,  p = gamma * xhat + beta,  y = act(p)
//   moving = (1 - momentum) * moving + momentum * batch statistic (the variance unbiased, M / (M - 1)), in place,
//   as MindSpore's BatchNorm updates them
// The backward recomputes p from x and the saved mean and variance, takes g = dy * act'(p) (activation.h), and
//   dbeta = sum(g),  dgamma = sum(g * xhat),  dx = gamma * rstd * (g - dbeta / M - xhat * dgamma / M).
// Each plane is summed in float (SIMD), the planes in double, in a fixed order (deterministic). The channels are
// shared out over the threads above 128K values (parallel_for, parallel.h): the same result on any number.
// Entry points: bn_act_fwd(x, gamma, beta, moving_mean, moving_var, cfg = [eps, momentum, act, slope])
//   -> (y, mean, var), act 0 none, 1 LeakyReLU, 2 swish; it writes moving_mean and moving_var;
// bn_act_bwd(x, dy, gamma, beta, mean, var, cfg) -> (dx, dgamma, dbeta): three outputs, so the graph needs no
//   slices to take the parameter gradients apart.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "aot.h"
#include "activation.h"
#include "isa.h"
#include "parallel.h"
#include "reduce.h"

namespace {

struct FusedArgs {
  const float *x, *dy, *gamma, *beta;
  float *mean, *var;  // forward: written (batch statistics); backward: read
  float *moving_mean, *moving_var;
  float eps, momentum, slope;
  int act;
  float *y_or_dx, *dgamma, *dbeta;
  int64_t n, c, hw;
};

MSDET_CLONES
float plane_square_dev(const float *x, float mean, int64_t hw) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < hw; ++i) s += (x[i] - mean) * (x[i] - mean);
  return s;
}

template <int A>
MSDET_CLONES void plane_forward(const float *x, float *y, float k, float b, float slope, int64_t hw) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) y[i] = act_fwd<A>(k * x[i] + b, slope);
}

// sums of g and g * (x - mean) over one plane, g = dy * act'(k x + b)
template <int A>
MSDET_CLONES void plane_grad_sums(const float *x, const float *dy, float k, float b, float mean, float slope,
                                  int64_t hw, float *sum_g, float *sum_gx) {
  float s = 0.0f, sx = 0.0f;
#pragma omp simd reduction(+ : s, sx)
  for (int64_t i = 0; i < hw; ++i) {
    const float g = act_grad<A>(k * x[i] + b, dy[i], slope);
    s += g;
    sx += g * (x[i] - mean);
  }
  *sum_g = s;
  *sum_gx = sx;
}

template <int A>
MSDET_CLONES void plane_grad_input(const float *x, const float *dy, float k, float b, float slope, float kd,
                                   float bd, float k0, int64_t hw, float *dx) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) dx[i] = kd * act_grad<A>(k * x[i] + b, dy[i], slope) + bd * x[i] + k0;
}

template <int A>
void fused_forward_channel(const FusedArgs &a, int64_t c) {
  const int64_t m = a.n * a.hw;
  double sum = 0.0;
  for (int64_t n = 0; n < a.n; ++n) sum += plane_sum(a.x + (n * a.c + c) * a.hw, a.hw);
  const float mean = static_cast<float>(sum / static_cast<double>(m));
  double dev = 0.0;
  for (int64_t n = 0; n < a.n; ++n) dev += plane_square_dev(a.x + (n * a.c + c) * a.hw, mean, a.hw);
  const double var = dev / static_cast<double>(m);
  const double rstd = 1.0 / std::sqrt(var + a.eps);
  // p = gamma * (x - mean) * rstd + beta = k x + b
  const float k = static_cast<float>(a.gamma[c] * rstd);
  const float b = static_cast<float>(a.beta[c] - a.gamma[c] * rstd * mean);
  for (int64_t n = 0; n < a.n; ++n) {
    const int64_t off = (n * a.c + c) * a.hw;
    plane_forward<A>(a.x + off, a.y_or_dx + off, k, b, a.slope, a.hw);
  }
  a.mean[c] = mean;
  a.var[c] = static_cast<float>(var);
  const double unbiased = m > 1 ? var * static_cast<double>(m) / static_cast<double>(m - 1) : var;
  a.moving_mean[c] = static_cast<float>((1.0 - a.momentum) * a.moving_mean[c] + a.momentum * mean);
  a.moving_var[c] = static_cast<float>((1.0 - a.momentum) * a.moving_var[c] + a.momentum * unbiased);
}

template <int A>
void fused_backward_channel(const FusedArgs &a, int64_t c) {
  const double m = static_cast<double>(a.n * a.hw);
  const float mean = a.mean[c];
  const double rstd = 1.0 / std::sqrt(static_cast<double>(a.var[c]) + a.eps);
  const float k = static_cast<float>(a.gamma[c] * rstd);
  const float b = static_cast<float>(a.beta[c] - a.gamma[c] * rstd * mean);
  double sum_g = 0.0, sum_gx = 0.0;
  for (int64_t n = 0; n < a.n; ++n) {
    const int64_t off = (n * a.c + c) * a.hw;
    float s, sx;
    plane_grad_sums<A>(a.x + off, a.dy + off, k, b, mean, a.slope, a.hw, &s, &sx);
    sum_g += s;
    sum_gx += sx;
  }
  const double g = a.gamma[c];
  a.dgamma[c] = static_cast<float>(sum_gx * rstd);
  a.dbeta[c] = static_cast<float>(sum_g);
  const float kd = static_cast<float>(g * rstd);
  const float bd = static_cast<float>(-g * rstd * rstd * rstd * sum_gx / m);
  const float k0 = static_cast<float>(g * rstd * (rstd * rstd * sum_gx * mean - sum_g) / m);
  for (int64_t n = 0; n < a.n; ++n) {
    const int64_t off = (n * a.c + c) * a.hw;
    plane_grad_input<A>(a.x + off, a.dy + off, k, b, a.slope, kd, bd, k0, a.hw, a.y_or_dx + off);
  }
}

// The arguments both entry points have: x (params[0]), gamma and beta (params[gamma], params[gamma + 1]), the cfg
// [eps, momentum, activation, slope] (params[cfg]), the sizes.
FusedArgs common_args(void **params, int64_t **shapes, int gamma, int cfg_at) {
  const float *cfg = static_cast<const float *>(params[cfg_at]);
  FusedArgs a{};
  a.x = static_cast<const float *>(params[0]);
  a.gamma = static_cast<const float *>(params[gamma]);
  a.beta = static_cast<const float *>(params[gamma + 1]);
  a.eps = cfg[0], a.momentum = cfg[1], a.act = static_cast<int>(cfg[2]), a.slope = cfg[3];
  a.n = shapes[0][0], a.c = shapes[0][1], a.hw = shapes[0][2] * shapes[0][3];
  return a;
}

template <class Fn>
void over_channels(const FusedArgs &a, Fn fn) {
  parallel_for(a.c, a.n * a.c * a.hw, int64_t{1} << 16, fn);
}

}  // namespace

// inputs (x, gamma, beta, moving_mean, moving_var, cfg), outputs (y, mean, var)
extern "C" int bn_act_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  if (!float32_args(nparam, 9, dtypes) || ndims[0] != 4) return 1;
  FusedArgs a = common_args(params, shapes, 1, 5);
  a.moving_mean = static_cast<float *>(params[3]);
  a.moving_var = static_cast<float *>(params[4]);
  a.y_or_dx = static_cast<float *>(params[6]);
  a.mean = static_cast<float *>(params[7]);
  a.var = static_cast<float *>(params[8]);
  const bool known = with_act(a.act, [&](auto act) {
    over_channels(a, [&](int64_t c) { fused_forward_channel<decltype(act)::value>(a, c); });
  });
  return known ? 0 : 1;
}

// inputs (x, dy, gamma, beta, mean, var, cfg), outputs (dx, dgamma, dbeta)
extern "C" int bn_act_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  if (!float32_args(nparam, 10, dtypes) || ndims[0] != 4) return 1;
  FusedArgs a = common_args(params, shapes, 2, 6);
  a.dy = static_cast<const float *>(params[1]);
  a.mean = static_cast<float *>(params[4]);
  a.var = static_cast<float *>(params[5]);
  a.y_or_dx = static_cast<float *>(params[7]);
  a.dgamma = static_cast<float *>(params[8]);
  a.dbeta = static_cast<float *>(params[9]);
  const bool known = with_act(a.act, [&](auto act) {
    over_channels(a, [&](int64_t c) { fused_backward_channel<decltype(act)::value>(a, c); });
  });
  return known ? 0 : 1;
}
