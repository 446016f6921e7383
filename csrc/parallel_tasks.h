// Deterministic parallelism: a fixed list of tasks, each computed whole by one thread.
//
// Every block boundary in this backend depends on the tensor shapes only, never
// on the number of threads, and every reduction across tasks is summed
// afterwards in task order. A task's arithmetic is then the same whichever
// thread runs it, so results are bit-identical for any torch.set_num_threads.
// (Tasks call only this backend's own kernels, never a threaded BLAS.)
//
// Threads: ATen's own pool (at::parallel_for, the OpenMP runtime torch loaded),
// never a second one: the extension's libgomp.so.1 resolves to the copy torch
// already loaded (one runtime, one team; bench/omp_check.py shows it).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>

namespace fused_lora {

// Below this much work in all (multiply-adds, the callers' estimate) the tasks run
// on the calling thread: starting a parallel region costs microseconds, more than
// the whole op at tiny sizes.
// NOTE: measured on 2 cores (bench/cpu_pieces.py --small): the shrink and backward
// of T x 64 x 64, r = 4 broke even with 2 threads at about this size.
constexpr int64_t kMinParallelWork = 1 << 18;

// task(t, scratch) for t in [0, num_tasks); scratch = make_scratch() is made
// once per thread's run of tasks and reused by them. work_per_task: multiply-adds
// of one task, for the serial threshold.
// NOTE: per-task allocations of L2-sized scratch went to mmap/munmap and
// page-faulted on every task (+40% on the dropout shrink).
template <typename MakeScratch, typename F>
void parallel_tasks(int64_t num_tasks, int64_t work_per_task, const MakeScratch& make_scratch,
                    const F& task) {
  if (num_tasks <= 0) {
    return;
  }
  if (num_tasks == 1 || num_tasks * work_per_task < kMinParallelWork ||
      at::get_num_threads() == 1) {
    auto scratch = make_scratch();
    for (int64_t t = 0; t < num_tasks; ++t) {
      task(t, scratch);
    }
    return;
  }
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t t = begin; t < end; ++t) {
      task(t, scratch);
    }
  });
}

// A growable scratch buffer (contents undefined between uses; never zero-filled).
template <typename T>
class Scratch {
 public:
  T* get(int64_t size) {
    if (size_ < size) {
      data_.reset(new T[size]);
      size_ = size;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  int64_t size_ = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fused_lora
