// relattn::nn — LibTorch modules built on relattn::attention: a multi-head attention layer with
// relative positions, Transformer encoder and decoder layers and stacks, a KVCache for token-by-token
// decoding, and the absolute positional encodings a model may still add to its input. Same names and
// arguments as the Python package `relattn.nn` (Python keyword arguments are TORCH_ARG options here):
//
//   #include <relattn/nn.h>
//   namespace rnn = relattn::nn;
//   rnn::RelativeTransformerEncoder encoder(
//       rnn::RelativeTransformerEncoderOptions(
//           rnn::RelativeTransformerEncoderLayerOptions(256, 8).dim_feedforward(1024).position("shaw").max_distance(32),
//           /*num_layers=*/12)
//           .deepnorm(true));
//   torch::Tensor y = encoder(x);  // x, y: [B, L, 256]
//
// Inputs are batch-first ([B, L, E]) unless batch_first(false). Padding masks are bool [B, L] with
// true marking padding (the torch::nn::MultiheadAttention convention).
//
// Positional schemes (option `position`, a PositionScheme or its name):
//   "shaw"       learned relative key (rel_k) and/or value (rel_v) embeddings over distances clipped
//                to ±max_distance (R = 2·max_distance + 1), shared by all heads or one table per head
//                (per_head_tables). Shaw et al. 2018.
//   "t5"         a learned scalar bias per head (rel_bias) over T5's log-spaced buckets (num_buckets,
//                max_distance, bidirectional). Raffel et al. 2020.
//   "clip_bias"  a learned scalar bias per head (rel_bias) over clipped distances, R = 2·max_distance + 1.
//   "alibi"      the fixed linear penalty -m_h·|j - i|; nothing is learned. Press et al. 2022.
//   "none"       no positional information inside attention (add an absolute encoding to the input).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/options/transformerlayer.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>

#include "relattn.h"

namespace relattn {
namespace nn {

// The positional scheme of an attention layer; see the table above.
enum class PositionScheme { kShaw, kT5, kClipBias, kALiBi, kNone };

// Parses "shaw", "t5", "clip_bias", "alibi" or "none" (c10::Error otherwise).
PositionScheme position_scheme_from_string(const std::string& name);
// The scheme's name: "shaw", "t5", ...
std::string to_string(PositionScheme scheme);

// Feed-forward / MLP activation: torch::kReLU, torch::kGELU or a callable (torch's own type).
using activation_t = torch::nn::activation_t;
// Parses "relu" or "gelu".
activation_t activation_from_string(const std::string& name);

// Relative tables by name ("rel_k", "rel_v", "rel_bias").
using RelativeTables = torch::OrderedDict<std::string, torch::Tensor>;

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ KVCache ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

// Keys and values of the positions seen so far, for incremental (token-by-token) decoding; as
// relattn.nn.KVCache in Python. One cache serves a whole model: each RelativeMultiheadAttention that
// receives it (directly or through the encoder layer / stack's `cache` argument) keeps its own slot, its
// projected keys and values [B, Hk, max_length, E/H], allocated at its first call. A call with Lq new
// tokens appends their keys and values and attends from the new queries to every cached key, the new
// tokens at positions length() .. length() + Lq - 1 (AttentionOptions::q_offset): distances, buckets,
// ALiBi and the causal mask are those of the whole sequence. Feed the prompt in one call, then one call
// per generated token; with is_causal the outputs equal the causal model run over the whole sequence.
//
// Cross-attention (key given and not query itself, as in a decoder layer attending to the encoder's
// output) keeps the keys and values projected at its first call and reuses them: the memory does not
// change while decoding.
//
// For inference only: a call that would record gradients is an error (use torch::NoGradGuard or
// c10::InferenceMode). A key_padding_mask passed with the cache covers every cached key,
// [B, length() + Lq]. A module called twice per step (weights tied across layers) would append twice to
// one slot. A call that throws (a module's, a layer's or a stack's) leaves the cache as it found it. Copies
// share the state (a handle, like a module holder; clone() gives an independent copy that the same model
// decodes on, a branch of the decode); a default-constructed KVCache is "no cache". Slots belong to module
// instances (a module and its clone() have different slots).
//
// static_shapes = true: every batch row keeps its own length in an int32 [B] tensor on the device
// (lengths()), new keys and values are written at each row's length, and each call attends to the whole
// max_length slot with the lengths as AttentionOptions::q_offsets. No shape and no host value changes from
// step to step (a decode step can be captured in a CUDA graph), and rows may hold sequences of different
// lengths (prefill prompts padded on the right, then set_lengths to the true lengths). With is_causal the
// causal mask hides the slots not yet written; otherwise a key padding mask built from the lengths does,
// and a key_padding_mask passed with the cache covers the whole slot, [B, max_length]. The lengths are never
// read on the host: writing beyond max_length is caught by the indexing op (an error on the CPU, a
// device-side assertion on CUDA).
class KVCache {
 public:
  KVCache() = default;
  explicit KVCache(int64_t max_length, bool static_shapes = false);

  bool defined() const { return state_ != nullptr; }
  int64_t max_length() const;
  bool static_shapes() const;
  // Positions cached so far (by the first module that used the cache; all agree after a full step). Not for
  // static_shapes (an error): read lengths().
  int64_t length() const;
  // static_shapes: the positions cached so far in each row, int32 [B] (a copy; undefined before the first
  // call unless set_lengths gave them).
  torch::Tensor lengths() const;
  // static_shapes: sets every row's cached length (integer [B]); before the first call, where it writes.
  void set_lengths(const torch::Tensor& lengths);
  // Forget every position and the cross-attention memory (the next call starts a new sequence).
  void reset();
  // Select batch rows of every slot, e.g. the surviving beams of beam search: row b becomes row index[b]. The
  // slots become new tensors: a CUDA graph captured before holds the old ones (capture after reordering).
  void reorder(const torch::Tensor& index);
  // An independent copy: every slot's tensors cloned, the slots still those of the same modules (continue
  // decoding with the same model on either cache).
  KVCache clone() const;

  // Used by RelativeMultiheadAttention (`owner` is the module's cache_id()): writes k and v
  // ([B, Hk, Lq, head_dim]) after `owner`'s cached positions and returns views of all its keys and values and
  // the position of the first new token: an int, or with static_shapes the whole slot and the rows' lengths
  // before this call (int32 [B], the int then 0). The new positions count as cached from commit() on, which
  // the module calls once its attention succeeded.
  std::tuple<torch::Tensor, torch::Tensor, int64_t, torch::Tensor> append(uint64_t owner, const torch::Tensor& k,
                                                                         const torch::Tensor& v);
  void commit(uint64_t owner, int64_t Lq);
  // Used by RelativeMultiheadAttention for cross-attention: `owner`'s projected memory keys and values,
  // from project() at its first call; `batch` is checked against them.
  std::pair<torch::Tensor, torch::Tensor> cross(uint64_t owner, int64_t batch,
                                                const std::function<std::pair<torch::Tensor, torch::Tensor>()>& project);

 private:
  friend class KVCacheStep;  // nn.cpp: one call's changes to the cache, undone if the call throws
  void log_undo(std::function<void()> undo);  // how to revert a change, kept while a KVCacheStep is open
  struct Slot {
    uint64_t owner;
    torch::Tensor keys, values;
    int64_t length;
    torch::Tensor lengths;  // static_shapes: int32 [B]
  };
  struct State {
    int64_t max_length;
    bool static_shapes;
    std::vector<Slot> slots;        // self-attention, in order of first use
    std::vector<Slot> cross_slots;  // cross-attention (length unused)
    torch::Tensor start;            // static_shapes: set_lengths() before the first slot exists
    bool step_open = false;         // a KVCacheStep is open: undo collects how to revert its changes
    std::vector<std::function<void()>> undo;
  };
  std::shared_ptr<State> state_;
};

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeMultiheadAttention ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeMultiheadAttentionOptions {
  RelativeMultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads);

  // Model width E of the query and the output.
  TORCH_ARG(int64_t, embed_dim);
  // Query heads H; embed_dim must be divisible by it (head dim E / H).
  TORCH_ARG(int64_t, num_heads);
  // Dropout on the attention weights (in training mode only), fused into the kernels: see
  // AttentionOptions::dropout_p.
  TORCH_ARG(double, dropout) = 0.0;
  // Biases in the query, key, value and output projections.
  TORCH_ARG(bool, bias) = true;
  // Feature sizes of key and value (default embed_dim).
  TORCH_ARG(std::optional<int64_t>, kdim) = std::nullopt;
  TORCH_ARG(std::optional<int64_t>, vdim) = std::nullopt;
  // Inputs and output are [B, L, E] (default) rather than [L, B, E].
  TORCH_ARG(bool, batch_first) = true;
  // Key/value heads Hk for grouped-query (1 < Hk < H) or multi-query (Hk = 1) attention; num_heads
  // must be a multiple of it. Default num_heads.
  TORCH_ARG(std::optional<int64_t>, num_kv_heads) = std::nullopt;
  // The positional scheme (also settable by name: .position("t5")).
  TORCH_ARG(PositionScheme, position) = PositionScheme::kShaw;
  // Clipping distance of "shaw" / "clip_bias" (default 16), or T5's max_distance for "t5"
  // (default 128). Ignored by "alibi" and "none".
  TORCH_ARG(std::optional<int64_t>, max_distance) = std::nullopt;
  // "shaw": learn relative key / value embeddings (at least one must be true).
  TORCH_ARG(bool, rel_k) = true;
  TORCH_ARG(bool, rel_v) = true;
  // "shaw": one table per head ([H, R, E/H]) instead of one shared by all heads ([R, E/H]).
  TORCH_ARG(bool, per_head_tables) = false;
  // "t5": the number of buckets R.
  TORCH_ARG(int64_t, num_buckets) = 32;
  // "t5": separate buckets for keys before and after the query.
  TORCH_ARG(bool, bidirectional) = true;
  // Softmax scale, default 1/sqrt(E/H).
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;

 public:
  RelativeMultiheadAttentionOptions& position(const std::string& name);
};

// Multi-head attention with relative positions, computed by the fused relattn::attention:
//   q = q_proj(query), k = k_proj(key), v = v_proj(value), split into heads,
//   out = out_proj(merge(relattn::attention(q, k, v, <the scheme's tables and buckets>))).
// Parameters: q_proj, k_proj, v_proj, out_proj and, by scheme, rel_k / rel_v ("shaw") or rel_bias
// ("t5", "clip_bias"). Buffers (derived from the options, never cast by to(dtype)): buckets ("shaw",
// "t5", "clip_bias"; int64 [2M+1]) and alibi_slopes ("alibi"; float32 [H]).
// Unlike torch::nn::MultiheadAttention it returns the output only: the weights are never formed.
class RelativeMultiheadAttentionImpl : public torch::nn::Cloneable<RelativeMultiheadAttentionImpl> {
 public:
  RelativeMultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : RelativeMultiheadAttentionImpl(RelativeMultiheadAttentionOptions(embed_dim, num_heads)) {}
  explicit RelativeMultiheadAttentionImpl(RelativeMultiheadAttentionOptions options);

  // query [B, Lq, E]; key [B, Lk, kdim] (default: query); value [B, Lk, vdim] (default: key);
  // key_padding_mask bool [B, Lk], true = padding (a query with every key masked outputs
  // out_proj's bias, never NaN); is_causal masks keys after the query (j > i); rel_index, integer
  // [Lq, Lk] or [B, Lq, Lk], replaces the distance buckets with an explicit bucket per pair
  // (structural positions; needs a scheme with tables); segment_ids, integer [B, Lk] with Lq == Lk (packed
  // sequences: a query attends only to keys with its id; see AttentionOptions::segment_ids); cache, a
  // KVCache for incremental decoding (self-attention, key and value undefined or query itself: the
  // queries sit at positions cache.length() on and attend to every cached key, which key_padding_mask,
  // rel_index and segment_ids then cover; cross-attention: the keys and values projected at the first
  // call are reused). Returns [B, Lq, E] ([Lq, B, E] when not batch_first). The
  // distance of query i and key j is j - i.
  torch::Tensor forward(const torch::Tensor& query, const torch::Tensor& key = {},
                        const torch::Tensor& value = {}, const torch::Tensor& key_padding_mask = {},
                        bool is_causal = false, const torch::Tensor& rel_index = {},
                        const torch::Tensor& segment_ids = {}, KVCache cache = {});

  void reset() override;
  // Xavier-uniform projection weights, zero biases; rel_k / rel_v ~ N(0, 0.02²); rel_bias = 0 (so
  // training starts from position-free attention). Tables taken from elsewhere are left alone.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // The learned relative tables this scheme uses, by name (empty for "alibi" / "none").
  RelativeTables relative_tables() const;
  // Use `tables` (e.g. another layer's relative_tables()) instead of this module's own: the names
  // must be exactly those relative_tables() returns, with the same shapes. This module then drops
  // its own tables from its parameters and does not register the given ones: they stay parameters of
  // their owner only, so an optimizer sees each shared table once (torch::nn::Module::parameters()
  // does not deduplicate), and its gradient sums the contributions of every module using it.
  void set_relative_tables(const RelativeTables& tables);
  // True after set_relative_tables.
  bool uses_external_tables() const { return external_tables_; }

  // Like torch::nn::Module::to, except that buckets (integer ids) and alibi_slopes (fixed float32)
  // keep their dtype and only change device.
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  int64_t head_dim() const { return head_dim_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  // The resolved max_distance (the scheme's default when unset); 0 for "alibi" / "none".
  int64_t max_distance() const { return max_distance_; }
  // What a KVCache knows this module by: unique to the instance (reset(), and so clone(), draws a new one).
  uint64_t cache_id() const { return cache_id_; }
  // The number of buckets R of the tables; 0 for "alibi" / "none".
  int64_t num_buckets() const { return num_buckets_; }

  RelativeMultiheadAttentionOptions options;

  torch::nn::Linear q_proj = nullptr;
  torch::nn::Linear k_proj = nullptr;
  torch::nn::Linear v_proj = nullptr;
  torch::nn::Linear out_proj = nullptr;
  // Relative tables; undefined when the scheme has none.
  torch::Tensor rel_k;     // [R, E/H] or [H, R, E/H]
  torch::Tensor rel_v;     // [R, E/H] or [H, R, E/H]
  torch::Tensor rel_bias;  // [H, R]
  torch::Tensor buckets;       // int64 [2M+1]: the bucket of each distance in [-M, M]
  torch::Tensor alibi_slopes;  // float32 [H]

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(torch::Tensor())},
                           {3, torch::nn::AnyValue(torch::Tensor())}, {4, torch::nn::AnyValue(false)},
                           {5, torch::nn::AnyValue(torch::Tensor())}, {6, torch::nn::AnyValue(torch::Tensor())},
                           {7, torch::nn::AnyValue(KVCache())})

 private:
  // The tables the scheme uses ("rel_k", "rel_v", "rel_bias") and their shapes.
  std::vector<std::string> table_names() const;
  std::vector<int64_t> table_shape(const std::string& name) const;
  torch::Tensor& table(const std::string& name);

  int64_t head_dim_ = 0;
  int64_t num_kv_heads_ = 0;
  int64_t max_distance_ = 0;
  int64_t num_buckets_ = 0;
  bool external_tables_ = false;
  uint64_t cache_id_ = 0;
};
TORCH_MODULE(RelativeMultiheadAttention);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoderLayer ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeTransformerEncoderLayerOptions {
  /* implicit */ RelativeTransformerEncoderLayerOptions(int64_t d_model, int64_t nhead);

  // Model width.
  TORCH_ARG(int64_t, d_model);
  // Attention heads.
  TORCH_ARG(int64_t, nhead);
  // Hidden width of the feed-forward network.
  TORCH_ARG(int64_t, dim_feedforward) = 2048;
  // Dropout after the attention block, inside and after the feed-forward block. Unlike
  // torch::nn::TransformerEncoderLayer it does not apply to the attention weights.
  TORCH_ARG(double, dropout) = 0.1;
  // torch::kReLU, torch::kGELU or a callable; also settable by name ("relu", "gelu").
  TORCH_ARG(activation_t, activation) = torch::kReLU;
  // Epsilon of both layer norms.
  TORCH_ARG(double, layer_norm_eps) = 1e-5;
  // [B, L, d_model] (default) rather than [L, B, d_model].
  TORCH_ARG(bool, batch_first) = true;
  // Pre-LN instead of post-LN.
  TORCH_ARG(bool, norm_first) = false;
  // Biases in the linear layers and the layer norms. torch::nn::LayerNorm has no such option: with bias(false)
  // its bias stays zero and frozen (requires_grad false), and save_state_dict / load_state_dict leave it out,
  // as Python's LayerNorm(bias=False) has none.
  TORCH_ARG(bool, bias) = true;
  // Key/value heads for grouped-query attention (default nhead).
  TORCH_ARG(std::optional<int64_t>, num_kv_heads) = std::nullopt;
  // Dropout on the attention weights (see RelativeMultiheadAttentionOptions::dropout).
  TORCH_ARG(double, attention_dropout) = 0.0;
  // The positional scheme, passed to RelativeMultiheadAttention (see its options).
  TORCH_ARG(PositionScheme, position) = PositionScheme::kShaw;
  TORCH_ARG(std::optional<int64_t>, max_distance) = std::nullopt;
  TORCH_ARG(bool, rel_k) = true;
  TORCH_ARG(bool, rel_v) = true;
  TORCH_ARG(bool, per_head_tables) = false;
  TORCH_ARG(int64_t, num_buckets) = 32;
  TORCH_ARG(bool, bidirectional) = true;

 public:
  RelativeTransformerEncoderLayerOptions& position(const std::string& name);
  RelativeTransformerEncoderLayerOptions& activation(const std::string& name);
  // The options of this layer's self-attention.
  RelativeMultiheadAttentionOptions attention_options() const;
};

// A Transformer encoder layer (self-attention + feed-forward) using RelativeMultiheadAttention, with
// torch::nn::TransformerEncoderLayer's submodule names. With a = residual_alpha:
//   post-LN: x = norm1(a*x + dropout1(self_attn(x)));  x = norm2(a*x + dropout2(ff(x)))
//   pre-LN:  x = x + dropout1(self_attn(norm1(x)));    x = x + dropout2(ff(norm2(x)))
// where ff(x) = linear2(dropout(activation(linear1(x)))).
class RelativeTransformerEncoderLayerImpl
    : public torch::nn::Cloneable<RelativeTransformerEncoderLayerImpl> {
 public:
  RelativeTransformerEncoderLayerImpl(int64_t d_model, int64_t nhead)
      : RelativeTransformerEncoderLayerImpl(RelativeTransformerEncoderLayerOptions(d_model, nhead)) {}
  explicit RelativeTransformerEncoderLayerImpl(RelativeTransformerEncoderLayerOptions options);

  // src [B, L, d_model] ([L, B, d_model] when not batch_first); src_key_padding_mask bool [B, L],
  // true = padding; is_causal: causal self-attention; rel_index, integer [L, L] or [B, L, L], an explicit
  // bucket per pair (structural positions) in place of the distance buckets (see
  // RelativeMultiheadAttention); segment_ids, integer [B, L]: packed sequences; cache: a KVCache for
  // incremental decoding (src holds the new tokens, src_key_padding_mask covers every cached position).
  // Returns a tensor shaped like src.
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_key_padding_mask = {},
                        bool is_causal = false, const torch::Tensor& rel_index = {},
                        const torch::Tensor& segment_ids = {}, KVCache cache = {});

  void reset() override;
  // A deep copy; with bias(false) its layer norms' biases stay frozen (a cloned torch::nn::LayerNorm would
  // train its bias again).
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
  void reset_parameters();
  // DeepNet initialisation (Wang et al. 2022): Xavier-normal weights with gain `beta` for v_proj,
  // out_proj, linear1 and linear2, gain 1 for q_proj and k_proj.
  void deepnorm_reset_parameters(double beta);
  void pretty_print(std::ostream& stream) const override;

  RelativeTransformerEncoderLayerOptions options;
  // Residual scale of the post-LN sub-layers (DeepNorm's alpha); 1 for a plain layer.
  // RelativeTransformerEncoder sets it with deepnorm.
  double residual_alpha = 1.0;

  RelativeMultiheadAttention self_attn = nullptr;
  torch::nn::Linear linear1 = nullptr;
  torch::nn::Dropout dropout = nullptr;
  torch::nn::Linear linear2 = nullptr;
  torch::nn::LayerNorm norm1 = nullptr;
  torch::nn::LayerNorm norm2 = nullptr;
  torch::nn::Dropout dropout1 = nullptr;
  torch::nn::Dropout dropout2 = nullptr;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(false)},
                          {3, torch::nn::AnyValue(torch::Tensor())}, {4, torch::nn::AnyValue(torch::Tensor())},
                          {5, torch::nn::AnyValue(KVCache())})

 private:
  torch::Tensor feed_forward(const torch::Tensor& x);
};
TORCH_MODULE(RelativeTransformerEncoderLayer);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoder ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeTransformerEncoderOptions {
  // The layers are deep copies (clone()) of encoder_layer, so all start from its weights (as in
  // PyTorch), or fresh layers built from layer options.
  RelativeTransformerEncoderOptions(RelativeTransformerEncoderLayer encoder_layer, int64_t num_layers);
  RelativeTransformerEncoderOptions(const RelativeTransformerEncoderLayerOptions& layer_options,
                                    int64_t num_layers);

  // The layer to copy.
  TORCH_ARG(RelativeTransformerEncoderLayer, encoder_layer);
  // Number of layers N.
  TORCH_ARG(int64_t, num_layers);
  // Optional final module applied to the output (e.g. a LayerNorm after a pre-LN stack); the encoder
  // holds its own copy.
  TORCH_ARG(torch::nn::AnyModule, norm);
  // All layers use the first layer's relative tables (rel_k / rel_v / rel_bias), as T5 shares its bias
  // across layers. They are parameters of the first layer only.
  TORCH_ARG(bool, share_relative_tables) = false;
  // DeepNorm (Wang et al. 2022) for post-LN layers: each sub-layer computes x = LN(alpha·x + f(x)) with
  // alpha = (2N)^(1/4), and v_proj, out_proj, linear1, linear2 are re-initialised Xavier-normal with
  // gain beta = (8N)^(-1/4) (q_proj, k_proj: gain 1). Pre-LN layers are an error.
  TORCH_ARG(bool, deepnorm) = false;
};

// A stack of RelativeTransformerEncoderLayer, optionally followed by `norm`.
class RelativeTransformerEncoderImpl : public torch::nn::Cloneable<RelativeTransformerEncoderImpl> {
 public:
  RelativeTransformerEncoderImpl(RelativeTransformerEncoderLayer encoder_layer, int64_t num_layers)
      : RelativeTransformerEncoderImpl(RelativeTransformerEncoderOptions(std::move(encoder_layer), num_layers)) {}
  RelativeTransformerEncoderImpl(const RelativeTransformerEncoderLayerOptions& layer_options, int64_t num_layers)
      : RelativeTransformerEncoderImpl(RelativeTransformerEncoderOptions(layer_options, num_layers)) {}
  explicit RelativeTransformerEncoderImpl(RelativeTransformerEncoderOptions options);

  // src [B, L, d_model] ([L, B, d_model] when the layers are not batch_first); src_key_padding_mask
  // bool [B, L], true = padding; is_causal: causal self-attention in every layer; rel_index, integer
  // [L, L] or [B, L, L]: structural positions for every layer (an int64 one is converted to int32, what
  // the kernels read, once here rather than once per layer); segment_ids, integer [B, L]: packed sequences
  // (several per batch row, each token attending only to tokens with its id) in every layer; cache: a
  // KVCache for incremental decoding, one slot per layer (src holds the new tokens: the prompt, then one
  // token per call; src_key_padding_mask covers every cached position; with is_causal each call's output
  // equals the new tokens' rows of a causal run over the whole sequence).
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_key_padding_mask = {},
                        bool is_causal = false, const torch::Tensor& rel_index = {},
                        const torch::Tensor& segment_ids = {}, KVCache cache = {});

  void reset() override;
  // A deep copy; with share_relative_tables its layers share the copy's first-layer tables.
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;

  // DeepNorm's constants for N layers: alpha = (2N)^(1/4), beta = (8N)^(-1/4).
  static double deepnorm_alpha(int64_t num_layers);
  static double deepnorm_beta(int64_t num_layers);

  // The i-th layer.
  RelativeTransformerEncoderLayer layer(size_t i) const;

  RelativeTransformerEncoderOptions options;
  torch::nn::ModuleList layers = nullptr;
  torch::nn::AnyModule norm;  // empty without a final norm

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(false)},
                          {3, torch::nn::AnyValue(torch::Tensor())}, {4, torch::nn::AnyValue(torch::Tensor())},
                          {5, torch::nn::AnyValue(KVCache())})
};
TORCH_MODULE(RelativeTransformerEncoder);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerDecoderLayer ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

// The same options as the encoder layer: the positional scheme applies to the self-attention, num_kv_heads
// and attention_dropout to both attention blocks.
using RelativeTransformerDecoderLayerOptions = RelativeTransformerEncoderLayerOptions;

// A Transformer decoder layer (relative self-attention, cross-attention to a memory such as the encoder's
// output, feed-forward), the decoder of an encoder-decoder model such as T5, with
// torch::nn::TransformerDecoderLayer's submodule names. The cross-attention multihead_attn has no
// positions ("none", as in T5). With position "none" and dropout 0 it computes what torch's decoder layer
// computes with the same weights.
//   post-LN: x = norm1(x + dropout1(self_attn(x)));  x = norm2(x + dropout2(multihead_attn(x, memory)));
//            x = norm3(x + dropout3(ff(x)))
//   pre-LN:  each norm applies to its sub-layer's input instead.
class RelativeTransformerDecoderLayerImpl : public torch::nn::Cloneable<RelativeTransformerDecoderLayerImpl> {
 public:
  RelativeTransformerDecoderLayerImpl(int64_t d_model, int64_t nhead)
      : RelativeTransformerDecoderLayerImpl(RelativeTransformerDecoderLayerOptions(d_model, nhead)) {}
  explicit RelativeTransformerDecoderLayerImpl(RelativeTransformerDecoderLayerOptions options);

  // tgt [B, Lt, d_model] ([Lt, B, d_model] when not batch_first); memory [B, Lm, d_model];
  // tgt_key_padding_mask bool [B, Lt] and memory_key_padding_mask bool [B, Lm], true = padding;
  // tgt_is_causal: causal self-attention (what a decoder needs); memory_is_causal: target i sees memory
  // j <= i; rel_index, integer [Lt, Lt] or [B, Lt, Lt]: structural positions of the self-attention; cache:
  // a KVCache for incremental decoding (tgt holds the new tokens, tgt_key_padding_mask covers every cached
  // position, the memory is projected once). Returns a tensor shaped like tgt.
  torch::Tensor forward(const torch::Tensor& tgt, const torch::Tensor& memory,
                        const torch::Tensor& tgt_key_padding_mask = {},
                        const torch::Tensor& memory_key_padding_mask = {}, bool tgt_is_causal = false,
                        bool memory_is_causal = false, const torch::Tensor& rel_index = {}, KVCache cache = {});

  void reset() override;
  // A deep copy; with bias(false) its layer norms' biases stay frozen (a cloned torch::nn::LayerNorm would
  // train its bias again).
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  RelativeTransformerDecoderLayerOptions options;

  RelativeMultiheadAttention self_attn = nullptr;
  RelativeMultiheadAttention multihead_attn = nullptr;
  torch::nn::Linear linear1 = nullptr;
  torch::nn::Dropout dropout = nullptr;
  torch::nn::Linear linear2 = nullptr;
  torch::nn::LayerNorm norm1 = nullptr;
  torch::nn::LayerNorm norm2 = nullptr;
  torch::nn::LayerNorm norm3 = nullptr;
  torch::nn::Dropout dropout1 = nullptr;
  torch::nn::Dropout dropout2 = nullptr;
  torch::nn::Dropout dropout3 = nullptr;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())}, {3, torch::nn::AnyValue(torch::Tensor())},
                          {4, torch::nn::AnyValue(false)}, {5, torch::nn::AnyValue(false)},
                          {6, torch::nn::AnyValue(torch::Tensor())}, {7, torch::nn::AnyValue(KVCache())})
};
TORCH_MODULE(RelativeTransformerDecoderLayer);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerDecoder ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeTransformerDecoderOptions {
  // The layers are deep copies (clone()) of decoder_layer, or fresh layers built from layer options.
  RelativeTransformerDecoderOptions(RelativeTransformerDecoderLayer decoder_layer, int64_t num_layers);
  RelativeTransformerDecoderOptions(const RelativeTransformerDecoderLayerOptions& layer_options, int64_t num_layers);

  TORCH_ARG(RelativeTransformerDecoderLayer, decoder_layer);
  TORCH_ARG(int64_t, num_layers);
  // Optional final module applied to the output; the decoder holds its own copy.
  TORCH_ARG(torch::nn::AnyModule, norm);
  // All layers' self-attention uses the first layer's relative tables (as T5 shares its bias).
  TORCH_ARG(bool, share_relative_tables) = false;
};

// A stack of RelativeTransformerDecoderLayer, optionally followed by `norm`.
class RelativeTransformerDecoderImpl : public torch::nn::Cloneable<RelativeTransformerDecoderImpl> {
 public:
  RelativeTransformerDecoderImpl(RelativeTransformerDecoderLayer decoder_layer, int64_t num_layers)
      : RelativeTransformerDecoderImpl(RelativeTransformerDecoderOptions(std::move(decoder_layer), num_layers)) {}
  RelativeTransformerDecoderImpl(const RelativeTransformerDecoderLayerOptions& layer_options, int64_t num_layers)
      : RelativeTransformerDecoderImpl(RelativeTransformerDecoderOptions(layer_options, num_layers)) {}
  explicit RelativeTransformerDecoderImpl(RelativeTransformerDecoderOptions options);

  // The arguments of RelativeTransformerDecoderLayer::forward, for every layer (with a KVCache, one
  // self-attention and one cross-attention slot per layer). Returns a tensor shaped like tgt.
  torch::Tensor forward(const torch::Tensor& tgt, const torch::Tensor& memory,
                        const torch::Tensor& tgt_key_padding_mask = {},
                        const torch::Tensor& memory_key_padding_mask = {}, bool tgt_is_causal = false,
                        bool memory_is_causal = false, const torch::Tensor& rel_index = {}, KVCache cache = {});

  void reset() override;
  // A deep copy; with share_relative_tables its layers share the copy's first-layer tables.
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;

  // The i-th layer.
  RelativeTransformerDecoderLayer layer(size_t i) const;

  RelativeTransformerDecoderOptions options;
  torch::nn::ModuleList layers = nullptr;
  torch::nn::AnyModule norm;  // empty without a final norm

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())}, {3, torch::nn::AnyValue(torch::Tensor())},
                          {4, torch::nn::AnyValue(false)}, {5, torch::nn::AnyValue(false)},
                          {6, torch::nn::AnyValue(torch::Tensor())}, {7, torch::nn::AnyValue(KVCache())})
};
TORCH_MODULE(RelativeTransformerDecoder);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ absolute positional encodings ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Each maps x [B, L, d_model] to x + P[:L], P holding one row per absolute position. With segment_ids
// (integer [B, L], packed sequences, as the attention layers take them), each token gets the row of its
// position inside its own sequence (relattn::segment_positions), so positions restart at every sequence.

struct SinusoidalPositionalEncodingOptions {
  /* implicit */ SinusoidalPositionalEncodingOptions(int64_t d_model);

  // Feature size (odd sizes drop the last cosine).
  TORCH_ARG(int64_t, d_model);
  // If given, the table for positions [0, max_len) is precomputed (buffer `table`); longer inputs
  // compute theirs on the fly.
  TORCH_ARG(std::optional<int64_t>, max_len) = std::nullopt;
  // The wavelength base (10000 in the paper).
  TORCH_ARG(double, base) = 10000.0;
};

// The fixed encoding of Vaswani et al. 2017: P[p, 2i] = sin(p / base^(2i/d_model)),
// P[p, 2i+1] = cos(p / base^(2i/d_model)). Nothing is learned; defined for every length.
class SinusoidalPositionalEncodingImpl : public torch::nn::Cloneable<SinusoidalPositionalEncodingImpl> {
 public:
  explicit SinusoidalPositionalEncodingImpl(SinusoidalPositionalEncodingOptions options);

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& segment_ids = {});
  // P for positions [0, length): float32 [length, d_model], on `device`.
  torch::Tensor encoding(int64_t length, torch::Device device = torch::kCPU) const;

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Like torch::nn::Module::to, except that the table (derived from the options) stays float32 and only
  // changes device, so that every length is encoded alike.
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  SinusoidalPositionalEncodingOptions options;
  torch::Tensor table;  // float32 [max_len, d_model] when max_len is given

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(SinusoidalPositionalEncoding);

struct LearnedPositionalEncodingOptions {
  LearnedPositionalEncodingOptions(int64_t max_len, int64_t d_model);

  // Number of positions the table holds; longer inputs are an error (positions past the table have no
  // embedding).
  TORCH_ARG(int64_t, max_len);
  // Feature size.
  TORCH_ARG(int64_t, d_model);
  // Standard deviation of the table's normal initialisation (0.02, as in BERT and GPT-2; Python's init_std).
  TORCH_ARG(double, init_std) = 0.02;
};

// A learned embedding per absolute position: weight [max_len, d_model], initialised N(0, init_std²).
class LearnedPositionalEncodingImpl : public torch::nn::Cloneable<LearnedPositionalEncodingImpl> {
 public:
  LearnedPositionalEncodingImpl(int64_t max_len, int64_t d_model)
      : LearnedPositionalEncodingImpl(LearnedPositionalEncodingOptions(max_len, d_model)) {}
  explicit LearnedPositionalEncodingImpl(LearnedPositionalEncodingOptions options);

  // With segment_ids, a sequence longer than max_len is an error (checked on the host only when
  // L > max_len).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& segment_ids = {});

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  LearnedPositionalEncodingOptions options;
  torch::Tensor weight;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(LearnedPositionalEncoding);

struct MLPPositionalEncodingOptions {
  /* implicit */ MLPPositionalEncodingOptions(int64_t d_model);

  // Feature size.
  TORCH_ARG(int64_t, d_model);
  // Hidden width of the MLP.
  TORCH_ARG(int64_t, hidden) = 64;
  // Unset (default): the MLP sees the normalised position p = i / (L - 1) in [0, 1] (0 for L = 1), so
  // every length spans the same range. Set: it sees p = i * scale (1.0: the raw index). With segment_ids,
  // i is the position inside each token's sequence and L that sequence's length.
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
  // torch::kReLU, torch::kGELU (default) or a callable; also settable by name.
  TORCH_ARG(activation_t, activation) = torch::kGELU;

 public:
  MLPPositionalEncodingOptions& activation(const std::string& name);
};

// A learned function of each position's scalar coordinate p: P[i] = fc2(activation(fc1(p))).
class MLPPositionalEncodingImpl : public torch::nn::Cloneable<MLPPositionalEncodingImpl> {
 public:
  explicit MLPPositionalEncodingImpl(MLPPositionalEncodingOptions options);

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& segment_ids = {});
  // The coordinates fed to the MLP: [length, 1] in fc1's dtype and device.
  torch::Tensor positions(int64_t length) const;

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  MLPPositionalEncodingOptions options;
  torch::nn::Linear fc1 = nullptr;
  torch::nn::Linear fc2 = nullptr;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(MLPPositionalEncoding);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ weights from Python ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

// Loads weights trained in Python into a C++ model built from these modules (same names: a Python
// relattn.nn model and its C++ counterpart have the same parameter and buffer names). The file is a dict
// of tensors written by torch.save(dict(model.state_dict()), path) (a plain dict: an OrderedDict's
// metadata does not load in C++). Every tensor is copied into the parameter or buffer of its name,
// converted to its dtype and device. With strict (the default) every parameter must be in the file and
// every entry must name a parameter or buffer, except: buffers these modules derive from their options
// (buckets, alibi_slopes, the sinusoidal table), which Python does not save; and the entries under every
// layer's name for relative tables shared across layers (share_relative_tables), which C++ keeps in the
// first layer only. Shapes must match. Errors (c10::Error) name the entry.
void load_state_dict(torch::nn::Module& module, const std::string& path, bool strict = true);
void load_state_dict(torch::nn::Module& module, const std::unordered_map<std::string, torch::Tensor>& state,
                     bool strict = true);

// The reverse: writes module's weights as Python's state_dict lists them (a dict of CPU tensors by name,
// without the derived buffers, with shared relative tables under every layer's name), for
// model.load_state_dict(relattn.nn.load_weights(path)) in Python (strict).
void save_state_dict(const torch::nn::Module& module, const std::string& path);

}  // namespace nn
}  // namespace relattn
