// Backward of the "cpu" backend:
//   dxa = dy B,  dB = s dy^T xa,  dx = dy W + s D(dxa A),  dA = s dxa^T D(x)
// in one pass over the rows of dy and x plus the base GEMM dy W. The mask is
// regenerated block by block from the seed; neither it nor D(x) is ever a
// (T, K) tensor.
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "blocking.h"
#include "checks.h"
#include "elementwise.h"
#include "lora_cpu.h"
#include "philox.h"
#include "rank_kernels.h"

namespace fused_lora {
namespace {

// Per-task partial sums of dB^T (r, N) and dA (r, K), summed in task order.
template <typename acc_t>
struct Partials {
  at::Tensor sums;  // (tasks, r, cols), zeros

  Partials(bool needed, int64_t tasks, int64_t rank, int64_t cols, const at::TensorOptions& options)
      : sums(needed ? at::zeros({tasks, rank, cols}, options) : at::Tensor()) {}
  acc_t* of(int64_t task) {
    return sums.defined() ? sums.data_ptr<acc_t>() + task * sums.size(1) * sums.size(2) : nullptr;
  }
  at::Tensor total() const {
    at::Tensor out = sums.select(0, 0).clone();
    for (int64_t task = 1; task < sums.size(0); ++task) {
      out.add_(sums.select(0, task));
    }
    return out;
  }
};

// NOTE: dA and dB are reductions over T: tasks are fixed chunks of rows, each
// with its own partials, capped so the partials stay within this many bytes.
constexpr int64_t kPartialsBytes = 64 << 20;

// One pass over the rows, one block of rows at a time (dy, x, their random
// values and D(x) stay in L2 between the steps):
//   dxa = dy B;  dB^T += xa^T dy;  dx = s D(dxa A) (the base GEMM adds dy W
//   afterwards);  dA += dxa^T D(x).
// The mask is generated once per block and serves dx and dA.
template <typename scalar_t>
void backward_rows(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& xa,
                   const at::Tensor& lora_A, const at::Tensor& lora_B_t, at::Tensor* dx,
                   at::Tensor* dA, at::Tensor* dB_t, uint64_t seed, uint32_t threshold,
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
  const acc_t dx_alpha = static_cast<acc_t>(scaling);
  // NOTE: without dropout an fp32/fp64 x feeds dA as it is, and fp32/fp64 dy
  // always: no copies.
  const bool x_direct = !dropout && kSameType;

  const int64_t partial_bytes =
      rank * ((dA != nullptr ? in_features : 0) + (dB_t != nullptr ? out_features : 0)) *
      static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_tasks = std::max<int64_t>(1, kPartialsBytes / std::max<int64_t>(partial_bytes, 1));
  const int64_t chunk_rows =
      ceil_div(rows_total, std::min(reduction_chunks(rows_total), max_tasks));
  const int64_t tasks = ceil_div(rows_total, chunk_rows);
  const int64_t block = rows_per_block(std::max(in_features, out_features), kBackwardBlockElements);
  const auto options = xa.options();
  Partials<acc_t> dA_partials(dA != nullptr, tasks, rank, in_features, options);
  Partials<acc_t> dB_partials(dB_t != nullptr, tasks, rank, out_features, options);
  std::vector<acc_t> packed_A(dx != nullptr ? packed_panels_size(rank, in_features, sizeof(acc_t)) : 0);
  if (dx != nullptr) {
    pack_panels(lora_A.const_data_ptr<acc_t>(), in_features, rank, in_features, packed_A.data());
  }
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const int64_t dy_row_stride = dy.stride(0);
  const scalar_t* x_data = dA != nullptr ? x.const_data_ptr<scalar_t>() : nullptr;
  const int64_t x_row_stride = dA != nullptr ? x.stride(0) : 0;
  const acc_t* xa_data = xa.const_data_ptr<acc_t>();
  std::vector<acc_t> lora_B_packed(needs_dxa ? packed_transposed_size(rank, out_features, sizeof(acc_t)) : 0);
  if (needs_dxa) {  // B (N, r) padded: the m^T form of B^T
    pack_transposed(lora_B_t.const_data_ptr<acc_t>(), out_features, rank, out_features,
                    lora_B_packed.data());
  }
  scalar_t* dx_data = dx != nullptr ? dx->data_ptr<scalar_t>() : nullptr;

  struct Buffers {
    Scratch<acc_t> dy_converted, dxa, lora_input;
    Scratch<uint16_t> rnd;
  };
  parallel_tasks(tasks, [] { return Buffers(); }, [&](int64_t task, Buffers& buffers) {
    const int64_t task_begin = task * chunk_rows;
    const int64_t task_end = std::min(rows_total, task_begin + chunk_rows);
    acc_t* dA_partial = dA_partials.of(task);
    acc_t* dB_partial = dB_partials.of(task);
    const int64_t dy_buffer_ld = padded_ld<acc_t>(out_features);
    const int64_t input_ld = padded_ld<acc_t>(in_features);
    acc_t* dy_converted = kSameType ? nullptr : buffers.dy_converted.get(block * dy_buffer_ld);
    acc_t* dxa = needs_dxa ? buffers.dxa.get(block * rank) : nullptr;
    uint16_t* rnd = dropout && needs_dxa ? buffers.rnd.get(block * in_features) : nullptr;
    acc_t* lora_input = dA != nullptr && !x_direct ? buffers.lora_input.get(block * input_ld) : nullptr;

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
      row_dots(dy_block, dy_ld, lora_B_packed.data(), rows, rank, out_features, dxa);
      if (dropout) {
        // The block's rows are consecutive elements of the flattened (T, K) input.
        philox_uint16(seed, static_cast<uint64_t>(row0 * in_features), rows * in_features,
                      rnd);
      }
      if (dx_data != nullptr) {
        expand_masked_store(dxa, packed_A.data(), rows, rank, in_features,
                            dropout ? rnd : nullptr, in_features, threshold, dx_alpha, scale,
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

  if (dA != nullptr) {
    *dA = dA_partials.total();
  }
  if (dB_t != nullptr) {
    *dB_t = dB_partials.total();
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
  const at::Tensor lora_A_acc = lora_A.to(acc_dtype).contiguous();           // (r, K)
  const at::Tensor lora_B_t_acc = lora_B.to(acc_dtype).t().contiguous();   // (r, N)
  at::Tensor dx = needs_dx ? at::empty({rows, in_features}, dy.options()) : at::Tensor();
  at::Tensor dA_acc;
  at::Tensor dB_t_acc;
  if (rows == 0) {  // nothing to reduce: zero gradients
    dA_acc = at::zeros({rank, in_features}, xa.options());
    dB_t_acc = at::zeros({rank, out_features}, xa.options());
  } else if (needs_dx || needs_dA || needs_dB) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "lora_backward", [&] {
      backward_rows<scalar_t>(dy, x, xa, lora_A_acc, lora_B_t_acc, needs_dx ? &dx : nullptr,
                              needs_dA ? &dA_acc : nullptr, needs_dB ? &dB_t_acc : nullptr,
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
    dA_out = dA_acc.mul_(scaling).to(lora_A.scalar_type());
  }
  if (needs_dB) {
    dB_out = dB_t_acc.mul_(scaling).t().to(lora_B.scalar_type()).contiguous();
  }
  return {dx_out, dA_out, dB_out};
}

}  // namespace fused_lora
