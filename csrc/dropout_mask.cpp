// The dropout mask itself (fused_lora.dropout_mask, the tests), and D(x) materialised
// for the ATen path of the cpu backend (fused_lora/ops/cpu_ops.py).
#include <algorithm>

#include <ATen/ops/empty.h>

#include <ATen/Dispatch.h>

#include "blocking.h"
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

at::Tensor dropout(const at::Tensor& x_in, int64_t seed, int64_t threshold, double dropout_p,
                   double scale) {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dense_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x: expected a 2-D tensor (T, K), got shape ", x_in.sizes());
  check_dropout(seed, threshold, dropout_p);
  const at::Tensor x = with_unit_column_stride(x_in);
  const int64_t rows_total = x.size(0);
  const int64_t cols = x.size(1);
  at::Tensor out = at::empty({rows_total, cols}, x.options().dtype(accumulation_dtype(x.scalar_type())));
  const int64_t block = rows_per_block(cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const int64_t x_row_stride = x.stride(0);
    acc_t* out_data = out.data_ptr<acc_t>();
    const acc_t keep_scale = static_cast<acc_t>(scale);
    parallel_tasks(ceil_div(rows_total, block), 16 * block * cols, [] { return Scratch<uint16_t>(); },
                   [&](int64_t task, Scratch<uint16_t>& scratch) {
      const int64_t row0 = task * block;
      const int64_t rows = std::min(block, rows_total - row0);
      uint16_t* rnd = scratch.get(rows * cols);
      // The block's rows are consecutive elements of the flattened (T, K) input.
      philox_uint16(static_cast<uint64_t>(seed), static_cast<uint64_t>(row0 * cols), rows * cols,
                    rnd);
      for (int64_t i = 0; i < rows; ++i) {
        dropout_to_acc(x_data + (row0 + i) * x_row_stride, rnd + i * cols,
                       static_cast<uint32_t>(threshold), keep_scale, out_data + (row0 + i) * cols,
                       cols);
      }
    });
  });
  return out;
}

}  // namespace fused_lora
