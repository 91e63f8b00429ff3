// relattn — fused attention with relative positions for LibTorch.
//
//   #include <relattn/relattn.h>
//   auto out = relattn::attention(q, k, v, relattn::AttentionOptions()
//                                              .rel_k(rel_k).rel_v(rel_v)
//                                              .buckets(relattn::clip_buckets(64)).causal(true));
//
// Every function here calls the ops registered under `torch.ops.relattn` through the dispatcher, so
// CPU and CUDA tensors, autograd, autocast and tracing work the same as from Python.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/arg.h>

namespace relattn {

// Keyword arguments of `attention`; names and meaning follow SPEC §1.
struct AttentionOptions {
  // Key-side relative embeddings aK: [R, D] shared by all heads or [H, R, D] per head.
  TORCH_ARG(std::optional<at::Tensor>, rel_k) = std::nullopt;
  // Value-side relative embeddings aV: [R, Dv] or [H, R, Dv].
  TORCH_ARG(std::optional<at::Tensor>, rel_v) = std::nullopt;
  // Learned scalar bias per head and bucket (T5-style): [H, R].
  TORCH_ARG(std::optional<at::Tensor>, rel_bias) = std::nullopt;
  // Integer [2M+1]: bucket of each distance in [-M, M]; distances beyond use the end entries.
  TORCH_ARG(std::optional<at::Tensor>, buckets) = std::nullopt;
  // Integer [Lq, Lk] or [B, Lq, Lk]: explicit bucket of every (query, key) pair. Excludes buckets.
  TORCH_ARG(std::optional<at::Tensor>, rel_index) = std::nullopt;
  // ALiBi slopes [H] (no gradient).
  TORCH_ARG(std::optional<at::Tensor>, alibi_slopes) = std::nullopt;
  // Bool [B, Lk]; true marks a padding key that is ignored.
  TORCH_ARG(std::optional<at::Tensor>, key_padding_mask) = std::nullopt;
  // Mask keys after the query's position.
  TORCH_ARG(bool, causal) = false;
  // Softmax scale; default 1/sqrt(D).
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
  // Position of query row i is i + q_offset; of key j is j.
  TORCH_ARG(int64_t, q_offset) = 0;
  // Per-batch query offsets: an integer tensor [B] on q's device (int32 is read as it is), added to q_offset:
  // query i of batch row b sits at i + q_offset + q_offsets[b]. The kernels read it on the device, never on
  // the host, so a decode step over sequences of different cached lengths is one call with static shapes
  // (causal masks each row's unfilled cache slots) that a CUDA graph can capture. Excludes segment_ids
  // (pass q_segment_ids and k_segment_ids).
  TORCH_ARG(std::optional<at::Tensor>, q_offsets) = std::nullopt;
  // Dropout on the attention weights: each (query, key) weight is dropped with probability dropout_p
  // (used as a multiple of 1/65536) and the kept ones are scaled by 1 / (1 - dropout_p). The mask comes
  // from a counter-based generator (Philox4x32-10) keyed by dropout_seed, so the backward regenerates it;
  // CPU and CUDA draw the same mask for the same seed. Pass the same dropout_p in eval as in training
  // only if you want dropout there (the modules in relattn/nn.h pass 0 in eval).
  TORCH_ARG(double, dropout_p) = 0.0;
  // An int64 tensor of one element on q's device; drawn with draw_dropout_seed(q) when not given.
  TORCH_ARG(std::optional<at::Tensor>, dropout_seed) = std::nullopt;
  // Segments (packed sequences): key j is masked for query i when their segment ids differ. Integer [B, Lk]
  // (int32 is read as it is; other dtypes are converted); query i's id is segment_ids[b, i + q_offset], so
  // 0 <= q_offset and Lq + q_offset <= Lk. Positions stay j - (i + q_offset): within a packed sequence they
  // are the sequence's own relative positions. Where each row's ids are non-decreasing (the packed
  // sequences numbered 0, 1, 2, ... along the row), the kernels skip the tiles between segments; other
  // ids are correct, but every tile then pays the per-pair test.
  TORCH_ARG(std::optional<at::Tensor>, segment_ids) = std::nullopt;
  // The general form (e.g. cross-attention): query ids [B, Lq] and key ids [B, Lk]; excludes segment_ids.
  TORCH_ARG(std::optional<at::Tensor>, q_segment_ids) = std::nullopt;
  TORCH_ARG(std::optional<at::Tensor>, k_segment_ids) = std::nullopt;
};

// out [B, H, Lq, Dv]. Differentiable in q, k, v, rel_k, rel_v, rel_bias.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& options = {});

// (out [B, H, Lq, Dv], lse [B, H, Lq]); lse is float32 (float64 for float64 inputs) and differentiable.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const AttentionOptions& options = {});

// A fresh dropout seed for attention on like's device: an int64 tensor of one element drawn from torch's
// default generator for that device (so torch::manual_seed makes it reproducible).
at::Tensor draw_dropout_seed(const at::Tensor& like);

// Shaw et al.'s clipping: [0, 1, ..., 2K] (int64), R = 2K + 1.
at::Tensor clip_buckets(int64_t max_distance);

// T5's relative_position_bucket(d) for d in [-max_distance, max_distance] (int64), R = num_buckets.
at::Tensor t5_buckets(int64_t num_buckets = 32, int64_t max_distance = 128, bool bidirectional = true);

// The ALiBi paper's head slopes (float32 [num_heads]).
at::Tensor alibi_slopes(int64_t num_heads);

// Packed sequences: for integer segment ids [..., L] (the ids of each row along the last dimension, as
// AttentionOptions::segment_ids takes them), each token's index among the tokens of its row with the same
// id: 0, 1, 2, ... along each packed sequence, so absolute positions restart at every sequence. int64, the
// shape of segment_ids; ids need not be sorted (tokens of one id count in their order along the row).
at::Tensor segment_positions(const at::Tensor& segment_ids);

// The number of tokens in each token's row with its id (the length of its packed sequence); int64, the
// shape of segment_ids.
at::Tensor segment_lengths(const at::Tensor& segment_ids);

// True when this build of relattn contains its CUDA kernels.
bool cuda_kernels_built();

// major*10000 + minor*100 + patch. Referencing it from a program keeps the library (and so its static
// op registrations) linked in.
int64_t library_version();

}  // namespace relattn
