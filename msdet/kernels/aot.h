// Argument checks shared by the C++ kernels' MindSpore "aot" entry points, which receive every input and output
// as (pointer, rank, shape, dtype name) with nothing checked: an entry point returns 1 (MindSpore then stops with
// an error naming the library and function) instead of reading memory of another type or size.
#pragma once

#include <cstdint>
#include <cstring>

// exactly `expected` tensors (inputs and outputs), all float32
inline bool float32_args(int nparam, int expected, const char **dtypes) {
  if (nparam != expected) return false;
  for (int i = 0; i < expected; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return true;
}

inline int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}
