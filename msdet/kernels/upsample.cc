// x2 bilinear upsampling with half-pixel centres (PyTorch's Upsample(scale_factor=2, mode="bilinear"),
// align_corners=False) over NCHW float32, and its gradient, for MindSpore's CPU "aot" Custom op.
//
// GhostPAN upsamples each top-down level. MindSpore's ResizeBilinearV2 gradient takes 10 ms a call on
// NanoDet-Plus's 320 px neck (8 x 96 x 20 x 20 -> 40 x 40), PyTorch's 2.3 (docs/performance.md).
// For scale 2 the weights are fixed: output 2i mixes inputs i - 1 and i (0.25, 0.75), output 2i + 1 inputs i and
// i + 1 (0.75, 0.25), the border input repeated. Rows first, then columns, each value computed as in
// msdet.models.ghostpan.upsample_bilinear2x (the inference and export form), so both give the same bits (built
// with -ffp-contract=off: no fused multiply-add, which aarch64 and the x86 FMA hosts would otherwise use).
//   up2_fwd(x) -> y [N, C, 2H, 2W]
//   up2_dx(dy) -> dx [N, C, H, W]: the adjoint, columns first, then rows:
//     dx_i = 0.25 dy_{2i-1} + 0.75 dy_{2i} + 0.75 dy_{2i+1} + 0.25 dy_{2i+2}, dy_{-1} read as dy_0, dy_{2n} as
//     dy_{2n-1} (the border input's repeat).
#include <cstdint>
#include <vector>

#include "aot.h"
#include "parallel.h"

namespace {

constexpr int64_t kValuesPerThread = int64_t{1} << 17;  // planes over the threads above (parallel.h)

// One line of n values at stride `in_step` -> 2n values at stride `out_step`.
inline void up_line(const float *x, int64_t n, int64_t in_step, float *y, int64_t out_step) {
  for (int64_t i = 0; i < n; ++i) {
    const float prev = x[(i > 0 ? i - 1 : 0) * in_step], mid = x[i * in_step];
    const float next = x[(i + 1 < n ? i + 1 : n - 1) * in_step];
    y[2 * i * out_step] = prev * 0.25f + mid * 0.75f;
    y[(2 * i + 1) * out_step] = mid * 0.75f + next * 0.25f;
  }
}

// The adjoint of up_line: 2n values -> n.
inline void down_line(const float *dy, int64_t n, int64_t in_step, float *dx, int64_t out_step) {
  const int64_t last = 2 * n - 1;
  for (int64_t i = 0; i < n; ++i) {
    const float before = dy[(i > 0 ? 2 * i - 1 : 0) * in_step], after = dy[(i + 1 < n ? 2 * i + 2 : last) * in_step];
    dx[i * out_step] = before * 0.25f + dy[2 * i * in_step] * 0.75f + dy[(2 * i + 1) * in_step] * 0.75f +
                       after * 0.25f;
  }
}

// x [h, w] -> y [2h, 2w]: rows into t [2h, w], then each row of t along its columns.
void forward_plane(const float *x, int64_t h, int64_t w, float *y) {
  thread_local std::vector<float> t;
  t.resize(2 * h * w);
  for (int64_t j = 0; j < w; ++j) up_line(x + j, h, w, t.data() + j, w);
  for (int64_t r = 0; r < 2 * h; ++r) up_line(t.data() + r * w, w, 1, y + r * 2 * w, 1);
}

// dy [2h, 2w] -> dx [h, w]: the column adjoint into t [2h, w], then the row adjoint.
void grad_plane(const float *dy, int64_t h, int64_t w, float *dx) {
  thread_local std::vector<float> t;
  t.resize(2 * h * w);
  for (int64_t r = 0; r < 2 * h; ++r) down_line(dy + r * 2 * w, w, 1, t.data() + r * w, 1);
  for (int64_t j = 0; j < w; ++j) down_line(t.data() + j, h, w, dx + j, w);
}

// N * C planes of h x w (`small`, 4-D) against planes of 2h x 2w (`large`, 4-D): false where they do not pair.
bool paired(int *ndims, int64_t **shapes, int small, int large, int64_t *planes, int64_t *h, int64_t *w) {
  if (ndims[small] != 4 || ndims[large] != 4) return false;
  const int64_t *s = shapes[small], *l = shapes[large];
  *planes = s[0] * s[1], *h = s[2], *w = s[3];
  return l[0] * l[1] == *planes && l[2] == 2 * *h && l[3] == 2 * *w;
}

}  // namespace

extern "C" int up2_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                       void *) {
  int64_t planes, h, w;
  if (!float32_args(nparam, 2, dtypes) || !paired(ndims, shapes, 0, 1, &planes, &h, &w)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  parallel_for(planes, planes * 4 * h * w, kValuesPerThread,
               [&](int64_t p) { forward_plane(x + p * h * w, h, w, y + p * 4 * h * w); });
  return 0;
}

extern "C" int up2_dx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                      void *) {
  int64_t planes, h, w;
  if (!float32_args(nparam, 2, dtypes) || !paired(ndims, shapes, 1, 0, &planes, &h, &w)) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  float *dx = static_cast<float *>(params[1]);
  parallel_for(planes, planes * 4 * h * w, kValuesPerThread,
               [&](int64_t p) { grad_plane(dy + p * 4 * h * w, h, w, dx + p * h * w); });
  return 0;
}
