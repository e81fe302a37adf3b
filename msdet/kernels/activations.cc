// Activations for MindSpore's CPU "aot" Custom op, float32, with their gradients: swish (SiLU, x * sigmoid(x)),
// LeakyReLU, and EfficientNet's squeeze-and-excitation (SE) mean and gate, x * sigmoid(s) with s one value per
// channel.
//
// MindSpore 2.8 on CPU runs swish as Sigmoid + Mul and its gradient as two Muls, SigmoidGrad and AddN: five
// kernels over the tensor where one pass does it. In EfficientDet-D0's training step that cost ~80 ms more than a
// ReLU in the same places (docs/performance.md). Formulas (Ramachandran et al. 2017; torch.nn.SiLU's backward):
//   s = 1 / (1 + exp(-x)),  y = x * s,  dx = dy * s * (1 + x * (1 - s))
// exp is exp_nonpositive below, vectorised (SIMD), where std::exp would be a scalar library call per element.
// 0.5 ns per element and thread with AVX-512 (D0's largest swish input, 8 x 96 x 32 x 32, in ~0.4 ms on one);
// the element-wise kernels share chunks of 64K elements out over the threads above 256K (parallel_for,
// parallel.h): element by element, the same result on any number of threads.
// Built with -fno-trapping-math (else GCC will not vectorise the clamp and the sign select) and -ffp-contract=off
// (no fused multiply-adds, so the SSE2, AVX2 and AVX-512 copies give the same bits): msdet/kernels/activations.py.
//
// The SE block (Hu et al. 2018, as EfficientNet's MBConv): m = mean over H, W of x [N, C, H, W]; s = a function of
// m ([N, C, 1, 1], MindSpore ops); y = x * sigmoid(s). MindSpore runs the mean and its gradient as ReduceMean,
// Tile and RealDiv, and the gate as a broadcasting Mul whose gradients are Muls and a ReduceSum: ~75 ms of D0's
// step for 16 blocks (docs/performance.md). Gradients: dx = dm / (H W) (mean); dx = dy * sigmoid(s),
// ds = sigmoid(s) (1 - sigmoid(s)) sum_{h,w} dy * x (gate).
//
// LeakyReLU (NanoDet-Plus, slope 0.1): y = x > 0 ? x : slope * x, dx = x > 0 ? dy : slope * dy, PyTorch's
// definition to the bit. MindSpore lowers it to Maximum(slope * x, x) (gradient: two Selects) or, written as
// relu(x) - slope * relu(-x), to five kernels forward and backward (docs/performance.md).
// Entry points (the aot signature): swish_fwd(x) -> y; swish_dx(x, dy) -> dx; leaky_relu(x, slope) -> y;
// leaky_relu_dx(x, dy, slope) -> dx (slope: a [1] float32 tensor); se_mean(x) -> m;
// se_mean_dx(x, dm) -> dx; se_gate(x, s) -> y; se_gate_dx(s, dy) -> dx; se_gate_ds(x, s, dy) -> ds.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "aot.h"
#include "isa.h"
#include "parallel.h"
#include "reduce.h"
#include "activation.h"

namespace {

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// One copy per instruction set, picked at load time for the CPU (GCC target_clones): 16 float lanes with AVX-512,
// 8 with AVX2, 4 otherwise. The element-wise ones work on [begin, end) of their arrays.
MSDET_CLONES
void swish_range(const float *x, float *y, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) y[i] = x[i] * sigmoid(x[i]);
}

MSDET_CLONES
void swish_grad_range(const float *x, const float *dy, float *dx, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float s = sigmoid(x[i]);
    dx[i] = dy[i] * s * (1.0f + x[i] * (1.0f - s));
  }
}

MSDET_CLONES
void leaky_range(const float *x, float slope, float *y, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) y[i] = x[i] > 0.0f ? x[i] : slope * x[i];
}

MSDET_CLONES
void leaky_grad_range(const float *x, const float *dy, float slope, float *dx, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) dx[i] = x[i] > 0.0f ? dy[i] : slope * dy[i];
}

// fn(begin, end) over [0, n) in chunks, on the threads of parallel_for
template <class Fn>
void for_each_chunk(int64_t n, Fn fn) {
  constexpr int64_t kChunk = int64_t{1} << 16, kValuesPerThread = int64_t{1} << 17;
  parallel_for((n + kChunk - 1) / kChunk, n, kValuesPerThread,
               [&](int64_t k) { fn(k * kChunk, std::min(n, (k + 1) * kChunk)); });
}

int forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 2, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for_each_chunk(numel(ndims[0], shapes[0]), [&](int64_t b, int64_t e) { swish_range(x, y, b, e); });
  return 0;
}

int grad_input(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 3, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  for_each_chunk(numel(ndims[0], shapes[0]), [&](int64_t b, int64_t e) { swish_grad_range(x, dy, dx, b, e); });
  return 0;
}

int leaky_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 3, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float slope = *static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  for_each_chunk(numel(ndims[0], shapes[0]), [&](int64_t b, int64_t e) { leaky_range(x, slope, y, b, e); });
  return 0;
}

int leaky_grad_input(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (!float32_args(nparam, 4, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  const float slope = *static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  for_each_chunk(numel(ndims[0], shapes[0]),
                 [&](int64_t b, int64_t e) { leaky_grad_range(x, dy, slope, dx, b, e); });
  return 0;
}

// N * C planes of H * W values (x), or false when s (if given) is not one value per plane
bool planes(int ndim, const int64_t *x, int64_t *count, int64_t *hw, int sdim = 0, const int64_t *s = nullptr) {
  if (ndim != 4) return false;
  *count = x[0] * x[1];
  *hw = x[2] * x[3];
  return s == nullptr || numel(sdim, s) == *count;
}

MSDET_CLONES
int se_mean_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t count, hw;
  if (!float32_args(nparam, 2, dtypes) || !planes(ndims[0], shapes[0], &count, &hw)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *m = static_cast<float *>(params[1]);
  for (int64_t p = 0; p < count; ++p) m[p] = plane_sum(x + p * hw, hw) / static_cast<float>(hw);
  return 0;
}

MSDET_CLONES
int se_mean_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t count, hw;
  if (!float32_args(nparam, 3, dtypes) || !planes(ndims[0], shapes[0], &count, &hw, ndims[1], shapes[1])) return 1;
  const float *dm = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  for (int64_t p = 0; p < count; ++p) {
    const float g = dm[p] / static_cast<float>(hw);
    float *q = dx + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) q[i] = g;
  }
  return 0;
}

MSDET_CLONES
int se_gate_forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t count, hw;
  if (!float32_args(nparam, 3, dtypes) || !planes(ndims[0], shapes[0], &count, &hw, ndims[1], shapes[1])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *s = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  for (int64_t p = 0; p < count; ++p) {
    const float g = sigmoid(s[p]);
    const float *q = x + p * hw;
    float *o = y + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) o[i] = q[i] * g;
  }
  return 0;
}

// inputs (s, dy): dx = dy * sigmoid(s)
MSDET_CLONES
int se_gate_grad_input(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t count, hw;
  if (!float32_args(nparam, 3, dtypes) || !planes(ndims[1], shapes[1], &count, &hw, ndims[0], shapes[0])) return 1;
  const float *s = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  for (int64_t p = 0; p < count; ++p) {
    const float g = sigmoid(s[p]);
    const float *q = dy + p * hw;
    float *o = dx + p * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) o[i] = q[i] * g;
  }
  return 0;
}

// inputs (x, s, dy): ds = sigmoid(s) (1 - sigmoid(s)) sum_{h,w} dy * x
MSDET_CLONES
int se_gate_grad_gate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  int64_t count, hw;
  if (!float32_args(nparam, 4, dtypes) || !planes(ndims[0], shapes[0], &count, &hw, ndims[1], shapes[1])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *s = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *ds = static_cast<float *>(params[3]);
  for (int64_t p = 0; p < count; ++p) {
    const float *q = x + p * hw, *d = dy + p * hw;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hw; ++i) dot += d[i] * q[i];
    const float g = sigmoid(s[p]);
    ds[p] = g * (1.0f - g) * dot;
  }
  return 0;
}

}  // namespace

extern "C" int swish_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  return forward(nparam, params, ndims, shapes, dtypes);
}

extern "C" int swish_dx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                        void *) {
  return grad_input(nparam, params, ndims, shapes, dtypes);
}

extern "C" int leaky_relu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  return leaky_forward(nparam, params, ndims, shapes, dtypes);
}

extern "C" int leaky_relu_dx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *) {
  return leaky_grad_input(nparam, params, ndims, shapes, dtypes);
}

extern "C" int se_mean(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return se_mean_forward(nparam, params, ndims, shapes, dtypes);
}

extern "C" int se_mean_dx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  return se_mean_grad(nparam, params, ndims, shapes, dtypes);
}

extern "C" int se_gate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return se_gate_forward(nparam, params, ndims, shapes, dtypes);
}

extern "C" int se_gate_dx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  return se_gate_grad_input(nparam, params, ndims, shapes, dtypes);
}

extern "C" int se_gate_ds(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                          void *) {
  return se_gate_grad_gate(nparam, params, ndims, shapes, dtypes);
}
