// The relattn ops: schemas (defined once, here), typed dispatcher handles, and the public C++ API.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "attention.h"
#include "relattn/relattn.h"

namespace relattn {

TORCH_LIBRARY(relattn, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? rel_k, Tensor? rel_v, Tensor? rel_bias, "
      "Tensor? buckets, Tensor? rel_index, Tensor? alibi_slopes, Tensor? key_padding_mask, bool causal, "
      "float? scale, int q_offset, float dropout_p=0., Tensor? dropout_seed=None, Tensor? q_segment_ids=None, "
      "Tensor? k_segment_ids=None, Tensor? q_offsets=None) -> (Tensor out, Tensor lse)");
  // Gradients of absent tables come back as empty tensors.
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? rel_k, Tensor? rel_v, Tensor? rel_bias, Tensor? buckets, Tensor? rel_index, "
      "Tensor? alibi_slopes, Tensor? key_padding_mask, bool causal, float? scale, int q_offset, "
      "float dropout_p=0., Tensor? dropout_seed=None, Tensor? q_segment_ids=None, Tensor? k_segment_ids=None, "
      "Tensor? q_offsets=None) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_rel_k, "
      "Tensor grad_rel_v, Tensor grad_rel_bias)");
  m.def("clip_buckets(int max_distance) -> Tensor", &relattn::clip_buckets);
  m.def("t5_buckets(int num_buckets=32, int max_distance=128, bool bidirectional=True) -> Tensor",
        &relattn::t5_buckets);
  m.def("alibi_slopes(int num_heads) -> Tensor", &relattn::alibi_slopes);
  m.def("segment_positions(Tensor segment_ids) -> Tensor", &relattn::segment_positions);
  m.def("segment_lengths(Tensor segment_ids) -> Tensor", &relattn::segment_lengths);
  m.def("cuda_kernels_built() -> bool", &relattn::cuda_kernels_built);
}

namespace ops {

ForwardResult attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& rel_k,
                                const OptTensor& rel_v, const OptTensor& rel_bias, const OptTensor& buckets,
                                const OptTensor& rel_index, const OptTensor& alibi_slopes,
                                const OptTensor& key_padding_mask, bool causal, std::optional<double> scale,
                                int64_t q_offset, double dropout_p, const OptTensor& dropout_seed,
                                const OptTensor& q_segment_ids, const OptTensor& k_segment_ids,
                                const OptTensor& q_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("relattn::attention_forward", "")
                       .typed<decltype(attention_forward)>();
  return op.call(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask, causal,
                 scale, q_offset, dropout_p, dropout_seed, q_segment_ids, k_segment_ids, q_offsets);
}

BackwardResult attention_backward(const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q,
                                  const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                                  const OptTensor& rel_k, const OptTensor& rel_v, const OptTensor& rel_bias,
                                  const OptTensor& buckets, const OptTensor& rel_index,
                                  const OptTensor& alibi_slopes, const OptTensor& key_padding_mask, bool causal,
                                  std::optional<double> scale, int64_t q_offset, double dropout_p,
                                  const OptTensor& dropout_seed, const OptTensor& q_segment_ids,
                                  const OptTensor& k_segment_ids, const OptTensor& q_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("relattn::attention_backward", "")
                       .typed<decltype(attention_backward)>();
  return op.call(grad_out, grad_lse, q, k, v, out, lse, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes,
                 key_padding_mask, causal, scale, q_offset, dropout_p, dropout_seed, q_segment_ids, k_segment_ids,
                 q_offsets);
}

}  // namespace ops

namespace {
// segment_ids [B, Lk] as (query ids, key ids): query i is position i + q_offset of the key sequence.
std::tuple<at::Tensor, at::Tensor> self_segment_ids(const at::Tensor& ids, const at::Tensor& q, const at::Tensor& k,
                                                    int64_t q_offset) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "relattn.attention: q and k must be 4-D");
  const int64_t Lq = q.size(2), Lk = k.size(2);
  TORCH_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false),
              "relattn.attention: segment_ids must have an integer dtype, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(1) == Lk, "relattn.attention: segment_ids must be [B, Lk] with Lk = ", Lk,
              ", got shape ", ids.sizes());
  TORCH_CHECK(q_offset >= 0 && Lq + q_offset <= Lk, "relattn.attention: segment_ids gives query i the id of key ",
              "position i + q_offset, which needs 0 <= q_offset and Lq + q_offset <= Lk (got Lq = ", Lq,
              ", q_offset = ", q_offset, ", Lk = ", Lk, "); pass q_segment_ids and k_segment_ids instead");
  return {ids.slice(1, q_offset, q_offset + Lq), ids};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const AttentionOptions& o) {
  std::optional<at::Tensor> seed = o.dropout_seed();
  if (o.dropout_p() > 0.0 && !seed.has_value()) seed = draw_dropout_seed(q);
  std::optional<at::Tensor> q_seg = o.q_segment_ids(), k_seg = o.k_segment_ids();
  if (o.segment_ids().has_value()) {
    TORCH_CHECK(!q_seg.has_value() && !k_seg.has_value(),
                "relattn.attention: segment_ids excludes q_segment_ids and k_segment_ids; give one form");
    TORCH_CHECK(!o.q_offsets().has_value(),
                "relattn.attention: segment_ids gives query i the id of key position i + q_offset, which needs a "
                "scalar offset; with q_offsets pass q_segment_ids and k_segment_ids");
    std::tie(q_seg, k_seg) = self_segment_ids(*o.segment_ids(), q, k, o.q_offset());
  }
  return ops::attention_forward(q, k, v, o.rel_k(), o.rel_v(), o.rel_bias(), o.buckets(), o.rel_index(),
                                o.alibi_slopes(), o.key_padding_mask(), o.causal(), o.scale(), o.q_offset(),
                                o.dropout_p(), seed, q_seg, k_seg, o.q_offsets());
}

at::Tensor draw_dropout_seed(const at::Tensor& like) {
  // 62 random bits from the default generator of like's device (graph-safe on CUDA, like any torch RNG op).
  return at::randint(int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong).device(like.device()));
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o) {
  return std::get<0>(attention_with_lse(q, k, v, o));
}

bool cuda_kernels_built() {
#ifdef RELATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t library_version() { return RELATTN_VERSION_NUMBER; }

}  // namespace relattn
