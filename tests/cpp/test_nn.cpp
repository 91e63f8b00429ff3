// relattn::nn from C++: shapes, masks, gradients to every parameter, shared relative tables, DeepNorm
// training of a deep stack, and the absolute positional encodings.
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "relattn/nn.h"
#include "relattn/relattn.h"

namespace {

namespace rnn = relattn::nn;
using torch::Tensor;
using torch::indexing::None;
using torch::indexing::Slice;

constexpr int64_t E = 32, H = 4;
const std::vector<std::string> kSchemes = {"shaw", "t5", "clip_bias", "alibi", "none"};

double max_abs(const Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }

template <typename F>
void expect_error(F&& f, const std::string& substring) {
  try {
    f();
    ADD_FAILURE() << "expected a c10::Error containing \"" << substring << "\"";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(substring), std::string::npos)
        << "message: " << e.what_without_backtrace();
  }
}

std::set<std::string> keys(const torch::OrderedDict<std::string, Tensor>& dict) {
  std::set<std::string> out;
  for (const auto& item : dict) out.insert(item.key());
  return out;
}

// Every parameter got a finite gradient that is not all zero.
void expect_gradients_everywhere(const torch::nn::Module& module) {
  for (const auto& p : module.named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key() << " has no gradient";
    EXPECT_GT(max_abs(p.value().grad()), 0.0) << p.key() << " has an all-zero gradient";
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
}

// Small tables, so short test sequences reach the clipped / log-spaced buckets. Works for the options
// of the attention and of the encoder layer alike (they share these setters).
template <typename Options>
Options with_scheme(Options o, const std::string& scheme) {
  o.position(scheme);
  if (scheme == "shaw" || scheme == "clip_bias") o.max_distance(4);
  if (scheme == "t5") o.num_buckets(8).max_distance(12);
  return o;
}

rnn::RelativeMultiheadAttention make_attention(const std::string& scheme, rnn::RelativeMultiheadAttentionOptions o =
                                                                              rnn::RelativeMultiheadAttentionOptions(E, H)) {
  torch::manual_seed(0);
  rnn::RelativeMultiheadAttention m(with_scheme(o, scheme));
  // Non-zero tables and biases, so every term is exercised.
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.add_(0.1 * torch::randn_like(p));
  return m;
}

rnn::RelativeTransformerEncoderLayerOptions small_layer(const std::string& scheme) {
  return with_scheme(rnn::RelativeTransformerEncoderLayerOptions(E, H).dim_feedforward(64).dropout(0.0), scheme);
}

// ---------------------------------------------------------------------------------------- schemes

TEST(PositionScheme, Names) {
  for (const std::string& name : kSchemes) EXPECT_EQ(rnn::to_string(rnn::position_scheme_from_string(name)), name);
  expect_error([] { rnn::position_scheme_from_string("rope"); }, "position must be one of");
  expect_error([] { rnn::activation_from_string("tanh"); }, "activation should be \"relu\", \"gelu\" or a callable");
}

// ----------------------------------------------------------------------------- RelativeMultiheadAttention

class AttentionScheme : public ::testing::TestWithParam<std::string> {};

TEST_P(AttentionScheme, ShapesParametersAndBuffers) {
  const std::string scheme = GetParam();
  rnn::RelativeMultiheadAttention attn = make_attention(scheme, rnn::RelativeMultiheadAttentionOptions(E, H).num_kv_heads(2));
  const Tensor q = torch::randn({2, 7, E});
  const Tensor kv = torch::randn({2, 11, E});
  EXPECT_EQ(attn(q, kv, kv).sizes(), q.sizes());
  EXPECT_EQ(attn(q).sizes(), q.sizes());  // self-attention: key and value default to query

  std::set<std::string> expected = {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                    "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias"};
  if (scheme == "shaw") expected.insert({"rel_k", "rel_v"});
  if (scheme == "t5" || scheme == "clip_bias") expected.insert("rel_bias");
  EXPECT_EQ(keys(attn->named_parameters()), expected);
  EXPECT_EQ(attn->relative_tables().size(), scheme == "shaw" ? 2u : (scheme == "t5" || scheme == "clip_bias") ? 1u : 0u);

  const std::set<std::string> buffers = keys(attn->named_buffers());
  if (scheme == "alibi") {
    EXPECT_EQ(buffers, std::set<std::string>{"alibi_slopes"});
    EXPECT_TRUE(torch::equal(attn->alibi_slopes, relattn::alibi_slopes(H)));
  } else if (scheme == "none") {
    EXPECT_TRUE(buffers.empty());
  } else {
    EXPECT_EQ(buffers, std::set<std::string>{"buckets"});
  }
  if (scheme == "shaw") {
    EXPECT_EQ(attn->rel_k.sizes(), (std::vector<int64_t>{9, 8}));
    EXPECT_EQ(attn->rel_v.sizes(), (std::vector<int64_t>{9, 8}));
    EXPECT_TRUE(torch::equal(attn->buckets, relattn::clip_buckets(4)));
  }
  if (scheme == "t5") {
    EXPECT_EQ(attn->rel_bias.sizes(), (std::vector<int64_t>{H, 8}));
    EXPECT_TRUE(torch::equal(attn->buckets, relattn::t5_buckets(8, 12, true)));
  }
  if (scheme == "clip_bias") EXPECT_EQ(attn->rel_bias.sizes(), (std::vector<int64_t>{H, 9}));
}

TEST_P(AttentionScheme, MatchesFunctionalAttention) {
  const std::string scheme = GetParam();
  rnn::RelativeMultiheadAttention attn =
      make_attention(scheme, rnn::RelativeMultiheadAttentionOptions(24, 6).num_kv_heads(2).per_head_tables(true));
  const int64_t B = 2, L = 9, hd = 4;
  const Tensor x = torch::randn({B, L, 24});
  Tensor mask = torch::zeros({B, L}, torch::kBool);
  mask.index_put_({0, Slice(6, None)}, true);

  const Tensor q = attn->q_proj(x).view({B, L, 6, hd}).permute({0, 2, 1, 3});
  const Tensor k = attn->k_proj(x).view({B, L, 2, hd}).permute({0, 2, 1, 3});
  const Tensor v = attn->v_proj(x).view({B, L, 2, hd}).permute({0, 2, 1, 3});
  relattn::AttentionOptions o;
  o.key_padding_mask(mask).causal(true);
  if (scheme == "shaw") o.rel_k(attn->rel_k).rel_v(attn->rel_v).buckets(relattn::clip_buckets(4));
  if (scheme == "t5") o.rel_bias(attn->rel_bias).buckets(relattn::t5_buckets(8, 12, true));
  if (scheme == "clip_bias") o.rel_bias(attn->rel_bias).buckets(relattn::clip_buckets(4));
  if (scheme == "alibi") o.alibi_slopes(relattn::alibi_slopes(6));
  if (scheme == "shaw") EXPECT_EQ(attn->rel_k.sizes(), (std::vector<int64_t>{6, 9, hd}));
  const Tensor heads = relattn::attention(q, k, v, o);
  const Tensor expected = attn->out_proj(heads.permute({0, 2, 1, 3}).reshape({B, L, 24}));
  EXPECT_TRUE(torch::allclose(attn(x, Tensor(), Tensor(), mask, /*is_causal=*/true), expected, 1e-5, 1e-6));
}

// Attention-weight dropout acts in training mode only, with a seed from torch's generator.
TEST_P(AttentionScheme, AttentionDropoutInTrainingOnly) {
  const std::string scheme = GetParam();
  rnn::RelativeMultiheadAttention attn = make_attention(scheme, rnn::RelativeMultiheadAttentionOptions(E, H).dropout(0.3));
  rnn::RelativeMultiheadAttention plain = make_attention(scheme);  // same seed: same parameters
  const Tensor x = torch::randn({2, 9, E});
  attn->eval();
  plain->eval();
  EXPECT_TRUE(torch::equal(attn(x, x, x), plain(x, x, x)));
  attn->train();
  torch::manual_seed(5);
  const Tensor a = attn(x, x, x);
  torch::manual_seed(5);
  EXPECT_TRUE(torch::equal(attn(x, x, x), a));
  EXPECT_FALSE(torch::allclose(a, plain(x, x, x)));
  a.sum().backward();
  for (const auto& p : attn->parameters()) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_TRUE(torch::isfinite(p.grad()).all().item<bool>());
  }
}

TEST_P(AttentionScheme, GradientsReachEveryParameter) {
  rnn::RelativeMultiheadAttention attn = make_attention(GetParam(), rnn::RelativeMultiheadAttentionOptions(E, H).num_kv_heads(2));
  Tensor mask = torch::zeros({2, 12}, torch::kBool);
  mask.index_put_({1, Slice(9, None)}, true);
  (attn(torch::randn({2, 12, E}), Tensor(), Tensor(), mask) * torch::randn({2, 12, E})).sum().backward();
  expect_gradients_everywhere(*attn);
}

TEST_P(AttentionScheme, BatchFirstFalse) {
  rnn::RelativeMultiheadAttention first = make_attention(GetParam());
  rnn::RelativeMultiheadAttention second = make_attention(GetParam(), rnn::RelativeMultiheadAttentionOptions(E, H).batch_first(false));
  const Tensor x = torch::randn({2, 7, E});
  const Tensor y = second(x.transpose(0, 1));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{7, 2, E}));
  EXPECT_TRUE(torch::allclose(y.transpose(0, 1), first(x), 1e-5, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Schemes, AttentionScheme, ::testing::ValuesIn(kSchemes),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(RelativeMultiheadAttention, KdimVdimGroupedQueryAndScale) {
  rnn::RelativeMultiheadAttention attn(
      rnn::RelativeMultiheadAttentionOptions(E, 8).kdim(12).vdim(20).num_kv_heads(2).bias(false).position("t5"));
  EXPECT_EQ(attn->k_proj->weight.sizes(), (std::vector<int64_t>{8, 12}));
  EXPECT_EQ(attn->v_proj->weight.sizes(), (std::vector<int64_t>{8, 20}));
  EXPECT_FALSE(attn->q_proj->bias.defined());
  EXPECT_EQ(attn->num_kv_heads(), 2);
  EXPECT_EQ(attn->head_dim(), 4);
  EXPECT_EQ(attn->max_distance(), 128);  // T5's default
  EXPECT_EQ(attn->num_buckets(), 32);
  EXPECT_EQ(attn(torch::randn({3, 5, E}), torch::randn({3, 9, 12}), torch::randn({3, 9, 20})).sizes(),
            (std::vector<int64_t>{3, 5, E}));

  // An explicit scale reaches the op.
  rnn::RelativeMultiheadAttention scaled = make_attention("none", rnn::RelativeMultiheadAttentionOptions(E, H).scale(0.05));
  rnn::RelativeMultiheadAttention plain = make_attention("none");
  const Tensor x = torch::randn({1, 6, E});
  EXPECT_FALSE(torch::allclose(scaled(x), plain(x)));
  const Tensor q = plain->q_proj(x).view({1, 6, H, 8}).transpose(1, 2);
  const Tensor k = plain->k_proj(x).view({1, 6, H, 8}).transpose(1, 2);
  const Tensor v = plain->v_proj(x).view({1, 6, H, 8}).transpose(1, 2);
  const Tensor expected = plain->out_proj(
      relattn::attention(q, k, v, relattn::AttentionOptions().scale(0.05)).transpose(1, 2).reshape({1, 6, E}));
  EXPECT_TRUE(torch::allclose(scaled(x), expected, 1e-5, 1e-6));
}

TEST(RelativeMultiheadAttention, RelIndexReplacesDistanceBuckets) {
  rnn::RelativeMultiheadAttention attn = make_attention("shaw");
  const Tensor x = torch::randn({2, 6, E});
  // The index of plain distances gives the same result as the buckets.
  const Tensor i = torch::arange(6).view({-1, 1});
  const Tensor j = torch::arange(6).view({1, -1});
  const Tensor distance_index = (j - i).clamp(-4, 4) + 4;
  EXPECT_TRUE(torch::allclose(attn(x, Tensor(), Tensor(), Tensor(), false, distance_index), attn(x), 1e-5, 1e-6));
  const Tensor tree_index = torch::randint(0, 9, {2, 6, 6}, torch::kLong);
  EXPECT_FALSE(torch::allclose(attn(x, Tensor(), Tensor(), Tensor(), false, tree_index), attn(x)));
  expect_error([&] { make_attention("alibi")(x, Tensor(), Tensor(), Tensor(), false, distance_index); },
               "rel_index needs a relative table");
  expect_error([&] { attn(x, Tensor(), Tensor(), Tensor(), false, distance_index + 9); }, "every id must lie in [0, R)");
}

TEST(RelativeMultiheadAttention, FullyPaddedRowIsFinite) {
  rnn::RelativeMultiheadAttention attn = make_attention("shaw");
  Tensor mask = torch::zeros({2, 5}, torch::kBool);
  mask.index_put_({1}, true);
  const Tensor y = attn(torch::randn({2, 5, E}), Tensor(), Tensor(), mask);
  // No key to attend to: zero attention, so the output is out_proj's bias.
  EXPECT_TRUE(torch::allclose(y[1], attn->out_proj->bias.expand({5, E})));
}

TEST(RelativeMultiheadAttention, ExternalTables) {
  rnn::RelativeMultiheadAttention owner = make_attention("shaw");
  rnn::RelativeMultiheadAttention user = make_attention("shaw");
  user->set_relative_tables(owner->relative_tables());
  EXPECT_TRUE(user->uses_external_tables());
  EXPECT_TRUE(user->rel_k.is_same(owner->rel_k));
  EXPECT_EQ(keys(user->named_parameters()).count("rel_k"), 0u);
  EXPECT_EQ(user->parameters().size(), owner->parameters().size() - 2);
  user(torch::randn({2, 6, E})).pow(2).sum().backward();
  EXPECT_GT(max_abs(owner->rel_k.grad()), 0.0);

  rnn::RelativeMultiheadAttention t5 = make_attention("t5");
  expect_error([&] { t5->set_relative_tables(owner->relative_tables()); },
               "position \"t5\" uses the tables [\"rel_bias\"], got [\"rel_k\", \"rel_v\"]");
  rnn::RelativeTables wrong;
  wrong.insert("rel_bias", torch::zeros({H, 5}));
  expect_error([&] { t5->set_relative_tables(wrong); }, "table \"rel_bias\" must have shape [4, 8]");
}

TEST(RelativeMultiheadAttention, CastKeepsBucketsAndSlopes) {
  for (const std::string& scheme : {std::string("shaw"), std::string("t5"), std::string("alibi")}) {
    rnn::RelativeMultiheadAttention attn = make_attention(scheme);
    const Tensor x = torch::randn({2, 5, E});
    const Tensor y = attn(x);
    attn->to(torch::kDouble);
    if (attn->buckets.defined()) EXPECT_EQ(attn->buckets.scalar_type(), torch::kLong) << scheme;
    if (attn->alibi_slopes.defined()) EXPECT_EQ(attn->alibi_slopes.scalar_type(), torch::kFloat) << scheme;
    EXPECT_EQ(attn->q_proj->weight.scalar_type(), torch::kDouble);
    const Tensor y64 = attn(x.to(torch::kDouble));
    EXPECT_EQ(y64.scalar_type(), torch::kDouble);
    EXPECT_TRUE(torch::allclose(y64.to(torch::kFloat), y, 1e-4, 1e-5)) << scheme;
    attn->to(torch::kCPU, torch::kFloat);
    if (attn->buckets.defined()) EXPECT_EQ(attn->buckets.scalar_type(), torch::kLong) << scheme;
  }
}

TEST(RelativeMultiheadAttention, BadOptionsAndInputs) {
  using O = rnn::RelativeMultiheadAttentionOptions;
  expect_error([] { rnn::RelativeMultiheadAttention(O(E, H).dropout(1.5)); }, "must lie in [0, 1], got 1.5");
  expect_error([] { rnn::RelativeMultiheadAttention(O(30, H)); }, "must be divisible by num_heads");
  expect_error([] { rnn::RelativeMultiheadAttention(O(E, H).num_kv_heads(3)); }, "must be a positive multiple of num_kv_heads");
  expect_error([] { rnn::RelativeMultiheadAttention(O(E, H).rel_k(false).rel_v(false)); }, "needs rel_k and/or rel_v");
  expect_error([] { rnn::RelativeMultiheadAttention(O(E, H).position("shaw").max_distance(-1)); }, "max_distance must be >= 0");
  expect_error([] { rnn::RelativeMultiheadAttention(O(E, H).position("t5").num_buckets(2)); }, "num_buckets must be >= 4");
  expect_error([] { O(E, H).position("sinusoidal"); }, "position must be one of");
  rnn::RelativeMultiheadAttention attn(O(E, H));
  expect_error([&] { attn(torch::randn({2, 5, 31})); }, "query's features must be embed_dim = 32");
  expect_error([&] { attn(torch::randn({5, E})); }, "query, key and value must be 3-D");
  expect_error([&] { attn(torch::randn({2, 5, E}), torch::randn({3, 5, E})); }, "must share the batch size");
  expect_error([&] { attn(torch::randn({2, 5, E}), Tensor(), Tensor(), torch::zeros({2, 5})); },
               "key_padding_mask must be a bool tensor");
  expect_error([&] { attn(torch::randn({2, 5, E}), Tensor(), Tensor(), torch::zeros({2, 4}, torch::kBool)); },
               "key_padding_mask must be [B, Lk]");
}

// --------------------------------------------------------------------- encoder layer and encoder stack

TEST(RelativeTransformerEncoderLayer, ShapesAndActivations) {
  for (bool norm_first : {false, true}) {
    for (const char* activation : {"relu", "gelu"}) {
      rnn::RelativeTransformerEncoderLayer layer(small_layer("shaw").norm_first(norm_first).activation(activation));
      const Tensor x = torch::randn({2, 11, E});
      EXPECT_EQ(layer(x).sizes(), x.sizes());
      EXPECT_EQ(layer(x, torch::zeros({2, 11}, torch::kBool), /*is_causal=*/true).sizes(), x.sizes());
    }
  }
  rnn::RelativeTransformerEncoderLayer layer(small_layer("alibi").activation([](const Tensor& t) { return torch::silu(t); }));
  EXPECT_EQ(layer(torch::randn({1, 4, E})).sizes(), (std::vector<int64_t>{1, 4, E}));
  rnn::RelativeTransformerEncoderLayer seq_first(small_layer("t5").batch_first(false));
  EXPECT_EQ(seq_first(torch::randn({9, 2, E})).sizes(), (std::vector<int64_t>{9, 2, E}));
  expect_error([] { rnn::RelativeTransformerEncoderLayer(small_layer("shaw").attention_dropout(-0.5)); },
               "must lie in [0, 1], got -0.5");
  expect_error([] { small_layer("shaw").activation("tanh"); }, "activation should be");
}

TEST(RelativeTransformerEncoderLayer, GradientsReachEveryParameter) {
  for (const std::string& scheme : kSchemes) {
    for (bool norm_first : {false, true}) {
      SCOPED_TRACE(scheme + (norm_first ? " pre-LN" : " post-LN"));
      torch::manual_seed(0);
      rnn::RelativeTransformerEncoderLayer layer(small_layer(scheme).norm_first(norm_first));
      Tensor mask = torch::zeros({2, 12}, torch::kBool);
      mask.index_put_({1, Slice(9, None)}, true);
      // A loss that LayerNorm's normalisation does not make constant.
      (layer(torch::randn({2, 12, E}), mask) * torch::randn({2, 12, E})).sum().backward();
      expect_gradients_everywhere(*layer);
    }
  }
}

TEST(RelativeTransformerEncoder, LayersAreCopiesOfTheGivenLayer) {
  rnn::RelativeTransformerEncoderLayer prototype(small_layer("shaw"));
  rnn::RelativeTransformerEncoder encoder(prototype, 3);
  ASSERT_EQ(encoder->layers->size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(torch::equal(encoder->layer(i)->linear1->weight, prototype->linear1->weight));
    EXPECT_FALSE(encoder->layer(i)->linear1->weight.is_same(prototype->linear1->weight));
    EXPECT_TRUE(torch::equal(encoder->layer(i)->self_attn->rel_k, prototype->self_attn->rel_k));
  }
  expect_error([] { rnn::RelativeTransformerEncoder(small_layer("shaw"), 0); }, "num_layers must be positive");
}

TEST(RelativeTransformerEncoder, PaddingKeysAreIgnored) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(small_layer("shaw"), 2);
  const Tensor x = torch::randn({2, 10, E});
  Tensor mask = torch::zeros({2, 10}, torch::kBool);
  mask.index_put_({0, Slice(7, None)}, true);
  mask.index_put_({1, Slice(4, None)}, true);
  // Change only the padded positions: every real position's output stays the same.
  const Tensor x2 = torch::where(mask.unsqueeze(-1), torch::randn_like(x), x);
  const Tensor real = (~mask).unsqueeze(-1).expand_as(x);
  EXPECT_TRUE(torch::allclose(encoder(x, mask).masked_select(real), encoder(x2, mask).masked_select(real), 1e-5, 1e-6));
  // Without the mask the padded content does leak in.
  EXPECT_FALSE(torch::allclose(encoder(x).masked_select(real), encoder(x2).masked_select(real), 1e-5, 1e-6));
}

// Packed sequences: with segment_ids, each sequence of a packed row gives what it gives alone.
TEST(RelativeTransformerEncoder, SegmentIdsPackSequences) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(small_layer("t5"), 2);
  encoder->eval();
  const Tensor x = torch::randn({1, 30, E});
  Tensor ids = torch::zeros({1, 30}, torch::kLong);
  ids.index_put_({0, Slice(12, None)}, 1);
  const Tensor y = encoder(x, Tensor(), false, Tensor(), ids);
  EXPECT_TRUE(torch::allclose(y.index({Slice(), Slice(0, 12)}), encoder(x.index({Slice(), Slice(0, 12)})), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(y.index({Slice(), Slice(12, None)}), encoder(x.index({Slice(), Slice(12, None)})), 1e-5,
                              1e-6));
  // Without the ids the two sequences see each other.
  EXPECT_FALSE(torch::allclose(encoder(x).index({Slice(), Slice(0, 12)}), y.index({Slice(), Slice(0, 12)}), 1e-5, 1e-6));
}

TEST(RelativeTransformerEncoder, CausalIgnoresTheFuture) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(small_layer("t5"), 2);
  const Tensor x = torch::randn({2, 10, E});
  Tensor x2 = x.clone();
  x2.index_put_({Slice(), Slice(6, None)}, torch::randn({2, 4, E}));
  const Tensor y = encoder(x, Tensor(), /*is_causal=*/true);
  const Tensor y2 = encoder(x2, Tensor(), /*is_causal=*/true);
  EXPECT_TRUE(torch::allclose(y.index({Slice(), Slice(0, 6)}), y2.index({Slice(), Slice(0, 6)}), 1e-5, 1e-6));
  EXPECT_FALSE(torch::allclose(y.index({Slice(), Slice(6, None)}), y2.index({Slice(), Slice(6, None)})));
}

// A float64 encoder in eval mode (norm first, 2 kv heads) with perturbed weights, so that the relative tables
// are nonzero and a wrong offset changes the result; seeded.
rnn::RelativeTransformerEncoder decoding_encoder(const std::string& scheme, int64_t layers) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(small_layer(scheme).norm_first(true).num_kv_heads(2), layers);
  encoder->to(torch::kDouble);
  encoder->eval();
  torch::NoGradGuard no_grad;
  for (auto& p : encoder->parameters()) p.add_(0.1 * torch::randn_like(p));
  return encoder;
}

// Incremental decoding with a KVCache: a prompt, then one or a few tokens per call, gives the rows of a
// causal run over the whole sequence, for every scheme (float64, grouped-query heads, padding).
TEST(KVCache, IncrementalDecodingEqualsCausalRun) {
  for (const std::string& scheme : kSchemes) {
    SCOPED_TRACE(scheme);
    rnn::RelativeTransformerEncoder encoder = decoding_encoder(scheme, 3);
    torch::NoGradGuard no_grad;
    const Tensor x = torch::randn({2, 17, E}, torch::kDouble);
    Tensor mask = torch::zeros({2, 17}, torch::kBool);
    mask.index_put_({1, Slice(0, 3)}, true);  // a left-padded prompt
    const Tensor want = encoder(x, mask, /*is_causal=*/true);
    rnn::KVCache cache(20);
    std::vector<Tensor> outs;
    int64_t start = 0;
    for (const int64_t n : {7, 1, 1, 3, 1, 1, 1, 1, 1}) {
      outs.push_back(encoder(x.index({Slice(), Slice(start, start + n)}), mask.index({Slice(), Slice(0, start + n)}),
                             true, Tensor(), Tensor(), cache));
      start += n;
    }
    ASSERT_EQ(start, 17);
    EXPECT_EQ(cache.length(), 17);
    const Tensor got = torch::cat(outs, 1);
    const Tensor real = mask.logical_not();
    EXPECT_LT(max_abs(got.index({real}) - want.index({real})), 1e-10);
  }
}

// static_shapes: per-row lengths on the device, whole slots attended. Ragged prompts (right-padded, prefilled
// as one batch, then set_lengths to the true lengths) decoded one token per row per call give each sequence's
// causal run alone, for every scheme; without causal masking the lengths hide the unwritten slots.
TEST(KVCache, StaticShapesRaggedRowsEqualEachSequenceAlone) {
  for (const std::string& scheme : kSchemes) {
    SCOPED_TRACE(scheme);
    rnn::RelativeTransformerEncoder encoder = decoding_encoder(scheme, 2);
    torch::NoGradGuard no_grad;
    const std::vector<int64_t> lengths{9, 14}, prompt{6, 2};
    const Tensor x = torch::randn({2, 14, E}, torch::kDouble);
    rnn::KVCache cache(20, /*static_shapes=*/true);  // finished rows keep taking (unused) tokens: 6 + 12
    EXPECT_TRUE(cache.static_shapes());
    std::vector<std::vector<Tensor>> outs(2);
    const Tensor first = encoder(x.index({Slice(), Slice(0, 6)}), Tensor(), true, Tensor(), Tensor(), cache);
    for (int b = 0; b < 2; ++b) outs[b].push_back(first.index({Slice(b, b + 1), Slice(0, prompt[b])}));
    cache.set_lengths(torch::tensor(prompt));
    std::vector<int64_t> pos = prompt;
    while (pos[0] < lengths[0] || pos[1] < lengths[1]) {
      std::vector<Tensor> tokens;  // rows that are done take their last token again (output unused)
      for (int b = 0; b < 2; ++b) {
        const int64_t t = std::min(pos[b], lengths[b] - 1);
        tokens.push_back(x.index({Slice(b, b + 1), Slice(t, t + 1)}));
      }
      const Tensor y = encoder(torch::cat(tokens), Tensor(), true, Tensor(), Tensor(), cache);
      for (int b = 0; b < 2; ++b)
        if (pos[b] < lengths[b]) outs[b].push_back(y.index({Slice(b, b + 1)}));
      for (auto& p : pos) ++p;
    }
    for (int b = 0; b < 2; ++b) {
      const Tensor alone = encoder(x.index({Slice(b, b + 1), Slice(0, lengths[b])}), Tensor(), true);
      EXPECT_LT(max_abs(torch::cat(outs[b], 1) - alone), 1e-10) << "row " << b;
    }
    EXPECT_TRUE(torch::equal(cache.lengths(), torch::tensor({18, 14}, torch::kInt)));
  }
  // Bidirectional (no causal mask): every call equals attention over the positions written so far.
  torch::NoGradGuard no_grad;
  auto attn = make_attention("shaw", rnn::RelativeMultiheadAttentionOptions(E, H));
  attn->to(torch::kDouble);
  const Tensor x = torch::randn({2, 9, E}, torch::kDouble);
  rnn::KVCache cache(12, true);
  int64_t start = 0;
  for (const int64_t n : {4, 2, 3}) {
    const Tensor xs = x.index({Slice(), Slice(start, start + n)});
    const Tensor got = attn(xs, Tensor(), Tensor(), Tensor(), false, Tensor(), Tensor(), cache);
    const Tensor seen = x.index({Slice(), Slice(0, start + n)});
    const Tensor want = attn(seen, Tensor(), Tensor(), Tensor(), false).index({Slice(), Slice(start, None)});
    EXPECT_LT(max_abs(got - want), 1e-10);
    start += n;
  }
  cache.reorder(torch::tensor({1}));
  EXPECT_TRUE(torch::equal(cache.lengths(), torch::tensor({9}, torch::kInt)));
  expect_error([&] { cache.length(); }, "read lengths()");
  expect_error([&] { cache.set_lengths(torch::tensor({1, 2})); }, "lengths has 2 rows, the cache 1");
  expect_error([&] { cache.set_lengths(torch::tensor({1.0})); }, "lengths must be an integer [B] tensor");
  expect_error([&] { rnn::KVCache(4).lengths(); }, "lengths() is for static_shapes");
  cache.reset();
  EXPECT_FALSE(cache.lengths().defined());
}

// set_lengths before the first call (no slot yet): it sets where the first call writes each row, survives a
// reorder, and a first call of another batch size is an error naming both sizes. Row 0 starts at 0, so its
// output is the plain causal run of its tokens.
TEST(KVCache, StaticShapesLengthsBeforeTheFirstCall) {
  torch::NoGradGuard no_grad;
  auto attn = make_attention("t5", rnn::RelativeMultiheadAttentionOptions(E, H));
  attn->to(torch::kDouble);
  const Tensor x = torch::randn({2, 3, E}, torch::kDouble);
  rnn::KVCache cache(8, /*static_shapes=*/true);
  EXPECT_FALSE(cache.lengths().defined());
  cache.set_lengths(torch::tensor({2, 0, 1}));
  EXPECT_TRUE(torch::equal(cache.lengths(), torch::tensor({2, 0, 1}, torch::kInt)));
  expect_error([&] { attn(x, Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache); },
               "set_lengths gave 3 rows, this call has 2");
  cache.reorder(torch::tensor({1, 0}));
  EXPECT_TRUE(torch::equal(cache.lengths(), torch::tensor({0, 2}, torch::kInt)));
  const Tensor got = attn(x, Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache);
  EXPECT_TRUE(torch::equal(cache.lengths(), torch::tensor({3, 5}, torch::kInt)));
  const Tensor alone = attn(x.index({Slice(0, 1)}), Tensor(), Tensor(), Tensor(), true);
  EXPECT_LT(max_abs(got.index({Slice(0, 1)}) - alone), 1e-10);
  cache.reset();
  EXPECT_FALSE(cache.lengths().defined());
}

TEST(KVCache, ReorderResetAndAttentionModule) {
  torch::NoGradGuard no_grad;
  auto attn = make_attention("t5", rnn::RelativeMultiheadAttentionOptions(E, H).num_kv_heads(1).batch_first(false));
  attn->to(torch::kDouble);
  const Tensor x = torch::randn({10, 2, E}, torch::kDouble);  // [L, B, E]
  rnn::KVCache cache(16);
  attn(x.index({Slice(0, 6)}), Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache);
  // Three beams: rows 1, 0, 1; tokens 6..9 of the reordered rows.
  const Tensor index = torch::tensor({1, 0, 1});
  cache.reorder(index);
  const Tensor xr = x.index_select(1, index);
  const Tensor a = xr.index({Slice(6, 7)}), b = xr.index({Slice(7, 10)});
  const Tensor got = torch::cat({attn(a, a, a, Tensor(), true, Tensor(), Tensor(), cache),
                                 attn(b, Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache)});
  const Tensor want = attn(xr, Tensor(), Tensor(), Tensor(), true).index({Slice(6, None)});
  EXPECT_LT(max_abs(got - want), 1e-10);
  EXPECT_EQ(cache.length(), 10);
  cache.reset();
  EXPECT_EQ(cache.length(), 0);
  const Tensor again = attn(x.index({Slice(0, 4)}), Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache);
  EXPECT_LT(max_abs(again - attn(x.index({Slice(0, 4)}), Tensor(), Tensor(), Tensor(), true)), 1e-10);
}

TEST(KVCache, BadUse) {
  expect_error([] { rnn::KVCache(0); }, "max_length must be positive");
  rnn::RelativeTransformerEncoder encoder(small_layer("shaw"), 1);
  encoder->eval();
  const Tensor x = torch::randn({2, 5, E});
  rnn::KVCache cache(6);
  {
    torch::NoGradGuard no_grad;
    encoder(x, Tensor(), true, Tensor(), Tensor(), cache);
    expect_error([&] { encoder(x.index({Slice(), Slice(0, 2)}), Tensor(), true, Tensor(), Tensor(), cache); },
                 "5 cached + 2 new positions exceed max_length (6)");
    expect_error([&] { encoder(torch::randn({3, 1, E}), Tensor(), true, Tensor(), Tensor(), cache); }, "batch 3");
    auto& attn = encoder->layer(0)->self_attn;
    expect_error([&] { attn(x, torch::randn({2, 5, E}), Tensor(), Tensor(), true, Tensor(), Tensor(), rnn::KVCache(8)); },
                 "causal cross-attention with a cache is not supported");
  }
  // Recording gradients through the cache is refused (its keys are overwritten in place).
  expect_error([&] { encoder(x.index({Slice(), Slice(0, 1)}), Tensor(), true, Tensor(), Tensor(), rnn::KVCache(4)); },
               "the cache is for inference");
}

// The decoder: relative self-attention, position-free cross-attention; gradients, shared tables (also in
// a clone), and incremental decoding with the memory projected once.
rnn::RelativeTransformerDecoder small_decoder(const std::string& scheme, bool share = false) {
  torch::manual_seed(0);
  rnn::RelativeTransformerDecoder decoder(
      rnn::RelativeTransformerDecoderOptions(small_layer(scheme).norm_first(true).num_kv_heads(2), 3)
          .norm(torch::nn::AnyModule(torch::nn::LayerNorm(torch::nn::LayerNormOptions({E}))))
          .share_relative_tables(share));
  decoder->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  for (auto& p : decoder->parameters()) p.add_(0.1 * torch::randn_like(p));
  return decoder;
}

// The layer's forward, post-LN and pre-LN, is the composition of its parts (as torch's decoder layer);
// reset_parameters() draws every weight anew.
TEST(RelativeTransformerDecoderLayer, NormOrdersComposeTheParts) {
  for (bool norm_first : {false, true}) {
    SCOPED_TRACE(norm_first ? "pre-LN" : "post-LN");
    torch::manual_seed(0);
    rnn::RelativeTransformerDecoderLayer layer(small_layer("t5").norm_first(norm_first));
    layer->to(torch::kDouble);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : layer->parameters()) p.add_(0.1 * torch::randn_like(p));  // LayerNorms off identity
    }
    const Tensor x = torch::randn({2, 7, E}, torch::kDouble), memory = torch::randn({2, 9, E}, torch::kDouble);
    auto sa = [&](const Tensor& t) { return layer->self_attn(t, t, t, Tensor(), /*is_causal=*/true); };
    auto ca = [&](const Tensor& t) { return layer->multihead_attn(t, memory, memory); };
    auto ff = [&](const Tensor& t) { return layer->linear2(torch::relu(layer->linear1(t))); };
    Tensor want = x;
    if (norm_first) {
      want = want + sa(layer->norm1(want));
      want = want + ca(layer->norm2(want));
      want = want + ff(layer->norm3(want));
    } else {
      want = layer->norm1(want + sa(want));
      want = layer->norm2(want + ca(want));
      want = layer->norm3(want + ff(want));
    }
    EXPECT_LT(max_abs(layer(x, memory, Tensor(), Tensor(), /*tgt_is_causal=*/true) - want), 1e-12);

    std::vector<Tensor> before;
    for (const auto& p : layer->parameters()) before.push_back(p.detach().clone());
    layer->reset_parameters();
    const auto after = layer->parameters();
    for (size_t i = 0; i < after.size(); ++i) EXPECT_FALSE(torch::equal(after[i], before[i])) << i;
    EXPECT_EQ(max_abs(layer->norm3->weight - 1), 0.0);
  }
  rnn::RelativeTransformerEncoderLayer encoder_layer(small_layer("shaw"));
  std::vector<Tensor> before;
  for (const auto& p : encoder_layer->parameters()) before.push_back(p.detach().clone());
  encoder_layer->reset_parameters();
  const auto after = encoder_layer->parameters();
  for (size_t i = 0; i < after.size(); ++i)
    if (after[i].dim() > 1) EXPECT_FALSE(torch::equal(after[i], before[i])) << i;  // (biases start at 0)
}

TEST(RelativeTransformerDecoder, PositionsInSelfAttentionOnlyAndGradients) {
  auto decoder = small_decoder("clip_bias");
  EXPECT_EQ(keys(decoder->layer(0)->self_attn->relative_tables()), (std::set<std::string>{"rel_bias"}));
  EXPECT_TRUE(decoder->layer(0)->multihead_attn->relative_tables().is_empty());
  const Tensor tgt = torch::randn({2, 6, E}, torch::kDouble);
  const Tensor memory = torch::randn({2, 9, E}, torch::dtype(torch::kDouble).requires_grad(true));
  const Tensor out = decoder(tgt, memory, Tensor(), Tensor(), /*tgt_is_causal=*/true);
  // The memory's order does not matter to a position-free cross-attention.
  const Tensor perm = torch::randperm(9);
  EXPECT_LT(max_abs(out - decoder(tgt, memory.index_select(1, perm), Tensor(), Tensor(), true)), 1e-12);
  out.square().sum().backward();
  expect_gradients_everywhere(*decoder);
  EXPECT_GT(max_abs(memory.grad()), 0.0);
  // Causal: the first rows ignore later targets.
  Tensor tgt2 = tgt.clone();
  tgt2.index_put_({Slice(), Slice(4, None)}, torch::randn({2, 2, E}, torch::kDouble));
  EXPECT_LT(max_abs((decoder(tgt2, memory, Tensor(), Tensor(), true) - out).index({Slice(), Slice(0, 4)})), 1e-12);
}

TEST(RelativeTransformerDecoder, SharedTablesSurviveClone) {
  auto decoder = small_decoder("shaw", /*share=*/true);
  const Tensor first = decoder->layer(0)->self_attn->rel_k;
  for (size_t i = 1; i < decoder->layers->size(); ++i) EXPECT_TRUE(decoder->layer(i)->self_attn->rel_k.is_same(first));
  auto copy = std::dynamic_pointer_cast<rnn::RelativeTransformerDecoderImpl>(decoder->clone());
  const Tensor copied = copy->layer(0)->self_attn->rel_k;
  EXPECT_FALSE(copied.is_same(first));
  for (size_t i = 1; i < copy->layers->size(); ++i) EXPECT_TRUE(copy->layer(i)->self_attn->rel_k.is_same(copied));
}

TEST(RelativeTransformerDecoder, IncrementalDecodingWithCache) {
  for (const std::string& scheme : {"t5", "shaw", "alibi"}) for (const bool fixed : {false, true}) {
    SCOPED_TRACE(scheme + (fixed ? ", static shapes" : ""));
    auto decoder = small_decoder(scheme);
    decoder->eval();
    torch::NoGradGuard no_grad;
    const Tensor tgt = torch::randn({3, 11, E}, torch::kDouble);
    const Tensor memory = torch::randn({3, 8, E}, torch::kDouble);
    Tensor memory_padding = torch::zeros({3, 8}, torch::kBool);
    memory_padding.index_put_({2, Slice(5, None)}, true);
    const Tensor want = decoder(tgt, memory, Tensor(), memory_padding, true);
    rnn::KVCache cache(12, fixed);
    std::vector<Tensor> outs;
    int64_t start = 0;
    for (const int64_t n : {5, 1, 1, 2, 1, 1}) {
      // After the first call the cross-attention uses the memory it projected then: another memory changes
      // nothing.
      const Tensor mem = start == 0 ? memory : torch::randn_like(memory);
      outs.push_back(decoder(tgt.index({Slice(), Slice(start, start + n)}), mem, Tensor(), memory_padding, true,
                             false, Tensor(), cache));
      start += n;
    }
    if (fixed) {
      EXPECT_TRUE(torch::equal(cache.lengths(), torch::full({3}, 11, torch::kInt)));
    } else {
      EXPECT_EQ(cache.length(), 11);
    }
    EXPECT_LT(max_abs(torch::cat(outs, 1) - want), 1e-10);
    // reorder() covers the cross-attention memory too.
    cache.reset();
    const Tensor index = torch::tensor({2, 0, 2});
    decoder(tgt.index({Slice(), Slice(0, 6)}), memory, Tensor(), memory_padding, true, false, Tensor(), cache);
    cache.reorder(index);
    const Tensor got = decoder(tgt.index({index, Slice(6, None)}), memory.index({index}),
                               Tensor(), memory_padding.index({index}), true, false, Tensor(), cache);
    const Tensor full = decoder(tgt.index({index}), memory.index({index}), Tensor(), memory_padding.index({index}), true);
    EXPECT_LT(max_abs(got - full.index({Slice(), Slice(6, None)})), 1e-10);
  }
}

// torch::save / torch::load of whole models: a fresh model with the same options gives the same outputs
// (encoder with shared tables, decoder), and the shared tables stay shared after loading.
TEST(Serialization, SaveLoadRoundTrip) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(
      rnn::RelativeTransformerEncoderOptions(small_layer("shaw"), 2).share_relative_tables(true));
  auto decoder = small_decoder("t5", /*share=*/true);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : encoder->parameters()) p.add_(0.1 * torch::randn_like(p));
  }
  std::stringstream encoder_bytes, decoder_bytes;
  torch::save(encoder, encoder_bytes);
  torch::save(decoder, decoder_bytes);
  torch::manual_seed(1);  // different initial weights
  rnn::RelativeTransformerEncoder encoder2(
      rnn::RelativeTransformerEncoderOptions(small_layer("shaw"), 2).share_relative_tables(true));
  rnn::RelativeTransformerDecoder decoder2(rnn::RelativeTransformerDecoderOptions(
      small_layer("t5").norm_first(true).num_kv_heads(2), 3)
      .norm(torch::nn::AnyModule(torch::nn::LayerNorm(torch::nn::LayerNormOptions({E}))))
      .share_relative_tables(true));
  decoder2->to(torch::kDouble);
  torch::load(encoder2, encoder_bytes);
  torch::load(decoder2, decoder_bytes);
  const Tensor x = torch::randn({2, 9, E});
  EXPECT_LT(max_abs(encoder2(x) - encoder(x)), 1e-6);
  const Tensor tgt = torch::randn({2, 5, E}, torch::kDouble), memory = torch::randn({2, 7, E}, torch::kDouble);
  EXPECT_LT(max_abs(decoder2(tgt, memory, Tensor(), Tensor(), true) - decoder(tgt, memory, Tensor(), Tensor(), true)),
            1e-12);
  EXPECT_TRUE(encoder2->layer(1)->self_attn->rel_k.is_same(encoder2->layer(0)->self_attn->rel_k));
  EXPECT_TRUE(decoder2->layer(2)->self_attn->rel_bias.is_same(decoder2->layer(0)->self_attn->rel_bias));
}

// load_state_dict: a dict of tensors as Python's torch.save(dict(model.state_dict())) writes it (here
// written from C++ with torch::pickle_save, the same format) goes into a model of different initial weights.
TEST(LoadStateDict, PythonLayoutIntoCppModel) {
  torch::manual_seed(0);
  auto options = rnn::RelativeTransformerEncoderOptions(small_layer("t5").norm_first(true), 3).share_relative_tables(true);
  rnn::RelativeTransformerEncoder trained(options);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : trained->parameters()) p.add_(0.1 * torch::randn_like(p));
  }
  // Python's layout: every parameter, the shared table under every layer's name, no derived buffers.
  c10::Dict<std::string, Tensor> dict;
  std::unordered_map<std::string, Tensor> state;
  for (const auto& p : trained->named_parameters()) state[p.key()] = p.value().detach().clone();
  for (int i = 1; i < 3; ++i) state["layers." + std::to_string(i) + ".self_attn.rel_bias"] = state["layers.0.self_attn.rel_bias"];
  for (const auto& [name, tensor] : state) dict.insert(name, tensor);
  const std::string path = ::testing::TempDir() + "relattn_state.pt";
  {
    const std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  torch::manual_seed(1);
  rnn::RelativeTransformerEncoder fresh(options);
  fresh->to(torch::kDouble);  // copied weights are converted to the model's dtype
  const Tensor x = torch::randn({2, 11, E});
  EXPECT_GT(max_abs(fresh(x.to(torch::kDouble)).to(torch::kFloat) - trained(x)), 1e-3);
  rnn::load_state_dict(*fresh, path);
  EXPECT_LT(max_abs(fresh(x.to(torch::kDouble)).to(torch::kFloat) - trained(x)), 1e-5);
  EXPECT_TRUE(fresh->layer(2)->self_attn->rel_bias.is_same(fresh->layer(0)->self_attn->rel_bias));

  // Strict checks name the entry; strict = false skips what does not fit.
  auto without = state;
  without.erase("layers.1.linear1.weight");
  expect_error([&] { rnn::load_state_dict(*fresh, without); }, "parameter layers.1.linear1.weight is missing");
  auto extra = state;
  extra["layers.0.self_attn.rel_k"] = torch::zeros({3});
  expect_error([&] { rnn::load_state_dict(*fresh, extra); }, "layers.0.self_attn.rel_k, which names no parameter");
  // Layers holding different tables (weights trained without sharing) cannot load into one shared table.
  auto unshared = state;
  unshared["layers.2.self_attn.rel_bias"] = state["layers.0.self_attn.rel_bias"] + 1;
  for (bool strict : {true, false}) {
    expect_error([&] { rnn::load_state_dict(*fresh, unshared, strict); },
                 "the weights' layers.2.self_attn.rel_bias differs from the table the model shares across its layers");
  }
  rnn::load_state_dict(*fresh, extra, /*strict=*/false);
  auto wrong = state;
  wrong["layers.0.norm1.weight"] = torch::ones({E + 1});
  expect_error([&] { rnn::load_state_dict(*fresh, wrong); }, "layers.0.norm1.weight has shape [33] in the weights");
  const std::string not_a_dict = ::testing::TempDir() + "relattn_not_a_dict.pt";
  {
    const std::vector<char> bytes = torch::pickle_save(c10::IValue(torch::ones({2})));
    std::ofstream(not_a_dict, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  expect_error([&] { rnn::load_state_dict(*fresh, not_a_dict); }, "expected a dict of tensors");
  const std::string garbage = ::testing::TempDir() + "relattn_garbage.pt";
  std::ofstream(garbage, std::ios::binary) << "not a pickle";
  expect_error([&] { rnn::load_state_dict(*fresh, garbage); },
               "cannot read " + garbage + " as a dict of tensors; save it from Python with "
               "torch.save(dict(model.state_dict()), path)");
  expect_error([&] { rnn::load_state_dict(*fresh, "/nonexistent/weights.pt"); }, "cannot open /nonexistent/weights.pt");
}

// save_state_dict writes Python's layout (no derived buffers, shared tables under every layer), which
// load_state_dict (strict) reads back.
TEST(LoadStateDict, SaveLoadRoundTripInPythonLayout) {
  auto decoder = small_decoder("shaw", /*share=*/true);
  const std::string path = ::testing::TempDir() + "relattn_saved.pt";
  rnn::save_state_dict(*decoder, path);
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto saved = torch::pickle_load(bytes).toGenericDict();
  EXPECT_TRUE(saved.contains("layers.2.self_attn.rel_k"));  // the shared table, under every layer
  EXPECT_FALSE(saved.contains("layers.0.self_attn.buckets"));  // derived from the options
  auto fresh = small_decoder("shaw", /*share=*/true);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : fresh->parameters()) p.add_(0.5);
  }
  rnn::load_state_dict(*fresh, path);
  const Tensor tgt = torch::randn({2, 5, E}, torch::kDouble), memory = torch::randn({2, 7, E}, torch::kDouble);
  EXPECT_LT(max_abs(fresh(tgt, memory, Tensor(), Tensor(), true) - decoder(tgt, memory, Tensor(), Tensor(), true)),
            1e-12);
}

// bias(false) as Python's bias=False: torch::nn::LayerNorm keeps a bias that Python's LayerNorm(bias=False) does
// not have, so it stays zero and frozen through training, save_state_dict leaves it out, and load_state_dict
// (strict) does not ask for it; the layer then computes what the same weights compute without the bias term.
TEST(LoadStateDict, LayersWithoutBiasesMatchPythonsLayout) {
  torch::manual_seed(0);
  rnn::RelativeTransformerDecoder decoder(
      rnn::RelativeTransformerDecoderOptions(small_layer("t5").bias(false).norm_first(true), 2));
  decoder->to(torch::kDouble);
  const Tensor tgt = torch::randn({2, 5, E}, torch::kDouble), memory = torch::randn({2, 7, E}, torch::kDouble);
  torch::optim::SGD sgd(decoder->parameters(), 0.1);
  decoder(tgt, memory, Tensor(), Tensor(), true).square().sum().backward();
  sgd.step();
  int norm_biases = 0;
  for (const auto& p : decoder->named_parameters()) {
    if (p.key().find(".norm") == std::string::npos || p.key().find(".bias") == std::string::npos) continue;
    ++norm_biases;
    EXPECT_FALSE(p.value().requires_grad()) << p.key();
    EXPECT_EQ(max_abs(p.value()), 0.0) << p.key();
  }
  EXPECT_EQ(norm_biases, 6);  // norm1..norm3 of two layers
  const std::string path = ::testing::TempDir() + "relattn_nobias.pt";
  rnn::save_state_dict(*decoder, path);
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto saved = torch::pickle_load(bytes).toGenericDict();
  EXPECT_FALSE(saved.contains("layers.0.norm1.bias"));
  EXPECT_FALSE(saved.contains("layers.1.norm3.bias"));
  EXPECT_TRUE(saved.contains("layers.1.norm3.weight"));
  EXPECT_FALSE(saved.contains("layers.0.linear1.bias"));
  torch::manual_seed(1);
  rnn::RelativeTransformerDecoder fresh(decoder->options);
  fresh->to(torch::kDouble);
  rnn::load_state_dict(*fresh, path);  // strict
  EXPECT_LT(max_abs(fresh(tgt, memory, Tensor(), Tensor(), true) - decoder(tgt, memory, Tensor(), Tensor(), true)),
            1e-12);
  // A layer with biases still needs its norm biases.
  rnn::RelativeTransformerDecoder biased(rnn::RelativeTransformerDecoderOptions(small_layer("t5").norm_first(true), 2));
  std::unordered_map<std::string, Tensor> state;
  for (const auto& p : biased->named_parameters()) state[p.key()] = p.value().detach();
  state.erase("layers.1.norm2.bias");
  expect_error([&] { rnn::load_state_dict(*biased, state); }, "parameter layers.1.norm2.bias is missing");
}

// Structural positions through the layer and the stack: an index equal to the clipped distance buckets
// gives the modules' own result and gradients (int64 and int32, 2-D and per batch); a per-batch index gives
// each batch what its own 2-D index gives; an int64 id past int32 is still reported, not wrapped into range.
TEST(RelativeTransformerEncoder, RelIndexReachesEveryLayer) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(small_layer("shaw"), 3);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : encoder->parameters()) p.add_(0.1 * torch::randn_like(p));
  }
  const int64_t B = 2, L = 9;
  const Tensor x = torch::randn({B, L, E});
  const Tensor i = torch::arange(L).view({-1, 1});
  const Tensor j = torch::arange(L).view({1, -1});
  const Tensor distance_index = (j - i).clamp(-4, 4) + 4;  // small_layer("shaw"): max_distance 4
  auto run = [&](torch::nn::Module& module, auto&& forward) {
    module.zero_grad();
    const Tensor y = forward();
    y.square().sum().backward();
    std::vector<Tensor> grads;
    for (const auto& p : module.parameters()) grads.push_back(p.grad().clone());
    return std::make_pair(y.detach(), grads);
  };
  auto expect_same = [](const std::pair<Tensor, std::vector<Tensor>>& a,
                        const std::pair<Tensor, std::vector<Tensor>>& b) {
    EXPECT_TRUE(torch::allclose(a.first, b.first, 1e-5, 1e-6));
    ASSERT_EQ(a.second.size(), b.second.size());
    for (size_t k = 0; k < a.second.size(); ++k) EXPECT_TRUE(torch::allclose(a.second[k], b.second[k], 1e-4, 1e-6)) << k;
  };
  rnn::RelativeTransformerEncoderLayer first = encoder->layer(0);
  const auto layer_want = run(*first, [&] { return first(x); });
  const auto stack_want = run(*encoder, [&] { return encoder(x); });
  for (const Tensor& ids : {distance_index, distance_index.to(torch::kInt), distance_index.expand({B, L, L})}) {
    expect_same(run(*first, [&] { return first(x, Tensor(), false, ids); }), layer_want);
    expect_same(run(*encoder, [&] { return encoder(x, Tensor(), false, ids); }), stack_want);
  }
  torch::NoGradGuard no_grad;
  const Tensor per_batch = torch::stack({distance_index, distance_index.flip({0, 1})});
  const Tensor y = encoder(x, Tensor(), false, per_batch);
  for (int64_t b = 0; b < B; ++b) {
    const Tensor alone = encoder(x.slice(0, b, b + 1), Tensor(), false, per_batch[b]);
    EXPECT_TRUE(torch::allclose(y.slice(0, b, b + 1), alone, 1e-5, 1e-6)) << b;
  }
  EXPECT_FALSE(torch::allclose(y[1], encoder(x)[1], 1e-5, 1e-6));
  Tensor wrapped = distance_index.clone();
  wrapped.index_put_({1, 2}, (int64_t(1) << 32) + 1);  // would be id 1 after a plain int32 cast
  expect_error([&] { encoder(x, Tensor(), false, wrapped); }, "rel_index holds bucket ids in [0, 4294967297]");  // as given
}

TEST(RelativeTransformerEncoder, FinalNormAndGradients) {
  EXPECT_TRUE(rnn::RelativeTransformerEncoder(small_layer("shaw"), 2)->norm.is_empty());
  rnn::RelativeTransformerEncoder encoder(
      rnn::RelativeTransformerEncoderOptions(small_layer("clip_bias").norm_first(true), 3)
          .norm(torch::nn::AnyModule(torch::nn::LayerNorm(torch::nn::LayerNormOptions({E})))));
  ASSERT_FALSE(encoder->norm.is_empty());
  EXPECT_EQ(keys(encoder->named_parameters()).count("norm.weight"), 1u);
  const Tensor y = encoder(torch::randn({2, 6, E}));
  // The final LayerNorm (weight 1, bias 0) leaves every row with mean 0.
  EXPECT_LT(max_abs(y.mean(-1)), 1e-5);
  (y * torch::randn({2, 6, E})).sum().backward();
  expect_gradients_everywhere(*encoder);
}

TEST(RelativeTransformerEncoder, SharedTablesAreOneParameter) {
  for (const std::string& scheme : {std::string("shaw"), std::string("t5"), std::string("clip_bias")}) {
    SCOPED_TRACE(scheme);
    torch::manual_seed(0);
    rnn::RelativeTransformerEncoder shared(
        rnn::RelativeTransformerEncoderOptions(small_layer(scheme), 3).share_relative_tables(true));
    rnn::RelativeTransformerEncoder separate(small_layer(scheme), 3);
    const size_t tables_per_layer = scheme == "shaw" ? 2 : 1;
    EXPECT_EQ(separate->parameters().size() - shared->parameters().size(), 2 * tables_per_layer);
    const rnn::RelativeTables first = shared->layer(0)->self_attn->relative_tables();
    for (size_t i = 1; i < 3; ++i) {
      EXPECT_TRUE(shared->layer(i)->self_attn->uses_external_tables());
      for (const auto& t : shared->layer(i)->self_attn->relative_tables()) EXPECT_TRUE(t.value().is_same(first[t.key()]));
    }

    // Give the separate stack the shared stack's weights (every layer the first layer's tables): the
    // outputs agree, and each shared table's gradient is the sum of the separate tables' gradients.
    {
      torch::NoGradGuard no_grad;
      const auto src = shared->named_parameters();
      for (auto& p : separate->named_parameters()) {
        std::string name = p.key();
        if (!src.contains(name)) name = "layers.0" + name.substr(name.find(".self_attn."));
        p.value().copy_(src[name]);
      }
    }
    const Tensor x = torch::randn({2, 9, E});
    const Tensor w = torch::randn({2, 9, E});
    const Tensor y_shared = shared(x);
    const Tensor y_separate = separate(x);
    EXPECT_TRUE(torch::allclose(y_shared, y_separate, 1e-5, 1e-6));
    (y_shared * w).sum().backward();
    (y_separate * w).sum().backward();
    const auto separate_params = separate->named_parameters();
    for (const auto& t : first) {
      Tensor sum = torch::zeros_like(t.value());
      for (int i = 0; i < 3; ++i) sum += separate_params["layers." + std::to_string(i) + ".self_attn." + t.key()].grad();
      EXPECT_TRUE(torch::allclose(t.value().grad(), sum, 1e-4, 1e-6)) << t.key();
    }
  }
}

TEST(RelativeTransformerEncoder, SharedTablesSurviveOptimizerCloneAndCast) {
  torch::manual_seed(0);
  rnn::RelativeTransformerEncoder encoder(
      rnn::RelativeTransformerEncoderOptions(small_layer("shaw"), 3).share_relative_tables(true));
  torch::optim::Adam opt(encoder->parameters(), torch::optim::AdamOptions(1e-2));
  const Tensor before = encoder->layer(0)->self_attn->rel_k.detach().clone();
  encoder(torch::randn({2, 8, E})).pow(2).sum().backward();
  opt.step();
  EXPECT_FALSE(torch::equal(before, encoder->layer(0)->self_attn->rel_k));
  EXPECT_TRUE(encoder->layer(2)->self_attn->rel_k.is_same(encoder->layer(0)->self_attn->rel_k));

  // A deep copy shares its own first-layer tables, not the original's.
  auto copy = std::dynamic_pointer_cast<rnn::RelativeTransformerEncoderImpl>(encoder->clone());
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->parameters().size(), encoder->parameters().size());
  EXPECT_FALSE(copy->layer(0)->self_attn->rel_k.is_same(encoder->layer(0)->self_attn->rel_k));
  EXPECT_TRUE(copy->layer(1)->self_attn->rel_k.is_same(copy->layer(0)->self_attn->rel_k));
  EXPECT_TRUE(copy->layer(2)->self_attn->rel_v.is_same(copy->layer(0)->self_attn->rel_v));
  const Tensor x = torch::randn({2, 8, E});
  EXPECT_TRUE(torch::allclose(copy->forward(x), encoder(x), 1e-5, 1e-6));

  // Casting converts the shared tables for every layer at once; bucket ids stay integers.
  encoder->to(torch::kDouble);
  EXPECT_EQ(encoder->layer(2)->self_attn->rel_k.scalar_type(), torch::kDouble);
  EXPECT_EQ(encoder->named_buffers()["layers.1.self_attn.buckets"].scalar_type(), torch::kLong);
  EXPECT_EQ(encoder(x.to(torch::kDouble)).scalar_type(), torch::kDouble);
}

TEST(RelativeTransformerEncoder, DeepNormConstantsAndInit) {
  rnn::RelativeTransformerEncoder encoder(rnn::RelativeTransformerEncoderOptions(small_layer("shaw"), 12).deepnorm(true));
  const double alpha = std::pow(24.0, 0.25);
  const double beta = std::pow(96.0, -0.25);
  EXPECT_DOUBLE_EQ(rnn::RelativeTransformerEncoderImpl::deepnorm_alpha(12), alpha);
  EXPECT_DOUBLE_EQ(rnn::RelativeTransformerEncoderImpl::deepnorm_beta(12), beta);
  std::vector<Tensor> v_weights, q_weights;
  for (size_t i = 0; i < 12; ++i) {
    EXPECT_DOUBLE_EQ(encoder->layer(i)->residual_alpha, alpha);
    v_weights.push_back(encoder->layer(i)->self_attn->v_proj->weight);
    q_weights.push_back(encoder->layer(i)->self_attn->q_proj->weight);
  }
  // Xavier-normal: std = gain * sqrt(2 / (fan_in + fan_out)) with fan_in = fan_out = 32.
  const double xavier = std::sqrt(2.0 / 64.0);
  EXPECT_NEAR(torch::stack(v_weights).std().item<double>(), beta * xavier, 0.05 * beta * xavier);
  EXPECT_NEAR(torch::stack(q_weights).std().item<double>(), xavier, 0.05 * xavier);
  // The residual really is scaled: alpha = 1 gives another output.
  const Tensor x = torch::randn({1, 5, E});
  const Tensor y = encoder->layer(0)(x);
  encoder->layer(0)->residual_alpha = 1.0;
  EXPECT_FALSE(torch::allclose(y, encoder->layer(0)(x)));
  expect_error([] { rnn::RelativeTransformerEncoder(rnn::RelativeTransformerEncoderOptions(small_layer("shaw").norm_first(true), 4).deepnorm(true)); },
               "deepnorm is defined for post-LN layers");
}

TEST(RelativeTransformerEncoder, DeepStackTrainsWithoutNaN) {
  torch::manual_seed(0);
  const int64_t vocab = 8, B = 8, L = 16;
  rnn::RelativeTransformerEncoder encoder(
      rnn::RelativeTransformerEncoderOptions(small_layer("shaw"), 12).deepnorm(true).share_relative_tables(true));
  torch::nn::Embedding embed(vocab, E);
  torch::nn::Linear head(E, vocab);
  std::vector<Tensor> params = encoder->parameters();
  for (const auto& m : {embed->parameters(), head->parameters()}) params.insert(params.end(), m.begin(), m.end());
  torch::optim::Adam opt(params, torch::optim::AdamOptions(1e-3));
  // Predict the token one position back.
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 30; ++step) {
    const Tensor tokens = torch::randint(0, vocab, {B, L}, torch::kLong);
    const Tensor logits = head(encoder(embed(tokens)));
    const Tensor loss = torch::cross_entropy_loss(logits.index({Slice(), Slice(1, None)}).reshape({-1, vocab}),
                                                  tokens.index({Slice(), Slice(0, L - 1)}).reshape({-1}));
    opt.zero_grad();
    loss.backward();
    for (const auto& p : params) ASSERT_TRUE(torch::isfinite(p.grad()).all().item<bool>());
    opt.step();
    const double value = loss.item<double>();
    ASSERT_TRUE(std::isfinite(value)) << "step " << step;
    if (step == 0) first = value;
    last = value;
  }
  EXPECT_LT(last, first) << "first " << first << ", last " << last;
}

// ------------------------------------------------------------------------- absolute positional encodings

TEST(SinusoidalPositionalEncoding, Values) {
  for (int64_t d : {8, 7}) {
    rnn::SinusoidalPositionalEncoding pe(d);
    const Tensor y = pe(torch::zeros({2, 5, d}));
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, d}));
    EXPECT_TRUE(torch::equal(y[0], y[1]));
    for (int64_t p = 0; p < 5; ++p) {
      for (int64_t f = 0; f < d; ++f) {
        const double angle = static_cast<double>(p) / std::pow(10000.0, static_cast<double>(f - f % 2) / d);
        EXPECT_NEAR(y[0][p][f].item<double>(), f % 2 ? std::cos(angle) : std::sin(angle), 1e-6);
      }
    }
    EXPECT_TRUE(pe->parameters().empty());
  }
  // A precomputed table, and longer inputs past it.
  rnn::SinusoidalPositionalEncoding cached(rnn::SinusoidalPositionalEncodingOptions(8).max_len(4));
  rnn::SinusoidalPositionalEncoding fresh(8);
  EXPECT_EQ(cached->table.sizes(), (std::vector<int64_t>{4, 8}));
  for (int64_t L : {3, 6}) {
    EXPECT_TRUE(torch::allclose(cached(torch::zeros({1, L, 8})), fresh(torch::zeros({1, L, 8}))));
  }
  EXPECT_EQ(fresh(torch::zeros({1, 3, 8}, torch::kDouble)).scalar_type(), torch::kDouble);
  expect_error([&] { fresh(torch::zeros({1, 3, 6})); }, "expected input [B, L, 8]");
  // A cast leaves the table float32 (as in Python): inputs within and beyond it are encoded alike.
  rnn::SinusoidalPositionalEncoding big(rnn::SinusoidalPositionalEncodingOptions(10).max_len(200));
  big->to(torch::kHalf);
  EXPECT_EQ(big->table.scalar_type(), torch::kFloat);
  const Tensor zeros = torch::zeros({1, 300, 10});
  EXPECT_TRUE(torch::equal(big(zeros.slice(1, 0, 200)), big(zeros).slice(1, 0, 200)));
  big->to(torch::kCPU, torch::kDouble);
  EXPECT_TRUE(torch::equal(big->table, rnn::SinusoidalPositionalEncoding(
                                           rnn::SinusoidalPositionalEncodingOptions(10).max_len(200))->table));
}

TEST(LearnedPositionalEncoding, AddsRowsAndRejectsLongInputs) {
  rnn::LearnedPositionalEncoding pe(10, 8);
  EXPECT_EQ(pe->weight.sizes(), (std::vector<int64_t>{10, 8}));
  const Tensor x = torch::randn({2, 6, 8});
  const Tensor y = pe(x);
  EXPECT_TRUE(torch::allclose(y - x, pe->weight.slice(0, 0, 6).unsqueeze(0).expand_as(x), 1e-5, 1e-6));
  y.sum().backward();
  EXPECT_EQ(pe->weight.grad().slice(0, 0, 6).sum().item<double>(), 2.0 * 6 * 8);
  EXPECT_EQ(max_abs(pe->weight.grad().slice(0, 6, 10)), 0.0);
  EXPECT_NO_THROW(pe(torch::randn({1, 10, 8})));
  expect_error([&] { pe(torch::randn({1, 11, 8})); }, "sequence length 11 exceeds the table's max_len=10");
}

TEST(LearnedPositionalEncoding, InitStdAsInPython) {
  torch::manual_seed(0);
  EXPECT_NEAR(rnn::LearnedPositionalEncoding(400, 50)->weight.std().item<double>(), 0.02, 0.001);
  torch::manual_seed(0);
  rnn::LearnedPositionalEncoding wide(rnn::LearnedPositionalEncodingOptions(400, 50).init_std(0.5));
  EXPECT_NEAR(wide->weight.std().item<double>(), 0.5, 0.02);
  EXPECT_EQ(max_abs(rnn::LearnedPositionalEncoding(rnn::LearnedPositionalEncodingOptions(4, 8).init_std(0))->weight),
            0.0);
  expect_error([] { rnn::LearnedPositionalEncoding(rnn::LearnedPositionalEncodingOptions(4, 8).init_std(-1)); },
               "init_std must be finite and >= 0, got -1");
}

TEST(MLPPositionalEncoding, LearnsAFunctionOfThePosition) {
  rnn::MLPPositionalEncoding pe(rnn::MLPPositionalEncodingOptions(8).hidden(16));
  EXPECT_EQ(pe->fc1->weight.sizes(), (std::vector<int64_t>{16, 1}));
  EXPECT_EQ(pe->fc2->weight.sizes(), (std::vector<int64_t>{8, 16}));
  // Normalised positions i / (L - 1).
  EXPECT_TRUE(torch::allclose(pe->positions(5).squeeze(1), torch::tensor({0.0f, 0.25f, 0.5f, 0.75f, 1.0f})));
  EXPECT_TRUE(torch::equal(pe->positions(1), torch::zeros({1, 1})));
  const Tensor x = torch::randn({2, 40, 8});
  const Tensor y = pe(x);
  EXPECT_EQ(y.sizes(), x.sizes());
  EXPECT_TRUE(torch::allclose(y[0] - x[0], y[1] - x[1], 1e-5, 1e-6));
  (y * torch::randn_like(y)).sum().backward();
  expect_gradients_everywhere(*pe);

  rnn::MLPPositionalEncoding raw(rnn::MLPPositionalEncodingOptions(8).scale(1.0).activation("relu"));
  EXPECT_TRUE(torch::allclose(raw->positions(4).squeeze(1), torch::arange(4, torch::kFloat)));
}

// Packed sequences: with segment_ids each encoding restarts its positions at every sequence, so a packed
// row gets what each sequence gets alone, and so do the parameters' gradients.
TEST(PositionalEncodings, PackedSequencesRestartPositions) {
  torch::manual_seed(0);
  const std::vector<int64_t> lengths{5, 12, 1, 6};  // one row of 24 tokens
  std::vector<Tensor> pieces;
  for (size_t s = 0; s < lengths.size(); ++s) pieces.push_back(torch::full({lengths[s]}, int64_t(s), torch::kLong));
  const Tensor ids = torch::cat(pieces).unsqueeze(0);
  const Tensor x = torch::randn({1, 24, 8}, torch::kDouble).requires_grad_();
  std::vector<std::pair<std::string, torch::nn::AnyModule>> encodings{
      {"sinusoidal", torch::nn::AnyModule(rnn::SinusoidalPositionalEncoding(8))},
      {"learned", torch::nn::AnyModule(rnn::LearnedPositionalEncoding(16, 8))},
      {"mlp", torch::nn::AnyModule(rnn::MLPPositionalEncoding(rnn::MLPPositionalEncodingOptions(8).hidden(16)))},
      {"mlp_scaled", torch::nn::AnyModule(rnn::MLPPositionalEncoding(rnn::MLPPositionalEncodingOptions(8).scale(0.5)))}};
  for (auto& [name, any] : encodings) {
    SCOPED_TRACE(name);
    auto module = any.ptr();
    module->to(torch::kDouble);
    const Tensor packed = any.forward(x, ids);
    packed.pow(2).sum().backward();
    std::vector<Tensor> packed_grads{x.grad().clone()};
    for (const auto& p : module->parameters()) packed_grads.push_back(p.grad().clone());
    module->zero_grad();
    x.mutable_grad().zero_();
    int64_t start = 0;
    for (int64_t n : lengths) {
      const Tensor alone = any.forward(x.narrow(1, start, n));
      EXPECT_TRUE(torch::allclose(packed.narrow(1, start, n), alone, 1e-12, 1e-6)) << "sequence at " << start;
      alone.pow(2).sum().backward();
      start += n;
    }
    EXPECT_TRUE(torch::allclose(packed_grads[0], x.grad(), 1e-12, 1e-6));
    const auto params = module->parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(torch::allclose(packed_grads[i + 1], params[i].grad(), 1e-10, 1e-10)) << params.size();
    }
    x.mutable_grad().zero_();
    expect_error([&] { any.forward(x, ids.narrow(1, 0, 20)); }, "segment_ids must be [B, L] = [1, 24] like the input");
    expect_error([&] { any.forward(x.detach().to(torch::kMeta), ids); },
                 "segment_ids must be on the input's device (meta), got cpu");
  }
  // Rows longer than the learned table are fine while every sequence fits it.
  rnn::LearnedPositionalEncoding small(12, 8);
  EXPECT_NO_THROW(small(x.detach().to(torch::kFloat), ids));
  expect_error([&] { small(x.detach().to(torch::kFloat)); }, "sequence length 24 exceeds the table's max_len=12");
  expect_error([&] { small(x.detach().to(torch::kFloat), torch::zeros({1, 24}, torch::kLong)); },
               "a packed sequence of length 24 exceeds the table's max_len=12");
}

TEST(Modules, ComposeInSequential) {
  // forward's default arguments work through AnyModule.
  torch::nn::Sequential model(rnn::SinusoidalPositionalEncoding(E), rnn::RelativeTransformerEncoderLayer(small_layer("alibi")),
                              rnn::RelativeTransformerEncoder(small_layer("t5"), 2));
  EXPECT_EQ(model->forward(torch::randn({2, 7, E})).sizes(), (std::vector<int64_t>{2, 7, E}));
  std::ostringstream printed;
  printed << *model;
  EXPECT_NE(printed.str().find("relattn::nn::RelativeMultiheadAttention(embed_dim=32, num_heads=4, position=t5"),
            std::string::npos)
      << printed.str();
}

// A call that throws (a stack's, a layer's or a module's; here a key_padding_mask of the wrong length, caught by
// the op after the keys were written, or a final norm that fails after both layers committed) leaves the cache
// as it found it: no slot from a failed first call, no advanced length; decoding on gives the causal run. A
// decoder's failed first call keeps no projected memory either.
TEST(KVCache, AFailedCallLeavesTheCacheAsItWas) {
  torch::NoGradGuard no_grad;
  for (bool fixed : {false, true}) {
    SCOPED_TRACE(fixed ? "static_shapes" : "dynamic");
    rnn::RelativeTransformerEncoder encoder = decoding_encoder("alibi", 2);
    const Tensor x = torch::randn({2, 7, E}, torch::kDouble);
    const Tensor bad = torch::zeros({2, 3}, torch::kBool);
    const Tensor want = encoder(x, Tensor(), true);
    rnn::KVCache cache(10, fixed);
    auto lengths = [&] { return fixed ? cache.lengths() : torch::tensor({cache.length()}); };
    const Tensor prompt = x.index({Slice(), Slice(0, 4)});
    expect_error([&] { encoder->forward(prompt, bad, true, Tensor(), Tensor(), cache); }, "key_padding_mask");
    EXPECT_EQ(fixed ? cache.lengths().defined() : cache.length() != 0, false);  // no slot kept
    std::vector<Tensor> outs{encoder->forward(prompt, Tensor(), true, Tensor(), Tensor(), cache)};
    const Tensor before = lengths();
    const Tensor token = x.index({Slice(), Slice(4, 5)});
    expect_error([&] { encoder->forward(token, bad, true, Tensor(), Tensor(), cache); }, "key_padding_mask");
    expect_error([&] { encoder->layer(1)->forward(token, bad, true, Tensor(), Tensor(), cache); }, "key_padding_mask");
    expect_error([&] { encoder->layer(0)->self_attn->forward(token, token, token, bad, true, Tensor(), Tensor(), cache); },
                 "key_padding_mask");
    EXPECT_TRUE(torch::equal(lengths(), before));
    encoder->norm = torch::nn::AnyModule(torch::nn::Linear(E + 1, E));  // fails after both layers committed
    expect_error([&] { encoder->forward(token, Tensor(), true, Tensor(), Tensor(), cache); }, "");
    encoder->norm = torch::nn::AnyModule();
    EXPECT_TRUE(torch::equal(lengths(), before));
    for (int64_t t = 4; t < 7; ++t)
      outs.push_back(encoder->forward(x.index({Slice(), Slice(t, t + 1)}), Tensor(), true, Tensor(), Tensor(), cache));
    EXPECT_LT(max_abs(torch::cat(outs, 1) - want), 1e-10);

    rnn::RelativeTransformerDecoder decoder = small_decoder("t5");
    decoder->eval();
    const Tensor memory = torch::randn({2, 6, E}, torch::kDouble);
    const Tensor full = decoder(x.index({Slice(), Slice(0, 3)}), memory, Tensor(), Tensor(), true);
    rnn::KVCache dcache(10, fixed);
    // The memory mask fails after the first layer's self-attention and memory projection.
    expect_error([&] { decoder->forward(x.index({Slice(), Slice(0, 2)}), memory.flip(1), Tensor(), bad, true, false,
                                        Tensor(), dcache); },
                 "key_padding_mask");
    const Tensor got = torch::cat(
        {decoder->forward(x.index({Slice(), Slice(0, 2)}), memory, Tensor(), Tensor(), true, false, Tensor(), dcache),
         decoder->forward(x.index({Slice(), Slice(2, 3)}), memory, Tensor(), Tensor(), true, false, Tensor(), dcache)},
        1);
    EXPECT_LT(max_abs(got - full), 1e-10);
  }
}

// clone() branches a decode: two continuations of one prefix, one on the cache and one on its clone, each give
// their causal run; the clone's slots are its own tensors.
TEST(KVCache, CloneBranchesTheDecode) {
  torch::NoGradGuard no_grad;
  for (bool fixed : {false, true}) {
    SCOPED_TRACE(fixed ? "static_shapes" : "dynamic");
    rnn::RelativeTransformerEncoder encoder = decoding_encoder("shaw", 2);
    const Tensor x = torch::randn({2, 6, E}, torch::kDouble);
    const Tensor y = torch::randn({2, 2, E}, torch::kDouble);
    rnn::KVCache cache(8, fixed);
    encoder->forward(x.index({Slice(), Slice(0, 4)}), Tensor(), true, Tensor(), Tensor(), cache);
    rnn::KVCache branch = cache.clone();
    const Tensor a = encoder->forward(x.index({Slice(), Slice(4, 6)}), Tensor(), true, Tensor(), Tensor(), cache);
    const Tensor b = encoder->forward(y, Tensor(), true, Tensor(), Tensor(), branch);
    EXPECT_LT(max_abs(a - encoder(x, Tensor(), true).index({Slice(), Slice(4, None)})), 1e-10);
    const Tensor xy = torch::cat({x.index({Slice(), Slice(0, 4)}), y}, 1);
    EXPECT_LT(max_abs(b - encoder(xy, Tensor(), true).index({Slice(), Slice(4, None)})), 1e-10);
    EXPECT_FALSE(rnn::KVCache().clone().defined());
  }
}

// Slots belong to module instances, not addresses: a module built where a destroyed one lived (the allocator
// hands the same block back) starts with an empty slot; a clone() of a module has a slot of its own.
TEST(KVCache, SlotsBelongToModuleInstances) {
  torch::NoGradGuard no_grad;
  const auto options = rnn::RelativeMultiheadAttentionOptions(E, H).position(rnn::PositionScheme::kALiBi);
  const Tensor x = torch::randn({2, 3, E});
  rnn::KVCache cache(16);
  for (int i = 0; i < 4; ++i) {
    rnn::RelativeMultiheadAttention attn(options);
    const Tensor got = attn(x, Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache);
    EXPECT_LT(max_abs(got - attn(x, Tensor(), Tensor(), Tensor(), true)), 1e-6) << "module " << i;
  }
  rnn::RelativeMultiheadAttention attn(options);
  attn(x, Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache);
  auto copy = std::dynamic_pointer_cast<rnn::RelativeMultiheadAttentionImpl>(attn->clone());
  EXPECT_NE(copy->cache_id(), attn->cache_id());
  const Tensor got = copy->forward(x, Tensor(), Tensor(), Tensor(), true, Tensor(), Tensor(), cache);
  EXPECT_LT(max_abs(got - copy->forward(x, Tensor(), Tensor(), Tensor(), true)), 1e-6);
}

}  // namespace
