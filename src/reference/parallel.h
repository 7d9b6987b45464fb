// A minimal parallel loop for the host reference: items are claimed dynamically, so each item is
// computed by exactly one thread and results never depend on the thread count.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fp4moe::detail {

inline int resolve_threads(int threads) {
  if (threads > 0) return threads;
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

// Calls fn(i) for i in [0, n) on up to `threads` threads (0: hardware concurrency). The first
// exception thrown by any call is rethrown on the calling thread after all threads have stopped.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn&& fn) {
  const int64_t workers = std::min<int64_t>(resolve_threads(threads), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    try {
      for (int64_t i = next++; i < n && !failed; i = next++) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace fp4moe::detail
