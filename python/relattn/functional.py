"""relattn's functional API: :func:`attention` and the helpers that build its inputs."""
import operator
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _library  # noqa: F401  (registers torch.ops.relattn)
from . import _meta_registrations  # noqa: F401

__all__ = ["attention", "clip_buckets", "t5_buckets", "alibi_slopes", "cuda_kernels_built", "draw_dropout_seed",
           "segment_positions", "segment_lengths"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    rel_k: Optional[Tensor] = None,
    rel_v: Optional[Tensor] = None,
    rel_bias: Optional[Tensor] = None,
    buckets: Optional[Tensor] = None,
    rel_index: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    q_offset: Union[int, Tensor] = 0,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    segment_ids: Union[Tensor, Tuple[Tensor, Tensor], None] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Fused attention with relative positions.

    For batch ``b``, head ``h`` (kv head ``h // (H // Hk)``), query ``i`` and key ``j``, with distance
    ``d = j - (i + q_offset)`` and bucket ``β = rel_index[b, i, j]`` or ``buckets[clamp(d, -M, M) + M]``::

        s_ij  = scale * (q_i·k_j + q_i·rel_k[β]) + rel_bias[h, β] - alibi_slopes[h] * |d|
        p_ij  = softmax over unmasked j of s_ij
        out_i = Σ_j p_ij * (v_j + rel_v[β])

    Each term is present only when its input is given. Nothing of size ``Lq×Lk`` is materialised.

    Args:
        q: ``[B, H, Lq, D]`` queries (float64, float32, float16 or bfloat16).
        k: ``[B, Hk, Lk, D]`` keys; ``H`` must be a multiple of ``Hk`` (grouped-query attention).
        v: ``[B, Hk, Lk, Dv]`` values.
        rel_k: ``[R, D]`` or ``[H, R, D]`` key-side relative embeddings (Shaw et al.).
        rel_v: ``[R, Dv]`` or ``[H, R, Dv]`` value-side relative embeddings (Shaw et al.).
        rel_bias: ``[H, R]`` learned bias per head and bucket (T5).
        buckets: integer ``[2M+1]``, the bucket of each distance in ``[-M, M]``; distances beyond
            use the end entries (this is the clipping). See :func:`clip_buckets`, :func:`t5_buckets`.
        rel_index: integer ``[Lq, Lk]`` or ``[B, Lq, Lk]``, the bucket of every pair (structural
            positions). Excludes ``buckets``. Read as int32: another integer dtype is converted on
            every call (one more ``Lq×Lk`` int32 tensor), so build it as ``torch.int32``.
        alibi_slopes: ``[H]`` ALiBi slopes (no gradient). See :func:`alibi_slopes`.
        key_padding_mask: bool ``[B, Lk]``; ``True`` marks padding keys to ignore.
        causal: mask keys after the query's position.
        scale: softmax scale, default ``1/sqrt(D)``.
        q_offset: position of query row ``i`` is ``i + q_offset`` (decoding with a cache, chunks).
            An int, or an integer tensor ``[B]`` (or 0-d) on ``q``'s device giving each batch row its own
            offset: query ``i`` of row ``b`` then sits at ``i + q_offset[b]``. The tensor form is read by
            the kernels, never on the host, so a decode step over a batch of sequences of different
            cached lengths is one call with static shapes (``causal=True`` masks each row's unfilled
            cache slots), capturable in a CUDA graph and compiled once by :func:`torch.compile`.
            Excludes the single-tensor form of ``segment_ids``.
        return_lse: also return ``lse [B, H, Lq]`` = log Σ_j exp(s_ij) (float32; float64 for float64).
        dropout_p: dropout on the attention weights: each ``p_ij`` (the weight of ``v_j`` and of
            ``rel_v[β]`` alike) is dropped with probability ``dropout_p`` and the kept ones are scaled
            by ``1 / (1 - dropout_p)``; ``lse`` is unchanged. ``dropout_p`` is used as a multiple of
            1/65536. Like :func:`torch.nn.functional.scaled_dot_product_attention`, this function drops
            whenever ``dropout_p > 0``: pass 0 in evaluation (the :mod:`relattn.nn` layers do).
        dropout_seed: int64 tensor of one element on ``q``'s device that fixes the dropout mask (a
            counter-based Philox stream: the backward regenerates the mask, and CPU and CUDA draw the
            same one). Drawn from torch's generator for ``q``'s device when ``None``, so
            :func:`torch.manual_seed` makes runs reproducible.
        segment_ids: packed sequences: key ``j`` is masked for query ``i`` when their segment ids
            differ. Integer ``[B, Lk]`` (int32 is read as it is; other dtypes are converted), query
            ``i`` taking the id of key position ``i + q_offset``; or a pair ``(q_ids [B, Lq],
            k_ids [B, Lk])``. Distances stay ``j - (i + q_offset)``, which within a packed sequence
            are its own relative positions. Where a row's ids are non-decreasing (number the packed
            sequences 0, 1, 2, ... along the row), the kernels skip the tiles between segments, so a
            packed row costs about the sum of its sequences' squared lengths; other ids are correct
            but every tile then pays the per-pair test.

    Tables may be float32 beside half-precision ``q/k/v``; their gradients come back in their own
    dtype. A query whose keys are all masked gets ``out = 0``, ``lse = -inf`` and zero gradients.

    Returns:
        ``out [B, H, Lq, Dv]``, or ``(out, lse)`` when ``return_lse``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"relattn.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(causal, (bool, torch.SymBool)):
        raise TypeError(f"relattn.attention: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(q_offset, Tensor):
        q_offset = _int_arg(q_offset, "q_offset")
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed(q)
    q_offsets = None
    if isinstance(q_offset, Tensor):
        q_offsets, q_offset = _q_offsets(q_offset, q), 0
        if segment_ids is not None and not isinstance(segment_ids, (tuple, list)):
            raise ValueError("relattn.attention: segment_ids as one [B, Lk] tensor gives query i the id of key "
                             "position i + q_offset, which needs an int q_offset; with per-batch offsets pass a "
                             "pair (q_ids, k_ids)")
    q_segment_ids, k_segment_ids = _segment_pair(segment_ids, q, k, q_offset)
    out, lse = torch.ops.relattn.attention_forward(
        q, k, v, rel_k, rel_v, rel_bias, buckets, rel_index, alibi_slopes, key_padding_mask,
        causal, None if scale is None else float(scale), q_offset, dropout_p, dropout_seed,
        q_segment_ids, k_segment_ids, q_offsets)
    return (out, lse) if return_lse else out


def _int_arg(x, name: str):
    """``x`` as an int64 value (ints, NumPy ints and SymInts; not floats or bools, which would be truncated or
    read as 0/1 without a word)."""
    if isinstance(x, torch.SymInt):
        return x
    if isinstance(x, bool):
        raise TypeError(f"relattn.attention: {name} must be an int or an integer tensor, got bool")
    try:
        x = operator.index(x)
    except TypeError:
        raise TypeError(f"relattn.attention: {name} must be an int or an integer tensor, got "
                        f"{type(x).__name__}") from None
    if not -2**63 <= x < 2**63:
        raise ValueError(f"relattn.attention: {name} must fit in int64, got {x}")
    return x


def _q_offsets(q_offset: Tensor, q: Tensor) -> Tensor:
    """A tensor ``q_offset`` as the op's per-batch offsets ``[B]`` (a 0-d tensor is broadcast)."""
    if q_offset.dim() == 0 and q.dim() == 4:
        return q_offset.expand(q.shape[0])
    return q_offset


def _segment_pair(segment_ids, q: Tensor, k: Tensor, q_offset: int):
    """(query ids, key ids) from ``segment_ids`` (see :func:`attention`)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("relattn.attention: segment_ids must be a [B, Lk] tensor or a pair "
                             f"(q_ids, k_ids), got a sequence of {len(segment_ids)}")
        return segment_ids[0], segment_ids[1]
    Lq, Lk = q.shape[-2], k.shape[-2]
    if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
        raise ValueError(f"relattn.attention: segment_ids must have an integer dtype, got {segment_ids.dtype}")
    B = q.shape[0] if q.dim() == 4 else segment_ids.shape[0]
    if segment_ids.dim() != 2 or segment_ids.shape[0] != B or segment_ids.shape[1] != Lk:
        raise ValueError(f"relattn.attention: segment_ids must be [B, Lk] = [{B}, {Lk}], got shape "
                         f"{tuple(segment_ids.shape)}")
    if q_offset < 0 or Lq + q_offset > Lk:
        raise ValueError("relattn.attention: segment_ids gives query i the id of key position "
                         f"i + q_offset, which needs 0 <= q_offset and Lq + q_offset <= Lk (got Lq = {Lq}, "
                         f"q_offset = {q_offset}, Lk = {Lk}); pass a pair (q_ids, k_ids) instead")
    return segment_ids[:, q_offset:q_offset + Lq], segment_ids


def draw_dropout_seed(like: Tensor) -> Tensor:
    """A fresh dropout seed on ``like``'s device: an int64 tensor of one element (62 random bits) from
    torch's default generator for that device."""
    return torch.randint(1 << 62, (1,), dtype=torch.int64, device=like.device)


def clip_buckets(max_distance: int, *, device=None) -> Tensor:
    """Shaw et al.'s clipping: ``[0, 1, ..., 2K]`` (int64) for ``K = max_distance``; ``R = 2K + 1``."""
    return torch.ops.relattn.clip_buckets(int(max_distance)).to(device)


def t5_buckets(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True, *,
               device=None) -> Tensor:
    """T5's relative-position buckets for every distance in ``[-max_distance, max_distance]`` (int64).

    Entry ``d + max_distance`` equals T5's ``_relative_position_bucket(d)`` (the formula of
    mesh-tensorflow and HF transformers, evaluated in float32); ``R = num_buckets``.
    """
    return torch.ops.relattn.t5_buckets(int(num_buckets), int(max_distance), bool(bidirectional)).to(device)


def alibi_slopes(num_heads: int, *, device=None) -> Tensor:
    """The ALiBi paper's slopes (float32 ``[num_heads]``), with its rule for non-powers of two."""
    return torch.ops.relattn.alibi_slopes(int(num_heads)).to(device)


def segment_positions(segment_ids: Tensor) -> Tensor:
    """Each token's position inside its packed sequence (int64, the shape of ``segment_ids``).

    ``segment_ids`` holds integer ids along its last dimension (``[B, L]``, as :func:`attention` takes
    them); a token's position is the number of tokens before it in its row with the same id, so positions
    restart at 0 with every packed sequence. The ids need not be sorted. Use it for absolute positional
    encodings of packed rows (the encodings of :mod:`relattn.nn` take ``segment_ids`` and call it).

    >>> relattn.segment_positions(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    tensor([[0, 1, 2, 0, 1, 0]])
    """
    return torch.ops.relattn.segment_positions(segment_ids)


def segment_lengths(segment_ids: Tensor) -> Tensor:
    """The length of each token's packed sequence: how many tokens of its row share its id (int64, the
    shape of ``segment_ids``).

    >>> relattn.segment_lengths(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    tensor([[3, 3, 3, 2, 2, 1]])
    """
    return torch.ops.relattn.segment_lengths(segment_ids)


def cuda_kernels_built() -> bool:
    """True when this build of relattn contains its CUDA kernels."""
    return bool(torch.ops.relattn.cuda_kernels_built())
