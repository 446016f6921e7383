// The whole layer as one C++ autograd node, for eager CPU calls on the fused path.
//
// fused_lora's autograd Function is Python (function.py): building its node, saving
// its tensors and running its backward cost tens of microseconds of Python per call,
// several times what the kernels take at small sizes (T=1, K=N=64: the C++ ops take
// about 20 us of a 200 us step). Here the same operations (the shrink, the forward
// and the backward of lora_cpu.h, with the same saved state: x only when lora_A needs
// a gradient, xa, the seed) run behind a torch::autograd::Function, so the forward
// is one Python call and the backward no Python at all.
//
// Used by cpu_ops.lora_linear for eager calls only: torch.compile still traces the
// Python Function and its custom ops.
#include <torch/autograd.h>

#include "lora_cpu.h"

namespace fused_lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, int64_t seed, int64_t threshold,
                            double dropout_p) {
    const at::Tensor xa = lora_shrink(x, lora_A, seed, threshold, dropout_p);
    at::Tensor y = lora_forward(x, weight, bias, lora_B, xa, scaling);
    // NOTE: needs_input_grad (in backward) counts the tensor inputs only: lora_A is the
    // third or the fourth of them, as the bias is absent or present.
    const int64_t lora_A_edge = bias.has_value() && bias->defined() ? 3 : 2;
    // NOTE: x is needed only for dA; no reference to it when lora_A is frozen. (Asked of
    // lora_A itself: with no input requiring a gradient there is no node to ask.)
    ctx->save_for_backward({lora_A.requires_grad() ? x : at::Tensor(), weight, lora_A, lora_B, xa});
    ctx->saved_data["lora_A_edge"] = lora_A_edge;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["dropout_p"] = dropout_p;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t lora_A_edge = ctx->saved_data["lora_A_edge"].toInt();
    const bool needs_dx = ctx->needs_input_grad(0);
    const bool needs_dA = ctx->needs_input_grad(lora_A_edge);
    const bool needs_dB = ctx->needs_input_grad(lora_A_edge + 1);
    const std::optional<at::Tensor> x = saved[0].defined() ? std::optional<at::Tensor>(saved[0]) : std::nullopt;
    auto [dx, dA, dB] = lora_backward(grads[0], x, saved[1], saved[2], saved[3], saved[4],
                                      ctx->saved_data["scaling"].toDouble(), ctx->saved_data["seed"].toInt(),
                                      ctx->saved_data["threshold"].toInt(),
                                      ctx->saved_data["dropout_p"].toDouble(), needs_dx, needs_dA, needs_dB);
    // One gradient per forward input: x, weight, bias, lora_A, lora_B, then the scalars.
    return {dx.value_or(at::Tensor()), at::Tensor(), at::Tensor(), dA.value_or(at::Tensor()),
            dB.value_or(at::Tensor()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, int64_t seed,
                       int64_t threshold, double dropout_p) {
  return LoRALinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, seed, threshold, dropout_p);
}

}  // namespace fused_lora
