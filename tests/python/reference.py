"""The naive reference of SPEC §1, written for reading, not speed: the full score matrix, the bucket of
every pair, and the relative embeddings gathered per pair. Plain PyTorch; autograd gives its gradients.
"""
import math

import torch


def positions(Lq, q_offset, device):
    """[1 or B, Lq, 1] position of every query row: i + q_offset, with q_offset an int or a [B] tensor (one
    offset per batch row)."""
    off = torch.as_tensor(q_offset, device=device).long().reshape(-1, 1, 1)
    return torch.arange(Lq, device=device).view(1, -1, 1) + off


def pair_buckets(Lq, Lk, *, buckets=None, rel_index=None, q_offset=0, B=1, device="cpu"):
    """[B, Lq, Lk] int64 bucket of every (query, key) pair, or None when no bucket source is given."""
    if rel_index is not None:
        idx = rel_index.long()
        return idx.expand(B, Lq, Lk) if idx.dim() == 2 else idx
    if buckets is None:
        return None
    M = (buckets.numel() - 1) // 2
    i = positions(Lq, q_offset, device)
    j = torch.arange(Lk, device=device).view(1, 1, -1)
    d = (j - i).clamp(-M, M) + M
    return buckets.long().to(device)[d].expand(B, Lq, Lk)


def reference_attention(q, k, v, *, rel_k=None, rel_v=None, rel_bias=None, buckets=None, rel_index=None,
                        alibi_slopes=None, key_padding_mask=None, causal=False, scale=None, q_offset=0,
                        dtype=None, dropout_keep=None, segment_ids=None):
    """Returns (out, lse) computed naively in `dtype` (default: q's dtype).

    q_offset: an int, or a [B] tensor giving each batch row its own offset.
    dropout_keep: optional [B, H, Lq, Lk] factors (0 for a dropped pair, 1/(1-p) for a kept one) that
    multiply the attention weights of v and rel_v (not lse).
    segment_ids: [B, Lk] ids (query i has the id of key i + q_offset) or a pair (q_ids [B, Lq],
    k_ids [B, Lk]); pairs of different ids are masked.
    """
    dtype = dtype or q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    group = H // Hk if Hk > 0 else 1
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    beta = pair_buckets(Lq, Lk, buckets=buckets, rel_index=rel_index, q_offset=q_offset, B=B, device=q.device)

    s = torch.einsum("bhid,bhjd->bhij", q, k)
    if rel_k is not None:
        rk = rel_k.to(dtype)
        rk = rk.unsqueeze(0).expand(H, *rk.shape) if rk.dim() == 2 else rk  # [H, R, D]
        ak = rk[:, beta].transpose(0, 1)  # [B, H, Lq, Lk, D]: a^K of every pair
        # q_i·a^K[β(i,j)] pair by pair (a broadcast product, not einsum: half-precision CPU einsum over
        # these 5-D shapes falls onto a path ~50x slower).
        s = s + (q.unsqueeze(3) * ak).sum(-1)
    s = s * scale
    if rel_bias is not None:
        s = s + rel_bias.to(dtype)[:, beta].permute(1, 0, 2, 3)  # [B, H, Lq, Lk]
    i = positions(Lq, q_offset, q.device)
    j = torch.arange(Lk, device=q.device).view(1, 1, -1)
    dist = (j - i).to(dtype).unsqueeze(1)  # [1 or B, 1, Lq, Lk]
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(dtype).view(1, H, 1, 1) * dist.abs()
    mask = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        mask = mask | key_padding_mask.view(B, 1, 1, Lk)
    if causal:
        mask = mask | (dist > 0)
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            q_ids, k_ids = segment_ids
        else:
            k_ids = segment_ids
            q_ids = segment_ids[:, torch.arange(Lq, device=segment_ids.device) + q_offset]
        mask = mask | (q_ids.long().view(B, 1, Lq, 1) != k_ids.long().view(B, 1, 1, Lk))
    s = s.masked_fill(mask, float("-inf"))

    lse = torch.logsumexp(s, dim=-1)
    # Fully masked rows: p = 0 everywhere (softmax would give NaN).
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(mask, 0.0)
    if dropout_keep is not None:
        p = p * dropout_keep.to(device=p.device, dtype=dtype)
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    if rel_v is not None:
        rv = rel_v.to(dtype)
        rv = rv.unsqueeze(0).expand(H, *rv.shape) if rv.dim() == 2 else rv
        av = rv[:, beta].transpose(0, 1)  # [B, H, Lq, Lk, Dv]: a^V of every pair
        out = out + (p.unsqueeze(-1) * av).sum(3)
    return out, lse
