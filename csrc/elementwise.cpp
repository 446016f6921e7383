// Elementwise loops, written as plain loops that the compiler vectorises,
// compiled once per x86-64 ISA level (simd.h).
#include "elementwise.h"

#include "simd.h"

namespace fused_lora {
namespace {

template <typename scalar_t, typename acc_t>
inline void dropout_to_acc_impl(const scalar_t* __restrict x, const uint16_t* __restrict rnd,
                                uint32_t threshold, acc_t scale, acc_t* __restrict out, int64_t n) {
  // NOTE: a dropped element is multiplied by 0, never selected away: NaN and Inf in x
  // propagate as in the reference, PEFT and F.dropout (0 * Inf = NaN).
  for (int64_t k = 0; k < n; ++k) {
    const acc_t factor = static_cast<uint32_t>(rnd[k]) >= threshold ? scale : acc_t(0);
    out[k] = static_cast<acc_t>(x[k]) * factor;
  }
}

template <typename scalar_t, typename acc_t>
inline void convert_to_acc_impl(const scalar_t* __restrict x, acc_t* __restrict out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<acc_t>(x[k]);
  }
}

}  // namespace

#define FUSED_LORA_DEFINE_ELEMENTWISE(scalar_t, acc_t)                                    \
  FUSED_LORA_MULTIVERSION                                                                  \
  void dropout_to_acc(const scalar_t* x, const uint16_t* rnd, uint32_t threshold,         \
                      acc_t scale, acc_t* out, int64_t n) {                               \
    dropout_to_acc_impl(x, rnd, threshold, scale, out, n);                                 \
  }                                                                                        \
  FUSED_LORA_MULTIVERSION                                                                  \
  void convert_to_acc(const scalar_t* x, acc_t* out, int64_t n) {                         \
    convert_to_acc_impl(x, out, n);                                                        \
  }

FUSED_LORA_FOR_EACH_DTYPE(FUSED_LORA_DEFINE_ELEMENTWISE)

FUSED_LORA_MULTIVERSION
void threshold_to_bool(const uint16_t* rnd, uint32_t threshold, bool* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<uint32_t>(rnd[k]) >= threshold;
  }
}

}  // namespace fused_lora
