// Deterministic parallelism: a fixed list of tasks, each computed whole by one thread.
//
// Every block boundary in this backend depends on the tensor shapes only, never
// on the number of threads, and every reduction across tasks is summed
// afterwards in task order. A task's arithmetic is then the same whichever
// thread runs it, so results are bit-identical for any torch.set_num_threads.
// (Tasks call only this backend's own kernels, never a threaded BLAS.)
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace fused_lora {

// task(t, scratch) for t in [0, num_tasks); scratch = make_scratch() is made
// once per thread's run of tasks and reused by them.
// NOTE: per-task allocations of L2-sized scratch went to mmap/munmap and
// page-faulted on every task (+40% on the dropout shrink).
template <typename MakeScratch, typename F>
void parallel_tasks(int64_t num_tasks, const MakeScratch& make_scratch, const F& task) {
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t t = begin; t < end; ++t) {
      task(t, scratch);
    }
  });
}

// A growable scratch buffer (contents undefined between uses).
template <typename T>
class Scratch {
 public:
  T* get(int64_t size) {
    if (static_cast<int64_t>(data_.size()) < size) {
      data_.resize(size);
    }
    return data_.data();
  }

 private:
  std::vector<T> data_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fused_lora
