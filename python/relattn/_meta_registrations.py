"""Fake (meta) implementations of every relattn op, for torch.compile and torch.export."""
import torch


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_one_device(q, **tensors):
    """What the C++ checks require: every tensor on q's device. A CPU tensor beside a meta one dispatches
    here (Meta wins), where a result of uninitialised memory would otherwise come back without a word."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == q.device, lambda: f"relattn.attention: {name} is on {t.device} but q is on "
                         f"{q.device}; all tensors must be on one device")


@torch.library.register_fake("relattn::attention_forward")
def _attention_forward_fake(q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes,
                            key_padding_mask, causal, scale, q_offset, dropout_p=0.0, dropout_seed=None,
                            q_segment_ids=None, k_segment_ids=None, q_offsets=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "relattn.attention: q, k, v must be 4-D")
    _check_one_device(q, k=k, v=v, rel_k=rel_k, rel_v=rel_v, rel_bias=rel_bias, buckets=buckets,
                      rel_index=rel_index, alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask,
                      dropout_seed=dropout_seed, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
                      q_offsets=q_offsets)
    B, H, Lq, _ = q.shape
    out = q.new_empty((B, H, Lq, v.shape[-1]))
    lse = q.new_empty((B, H, Lq), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("relattn::attention_backward")
def _attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, rel_k, rel_v, rel_bias, buckets,
                             rel_index, alibi_slopes, key_padding_mask, causal, scale, q_offset, dropout_p=0.0,
                             dropout_seed=None, q_segment_ids=None, k_segment_ids=None, q_offsets=None):
    _check_one_device(q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out, lse=lse, rel_k=rel_k,
                      rel_v=rel_v, rel_bias=rel_bias, buckets=buckets, rel_index=rel_index,
                      alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask, dropout_seed=dropout_seed,
                      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, q_offsets=q_offsets)

    def table_grad(t):
        return q.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), table_grad(rel_k),
            table_grad(rel_v), table_grad(rel_bias))
