// The sum of squares of every element of many float32 tensors, as one MindSpore CPU "aot" Custom op: the global
// L2 norm of gradient clipping (torch.nn.utils.clip_grad_norm_) over all of a network's weight gradients.
//
// MindSpore runs the norm as Square and ReduceSum per weight tensor and one AddN: 920 kernels for D0's 460
// gradients, ~60 ms against ~8 ms for this one pass (docs/performance.md). Each tensor is summed in float (SIMD
// lanes, then across lanes), the tensors in double, in input order: deterministic.
// Entry point (the aot signature): sum_squares(g_1, ..., g_k) -> s, a 0-d float32.
#include <cstdint>
#include <cstring>

extern "C" int sum_squares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  if (nparam < 2 || std::strcmp(dtypes[nparam - 1], "float32") != 0) return 1;
  double total = 0.0;
  for (int k = 0; k < nparam - 1; ++k) {
    if (std::strcmp(dtypes[k], "float32") != 0) return 1;
    int64_t n = 1;
    for (int d = 0; d < ndims[k]; ++d) n *= shapes[k][d];
    const float *g = static_cast<const float *>(params[k]);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += g[i] * g[i];
    total += s;
  }
  *static_cast<float *>(params[nparam - 1]) = static_cast<float>(total);
  return 0;
}
