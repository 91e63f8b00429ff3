// relattn::nn: the modules of relattn/nn.h. Attention itself is relattn::attention (the dispatcher op),
// so these modules run on every backend the op has and train from C++ through its autograd kernel.
#include "relattn/nn.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <tuple>
#include <type_traits>
#include <unordered_set>
#include <variant>

#include <c10/util/StringUtil.h>
#include <torch/autograd.h>
#include <torch/nn/init.h>
#include <torch/serialize.h>
#include <torch/types.h>
#include <torch/utils.h>

namespace relattn {
namespace nn {

namespace {

constexpr int64_t kDefaultClipDistance = 16;  // "shaw", "clip_bias"
constexpr int64_t kDefaultT5Distance = 128;    // "t5"

torch::Tensor apply_activation(const activation_t& activation, const torch::Tensor& x) {
  return std::visit(
      [&](const auto& act) -> torch::Tensor {
        using A = std::decay_t<decltype(act)>;
        if constexpr (std::is_same_v<A, torch::enumtype::kReLU>) {
          return torch::relu(x);
        } else if constexpr (std::is_same_v<A, torch::enumtype::kGELU>) {
          return torch::gelu(x);
        } else {
          return act(x);
        }
      },
      activation);
}

std::string join(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", \"" : "\"") + names[i] + "\"";
  return out + "]";
}

std::string bool_str(bool b) { return b ? "true" : "false"; }

}  // namespace

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

activation_t activation_from_string(const std::string& name) {
  if (name == "relu") return torch::kReLU;
  if (name == "gelu") return torch::kGELU;
  TORCH_CHECK(false, "relattn::nn: activation should be \"relu\", \"gelu\" or a callable, got \"", name, "\"");
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeMultiheadAttention ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeMultiheadAttentionOptions::RelativeMultiheadAttentionOptions(int64_t embed_dim, int64_t num_heads)
    : embed_dim_(embed_dim), num_heads_(num_heads) {}

RelativeMultiheadAttentionOptions& RelativeMultiheadAttentionOptions::position(const std::string& name) {
  position_ = position_scheme_from_string(name);
  return *this;
}

RelativeMultiheadAttentionImpl::RelativeMultiheadAttentionImpl(RelativeMultiheadAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

std::vector<std::string> RelativeMultiheadAttentionImpl::table_names() const {
  switch (options.position()) {
    case PositionScheme::kShaw: {
      std::vector<std::string> names;
      if (options.rel_k()) names.emplace_back("rel_k");
      if (options.rel_v()) names.emplace_back("rel_v");
      return names;
    }
    case PositionScheme::kT5:
    case PositionScheme::kClipBias:
      return {"rel_bias"};
    default:
      return {};
  }
}

std::vector<int64_t> RelativeMultiheadAttentionImpl::table_shape(const std::string& name) const {
  const int64_t H = options.num_heads();
  if (name == "rel_bias") return {H, num_buckets_};
  if (options.per_head_tables()) return {H, num_buckets_, head_dim_};
  return {num_buckets_, head_dim_};
}

torch::Tensor& RelativeMultiheadAttentionImpl::table(const std::string& name) {
  if (name == "rel_k") return rel_k;
  if (name == "rel_v") return rel_v;
  TORCH_INTERNAL_ASSERT(name == "rel_bias", "unknown relative table ", name);
  return rel_bias;
}

void RelativeMultiheadAttentionImpl::reset() {
  constexpr const char* who = "relattn::nn::RelativeMultiheadAttention: ";
  static std::atomic<uint64_t> next_cache_id{1};
  cache_id_ = next_cache_id.fetch_add(1);
  const int64_t E = options.embed_dim();
  const int64_t H = options.num_heads();
  TORCH_CHECK(E > 0 && H > 0, who, "embed_dim (", E, ") and num_heads (", H, ") must be positive");
  TORCH_CHECK(E % H == 0, who, "embed_dim (", E, ") must be divisible by num_heads (", H, ")");
  num_kv_heads_ = options.num_kv_heads().value_or(H);
  TORCH_CHECK(num_kv_heads_ > 0 && H % num_kv_heads_ == 0, who, "num_heads (", H,
              ") must be a positive multiple of num_kv_heads (", num_kv_heads_, ")");
  TORCH_CHECK(options.dropout() >= 0.0 && options.dropout() <= 1.0, who,
              "dropout (on the attention weights) must lie in [0, 1], got ", options.dropout());
  const int64_t kdim = options.kdim().value_or(E);
  const int64_t vdim = options.vdim().value_or(E);
  TORCH_CHECK(kdim > 0 && vdim > 0, who, "kdim (", kdim, ") and vdim (", vdim, ") must be positive");
  head_dim_ = E / H;

  const int64_t kv_dim = num_kv_heads_ * head_dim_;
  using torch::nn::Linear;
  using torch::nn::LinearOptions;
  q_proj = register_module("q_proj", Linear(LinearOptions(E, E).bias(options.bias())));
  k_proj = register_module("k_proj", Linear(LinearOptions(kdim, kv_dim).bias(options.bias())));
  v_proj = register_module("v_proj", Linear(LinearOptions(vdim, kv_dim).bias(options.bias())));
  out_proj = register_module("out_proj", Linear(LinearOptions(E, E).bias(options.bias())));

  // The bucket map and the slopes follow from the options.
  buckets = alibi_slopes = torch::Tensor();
  max_distance_ = num_buckets_ = 0;
  switch (options.position()) {
    case PositionScheme::kShaw:
    case PositionScheme::kClipBias:
      max_distance_ = options.max_distance().value_or(kDefaultClipDistance);
      TORCH_CHECK(max_distance_ >= 0, who, "max_distance must be >= 0, got ", max_distance_);
      num_buckets_ = 2 * max_distance_ + 1;
      buckets = register_buffer("buckets", relattn::clip_buckets(max_distance_));
      break;
    case PositionScheme::kT5:
      max_distance_ = options.max_distance().value_or(kDefaultT5Distance);
      TORCH_CHECK(options.num_buckets() > 0, who, "num_buckets must be positive, got ", options.num_buckets());
      num_buckets_ = options.num_buckets();
      buckets = register_buffer("buckets",
                                relattn::t5_buckets(num_buckets_, max_distance_, options.bidirectional()));
      break;
    case PositionScheme::kALiBi:
      alibi_slopes = register_buffer("alibi_slopes", relattn::alibi_slopes(H));
      break;
    case PositionScheme::kNone:
      break;
  }
  TORCH_CHECK(options.position() != PositionScheme::kShaw || options.rel_k() || options.rel_v(), who,
              "position \"shaw\" needs rel_k and/or rel_v");

  // Tables taken from elsewhere (set_relative_tables) stay as they are, also through clone().
  if (!external_tables_) {
    rel_k = rel_v = rel_bias = torch::Tensor();
    for (const std::string& name : table_names()) {
      table(name) = register_parameter(name, torch::empty(table_shape(name)));
    }
  }
  reset_parameters();
}

void RelativeMultiheadAttentionImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  for (const auto& proj : {q_proj, k_proj, v_proj, out_proj}) {
    torch::nn::init::xavier_uniform_(proj->weight);
    if (proj->bias.defined()) torch::nn::init::zeros_(proj->bias);
  }
  if (external_tables_) return;
  if (rel_k.defined()) torch::nn::init::normal_(rel_k, 0.0, 0.02);
  if (rel_v.defined()) torch::nn::init::normal_(rel_v, 0.0, 0.02);
  if (rel_bias.defined()) torch::nn::init::zeros_(rel_bias);
}

RelativeTables RelativeMultiheadAttentionImpl::relative_tables() const {
  RelativeTables tables;
  for (const std::string& name : table_names()) {
    tables.insert(name, name == "rel_k" ? rel_k : name == "rel_v" ? rel_v : rel_bias);
  }
  return tables;
}

void RelativeMultiheadAttentionImpl::set_relative_tables(const RelativeTables& tables) {
  const std::vector<std::string> names = table_names();
  bool same_names = tables.size() == names.size();
  for (const std::string& name : names) same_names = same_names && tables.contains(name);
  TORCH_CHECK(same_names, "relattn::nn::RelativeMultiheadAttention: position \"", to_string(options.position()),
              "\" uses the tables ", join(names), ", got ", join(tables.keys()));
  for (const std::string& name : names) {
    const torch::Tensor& t = tables[name];
    TORCH_CHECK(t.defined() && t.sizes() == torch::IntArrayRef(table_shape(name)),
                "relattn::nn::RelativeMultiheadAttention: table \"", name, "\" must have shape ",
                torch::IntArrayRef(table_shape(name)), ", got ", t.defined() ? c10::str(t.sizes()) : "undefined");
  }
  for (const std::string& name : names) {
    if (parameters_.contains(name)) parameters_.erase(name);
    table(name) = tables[name];
  }
  external_tables_ = true;
}

// torch::nn::Module::to casts every buffer in place (set_data); buckets and alibi_slopes are fixed data
// of their own dtype, so they are copied aside first and put back afterwards.
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

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ KVCache ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

namespace {
constexpr const char* kCacheWho = "relattn::nn::KVCache: ";
}  // namespace

KVCache::KVCache(int64_t max_length, bool static_shapes) {
  TORCH_CHECK(max_length > 0, "relattn::nn::KVCache: max_length must be positive, got ", max_length);
  state_ = std::make_shared<State>(State{max_length, static_shapes, {}, {}, {}});
}

int64_t KVCache::max_length() const { return state_ ? state_->max_length : 0; }

bool KVCache::static_shapes() const { return state_ && state_->static_shapes; }

int64_t KVCache::length() const {
  TORCH_CHECK(!static_shapes(), kCacheWho, "a cache with static_shapes keeps one length per row, on the device; "
              "read lengths()");
  return state_ && !state_->slots.empty() ? state_->slots.front().length : 0;
}

torch::Tensor KVCache::lengths() const {
  TORCH_CHECK(static_shapes(), kCacheWho, "lengths() is for static_shapes; read length()");
  if (!state_->slots.empty()) return state_->slots.front().lengths.clone();
  return state_->start.defined() ? state_->start.clone() : torch::Tensor();
}

void KVCache::set_lengths(const torch::Tensor& lengths) {
  TORCH_CHECK(static_shapes(), kCacheWho, "set_lengths() is for static_shapes");
  TORCH_CHECK(lengths.dim() == 1 && at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false), kCacheWho,
              "lengths must be an integer [B] tensor, got ", lengths.scalar_type(), " of shape ", lengths.sizes());
  if (state_->slots.empty()) state_->start = lengths.to(torch::kInt);
  for (Slot& slot : state_->slots) {
    TORCH_CHECK(lengths.size(0) == slot.lengths.size(0), kCacheWho, "lengths has ", lengths.size(0),
                " rows, the cache ", slot.lengths.size(0));
    slot.lengths.copy_(lengths);
  }
}

void KVCache::reset() {
  if (!state_) return;
  state_->slots.clear();
  state_->cross_slots.clear();
  state_->start = torch::Tensor();
}

void KVCache::reorder(const torch::Tensor& index) {
  if (!state_) return;
  auto select = [&](torch::Tensor& t) {
    if (t.defined()) t = t.index_select(0, index.to(t.device()));
  };
  for (auto* slots : {&state_->slots, &state_->cross_slots}) {
    for (Slot& slot : *slots) {
      select(slot.keys);
      select(slot.values);
      select(slot.lengths);
    }
  }
  select(state_->start);
}

KVCache KVCache::clone() const {
  KVCache copy;
  if (!state_) return copy;
  TORCH_CHECK(!state_->step_open, kCacheWho, "clone() while a call is using the cache");
  copy.state_ = std::make_shared<State>(*state_);
  auto deep = [](torch::Tensor& t) {
    if (t.defined()) t = t.clone();
  };
  for (auto* slots : {&copy.state_->slots, &copy.state_->cross_slots}) {
    for (Slot& slot : *slots) {
      deep(slot.keys);
      deep(slot.values);
      deep(slot.lengths);
    }
  }
  deep(copy.state_->start);
  return copy;
}

// One module, layer or stack call's changes to a cache (the slots it creates, the positions it commits),
// undone if the call throws, so that the cache is left as the call found it. Inert without a cache, and
// inside an open step (the outermost call owns it).
class KVCacheStep {
 public:
  explicit KVCacheStep(const KVCache& cache) {
    if (cache.defined() && !cache.state_->step_open) {
      state_ = cache.state_;
      state_->step_open = true;
      state_->undo.clear();
    }
  }
  ~KVCacheStep() {
    if (!state_) return;
    if (std::uncaught_exceptions() > uncaught_) {
      for (auto it = state_->undo.rbegin(); it != state_->undo.rend(); ++it) (*it)();
    }
    state_->undo.clear();
    state_->step_open = false;
  }
  KVCacheStep(const KVCacheStep&) = delete;
  KVCacheStep& operator=(const KVCacheStep&) = delete;

 private:
  std::shared_ptr<KVCache::State> state_;
  int uncaught_ = std::uncaught_exceptions();
};

namespace {

void check_inference(const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(!(torch::GradMode::is_enabled() && (k.requires_grad() || v.requires_grad())), kCacheWho,
              "the cache is for inference: decode under torch::NoGradGuard or c10::InferenceMode (this call "
              "would record gradients)");
}

// `owner`'s slot in `slots`, or slots.end().
template <typename Slots>
auto find_slot(Slots& slots, uint64_t owner) {
  return std::find_if(slots.begin(), slots.end(), [owner](const auto& slot) { return slot.owner == owner; });
}

}  // namespace

std::pair<torch::Tensor, torch::Tensor> KVCache::cross(
    uint64_t owner, int64_t batch, const std::function<std::pair<torch::Tensor, torch::Tensor>()>& project) {
  TORCH_CHECK(state_, kCacheWho, "use of an undefined (default-constructed) cache");
  auto it = find_slot(state_->cross_slots, owner);
  if (it == state_->cross_slots.end()) {
    auto [k, v] = project();
    check_inference(k, v);
    state_->cross_slots.push_back(Slot{owner, std::move(k), std::move(v), 0, {}});
    log_undo([state = state_.get(), owner] { state->cross_slots.erase(find_slot(state->cross_slots, owner)); });
    it = std::prev(state_->cross_slots.end());
  }
  TORCH_CHECK(it->keys.size(0) == batch, kCacheWho, "this call has batch ", batch,
              ", the cached cross-attention keys batch ", it->keys.size(0),
              " (reset() starts over; reorder() selects rows)");
  return {it->keys, it->values};
}

std::tuple<torch::Tensor, torch::Tensor, int64_t, torch::Tensor> KVCache::append(uint64_t owner,
                                                                                const torch::Tensor& k,
                                                                                const torch::Tensor& v) {
  TORCH_CHECK(state_, kCacheWho, "use of an undefined (default-constructed) cache");
  check_inference(k, v);
  const int64_t B = k.size(0), Lq = k.size(2);
  const bool fixed = state_->static_shapes;
  auto it = find_slot(state_->slots, owner);
  if (it == state_->slots.end()) {
    const std::vector<int64_t> ks{B, k.size(1), state_->max_length, k.size(3)};
    const std::vector<int64_t> vs{B, v.size(1), state_->max_length, v.size(3)};
    torch::Tensor lengths;
    if (fixed) {
      lengths = torch::zeros({B}, k.options().dtype(torch::kInt));
      if (state_->start.defined()) {
        TORCH_CHECK(state_->start.size(0) == B, kCacheWho, "set_lengths gave ", state_->start.size(0),
                    " rows, this call has ", B);
        lengths.copy_(state_->start);
      }
    }
    // static_shapes: zeros, not empty: a slot not yet written is masked, but its value still enters the P·V
    // product of its tile with weight 0, so it must be finite.
    state_->slots.push_back(Slot{owner, fixed ? k.new_zeros(ks) : k.new_empty(ks),
                                 fixed ? v.new_zeros(vs) : v.new_empty(vs), 0, lengths});
    log_undo([state = state_.get(), owner] { state->slots.erase(find_slot(state->slots, owner)); });
    it = std::prev(state_->slots.end());
  }
  Slot& slot = *it;
  TORCH_CHECK(slot.keys.size(0) == B && slot.keys.scalar_type() == k.scalar_type() &&
                  slot.keys.device() == k.device(),
              kCacheWho, "this call has batch ", B, ", ", k.scalar_type(), " on ", k.device(),
              ", the cached keys batch ", slot.keys.size(0), ", ", slot.keys.scalar_type(), " on ", slot.keys.device(),
              " (reset() starts over; reorder() selects rows)");
  if (fixed) {
    TORCH_CHECK(Lq <= state_->max_length, kCacheWho, Lq, " new positions exceed max_length (", state_->max_length,
                ")");
    const torch::Tensor offsets = slot.lengths.clone();
    const torch::Tensor pos =
        (offsets.to(torch::kLong).view({B, 1}) + torch::arange(Lq, offsets.options().dtype(torch::kLong)))
            .view({B, 1, Lq, 1});
    slot.keys.scatter_(2, pos.expand({B, k.size(1), Lq, k.size(3)}), k);
    slot.values.scatter_(2, pos.expand({B, v.size(1), Lq, v.size(3)}), v);
    return {slot.keys, slot.values, 0, offsets};
  }
  TORCH_CHECK(slot.length + Lq <= state_->max_length, kCacheWho, slot.length, " cached + ", Lq,
              " new positions exceed max_length (", state_->max_length, ")");
  using torch::indexing::Slice;
  const int64_t offset = slot.length;
  slot.keys.index({Slice(), Slice(), Slice(offset, offset + Lq)}).copy_(k);
  slot.values.index({Slice(), Slice(), Slice(offset, offset + Lq)}).copy_(v);
  return {slot.keys.index({Slice(), Slice(), Slice(0, offset + Lq)}),
          slot.values.index({Slice(), Slice(), Slice(0, offset + Lq)}), offset, torch::Tensor()};
}

void KVCache::commit(uint64_t owner, int64_t Lq) {
  TORCH_CHECK(state_, kCacheWho, "use of an undefined (default-constructed) cache");
  TORCH_CHECK(find_slot(state_->slots, owner) != state_->slots.end(), kCacheWho, "commit() of a module without a slot");
  auto advance = [state = state_.get(), owner](int64_t n) {
    const auto slot = find_slot(state->slots, owner);
    if (state->static_shapes) {
      slot->lengths.add_(n);
    } else {
      slot->length += n;
    }
  };
  advance(Lq);
  log_undo([advance, Lq] { advance(-Lq); });
}

void KVCache::log_undo(std::function<void()> undo) {
  if (state_->step_open) state_->undo.push_back(std::move(undo));
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeMultiheadAttention ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

torch::Tensor RelativeMultiheadAttentionImpl::forward(const torch::Tensor& query, const torch::Tensor& key,
                                                      const torch::Tensor& value,
                                                      const torch::Tensor& key_padding_mask, bool is_causal,
                                                      const torch::Tensor& rel_index,
                                                      const torch::Tensor& segment_ids, KVCache cache) {
  constexpr const char* who = "relattn::nn::RelativeMultiheadAttention: ";
  const KVCacheStep step(cache);  // a call that throws leaves the cache as it was
  const int64_t E = options.embed_dim();
  const bool self_attention = (!key.defined() || key.is_same(query)) && (!value.defined() || value.is_same(query));
  TORCH_CHECK(!cache.defined() || self_attention || !is_causal, who,
              "causal cross-attention with a cache is not supported (the cached memory has no positions relative "
              "to the new tokens)");
  const torch::Tensor& key_in = key.defined() ? key : query;
  const torch::Tensor& value_in = value.defined() ? value : key_in;
  TORCH_CHECK(query.dim() == 3 && key_in.dim() == 3 && value_in.dim() == 3, who,
              "query, key and value must be 3-D ([B, L, E] when batch_first), got ", query.dim(), "-D, ",
              key_in.dim(), "-D, ", value_in.dim(), "-D");
  const bool bf = options.batch_first();
  const torch::Tensor q_in = bf ? query : query.transpose(0, 1);
  const torch::Tensor k_in = bf ? key_in : key_in.transpose(0, 1);
  const torch::Tensor v_in = bf ? value_in : value_in.transpose(0, 1);
  const int64_t B = q_in.size(0);
  const int64_t Lq = q_in.size(1);
  const int64_t Lk = k_in.size(1);
  TORCH_CHECK(q_in.size(2) == E, who, "query's features must be embed_dim = ", E, ", got shape ", query.sizes());
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == Lk, who,
              "query, key and value must share the batch size and key and value the length, got shapes ",
              query.sizes(), ", ", key_in.sizes(), ", ", value_in.sizes());
  if (key_padding_mask.defined()) {
    TORCH_CHECK(key_padding_mask.scalar_type() == torch::kBool, who,
                "key_padding_mask must be a bool tensor (true = padding), got ", key_padding_mask.scalar_type());
  }
  TORCH_CHECK(!rel_index.defined() || buckets.defined(), who, "rel_index needs a relative table, but position \"",
              to_string(options.position()), "\" has none");

  // [B, L, heads * head_dim] -> [B, heads, L, head_dim]: a view whose last dimension stays contiguous,
  // which is all the op needs.
  const torch::Tensor q = q_proj(q_in).view({B, Lq, options.num_heads(), head_dim_}).transpose(1, 2);
  auto project_kv = [&]() -> std::pair<torch::Tensor, torch::Tensor> {
    return {k_proj(k_in).view({B, Lk, num_kv_heads_, head_dim_}).transpose(1, 2),
            v_proj(v_in).view({B, Lk, num_kv_heads_, head_dim_}).transpose(1, 2)};
  };
  torch::Tensor k, v, q_offsets, mask = key_padding_mask;
  int64_t q_offset = 0;
  if (!cache.defined()) {
    std::tie(k, v) = project_kv();
  } else if (self_attention) {
    auto [k_new, v_new] = project_kv();
    std::tie(k, v, q_offset, q_offsets) = cache.append(cache_id_, k_new, v_new);
    if (q_offsets.defined() && !is_causal) {
      // static shapes: hide the slots no row has written yet (with causal masking they are after every
      // query's position already)
      const torch::Tensor slots = torch::arange(k.size(2), q_offsets.options().dtype(torch::kLong));
      const torch::Tensor unwritten = slots.view({1, -1}) >= (q_offsets + Lq).view({-1, 1});
      mask = mask.defined() ? mask.logical_or(unwritten) : unwritten;
    }
  } else {
    std::tie(k, v) = cache.cross(cache_id_, B, project_kv);
  }

  AttentionOptions attn;
  attn.causal(is_causal).scale(options.scale()).q_offset(q_offset);
  if (q_offsets.defined()) attn.q_offsets(q_offsets);
  if (rel_k.defined()) attn.rel_k(rel_k);
  if (rel_v.defined()) attn.rel_v(rel_v);
  if (rel_bias.defined()) attn.rel_bias(rel_bias);
  if (rel_index.defined()) {
    attn.rel_index(rel_index);
  } else if (buckets.defined()) {
    attn.buckets(buckets);
  }
  if (alibi_slopes.defined()) attn.alibi_slopes(alibi_slopes);
  if (mask.defined()) attn.key_padding_mask(mask);
  if (is_training()) attn.dropout_p(options.dropout());
  if (segment_ids.defined()) attn.segment_ids(segment_ids);
  const torch::Tensor heads = relattn::attention(q, k, v, attn);  // [B, H, Lq, head_dim]
  const torch::Tensor out = out_proj(heads.transpose(1, 2).reshape({B, Lq, E}));
  if (cache.defined() && self_attention) cache.commit(cache_id_, Lq);
  return bf ? out : out.transpose(0, 1);
}

void RelativeMultiheadAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeMultiheadAttention(embed_dim=" << options.embed_dim()
         << ", num_heads=" << options.num_heads();
  if (num_kv_heads_ != options.num_heads()) stream << ", num_kv_heads=" << num_kv_heads_;
  stream << ", position=" << to_string(options.position());
  switch (options.position()) {
    case PositionScheme::kShaw:
      stream << ", max_distance=" << max_distance_ << ", rel_k=" << bool_str(options.rel_k())
             << ", rel_v=" << bool_str(options.rel_v()) << ", per_head_tables=" << bool_str(options.per_head_tables());
      break;
    case PositionScheme::kT5:
      stream << ", max_distance=" << max_distance_ << ", num_buckets=" << num_buckets_
             << ", bidirectional=" << bool_str(options.bidirectional());
      break;
    case PositionScheme::kClipBias:
      stream << ", max_distance=" << max_distance_;
      break;
    default:
      break;
  }
  if (external_tables_) stream << ", external tables";
  if (!options.batch_first()) stream << ", batch_first=false";
  stream << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoderLayer ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeTransformerEncoderLayerOptions::RelativeTransformerEncoderLayerOptions(int64_t d_model, int64_t nhead)
    : d_model_(d_model), nhead_(nhead) {}

RelativeTransformerEncoderLayerOptions& RelativeTransformerEncoderLayerOptions::position(const std::string& name) {
  position_ = position_scheme_from_string(name);
  return *this;
}

RelativeTransformerEncoderLayerOptions& RelativeTransformerEncoderLayerOptions::activation(const std::string& name) {
  activation_ = activation_from_string(name);
  return *this;
}

RelativeMultiheadAttentionOptions RelativeTransformerEncoderLayerOptions::attention_options() const {
  return RelativeMultiheadAttentionOptions(d_model_, nhead_)
      .dropout(attention_dropout_)
      .bias(bias_)
      .batch_first(batch_first_)
      .num_kv_heads(num_kv_heads_)
      .position(position_)
      .max_distance(max_distance_)
      .rel_k(rel_k_)
      .rel_v(rel_v_)
      .per_head_tables(per_head_tables_)
      .num_buckets(num_buckets_)
      .bidirectional(bidirectional_);
}

RelativeTransformerEncoderLayerImpl::RelativeTransformerEncoderLayerImpl(
    RelativeTransformerEncoderLayerOptions options_)
    : options(std::move(options_)) {
  reset();
}

namespace {

// A layer's layer norms by submodule name (encoder: norm1, norm2; decoder: also norm3).
template <typename Layer>
std::vector<std::pair<std::string, torch::nn::LayerNorm>> layer_norms(const Layer& layer) {
  std::vector<std::pair<std::string, torch::nn::LayerNorm>> norms{{"norm1", layer.norm1}, {"norm2", layer.norm2}};
  if constexpr (std::is_same_v<Layer, RelativeTransformerDecoderLayerImpl>) norms.emplace_back("norm3", layer.norm3);
  return norms;
}

// torch::nn::LayerNorm has no bias option: in a layer without biases (Python's LayerNorm(bias=False)) the norms'
// biases stay zero and are not trained.
template <typename Layer>
void freeze_norm_biases(Layer& layer) {
  if (layer.options.bias()) return;
  for (auto& [name, norm] : layer_norms(layer)) norm->bias.requires_grad_(false);
}

// Cloneable::clone, then freeze_norm_biases (a cloned torch::nn::LayerNorm trains its bias again).
template <typename Layer>
std::shared_ptr<torch::nn::Module> clone_layer(const Layer& layer, const std::optional<torch::Device>& device) {
  auto copy = std::dynamic_pointer_cast<Layer>(layer.torch::nn::template Cloneable<Layer>::clone(device));
  freeze_norm_biases(*copy);
  return copy;
}

// The parts an encoder and a decoder layer share (torch's submodule names): the option checks, self_attn,
// the feed-forward linear1 / dropout / linear2, norm1 and norm2, dropout1 and dropout2.
template <typename Layer>
void register_shared_parts(Layer& layer, const char* who) {
  const RelativeTransformerEncoderLayerOptions& o = layer.options;
  const int64_t E = o.d_model();
  TORCH_CHECK(o.dim_feedforward() > 0, who, "dim_feedforward must be positive, got ", o.dim_feedforward());
  TORCH_CHECK(o.dropout() >= 0.0 && o.dropout() <= 1.0, who, "dropout must lie in [0, 1], got ", o.dropout());
  using torch::nn::Dropout;
  using torch::nn::LayerNorm;
  using torch::nn::LayerNormOptions;
  using torch::nn::Linear;
  using torch::nn::LinearOptions;
  layer.self_attn = layer.register_module("self_attn", RelativeMultiheadAttention(o.attention_options()));
  layer.linear1 = layer.register_module("linear1", Linear(LinearOptions(E, o.dim_feedforward()).bias(o.bias())));
  layer.dropout = layer.register_module("dropout", Dropout(o.dropout()));
  layer.linear2 = layer.register_module("linear2", Linear(LinearOptions(o.dim_feedforward(), E).bias(o.bias())));
  layer.norm1 = layer.register_module("norm1", LayerNorm(LayerNormOptions({E}).eps(o.layer_norm_eps())));
  layer.norm2 = layer.register_module("norm2", LayerNorm(LayerNormOptions({E}).eps(o.layer_norm_eps())));
  layer.dropout1 = layer.register_module("dropout1", Dropout(o.dropout()));
  layer.dropout2 = layer.register_module("dropout2", Dropout(o.dropout()));
}

}  // namespace

void RelativeTransformerEncoderLayerImpl::reset() {
  register_shared_parts(*this, "relattn::nn::RelativeTransformerEncoderLayer: ");
  freeze_norm_biases(*this);
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
  torch::nn::init::xavier_normal_(self_attn->q_proj->weight, 1.0);
  torch::nn::init::xavier_normal_(self_attn->k_proj->weight, 1.0);
  for (const auto& linear : {self_attn->v_proj, self_attn->out_proj, linear1, linear2}) {
    torch::nn::init::xavier_normal_(linear->weight, beta);
  }
}

torch::Tensor RelativeTransformerEncoderLayerImpl::feed_forward(const torch::Tensor& x) {
  return dropout2(linear2(dropout(apply_activation(options.activation(), linear1(x)))));
}

torch::Tensor RelativeTransformerEncoderLayerImpl::forward(const torch::Tensor& src,
                                                           const torch::Tensor& src_key_padding_mask,
                                                           bool is_causal, const torch::Tensor& rel_index,
                                                           const torch::Tensor& segment_ids, KVCache cache) {
  const KVCacheStep step(cache);
  auto self_attention = [&](const torch::Tensor& x) {
    return dropout1(self_attn(x, x, x, src_key_padding_mask, is_causal, rel_index, segment_ids, cache));
  };
  if (options.norm_first()) {
    const torch::Tensor x = src + self_attention(norm1(src));
    return x + feed_forward(norm2(x));
  }
  auto residual = [this](const torch::Tensor& x) { return residual_alpha == 1.0 ? x : residual_alpha * x; };
  const torch::Tensor x = norm1(residual(src) + self_attention(src));
  return norm2(residual(x) + feed_forward(x));
}

void RelativeTransformerEncoderLayerImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeTransformerEncoderLayer(d_model=" << options.d_model()
         << ", nhead=" << options.nhead() << ", dim_feedforward=" << options.dim_feedforward()
         << ", dropout=" << options.dropout() << ", norm_first=" << bool_str(options.norm_first());
  if (residual_alpha != 1.0) stream << ", residual_alpha=" << residual_alpha;
  stream << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerEncoder ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

namespace {

// An int64 rel_index as int32 (what the kernels read), once for every layer of a stack; clamping keeps an
// id beyond int32 out of [0, R), so that the op's range check reports it instead of a wrapped-around id
// passing as valid. On the CPU, where reading the range costs no device sync, ids beyond int32 stay int64, so
// that the op's error names the id as given.
torch::Tensor int32_ids(const torch::Tensor& rel_index) {
  if (!rel_index.defined() || rel_index.scalar_type() != torch::kLong) return rel_index;
  constexpr int64_t lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
  if (rel_index.device().is_cpu() && rel_index.numel() > 0) {
    const auto [min, max] = torch::aminmax(rel_index);  // (then no clamp: the same two passes as clamp + convert)
    const bool in_range = lo <= min.item<int64_t>() && max.item<int64_t>() <= hi;
    return in_range ? rel_index.to(torch::kInt) : rel_index;
  }
  return rel_index.clamp(lo, hi).to(torch::kInt);
}

// Every layer of a stack (encoder or decoder) takes its first layer's self-attention tables.
template <typename Stack>
void share_self_attention_tables(Stack& stack) {
  const RelativeTables tables = stack.layer(0)->self_attn->relative_tables();
  for (size_t i = 1; i < stack.layers->size(); ++i) stack.layer(i)->self_attn->set_relative_tables(tables);
}

// What an encoder and a decoder stack build alike: num_layers clones of `layer`, a copy of the final norm,
// and (share_relative_tables) the first layer's tables in every layer.
template <typename Stack, typename Layer>
void build_stack(Stack& stack, const Layer& layer, const char* layer_name, const char* who) {
  const auto& o = stack.options;
  TORCH_CHECK(!layer.is_empty(), who, layer_name, " is an empty module holder");
  TORCH_CHECK(o.num_layers() > 0, who, "num_layers must be positive, got ", o.num_layers());
  stack.layers = stack.register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_layers(); ++i) stack.layers->push_back(layer->clone());
  stack.norm = torch::nn::AnyModule();
  if (!o.norm().is_empty()) {
    stack.norm = o.norm().clone();
    stack.register_module("norm", stack.norm.ptr());
  }
  if (o.share_relative_tables()) share_self_attention_tables(stack);
}

}  // namespace

RelativeTransformerEncoderOptions::RelativeTransformerEncoderOptions(RelativeTransformerEncoderLayer encoder_layer,
                                                                     int64_t num_layers)
    : encoder_layer_(std::move(encoder_layer)), num_layers_(num_layers) {}

RelativeTransformerEncoderOptions::RelativeTransformerEncoderOptions(
    const RelativeTransformerEncoderLayerOptions& layer_options, int64_t num_layers)
    : encoder_layer_(RelativeTransformerEncoderLayer(layer_options)), num_layers_(num_layers) {}

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
  constexpr const char* who = "relattn::nn::RelativeTransformerEncoder: ";
  const int64_t N = options.num_layers();
  build_stack(*this, options.encoder_layer(), "encoder_layer", who);
  TORCH_CHECK(!options.deepnorm() || !options.encoder_layer()->options.norm_first(), who,
              "deepnorm is defined for post-LN layers (norm_first = false)");
  if (options.deepnorm()) {
    const double alpha = deepnorm_alpha(N);
    const double beta = deepnorm_beta(N);
    for (int64_t i = 0; i < N; ++i) {
      layer(i)->residual_alpha = alpha;
      layer(i)->deepnorm_reset_parameters(beta);
    }
  }
}

std::shared_ptr<torch::nn::Module> RelativeTransformerEncoderLayerImpl::clone(
    const std::optional<torch::Device>& device) const {
  return clone_layer(*this, device);
}

std::shared_ptr<torch::nn::Module> RelativeTransformerDecoderLayerImpl::clone(
    const std::optional<torch::Device>& device) const {
  return clone_layer(*this, device);
}

std::shared_ptr<torch::nn::Module> RelativeTransformerEncoderImpl::clone(
    const std::optional<torch::Device>& device) const {
  auto copy = std::dynamic_pointer_cast<RelativeTransformerEncoderImpl>(
      torch::nn::Cloneable<RelativeTransformerEncoderImpl>::clone(device));
  // The layers were cloned one by one and still point at this encoder's tables.
  if (copy->options.share_relative_tables()) share_self_attention_tables(*copy);
  return copy;
}

RelativeTransformerEncoderLayer RelativeTransformerEncoderImpl::layer(size_t i) const {
  return RelativeTransformerEncoderLayer(layers->ptr<RelativeTransformerEncoderLayerImpl>(i));
}

torch::Tensor RelativeTransformerEncoderImpl::forward(const torch::Tensor& src,
                                                      const torch::Tensor& src_key_padding_mask, bool is_causal,
                                                      const torch::Tensor& rel_index,
                                                      const torch::Tensor& segment_ids, KVCache cache) {
  const KVCacheStep step(cache);
  const torch::Tensor ids = int32_ids(rel_index);
  torch::Tensor x = src;
  for (size_t i = 0; i < layers->size(); ++i)
    x = layer(i)->forward(x, src_key_padding_mask, is_causal, ids, segment_ids, cache);
  return norm.is_empty() ? x : norm.forward(x);
}

void RelativeTransformerEncoderImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeTransformerEncoder(num_layers=" << options.num_layers()
         << ", share_relative_tables=" << bool_str(options.share_relative_tables())
         << ", deepnorm=" << bool_str(options.deepnorm()) << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerDecoderLayer ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeTransformerDecoderLayerImpl::RelativeTransformerDecoderLayerImpl(
    RelativeTransformerDecoderLayerOptions options_)
    : options(std::move(options_)) {
  reset();
}

void RelativeTransformerDecoderLayerImpl::reset() {
  register_shared_parts(*this, "relattn::nn::RelativeTransformerDecoderLayer: ");
  multihead_attn = register_module(
      "multihead_attn", RelativeMultiheadAttention(options.attention_options().position(PositionScheme::kNone)));
  const auto norm_options = torch::nn::LayerNormOptions({options.d_model()}).eps(options.layer_norm_eps());
  norm3 = register_module("norm3", torch::nn::LayerNorm(norm_options));
  dropout3 = register_module("dropout3", torch::nn::Dropout(options.dropout()));
  freeze_norm_biases(*this);
}

void RelativeTransformerDecoderLayerImpl::reset_parameters() {
  self_attn->reset_parameters();
  multihead_attn->reset_parameters();
  linear1->reset_parameters();
  linear2->reset_parameters();
  norm1->reset_parameters();
  norm2->reset_parameters();
  norm3->reset_parameters();
}

torch::Tensor RelativeTransformerDecoderLayerImpl::forward(const torch::Tensor& tgt, const torch::Tensor& memory,
                                                           const torch::Tensor& tgt_key_padding_mask,
                                                           const torch::Tensor& memory_key_padding_mask,
                                                           bool tgt_is_causal, bool memory_is_causal,
                                                           const torch::Tensor& rel_index, KVCache cache) {
  const KVCacheStep step(cache);
  auto self_attention = [&](const torch::Tensor& x) {
    return dropout1(self_attn(x, x, x, tgt_key_padding_mask, tgt_is_causal, rel_index, torch::Tensor(), cache));
  };
  auto cross_attention = [&](const torch::Tensor& x) {
    return dropout2(multihead_attn(x, memory, memory, memory_key_padding_mask, memory_is_causal, torch::Tensor(),
                                   torch::Tensor(), cache));
  };
  auto feed_forward = [&](const torch::Tensor& x) {
    return dropout3(linear2(dropout(apply_activation(options.activation(), linear1(x)))));
  };
  torch::Tensor x = tgt;
  if (options.norm_first()) {
    x = x + self_attention(norm1(x));
    x = x + cross_attention(norm2(x));
    return x + feed_forward(norm3(x));
  }
  x = norm1(x + self_attention(x));
  x = norm2(x + cross_attention(x));
  return norm3(x + feed_forward(x));
}

void RelativeTransformerDecoderLayerImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeTransformerDecoderLayer(d_model=" << options.d_model()
         << ", nhead=" << options.nhead() << ", dim_feedforward=" << options.dim_feedforward()
         << ", dropout=" << options.dropout() << ", norm_first=" << bool_str(options.norm_first()) << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ RelativeTransformerDecoder ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

RelativeTransformerDecoderOptions::RelativeTransformerDecoderOptions(RelativeTransformerDecoderLayer decoder_layer,
                                                                     int64_t num_layers)
    : decoder_layer_(std::move(decoder_layer)), num_layers_(num_layers) {}

RelativeTransformerDecoderOptions::RelativeTransformerDecoderOptions(
    const RelativeTransformerDecoderLayerOptions& layer_options, int64_t num_layers)
    : decoder_layer_(RelativeTransformerDecoderLayer(layer_options)), num_layers_(num_layers) {}

RelativeTransformerDecoderImpl::RelativeTransformerDecoderImpl(RelativeTransformerDecoderOptions options_)
    : options(std::move(options_)) {
  reset();
}

void RelativeTransformerDecoderImpl::reset() {
  build_stack(*this, options.decoder_layer(), "decoder_layer", "relattn::nn::RelativeTransformerDecoder: ");
}

std::shared_ptr<torch::nn::Module> RelativeTransformerDecoderImpl::clone(
    const std::optional<torch::Device>& device) const {
  auto copy = std::dynamic_pointer_cast<RelativeTransformerDecoderImpl>(
      torch::nn::Cloneable<RelativeTransformerDecoderImpl>::clone(device));
  // The layers were cloned one by one and still point at this decoder's tables.
  if (copy->options.share_relative_tables()) share_self_attention_tables(*copy);
  return copy;
}

RelativeTransformerDecoderLayer RelativeTransformerDecoderImpl::layer(size_t i) const {
  return RelativeTransformerDecoderLayer(layers->ptr<RelativeTransformerDecoderLayerImpl>(i));
}

torch::Tensor RelativeTransformerDecoderImpl::forward(const torch::Tensor& tgt, const torch::Tensor& memory,
                                                      const torch::Tensor& tgt_key_padding_mask,
                                                      const torch::Tensor& memory_key_padding_mask,
                                                      bool tgt_is_causal, bool memory_is_causal,
                                                      const torch::Tensor& rel_index, KVCache cache) {
  const KVCacheStep step(cache);
  const torch::Tensor ids = int32_ids(rel_index);
  torch::Tensor x = tgt;
  for (size_t i = 0; i < layers->size(); ++i) {
    x = layer(i)->forward(x, memory, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal, memory_is_causal,
                          ids, cache);
  }
  return norm.is_empty() ? x : norm.forward(x);
}

void RelativeTransformerDecoderImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::RelativeTransformerDecoder(num_layers=" << options.num_layers()
         << ", share_relative_tables=" << bool_str(options.share_relative_tables()) << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ absolute positional encodings ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

namespace {

void check_input(const torch::Tensor& x, int64_t d_model, const char* who) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == d_model, "relattn::nn::", who, ": expected input [B, L, ", d_model,
              "], got ", x.sizes());
}

// Positions inside each packed sequence, [B, L] int64, for x [B, L, d_model].
torch::Tensor packed_positions(const torch::Tensor& segment_ids, const torch::Tensor& x, const char* who) {
  TORCH_CHECK(segment_ids.dim() == 2 && segment_ids.size(0) == x.size(0) && segment_ids.size(1) == x.size(1),
              "relattn::nn::", who, ": segment_ids must be [B, L] = [", x.size(0), ", ", x.size(1),
              "] like the input, got ", segment_ids.sizes());
  TORCH_CHECK(segment_ids.device() == x.device(), "relattn::nn::", who, ": segment_ids must be on the input's device (",
              x.device(), "), got ", segment_ids.device());
  return relattn::segment_positions(segment_ids);
}

// Sin in even features, cos in odd ones, for the positions `position` [...]: float32 [..., d].
torch::Tensor sinusoid(const torch::Tensor& position, int64_t d, double base) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(position.device());
  const torch::Tensor inv_freq = torch::exp(torch::arange(0, d, 2, f32) * (-std::log(base) / d));
  const torch::Tensor angle = position.to(torch::kFloat).unsqueeze(-1) * inv_freq;  // [..., ceil(d / 2)]
  return torch::stack({torch::sin(angle), torch::cos(angle)}, -1).flatten(-2).narrow(-1, 0, d);
}

}  // namespace

SinusoidalPositionalEncodingOptions::SinusoidalPositionalEncodingOptions(int64_t d_model) : d_model_(d_model) {}

SinusoidalPositionalEncodingImpl::SinusoidalPositionalEncodingImpl(SinusoidalPositionalEncodingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void SinusoidalPositionalEncodingImpl::reset() {
  TORCH_CHECK(options.d_model() > 0, "relattn::nn::SinusoidalPositionalEncoding: d_model must be positive, got ",
              options.d_model());
  TORCH_CHECK(options.base() > 0.0, "relattn::nn::SinusoidalPositionalEncoding: base must be positive, got ",
              options.base());
  table = torch::Tensor();
  if (options.max_len().has_value()) {
    TORCH_CHECK(*options.max_len() >= 0, "relattn::nn::SinusoidalPositionalEncoding: max_len must be >= 0, got ",
                *options.max_len());
    table = register_buffer("table", encoding(*options.max_len()));
  }
}

torch::Tensor SinusoidalPositionalEncodingImpl::encoding(int64_t length, torch::Device device) const {
  // float32, as in relattn.nn (Python), so both give the same table.
  return sinusoid(torch::arange(length, torch::TensorOptions().dtype(torch::kFloat).device(device)),
                  options.d_model(), options.base());
}

void SinusoidalPositionalEncodingImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  if (table.defined()) table.set_data(encoding(table.size(0), device));
}

void SinusoidalPositionalEncodingImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  if (table.defined()) table.set_data(encoding(table.size(0), table.device()));
}

torch::Tensor SinusoidalPositionalEncodingImpl::forward(const torch::Tensor& x, const torch::Tensor& segment_ids) {
  check_input(x, options.d_model(), "SinusoidalPositionalEncoding");
  if (segment_ids.defined()) {
    const torch::Tensor p = packed_positions(segment_ids, x, "SinusoidalPositionalEncoding");
    return x + sinusoid(p, options.d_model(), options.base()).to(x.dtype());
  }
  const int64_t L = x.size(1);
  const torch::Tensor pe =
      table.defined() && L <= table.size(0) ? table.narrow(0, 0, L) : encoding(L, x.device());
  return x + pe.to(x.dtype());
}

void SinusoidalPositionalEncodingImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::SinusoidalPositionalEncoding(d_model=" << options.d_model() << ", max_len=";
  if (options.max_len().has_value()) {
    stream << *options.max_len();
  } else {
    stream << "none";
  }
  stream << ")";
}

LearnedPositionalEncodingOptions::LearnedPositionalEncodingOptions(int64_t max_len, int64_t d_model)
    : max_len_(max_len), d_model_(d_model) {}

LearnedPositionalEncodingImpl::LearnedPositionalEncodingImpl(LearnedPositionalEncodingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void LearnedPositionalEncodingImpl::reset() {
  TORCH_CHECK(options.max_len() > 0 && options.d_model() > 0, "relattn::nn::LearnedPositionalEncoding: max_len (",
              options.max_len(), ") and d_model (", options.d_model(), ") must be positive");
  TORCH_CHECK(std::isfinite(options.init_std()) && options.init_std() >= 0.0,
              "relattn::nn::LearnedPositionalEncoding: init_std must be finite and >= 0, got ", options.init_std());
  weight = register_parameter("weight", torch::empty({options.max_len(), options.d_model()}));
  reset_parameters();
}

void LearnedPositionalEncodingImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  torch::nn::init::normal_(weight, 0.0, options.init_std());
}

torch::Tensor LearnedPositionalEncodingImpl::forward(const torch::Tensor& x, const torch::Tensor& segment_ids) {
  check_input(x, options.d_model(), "LearnedPositionalEncoding");
  const int64_t L = x.size(1);
  if (segment_ids.defined()) {
    const torch::Tensor p = packed_positions(segment_ids, x, "LearnedPositionalEncoding");
    // Positions are < L, so only L > max_len needs the (host) check of the longest sequence.
    if (L > options.max_len() && p.numel() > 0) {
      const int64_t longest = p.max().item<int64_t>() + 1;
      TORCH_CHECK(longest <= options.max_len(), "relattn::nn::LearnedPositionalEncoding: a packed sequence of length ",
                  longest, " exceeds the table's max_len=", options.max_len());
    }
    return x + weight.index({p}).to(x.dtype());
  }
  TORCH_CHECK(L <= options.max_len(), "relattn::nn::LearnedPositionalEncoding: sequence length ", L,
              " exceeds the table's max_len=", options.max_len());
  return x + weight.narrow(0, 0, L).to(x.dtype());
}

void LearnedPositionalEncodingImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::LearnedPositionalEncoding(max_len=" << options.max_len()
         << ", d_model=" << options.d_model() << ")";
}

MLPPositionalEncodingOptions::MLPPositionalEncodingOptions(int64_t d_model) : d_model_(d_model) {}

MLPPositionalEncodingOptions& MLPPositionalEncodingOptions::activation(const std::string& name) {
  activation_ = activation_from_string(name);
  return *this;
}

MLPPositionalEncodingImpl::MLPPositionalEncodingImpl(MLPPositionalEncodingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void MLPPositionalEncodingImpl::reset() {
  TORCH_CHECK(options.d_model() > 0 && options.hidden() > 0, "relattn::nn::MLPPositionalEncoding: d_model (",
              options.d_model(), ") and hidden (", options.hidden(), ") must be positive");
  fc1 = register_module("fc1", torch::nn::Linear(1, options.hidden()));
  fc2 = register_module("fc2", torch::nn::Linear(options.hidden(), options.d_model()));
}

torch::Tensor MLPPositionalEncodingImpl::positions(int64_t length) const {
  const torch::Tensor index = torch::arange(length, fc1->weight.options().requires_grad(false));
  if (!options.scale().has_value()) return (index / static_cast<double>(std::max<int64_t>(length - 1, 1))).unsqueeze(1);
  return (index * *options.scale()).unsqueeze(1);
}

torch::Tensor MLPPositionalEncodingImpl::forward(const torch::Tensor& x, const torch::Tensor& segment_ids) {
  check_input(x, options.d_model(), "MLPPositionalEncoding");
  torch::Tensor p;
  if (segment_ids.defined()) {
    torch::Tensor index = packed_positions(segment_ids, x, "MLPPositionalEncoding").to(fc1->weight.scalar_type());
    if (!options.scale().has_value()) {
      index = index / (relattn::segment_lengths(segment_ids) - 1).clamp_min(1).to(index.scalar_type());
    } else {
      index = index * *options.scale();
    }
    p = index.unsqueeze(-1);
  } else {
    p = positions(x.size(1));
  }
  return x + fc2(apply_activation(options.activation(), fc1(p))).to(x.dtype());
}

void MLPPositionalEncodingImpl::pretty_print(std::ostream& stream) const {
  stream << "relattn::nn::MLPPositionalEncoding(d_model=" << options.d_model() << ", hidden=" << options.hidden()
         << ", scale=";
  if (options.scale().has_value()) {
    stream << *options.scale();
  } else {
    stream << "none";
  }
  stream << ")";
}

// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~ weights from Python ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~

namespace {

constexpr const char* kLoadWho = "relattn::nn::load_state_dict: ";

// Buffers relattn's modules compute from their options; Python keeps them out of its state_dict.
bool derived_buffer(const torch::nn::Module& owner, const std::string& leaf) {
  if (dynamic_cast<const RelativeMultiheadAttentionImpl*>(&owner) != nullptr)
    return leaf == "buckets" || leaf == "alibi_slopes";
  if (dynamic_cast<const SinusoidalPositionalEncodingImpl*>(&owner) != nullptr) return leaf == "table";
  return false;
}

// An attention module using another layer's relative tables (share_relative_tables): Python lists the
// tables under every layer's name, C++ under the first layer only. Null for any other module.
const RelativeMultiheadAttentionImpl* sharing_attention(const torch::nn::Module& owner) {
  const auto* attn = dynamic_cast<const RelativeMultiheadAttentionImpl*>(&owner);
  return attn != nullptr && attn->uses_external_tables() ? attn : nullptr;
}

// The frozen zero biases of the layer norms of layers built with bias(false) (freeze_norm_biases), which Python's
// LayerNorm(bias=False) does not have: left out of the weights, not required from them.
std::unordered_set<std::string> norm_biases_python_lacks(
    const std::vector<std::pair<std::string, const torch::nn::Module*>>& owners) {
  std::unordered_set<std::string> names;
  auto add = [&](const auto& layer, const std::string& prefix) {
    if (layer.options.bias()) return;
    for (const auto& [name, norm] : layer_norms(layer)) names.insert(prefix + name + ".bias");
  };
  for (const auto& [prefix, owner] : owners) {
    if (const auto* enc = dynamic_cast<const RelativeTransformerEncoderLayerImpl*>(owner)) add(*enc, prefix);
    if (const auto* dec = dynamic_cast<const RelativeTransformerDecoderLayerImpl*>(owner)) add(*dec, prefix);
  }
  return names;
}

// The module and every submodule, each with the prefix of its entries ("" for the root, "layers.0.", ...).
std::vector<std::pair<std::string, const torch::nn::Module*>> modules_by_prefix(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, const torch::nn::Module*>> out{{"", &module}};
  for (const auto& item : module.named_modules("", /*include_self=*/false))
    out.emplace_back(item.key() + ".", item.value().get());
  return out;
}

}  // namespace

void load_state_dict(torch::nn::Module& module, const std::unordered_map<std::string, torch::Tensor>& state,
                     bool strict) {
  const auto owners = modules_by_prefix(module);
  const auto optional = norm_biases_python_lacks(owners);
  torch::NoGradGuard no_grad;
  std::unordered_set<std::string> used;
  for (const auto& [prefix, owner] : owners) {
    auto visit = [&, prefix = prefix, owner = owner](const torch::OrderedDict<std::string, torch::Tensor>& tensors,
                                                     bool parameters) {
      for (const auto& item : tensors) {
        const std::string name = prefix + item.key();
        torch::Tensor target = item.value();
        const auto found = state.find(name);
        if (found == state.end()) {
          TORCH_CHECK(!strict || (!parameters && derived_buffer(*owner, item.key())) || optional.count(name), kLoadWho,
                      parameters ? "parameter " : "buffer ", name, " is missing from the weights");
          continue;
        }
        TORCH_CHECK(found->second.sizes() == target.sizes(), kLoadWho, name, " has shape ", found->second.sizes(),
                    " in the weights, the model's is ", target.sizes());
        target.copy_(found->second);
        used.insert(name);
      }
    };
    visit(owner->named_parameters(/*recurse=*/false), true);
    visit(owner->named_buffers(/*recurse=*/false), false);
  }
  // The aliases of shared tables (Python lists them under every layer) were loaded through the first layer;
  // weights whose layers hold different tables were trained without sharing, which the model cannot represent.
  for (const auto& [prefix, owner] : owners) {
    if (const auto* attn = sharing_attention(*owner)) {
      for (const auto& item : attn->relative_tables()) {
        const std::string name = prefix + item.key();
        const auto found = state.find(name);
        if (found == state.end()) continue;
        TORCH_CHECK(found->second.sizes() == item.value().sizes() &&
                        torch::equal(found->second.to(item.value().device(), item.value().scalar_type()), item.value()),
                    kLoadWho, "the weights' ", name, " differs from the table the model shares across its layers "
                    "(share_relative_tables: loaded from the first layer's entry); these weights were trained "
                    "without shared tables");
        used.insert(name);
      }
    }
  }
  if (!strict) return;
  for (const auto& [name, tensor] : state) {
    TORCH_CHECK(used.count(name), kLoadWho, "the weights have ", name,
                ", which names no parameter or buffer of the model (strict = false ignores it)");
  }
}

void save_state_dict(const torch::nn::Module& module, const std::string& path) {
  c10::Dict<std::string, torch::Tensor> state;
  const auto owners = modules_by_prefix(module);
  const auto left_out = norm_biases_python_lacks(owners);
  for (const auto& [prefix, owner] : owners) {
    for (const auto& item : owner->named_parameters(/*recurse=*/false))
      if (!left_out.count(prefix + item.key())) state.insert(prefix + item.key(), item.value().detach().cpu());
    for (const auto& item : owner->named_buffers(/*recurse=*/false))
      if (!derived_buffer(*owner, item.key())) state.insert(prefix + item.key(), item.value().detach().cpu());
    if (const auto* attn = sharing_attention(*owner))  // Python lists shared tables under every layer
      for (const auto& item : attn->relative_tables()) state.insert(prefix + item.key(), item.value().detach().cpu());
  }
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(state));
  std::ofstream file(path, std::ios::binary);
  TORCH_CHECK(file, "relattn::nn::save_state_dict: cannot write ", path);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void load_state_dict(torch::nn::Module& module, const std::string& path, bool strict) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, kLoadWho, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    // An OrderedDict (a plain torch.save(model.state_dict())) fails inside the unpickler with an internal
    // assertion that names neither the file nor the way out.
    TORCH_CHECK(false, kLoadWho, "cannot read ", path, " as a dict of tensors; save it from Python with "
                "torch.save(dict(model.state_dict()), path) (a plain dict, not the OrderedDict state_dict() "
                "returns). The unpickler said: ", e.what_without_backtrace());
  }
  TORCH_CHECK(value.isGenericDict(), kLoadWho, path, " holds a ", value.tagKind(),
              ", expected a dict of tensors: torch.save(dict(model.state_dict()), path)");
  std::unordered_map<std::string, torch::Tensor> state;
  for (const auto& item : value.toGenericDict()) {
    TORCH_CHECK(item.key().isString() && item.value().isTensor(), kLoadWho, path,
                " must map names to tensors, found a ", item.key().tagKind(), " -> ", item.value().tagKind(), " entry");
    state.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  load_state_dict(module, state, strict);
}

}  // namespace nn
}  // namespace relattn
