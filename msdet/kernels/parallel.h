// The CPU kernels' one way to use every core: fn(i) for i in [0, count) on this thread and up to
// hardware_concurrency - 1 helpers, which take indices in small chunks from a shared counter, so a helper that the
// (shared, busy) machine schedules late gets less work instead of holding up the call. Below `min_work` units of
// work per thread (multiply-adds, values) one thread does it all: waking a helper costs more than it saves there.
// Each fn(i) must touch only its own outputs: the result is then the same on any number of threads.
// Indices are taken `chunk` at a time (4; the dense conv's few large pieces take 1).
//
// The helpers are a pool that lives across calls (one per kernel library): started lazily, the first time a call
// wants them, then asleep on a condition variable between calls; starting and joining std::threads on every call
// cost ~50-100 us a call. A call that finds the pool serving another call (MindSpore runs kernels on several
// threads at once), or that comes from inside a call, runs on its own thread alone: same result, no waiting.
// A child process forked while the pool exists gets a fresh one (pthread_atfork), started when it first needs it.
// Not OpenMP: libgomp's workers busy-wait after each parallel region (OMP_WAIT_POLICY is read once, when MindSpore
// loads libgomp) and took the cores from MindSpore's own kernels: D0's step was 1.3x slower with OpenMP, 0.93x
// with OMP_WAIT_POLICY=passive (docs/performance.md).
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace msdet_parallel {
namespace {  // one pool per kernel library: no symbol shared between libraries

class Pool {
 public:
  // body(ctx) on this thread and on up to `helpers` pool threads at once; returns when every one that took part
  // has returned. False (nothing run) when the pool is serving another call: the caller then runs body alone.
  bool run(int64_t helpers, void (*body)(void *), void *ctx) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    start(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = body;
      ctx_ = ctx;
      open_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    body(ctx);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      open_ = 0;  // a helper that wakes only now has nothing left to do: it does not join
      done_.wait(lock, [this] { return active_ == 0; });
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

  static Pool *&instance() {
    static Pool *pool = [] {
      pthread_atfork(nullptr, nullptr, [] { instance() = new Pool; });  // the old one's threads are gone
      return new Pool;  // never deleted: detached threads wait on it until the process ends
    }();
    return pool;
  }

 private:
  void start(int64_t helpers) {
    for (; started_ < helpers; ++started_) std::thread([this] { work(); }).detach();
  }

  void work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (open_ <= 0) continue;
      --open_;
      ++active_;
      void (*body)(void *) = body_;
      void *ctx = ctx_;
      lock.unlock();
      body(ctx);
      lock.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::atomic<bool> busy_{false};
  int64_t started_ = 0;  // only the caller that holds busy_ touches it
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  int64_t open_ = 0, active_ = 0;
  void (*body_)(void *) = nullptr;
  void *ctx_ = nullptr;
};

template <class F>
void call(void *f) {
  (*static_cast<F *>(f))();
}

}  // namespace
}  // namespace msdet_parallel

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
  if (threads <= 1 || !msdet_parallel::Pool::instance()->run(threads - 1, msdet_parallel::call<decltype(run)>, &run)) {
    run();
  }
}
