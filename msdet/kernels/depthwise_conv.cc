// A depthwise K x K convolution (K = 3 or 5; NCHW, float32, no bias) and its two gradients, for MindSpore's CPU
// "aot" Custom op.
//
// MindSpore 2.8's CPU kernels for the 3x3 case are ~12x slower than PyTorch's, and its 5x5 ones take ~2x the
// time of these too (docs/performance.md). With y = conv(x, w), stride s and the top/left padding (pt, pl):
//   y[n,c,oh,ow]  = sum_{kh,kw} w[c,kh,kw] * x[n,c, oh*s - pt + kh, ow*s - pl + kw]
//   dx[n,c,i,j]   = sum_{kh,kw} w[c,kh,kw] * dy[n,c,oh,ow]  over (oh, ow) with oh*s - pt + kh = i, ow*s - pl + kw = j
//                   (for s = 1: the full correlation of dy with the flipped kernel), written here as a scatter;
//   dw[c,kh,kw]   = sum_{n,oh,ow} dy[n,c,oh,ow] * x[n,c, oh*s - pt + kh, ow*s - pl + kw]
//                   (the correlation of x with dy, per channel, summed over the batch).
// All three visit the same (tap, output row) pairs (for_each_tap_row); the two gradients in one loop, which reads
// dy once for both (one op with two outputs: a kernel fewer per conv). Every (n, c) plane is independent: the
// planes are shared out over the CPU's threads (parallel_for, parallel.h; below 512K multiply-adds one thread); the
// inner loops run along a row (SIMD).
// Padding: SAME = TensorFlow's "same" (pt = total / 2, the extra pixel at the bottom/right), else (K - 1) / 2 on
// every side.
// Entry points: the aot signature; dw_fwd(x, w) -> y, dw_bwd(x, dy, w) -> dx, dw.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot.h"
#include "parallel.h"

namespace {

constexpr int64_t kMacsPerThread = int64_t{1} << 18;

struct Geometry {
  int64_t n, c, h, w, ho, wo, pt, pl;
};

int64_t pad_before(int64_t in, int64_t out, int64_t k, int64_t stride, bool same) {
  return same ? std::max<int64_t>((out - 1) * stride + k - in, 0) / 2 : (k - 1) / 2;
}

// x: the input's shape, y: the output's (or its gradient's).
Geometry geometry(const int64_t *x, const int64_t *y, int64_t k, int64_t stride, bool same) {
  Geometry g{x[0], x[1], x[2], x[3], y[2], y[3], 0, 0};
  g.pt = pad_before(g.h, g.ho, k, stride, same);
  g.pl = pad_before(g.w, g.wo, k, stride, same);
  return g;
}

// Output indices o in [*lo, *hi) whose input index o*s - p + k lies in [0, in).
void valid(int64_t in, int64_t out, int64_t s, int64_t p, int64_t k, int64_t *lo, int64_t *hi) {
  const int64_t a = p - k, b = in - 1 + p - k;
  *lo = a > 0 ? (a + s - 1) / s : 0;
  *hi = b < 0 ? 0 : std::min(out, b / s + 1);
}

// fn(tap, xoff, yoff, ow0, ow1) for every kernel tap (kh, kw) and every output row oh it reaches: output
// columns [ow0, ow1) of the row at plane offset yoff = oh * wo read the input at xoff + ow * S.
template <int K, int S, class Fn>
void for_each_tap_row(const Geometry &g, Fn fn) {
  for (int64_t kh = 0; kh < K; ++kh) {
    int64_t oh0, oh1;
    valid(g.h, g.ho, S, g.pt, kh, &oh0, &oh1);
    for (int64_t kw = 0; kw < K; ++kw) {
      int64_t ow0, ow1;
      valid(g.w, g.wo, S, g.pl, kw, &ow0, &ow1);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        fn(kh * K + kw, (oh * S - g.pt + kh) * g.w + kw - g.pl, oh * g.wo, ow0, ow1);
      }
    }
  }
}

// The forward gathers y[row] += w * x[strided row].
template <int K, int S, bool SAME>
int forward(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 3, dtypes)) return 1;
  const Geometry g = geometry(shapes[0], shapes[2], K, S, SAME);
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t in_plane = g.h * g.w, out_plane = g.ho * g.wo;
  parallel_for(g.n * g.c, g.n * g.c * out_plane * K * K, kMacsPerThread, [&](int64_t nc) {
    const float *k = w + (nc % g.c) * K * K;
    const float *px = x + nc * in_plane;
    float *py = y + nc * out_plane;
    std::memset(py, 0, sizeof(float) * out_plane);
    for_each_tap_row<K, S>(g, [&](int64_t tap, int64_t xoff, int64_t yoff, int64_t ow0, int64_t ow1) {
      const float wk = k[tap];
      const float *xrow = px + xoff;
      float *yrow = py + yoff;
#pragma omp simd
      for (int64_t ow = ow0; ow < ow1; ++ow) yrow[ow] += wk * xrow[ow * S];
    });
  });
  return 0;
}

// Both gradients in one visit of each plane: the input gradient scatters dx[strided row] += w * dy[row], and the
// tap's sum of dy * x accumulates per (n, c); those sums are added over n in a fixed order below (the same result
// on any number of threads).
template <int K, int S, bool SAME>
int backward(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 5, dtypes)) return 1;
  const Geometry g = geometry(shapes[0], shapes[1], K, S, SAME);
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]), *dw = static_cast<float *>(params[4]);
  const int64_t in_plane = g.h * g.w, out_plane = g.ho * g.wo;
  std::vector<float> part(g.n * g.c * K * K, 0.0f);  // per (n, c) sums
  parallel_for(g.n * g.c, 2 * g.n * g.c * out_plane * K * K, kMacsPerThread, [&](int64_t nc) {
    const float *k = w + (nc % g.c) * K * K;
    const float *px = x + nc * in_plane, *gy = dy + nc * out_plane;
    float *pdx = dx + nc * in_plane, *sums = part.data() + nc * K * K;
    std::memset(pdx, 0, sizeof(float) * in_plane);
    for_each_tap_row<K, S>(g, [&](int64_t tap, int64_t xoff, int64_t yoff, int64_t ow0, int64_t ow1) {
      const float wk = k[tap];
      const float *grow = gy + yoff, *xrow = px + xoff;
      float *dxrow = pdx + xoff;
      float acc = sums[tap];
#pragma omp simd reduction(+ : acc)
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        dxrow[ow * S] += wk * grow[ow];
        acc += grow[ow] * xrow[ow * S];
      }
      sums[tap] = acc;
    });
  });
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t j = 0; j < K * K; ++j) {
      float sum = 0.0f;
      for (int64_t n = 0; n < g.n; ++n) sum += part[(n * g.c + c) * K * K + j];
      dw[c * K * K + j] = sum;
    }
  }
  return 0;
}

}  // namespace

#define MSDET_DWCONV(name, K, S, SAME)                                                                    \
  extern "C" int dw_fwd_##name(int nparam, void **params, int *, int64_t **shapes, const char **dtypes,  \
                               void *, void *) {                                                        \
    return forward<K, S, SAME>(nparam, params, shapes, dtypes);                                         \
  }                                                                                                     \
  extern "C" int dw_bwd_##name(int nparam, void **params, int *, int64_t **shapes, const char **dtypes,  \
                               void *, void *) {                                                        \
    return backward<K, S, SAME>(nparam, params, shapes, dtypes);                                        \
  }

// k{K}_s{stride}_{same: TF "same" padding | half: (K - 1) / 2 on every side}
MSDET_DWCONV(k3_s1_same, 3, 1, true)
MSDET_DWCONV(k3_s2_same, 3, 2, true)
MSDET_DWCONV(k3_s1_half, 3, 1, false)
MSDET_DWCONV(k3_s2_half, 3, 2, false)
MSDET_DWCONV(k5_s1_same, 5, 1, true)
MSDET_DWCONV(k5_s2_same, 5, 2, true)
MSDET_DWCONV(k5_s1_half, 5, 1, false)
MSDET_DWCONV(k5_s2_half, 5, 2, false)
