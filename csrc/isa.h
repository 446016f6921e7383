// Which x86-64 ISA level the hot loops run, picked once at load time.
//
// Every hot loop of the backend (rank-r kernels, elementwise loops, Philox) is
// compiled once per level, with register blocks sized for that level's vectors
// and register file, and called through a switch on active_isa():
//
//   avx512    x86-64-v4: 64-byte vectors, 32 vector registers
//   avx2      x86-64-v3 (AVX2 + FMA): 32-byte vectors, 16 vector registers
//   baseline  x86-64 (SSE2): 16-byte vectors, 16 registers; every other CPU
//
// The best level the CPU (and the OS) supports is used. The environment variable
// FUSED_LORA_ISA=avx512|avx2|baseline caps it, so the AVX2 or baseline code can be
// tested and measured on an AVX-512 machine; FUSED_LORA_PHILOX_ISA=avx512|avx2|scalar
// caps the Philox generator alone (on top of FUSED_LORA_ISA). Both are read once,
// when the extension loads. fused_lora/ops/cpu_ops.py turns an invalid value into a
// Python error (isa_env_error()).
//
// The avx2 and avx512 paths sum every element in the same order (both use FMA), so
// their results are bit-identical; the baseline path has no FMA and differs in the
// last bits.
#pragma once

namespace fused_lora {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The level of the hot loops: the CPU's best, capped by FUSED_LORA_ISA.
Isa active_isa();
// The best level this CPU supports (ignoring the caps).
Isa cpu_isa();
const char* isa_name(Isa isa);

// "" when FUSED_LORA_ISA and FUSED_LORA_PHILOX_ISA are unset or valid, else a message.
const char* isa_env_error();

}  // namespace fused_lora
