// Internal: the checks of integer bucket ids (`buckets`, `rel_index`) against the bucket count R.
//
// Reading ids takes them to the host. On CUDA that copy waits for the stream: one host sync per call,
// which stalls the launch queue of a training step and is illegal while a CUDA graph is captured.
// Three ways of checking, chosen by the backend (csrc/cuda/attention_kernel.cpp):
//   kHost        read the ids every call (CPU tensors: no sync involved);
//   kHostCached  read them once: a tensor already summarised and unchanged since (same storage, data
//                pointer, offset, sizes, strides, dtype and version counter) is not read again — the
//                distance table of a model and a rel_index shared by its layers cost one sync, not one
//                per call; the range is still checked against each call's R;
//   kDevice      read nothing on the host: the range check is a device-side assertion (torch's
//                _assert_async). Used while the current stream is being captured into a CUDA graph; the
//                assertion then runs on every replay, on whatever ids the graph's buffers hold. The
//                distance table's layout comes from the cache when the table was read before capture
//                (the warm-up calls torch.cuda.graph asks for; torch.compile's CUDA graphs run them too),
//                asserted on the device as well, so that a table changed between replays stops the
//                program instead of taking a fast path its ids no longer fit; otherwise it is taken as
//                general (correct for any ids, slower bucket sums).
#pragma once

#include <cstdint>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

namespace relattn {
namespace ops {

enum class IdCheck { kHost, kHostCached, kDevice };

// What a host read of an id tensor finds.
struct IdSummary {
  int64_t lo = 0, hi = -1;  // smallest and largest id (hi < lo for an empty tensor)
  bool distinct = false;    // no id occurs twice (1-D tables: the CUDA kernels' bucket-sum layout)
  bool runs = false;        // the entries of each id are consecutive
};

// Reads `ids` on the host (a copy for device tensors). `layout` also classifies the ids (for the
// 1-D distance table); otherwise distinct/runs stay false.
IdSummary summarize_ids(const at::Tensor& ids, bool layout);

// Summaries of id tensors already read, keyed by tensor identity and version (see kHostCached). Holds
// weak references to the storages: a freed storage's entry never matches a tensor allocated later at
// the same address. Inference tensors (no version counter) and tensors without storage are never
// cached. Thread-safe; the least recently used entry goes first once `capacity` is reached.
class IdSummaryCache {
 public:
  explicit IdSummaryCache(size_t capacity) : capacity_(capacity) {}
  std::optional<IdSummary> find(const at::Tensor& t, bool layout);
  void insert(const at::Tensor& t, bool layout, const IdSummary& s);
  size_t size();

  static bool cacheable(const at::Tensor& t);

 private:
  // What identifies a tensor's view of its data (the storage by address: an entry's weak reference keeps
  // that address from being reused while the entry lives).
  struct Key {
    const c10::StorageImpl* storage = nullptr;
    const void* data = nullptr;
    int64_t offset = 0;
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype = at::kLong;
    static Key of(const at::Tensor& t);
    bool operator==(const Key& o) const;
  };
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    Key key;
    int64_t version = 0;
    bool layout = false;
    IdSummary summary;
  };
  std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  size_t capacity_;
};

// The process-wide cache check_ids uses for kHostCached.
IdSummaryCache& id_summary_cache();

// Checks that the ids of `name` lie in [0, R) (a clear error naming it; a device-side assertion in
// kDevice mode) and, with `layout`, classifies the 1-D distance table for the CUDA bucket sums. Only
// distinct/runs of the result are meaningful to callers.
IdSummary check_ids(const at::Tensor& ids, int64_t R, const char* name, bool layout, IdCheck mode);

}  // namespace ops
}  // namespace relattn
