// Elementwise loops, written as plain loops that the compiler vectorises, one
// build per ISA level (simd.h).
#include "elementwise.h"

#include "simd.h"

namespace fused_lora {
namespace {

// NOTE: a dropped element is multiplied by 0 (not selected away): NaN and Inf in x
// propagate as through x * mask / (1 - p) in the reference and the torch backend.
template <typename I, typename scalar_t, typename acc_t>
FUSED_LORA_INLINE void dropout_to_acc_impl(const scalar_t* __restrict x,
                                           const uint16_t* __restrict rnd, uint32_t threshold,
                                           acc_t scale, acc_t* __restrict out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t factor = static_cast<uint32_t>(rnd[k]) >= threshold ? scale : acc_t(0);
    out[k] = static_cast<acc_t>(x[k]) * factor;
  }
}

template <typename I, typename scalar_t, typename acc_t>
FUSED_LORA_INLINE void convert_to_acc_impl(const scalar_t* __restrict x, acc_t* __restrict out,
                                           int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<acc_t>(x[k]);
  }
}

template <typename I>
FUSED_LORA_INLINE void threshold_to_bool_impl(const uint16_t* __restrict rnd, uint32_t threshold,
                                              bool* __restrict out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<uint32_t>(rnd[k]) >= threshold;
  }
}

}  // namespace

#define FUSED_LORA_DEFINE_ELEMENTWISE(scalar_t, acc_t)                                    \
  FUSED_LORA_DISPATCH(void, dropout_to_acc,                                               \
                      (const scalar_t* x, const uint16_t* rnd, uint32_t threshold,        \
                       acc_t scale, acc_t* out, int64_t n),                               \
                      dropout_to_acc_impl, (x, rnd, threshold, scale, out, n))            \
  FUSED_LORA_DISPATCH(void, convert_to_acc, (const scalar_t* x, acc_t* out, int64_t n),   \
                      convert_to_acc_impl, (x, out, n))

FUSED_LORA_FOR_EACH_DTYPE(FUSED_LORA_DEFINE_ELEMENTWISE)

FUSED_LORA_DISPATCH(void, threshold_to_bool,
                    (const uint16_t* rnd, uint32_t threshold, bool* out, int64_t n),
                    threshold_to_bool_impl, (rnd, threshold, out, n))

}  // namespace fused_lora
