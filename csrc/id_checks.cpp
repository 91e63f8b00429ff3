// Checks of integer bucket ids; id_checks.h says why there are three ways.
#include "id_checks.h"

#include <algorithm>

#include <ATen/ATen.h>

namespace relattn {
namespace ops {

IdSummary summarize_ids(const at::Tensor& ids, bool layout) {
  IdSummary s;
  if (ids.numel() == 0) {
    s.distinct = s.runs = true;
    return s;
  }
  if (!layout) {
    auto mm = at::aminmax(ids);  // one reduction; only its two results come to the host, in one copy
    const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kCPU, at::kLong);
    s.lo = both.const_data_ptr<int64_t>()[0];
    s.hi = both.const_data_ptr<int64_t>()[1];
    return s;
  }
  const at::Tensor host = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  const int64_t n = host.numel();
  const auto [lo, hi] = std::minmax_element(p, p + n);
  s.lo = *lo;
  s.hi = *hi;
  // Runs: the first id of each maximal run of equal neighbours; the ids form runs iff these heads are
  // distinct, and are distinct iff, in addition, every run has length one.
  std::vector<int64_t> heads;
  for (int64_t x = 0; x < n; ++x) {
    if (x == 0 || p[x] != p[x - 1]) heads.push_back(p[x]);
  }
  const bool single = static_cast<int64_t>(heads.size()) == n;
  std::sort(heads.begin(), heads.end());
  s.runs = std::adjacent_find(heads.begin(), heads.end()) == heads.end();
  s.distinct = s.runs && single;
  return s;
}

bool IdSummaryCache::cacheable(const at::Tensor& t) {
  return t.defined() && t.has_storage() && !t.is_inference();
}

IdSummaryCache::Key IdSummaryCache::Key::of(const at::Tensor& t) {
  return {t.storage().unsafeGetStorageImpl(), t.const_data_ptr(), t.storage_offset(), t.sizes().vec(),
          t.strides().vec(), t.scalar_type()};
}

bool IdSummaryCache::Key::operator==(const Key& o) const {
  return storage == o.storage && data == o.data && offset == o.offset && dtype == o.dtype && sizes == o.sizes &&
         strides == o.strides;
}

std::optional<IdSummary> IdSummaryCache::find(const at::Tensor& t, bool layout) {
  if (!cacheable(t)) return std::nullopt;
  const Key key = Key::of(t);
  const int64_t version = t._version();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->storage.expired() || !(it->key == key) || it->version != version || (layout && !it->layout)) continue;
    entries_.splice(entries_.begin(), entries_, it);
    return entries_.front().summary;
  }
  return std::nullopt;
}

void IdSummaryCache::insert(const at::Tensor& t, bool layout, const IdSummary& s) {
  if (!cacheable(t) || capacity_ == 0) return;
  Entry e{t.storage().getWeakStorageImpl(), Key::of(t), t._version(), layout, s};
  std::lock_guard<std::mutex> lock(mu_);
  // Entries of freed storages, and older summaries of this very tensor, make room first.
  entries_.remove_if([&](const Entry& old) { return old.storage.expired() || old.key == e.key; });
  entries_.push_front(std::move(e));
  while (entries_.size() > capacity_) entries_.pop_back();
}

size_t IdSummaryCache::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

IdSummaryCache& id_summary_cache() {
  static IdSummaryCache cache(64);
  return cache;
}

namespace {

// kHost / kHostCached: the summary read on the host, or the cached one.
IdSummary host_id_summary(const at::Tensor& ids, bool layout, IdCheck mode) {
  if (mode == IdCheck::kHost) return summarize_ids(ids, layout);
  IdSummaryCache& cache = id_summary_cache();
  if (auto hit = cache.find(ids, layout)) return *hit;
  const IdSummary s = summarize_ids(ids, layout);
  cache.insert(ids, layout, s);
  return s;
}

// kDevice: the range check lo >= 0 && hi < R as a device-side assertion on the current stream.
void assert_ids_in_range_async(const at::Tensor& ids, int64_t R, const char* name) {
  if (ids.numel() == 0) return;
  auto mm = at::aminmax(ids);
  const at::Tensor ok = at::logical_and(std::get<0>(mm).ge(0), std::get<1>(mm).lt(R));
  at::_assert_async(ok, c10::str("relattn.attention: ", name, " holds a bucket id outside [0, R) with R = ", R));
}

// kDevice: the assertion that the 1-D `ids` (in range) still have the layout `s` claims (distinct, or in
// runs); nothing when s claims neither.
void assert_layout_async(const at::Tensor& ids, const IdSummary& s, const char* name) {
  const int64_t n = ids.numel();
  if (!(s.distinct || s.runs) || n < 2) return;  // one entry is distinct and a run
  const at::Tensor x = ids.to(at::kLong).contiguous().view({n});
  at::Tensor keys = x;
  if (!s.distinct) {
    // Runs: the first entry of every run of equal neighbours keeps its id, the others get ids of their
    // own below zero (the range check keeps real ids >= 0); the ids form runs iff these keys are distinct.
    const at::Tensor first = at::ones({1}, x.options().dtype(at::kBool));
    const at::Tensor head = at::cat({first, x.slice(0, 1).ne(x.slice(0, 0, n - 1))});
    keys = at::where(head, x, at::arange(-1, -n - 1, -1, x.options()));
  }
  const at::Tensor sorted = std::get<0>(keys.sort());
  at::_assert_async(sorted.slice(0, 1).ne(sorted.slice(0, 0, n - 1)).all(),
                    c10::str("relattn.attention: ", name, " was changed after it was checked (its ids are no "
                             "longer ", s.distinct ? "distinct" : "in runs",
                             "); a CUDA graph captured with it must be captured again"));
}

}  // namespace

IdSummary check_ids(const at::Tensor& ids, int64_t R, const char* name, bool layout, IdCheck mode) {
  if (mode == IdCheck::kDevice) {
    assert_ids_in_range_async(ids, R, name);
    if (!layout) return {};
    // The layout read before capture, if any, asserted to hold on every replay; else the general layout
    // (distinct = runs = false), correct for any ids.
    const IdSummary s = id_summary_cache().find(ids, /*layout=*/true).value_or(IdSummary{});
    assert_layout_async(ids, s, name);
    return s;
  }
  const IdSummary s = host_id_summary(ids, layout, mode);
  TORCH_CHECK(ids.numel() == 0 || (s.lo >= 0 && s.hi < R), "relattn.attention: ", name, " holds bucket ids in [",
              s.lo, ", ", s.hi, "], but every id must lie in [0, R) with R = ", R,
              " (the bucket dimension of rel_k/rel_v/rel_bias)");
  return s;
}

}  // namespace ops
}  // namespace relattn
