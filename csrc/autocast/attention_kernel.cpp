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
                                         bool causal, std::optional<double> scale, int64_t q_offset,
                                         double dropout_p, const OptTensor& dropout_seed,
                                         const OptTensor& q_segment_ids, const OptTensor& k_segment_ids,
                                         const OptTensor& q_offsets) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dt, t, device); };
  const Tensor qc = cast(q), kc = cast(k), vc = cast(v);  // float64 stays float64, as in torch's own ops
  // A table must then have q's dtype or float32: others (e.g. float64 beside a cast q) become float32.
  auto table = [&](const OptTensor& t) -> OptTensor {
    if (!t.has_value() || !t->defined() || !t->is_floating_point()) return t;
    if (t->scalar_type() == qc.scalar_type() || t->scalar_type() == at::kFloat) return t;
    return t->to(at::kFloat);
  };
  return attention_forward(qc, kc, vc, table(rel_k), table(rel_v), table(rel_bias), buckets, rel_index,
                           table(alibi_slopes), key_padding_mask, causal, scale, q_offset, dropout_p,
                           dropout_seed, q_segment_ids, k_segment_ids, q_offsets);
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
