// Autograd for relattn::attention_forward, registered on the Autograd key so that C++ programs train
// with no Python at all. Backward is its own op (relattn::attention_backward), whose own autograd only
// raises: double backward is not implemented.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../attention.h"

namespace relattn {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& rel_k, const OptTensor& rel_v, const OptTensor& rel_bias,
                               const OptTensor& buckets, const OptTensor& rel_index,
                               const OptTensor& alibi_slopes, const OptTensor& key_padding_mask, bool causal,
                               std::optional<double> scale, int64_t q_offset, double dropout_p,
                               const OptTensor& dropout_seed, const OptTensor& q_segment_ids,
                               const OptTensor& k_segment_ids, const OptTensor& q_offsets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_forward(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes,
                                        key_padding_mask, causal, scale, q_offset, dropout_p, dropout_seed,
                                        q_segment_ids, k_segment_ids, q_offsets);
    auto opt = [](const OptTensor& t) { return t.has_value() ? *t : Tensor(); };
    ctx->save_for_backward({q, k, v, out, lse, opt(rel_k), opt(rel_v), opt(rel_bias), opt(buckets),
                            opt(rel_index), opt(alibi_slopes), opt(key_padding_mask), opt(dropout_seed),
                            opt(q_segment_ids), opt(k_segment_ids), opt(q_offsets)});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["q_offset"] = q_offset;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const Tensor& out = s[3];
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const c10::IValue scale_iv = ctx->saved_data["scale"];
    const std::optional<double> scale = scale_iv.isNone() ? std::nullopt : std::optional<double>(scale_iv.toDouble());
    auto [dq, dk, dv, drk, drv, drb] =
        attention_backward(grad_out, opt(grads[1]), s[0], s[1], s[2], out, s[4], opt(s[5]), opt(s[6]), opt(s[7]),
                           opt(s[8]), opt(s[9]), opt(s[10]), opt(s[11]), ctx->saved_data["causal"].toBool(), scale,
                           ctx->saved_data["q_offset"].toInt(), ctx->saved_data["dropout_p"].toDouble(), opt(s[12]),
                           opt(s[13]), opt(s[14]), opt(s[15]));
    const Tensor none;
    return {dq,
            dk,
            dv,
            s[5].defined() ? drk : none,
            s[6].defined() ? drv : none,
            s[7].defined() ? drb : none,
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            none,
            none};
  }
};

// Autograd for relattn::attention_backward: it records the call (so that create_graph=True works for the
// rest of a model) and raises where anything differentiates through it. Gradients of these gradients are
// not implemented; without this kernel torch's fallback would hand back zeros for them, with a warning.
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  // (attention_backward's arguments, passed through as they come.)
  template <typename... Args>
  static variable_list forward(AutogradContext* /*ctx*/, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, drk, drv, drb] = attention_backward(args...);
    return {dq, dk, dv, drk, drv, drb};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false,
                "relattn.attention: double backward is not supported: the gradients of relattn's gradients "
                "(torch.autograd.grad(..., create_graph=True) followed by a backward through its result) are not "
                "implemented");
    return {};
  }
};

// The Autograd kernel of attention_backward, with its signature taken from the op's declaration.
template <typename Signature>
struct BackwardAutograd;
template <typename... Args>
struct BackwardAutograd<BackwardResult(Args...)> {
  static BackwardResult call(Args... args) {
    const variable_list r = AttentionBackwardFunction::apply(args...);
    return {r[0], r[1], r[2], r[3], r[4], r[5]};
  }
};

ForwardResult attention_forward_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const OptTensor& rel_k, const OptTensor& rel_v, const OptTensor& rel_bias,
                                         const OptTensor& buckets, const OptTensor& rel_index,
                                         const OptTensor& alibi_slopes, const OptTensor& key_padding_mask,
                                         bool causal, std::optional<double> scale, int64_t q_offset,
                                         double dropout_p, const OptTensor& dropout_seed,
                                         const OptTensor& q_segment_ids, const OptTensor& k_segment_ids,
                                         const OptTensor& q_offsets) {
  auto r = AttentionFunction::apply(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes,
                                    key_padding_mask, causal, scale, q_offset, dropout_p, dropout_seed,
                                    q_segment_ids, k_segment_ids, q_offsets);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace ops

TORCH_LIBRARY_IMPL(relattn, Autograd, m) {
  m.impl("attention_forward", &ops::attention_forward_autograd);
  m.impl("attention_backward", &ops::BackwardAutograd<decltype(ops::attention_backward)>::call);
}

}  // namespace relattn
