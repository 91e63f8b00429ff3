// Helpers that build relattn's inputs (SPEC §3). Python reaches them as torch.ops.relattn.*.
#include <cmath>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "relattn/relattn.h"

namespace relattn {

at::Tensor clip_buckets(int64_t max_distance) {
  TORCH_CHECK(max_distance >= 0, "relattn.clip_buckets: max_distance must be >= 0, got ", max_distance);
  return at::arange(2 * max_distance + 1, at::kLong);
}

// T5's _relative_position_bucket (mesh-tensorflow / HF transformers), evaluated with the same tensor
// ops in float32 so that every distance gets exactly T5's bucket. For |d| >= max_distance the bucket no
// longer changes, so the table over [-max_distance, max_distance] covers every distance.
at::Tensor t5_buckets(int64_t num_buckets, int64_t max_distance, bool bidirectional) {
  const int64_t half = bidirectional ? num_buckets / 2 : num_buckets;
  const int64_t max_exact = half / 2;
  TORCH_CHECK(max_exact >= 1, "relattn.t5_buckets: num_buckets must be >= ", bidirectional ? 4 : 2,
              (bidirectional ? " when bidirectional" : ""), ", got ", num_buckets);
  TORCH_CHECK(max_distance > max_exact, "relattn.t5_buckets: max_distance must exceed the ", max_exact,
              " exact buckets (num_buckets/", bidirectional ? 4 : 2, "), got ", max_distance);
  const at::Tensor d = at::arange(-max_distance, max_distance + 1, at::kLong);  // j - i
  at::Tensor bucket = at::zeros_like(d);
  at::Tensor n;
  if (bidirectional) {
    bucket = bucket + (d > 0).to(at::kLong) * half;
    n = d.abs();
  } else {
    n = -at::minimum(d, at::zeros_like(d));
  }
  const at::Tensor is_small = n < max_exact;
  at::Tensor large =
      max_exact + (at::log(n.to(at::kFloat) / max_exact) /
                   std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
                   (half - max_exact))
                      .to(at::kLong);
  large = at::minimum(large, at::full_like(large, half - 1));
  return bucket + at::where(is_small, n, large);
}

namespace {
std::vector<double> alibi_slopes_power_of_2(int64_t n) {
  const double start = std::pow(2.0, -std::pow(2.0, -(std::log2(static_cast<double>(n)) - 3)));
  std::vector<double> s(n);
  for (int64_t i = 0; i < n; ++i) s[i] = start * std::pow(start, static_cast<double>(i));
  return s;
}
// Press et al. (ALiBi): geometric slopes for a power of two; otherwise those of the closest lower
// power of two followed by every other slope of the next power of two.
std::vector<double> alibi_slopes_list(int64_t n) {
  const double l2 = std::log2(static_cast<double>(n));
  if (l2 == std::floor(l2)) return alibi_slopes_power_of_2(n);
  const int64_t closest = int64_t(1) << static_cast<int64_t>(std::floor(l2));
  std::vector<double> s = alibi_slopes_power_of_2(closest);
  const std::vector<double> extra = alibi_slopes_list(2 * closest);
  for (int64_t i = 0; static_cast<int64_t>(s.size()) < n; i += 2) s.push_back(extra[i]);
  return s;
}
}  // namespace

at::Tensor alibi_slopes(int64_t num_heads) {
  TORCH_CHECK(num_heads >= 1, "relattn.alibi_slopes: num_heads must be >= 1, got ", num_heads);
  const std::vector<double> s = alibi_slopes_list(num_heads);
  return at::tensor(s, at::kDouble).to(at::kFloat);
}

namespace {

at::Tensor checked_segment_ids(const at::Tensor& segment_ids, const char* who) {
  TORCH_CHECK(segment_ids.defined(), "relattn.", who, ": segment_ids is undefined");
  TORCH_CHECK(at::isIntegralType(segment_ids.scalar_type(), /*includeBool=*/false), "relattn.", who,
              ": segment_ids must have an integer dtype, got ", segment_ids.scalar_type());
  TORCH_CHECK(segment_ids.dim() >= 1, "relattn.", who, ": segment_ids must have at least one dimension (the row), got ",
              "a scalar");
  return segment_ids.to(at::kLong);
}

// For each token: the index, in the row's stable sort by id, of the first and of one past the last token
// with its id, and the permutation of that sort. Every token with one id is contiguous in the sorted row,
// in its original order (stable), so its rank among them is its sorted index minus the first one. Device
// ops only (no host sync), O(L log L) per row.
struct SegmentGroups {
  at::Tensor first, end, perm;
};

SegmentGroups segment_groups(const at::Tensor& ids, bool want_end) {
  // Rows along the last dimension, as [N, L]. Symbolic-shape friendly (no sizes read), so the op traces
  // under torch.compile with dynamic shapes.
  const at::Tensor rows = (ids.dim() == 1 ? ids.unsqueeze(0) : ids.flatten(0, -2)).contiguous();
  auto [sorted, perm] = at::sort(rows, /*stable=*/true, /*dim=*/-1, /*descending=*/false);
  SegmentGroups g;
  g.perm = perm;
  g.first = at::searchsorted(sorted, sorted, /*out_int32=*/false, /*right=*/false);
  if (want_end) g.end = at::searchsorted(sorted, sorted, /*out_int32=*/false, /*right=*/true);
  return g;
}

}  // namespace

at::Tensor segment_positions(const at::Tensor& segment_ids) {
  const at::Tensor ids = checked_segment_ids(segment_ids, "segment_positions");
  const SegmentGroups g = segment_groups(ids, false);
  const at::Tensor index = at::ones_like(g.first).cumsum(-1) - 1;  // 0, 1, ..., L-1 in every row
  const at::Tensor rank = index - g.first;
  return at::empty_like(rank).scatter_(-1, g.perm, rank).view_as(ids);
}

at::Tensor segment_lengths(const at::Tensor& segment_ids) {
  const at::Tensor ids = checked_segment_ids(segment_ids, "segment_lengths");
  const SegmentGroups g = segment_groups(ids, true);
  const at::Tensor length = g.end - g.first;
  return at::empty_like(length).scatter_(-1, g.perm, length).view_as(ids);
}

}  // namespace relattn
