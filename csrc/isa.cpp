// ISA detection and the FUSED_LORA_ISA cap (isa.h).
#include "isa.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace fused_lora {
namespace {

Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // NOTE: __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("f16c");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
  return v4 ? Isa::kAvx512 : (v3 ? Isa::kAvx2 : Isa::kBaseline);
#else
  return Isa::kBaseline;
#endif
}

struct Choice {
  Isa cpu;
  Isa active;
  std::string error;
};

Choice choose() {
  Choice choice{detect(), Isa::kBaseline, ""};
  choice.active = choice.cpu;
  const char* cap = std::getenv("FUSED_LORA_ISA");
  if (cap != nullptr && *cap != '\0') {
    const std::string value = cap;
    if (value == "avx512") {
      choice.active = std::min(choice.cpu, Isa::kAvx512);
    } else if (value == "avx2") {
      choice.active = std::min(choice.cpu, Isa::kAvx2);
    } else if (value == "baseline") {
      choice.active = Isa::kBaseline;
    } else {
      choice.error = "environment variable FUSED_LORA_ISA: expected avx512, avx2 or baseline, got '" +
                     value + "'";
    }
  }
  const char* philox_cap = std::getenv("FUSED_LORA_PHILOX_ISA");
  if (philox_cap != nullptr && *philox_cap != '\0') {
    const std::string value = philox_cap;
    if (value != "avx512" && value != "avx2" && value != "scalar" && choice.error.empty()) {
      choice.error =
          "environment variable FUSED_LORA_PHILOX_ISA: expected avx512, avx2 or scalar, got '" + value +
          "'";
    }
  }
  return choice;
}

const Choice& choice() {
  static const Choice value = choose();
  return value;
}

}  // namespace

Isa active_isa() { return choice().active; }

Isa cpu_isa() { return choice().cpu; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* isa_env_error() { return choice().error.c_str(); }

}  // namespace fused_lora
