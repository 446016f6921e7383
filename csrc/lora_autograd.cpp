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
#include <torch/csrc/autograd/functions/basic_ops.h>

#include "lora_cpu.h"

namespace fused_lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The same messages as function.py's ONCE_DIFFERENTIABLE and UNSAVED_X.
constexpr const char* kOnceDifferentiable =
    "fused_lora computes first derivatives only: its gradients cannot be differentiated again "
    "(double backward through a backward run with create_graph=True)";
constexpr const char* kUnsavedX =
    "with lora_A frozen, x is not saved for backward, so a second derivative of dB with respect to x "
    "could not even be detected; give lora_A requires_grad=True or leave create_graph off";

// When backward runs with create_graph=True, give each gradient a grad_fn that raises:
// the kernels build no graph, so a second derivative would silently miss every term that
// passes through the layer. The error node's edges lead to what the gradients depend on
// (dy, x, lora_A, lora_B; a 0-d view of each, no copy), so torch.autograd.grad with any
// of them as inputs reaches it (function.py's _once_differentiable, same rule).
variable_list once_differentiable(variable_list grads, const variable_list& anchors) {
  variable_list inputs;
  for (const auto& g : grads) {
    if (g.defined()) {
      inputs.push_back(g.detach());
    }
  }
  const size_t n_grads = inputs.size();
  for (const auto& a : anchors) {
    if (a.defined() && a.requires_grad() && a.numel() > 0) {
      at::Tensor element = a;
      while (element.dim() > 0) {
        element = element.select(0, 0);
      }
      inputs.push_back(element);
    }
  }
  if (n_grads == 0 || inputs.size() == n_grads) {
    return grads;  // nothing they depend on needs a gradient: no second derivative exists
  }
  torch::autograd::DelayedError error(kOnceDifferentiable, static_cast<int64_t>(inputs.size()));
  variable_list wrapped = error.apply(std::move(inputs));
  size_t next = 0;
  for (auto& g : grads) {
    if (g.defined()) {
      g = wrapped[next++];
    }
  }
  return grads;
}

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
    const bool create_graph = at::GradMode::is_enabled();
    std::optional<at::Tensor> dx, dA, dB;
    {
      at::NoGradGuard no_grad;  // the ATen path's ops must not build a graph either
      std::tie(dx, dA, dB) = lora_backward(grads[0], x, saved[1], saved[2], saved[3], saved[4],
                                           ctx->saved_data["scaling"].toDouble(), ctx->saved_data["seed"].toInt(),
                                           ctx->saved_data["threshold"].toInt(),
                                           ctx->saved_data["dropout_p"].toDouble(), needs_dx, needs_dA, needs_dB);
    }
    // One gradient per forward input: x, weight, bias, lora_A, lora_B, then the scalars.
    variable_list grads_out{dx.value_or(at::Tensor()), dA.value_or(at::Tensor()), dB.value_or(at::Tensor())};
    if (create_graph) {
      TORCH_CHECK(saved[0].defined() || !(needs_dB && needs_dx), kOnceDifferentiable, "; ", kUnsavedX);
      grads_out = once_differentiable(std::move(grads_out), {grads[0], saved[0], saved[2], saved[3]});
    }
    return {grads_out[0], at::Tensor(), at::Tensor(), grads_out[1], grads_out[2],
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, int64_t seed,
                       int64_t threshold, double dropout_p) {
  return LoRALinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, seed, threshold, dropout_p);
}

}  // namespace fused_lora
