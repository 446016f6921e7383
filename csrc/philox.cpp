// Philox4x32-10 dropout randomness, vectorised: 8 counters per AVX-512 vector
// (4 per AVX2 vector), picked at load time (isa.h); a scalar loop elsewhere.
#include "philox.h"

#include "isa.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSED_LORA_PHILOX_X86 1
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags _mm512_undefined_epi32() inside the AVX-512 intrinsics themselves.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the 16-bit lane layout below assumes a little-endian machine");

namespace fused_lora {
namespace {

// Writes the 8 uint16 values of each group first_group .. first_group + groups - 1.
using FillGroups = void (*)(uint64_t first_group, int64_t groups, uint32_t k0, uint32_t k1,
                            uint16_t* out);

void fill_groups_scalar(uint64_t first_group, int64_t groups, uint32_t k0, uint32_t k1,
                        uint16_t* out) {
  for (int64_t l = 0; l < groups; ++l) {
    const uint64_t group = first_group + static_cast<uint64_t>(l);
    uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0, 0};
    philox4x32_10(c, k0, k1);
    std::memcpy(out + l * kElementsPerCall, c, sizeof(c));
  }
}

#ifdef FUSED_LORA_PHILOX_X86

// NOTE: each counter word lives in the low half of a 64-bit lane, so
// _mm*_mul_epu32 gives the full 32x32 -> 64-bit product of every lane with no
// shuffles: the product is the next low word as it is, and its high half
// shifted down is the high word. The high halves of the lanes carry garbage
// that mul_epu32 ignores; only the low halves are stored.

__attribute__((target("avx512f"))) void fill_groups_avx512(uint64_t first_group, int64_t groups,
                                                           uint32_t k0, uint32_t k1,
                                                           uint16_t* out) {
  constexpr int kLanes = 8;
  const __m512i mul_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i mul_b = _mm512_set1_epi64(kPhiloxRoundB);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  // groups 0..3 and 4..7 of the 64-bit-lane words (c0 c1 | c2 c3 per group)
  const __m512i first_half = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i second_half = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  int64_t done = 0;
  for (; done + kLanes <= groups; done += kLanes) {
    const __m512i group = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<long long>(first_group + static_cast<uint64_t>(done))), iota);
    __m512i c0 = group;
    __m512i c1 = _mm512_srli_epi64(group, 32);
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    uint32_t key0 = k0;
    uint32_t key1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m512i prod_b = _mm512_mul_epu32(c2, mul_b);
      const __m512i prod_a = _mm512_mul_epu32(c0, mul_a);
      c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(prod_b, 32), c1,
                                     _mm512_set1_epi64(key0), 0x96);
      c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(prod_a, 32), c3,
                                     _mm512_set1_epi64(key1), 0x96);
      c1 = prod_b;
      c3 = prod_a;
      key0 += kPhiloxKeyA;
      key1 += kPhiloxKeyB;
    }
    // Per group, the 64-bit words (c0 | c1 << 32) and (c2 | c3 << 32), then groups in order.
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, c0, _mm512_slli_epi64(c1, 32));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, c2, _mm512_slli_epi64(c3, 32));
    uint16_t* dst = out + done * kElementsPerCall;
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(w01, first_half, w23));
    _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi64(w01, second_half, w23));
  }
  fill_groups_scalar(first_group + static_cast<uint64_t>(done), groups - done, k0, k1,
                     out + done * kElementsPerCall);
}

__attribute__((target("avx2"))) void fill_groups_avx2(uint64_t first_group, int64_t groups,
                                                      uint32_t k0, uint32_t k1, uint16_t* out) {
  constexpr int kLanes = 4;
  const __m256i mul_a = _mm256_set1_epi64x(kPhiloxRoundA);
  const __m256i mul_b = _mm256_set1_epi64x(kPhiloxRoundB);
  const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
  int64_t done = 0;
  for (; done + kLanes <= groups; done += kLanes) {
    const __m256i group = _mm256_add_epi64(
        _mm256_set1_epi64x(static_cast<long long>(first_group + static_cast<uint64_t>(done))), iota);
    __m256i c0 = group;
    __m256i c1 = _mm256_srli_epi64(group, 32);
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    uint32_t key0 = k0;
    uint32_t key1 = k1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m256i prod_b = _mm256_mul_epu32(c2, mul_b);
      const __m256i prod_a = _mm256_mul_epu32(c0, mul_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_b, 32), c1),
                            _mm256_set1_epi64x(key0));
      c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), c3),
                            _mm256_set1_epi64x(key1));
      c1 = prod_b;
      c3 = prod_a;
      key0 += kPhiloxKeyA;
      key1 += kPhiloxKeyB;
    }
    const __m256i w01 = _mm256_blend_epi32(c0, _mm256_slli_epi64(c1, 32), 0xAA);  // groups 0..3
    const __m256i w23 = _mm256_blend_epi32(c2, _mm256_slli_epi64(c3, 32), 0xAA);
    const __m256i g02 = _mm256_unpacklo_epi64(w01, w23);  // groups 0 | 2
    const __m256i g13 = _mm256_unpackhi_epi64(w01, w23);  // groups 1 | 3
    __m256i* dst = reinterpret_cast<__m256i*>(out + done * kElementsPerCall);
    _mm256_storeu_si256(dst, _mm256_permute2x128_si256(g02, g13, 0x20));
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(g02, g13, 0x31));
  }
  fill_groups_scalar(first_group + static_cast<uint64_t>(done), groups - done, k0, k1,
                     out + done * kElementsPerCall);
}

#endif  // FUSED_LORA_PHILOX_X86

struct Implementation {
  FillGroups fill;
  const char* name;
};

// The widest ISA the loops may use (active_isa(): the CPU's best, capped by
// FUSED_LORA_ISA), capped again by FUSED_LORA_PHILOX_ISA=avx2|scalar (tests use it
// to check every path against the same reference; isa.cpp validates the value).
Implementation pick_implementation() {
  const char* cap = std::getenv("FUSED_LORA_PHILOX_ISA");
  const std::string limit = cap != nullptr ? cap : "";
#ifdef FUSED_LORA_PHILOX_X86
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512 && (limit.empty() || limit == "avx512")) {
    return {fill_groups_avx512, "avx512"};
  }
  if (isa >= Isa::kAvx2 && (limit.empty() || limit == "avx512" || limit == "avx2")) {
    return {fill_groups_avx2, "avx2"};
  }
#endif
  return {fill_groups_scalar, "scalar"};
}

const Implementation implementation = pick_implementation();
const FillGroups fill_groups = implementation.fill;

}  // namespace

const char* philox_isa() { return implementation.name; }

void philox_uint16(uint64_t seed, uint64_t start, int64_t count, uint16_t* out) {
  if (count <= 0) {
    return;
  }
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint64_t group = start >> 3;
  int64_t done = 0;
  uint16_t lanes[kElementsPerCall];

  // A start inside a group: keep the tail lanes of that group's call.
  const int skip = static_cast<int>(start & 7);
  if (skip != 0) {
    fill_groups_scalar(group, 1, k0, k1, lanes);
    done = std::min<int64_t>(kElementsPerCall - skip, count);
    std::memcpy(out, lanes + skip, done * sizeof(uint16_t));
    ++group;
  }
  const int64_t full_groups = (count - done) / kElementsPerCall;
  fill_groups(group, full_groups, k0, k1, out + done);
  done += full_groups * kElementsPerCall;
  group += static_cast<uint64_t>(full_groups);
  if (done < count) {  // an end inside a group: keep its head lanes
    fill_groups_scalar(group, 1, k0, k1, lanes);
    std::memcpy(out + done, lanes, (count - done) * sizeof(uint16_t));
  }
}

}  // namespace fused_lora
