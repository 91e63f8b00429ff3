// relattn::nn: the modules of relattn/nn.h. Attention itself is relattn::attention (the dispatcher op),
// so these modules run on every device and train from C++ through the op's autograd kernel.
#include "relattn/nn.h"

#include <cmath>
#include <ostream>
#include <type_traits>
#include <variant>

#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>
#include <torch/types.h>
#include <torch/utils.h>

namespace relattn {
namespace nn {

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ relative positions ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

PositionScheme position_scheme_from_string(const std::string& name) {
  if (name == "shaw") return PositionScheme::kShaw;
  if (name == "t5") return PositionScheme::kT5;
  if (name == "clip_bias") return PositionScheme::kClipBias;
  if (name == "alibi") return PositionScheme::kALiBi;
  if (name == "none") return PositionScheme::kNone;
  TORCH_CHECK(false, "relattn::nn: position must be one of \"shaw\", \"t5\", \"clip_bias\", \"alibi\", \"none\"; got \"",
              name, "\"");
}

std::string to_string(PositionScheme scheme) {
  switch (scheme) {
    case PositionScheme::kShaw: return "shaw";
    case PositionScheme::kT5: return "t5";
    case PositionScheme::kClipBias: return "clip_bias";
    case PositionScheme::kALiBi: return "alibi";
    case PositionScheme::kNone: return "none";
  }
  TORCH_CHECK(false, "relattn::nn: unknown PositionScheme ", static_cast<int>(scheme));
}

RelativePositionOptions::RelativePositionOptions(PositionScheme scheme) : scheme_(scheme) {}
RelativePositionOptions::RelativePositionOptions(const std::string& scheme)
    : scheme_(position_scheme_from_string(scheme)) {}
RelativePositionOptions::RelativePositionOptions(const char* scheme)
    : RelativePositionOptions(std::string(scheme)) {}

int64_t RelativePositionOptions::resolved_max_distance() const {
  if (max_distance_.has_value()) return *max_distance_;
  return scheme_ == PositionScheme::kT5 ? 128 : 16;
}

namespace {

bool same_tables(const RelativePositionOptions& a, const RelativePositionOptions& b) {
  if (a.scheme() != b.scheme()) return false;
  switch (a.scheme()) {
    case PositionScheme::kShaw:
      return a.resolved_max_distance() == b.resolved_max_distance() && a.rel_k() == b.rel_k() &&
             a.rel_v() == b.rel_v() && a.per_head() == b.per_head();
    case PositionScheme::kT5:
      return a.num_buckets() == b.num_buckets();
    case PositionScheme::kClipBias:
      return a.resolved_max_distance() == b.resolved_max_distance();
    default:
      return true;
  }
}

void zero_bias(const torch::nn::Linear& linear) {
  if (linear->bias.defined()) torch::nn::init::zeros_(linear->bias);
}

}  // namespace

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeMultiheadAttention ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeMultiheadAttentionOptions::RelativeMultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads)
    : embed_dim_(embed_dim), num_heads_(num_heads) {}

RelativeMultiheadAttentionImpl::RelativeMultiheadAttentionImpl(RelativeMultiheadAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

void RelativeMultiheadAttentionImpl::reset() {
  const int64_t E = options.embed_dim();
  const int64_t H = options.num_heads();
  constexpr const char* who = "relattn::nn::RelativeMultiheadAttention: ";
  TORCH_CHECK(E > 0, who, "embed_dim must be positive, got ", E);
  TORCH_CHECK(H > 0, who, "num_heads must be positive, got ", H);
  TORCH_CHECK(E % H == 0, who, "embed_dim (", E, ") must be a multiple of num_heads (", H, ")");
  num_kv_heads_ = options.num_kv_heads().value_or(H);
  TORCH_CHECK(num_kv_heads_ > 0 && H % num_kv_heads_ == 0, who, "num_kv_heads (", num_kv_heads_,
              ") must be positive and divide num_heads (", H, ")");
  TORCH_CHECK(options.dropout() == 0.0, who,
              "dropout must be 0: the fused attention never materialises the attention weights, so it "
              "cannot drop them (got ",
              options.dropout(), "); apply dropout to the layer's output instead");
  head_dim_ = E / H;
  const int64_t kv_dim = num_kv_heads_ * head_dim_;
  using torch::nn::Linear;
  using torch::nn::LinearOptions;
  q_proj = register_module("q_proj", Linear(LinearOptions(E, E).bias(options.bias())));
  k_proj = register_module("k_proj", Linear(LinearOptions(E, kv_dim).bias(options.bias())));
  v_proj = register_module("v_proj", Linear(LinearOptions(E, kv_dim).bias(options.bias())));
  out_proj = register_module("out_proj", Linear(LinearOptions(E, E).bias(options.bias())));

  const RelativePositionOptions& p = options.position();
  const int64_t M = p.resolved_max_distance();
  if (!tables_shared_) {
    rel_k = rel_v = rel_bias = torch::Tensor();
  }
  buckets = alibi_slopes = torch::Tensor();
  switch (p.scheme()) {
    case PositionScheme::kShaw: {
      TORCH_CHECK(M >= 0, who, "max_distance must be >= 0, got ", M);
      TORCH_CHECK(p.rel_k() || p.rel_v(), who,
                  "position \"shaw\" needs rel_k or rel_v (or both); use position \"none\" for neither");
      const int64_t R = 2 * M + 1;
      const std::vector<int64_t> shape =
          p.per_head() ? std::vector<int64_t>{H, R, head_dim_} : std::vector<int64_t>{R, head_dim_};
      if (!tables_shared_) {
        if (p.rel_k()) rel_k = register_parameter("rel_k", torch::empty(shape));
        if (p.rel_v()) rel_v = register_parameter("rel_v", torch::empty(shape));
      }
      buckets = register_buffer("buckets", relattn::clip_buckets(M));
      break;
    }
    case PositionScheme::kT5:
      buckets = register_buffer("buckets", relattn::t5_buckets(p.num_buckets(), M, p.bidirectional()));
      if (!tables_shared_) rel_bias = register_parameter("rel_bias", torch::empty({H, p.num_buckets()}));
      break;
    case PositionScheme::kClipBias:
      TORCH_CHECK(M >= 0, who, "max_distance must be >= 0, got ", M);
      buckets = register_buffer("buckets", relattn::clip_buckets(M));
      if (!tables_shared_) rel_bias = register_parameter("rel_bias", torch::empty({H, 2 * M + 1}));
      break;
    case PositionScheme::kALiBi:
      alibi_slopes = register_buffer("alibi_slopes", relattn::alibi_slopes(H));
      break;
    case PositionScheme::kNone:
      break;
  }
  reset_parameters();
}

void RelativeMultiheadAttentionImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  for (const auto& linear : {q_proj, k_proj, v_proj, out_proj}) {
    torch::nn::init::xavier_uniform_(linear->weight);
    zero_bias(linear);
  }
  if (tables_shared_) return;  // the owner initialises shared tables
  if (rel_k.defined()) torch::nn::init::normal_(rel_k, 0.0, 0.02);
  if (rel_v.defined()) torch::nn::init::normal_(rel_v, 0.0, 0.02);
  if (rel_bias.defined()) torch::nn::init::zeros_(rel_bias);
}

// torch::nn::Module::to casts every buffer in place (set_data); buckets and alibi_slopes are fixed
// data of their own dtype, so they are copied aside first and put back afterwards.
void RelativeMultiheadAttentionImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  auto moved = [&](const torch::Tensor& t) {
    return t.defined() ? t.to(device, t.scalar_type(), non_blocking, /*copy=*/true) : torch::Tensor();
  };
  const torch::Tensor kept_buckets = moved(buckets);
  const torch::Tensor kept_slopes = moved(alibi_slopes);
  torch::nn::Module::to(device, dtype, non_blocking);
  if (kept_buckets.defined()) buckets.set_data(kept_buckets);
  if (kept_slopes.defined()) alibi_slopes.set_data(kept_slopes);
}

void RelativeMultiheadAttentionImpl::to(torch::Dtype dtype, bool non_blocking) {
  const torch::Tensor kept_buckets = buckets.defined() ? buckets.clone() : torch::Tensor();
  const torch::Tensor kept_slopes = alibi_slopes.defined() ? alibi_slopes.clone() : torch::Tensor();
  torch::nn::Module::to(dtype, non_blocking);
  if (kept_buckets.defined()) buckets.set_data(kept_buckets);
  if (kept_slopes.defined()) alibi_slopes.set_data(kept_slopes);
}

void RelativeMultiheadAttentionImpl::share_relative_tables(const RelativeMultiheadAttentionImpl& owner) {
  TORCH_CHECK(&owner != this, "relattn::nn::RelativeMultiheadAttention: a module cannot share its own tables");
  TORCH_CHECK(owner.options.num_heads() == options.num_heads() && owner.head_dim() == head_dim() &&
                  same_tables(owner.options.position(), options.position()),
              "relattn::nn::RelativeMultiheadAttention: share_relative_tables needs the same num_heads, "
              "head_dim and position options as the owner");
  for (const char* name : {"rel_k", "rel_v", "rel_bias"}) {
    if (parameters_.contains(name)) parameters_.erase(name);
  }
  rel_k = owner.rel_k;
  rel_v = owner.rel_v;
  rel_bias = owner.rel_bias;
  tables_shared_ = true;
}

torch::Tensor RelativeMultiheadAttentionImpl::forward(const torch::Tensor& query, const torch::Tensor& key,
                                                      const torch::Tensor& value,
                                                      const torch::Tensor& key_padding_mask, bool is_causal) {
  const int64_t E = options.embed_dim();
  const int64_t H = options.num_heads();
  const torch::Tensor& key_in = key.defined() ? key : query;
  const torch::Tensor& value_in = value.defined() ? value : key_in;
  TORCH_CHECK(query.dim() == 3 && query.size(2) == E,
              "relattn::nn::RelativeMultiheadAttention: query must be [B, Lq, embed_dim = ", E, "], got ",
              query.sizes());
  TORCH_CHECK(key_in.dim() == 3 && key_in.size(0) == query.size(0) && key_in.size(2) == E,
              "relattn::nn::RelativeMultiheadAttention: key must be [B, Lk, embed_dim] = [", query.size(0),
              ", Lk, ", E, "], got ", key_in.sizes());
  TORCH_CHECK(value_in.dim() == 3 && value_in.size(0) == key_in.size(0) && value_in.size(1) == key_in.size(1) &&
                  value_in.size(2) == E,
              "relattn::nn::RelativeMultiheadAttention: value must have key's shape ", key_in.sizes(), ", got ",
              value_in.sizes());
  const int64_t B = query.size(0);
  const int64_t Lq = query.size(1);
  const int64_t Lk = key_in.size(1);
  // [B, L, heads * head_dim] -> [B, heads, L, head_dim]: a view with a stride-1 last dimension, which
  // is all the op needs.
  const torch::Tensor q = q_proj(query).view({B, Lq, H, head_dim_}).transpose(1, 2);
  const torch::Tensor k = k_proj(key_in).view({B, Lk, num_kv_heads_, head_dim_}).transpose(1, 2);
  const torch::Tensor v = v_proj(value_in).view({B, Lk, num_kv_heads_, head_dim_}).transpose(1, 2);

  AttentionOptions attn;
  attn.causal(is_causal);
  if (key_padding_mask.defined()) attn.key_padding_mask(key_padding_mask);
  if (rel_k.defined()) attn.rel_k(rel_k);
  if (rel_v.defined()) attn.rel_v(rel_v);
  if (rel_bias.defined()) attn.rel_bias(rel_bias);
  if (buckets.defined()) attn.buckets(buckets);
  if (alibi_slopes.defined()) attn.alibi_slopes(alibi_slopes);
  const torch::Tensor out = relattn::attention(q, k, v, attn);  // [B, H, Lq, head_dim]
  return out_proj(out.transpose(1, 2).reshape({B, Lq, E}));
}

void RelativeMultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  const RelativePositionOptions& p = options.position();
  stream << "relattn::nn::RelativeMultiheadAttention(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads() << ", num_kv_heads=" << num_kv_heads_
         << ", bias=" << (options.bias() ? "true" : "false") << ", position=" << to_string(p.scheme());
  switch (p.scheme()) {
    case PositionScheme::kShaw:
      stream << ", max_distance=" << p.resolved_max_distance() << ", rel_k=" << (p.rel_k() ? "true" : "false")
             << ", rel_v=" << (p.rel_v() ? "true" : "false") << ", per_head=" << (p.per_head() ? "true" : "false");
      break;
    case PositionScheme::kT5:
      stream << ", num_buckets=" << p.num_buckets() << ", max_distance=" << p.resolved_max_distance()
             << ", bidirectional=" << (p.bidirectional() ? "true" : "false");
      break;
    case PositionScheme::kClipBias:
      stream << ", max_distance=" << p.resolved_max_distance();
      break;
    default:
      break;
  }
  if (tables_shared_) stream << ", shared tables";
  stream << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoderLayer ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeTransformerEncoderLayerOptions::RelativeTransformerEncoderLayerOptions(int64_t d_model, int64_t nhead)
    : d_model_(d_model), nhead_(nhead) {}

RelativeTransformerEncoderLayerOptions& RelativeTransformerEncoderLayerOptions::activation(
    const std::string& name) {
  if (name == "relu") {
    activation_ = torch::kReLU;
  } else if (name == "gelu") {
    activation_ = torch::kGELU;
  } else {
    TORCH_CHECK(false, "relattn::nn::RelativeTransformerEncoderLayer: activation must be \"relu\" or \"gelu\", got \"",
                name, "\"");
  }
  return *this;
}

RelativeTransformerEncoderLayerImpl::RelativeTransformerEncoderLayerImpl(
    RelativeTransformerEncoderLayerOptions options_)
    : options(std::move(options_)) {
  reset();
}

void RelativeTransformerEncoderLayerImpl::reset() {
  const int64_t E = options.d_model();
  TORCH_CHECK(options.dim_feedforward() > 0,
              "relattn::nn::RelativeTransformerEncoderLayer: dim_feedforward must be positive, got ",
              options.dim_feedforward());
  TORCH_CHECK(options.dropout() >= 0.0 && options.dropout() <= 1.0,
              "relattn::nn::RelativeTransformerEncoderLayer: dropout must lie in [0, 1], got ", options.dropout());
  TORCH_CHECK(!options.norm_first() || options.residual_scale() == 1.0,
              "relattn::nn::RelativeTransformerEncoderLayer: residual_scale (DeepNorm) applies to post-LN layers; "
              "it must be 1 with norm_first");
  self_attn = register_module(
      "self_attn", RelativeMultiheadAttention(RelativeMultiheadAttentionOptions(E, options.nhead())
                                                  .num_kv_heads(options.num_kv_heads())
                                                  .bias(options.bias())
                                                  .position(options.position())));
  using torch::nn::Dropout;
  using torch::nn::LayerNorm;
  using torch::nn::LayerNormOptions;
  using torch::nn::Linear;
  using torch::nn::LinearOptions;
  linear1 = register_module("linear1", Linear(LinearOptions(E, options.dim_feedforward()).bias(options.bias())));
  dropout = register_module("dropout", Dropout(options.dropout()));
  linear2 = register_module("linear2", Linear(LinearOptions(options.dim_feedforward(), E).bias(options.bias())));
  norm1 = register_module("norm1", LayerNorm(LayerNormOptions({E}).eps(options.layer_norm_eps())));
  norm2 = register_module("norm2", LayerNorm(LayerNormOptions({E}).eps(options.layer_norm_eps())));
  dropout1 = register_module("dropout1", Dropout(options.dropout()));
  dropout2 = register_module("dropout2", Dropout(options.dropout()));
}

void RelativeTransformerEncoderLayerImpl::reset_parameters() {
  self_attn->reset_parameters();
  linear1->reset_parameters();
  linear2->reset_parameters();
  norm1->reset_parameters();
  norm2->reset_parameters();
}

void RelativeTransformerEncoderLayerImpl::deepnorm_reset_parameters(double beta) {
  torch::NoGradGuard no_grad;
  auto init = [](const torch::nn::Linear& linear, double gain) {
    torch::nn::init::xavier_normal_(linear->weight, gain);
    zero_bias(linear);
  };
  init(self_attn->q_proj, 1.0);
  init(self_attn->k_proj, 1.0);
  init(self_attn->v_proj, beta);
  init(self_attn->out_proj, beta);
  init(linear1, beta);
  init(linear2, beta);
}

torch::Tensor RelativeTransformerEncoderLayerImpl::feed_forward(const torch::Tensor& x) {
  torch::Tensor h = linear1(x);
  h = std::visit(
      [&](const auto& act) -> torch::Tensor {
        using A = std::decay_t<decltype(act)>;
        if constexpr (std::is_same_v<A, torch::enumtype::kReLU>) {
          return torch::relu(h);
        } else if constexpr (std::is_same_v<A, torch::enumtype::kGELU>) {
          return torch::gelu(h);
        } else {
          return act(h);
        }
      },
      options.activation());
  return linear2(dropout(h));
}

torch::Tensor RelativeTransformerEncoderLayerImpl::forward(const torch::Tensor& src,
                                                           const torch::Tensor& src_key_padding_mask,
                                                           bool is_causal) {
  auto attend = [&](const torch::Tensor& x) {
    return self_attn(x, torch::Tensor(), torch::Tensor(), src_key_padding_mask, is_causal);
  };
  if (options.norm_first()) {
    torch::Tensor x = src + dropout1(attend(norm1(src)));
    return x + dropout2(feed_forward(norm2(x)));
  }
  const double alpha = options.residual_scale();
  auto residual = [alpha](const torch::Tensor& x) { return alpha == 1.0 ? x : x * alpha; };
  torch::Tensor x = norm1(residual(src) + dropout1(attend(src)));
  return norm2(residual(x) + dropout2(feed_forward(x)));
}

void RelativeTransformerEncoderLayerImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeTransformerEncoderLayer(d_model=" << options.d_model()
         << ", nhead=" << options.nhead() << ", dim_feedforward=" << options.dim_feedforward()
         << ", dropout=" << options.dropout() << ", norm_first=" << (options.norm_first() ? "true" : "false");
  if (options.residual_scale() != 1.0) stream << ", residual_scale=" << options.residual_scale();
  stream << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoder ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeTransformerEncoderOptions::RelativeTransformerEncoderOptions(RelativeTransformerEncoderLayerOptions layer,
                                                                     int64_t num_layers)
    : layer_(std::move(layer)), num_layers_(num_layers) {}

RelativeTransformerEncoderImpl::RelativeTransformerEncoderImpl(RelativeTransformerEncoderOptions options_)
    : options(std::move(options_)) {
  reset();
}

double RelativeTransformerEncoderImpl::deepnorm_alpha(int64_t num_layers) {
  return std::pow(2.0 * static_cast<double>(num_layers), 0.25);
}

double RelativeTransformerEncoderImpl::deepnorm_beta(int64_t num_layers) {
  return std::pow(8.0 * static_cast<double>(num_layers), -0.25);
}

void RelativeTransformerEncoderImpl::reset() {
  const int64_t N = options.num_layers();
  TORCH_CHECK(N >= 1, "relattn::nn::RelativeTransformerEncoder: num_layers must be >= 1, got ", N);
  RelativeTransformerEncoderLayerOptions layer_options = options.layer();
  if (options.deepnorm()) {
    TORCH_CHECK(!layer_options.norm_first(),
                "relattn::nn::RelativeTransformerEncoder: deepnorm is for post-LN layers; set norm_first = false");
    layer_options.residual_scale(deepnorm_alpha(N));
  }
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < N; ++i) layers->push_back(RelativeTransformerEncoderLayer(layer_options));
  if (options.final_norm().value_or(layer_options.norm_first())) {
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({layer_options.d_model()})
                                                            .eps(layer_options.layer_norm_eps())));
  } else {
    norm = nullptr;
  }
  if (options.share_relative_tables()) link_shared_tables();
  if (options.deepnorm()) {
    const double beta = deepnorm_beta(N);
    for (int64_t i = 0; i < N; ++i) layer(i)->deepnorm_reset_parameters(beta);
  }
}

void RelativeTransformerEncoderImpl::reset_parameters() {
  for (size_t i = 0; i < layers->size(); ++i) {
    layer(i)->reset_parameters();
    if (options.deepnorm()) layer(i)->deepnorm_reset_parameters(deepnorm_beta(options.num_layers()));
  }
  if (norm) norm->reset_parameters();
}

void RelativeTransformerEncoderImpl::link_shared_tables() {
  const RelativeMultiheadAttention& owner = layer(0)->self_attn;
  for (size_t i = 1; i < layers->size(); ++i) layer(i)->self_attn->share_relative_tables(*owner);
}

std::shared_ptr<torch::nn::Module> RelativeTransformerEncoderImpl::clone(
    const std::optional<torch::Device>& device) const {
  auto copy = std::dynamic_pointer_cast<RelativeTransformerEncoderImpl>(
      torch::nn::Cloneable<RelativeTransformerEncoderImpl>::clone(device));
  // The layers were cloned one by one; point the copies at the copy's own first-layer tables.
  if (copy->options.share_relative_tables()) copy->link_shared_tables();
  return copy;
}

RelativeTransformerEncoderLayer RelativeTransformerEncoderImpl::layer(size_t i) const {
  return RelativeTransformerEncoderLayer(layers->ptr<RelativeTransformerEncoderLayerImpl>(i));
}

torch::Tensor RelativeTransformerEncoderImpl::forward(const torch::Tensor& src,
                                                      const torch::Tensor& src_key_padding_mask, bool is_causal) {
  torch::Tensor x = src;
  for (size_t i = 0; i < layers->size(); ++i) x = layer(i)->forward(x, src_key_padding_mask, is_causal);
  return norm ? norm(x) : x;
}

void RelativeTransformerEncoderImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeTransformerEncoder(num_layers=" << options.num_layers()
         << ", share_relative_tables=" << (options.share_relative_tables() ? "true" : "false")
         << ", deepnorm=" << (options.deepnorm() ? "true" : "false") << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ absolute positional encodings ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

namespace {

void check_input(const torch::Tensor& x, int64_t d_model, int64_t offset, const char* who) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == d_model, "relattn::nn::", who, ": input must be [B, L, d_model = ",
              d_model, "], got ", x.sizes());
  TORCH_CHECK(offset >= 0, "relattn::nn::", who, ": offset must be >= 0, got ", offset);
}

}  // namespace

SinusoidalPositionalEncodingOptions::SinusoidalPositionalEncodingOptions(int64_t d_model) : d_model_(d_model) {}

SinusoidalPositionalEncodingImpl::SinusoidalPositionalEncodingImpl(SinusoidalPositionalEncodingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void SinusoidalPositionalEncodingImpl::reset() {
  TORCH_CHECK(options.d_model() > 0 && options.d_model() % 2 == 0,
              "relattn::nn::SinusoidalPositionalEncoding: d_model must be positive and even, got ", options.d_model());
  TORCH_CHECK(options.base() > 0.0, "relattn::nn::SinusoidalPositionalEncoding: base must be positive, got ",
              options.base());
}

torch::Tensor SinusoidalPositionalEncodingImpl::encoding(int64_t length, int64_t offset,
                                                         const torch::TensorOptions& tensor_options) const {
  TORCH_CHECK(length >= 0 && offset >= 0,
              "relattn::nn::SinusoidalPositionalEncoding: length and offset must be >= 0, got ", length, " and ",
              offset);
  const int64_t E = options.d_model();
  // Computed in float64 so that large positions keep their phase, then cast.
  const auto f64 = tensor_options.dtype(torch::kDouble);
  const torch::Tensor pos = torch::arange(offset, offset + length, f64).unsqueeze(1);              // [L, 1]
  const torch::Tensor inv_freq = torch::exp(torch::arange(0, E, 2, f64) * (-std::log(options.base()) / E));  // [E/2]
  const torch::Tensor angle = pos * inv_freq;                                                      // [L, E/2]
  // Interleave: P[:, 2i] = sin, P[:, 2i+1] = cos.
  const torch::Tensor pe = torch::stack({torch::sin(angle), torch::cos(angle)}, 2).reshape({length, E});
  return pe.to(tensor_options.has_dtype() ? tensor_options.dtype().toScalarType() : torch::kFloat);
}

torch::Tensor SinusoidalPositionalEncodingImpl::forward(const torch::Tensor& x, int64_t offset) {
  check_input(x, options.d_model(), offset, "SinusoidalPositionalEncoding");
  return x + encoding(x.size(1), offset, x.options());
}

void SinusoidalPositionalEncodingImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::SinusoidalPositionalEncoding(d_model=" << options.d_model() << ", base=" << options.base()
         << ")";
}

LearnedPositionalEncodingOptions::LearnedPositionalEncodingOptions(int64_t max_len, int64_t d_model)
    : max_len_(max_len), d_model_(d_model) {}

LearnedPositionalEncodingImpl::LearnedPositionalEncodingImpl(LearnedPositionalEncodingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void LearnedPositionalEncodingImpl::reset() {
  TORCH_CHECK(options.max_len() > 0 && options.d_model() > 0,
              "relattn::nn::LearnedPositionalEncoding: max_len and d_model must be positive, got ", options.max_len(),
              " and ", options.d_model());
  weight = register_parameter("weight", torch::empty({options.max_len(), options.d_model()}));
  reset_parameters();
}

void LearnedPositionalEncodingImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  torch::nn::init::normal_(weight, 0.0, options.init_std());
}

torch::Tensor LearnedPositionalEncodingImpl::forward(const torch::Tensor& x, int64_t offset) {
  check_input(x, options.d_model(), offset, "LearnedPositionalEncoding");
  const int64_t L = x.size(1);
  TORCH_CHECK(offset + L <= options.max_len(), "relattn::nn::LearnedPositionalEncoding: positions up to ",
              offset + L - 1, " (sequence length ", L, ", offset ", offset, ") exceed the table's max_len = ",
              options.max_len());
  return x + weight.narrow(0, offset, L);
}

void LearnedPositionalEncodingImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::LearnedPositionalEncoding(max_len=" << options.max_len()
         << ", d_model=" << options.d_model() << ")";
}

MLPPositionalEncodingOptions::MLPPositionalEncodingOptions(int64_t d_model) : d_model_(d_model) {}

MLPPositionalEncodingImpl::MLPPositionalEncodingImpl(MLPPositionalEncodingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void MLPPositionalEncodingImpl::reset() {
  TORCH_CHECK(options.d_model() > 0 && options.hidden_dim() > 0,
              "relattn::nn::MLPPositionalEncoding: d_model and hidden_dim must be positive, got ", options.d_model(),
              " and ", options.hidden_dim());
  TORCH_CHECK(options.max_len() > 0.0, "relattn::nn::MLPPositionalEncoding: max_len must be positive, got ",
              options.max_len());
  linear1 = register_module("linear1", torch::nn::Linear(1, options.hidden_dim()));
  linear2 = register_module("linear2", torch::nn::Linear(options.hidden_dim(), options.d_model()));
}

torch::Tensor MLPPositionalEncodingImpl::encoding(int64_t length, int64_t offset) {
  TORCH_CHECK(length >= 0 && offset >= 0,
              "relattn::nn::MLPPositionalEncoding: length and offset must be >= 0, got ", length, " and ", offset);
  const torch::Tensor pos =
      torch::arange(offset, offset + length, linear1->weight.options()).unsqueeze(1) / options.max_len();
  return linear2(torch::gelu(linear1(pos)));
}

torch::Tensor MLPPositionalEncodingImpl::forward(const torch::Tensor& x, int64_t offset) {
  check_input(x, options.d_model(), offset, "MLPPositionalEncoding");
  return x + encoding(x.size(1), offset);
}

void MLPPositionalEncodingImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::MLPPositionalEncoding(d_model=" << options.d_model()
         << ", hidden_dim=" << options.hidden_dim() << ", max_len=" << options.max_len() << ")";
}

}  // namespace nn
}  // namespace relattn
