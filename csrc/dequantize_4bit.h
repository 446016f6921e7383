// A bitsandbytes 4-bit weight as raw pointers, and the dequantization of a range of it
// (dequantize_4bit.cpp), for the small-T GEMMs that dequantize tile by tile (gemm_4bit.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fused_lora {

struct Weight4bitView {
  const uint8_t* packed;        // nibbles of the flattened (N, K) weight, first element in the high one
  const float* code;            // 16 fp32 values
  const uint8_t* absmax_u8;     // double quantization: one byte per block (else null)
  const float* absmax_f32;      // else: one fp32 absmax per block
  const float* nested_code;     // 256 fp32 values (double quantization)
  const float* nested_absmax;   // one fp32 per nested_blocksize blocks (double quantization)
  int64_t nested_blocksize;
  float offset;
  int64_t blocksize;            // even
};

// The weight's tensors checked for numel weights (CPU, contiguous, dtype, enough elements; TORCH_CHECK
// naming the argument) and viewed as raw pointers. nested_absmax and nested_code: both (double
// quantization) or neither. The caller checks blocksize.
Weight4bitView checked_weight_view(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                   int64_t nested_blocksize, int64_t numel);

// out[0 .. end - begin) = fp32 elements begin .. end - 1 of the flattened weight; begin a multiple of
// blocksize. scales: room for the range's blocks ((end - begin) / blocksize + 1 floats).
void dequantize_range(const Weight4bitView& w, int64_t begin, int64_t end, float* out, float* scales);

}  // namespace fused_lora
