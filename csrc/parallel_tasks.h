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
// already loaded (one runtime, one team; tests/test_cpu_speed_paths.py checks it).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>

namespace fused_lora {

// Below this much work in all (multiply-adds, the callers' estimate) the tasks run
// on the calling thread: starting a parallel region costs microseconds, more than
// the whole op at tiny sizes.
// NOTE: on this project's 2-core machines, fwd+bwd at T = 64..1024, K = N = 64..1024,
// r = 16, p = 0.1 ran alike with this threshold and with none (within the machine's
// noise); running every size serially lost up to 30% at T = 1024.
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

// A buffer of `size` T for one use site (Slot) of the calling thread, reused by its
// later calls (contents undefined): no allocation, page faults or zero-fill per
// call. Buffers above kKeptBytes are allocated per call and freed.
// NOTE: buffers above glibc's mmap threshold (packed adapters, dA / dB partials of
// MBs) came back as fresh, kernel-zeroed pages on every call; kept per thread they
// are faulted in once. A use site must not be live twice on one thread at a time
// (the ops are not re-entrant).
constexpr int64_t kKeptBytes = 8 << 20;

template <typename T, int Slot>
class ThreadBuffer {
 public:
  explicit ThreadBuffer(int64_t size) {
    static thread_local Scratch<T> kept;
    if (size * static_cast<int64_t>(sizeof(T)) <= kKeptBytes) {
      data_ = kept.get(size);
    } else {
      owned_.reset(new T[size]);
      data_ = owned_.get();
    }
  }
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  std::unique_ptr<T[]> owned_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fused_lora
