// Forward of the "cpu" backend: the dropout-fused shrink, and the expand written
// into the output that the base GEMM then accumulates onto.
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

// xa = D(x) A^T, one block of rows per task: the block's random values and D(x)
// go to task-local scratch (L2-sized) that the rank-r kernel reads back.
template <typename scalar_t>
void shrink_blocks(const at::Tensor& x, const at::Tensor& lora_A, at::Tensor& xa, uint64_t seed,
                   uint32_t threshold, double dropout_p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows_total = x.size(0);
  const int64_t cols = x.size(1);
  const int64_t rank = lora_A.size(0);
  const bool dropout = dropout_p > 0.0;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t x_row_stride = x.stride(0);
  // NOTE: A^T packed straight from lora_A (any strides and adapter dtype): no
  // converted or contiguous copy of it as a tensor.
  const ThreadBuffer<acc_t, 0> lora_A_t(packed_transposed_size(rank, cols, sizeof(acc_t)));
  pack_transposed_from(lora_A, lora_A.stride(0), lora_A.stride(1), rank, cols, lora_A_t.get());
  const acc_t* lora_A_t_data = lora_A_t.get();
  acc_t* xa_data = xa.data_ptr<acc_t>();
  const int64_t block = rows_per_block(cols);
  const int64_t tasks = ceil_div(rows_total, block);

  struct Buffers {
    Scratch<acc_t> lora_input;
    Scratch<uint16_t> rnd;
  };
  parallel_tasks(tasks, block * cols * rank, [] { return Buffers(); }, [&](int64_t task, Buffers& buffers) {
    const int64_t row0 = task * block;
    const int64_t rows = std::min(block, rows_total - row0);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!dropout) {  // NOTE: fp32/fp64 x without dropout is read in place: no copy.
        row_dots(x_data + row0 * x_row_stride, x_row_stride, lora_A_t_data, rows, rank, cols,
                 xa_data + row0 * rank);
        return;
      }
    }
    const int64_t ld = padded_ld<acc_t>(cols);
    acc_t* lora_input = buffers.lora_input.get(rows * ld);
    uint16_t* rnd = dropout ? buffers.rnd.get(rows * cols) : nullptr;
    if (dropout) {
      // The block's rows are consecutive elements of the flattened (T, K) input.
      philox_uint16(seed, static_cast<uint64_t>(row0 * cols), rows * cols, rnd);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* x_row = x_data + (row0 + i) * x_row_stride;
      acc_t* out_row = lora_input + i * ld;
      if (dropout) {
        dropout_to_acc(x_row, rnd + i * cols, threshold, scale, out_row, cols);
      } else {
        convert_to_acc(x_row, out_row, cols);
      }
    }
    row_dots(lora_input, ld, lora_A_t_data, rows, rank, cols, xa_data + row0 * rank);
  });
}

// y = b + xa (s B)^T, one block of rows per task, before the base GEMM adds x W^T.
template <typename scalar_t>
void expand_into_output(const at::Tensor& xa, const at::Tensor& lora_B, double scaling,
                        const std::optional<at::Tensor>& bias, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows_total = y.size(0);
  const int64_t cols = y.size(1);
  const int64_t rank = xa.size(1);
  const int64_t block = rows_per_block(cols);
  const acc_t* xa_data = xa.const_data_ptr<acc_t>();
  // NOTE: (s B)^T packed straight from lora_B, the scaling folded in: no scaled,
  // transposed or converted copy of it as a tensor.
  const ThreadBuffer<acc_t, 1> packed(packed_panels_size(rank, cols, sizeof(acc_t)));
  pack_panels_from(lora_B, lora_B.stride(1), lora_B.stride(0), rank, cols,
                   static_cast<acc_t>(scaling), packed.get());
  const scalar_t* bias_data = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_data = y.data_ptr<scalar_t>();

  parallel_tasks(ceil_div(rows_total, block), block * cols * rank, [] { return 0; },
                 [&](int64_t task, int) {
    const int64_t row0 = task * block;
    const int64_t rows = std::min(block, rows_total - row0);
    // fp16/bf16: the LoRA term and the bias are summed in fp32 and rounded once.
    expand_bias_store(xa_data + row0 * rank, packed.get(), rows, rank, cols, bias_data,
                      y_data + row0 * cols, cols);
  });
}

}  // namespace

at::Tensor lora_shrink(const at::Tensor& x_in, const at::Tensor& lora_A, int64_t seed,
                       int64_t threshold, double dropout_p) {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dense_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x: expected a 2-D tensor (T, in_features), got shape ",
              x_in.sizes());
  check_dense_cpu(lora_A, "lora_A");
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1 && lora_A.size(1) == x_in.size(1),
              "lora_A: expected shape (r, ", x_in.size(1), ") with r >= 1, got ", lora_A.sizes());
  check_adapter_dtype(lora_A, "lora_A", x_in.scalar_type());
  check_dropout(seed, threshold, dropout_p);

  const at::Tensor x = with_unit_column_stride(x_in);
  const auto acc_dtype = accumulation_dtype(x.scalar_type());
  at::Tensor xa = at::empty({x.size(0), lora_A.size(0)}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_shrink", [&] {
    shrink_blocks<scalar_t>(x, lora_A, xa, static_cast<uint64_t>(seed),
                            static_cast<uint32_t>(threshold), dropout_p);
  });
  return xa;
}

at::Tensor lora_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_B,
                        const at::Tensor& xa_in, double scaling) {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dense_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor (T, in_features), got shape ", x.sizes());
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  check_dense_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in_features,
              "weight: expected shape (out_features, ", in_features, "), got ", weight.sizes());
  const int64_t out_features = weight.size(0);
  check_dtype(weight, "weight", x.scalar_type(), "(x's dtype)");
  if (bias) {
    check_dense_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias: expected shape (",
                out_features, "), got ", bias->sizes());
    check_dtype(*bias, "bias", x.scalar_type(), "(x's dtype)");
  }
  check_dense_cpu(lora_B, "lora_B");
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out_features && lora_B.size(1) >= 1,
              "lora_B: expected shape (", out_features, ", r) with r >= 1, got ", lora_B.sizes());
  check_adapter_dtype(lora_B, "lora_B", x.scalar_type());
  const auto acc_dtype = accumulation_dtype(x.scalar_type());
  check_dense_cpu(xa_in, "xa");
  check_shape(xa_in, "xa", rows, lora_B.size(1), "(T, r)");
  check_dtype(xa_in, "xa", acc_dtype, "(the accumulation dtype)");

  const at::Tensor xa = xa_in.contiguous();
  const std::optional<at::Tensor> bias_c =
      bias && !bias->is_contiguous() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  at::Tensor y = at::empty({rows, out_features}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_forward", [&] {
    expand_into_output<scalar_t>(xa, lora_B, scaling, bias_c, y);
  });
  // NOTE: the base GEMM accumulates onto b + s xa B^T (beta = 1): y is written by
  // the expand once and read back inside the GEMM, never by a separate pass.
  y.addmm_(x, weight.t());
  return y;
}

}  // namespace fused_lora
