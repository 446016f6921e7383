// Backward of the "cpu" backend:
//   dxa = dy B,  dB = s dy^T xa,  dx = dy W + s D(dxa A),  dA = s dxa^T D(x)
// in one pass over the rows of dy and x plus the base GEMM dy W. The mask is
// regenerated block by block from the seed; neither it nor D(x) is ever a
// (T, K) tensor.
#include <algorithm>
#include <memory>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "blocking.h"
#include "checks.h"
#include "elementwise.h"
#include "lora_cpu.h"
#include "packing.h"
#include "parallel_tasks.h"
#include "philox.h"
#include "rank_kernels.h"

namespace fused_lora {
namespace {

// NOTE: dA and dB are reductions over T: tasks are fixed chunks of rows, each
// with its own partials, capped so the partials stay within this many bytes.
constexpr int64_t kPartialsBytes = 64 << 20;

// Per-task partial sums of dB^T (r, N) or dA (r, K): (tasks, r, cols), each task's
// slice zeroed by the task itself (first touch by the thread that fills it).
template <typename acc_t, int Slot>
struct Partials {
  ThreadBuffer<acc_t, Slot> sums;
  int64_t size;  // elements per task
  bool needed;

  Partials(bool needed, int64_t tasks, int64_t rank, int64_t cols)
      : sums(needed ? tasks * rank * cols : 0), size(rank * cols), needed(needed) {}
  acc_t* of(int64_t task) const {
    if (!needed) {
      return nullptr;
    }
    acc_t* partial = sums.get() + task * size;
    std::fill(partial, partial + size, acc_t(0));
    return partial;
  }
};

// out(j, c) = scale * sum over tasks of partials(j, c), in task order, written into
// out (out_t) at out[j * stride_j + c * stride_c]; columns split over threads when large.
template <typename acc_t, int Slot>
void total_into(const Partials<acc_t, Slot>& partials, int64_t tasks, int64_t rank, int64_t cols,
                double scale, at::Tensor& out, int64_t stride_j, int64_t stride_c) {
  constexpr int64_t kColumnsPerTask = 512;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "sum_partials", [&] {
    scalar_t* out_data = out.data_ptr<scalar_t>();
    parallel_tasks(ceil_div(cols, kColumnsPerTask), kColumnsPerTask * rank * tasks, [] { return 0; },
                   [&](int64_t task, int) {
      const int64_t c_begin = task * kColumnsPerTask;
      const int64_t c_end = std::min(cols, c_begin + kColumnsPerTask);
      sum_partials(partials.sums.get(), tasks, rank, cols, c_begin, c_end,
                   static_cast<acc_t>(scale), out_data, stride_j, stride_c);
    });
  });
}

// One pass over the rows, one block of rows at a time (dy, x, their random
// values and D(x) stay in L2 between the steps):
//   dxa = dy B;  dB^T += xa^T dy;  dx = s D(dxa A) (the base GEMM adds dy W
//   afterwards);  dA += dxa^T D(x).
// The mask is generated once per block and serves dx and dA. dA and dB (already
// scaled, in the adapters' dtypes) are written into *dA and *dB.
template <typename scalar_t>
void backward_rows(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& xa,
                   const at::Tensor& lora_A, const at::Tensor& lora_B, at::Tensor* dx,
                   at::Tensor* dA, at::Tensor* dB, uint64_t seed, uint32_t threshold,
                   double dropout_p, double scaling) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t rows_total = dy.size(0);
  const int64_t out_features = dy.size(1);
  const int64_t in_features = lora_A.size(1);
  const int64_t rank = lora_A.size(0);
  const bool needs_dxa = dx != nullptr || dA != nullptr;
  const bool dropout = dropout_p > 0.0;
  const double keep_scale = 1.0 / (1.0 - dropout_p);
  const acc_t scale = static_cast<acc_t>(keep_scale);
  const acc_t dx_alpha = static_cast<acc_t>(scaling * keep_scale);
  // NOTE: without dropout an fp32/fp64 x feeds dA as it is, and fp32/fp64 dy
  // always: no copies.
  const bool x_direct = !dropout && kSameType;

  const int64_t partial_bytes =
      rank * ((dA != nullptr ? in_features : 0) + (dB != nullptr ? out_features : 0)) *
      static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_tasks = std::max<int64_t>(1, kPartialsBytes / std::max<int64_t>(partial_bytes, 1));
  const int64_t chunk_rows =
      ceil_div(rows_total, std::min(reduction_chunks(rows_total), max_tasks));
  const int64_t tasks = ceil_div(rows_total, chunk_rows);
  const int64_t block = rows_per_block(std::max(in_features, out_features), kBackwardBlockElements);
  const Partials<acc_t, 2> dA_partials(dA != nullptr, tasks, rank, in_features);
  const Partials<acc_t, 3> dB_partials(dB != nullptr, tasks, rank, out_features);
  // NOTE: A and B packed straight from the adapters (any strides and dtype): no
  // converted, transposed or contiguous copies as tensors.
  const ThreadBuffer<acc_t, 4> packed_A(dx != nullptr ? packed_panels_size(rank, in_features, sizeof(acc_t)) : 0);
  if (dx != nullptr) {
    pack_panels_from(lora_A, lora_A.stride(0), lora_A.stride(1), rank, in_features, acc_t(1),
                     packed_A.get());
  }
  const ThreadBuffer<acc_t, 5> packed_B(needs_dxa ? packed_transposed_size(rank, out_features, sizeof(acc_t)) : 0);
  if (needs_dxa) {  // dxa = dy B: m(j, k) = B[k, j]
    pack_transposed_from(lora_B, lora_B.stride(1), lora_B.stride(0), rank, out_features,
                         packed_B.get());
  }
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const int64_t dy_row_stride = dy.stride(0);
  const scalar_t* x_data = dA != nullptr ? x.const_data_ptr<scalar_t>() : nullptr;
  const int64_t x_row_stride = dA != nullptr ? x.stride(0) : 0;
  const acc_t* xa_data = xa.const_data_ptr<acc_t>();
  scalar_t* dx_data = dx != nullptr ? dx->data_ptr<scalar_t>() : nullptr;
  // Multiply-adds of a task: dB, dxa, dx and dA, r each per element of dy or x.
  const int64_t work_per_task =
      chunk_rows * rank *
      ((dB != nullptr ? out_features : 0) + (needs_dxa ? out_features : 0) +
       (dx != nullptr ? in_features : 0) + (dA != nullptr ? in_features : 0));

  struct Buffers {
    Scratch<acc_t> dy_converted, dxa, lora_input;
    Scratch<uint16_t> rnd;
  };
  parallel_tasks(tasks, work_per_task, [] { return Buffers(); }, [&](int64_t task, Buffers& buffers) {
    const int64_t task_begin = task * chunk_rows;
    const int64_t task_end = std::min(rows_total, task_begin + chunk_rows);
    acc_t* dA_partial = dA_partials.of(task);
    acc_t* dB_partial = dB_partials.of(task);
    const int64_t dy_buffer_ld = padded_ld<acc_t>(out_features);
    const int64_t input_ld = padded_ld<acc_t>(in_features);
    const int64_t task_block = std::min(block, task_end - task_begin);
    acc_t* dy_converted = kSameType ? nullptr : buffers.dy_converted.get(task_block * dy_buffer_ld);
    acc_t* dxa = needs_dxa ? buffers.dxa.get(task_block * rank) : nullptr;
    uint16_t* rnd = dropout && needs_dxa ? buffers.rnd.get(task_block * in_features) : nullptr;
    acc_t* lora_input =
        dA != nullptr && !x_direct ? buffers.lora_input.get(task_block * input_ld) : nullptr;

    for (int64_t row0 = task_begin; row0 < task_end; row0 += block) {
      const int64_t rows = std::min(block, task_end - row0);
      const acc_t* xa_block = xa_data + row0 * rank;
      const acc_t* dy_block = dy_converted;
      int64_t dy_ld = dy_buffer_ld;
      if constexpr (kSameType) {
        dy_block = dy_data + row0 * dy_row_stride;
        dy_ld = dy_row_stride;
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          convert_to_acc(dy_data + (row0 + i) * dy_row_stride, dy_converted + i * dy_buffer_ld,
                         out_features);
        }
      }
      if (dB_partial != nullptr) {
        outer_accumulate(xa_block, dy_block, dy_ld, rows, rank, out_features, dB_partial,
                         out_features);
      }
      if (!needs_dxa) {
        continue;
      }
      row_dots(dy_block, dy_ld, packed_B.get(), rows, rank, out_features, dxa);
      if (dropout) {
        // The block's rows are consecutive elements of the flattened (T, K) input.
        philox_uint16(seed, static_cast<uint64_t>(row0 * in_features), rows * in_features,
                      rnd);
      }
      if (dx_data != nullptr) {
        expand_masked_store(dxa, packed_A.get(), rows, rank, in_features,
                            dropout ? rnd : nullptr, in_features, threshold, dx_alpha,
                            dx_data + row0 * in_features, in_features);
      }
      if (dA_partial != nullptr) {
        const acc_t* input = lora_input;
        int64_t ld = input_ld;
        if constexpr (kSameType) {
          if (x_direct) {
            input = x_data + row0 * x_row_stride;
            ld = x_row_stride;
          }
        }
        if (!x_direct) {
          for (int64_t i = 0; i < rows; ++i) {
            const scalar_t* x_row = x_data + (row0 + i) * x_row_stride;
            acc_t* out = lora_input + i * input_ld;
            if (dropout) {
              dropout_to_acc(x_row, rnd + i * in_features, threshold, scale, out,
                             in_features);
            } else {
              convert_to_acc(x_row, out, in_features);
            }
          }
        }
        outer_accumulate(dxa, input, ld, rows, rank, in_features, dA_partial, in_features);
      }
    }
  });

  // dA (r, K) = s * sum of the dA partials; dB (N, r) = s * (sum of the dB^T partials)^T.
  if (dA != nullptr) {
    total_into(dA_partials, tasks, rank, in_features, scaling, *dA, dA->stride(0), dA->stride(1));
  }
  if (dB != nullptr) {
    total_into(dB_partials, tasks, rank, out_features, scaling, *dB, dB->stride(1), dB->stride(0));
  }
}

}  // namespace

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
lora_backward(const at::Tensor& dy_in, const std::optional<at::Tensor>& x_in,
              const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
              const at::Tensor& xa_in, double scaling, int64_t seed, int64_t threshold,
              double dropout_p, bool needs_dx, bool needs_dA, bool needs_dB) {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dense_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-D tensor (out_features, in_features), got shape ",
              weight.sizes());
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  const auto dtype = weight.scalar_type();
  const auto acc_dtype = accumulation_dtype(dtype);
  check_dense_cpu(dy_in, "dy");
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(1) == out_features,
              "dy: expected shape (T, ", out_features, "), got ", dy_in.sizes());
  check_dtype(dy_in, "dy", dtype, "(weight's dtype)");
  const int64_t rows = dy_in.size(0);
  check_dense_cpu(lora_A, "lora_A");
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == in_features,
              "lora_A: expected shape (r, ", in_features, ") with r >= 1, got ", lora_A.sizes());
  check_adapter_dtype(lora_A, "lora_A", dtype);
  const int64_t rank = lora_A.size(0);
  check_dense_cpu(lora_B, "lora_B");
  check_shape(lora_B, "lora_B", out_features, rank, "(out_features, r)");
  check_dtype(lora_B, "lora_B", lora_A.scalar_type(), "(lora_A's dtype)");
  check_dense_cpu(xa_in, "xa");
  check_shape(xa_in, "xa", rows, rank, "(T, r)");
  check_dtype(xa_in, "xa", acc_dtype, "(the accumulation dtype)");
  check_dropout(seed, threshold, dropout_p);
  at::Tensor x;
  if (needs_dA) {
    TORCH_CHECK(x_in.has_value(), "x: required when needs_dA is True");
    check_dense_cpu(*x_in, "x");
    check_shape(*x_in, "x", rows, in_features, "(T, in_features)");
    check_dtype(*x_in, "x", dtype, "(weight's dtype)");
    x = with_unit_column_stride(*x_in);
  }

  const at::Tensor dy = with_unit_column_stride(dy_in);
  const at::Tensor xa = xa_in.contiguous();
  at::Tensor dx = needs_dx ? at::empty({rows, in_features}, dy.options()) : at::Tensor();
  at::Tensor dA = needs_dA ? at::empty({rank, in_features}, lora_A.options()) : at::Tensor();
  at::Tensor dB = needs_dB ? at::empty({out_features, rank}, lora_B.options()) : at::Tensor();
  if (rows == 0) {  // nothing to reduce: zero gradients
    if (needs_dA) {
      dA.zero_();
    }
    if (needs_dB) {
      dB.zero_();
    }
  } else if (needs_dx || needs_dA || needs_dB) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lora_backward", [&] {
      backward_rows<scalar_t>(dy, x, xa, lora_A, lora_B, needs_dx ? &dx : nullptr,
                              needs_dA ? &dA : nullptr, needs_dB ? &dB : nullptr,
                              static_cast<uint64_t>(seed), static_cast<uint32_t>(threshold),
                              dropout_p, scaling);
    });
  }

  std::optional<at::Tensor> dx_out, dA_out, dB_out;
  if (needs_dx) {
    // NOTE: the base GEMM accumulates onto s D(dxa A) (beta = 1): no extra pass over dx.
    dx.addmm_(dy, weight);
    dx_out = dx;
  }
  if (needs_dA) {
    dA_out = dA;
  }
  if (needs_dB) {
    dB_out = dB;
  }
  return {dx_out, dA_out, dB_out};
}

}  // namespace fused_lora
