// The CPU kernels' one way to use both cores: fn(i) for i in [0, count) on this thread and up to
// hardware_concurrency - 1 helpers, which take indices in small chunks from a shared counter, so a helper that the
// (shared, busy) machine schedules late gets less work instead of holding up the call. Below `min_work` units of
// work per thread (multiply-adds, values) one thread does it all: starting and joining a helper costs more than it
// saves there. Each fn(i) must touch only its own outputs: the result is then the same on any number of threads.
// Indices are taken `chunk` at a time (4; the dense conv's few large pieces take 1).
// Plain std::threads per call, not OpenMP: libgomp's workers busy-wait after each parallel region (OMP_WAIT_POLICY
// is read once, when MindSpore loads libgomp) and took the cores from MindSpore's own kernels: D0's step was 1.3x
// slower with OpenMP, 0.93x with OMP_WAIT_POLICY=passive (docs/performance.md).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

template <class Fn>
void parallel_for(int64_t count, int64_t work, int64_t min_work, Fn fn, int64_t chunk = 4) {
  const int64_t threads = std::min<int64_t>({std::max(1u, std::thread::hardware_concurrency()),
                                             count / chunk + 1, work / min_work + 1});
  std::atomic<int64_t> next{0};
  auto run = [&] {
    for (int64_t i = next.fetch_add(chunk); i < count; i = next.fetch_add(chunk)) {
      for (int64_t j = i; j < std::min(i + chunk, count); ++j) fn(j);
    }
  };
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(run);
  run();
  for (std::thread &h : helpers) h.join();
}
