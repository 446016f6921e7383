// TORCH_CHECK helpers: the C++ side's own checks of every input (the Python side
// validates user arguments first; these are the second line of defence), and
// the dtype rules they enforce.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <optional>
#include <type_traits>

namespace fused_lora {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline bool is_half_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// fp64 for fp64 inputs, else fp32: as a dtype, and as the C++ type of scalar_t.
inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline void check_dense_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, ": expected a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), name,
              ": expected dtype float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                        const char* meaning) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape (",
              rows, ", ", cols, ") ", meaning, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected,
                        const char* meaning) {
  TORCH_CHECK(t.scalar_type() == expected, name, ": expected dtype ", expected, " ", meaning,
              ", got ", t.scalar_type());
}

// lora_A / lora_B: x's dtype, or fp32 for an fp16/bf16 x.
inline void check_adapter_dtype(const at::Tensor& t, const char* name, at::ScalarType x_dtype) {
  const auto t_dtype = t.scalar_type();
  TORCH_CHECK(t_dtype == x_dtype || (is_half_dtype(x_dtype) && t_dtype == at::kFloat), name,
              ": expected dtype ", x_dtype, is_half_dtype(x_dtype) ? " or Float" : "",
              " for inputs of dtype ", x_dtype, ", got ", t_dtype);
}

inline void check_dropout(int64_t seed, int64_t threshold, double dropout_p) {
  TORCH_CHECK(seed >= 0, "seed: expected an int in [0, 2**63), got ", seed);
  TORCH_CHECK(threshold >= 0 && threshold <= 65536,
              "threshold: expected an int in [0, 65536], got ", threshold);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a float in [0, 1), got ",
              dropout_p);
}

// A 2-D tensor whose rows the fused loops can walk with a pointer and a row
// stride (unit column stride, non-overlapping rows); any other layout is copied.
inline at::Tensor with_unit_column_stride(const at::Tensor& t) {
  const bool rows_ok = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  return rows_ok && t.stride(1) == 1 ? t : t.contiguous();
}

}  // namespace fused_lora
