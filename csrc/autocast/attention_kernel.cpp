// Autocast for relattn::attention_forward: q, k, v run in the autocast dtype (attention is a
// lower-precision op, like torch's scaled_dot_product_attention); tables that are neither that dtype
// nor float32 become float32, the mixed-precision case the kernels accept.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../attention.h"

namespace relattn {
namespace ops {
namespace {

template <c10::DeviceType device, c10::DispatchKey key>
ForwardResult attention_forward_autocast(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& rel_k,
                                         const OptTensor& rel_v, const OptTensor& rel_bias,
                                         const OptTensor& buckets, const OptTensor& rel_index,
                                         const OptTensor& alibi_slopes, const OptTensor& key_padding_mask,
                                         bool causal, std::optional<double> scale, int64_t q_offset) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  auto table = [&](const OptTensor& t) -> OptTensor {
    if (!t.has_value() || !t->defined() || !t->is_floating_point()) return t;
    if (t->scalar_type() == dt || t->scalar_type() == at::kFloat) return t;
    return t->to(at::kFloat);  // e.g. a float64 table (cached_cast leaves float64 alone)
  };
  const bool eligible = at::autocast::is_autocast_eligible(q, device);
  if (!eligible) {
    return attention_forward(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask,
                             causal, scale, q_offset);
  }
  return attention_forward(cast(q), cast(k), cast(v), table(rel_k), table(rel_v), table(rel_bias), buckets,
                           rel_index, table(alibi_slopes), key_padding_mask, causal, scale, q_offset);
}

}  // namespace
}  // namespace ops

TORCH_LIBRARY_IMPL(relattn, AutocastCPU, m) {
  m.impl("attention_forward",
         &ops::attention_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(relattn, AutocastCUDA, m) {
  m.impl("attention_forward",
         &ops::attention_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace relattn
