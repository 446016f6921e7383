// Block sizes of the fused loops. They depend on the shapes only (never on the
// thread count), which is what makes results bit-identical across thread counts.
#pragma once

#include <algorithm>
#include <cstdint>

#include "parallel_tasks.h"

namespace fused_lora {

// NOTE: blocks are sized so a block's scratch (D(x) and its random values, or
// a block of dy) stays in L2 while the rank-r kernels read it back.
constexpr int64_t kScratchElements = 32 * 1024;

// Rows per block of a loop that streams whole rows of `cols` elements.
inline int64_t rows_per_block(int64_t cols, int64_t scratch_elements = kScratchElements,
                              int64_t max_rows = 256) {
  return std::clamp<int64_t>(scratch_elements / std::max<int64_t>(cols, 1), 1, max_rows);
}

// Leading dimension of a scratch block of rows: one cache line more than the
// row, so rows 2^k elements long do not all fall into the same L1 sets.
// NOTE: measured on outer_accumulate with K = 2048: 25% faster than ld = K.
template <typename T>
constexpr int64_t padded_ld(int64_t cols) {
  return cols + 64 / static_cast<int64_t>(sizeof(T));
}

// The backward's blocks of rows: dy, x, their random values and D(x) of a block.
constexpr int64_t kBackwardBlockElements = 64 * 1024;

// The dA / dB reductions over T: at most kMaxReductionChunks chunks of rows,
// each with its own partial sums, summed in chunk order.
constexpr int64_t kMaxReductionChunks = 32;
constexpr int64_t kMinChunkRows = 256;

inline int64_t reduction_chunks(int64_t rows) {
  return std::clamp<int64_t>(ceil_div(rows, kMinChunkRows), 1, kMaxReductionChunks);
}

}  // namespace fused_lora
