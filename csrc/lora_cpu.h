// The operations of the "cpu" backend (fused_lora/ops/cpu_ops.py documents the
// interface; fused_lora/ops/torch_ops.py is the same in pure PyTorch).
//
// Dropout arguments: seed in [0, 2**63); threshold = dropout_threshold(p), the
// integer the Python side computes so rounding is identical on every backend;
// dropout_p itself for the 1 / (1 - p) scale. dropout_p == 0 means no dropout.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_lora {

// Bool (rows, cols) keep mask of the flattened (rows, cols) input.
at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, int64_t threshold);

// The 16-bit random values of flattened elements start .. start + count - 1 (int32).
at::Tensor random_uint16(int64_t seed, int64_t start, int64_t count);

// acc(x) * (keep ? scale : 0), (T, K) in fp32 (fp64 for fp64 x), with the mask of
// (seed, threshold): D(x) when scale = 1 / (1 - p).
at::Tensor dropout(const at::Tensor& x, int64_t seed, int64_t threshold, double dropout_p,
                   double scale);

// xa = D(x) A^T: (T, r) in fp32 (fp64 for fp64 x). D(x) is never materialised.
at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, int64_t seed,
                       int64_t threshold, double dropout_p);

// y = x W^T + b + scaling * xa B^T: (T, N) in x's dtype; the expand goes into the
// same output as the base GEMM (no (T, N) temporary).
at::Tensor lora_forward(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_B,
                        const at::Tensor& xa, double scaling);

// (dx, dA, dB), each undefined (None) when not needed. x may be None without dA.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
lora_backward(const at::Tensor& dy, const std::optional<at::Tensor>& x, const at::Tensor& weight,
              const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
              double scaling, int64_t seed, int64_t threshold, double dropout_p, bool needs_dx,
              bool needs_dA, bool needs_dB);

// The whole layer as one C++ autograd node (lora_autograd.cpp): y (T, N) whose backward
// is lora_backward with this call's saved state; for eager calls on the fused path.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, int64_t seed,
                       int64_t threshold, double dropout_p);

// out (N, K) = the dense weight of a bitsandbytes 4-bit weight (dequantize_4bit.cpp):
// code[nibble] * absmax in fp32, rounded once to out's dtype (fp32, fp16 or bf16). packed:
// uint8 nibbles, first element in the high one; absmax fp32 per block, or uint8 with
// nested_absmax / nested_code (double quantization, offset added). Returns out.
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                           int64_t nested_blocksize, at::Tensor out);

// The base GEMM of a bitsandbytes 4-bit weight W (N, K) for few rows, dequantized tile by tile
// (gemm_4bit.cpp): transposed: out (T, N) += a (T, K) W^T; else out (T, K) += a (T, N) W. fp32;
// blocksize a multiple of 16 dividing K. Returns out.
at::Tensor gemm_4bit(const at::Tensor& a, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                     int64_t nested_blocksize, int64_t out_features, int64_t in_features, bool transposed,
                     at::Tensor out);

}  // namespace fused_lora
