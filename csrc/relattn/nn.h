// relattn::nn — LibTorch modules built on relattn::attention: a multi-head attention layer with
// relative positions, a Transformer encoder layer and stack, and the absolute positional encodings a
// model may still add to its input. Same names and arguments as the Python package `relattn.nn`.
//
//   #include <relattn/nn.h>
//   namespace rnn = relattn::nn;
//   rnn::RelativeTransformerEncoder encoder(rnn::RelativeTransformerEncoderOptions(
//       rnn::RelativeTransformerEncoderLayerOptions(256, 8)
//           .dim_feedforward(1024)
//           .position(rnn::RelativePositionOptions("shaw").max_distance(32)),
//       /*num_layers=*/12).deepnorm(true));
//   torch::Tensor y = encoder(x);  // x, y: [B, L, 256]
//
// Every module takes batch-first inputs [B, L, E]. Padding masks are bool [B, L] with true marking
// padding (the torch::nn::MultiheadAttention convention).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/options/transformerlayer.h>
#include <torch/nn/pimpl.h>

#include "relattn.h"

namespace relattn {
namespace nn {

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ relative positions ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

// How an attention layer encodes the distance d = j - i between query i and key j.
enum class PositionScheme {
  kShaw,      // "shaw": learned key/value embeddings rel_k/rel_v per clipped distance (Shaw et al. 2018)
  kT5,        // "t5": learned scalar bias per head and T5 log-bucket (rel_bias)
  kClipBias,  // "clip_bias": learned scalar bias per head and clipped distance (rel_bias)
  kALiBi,     // "alibi": fixed linear penalty -m_h * |d| (no parameters)
  kNone,      // "none": no positional information inside attention
};

// Parses "shaw", "t5", "clip_bias", "alibi" or "none" (c10::Error otherwise).
PositionScheme position_scheme_from_string(const std::string& name);
// The inverse: "shaw", "t5", ...
std::string to_string(PositionScheme scheme);

// The positional scheme of an attention layer and its arguments. Converts implicitly from the scheme
// or its name, so `.position("alibi")` works where these options are expected.
struct RelativePositionOptions {
  /* implicit */ RelativePositionOptions(PositionScheme scheme = PositionScheme::kShaw);
  /* implicit */ RelativePositionOptions(const std::string& scheme);
  /* implicit */ RelativePositionOptions(const char* scheme);

  // Which scheme; see PositionScheme.
  TORCH_ARG(PositionScheme, scheme);
  // "shaw", "clip_bias": distances are clipped to [-max_distance, max_distance], R = 2*max_distance+1
  // (default 16). "t5": the distance from which all distances share the last bucket (default 128).
  TORCH_ARG(std::optional<int64_t>, max_distance) = std::nullopt;
  // "shaw": learn key-side embeddings rel_k [R, head_dim] (added to the keys inside q·k).
  TORCH_ARG(bool, rel_k) = true;
  // "shaw": learn value-side embeddings rel_v [R, head_dim] (added to the values).
  TORCH_ARG(bool, rel_v) = true;
  // "shaw": one table per head ([H, R, head_dim]) instead of one shared by all heads.
  TORCH_ARG(bool, per_head) = false;
  // "t5": number of buckets R.
  TORCH_ARG(int64_t, num_buckets) = 32;
  // "t5": distinguish keys before and after the query (false: only keys at or before it get
  // distinct buckets, as in a causal decoder).
  TORCH_ARG(bool, bidirectional) = true;

 public:
  // max_distance, or the scheme's default when unset.
  int64_t resolved_max_distance() const;
};

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeMultiheadAttention ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeMultiheadAttentionOptions {
  RelativeMultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads);

  // Model dimension E of query, key, value and output.
  TORCH_ARG(int64_t, embed_dim);
  // Number of query heads H; embed_dim must be a multiple of it (head_dim = E / H).
  TORCH_ARG(int64_t, num_heads);
  // Number of key/value heads Hk (grouped-query attention; 1 = multi-query). Must divide num_heads.
  // Default: num_heads.
  TORCH_ARG(std::optional<int64_t>, num_kv_heads) = std::nullopt;
  // Add biases to the input and output projections.
  TORCH_ARG(bool, bias) = true;
  // Attention dropout. Must be 0: the fused kernel never materialises the attention weights.
  TORCH_ARG(double, dropout) = 0.0;
  // The positional scheme inside attention (default: Shaw keys and values, clipped at 16).
  TORCH_ARG(RelativePositionOptions, position) = RelativePositionOptions();
};

// Multi-head attention with relative positions, batch first:
//   q = query W_q, k = key W_k, v = value W_v, split into heads;
//   out = relattn::attention(q, k, v, <tables of the scheme>) merged and projected by out_proj.
// Parameters: q_proj, k_proj, v_proj, out_proj (Linear) and, by scheme, rel_k / rel_v (shaw) or
// rel_bias (t5, clip_bias). Buffers: buckets (shaw, t5, clip_bias), alibi_slopes (alibi).
class RelativeMultiheadAttentionImpl : public torch::nn::Cloneable<RelativeMultiheadAttentionImpl> {
 public:
  RelativeMultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : RelativeMultiheadAttentionImpl(RelativeMultiheadAttentionOptions(embed_dim, num_heads)) {}
  explicit RelativeMultiheadAttentionImpl(RelativeMultiheadAttentionOptions options);

  // query [B, Lq, E]; key, value [B, Lk, E] (default: query, i.e. self-attention);
  // key_padding_mask bool [B, Lk], true = padding; is_causal masks keys after the query's position.
  // Returns [B, Lq, E]. Query i sits at position i and key j at position j.
  torch::Tensor forward(const torch::Tensor& query, const torch::Tensor& key = {},
                        const torch::Tensor& value = {}, const torch::Tensor& key_padding_mask = {},
                        bool is_causal = false);

  void reset() override;
  // Xavier-uniform projections with zero biases; rel_k / rel_v ~ N(0, 0.02^2); rel_bias = 0.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  // Like torch::nn::Module::to, except that the buffers buckets (integer ids) and alibi_slopes
  // (float32, fixed) keep their dtype and only change device.
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  // Use `owner`'s relative tables (rel_k, rel_v, rel_bias) instead of this module's own: they are
  // dropped from this module's parameters, so an optimizer sees each shared table once and its
  // gradient sums the contributions of every module using it. Both must have the same heads, head
  // dim and position options.
  void share_relative_tables(const RelativeMultiheadAttentionImpl& owner);
  // True after share_relative_tables.
  bool shares_relative_tables() const { return tables_shared_; }

  int64_t head_dim() const { return head_dim_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }

  RelativeMultiheadAttentionOptions options;

  torch::nn::Linear q_proj = nullptr;
  torch::nn::Linear k_proj = nullptr;
  torch::nn::Linear v_proj = nullptr;
  torch::nn::Linear out_proj = nullptr;
  // Relative tables; undefined when the scheme has none.
  torch::Tensor rel_k;     // [R, head_dim] or [H, R, head_dim]
  torch::Tensor rel_v;     // [R, head_dim] or [H, R, head_dim]
  torch::Tensor rel_bias;  // [H, R]
  // Integer [2M+1]: the bucket of each distance (see relattn::clip_buckets / t5_buckets).
  torch::Tensor buckets;
  torch::Tensor alibi_slopes;  // [H]

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(torch::Tensor())},
                           {3, torch::nn::AnyValue(torch::Tensor())}, {4, torch::nn::AnyValue(false)})

 private:
  int64_t head_dim_ = 0;
  int64_t num_kv_heads_ = 0;
  bool tables_shared_ = false;
};
TORCH_MODULE(RelativeMultiheadAttention);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoderLayer ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeTransformerEncoderLayerOptions {
  /* implicit */ RelativeTransformerEncoderLayerOptions(int64_t d_model, int64_t nhead);

  // Model dimension E.
  TORCH_ARG(int64_t, d_model);
  // Number of attention heads.
  TORCH_ARG(int64_t, nhead);
  // Number of key/value heads (grouped-query attention). Default: nhead.
  TORCH_ARG(std::optional<int64_t>, num_kv_heads) = std::nullopt;
  // Hidden size of the feed-forward block.
  TORCH_ARG(int64_t, dim_feedforward) = 2048;
  // Dropout on the attention and feed-forward outputs and inside the feed-forward block (never on the
  // attention weights).
  TORCH_ARG(double, dropout) = 0.1;
  // Feed-forward activation: torch::kReLU, torch::kGELU or a callable. Also settable by name
  // ("relu", "gelu").
  TORCH_ARG(torch::nn::activation_t, activation) = torch::kReLU;
  // Epsilon of both LayerNorms.
  TORCH_ARG(double, layer_norm_eps) = 1e-5;
  // Pre-LN (x + f(LN(x))) instead of post-LN (LN(x + f(x))).
  TORCH_ARG(bool, norm_first) = false;
  // Biases in the linear layers and LayerNorms.
  TORCH_ARG(bool, bias) = true;
  // Residual weight alpha of post-LN blocks: x = LN(alpha * x + f(x)). DeepNorm sets it
  // (RelativeTransformerEncoderOptions::deepnorm); must stay 1 with norm_first.
  TORCH_ARG(double, residual_scale) = 1.0;
  // The positional scheme of the self-attention.
  TORCH_ARG(RelativePositionOptions, position) = RelativePositionOptions();

 public:
  RelativeTransformerEncoderLayerOptions& activation(const std::string& name);
};

// A Transformer encoder layer whose self-attention is RelativeMultiheadAttention:
//   post-LN: x = norm1(a*x + dropout1(self_attn(x)));  x = norm2(a*x + dropout2(ff(x)))
//   pre-LN:  x = x + dropout1(self_attn(norm1(x)));    x = x + dropout2(ff(norm2(x)))
// with ff(x) = linear2(dropout(activation(linear1(x)))) and a = residual_scale.
class RelativeTransformerEncoderLayerImpl
    : public torch::nn::Cloneable<RelativeTransformerEncoderLayerImpl> {
 public:
  RelativeTransformerEncoderLayerImpl(int64_t d_model, int64_t nhead)
      : RelativeTransformerEncoderLayerImpl(RelativeTransformerEncoderLayerOptions(d_model, nhead)) {}
  explicit RelativeTransformerEncoderLayerImpl(RelativeTransformerEncoderLayerOptions options);

  // src [B, L, E]; src_key_padding_mask bool [B, L], true = padding; is_causal: each position
  // attends only to itself and earlier ones. Returns [B, L, E].
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_key_padding_mask = {},
                        bool is_causal = false);

  void reset() override;
  void reset_parameters();
  // DeepNet initialisation (Wang et al. 2022): Xavier-normal with gain `beta` for v_proj, out_proj,
  // linear1 and linear2, gain 1 for q_proj and k_proj; zero biases.
  void deepnorm_reset_parameters(double beta);
  void pretty_print(std::ostream& stream) const override;

  RelativeTransformerEncoderLayerOptions options;

  RelativeMultiheadAttention self_attn = nullptr;
  torch::nn::Linear linear1 = nullptr;
  torch::nn::Dropout dropout = nullptr;
  torch::nn::Linear linear2 = nullptr;
  torch::nn::LayerNorm norm1 = nullptr;
  torch::nn::LayerNorm norm2 = nullptr;
  torch::nn::Dropout dropout1 = nullptr;
  torch::nn::Dropout dropout2 = nullptr;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(false)})

 private:
  torch::Tensor feed_forward(const torch::Tensor& x);
};
TORCH_MODULE(RelativeTransformerEncoderLayer);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoder ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

struct RelativeTransformerEncoderOptions {
  RelativeTransformerEncoderOptions(RelativeTransformerEncoderLayerOptions layer, int64_t num_layers);

  // Options of every layer.
  TORCH_ARG(RelativeTransformerEncoderLayerOptions, layer);
  // Number of layers N.
  TORCH_ARG(int64_t, num_layers);
  // A LayerNorm after the last layer. Default: layer.norm_first (pre-LN stacks need one).
  TORCH_ARG(std::optional<bool>, final_norm) = std::nullopt;
  // Every layer uses the first layer's relative tables (as T5 shares its bias across layers).
  TORCH_ARG(bool, share_relative_tables) = false;
  // DeepNorm (Wang et al. 2022) for deep post-LN stacks: residual x = LN(alpha*x + f(x)) with
  // alpha = (2N)^(1/4), and DeepNet initialisation with beta = (8N)^(-1/4). Needs norm_first = false.
  TORCH_ARG(bool, deepnorm) = false;
};

// A stack of RelativeTransformerEncoderLayer, optionally followed by a LayerNorm.
class RelativeTransformerEncoderImpl : public torch::nn::Cloneable<RelativeTransformerEncoderImpl> {
 public:
  RelativeTransformerEncoderImpl(RelativeTransformerEncoderLayerOptions layer, int64_t num_layers)
      : RelativeTransformerEncoderImpl(RelativeTransformerEncoderOptions(std::move(layer), num_layers)) {}
  explicit RelativeTransformerEncoderImpl(RelativeTransformerEncoderOptions options);

  // src [B, L, E]; src_key_padding_mask bool [B, L], true = padding; is_causal as in the layer.
  // Returns [B, L, E].
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_key_padding_mask = {},
                        bool is_causal = false);

  void reset() override;
  void reset_parameters();
  // A deep copy; with share_relative_tables the copy's layers share the copy's first-layer tables.
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
  void pretty_print(std::ostream& stream) const override;

  // The DeepNorm constants for N layers: alpha = (2N)^(1/4), beta = (8N)^(-1/4).
  static double deepnorm_alpha(int64_t num_layers);
  static double deepnorm_beta(int64_t num_layers);

  // The i-th layer.
  RelativeTransformerEncoderLayer layer(size_t i) const;

  RelativeTransformerEncoderOptions options;

  torch::nn::ModuleList layers = nullptr;
  torch::nn::LayerNorm norm = nullptr;  // null without final_norm

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(false)})

 private:
  void link_shared_tables();
};
TORCH_MODULE(RelativeTransformerEncoder);

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ absolute positional encodings ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Each adds an encoding of the absolute position to its input: forward(x [B, L, E], offset) returns
// x + P[offset : offset + L], where offset is the position of the first row (decoding with a cache).

struct SinusoidalPositionalEncodingOptions {
  /* implicit */ SinusoidalPositionalEncodingOptions(int64_t d_model);

  // Model dimension E (even).
  TORCH_ARG(int64_t, d_model);
  // Wavelength base: P[p, 2i] = sin(p / base^(2i/E)), P[p, 2i+1] = cos(p / base^(2i/E)).
  TORCH_ARG(double, base) = 10000.0;
};

// The fixed sinusoidal encoding of "Attention Is All You Need", computed for any length (no
// parameters, no buffers).
class SinusoidalPositionalEncodingImpl
    : public torch::nn::Cloneable<SinusoidalPositionalEncodingImpl> {
 public:
  explicit SinusoidalPositionalEncodingImpl(SinusoidalPositionalEncodingOptions options);

  torch::Tensor forward(const torch::Tensor& x, int64_t offset = 0);
  // P for positions offset .. offset+length-1: [length, E] (float32 unless given).
  torch::Tensor encoding(int64_t length, int64_t offset = 0,
                         const torch::TensorOptions& tensor_options = {}) const;

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  SinusoidalPositionalEncodingOptions options;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(int64_t{0})})
};
TORCH_MODULE(SinusoidalPositionalEncoding);

struct LearnedPositionalEncodingOptions {
  LearnedPositionalEncodingOptions(int64_t max_len, int64_t d_model);

  // Number of positions with a learned row; longer inputs are an error.
  TORCH_ARG(int64_t, max_len);
  // Model dimension E.
  TORCH_ARG(int64_t, d_model);
  // Standard deviation of the initial weights.
  TORCH_ARG(double, init_std) = 0.02;
};

// A learned table weight [max_len, E] (BERT / GPT-2 style).
class LearnedPositionalEncodingImpl : public torch::nn::Cloneable<LearnedPositionalEncodingImpl> {
 public:
  LearnedPositionalEncodingImpl(int64_t max_len, int64_t d_model)
      : LearnedPositionalEncodingImpl(LearnedPositionalEncodingOptions(max_len, d_model)) {}
  explicit LearnedPositionalEncodingImpl(LearnedPositionalEncodingOptions options);

  torch::Tensor forward(const torch::Tensor& x, int64_t offset = 0);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  LearnedPositionalEncodingOptions options;
  torch::Tensor weight;  // [max_len, E]

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(int64_t{0})})
};
TORCH_MODULE(LearnedPositionalEncoding);

struct MLPPositionalEncodingOptions {
  /* implicit */ MLPPositionalEncodingOptions(int64_t d_model);

  // Model dimension E.
  TORCH_ARG(int64_t, d_model);
  // Hidden width of the MLP.
  TORCH_ARG(int64_t, hidden_dim) = 64;
  // Positions are divided by this before entering the MLP (keeps its input O(1)); positions beyond
  // it are allowed (the MLP extrapolates).
  TORCH_ARG(double, max_len) = 1024.0;
};

// A learned function of the position: P[p] = linear2(gelu(linear1(p / max_len))).
class MLPPositionalEncodingImpl : public torch::nn::Cloneable<MLPPositionalEncodingImpl> {
 public:
  explicit MLPPositionalEncodingImpl(MLPPositionalEncodingOptions options);

  torch::Tensor forward(const torch::Tensor& x, int64_t offset = 0);
  // P for positions offset .. offset+length-1: [length, E] in the parameters' dtype and device.
  torch::Tensor encoding(int64_t length, int64_t offset = 0);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  MLPPositionalEncodingOptions options;
  torch::nn::Linear linear1 = nullptr;
  torch::nn::Linear linear2 = nullptr;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(int64_t{0})})
};
TORCH_MODULE(MLPPositionalEncoding);

}  // namespace nn
}  // namespace relattn
