// Argument checks and normalisation shared by every backend (SPEC §1, §5).
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "attention.h"
#include "../kernels/dropout.h"
#include "id_checks.h"

namespace relattn {
namespace ops {
namespace {

std::string shape_str(const Tensor& t) { return c10::str(t.sizes()); }

bool is_floating(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Stride 1 in the last dimension is all the kernels need; anything else is copied.
Tensor last_dim_contiguous(const Tensor& t) {
  if (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  return t.contiguous();
}

void check_same_device(const Tensor& q, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == q.device(), "relattn.attention: ", name, " is on ", t.device(),
              " but q is on ", q.device(), "; all tensors must be on one device");
}

// A table (rel_k, rel_v, rel_bias, alibi_slopes) may have q's dtype or float32.
void check_table_dtype(const Tensor& q, const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type() || t.scalar_type() == at::kFloat, "relattn.attention: ",
              name, " must have q's dtype (", q.scalar_type(), ") or float32, got ", t.scalar_type());
}

void check_integer(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "relattn.attention: ", name,
              " must have an integer dtype, got ", t.scalar_type());
}

// dropout_p and dropout_seed into `a` (see prepare).
void check_dropout(Prepared& a, double dropout_p, const OptTensor& dropout_seed) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0,
              "relattn.attention: dropout_p must be in [0, 1], got ", dropout_p);
  const uint32_t threshold = kernels::dropout_threshold(dropout_p);
  const bool has_seed = dropout_seed.has_value() && dropout_seed->defined();
  if (has_seed) {  // checked whenever given, also where p rounds to nothing dropped
    TORCH_CHECK(dropout_seed->scalar_type() == at::kLong && dropout_seed->numel() == 1,
                "relattn.attention: dropout_seed must be an int64 tensor of one element, got ",
                dropout_seed->scalar_type(), " of shape ", shape_str(*dropout_seed));
    check_same_device(a.q, *dropout_seed, "dropout_seed");
  }
  if (threshold == 0) return;  // p < 2^-17: nothing is ever dropped
  TORCH_CHECK(has_seed, "relattn.attention: dropout_p = ", dropout_p,
              " needs dropout_seed, an int64 tensor of one element on q's device (relattn.attention draws one "
              "from torch's generator when it is not given)");
  a.dropout_seed = *dropout_seed;
  a.dropout_threshold = threshold;
  a.dropout_scale = kernels::dropout_scale(threshold);
}

// An integer tensor as int32 with a unit last stride. Other integer dtypes are converted; that the values
// fit in int32 is checked on the host for CPU tensors and by a device-side assertion on CUDA (no host sync,
// so that a training step never waits and capture stays legal). `what` names the values in the error.
Tensor int32_checked(const Tensor& t, const char* name, const char* what) {
  if (t.scalar_type() == at::kInt) return last_dim_contiguous(t);
  Tensor t32 = t.to(at::kInt).contiguous();
  if (t.numel() > 0) {
    const std::string msg = c10::str("relattn.attention: ", name, " holds ", what, " that does not fit in int32");
    if (t.is_cpu()) {
      TORCH_CHECK(t32.to(t.scalar_type()).eq(t).all().item<bool>(), msg);
    } else {
      at::_assert_async(t32.to(t.scalar_type()).eq(t).all(), msg);
    }
  }
  return t32;
}

// One side's segment ids as int32 [B, L] (segment ids are compared as int32).
Tensor segment_ids_int32(const Tensor& q, const Tensor& ids, const char* name, int64_t B, int64_t L,
                         const char* L_name) {
  check_same_device(q, ids, name);
  check_integer(ids, name);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.size(1) == L, "relattn.attention: ", name, " must be [B, ",
              L_name, "] = [", B, ", ", L, "], got shape ", shape_str(ids));
  // (segment_ids, where given, is the key ids and, from q_offset on, the query ids: the error says so.)
  return int32_checked(ids, name, "an id (segment_ids or q_segment_ids/k_segment_ids)");
}

// Per-batch query offsets [B] into `a` as int32 (kernels/params.h: added to q_offset).
void check_q_offsets(Prepared& a, const OptTensor& q_offsets) {
  if (!q_offsets.has_value() || !q_offsets->defined()) return;
  const Tensor& t = *q_offsets;
  // (Python's relattn.attention takes them as a tensor q_offset: the error names both.)
  const char* name = "q_offsets (per-batch query offsets; in Python a tensor q_offset)";
  check_same_device(a.q, t, name);
  check_integer(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == a.B, "relattn.attention: ", name, " must be [B] = [", a.B,
              "], got shape ", shape_str(t));
  a.q_offsets = int32_checked(t, name, "an offset");  // 1-D: unit stride
}

// q_segment_ids / k_segment_ids into `a`, with the per-row ranges of kernels/params.h: for a batch row whose
// query ids and key ids are both non-decreasing (packed sequences), query i's keys are [lo, hi) of its
// segment (a binary search, torch.searchsorted) and key j's queries likewise; otherwise the whole row.
void check_segments(Prepared& a, const OptTensor& q_segment_ids, const OptTensor& k_segment_ids) {
  const bool has_q = q_segment_ids.has_value() && q_segment_ids->defined();
  const bool has_k = k_segment_ids.has_value() && k_segment_ids->defined();
  TORCH_CHECK(has_q == has_k, "relattn.attention: q_segment_ids and k_segment_ids go together; got only ",
              has_q ? "q_segment_ids" : "k_segment_ids");
  if (!has_q) return;
  const Tensor qs = segment_ids_int32(a.q, *q_segment_ids, "q_segment_ids", a.B, a.Lq, "Lq");
  const Tensor ks = segment_ids_int32(a.q, *k_segment_ids, "k_segment_ids", a.B, a.Lk, "Lk");
  a.q_segment_ids = qs;
  a.k_segment_ids = ks;
  auto non_decreasing = [](const Tensor& x) {
    return x.size(1) < 2 ? at::ones({x.size(0)}, x.options().dtype(at::kBool))
                         : x.slice(1, 1).ge(x.slice(1, 0, x.size(1) - 1)).all(1);
  };
  const Tensor sorted = (non_decreasing(qs) & non_decreasing(ks));  // [B]
  a.segment_sorted = sorted.to(at::kByte).contiguous();
  // [B, L, 2] ranges into the other side; the whole other side where the row is not sorted.
  auto ranges = [&](const Tensor& mine, const Tensor& other) {
    const int64_t n = other.size(1);
    if (mine.numel() == 0 || n == 0) return at::zeros({mine.size(0), mine.size(1), 2}, mine.options());
    const Tensor oc = other.contiguous(), mc = mine.contiguous();
    const Tensor lo = at::searchsorted(oc, mc, /*out_int32=*/true, /*right=*/false);
    const Tensor hi = at::searchsorted(oc, mc, /*out_int32=*/true, /*right=*/true);
    const Tensor s = sorted.unsqueeze(1);
    return at::stack({at::where(s, lo, at::zeros_like(lo)), at::where(s, hi, at::full_like(hi, n))}, -1)
        .to(at::kInt)
        .contiguous();
  };
  a.segment_key_range = ranges(qs, ks);
  a.segment_query_range = ranges(ks, qs);
}

}  // namespace

Prepared prepare(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const OptTensor& rel_k,
                 const OptTensor& rel_v, const OptTensor& rel_bias, const OptTensor& buckets,
                 const OptTensor& rel_index, const OptTensor& alibi_slopes,
                 const OptTensor& key_padding_mask, bool causal, std::optional<double> scale,
                 int64_t q_offset, double dropout_p, const OptTensor& dropout_seed,
                 const OptTensor& q_segment_ids, const OptTensor& k_segment_ids, const OptTensor& q_offsets,
                 IdCheck id_check) {
  Prepared a;
  TORCH_CHECK(q_in.defined() && k_in.defined() && v_in.defined(),
              "relattn.attention: q, k and v must be tensors");
  TORCH_CHECK(q_in.dim() == 4, "relattn.attention: q must be 4-D [B, H, Lq, D], got shape ",
              shape_str(q_in));
  TORCH_CHECK(k_in.dim() == 4, "relattn.attention: k must be 4-D [B, Hk, Lk, D], got shape ",
              shape_str(k_in));
  TORCH_CHECK(v_in.dim() == 4, "relattn.attention: v must be 4-D [B, Hk, Lk, Dv], got shape ",
              shape_str(v_in));
  TORCH_CHECK(is_floating(q_in.scalar_type()),
              "relattn.attention: q must be float64, float32, float16 or bfloat16, got ",
              q_in.scalar_type());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "relattn.attention: q, k and v must share one dtype, got q ", q_in.scalar_type(), ", k ",
              k_in.scalar_type(), ", v ", v_in.scalar_type());
  check_same_device(q_in, k_in, "k");
  check_same_device(q_in, v_in, "v");

  a.B = q_in.size(0);
  a.H = q_in.size(1);
  a.Lq = q_in.size(2);
  a.D = q_in.size(3);
  a.Hk = k_in.size(1);
  a.Lk = k_in.size(2);
  a.Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == a.B && v_in.size(0) == a.B, "relattn.attention: batch sizes differ: q ",
              shape_str(q_in), ", k ", shape_str(k_in), ", v ", shape_str(v_in));
  TORCH_CHECK(k_in.size(3) == a.D, "relattn.attention: k's head dim must equal q's (D = ", a.D,
              "), got k of shape ", shape_str(k_in));
  TORCH_CHECK(v_in.size(1) == a.Hk && v_in.size(2) == a.Lk,
              "relattn.attention: v must be [B, Hk, Lk, Dv] with k's Hk and Lk, got k ", shape_str(k_in),
              " and v ", shape_str(v_in));
  TORCH_CHECK((a.Hk == 0 && a.H == 0) || (a.Hk > 0 && a.H % a.Hk == 0),
              "relattn.attention: the number of query heads H = ", a.H,
              " must be a multiple of the number of kv heads Hk = ", a.Hk);

  a.acc_dtype = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.q = last_dim_contiguous(q_in);
  a.k = last_dim_contiguous(k_in);
  a.v = last_dim_contiguous(v_in);
  a.causal = causal;
  // Positions i + q_offset (+ q_offsets[b]) and distances j - position stay far inside int64.
  constexpr int64_t kMaxOffset = int64_t{1} << 62;
  TORCH_CHECK(q_offset >= -kMaxOffset && q_offset <= kMaxOffset, "relattn.attention: q_offset must lie in [-2^62, "
              "2^62] (query positions i + q_offset must not overflow), got ", q_offset);
  a.q_offset = q_offset;
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), "relattn.attention: scale must be finite, got ", *scale);
    a.scale = *scale;
  } else {
    a.scale = a.D > 0 ? 1.0 / std::sqrt(static_cast<double>(a.D)) : 1.0;
  }
  check_dropout(a, dropout_p, dropout_seed);

  // Relative tables: shapes, the shared bucket count R, dtypes, devices.
  auto table = [&](const OptTensor& t, const char* name, int64_t last, const char* last_name) {
    if (!t.has_value() || !t->defined()) return Tensor();
    const Tensor& x = *t;
    check_same_device(q_in, x, name);
    check_table_dtype(q_in, x, name);
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "relattn.attention: ", name, " must be [R, ", last_name,
                "] or [H, R, ", last_name, "], got shape ", shape_str(x));
    TORCH_CHECK(x.size(-1) == last, "relattn.attention: ", name, "'s last dim must equal ", last_name,
                " = ", last, ", got shape ", shape_str(x));
    TORCH_CHECK(x.dim() == 2 || x.size(0) == a.H, "relattn.attention: a per-head ", name,
                " must have H = ", a.H, " heads, got shape ", shape_str(x));
    return x;
  };
  Tensor rk = table(rel_k, "rel_k", a.D, "D");
  Tensor rv = table(rel_v, "rel_v", a.Dv, "Dv");
  Tensor rb;
  if (rel_bias.has_value() && rel_bias->defined()) {
    rb = *rel_bias;
    check_same_device(q_in, rb, "rel_bias");
    check_table_dtype(q_in, rb, "rel_bias");
    TORCH_CHECK(rb.dim() == 2 && rb.size(0) == a.H, "relattn.attention: rel_bias must be [H, R] with H = ",
                a.H, ", got shape ", shape_str(rb));
  }
  int64_t R = -1;
  const char* r_from = nullptr;
  auto agree = [&](const Tensor& t, const char* name) {
    if (!t.defined()) return;
    const int64_t r = t.size(-2);  // rel_k / rel_v: [H?, R, X]
    if (R < 0) {
      R = r;
      r_from = name;
    } else {
      TORCH_CHECK(r == R, "relattn.attention: the bucket dimension R differs: ", r_from, " has R = ", R,
                  ", ", name, " has R = ", r);
    }
  };
  agree(rk, "rel_k");
  agree(rv, "rel_v");
  if (rb.defined()) {
    // rel_bias is [H, R]: its bucket dimension is the last one.
    if (R < 0) {
      R = rb.size(1);
      r_from = "rel_bias";
    } else {
      TORCH_CHECK(rb.size(1) == R, "relattn.attention: the bucket dimension R differs: ", r_from,
                  " has R = ", R, ", rel_bias has R = ", rb.size(1));
    }
  }
  const bool any_table = R >= 0;
  a.R = any_table ? R : 0;
  const auto acc_opts = q_in.options().dtype(a.acc_dtype);
  if (rk.defined()) a.rel_k = rk.to(acc_opts).contiguous();
  if (rv.defined()) a.rel_v = rv.to(acc_opts).contiguous();
  if (rb.defined()) a.rel_bias = rb.to(acc_opts).contiguous();

  // Buckets: a distance table or explicit per-pair ids, never both.
  const bool has_buckets = buckets.has_value() && buckets->defined();
  const bool has_index = rel_index.has_value() && rel_index->defined();
  TORCH_CHECK(!(has_buckets && has_index),
              "relattn.attention: buckets and rel_index exclude each other; give one of them");
  TORCH_CHECK(!any_table || has_buckets || has_index,
              "relattn.attention: rel_k, rel_v and rel_bias need buckets or rel_index to say which "
              "bucket each (query, key) pair falls in");
  if (has_buckets) {
    const Tensor& bt = *buckets;
    check_same_device(q_in, bt, "buckets");
    check_integer(bt, "buckets");
    TORCH_CHECK(bt.dim() == 1 && bt.size(0) % 2 == 1,
                "relattn.attention: buckets must be 1-D of odd length 2M+1 (one id per distance in [-M, M]), "
                "got shape ",
                shape_str(bt));
    if (any_table) {
      const IdSummary layout = check_ids(bt, a.R, "buckets", /*layout=*/true, id_check);
      a.buckets_distinct = layout.distinct;
      a.buckets_runs = layout.runs;
      a.buckets = bt.to(at::kInt).contiguous();
      a.M = (bt.size(0) - 1) / 2;
    }
  }
  if (has_index) {
    const Tensor& ri = *rel_index;
    check_same_device(q_in, ri, "rel_index");
    check_integer(ri, "rel_index");
    TORCH_CHECK((ri.dim() == 2 && ri.size(0) == a.Lq && ri.size(1) == a.Lk) ||
                    (ri.dim() == 3 && ri.size(0) == a.B && ri.size(1) == a.Lq && ri.size(2) == a.Lk),
                "relattn.attention: rel_index must be [Lq, Lk] = [", a.Lq, ", ", a.Lk, "] or [B, Lq, Lk] = [",
                a.B, ", ", a.Lq, ", ", a.Lk, "], got shape ", shape_str(ri));
    if (any_table) {
      check_ids(ri, a.R, "rel_index", /*layout=*/false, id_check);
      a.rel_index = last_dim_contiguous(ri.scalar_type() == at::kInt ? ri : ri.to(at::kInt));
      if (a.rel_index.dim() == 2) a.rel_index = a.rel_index.unsqueeze(0).expand({a.B, a.Lq, a.Lk});
    }
  }

  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const Tensor& s = *alibi_slopes;
    check_same_device(q_in, s, "alibi_slopes");
    check_table_dtype(q_in, s, "alibi_slopes");
    TORCH_CHECK(s.dim() == 1 && s.size(0) == a.H, "relattn.attention: alibi_slopes must be [H] with H = ",
                a.H, ", got shape ", shape_str(s));
    a.alibi_slopes = s.detach().to(acc_opts).contiguous();
  }

  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const Tensor& m = *key_padding_mask;
    check_same_device(q_in, m, "key_padding_mask");
    TORCH_CHECK(m.scalar_type() == at::kBool, "relattn.attention: key_padding_mask must be bool, got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == a.B && m.size(1) == a.Lk,
                "relattn.attention: key_padding_mask must be [B, Lk] = [", a.B, ", ", a.Lk, "], got shape ",
                shape_str(m));
    a.key_padding_mask = last_dim_contiguous(m);
  }
  check_segments(a, q_segment_ids, k_segment_ids);
  check_q_offsets(a, q_offsets);
  return a;
}

void fill_params(const Prepared& a, kernels::AttentionParams& p) {
  p.B = a.B;
  p.H = a.H;
  p.Hk = a.Hk;
  p.Lq = a.Lq;
  p.Lk = a.Lk;
  p.D = a.D;
  p.Dv = a.Dv;
  p.R = a.R;
  p.id_max = a.R > 0 ? static_cast<uint32_t>(a.R - 1) : 0u;
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = a.q.stride(d);
    p.k_stride[d] = a.k.stride(d);
    p.v_stride[d] = a.v.stride(d);
  }
  if (a.rel_k.defined()) {
    p.rel_k = a.rel_k.data_ptr();
    p.rel_k_head_stride = a.rel_k.dim() == 3 ? a.rel_k.stride(0) : 0;
  }
  if (a.rel_v.defined()) {
    p.rel_v = a.rel_v.data_ptr();
    p.rel_v_head_stride = a.rel_v.dim() == 3 ? a.rel_v.stride(0) : 0;
  }
  if (a.rel_bias.defined()) p.rel_bias = a.rel_bias.data_ptr();
  if (a.buckets.defined()) {
    p.buckets = a.buckets.data_ptr<int32_t>();
    p.max_distance = a.M;
    p.buckets_distinct = a.buckets_distinct;
    p.buckets_runs = a.buckets_runs;
  }
  if (a.rel_index.defined()) {
    p.rel_index = a.rel_index.data_ptr<int32_t>();
    for (int d = 0; d < 3; ++d) p.rel_index_stride[d] = a.rel_index.stride(d);
  }
  if (a.alibi_slopes.defined()) p.alibi_slopes = a.alibi_slopes.data_ptr();
  if (a.key_padding_mask.defined()) {
    p.key_padding_mask = reinterpret_cast<const uint8_t*>(a.key_padding_mask.data_ptr<bool>());
    p.key_padding_mask_stride[0] = a.key_padding_mask.stride(0);
    p.key_padding_mask_stride[1] = a.key_padding_mask.stride(1);
  }
  if (a.q_segment_ids.defined()) {
    p.q_segment_ids = a.q_segment_ids.data_ptr<int32_t>();
    p.k_segment_ids = a.k_segment_ids.data_ptr<int32_t>();
    p.q_segment_stride = a.q_segment_ids.stride(0);
    p.k_segment_stride = a.k_segment_ids.stride(0);
    p.segment_key_range = a.segment_key_range.data_ptr<int32_t>();
    p.segment_query_range = a.segment_query_range.data_ptr<int32_t>();
    p.segment_sorted = a.segment_sorted.data_ptr<uint8_t>();
  }
  p.causal = a.causal;
  p.scale = a.scale;
  p.q_offset = a.q_offset;
  if (a.q_offsets.defined()) p.q_offsets = a.q_offsets.data_ptr<int32_t>();
  if (a.dropout_seed.defined()) {
    p.dropout_seed = a.dropout_seed.data_ptr<int64_t>();
    p.dropout_threshold = a.dropout_threshold;
    p.dropout_scale = a.dropout_scale;
  }
}

Tensor table_grad_from_row_sums(const Tensor& row_sums, const Tensor& rows, int64_t H, bool per_head,
                                double alpha, at::ScalarType out_dtype) {
  // row_sums [B, H, Lq, R], rows [B, H, Lq, X] (both acc dtype) -> [H, R, X] or [R, X].
  Tensor g = at::matmul(row_sums.transpose(-1, -2), rows).sum(0);  // [H, R, X]
  if (alpha != 1.0) g.mul_(alpha);
  if (!per_head) g = g.sum(0);
  return g.to(out_dtype);
}

Tensor absent_grad(const Tensor& like) { return at::empty({0}, like.options()); }

bool check_backward_args(const Prepared& a, const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                         const OptTensor& grad_lse) {
  const std::vector<int64_t> out_shape{a.B, a.H, a.Lq, a.Dv};
  const std::vector<int64_t> lse_shape{a.B, a.H, a.Lq};
  const at::ScalarType dtype = a.q.scalar_type();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) && grad_out.scalar_type() == dtype,
              "relattn.attention_backward: grad_out must be ", dtype, " of shape ", at::IntArrayRef(out_shape),
              ", got ", grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) && out.scalar_type() == dtype,
              "relattn.attention_backward: out must be ", dtype, " of shape ", at::IntArrayRef(out_shape), ", got ",
              out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "relattn.attention_backward: lse must have shape ",
              at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  check_same_device(a.q, grad_out, "grad_out");
  check_same_device(a.q, out, "out");  // the tensor-core backward reads it (Δ)
  check_same_device(a.q, lse, "lse");
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  if (has_glse) {
    TORCH_CHECK(grad_lse->sizes() == at::IntArrayRef(lse_shape), "relattn.attention_backward: grad_lse must have shape ",
                at::IntArrayRef(lse_shape), ", got ", grad_lse->sizes());
    check_same_device(a.q, *grad_lse, "grad_lse");
  }
  return has_glse;
}

BackwardBuffers backward_buffers(const Prepared& a, const Tensor& grad_out, const Tensor& out, const Tensor& lse,
                                 const OptTensor& grad_lse, bool zero_sums, bool row_tables_kept) {
  const bool has_glse = check_backward_args(a, grad_out, out, lse, grad_lse);
  const auto acc_opts = a.q.options().dtype(a.acc_dtype);
  const bool has_tab = a.rel_k.defined() || a.rel_bias.defined();
  const bool has_doa = a.rel_v.defined();
  const std::vector<int64_t> rows{a.B, a.H, a.Lq}, row_tables{a.B, a.H, a.Lq, a.R};
  BackwardBuffers s;
  s.grad_out = grad_out.stride(-1) == 1 || a.Dv <= 1 ? grad_out : grad_out.contiguous();
  s.lse = lse.to(acc_opts).contiguous();
  if (has_glse) s.grad_lse = grad_lse->to(acc_opts).contiguous();
  s.delta = at::empty(rows, acc_opts);
  if (has_tab) {
    if (row_tables_kept) s.row_tab = at::empty(row_tables, acc_opts);
    s.ds_sum = zero_sums ? at::zeros(row_tables, acc_opts) : at::empty(row_tables, acc_opts);
  }
  if (has_doa) {
    if (row_tables_kept) s.row_doa = at::empty(row_tables, acc_opts);
    s.p_sum = zero_sums ? at::zeros(row_tables, acc_opts) : at::empty(row_tables, acc_opts);
  }
  return s;
}

void fill_backward_params(const Prepared& a, const BackwardBuffers& s, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv, kernels::AttentionBwdParams& p) {
  fill_params(a, p);
  p.grad_out = s.grad_out.data_ptr();
  for (int d = 0; d < 3; ++d) p.grad_out_stride[d] = s.grad_out.stride(d);
  p.lse = s.lse.data_ptr();
  p.grad_lse = s.grad_lse.defined() ? s.grad_lse.data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = s.delta.data_ptr();
  if (s.row_tab.defined()) p.row_tab = s.row_tab.data_ptr();
  if (s.ds_sum.defined()) p.ds_sum = s.ds_sum.data_ptr();
  if (s.row_doa.defined()) p.row_doa = s.row_doa.data_ptr();
  if (s.p_sum.defined()) p.p_sum = s.p_sum.data_ptr();
}

std::vector<Tensor> single_sweep_backward_inputs(const Prepared& a, const Tensor& out, kernels::AttentionBwdParams& p) {
  std::vector<Tensor> keep{out.contiguous()};
  p.out = keep[0].data_ptr();
  if (p.p_sum == nullptr && p.ds_sum != nullptr) {
    keep.push_back(at::zeros({a.B, a.H, a.Lq, a.R}, a.q.options().dtype(a.acc_dtype)));
    p.p_sum = keep.back().data_ptr();
  }
  return keep;
}

std::tuple<Tensor, Tensor, Tensor> table_grads(const Prepared& a, const Tensor& ds_sum, const Tensor& p_sum,
                                               const Tensor& grad_out, const OptTensor& rel_k, const OptTensor& rel_v,
                                               const OptTensor& rel_bias) {
  const auto acc_opts = a.q.options().dtype(a.acc_dtype);
  Tensor d_rel_k = absent_grad(a.q), d_rel_v = absent_grad(a.q), d_rel_bias = absent_grad(a.q);
  if (a.rel_k.defined()) {
    d_rel_k = table_grad_from_row_sums(ds_sum, a.q.to(acc_opts), a.H, rel_k->dim() == 3, a.scale,
                                       rel_k->scalar_type());
  }
  if (a.rel_v.defined()) {
    d_rel_v = table_grad_from_row_sums(p_sum, grad_out.to(acc_opts), a.H, rel_v->dim() == 3, 1.0,
                                       rel_v->scalar_type());
  }
  if (a.rel_bias.defined()) d_rel_bias = ds_sum.sum(at::IntArrayRef{0, 2}).to(rel_bias->scalar_type());
  return {d_rel_k, d_rel_v, d_rel_bias};
}

}  // namespace ops
}  // namespace relattn
