// Elementwise loops of the fused CPU backend, on one row segment.
//
// scalar_t is the tensor dtype (float, double, c10::BFloat16, c10::Half); the
// accumulation type is double for double and float for everything else.
// A mask is given as the segment's 16-bit Philox values (philox.h) and the
// integer threshold: element k is kept when rnd[k] >= threshold.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fused_lora {

#define FUSED_LORA_FOR_EACH_DTYPE(_) \
  _(float, float)                    \
  _(double, double)                  \
  _(c10::BFloat16, float)            \
  _(c10::Half, float)

#define FUSED_LORA_DECLARE_ELEMENTWISE(scalar_t, acc_t)                                   \
  /* out[k] = acc(x[k]) * (keep ? scale : 0)   (D(x) of a segment, in acc_t) */        \
  void dropout_to_acc(const scalar_t* x, const uint16_t* rnd, uint32_t threshold,         \
                      acc_t scale, acc_t* out, int64_t n);                                \
  /* out[k] = acc(x[k]) */                                                                 \
  void convert_to_acc(const scalar_t* x, acc_t* out, int64_t n);

FUSED_LORA_FOR_EACH_DTYPE(FUSED_LORA_DECLARE_ELEMENTWISE)

// out[k] = rnd[k] >= threshold (the bool keep mask).
void threshold_to_bool(const uint16_t* rnd, uint32_t threshold, bool* out, int64_t n);

}  // namespace fused_lora
