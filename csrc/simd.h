// FUSED_LORA_MULTIVERSION: compile a hot loop once per x86-64 ISA level and pick
// the best at load time (GCC/Clang function multi-versioning), so one build runs
// everywhere and still uses AVX-512/AVX2 where the CPU has them.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define FUSED_LORA_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif

#ifndef FUSED_LORA_MULTIVERSION
#define FUSED_LORA_MULTIVERSION
#endif
