// Vector types per ISA level and the one-source, three-builds dispatch of the hot loops.
//
// A hot loop is an always_inline template on an ISA traits type (Avx512Isa,
// Avx2Isa, BaselineIsa below) that sizes its vectors (Vec<T, Isa>, GCC/Clang
// vector extensions) and its register blocks from the traits.
// FUSED_LORA_DISPATCH_* define one wrapper per level, each compiled with
// __attribute__((target)) for that level, and the exported function that calls
// the wrapper of active_isa() (isa.h).
// NOTE: explicit wrappers rather than target_clones: the level can be capped at run
// time (FUSED_LORA_ISA), and each level gets register blocks of its own size: the
// 64-byte blocks of the AVX-512 code spilled to the stack on AVX2 (16 ymm registers).
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_LORA_X86 1
#define FUSED_LORA_TARGET_AVX512 __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#define FUSED_LORA_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define FUSED_LORA_TARGET_AVX512
#define FUSED_LORA_TARGET_AVX2
#endif

#define FUSED_LORA_INLINE inline __attribute__((always_inline))

namespace fused_lora {

// kBytes: vector width; kRegisters: vector registers (accumulators + loads must fit).
struct Avx512Isa {
  static constexpr int kBytes = 64;
  static constexpr int kRegisters = 32;
};
struct Avx2Isa {
  static constexpr int kBytes = 32;
  static constexpr int kRegisters = 16;
};
struct BaselineIsa {
  static constexpr int kBytes = 16;
  static constexpr int kRegisters = 16;
};

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
// A vector of T of the ISA's width, and of the matching width in bytes (masks, 16-bit values).
template <typename T, typename I>
using Vec = typename VecOf<T, I::kBytes>::type;
template <typename T, int Bytes>
using VecBytes = typename VecOf<T, Bytes>::type;
template <typename T, typename I>
constexpr int kLanes = I::kBytes / static_cast<int>(sizeof(T));

template <typename V, typename T>
FUSED_LORA_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
FUSED_LORA_INLINE void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace fused_lora

// Defines `RET NAME PARAMS` (declared in a header) as a dispatch to IMPL<Isa> ARGS,
// one build per ISA level. PARAMS and ARGS are parenthesised lists.
#define FUSED_LORA_DISPATCH(RET, NAME, PARAMS, IMPL, ARGS)                                     \
  namespace {                                                                                  \
  FUSED_LORA_TARGET_AVX512 RET NAME##_avx512 PARAMS { return IMPL<::fused_lora::Avx512Isa> ARGS; } \
  FUSED_LORA_TARGET_AVX2 RET NAME##_avx2 PARAMS { return IMPL<::fused_lora::Avx2Isa> ARGS; }     \
  RET NAME##_baseline PARAMS { return IMPL<::fused_lora::BaselineIsa> ARGS; }                  \
  }                                                                                            \
  RET NAME PARAMS {                                                                            \
    switch (::fused_lora::active_isa()) {                                                      \
      case ::fused_lora::Isa::kAvx512: return NAME##_avx512 ARGS;                              \
      case ::fused_lora::Isa::kAvx2: return NAME##_avx2 ARGS;                                  \
      default: return NAME##_baseline ARGS;                                                    \
    }                                                                                          \
  }
