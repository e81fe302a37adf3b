// GroupNorm (NCHW, float32) and its gradients, for MindSpore's CPU "aot" Custom op.
//
// MindSpore 2.8's CPU GroupNorm takes 8.7 ms forward and 14 ms forward+backward on NanoDet-Plus's aux-head shape
// (8 x 192 x 16 x 16, 32 groups) where PyTorch takes 0.15 / 1.0 ms (docs/performance.md). Per sample n and group
// g over its D = (C / G) * H * W values (Wu & He 2018; torch.nn.GroupNorm, biased variance):
//   xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps),  y = xhat * gamma[c] + beta[c]
//   dx   = rstd * (gy - mean(gy) - xhat * mean(gy * xhat)),  gy = dy * gamma[c]   (means over the group)
//   dgamma[c] = sum_{n,h,w} dy * xhat,  dbeta[c] = sum_{n,h,w} dy
// Each channel's plane is summed in float (SIMD), the planes in double, in a fixed order (deterministic). The
// (sample, group) pairs are shared out over the threads above 128K values (parallel_for, parallel.h); the affine
// gradient's per-sample terms are added over the samples in order afterwards: the same result on any number of
// threads.
// Fused with the activation that follows (activation.h, as batch_norm.cc): y = act(xhat * gamma + beta); the
// backward recomputes p = xhat * gamma + beta and runs the formulas above on dy * act'(p).
// Entry points: the aot signature; cfg = [groups, eps, act, slope] (float32) is the last input, act 0 none,
// 1 LeakyReLU, 2 swish.
// gn_fwd(x, gamma, beta, cfg) -> y; gn_bwd(x, dy, gamma, beta, cfg) -> dx, dgamma, dbeta (one pass for all three:
// a first version's two ops and the slices of their [2, C] output were 4 kernels per GroupNorm).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot.h"
#include "activation.h"
#include "parallel.h"
#include "reduce.h"

namespace {

struct Layout {
  int64_t n, c, groups, per_group, hw;  // per_group: channels per group
  float eps, slope;
  int act;
};

// false when the channels do not split into the groups
bool layout(const int64_t *x, const float *cfg, Layout *out) {
  const int64_t groups = static_cast<int64_t>(cfg[0]);
  if (groups <= 0 || x[1] % groups != 0) return false;
  *out = Layout{x[0], x[1], groups, x[1] / groups, x[2] * x[3], cfg[1], cfg[3], static_cast<int>(cfg[2])};
  return true;
}

// mean and 1 / sqrt(var + eps) of the group's per_group planes at p (two passes: no cancellation)
void moments(const float *p, const Layout &l, double *mean, double *rstd) {
  const int64_t d = l.per_group * l.hw;
  double sum = 0.0;
  for (int64_t j = 0; j < l.per_group; ++j) sum += plane_sum(p + j * l.hw, l.hw);
  const float m = static_cast<float>(sum / d);
  double sq = 0.0;
  for (int64_t j = 0; j < l.per_group; ++j) {
    const float *q = p + j * l.hw;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < l.hw; ++i) s += (q[i] - m) * (q[i] - m);
    sq += s;
  }
  *mean = m;
  *rstd = 1.0 / std::sqrt(sq / d + l.eps);
}

// sum(g) and sum(g * (x - mean)) over one channel's plane, g = dy * act'(scale x + shift)
template <int A>
void plane_grad_sums(const float *x, const float *dy, int64_t hw, float mean, float scale, float shift,
                     float slope, double *s, double *sx) {
  float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < hw; ++i) {
    const float g = act_grad<A>(x[i] * scale + shift, dy[i], slope);
    a += g;
    b += g * (x[i] - mean);
  }
  *s = a;
  *sx = b;
}

constexpr int64_t kValuesPerThread = int64_t{1} << 16;

// fn(ng, mean, rstd) for every (sample, group) ng; each call writes only its own (sample, group)
template <class Fn>
void for_each_group(const Layout &l, const float *x, Fn fn) {
  parallel_for(l.n * l.groups, l.n * l.c * l.hw, kValuesPerThread, [&](int64_t ng) {
    double mean, rstd;
    moments(x + ng * l.per_group * l.hw, l, &mean, &rstd);
    fn(ng, mean, rstd);
  });
}

template <int A>
void forward(const Layout &l, void **params) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  const int64_t d = l.per_group * l.hw;
  for_each_group(l, x, [&](int64_t ng, double mean, double rstd) {
    for (int64_t j = 0; j < l.per_group; ++j) {
      const int64_t c = (ng % l.groups) * l.per_group + j;
      const float scale = static_cast<float>(rstd * gamma[c]);
      const float shift = static_cast<float>(beta[c] - mean * rstd * gamma[c]);
      const float *px = x + ng * d + j * l.hw;
      float *py = y + ng * d + j * l.hw;
#pragma omp simd
      for (int64_t i = 0; i < l.hw; ++i) py[i] = act_fwd<A>(px[i] * scale + shift, l.slope);
    }
  });
}

// dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat)), and dgamma[c] = sum_n sum(dy * (x - mean)) * rstd, dbeta[c] = sum_n sum(dy), from the same
// per-(sample, group) moments and plane sums; the per-sample terms are kept and added over the samples in order.
template <int A>
void backward(const Layout &l, void **params) {
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  const float *gamma = static_cast<const float *>(params[2]);
  const float *beta = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[5]), *dgamma = static_cast<float *>(params[6]);
  float *dbeta = static_cast<float *>(params[7]);
  std::vector<double> sum_dy(l.n * l.c), sum_dy_xhat(l.n * l.c);  // per (sample, channel)
  const int64_t d = l.per_group * l.hw;
  for_each_group(l, x, [&](int64_t ng, double mean, double rstd) {
    const int64_t c0 = (ng % l.groups) * l.per_group, nc0 = (ng / l.groups) * l.c + c0;
    double sum_gy = 0.0, sum_gy_xhat = 0.0;
    for (int64_t j = 0; j < l.per_group; ++j) {
      const double g = gamma[c0 + j];
      const float scale = static_cast<float>(rstd * g);
      const float shift = static_cast<float>(beta[c0 + j] - mean * rstd * g);
      double s, sx;
      plane_grad_sums<A>(x + ng * d + j * l.hw, dy + ng * d + j * l.hw, l.hw, static_cast<float>(mean), scale,
                         shift, l.slope, &s, &sx);
      sum_gy += g * s;
      sum_gy_xhat += g * sx * rstd;
      sum_dy[nc0 + j] = s;
      sum_dy_xhat[nc0 + j] = sx * rstd;
    }
    const double mean_gy = sum_gy / d, mean_gy_xhat = sum_gy_xhat / d;
    for (int64_t j = 0; j < l.per_group; ++j) {
      const double g = gamma[c0 + j];
      const float scale = static_cast<float>(rstd * g);
      const float shift = static_cast<float>(beta[c0 + j] - mean * rstd * g);
      // dx = a * dy' + b * x + c with dy' = dy * act'(scale x + shift), folded per channel
      const float a = static_cast<float>(rstd * g);
      const float b = static_cast<float>(-rstd * rstd * mean_gy_xhat);
      const float c = static_cast<float>(rstd * (rstd * mean_gy_xhat * mean - mean_gy));
      const float *px = x + ng * d + j * l.hw, *pdy = dy + ng * d + j * l.hw;
      float *pdx = dx + ng * d + j * l.hw;
#pragma omp simd
      for (int64_t i = 0; i < l.hw; ++i) {
        pdx[i] = a * act_grad<A>(px[i] * scale + shift, pdy[i], l.slope) + b * px[i] + c;
      }
    }
  });
  for (int64_t c = 0; c < l.c; ++c) {
    double dg = 0.0, db = 0.0;
    for (int64_t n = 0; n < l.n; ++n) {
      dg += sum_dy_xhat[n * l.c + c];
      db += sum_dy[n * l.c + c];
    }
    dgamma[c] = static_cast<float>(dg);
    dbeta[c] = static_cast<float>(db);
  }
}

}  // namespace

// inputs (x, gamma, beta, cfg), output y
extern "C" int gn_fwd(int nparam, void **params, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  Layout l;
  if (!float32_args(nparam, 5, dtypes) || !layout(shapes[0], static_cast<const float *>(params[3]), &l)) return 1;
  return with_act(l.act, [&](auto act) { forward<decltype(act)::value>(l, params); }) ? 0 : 1;
}

// inputs (x, dy, gamma, beta, cfg), outputs (dx, dgamma, dbeta)
extern "C" int gn_bwd(int nparam, void **params, int *, int64_t **shapes, const char **dtypes, void *, void *) {
  Layout l;
  if (!float32_args(nparam, 8, dtypes) || !layout(shapes[0], static_cast<const float *>(params[4]), &l)) return 1;
  return with_act(l.act, [&](auto act) { backward<decltype(act)::value>(l, params); }) ? 0 : 1;
}
