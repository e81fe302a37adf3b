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
// All three visit the same (tap, output row) pairs (for_each_tap_row); the forward and the input gradient share
// one loop nest (apply_kernel). Every (n, c) plane is independent: the planes are shared out over the CPU's
// threads (parallel_for, parallel.h; below ~2M multiply-adds, NanoDet's 3x3 convs at 128 px, one thread); the
// inner loops run along a row (SIMD).
// Padding: SAME = TensorFlow's "same" (pt = total / 2, the extra pixel at the bottom/right), else (K - 1) / 2 on
// every side.
// Entry points: the aot signature; the forward takes (x, w), the gradients (x, dy, w), then the output. x is
// read by the weight gradient and gives the input's shape to the input gradient.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot.h"
#include "parallel.h"

namespace {

constexpr int64_t kMacsPerThread = int64_t{1} << 21;

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

// The forward and the input gradient are one loop nest: the forward gathers y[row] += w * x[strided row]
// (SCATTER = false; src = x, dst = y), the input gradient scatters dx[strided row] += w * dy[row] (SCATTER = true;
// src = dy, dst = dx).
template <int K, int S, bool SCATTER>
void apply_kernel(const Geometry &g, const float *src, const float *w, float *dst) {
  const int64_t in_plane = g.h * g.w, out_plane = g.ho * g.wo;
  const int64_t src_plane = SCATTER ? out_plane : in_plane, dst_plane = SCATTER ? in_plane : out_plane;
  parallel_for(g.n * g.c, g.n * g.c * out_plane * K * K, kMacsPerThread, [&](int64_t nc) {
    const float *k = w + (nc % g.c) * K * K;
    const float *ps = src + nc * src_plane;
    float *pd = dst + nc * dst_plane;
    std::memset(pd, 0, sizeof(float) * dst_plane);
    for_each_tap_row<K, S>(g, [&](int64_t tap, int64_t xoff, int64_t yoff, int64_t ow0, int64_t ow1) {
      const float wk = k[tap];
      if (SCATTER) {
        const float *grow = ps + yoff;
        float *row = pd + xoff;
#pragma omp simd
        for (int64_t ow = ow0; ow < ow1; ++ow) row[ow * S] += wk * grow[ow];
      } else {
        const float *xrow = ps + xoff;
        float *yrow = pd + yoff;
#pragma omp simd
        for (int64_t ow = ow0; ow < ow1; ++ow) yrow[ow] += wk * xrow[ow * S];
      }
    });
  });
}

template <int K, int S, bool SAME>
int forward(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 3, dtypes)) return 1;
  apply_kernel<K, S, false>(geometry(shapes[0], shapes[2], K, S, SAME), static_cast<const float *>(params[0]),
                            static_cast<const float *>(params[1]), static_cast<float *>(params[2]));
  return 0;
}

template <int K, int S, bool SAME>
int grad_input(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 4, dtypes)) return 1;
  apply_kernel<K, S, true>(geometry(shapes[0], shapes[1], K, S, SAME), static_cast<const float *>(params[1]),
                           static_cast<const float *>(params[2]), static_cast<float *>(params[3]));
  return 0;
}

template <int K, int S, bool SAME>
int grad_weight(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 4, dtypes)) return 1;
  const Geometry g = geometry(shapes[0], shapes[1], K, S, SAME);
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dw = static_cast<float *>(params[3]);
  std::vector<float> part(g.n * g.c * K * K, 0.0f);  // per (n, c) sums, added over n in a fixed order below
  parallel_for(g.n * g.c, g.n * g.c * g.ho * g.wo * K * K, kMacsPerThread, [&](int64_t nc) {
    const float *px = x + nc * g.h * g.w;
    const float *gy = dy + nc * g.ho * g.wo;
    float *sums = part.data() + nc * K * K;
    for_each_tap_row<K, S>(g, [&](int64_t tap, int64_t xoff, int64_t yoff, int64_t ow0, int64_t ow1) {
      const float *xrow = px + xoff, *grow = gy + yoff;
      float acc = sums[tap];
#pragma omp simd reduction(+ : acc)
      for (int64_t ow = ow0; ow < ow1; ++ow) acc += grow[ow] * xrow[ow * S];
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
  extern "C" int dw_dx_##name(int nparam, void **params, int *, int64_t **shapes, const char **dtypes,   \
                              void *, void *) {                                                         \
    return grad_input<K, S, SAME>(nparam, params, shapes, dtypes);                                     \
  }                                                                                                     \
  extern "C" int dw_dw_##name(int nparam, void **params, int *, int64_t **shapes, const char **dtypes,   \
                              void *, void *) {                                                         \
    return grad_weight<K, S, SAME>(nparam, params, shapes, dtypes);                                    \
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
