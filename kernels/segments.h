// Segment ids (packed sequences), the per-row ranges the binding computes (kernels/params.h), read the same
// way by the CPU and the CUDA kernels. Torch-free, host and device.
//
// The ranges are non-decreasing along a row, so the keys of query rows [i0, i0 + rows) lie in [lo of the
// first row, hi of the last) and the queries of keys [j0, j0 + keys) in [lo of the first key, hi of the last).
// `rows` and `keys` are >= 1.
#pragma once

#include <cstdint>

#include "params.h"  // RELATTN_HD

namespace relattn {
namespace kernels {

template <typename Params>
RELATTN_HD void segment_key_span(const Params& p, int64_t b, int64_t i0, int64_t rows, int64_t& lo, int64_t& hi) {
  const int32_t* r = p.segment_key_range + (b * p.Lq + i0) * 2;
  lo = r[0];
  hi = r[(rows - 1) * 2 + 1];
}

template <typename Params>
RELATTN_HD void segment_query_span(const Params& p, int64_t b, int64_t j0, int64_t keys, int64_t& lo, int64_t& hi) {
  const int32_t* r = p.segment_query_range + (b * p.Lk + j0) * 2;
  lo = r[0];
  hi = r[(keys - 1) * 2 + 1];
}

// Query rows [first, end) that can see a key of [j0, j0 + keys): with causal masking i + q_offset >= j0;
// with segments, the rows of the keys' segments. kSegments = false leaves the segment code out (the CUDA
// instances compiled without it). `first` may reach past `end` (no row sees the keys).
template <bool kSegments = true, typename Params>
RELATTN_HD void key_tile_queries(const Params& p, int64_t b, int64_t j0, int64_t keys, int64_t& first,
                                 int64_t& end) {
  first = 0;
  end = p.Lq;
  if (p.causal) {
    const int64_t off = p.batch_q_offset(b);
    first = j0 - off < 0 ? 0 : j0 - off;
  }
  if (kSegments && p.q_segment_ids != nullptr) {
    int64_t lo, hi;
    segment_query_span(p, b, j0, keys, lo, hi);
    if (lo > first) first = lo;
    if (hi < end) end = hi;
  }
}

// Whether pairs of query rows [i0, i0 + rows) and keys [j0, j0 + cols) need the per-pair segment test: with
// segments, unless the batch row's ids are sorted and the keys lie inside every row's range (the last row's
// lo is the largest, the first row's hi the smallest).
template <typename Params>
RELATTN_HD bool segment_test_needed(const Params& p, int64_t b, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  if (p.q_segment_ids == nullptr) return false;
  if (p.segment_sorted[b] == 0) return true;
  const int32_t* r = p.segment_key_range + (b * p.Lq + i0) * 2;
  return j0 < r[(rows - 1) * 2] || j0 + cols > r[1];
}

template <typename Params>
RELATTN_HD int32_t q_segment(const Params& p, int64_t b, int64_t i) {
  return p.q_segment_ids[b * p.q_segment_stride + i];
}

template <typename Params>
RELATTN_HD int32_t k_segment(const Params& p, int64_t b, int64_t j) {
  return p.k_segment_ids[b * p.k_segment_stride + j];
}

}  // namespace kernels
}  // namespace relattn
