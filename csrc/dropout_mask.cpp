// The dropout mask itself, for fused_lora.dropout_mask and the tests.
#include <algorithm>

#include <ATen/ops/empty.h>

#include "checks.h"
#include "elementwise.h"
#include "lora_cpu.h"
#include "parallel_tasks.h"
#include "philox.h"

namespace fused_lora {
namespace {
constexpr int64_t kMaskChunk = 64 * 1024;  // elements per task
// NOTE: one element's Philox share costs about as much as 16 multiply-adds (the
// unit of parallel_tasks' serial threshold).
constexpr int64_t kMaskChunkWork = 16 * kMaskChunk;
}  // namespace

at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, int64_t threshold) {
  check_dropout(seed, threshold, 0.0);
  TORCH_CHECK(rows >= 0 && cols >= 0, "keep_mask: expected rows >= 0 and cols >= 0, got (", rows,
              ", ", cols, ")");
  auto mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  const int64_t total = rows * cols;
  bool* out = mask.data_ptr<bool>();
  parallel_tasks(ceil_div(total, kMaskChunk), kMaskChunkWork, [] { return Scratch<uint16_t>(); },
                 [&](int64_t task, Scratch<uint16_t>& scratch) {
    const int64_t start = task * kMaskChunk;
    const int64_t count = std::min(kMaskChunk, total - start);
    uint16_t* rnd = scratch.get(count);
    philox_uint16(static_cast<uint64_t>(seed), static_cast<uint64_t>(start), count, rnd);
    threshold_to_bool(rnd, static_cast<uint32_t>(threshold), out + start, count);
  });
  return mask;
}

at::Tensor random_uint16(int64_t seed, int64_t start, int64_t count) {
  TORCH_CHECK(seed >= 0, "seed: expected an int in [0, 2**63), got ", seed);
  TORCH_CHECK(start >= 0 && count >= 0, "random_uint16: expected start >= 0 and count >= 0, got ",
              start, " and ", count);
  auto values = at::empty({count}, at::TensorOptions().dtype(at::kInt));
  int32_t* out = values.data_ptr<int32_t>();
  parallel_tasks(ceil_div(count, kMaskChunk), kMaskChunkWork, [] { return Scratch<uint16_t>(); },
                 [&](int64_t task, Scratch<uint16_t>& scratch) {
    const int64_t offset = task * kMaskChunk;
    const int64_t n = std::min(kMaskChunk, count - offset);
    uint16_t* rnd = scratch.get(n);
    philox_uint16(static_cast<uint64_t>(seed), static_cast<uint64_t>(start + offset), n, rnd);
    for (int64_t k = 0; k < n; ++k) {
      out[offset + k] = rnd[k];
    }
  });
  return values;
}

}  // namespace fused_lora
