// Counter-based dropout randomness: Philox4x32-10, bit-identical to fused_lora/philox.py.
//
// The 16 random bits of flattened element e (e = i * K + k of the (T, K) input):
//   group g = e >> 3, lane j = e & 7;
//   (o0, o1, o2, o3) = Philox4x32-10(counter (g mod 2^32, g >> 32, 0, 0),
//                                    key (seed mod 2^32, seed >> 32));
//   u = (o[j >> 1] >> (16 * (j & 1))) & 0xFFFF.
// An element is kept when u >= threshold (fused_lora.philox.dropout_threshold).
//
// On a little-endian machine the eight 16-bit values of group g laid out in
// lane order are exactly the bytes of (o0, o1, o2, o3): one Philox call writes
// eight consecutive uint16 values with no shuffling.
#pragma once

#include <cstdint>

namespace fused_lora {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kElementsPerCall = 8;

// Writes the 16-bit random values of elements start .. start + count - 1 to out.
// Any start (64-bit) and count; the work is one Philox call per group of 8.
void philox_uint16(uint64_t seed, uint64_t start, int64_t count, uint16_t* out);

// The implementation philox_uint16 runs: "avx512", "avx2" or "scalar".
const char* philox_isa();

// Scalar Philox4x32-10 of one counter (the readable definition; tests and tails).
inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(c[2]) * kPhiloxRoundB;
    const uint64_t prod_a = static_cast<uint64_t>(c[0]) * kPhiloxRoundA;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c[1] ^ k0;
    const uint32_t n1 = static_cast<uint32_t>(prod_b);
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c[3] ^ k1;
    const uint32_t n3 = static_cast<uint32_t>(prod_a);
    c[0] = n0;
    c[1] = n1;
    c[2] = n2;
    c[3] = n3;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

}  // namespace fused_lora
