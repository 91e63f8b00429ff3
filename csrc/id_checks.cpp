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

bool IdSummaryCache::Entry::matches(const at::Tensor& t, bool want_layout) const {
  return (layout || !want_layout) && !storage.expired() &&
         storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() && data == t.const_data_ptr() &&
         offset == t.storage_offset() && dtype == t.scalar_type() && t.sizes() == at::IntArrayRef(sizes) &&
         t.strides() == at::IntArrayRef(strides) && version == t._version();
}

std::optional<IdSummary> IdSummaryCache::find(const at::Tensor& t, bool layout) {
  if (!cacheable(t)) return std::nullopt;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (!it->matches(t, layout)) continue;
    entries_.splice(entries_.begin(), entries_, it);
    return entries_.front().summary;
  }
  return std::nullopt;
}

void IdSummaryCache::insert(const at::Tensor& t, bool layout, const IdSummary& s) {
  if (!cacheable(t) || capacity_ == 0) return;
  Entry e(t.storage().getWeakStorageImpl());
  e.data = t.const_data_ptr();
  e.offset = t.storage_offset();
  e.sizes = t.sizes().vec();
  e.strides = t.strides().vec();
  e.dtype = t.scalar_type();
  e.version = t._version();
  e.layout = layout;
  e.summary = s;
  std::lock_guard<std::mutex> lock(mu_);
  // Entries of freed storages, and older summaries of this very tensor, make room first.
  entries_.remove_if([&](const Entry& old) {
    return old.storage.expired() ||
           (old.storage._unsafe_get_target() == e.storage._unsafe_get_target() && old.offset == e.offset &&
            old.sizes == e.sizes && old.strides == e.strides && old.dtype == e.dtype);
  });
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

IdSummary host_id_summary(const at::Tensor& ids, bool layout, IdCheck mode) {
  TORCH_INTERNAL_ASSERT(mode != IdCheck::kDevice, "relattn: host_id_summary called in device mode");
  if (mode == IdCheck::kHost) return summarize_ids(ids, layout);
  IdSummaryCache& cache = id_summary_cache();
  if (auto hit = cache.find(ids, layout)) return *hit;
  const IdSummary s = summarize_ids(ids, layout);
  cache.insert(ids, layout, s);
  return s;
}

void assert_ids_in_range_async(const at::Tensor& ids, int64_t R, const char* name) {
  if (ids.numel() == 0) return;
  auto mm = at::aminmax(ids);
  const at::Tensor ok = at::logical_and(std::get<0>(mm).ge(0), std::get<1>(mm).lt(R));
  at::_assert_async(ok, c10::str("relattn.attention: ", name, " holds a bucket id outside [0, R) with R = ", R));
}

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

}  // namespace ops
}  // namespace relattn
