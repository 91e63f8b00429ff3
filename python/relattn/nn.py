"""Modules built on :func:`relattn.attention`: an attention layer, an encoder layer and an encoder stack
with the positional scheme chosen by argument, plus the absolute encodings a model may still add to its
input.

Positional schemes (``position=``) of :class:`RelativeMultiheadAttention` and the layers above it:

============  ===========================================================================================
``"shaw"``    Shaw et al. (2018): learned relative key (``rel_k``) and/or value (``rel_v``) embeddings over
              distances clipped to ``±max_distance`` (``R = 2·max_distance + 1``), shared by all heads or
              one table per head (``per_head_tables``).
``"t5"``      Raffel et al. (2020): a learned scalar bias per head over T5's log-spaced buckets
              (``num_buckets``, ``max_distance``, ``bidirectional``).
``"clip_bias"`` a learned scalar bias per head over clipped distances (``R = 2·max_distance + 1``).
``"alibi"``   Press et al. (2022): the fixed linear penalty ``-m_h·|j - i|``; nothing is learned.
``"none"``    no positional information inside attention (add an absolute encoding to the input).
============  ===========================================================================================

Learned tables are :class:`torch.nn.Parameter` s named ``rel_k``, ``rel_v`` and ``rel_bias`` (SPEC names);
pass ``tables={...}`` to use tables owned elsewhere (sharing across layers). The bucket map and ALiBi slopes
are derived from the constructor's arguments, so they are non-persistent buffers: a ``state_dict`` holds
only what was learned.

Causal stacks decode token by token with a :class:`KVCache` (``cache=`` of the attention layer, the encoder
layer and the stack); ``KVCache(..., static_shapes=True)`` keeps per-row lengths on the device, so a decode
step compiles once and replays in a CUDA graph.

Every module here is batch-first by default, works under ``torch.compile(fullgraph=True)`` and
round-trips through ``state_dict``.
"""
import copy
import functools
import math
import numbers
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .functional import alibi_slopes, attention, clip_buckets, segment_lengths, segment_positions, t5_buckets

__all__ = [
    "POSITION_SCHEMES",
    "KVCache",
    "RelativeMultiheadAttention",
    "RelativeTransformerEncoderLayer",
    "RelativeTransformerEncoder",
    "RelativeTransformerDecoderLayer",
    "RelativeTransformerDecoder",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEncoding",
    "MLPPositionalEncoding",
    "load_weights",
]

#: The values ``position=`` accepts.
POSITION_SCHEMES = ("shaw", "t5", "clip_bias", "alibi", "none")

_DEFAULT_MAX_DISTANCE = {"shaw": 16, "clip_bias": 16, "t5": 128}


def _check_attn_mask(attn_mask: Optional[Tensor], is_causal: bool, name: str) -> None:
    """The fused kernels take no arbitrary score mask; one is accepted only as the causal hint."""
    if attn_mask is not None and not is_causal:
        raise ValueError(
            f"relattn.nn: {name} is only accepted together with is_causal=True (it is then taken to be "
            "the causal mask and not read); the fused kernels support causal masking and "
            "key_padding_mask, not arbitrary attention masks")


class KVCache:
    r"""Keys and values of the positions seen so far, for incremental (token-by-token) decoding.

    One cache serves a whole model. Each :class:`RelativeMultiheadAttention` that receives it (directly, or
    through ``cache=`` of an encoder layer or stack) keeps its own slot: its projected keys and values,
    ``[B, Hk, max_length, E/H]`` each, allocated at its first call. A call with ``Lq`` new tokens appends
    their keys and values and attends from the new queries to every cached key, with the new tokens at
    positions ``length .. length + Lq - 1`` (``q_offset`` of :func:`relattn.attention`): relative
    distances, buckets, ALiBi and the causal mask are those of the whole sequence. A prompt goes in as one
    call (prefill), then one call per generated token; with ``is_causal=True`` the results equal the
    causal model run over the whole sequence at once.

    Cross-attention (``key`` given and not ``query``, as in a decoder layer attending to the encoder's
    output) keeps the projected keys and values of its first call and reuses them: the memory does not
    change while decoding, so it is projected once.

    The cache is for inference: a call that would record gradients raises (decode under
    :func:`torch.no_grad` or :func:`torch.inference_mode`). A ``key_padding_mask`` passed with the cache
    covers every cached key, ``[B, length + Lq]``. A module called twice per step (weights tied across
    layers) would append twice to one slot: give each use its own module or cache. A call that raises
    (a module's, a layer's or a stack's) leaves the cache as it found it. :func:`copy.deepcopy` gives an
    independent cache that the same model decodes on (a branch of the decode).

    By default the cached length is a Python int and each call attends to the keys cached so far, so
    :func:`torch.compile` specialises on it (a new graph per length): decode such a cache eagerly. With
    ``static_shapes=True`` every row of the batch keeps its own length in a device tensor
    (:attr:`lengths`), new keys and values are written at each row's length, and each call attends to the
    whole ``max_length`` slot with the per-row lengths as :func:`relattn.attention`'s tensor ``q_offset``:
    no shape and no host value changes from step to step, so a decode step compiles once and can be
    captured in a CUDA graph, and the rows of a batch may hold sequences of different lengths (a prompt batch
    padded on the right: prefill it whole, then :meth:`set_lengths` to the true lengths; later tokens
    overwrite the padding). With ``is_causal=True`` the causal mask hides the slots not yet written (the
    kernels skip them); otherwise a key padding mask built from the lengths does, and a
    ``key_padding_mask`` passed with the cache covers the whole slot, ``[B, max_length]``. The lengths are
    never read on the host, so writing beyond ``max_length`` is caught by the indexing op (an error on the
    CPU, a device-side assertion on CUDA) rather than by a ``ValueError``.

    Args:
        max_length: the most positions a self-attention slot holds; appending beyond raises ``ValueError``
            (a cross-attention memory may have any length).
        static_shapes: keep per-row lengths on the device and attend to whole slots (see above).
    """

    def __init__(self, max_length: int, static_shapes: bool = False) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
            raise TypeError(f"KVCache: max_length must be an int, got {type(max_length).__name__} {max_length!r}")
        if max_length <= 0:
            raise ValueError(f"KVCache: max_length must be positive, got {max_length}")
        self.max_length = int(max_length)
        self.static_shapes = bool(static_shapes)
        # self-attention module -> [keys, values, length]; the length is an int32 [B] tensor with static_shapes
        self._slots: Dict[nn.Module, list] = {}
        self._cross_slots: Dict[nn.Module, list] = {}  # cross-attention module -> [keys, values]
        self._start: Optional[Tensor] = None  # static_shapes: set_lengths() before the first slot exists
        self._undo: Optional[List[Callable[[], None]]] = None  # the open step's undo actions (see _step)

    def __deepcopy__(self, memo: dict) -> "KVCache":
        """An independent copy of every slot (a decode branched off, e.g. to try several continuations).
        The slots stay keyed by the model's modules, so the model decodes on with the copy. To copy a model
        and its cache together, copy the model first in the same call (``copy.deepcopy((model, cache))``):
        modules copied before the cache key the copy's slots; with the cache first, the copy stays keyed by
        the original modules."""
        new = KVCache.__new__(KVCache)
        memo[id(self)] = new
        new.max_length, new.static_shapes, new._undo = self.max_length, self.static_shapes, None

        def slots(table: Dict[nn.Module, list]) -> Dict[nn.Module, list]:
            return {memo.get(id(m), m): [t.clone() if isinstance(t, Tensor) else t for t in slot]
                    for m, slot in table.items()}

        new._slots, new._cross_slots = slots(self._slots), slots(self._cross_slots)
        new._start = None if self._start is None else self._start.clone()
        return new

    @property
    def length(self) -> int:
        """Positions cached so far (by the first module that used the cache; all agree after a full step)."""
        if self.static_shapes:
            raise TypeError("KVCache: a cache with static_shapes=True keeps one length per row, on the device; "
                            "read cache.lengths")
        return next(iter(self._slots.values()))[2] if self._slots else 0

    @property
    def lengths(self) -> Optional[Tensor]:
        """static_shapes: the positions cached so far in each row, int32 ``[B]`` (a copy; ``None`` before the
        first call)."""
        if not self.static_shapes:
            raise TypeError("KVCache: lengths is for static_shapes=True; read cache.length")
        if self._slots:
            return next(iter(self._slots.values()))[2].clone()
        return None if self._start is None else self._start.clone()

    def set_lengths(self, lengths: Tensor) -> None:
        """static_shapes: set every row's cached length (integer ``[B]``), e.g. to the true prompt lengths
        after a right-padded prefill; the next call writes row ``b``'s keys from position ``lengths[b]`` on.
        Before the first call it sets where the first call writes."""
        if not self.static_shapes:
            raise TypeError("KVCache: set_lengths is for static_shapes=True")
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"KVCache: lengths must be an integer [B] tensor, got {lengths.dtype} of shape "
                             f"{tuple(lengths.shape)}")
        if not self._slots:
            self._start = lengths.to(torch.int32)
        for slot in self._slots.values():
            if lengths.shape[0] != slot[2].shape[0]:
                raise ValueError(f"KVCache: lengths has {lengths.shape[0]} rows, the cache {slot[2].shape[0]}")
            slot[2].copy_(lengths)

    def __len__(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget every position and the cross-attention memory (the next call starts a new sequence)."""
        self._slots.clear()
        self._cross_slots.clear()
        self._start = None

    def reorder(self, index: Tensor) -> None:
        """Select batch rows of every slot, e.g. the surviving beams in beam search: row ``b`` becomes
        row ``index[b]`` (an integer tensor; it may change the batch size). The slots become new tensors: a
        CUDA graph captured before holds the old ones (capture after reordering)."""
        for slot in (*self._slots.values(), *self._cross_slots.values()):
            for i, t in enumerate(slot):  # keys, values and (static_shapes) the lengths
                if isinstance(t, Tensor):
                    slot[i] = t.index_select(0, index.to(t.device))
        if self._start is not None:
            self._start = self._start.index_select(0, index.to(self._start.device))

    @staticmethod
    def _check_inference(k: Tensor, v: Tensor) -> None:
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("KVCache is for inference: run decoding under torch.no_grad() or "
                               "torch.inference_mode() (this call would record gradients)")

    def _cross(self, owner: nn.Module, batch: int, project: Callable[[], Tuple[Tensor, Tensor]]
               ) -> Tuple[Tensor, Tensor]:
        """Cross-attention: owner's projected memory keys and values, from project() at its first call."""
        slot = self._cross_slots.get(owner)
        if slot is None:
            k, v = project()
            self._check_inference(k, v)
            slot = self._cross_slots[owner] = [k, v]
            self._log(lambda: self._cross_slots.pop(owner, None))
        if slot[0].shape[0] != batch:
            raise ValueError(f"KVCache: this call has batch {batch}, the cached cross-attention keys batch "
                             f"{slot[0].shape[0]} (reset() starts over; reorder() selects rows)")
        return slot[0], slot[1]

    def _log(self, undo: Callable[[], None]) -> None:
        if self._undo is not None:
            self._undo.append(undo)

    def _append(self, owner: nn.Module, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Union[int, Tensor]]:
        """Writes k, v ([B, Hk, Lq, Dh]) after owner's cached positions; returns all its keys, values and the
        offset (an int, or with static_shapes the whole slot and the rows' lengths before this call, a [B]
        tensor). The positions count as cached from _commit on, which the module calls once the attention
        succeeded: a call that raises leaves the length where it was."""
        self._check_inference(k, v)
        B, Hk, Lq, Dh = k.shape
        slot = self._slots.get(owner)
        if slot is None:
            shape = (B, Hk, self.max_length, Dh)
            start: Union[int, Tensor] = 0
            if self.static_shapes:
                start = torch.zeros(B, dtype=torch.int32, device=k.device)
                if self._start is not None:
                    if self._start.shape[0] != B:
                        raise ValueError(f"KVCache: set_lengths gave {self._start.shape[0]} rows, this call has {B}")
                    start.copy_(self._start)
                # zeros, not empty: a slot not yet written is masked, but its value still enters the P·V
                # product of its tile with weight 0, so it must be finite
                slot = [k.new_zeros(shape), v.new_zeros(shape[:3] + (v.shape[3],)), start]
            else:
                slot = [k.new_empty(shape), v.new_empty(shape[:3] + (v.shape[3],)), start]
            self._slots[owner] = slot
            self._log(lambda: self._slots.pop(owner, None))
        keys, values, length = slot
        if keys.shape[0] != B or keys.dtype != k.dtype or keys.device != k.device:
            raise ValueError(f"KVCache: this call has batch {B}, {k.dtype} on {k.device}, the cached keys "
                             f"batch {keys.shape[0]}, {keys.dtype} on {keys.device} (reset() starts over; "
                             f"reorder() selects rows)")
        if self.static_shapes:
            if Lq > self.max_length:
                raise ValueError(f"KVCache: {Lq} new positions exceed max_length ({self.max_length})")
            offsets = length.clone()
            pos = (offsets.long().view(B, 1) + torch.arange(Lq, device=k.device)).view(B, 1, Lq, 1)
            keys.scatter_(2, pos.expand(B, Hk, Lq, Dh), k)
            values.scatter_(2, pos.expand(B, Hk, Lq, v.shape[3]), v)
            return keys, values, offsets
        if length + Lq > self.max_length:
            raise ValueError(f"KVCache: {length} cached + {Lq} new positions exceed max_length "
                             f"({self.max_length})")
        keys[:, :, length:length + Lq].copy_(k)
        values[:, :, length:length + Lq].copy_(v)
        return keys[:, :, :length + Lq], values[:, :, :length + Lq], length

    def _commit(self, owner: nn.Module, Lq: int) -> None:
        """The Lq positions _append wrote for owner count as cached."""
        slot = self._slots[owner]
        if self.static_shapes:
            slot[2].add_(Lq)
            self._log(lambda: slot[2].sub_(Lq))
        else:
            before = slot[2]
            slot[2] = before + Lq
            self._log(lambda: slot.__setitem__(2, before))


def _opens_step(cache: Optional[KVCache]) -> bool:
    """Whether a call given this cache runs as a step of its own (_cache_step): eager, and not inside one."""
    return cache is not None and cache._undo is None and not torch.compiler.is_compiling()


def _cache_step(run: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorates a module's, layer's or stack's call taking ``cache=`` (keyword): called with a cache, the call
    is one step of it, so that if it raises, the slots it created and the positions it committed are undone
    and the cache is as the call found it (the keys it wrote lie beyond the cached lengths). Calls inside a
    step, and compiled ones, run as they are."""
    @functools.wraps(run)
    def step(*args, **kwargs):
        cache = kwargs.get("cache")
        if not _opens_step(cache):
            return run(*args, **kwargs)
        cache._undo = []
        try:
            return run(*args, **kwargs)
        except BaseException:
            for undo in reversed(cache._undo):
                undo()
            raise
        finally:
            cache._undo = None
    return step


class RelativeMultiheadAttention(nn.Module):
    r"""Multi-head attention with relative positions, computed by the fused :func:`relattn.attention`.

    Mirrors :class:`torch.nn.MultiheadAttention` where that makes sense (projections, ``kdim``/``vdim``,
    ``batch_first``, ``key_padding_mask`` with ``True`` = padding, a ``(output, weights)`` return), and
    differs where the fused kernels do: it is batch-first by default, returns no attention weights
    (they are never materialised), and accepts no arbitrary ``attn_mask``.

    Args:
        embed_dim: model width ``E``; the output has this width too.
        num_heads: query heads ``H``; ``embed_dim`` must be divisible by it (head dim ``E / H``).
        dropout: dropout on the attention weights, in training mode only, fused into the kernels
            (``dropout_p`` of :func:`relattn.attention`).
        bias: add biases to the query, key, value and output projections.
        kdim, vdim: feature sizes of ``key`` and ``value`` (default ``embed_dim``).
        batch_first: inputs and output are ``[B, L, E]`` (default) rather than ``[L, B, E]``.
        num_kv_heads: key/value heads ``Hk`` for grouped-query (``1 < Hk < H``) or multi-query
            (``Hk = 1``) attention; ``num_heads`` must be a multiple of it. Default ``num_heads``.
        position: the positional scheme, one of :data:`POSITION_SCHEMES` (see the module docstring).
        max_distance: clipping distance of ``"shaw"`` / ``"clip_bias"`` (default 16), or T5's
            ``max_distance`` for ``"t5"`` (default 128). Ignored by ``"alibi"`` and ``"none"``.
        rel_k, rel_v: for ``"shaw"``, whether to learn relative key and value embeddings
            (at least one must be True).
        per_head_tables: for ``"shaw"``, one table per head (``[H, R, E/H]``) instead of one shared by
            all heads (``[R, E/H]``).
        num_buckets: for ``"t5"``, the number of buckets ``R``.
        bidirectional: for ``"t5"``, separate buckets for keys before and after the query.
        tables: relative tables to use instead of creating new ones, e.g. another layer's
            :meth:`relative_tables` to share them; keys among ``"rel_k"``, ``"rel_v"``, ``"rel_bias"``,
            exactly those the scheme uses. A :class:`~torch.nn.Parameter` is used as is (shared); a plain
            tensor becomes a new Parameter on the same storage.
        scale: softmax scale, default ``1/sqrt(E/H)``.
        device, dtype: factory arguments for parameters.

    Shapes (batch-first): ``query [B, Lq, E]``, ``key [B, Lk, kdim]``, ``value [B, Lk, vdim]``,
    output ``[B, Lq, E]``. The relative distance of query ``i`` and key ``j`` is ``j - i``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = True,
        num_kv_heads: Optional[int] = None,
        position: str = "shaw",
        max_distance: Optional[int] = None,
        rel_k: bool = True,
        rel_v: bool = True,
        per_head_tables: bool = False,
        num_buckets: int = 32,
        bidirectional: bool = True,
        tables: Optional[Mapping[str, Tensor]] = None,
        scale: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"RelativeMultiheadAttention: embed_dim ({embed_dim}) and num_heads "
                             f"({num_heads}) must be positive")
        if embed_dim % num_heads != 0:
            raise ValueError(f"RelativeMultiheadAttention: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"RelativeMultiheadAttention: num_heads ({num_heads}) must be a positive "
                             f"multiple of num_kv_heads ({num_kv_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"RelativeMultiheadAttention: dropout (on the attention weights) must lie in "
                             f"[0, 1], got {dropout}")
        if position not in POSITION_SCHEMES:
            raise ValueError(f"RelativeMultiheadAttention: position must be one of {POSITION_SCHEMES}, "
                             f"got {position!r}")
        if position == "shaw" and not (rel_k or rel_v):
            raise ValueError("RelativeMultiheadAttention: position='shaw' needs rel_k=True and/or rel_v=True")

        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.position = position
        self.scale = scale
        self.per_head_tables = per_head_tables

        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

        # The bucket map and the slopes follow from the arguments: buffers, but not part of state_dict.
        self.max_distance: Optional[int] = None
        self.num_buckets: Optional[int] = None
        if position in ("shaw", "clip_bias", "t5"):
            self.max_distance = _DEFAULT_MAX_DISTANCE[position] if max_distance is None else int(max_distance)
            if self.max_distance < 0:
                raise ValueError(f"RelativeMultiheadAttention: max_distance must be >= 0, got {max_distance}")
        if position in ("shaw", "clip_bias"):
            buckets = clip_buckets(self.max_distance)
            self.num_buckets = 2 * self.max_distance + 1
        elif position == "t5":
            if num_buckets <= 0:
                raise ValueError(f"RelativeMultiheadAttention: num_buckets must be positive, got {num_buckets}")
            buckets = t5_buckets(num_buckets, self.max_distance, bidirectional)
            self.num_buckets = num_buckets
        else:
            buckets = None
        self.bidirectional = bidirectional
        self.register_buffer("buckets", None if buckets is None else buckets.to(device), persistent=False)
        # float32 whatever the module's dtype (as in C++): the slopes of a head count that is not a power of two
        # would lose digits in half precision, and the bias slope·|d| grows with the distance.
        slopes = alibi_slopes(num_heads).to(device=device) if position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)

        # Which learned tables the scheme uses, and their shapes.
        self._table_shapes: Dict[str, Tuple[int, ...]] = {}
        R = self.num_buckets
        lead = (num_heads,) if per_head_tables else ()
        if position == "shaw":
            if rel_k:
                self._table_shapes["rel_k"] = lead + (R, self.head_dim)
            if rel_v:
                self._table_shapes["rel_v"] = lead + (R, self.head_dim)
        elif position in ("t5", "clip_bias"):
            self._table_shapes["rel_bias"] = (num_heads, R)
        for name in ("rel_k", "rel_v", "rel_bias"):
            self.register_parameter(name, None)

        self._reset_projections()
        if tables is not None:
            self.set_relative_tables(tables)
        else:
            for name, shape in self._table_shapes.items():
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
            self._reset_tables()

    # -- parameters ------------------------------------------------------------------------------------

    def _reset_projections(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _reset_tables(self) -> None:
        # Small embeddings; biases start at zero so training begins from position-free attention.
        if self.rel_k is not None:
            nn.init.normal_(self.rel_k, std=0.02)
        if self.rel_v is not None:
            nn.init.normal_(self.rel_v, std=0.02)
        if self.rel_bias is not None:
            nn.init.zeros_(self.rel_bias)

    def reset_parameters(self) -> None:
        """Re-initialise the projections (Xavier-uniform weights, zero biases) and the relative tables."""
        self._reset_projections()
        self._reset_tables()

    def relative_tables(self) -> Dict[str, nn.Parameter]:
        """The learned relative tables this scheme uses, by SPEC name (empty for "alibi"/"none")."""
        return {name: getattr(self, name) for name in self._table_shapes}

    def set_relative_tables(self, tables: Mapping[str, Tensor]) -> None:
        """Use ``tables`` (name -> tensor) as this layer's relative tables, e.g. to share another layer's.

        The names must be exactly those :meth:`relative_tables` returns, with the same shapes.
        A :class:`~torch.nn.Parameter` is stored as is, so every layer holding it trains the same tensor.
        """
        expected = set(self._table_shapes)
        if set(tables) != expected:
            raise ValueError(f"RelativeMultiheadAttention: position={self.position!r} uses the tables "
                             f"{sorted(expected)}, got {sorted(tables)}")
        for name, table in tables.items():
            shape = self._table_shapes[name]
            if tuple(table.shape) != shape:
                raise ValueError(f"RelativeMultiheadAttention: table {name!r} must have shape {list(shape)}, "
                                 f"got {list(table.shape)}")
            setattr(self, name, table if isinstance(table, nn.Parameter) else nn.Parameter(table))

    def _apply(self, fn, recurse=True):
        """As nn.Module's (to(), half(), cuda(), ...), except that alibi_slopes, derived from the options, stays
        float32 (recomputed when a cast changed it) and only follows the device (C++: to(dtype) likewise)."""
        super()._apply(fn, recurse)
        if self.alibi_slopes is not None and self.alibi_slopes.dtype != torch.float32:
            self.alibi_slopes = alibi_slopes(self.num_heads).to(self.alibi_slopes.device)
        return self

    # -- forward ---------------------------------------------------------------------------------------

    @_cache_step
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        causal: bool = False,
        rel_index: Optional[Tensor] = None,
        segment_ids: Union[Tensor, Tuple[Tensor, Tensor], None] = None,
        cache: Optional[KVCache] = None,
    ) -> Tuple[Tensor, None]:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: ``[B, Lq, E]`` (``[Lq, B, E]`` when not ``batch_first``).
            key: ``[B, Lk, kdim]``; default ``query`` (self-attention).
            value: ``[B, Lk, vdim]``; default ``key``.
            key_padding_mask: bool ``[B, Lk]``, ``True`` marks padding keys to ignore. A query whose
                keys are all masked outputs the output projection's bias (zero attention), not NaN.
            need_weights: must be False: the fused kernels never form the attention weights, so the
                second returned value is always ``None`` (as :class:`torch.nn.MultiheadAttention`
                returns with ``need_weights=False``).
            attn_mask: accepted only with ``is_causal=True``, as :class:`torch.nn.MultiheadAttention`'s
                hint that it is the causal mask (it is not read); any other mask raises ``ValueError``.
            average_attn_weights: accepted for :class:`torch.nn.MultiheadAttention`'s argument order and
                not read (no weights are returned).
            is_causal: mask keys after the query's position (``j > i``); unlike
                :class:`torch.nn.MultiheadAttention` no ``attn_mask`` is needed.
            causal: alias of ``is_causal`` (the name :func:`relattn.attention` uses).
            rel_index: optional integer ``[Lq, Lk]`` or ``[B, Lq, Lk]`` bucket of every pair
                (structural positions), replacing the distance buckets of "shaw"/"t5"/"clip_bias";
                every id must lie in ``[0, R)``.
            segment_ids: packed sequences: integer ``[B, Lk]`` (or a pair ``(q_ids [B, Lq], k_ids
                [B, Lk])``); a query attends only to keys of its own segment (see
                :func:`relattn.attention`).
            cache: a :class:`KVCache` for incremental decoding. Self-attention (``key`` and ``value``
                absent or ``query`` itself): the new tokens' keys and values are appended and the
                queries, at positions ``len(cache)`` on (with ``static_shapes``: each row's own length),
                attend to every cached key; a ``key_padding_mask``, ``rel_index`` or ``segment_ids`` key
                side then covers all of them (with ``static_shapes``: the whole slot, ``max_length``).
                Cross-attention: the keys and values projected at the first call are reused.

        Returns:
            ``(output, None)``, ``output`` shaped like ``query`` with width ``E``.
        """
        if need_weights:
            raise ValueError("RelativeMultiheadAttention: need_weights=True is not supported; the fused "
                             "relattn kernels never materialise the attention weights")
        is_causal = bool(is_causal or causal)
        _check_attn_mask(attn_mask, is_causal, "attn_mask")
        self_attention = (key is None or key is query) and (value is None or value is query)
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise ValueError("RelativeMultiheadAttention: key_padding_mask must be a bool tensor "
                             f"(True = padding), got {key_padding_mask.dtype}")
        B, Lq, _ = query.shape
        Lk = key.shape[1]

        # [B, L, heads*Dh] -> [B, heads, L, Dh]: a view whose last dimension stays contiguous.
        q = self.q_proj(query).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)

        def project_kv() -> Tuple[Tensor, Tensor]:
            return (self.k_proj(key).view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2),
                    self.v_proj(value).view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2))

        q_offset: Union[int, Tensor] = 0
        if cache is None:
            k, v = project_kv()
        elif self_attention:
            k, v, q_offset = cache._append(self, *project_kv())
            if isinstance(q_offset, Tensor) and not is_causal:
                # static shapes: hide the slots no row has written yet (with causal masking they are after
                # every query's position already)
                unwritten = torch.arange(k.shape[2], device=k.device).view(1, -1) >= (q_offset + Lq).view(-1, 1)
                key_padding_mask = unwritten if key_padding_mask is None else key_padding_mask | unwritten
        else:
            if is_causal:
                raise ValueError("RelativeMultiheadAttention: causal cross-attention with a cache is not "
                                 "supported (the cached memory has no positions relative to the new tokens)")
            k, v = cache._cross(self, B, project_kv)

        uses_buckets = self.buckets is not None
        if rel_index is not None and not uses_buckets:
            raise ValueError(f"RelativeMultiheadAttention: rel_index needs a relative table, but "
                             f"position={self.position!r} has none")
        out = attention(
            q, k, v,
            rel_k=self.rel_k, rel_v=self.rel_v, rel_bias=self.rel_bias,
            buckets=self.buckets if uses_buckets and rel_index is None else None,
            rel_index=rel_index,
            alibi_slopes=self.alibi_slopes,
            key_padding_mask=key_padding_mask,
            causal=is_causal,
            scale=self.scale,
            q_offset=q_offset,
            dropout_p=self.dropout if self.training else 0.0,
            segment_ids=segment_ids,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if cache is not None and self_attention:
            cache._commit(self, Lq)
        return out, None

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """Ranks, batch and length agreement and feature sizes, each error naming the argument."""
        layout = "[B, L, E]" if self.batch_first else "[L, B, E]"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"RelativeMultiheadAttention: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 3:
                raise ValueError(f"RelativeMultiheadAttention: {name} must be 3-D {layout}, got shape "
                                 f"{list(t.shape)}")
        b = 0 if self.batch_first else 1
        if key.shape[b] != query.shape[b] or value.shape[b] != query.shape[b]:
            raise ValueError(f"RelativeMultiheadAttention: query, key and value must have the same batch size "
                             f"(dim {b} of {layout}), got {query.shape[b]}, {key.shape[b]}, {value.shape[b]}")
        if value.shape[1 - b] != key.shape[1 - b]:
            raise ValueError(f"RelativeMultiheadAttention: key and value must have the same length (dim {1 - b} "
                             f"of {layout}), got {key.shape[1 - b]} and {value.shape[1 - b]}")
        for name, t, width, arg in (("query", query, self.embed_dim, "embed_dim"), ("key", key, self.kdim, "kdim"),
                                    ("value", value, self.vdim, "vdim")):
            if t.shape[2] != width:
                raise ValueError(f"RelativeMultiheadAttention: {name} must have {width} features ({arg}), got "
                                 f"shape {list(t.shape)}")

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        parts.append(f"position={self.position!r}")
        if self.max_distance is not None:
            parts.append(f"max_distance={self.max_distance}")
        if self.position == "t5":
            parts += [f"num_buckets={self.num_buckets}", f"bidirectional={self.bidirectional}"]
        if self.position == "shaw":
            parts.append(f"per_head_tables={self.per_head_tables}")
        if not self.batch_first:
            parts.append("batch_first=False")
        return ", ".join(parts)


def _activation(activation: Union[str, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise ValueError(f"activation should be 'relu', 'gelu' or a callable, got {activation!r}")


class _TransformerLayer(nn.Module):
    """The constructor the encoder and decoder layers share (torch's argument and submodule names)."""

    _cross_attention = False  # the decoder layer adds multihead_attn, norm3 and dropout3

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        norm_first: bool = False,
        bias: bool = True,
        *,
        num_kv_heads: Optional[int] = None,
        attention_dropout: float = 0.0,
        position: str = "shaw",
        max_distance: Optional[int] = None,
        rel_k: bool = True,
        rel_v: bool = True,
        per_head_tables: bool = False,
        num_buckets: int = 32,
        bidirectional: bool = True,
        tables: Optional[Mapping[str, Tensor]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        common = dict(dropout=attention_dropout, bias=bias, batch_first=batch_first, num_kv_heads=num_kv_heads,
                      **factory)
        self.self_attn = RelativeMultiheadAttention(
            d_model, nhead, position=position, max_distance=max_distance, rel_k=rel_k, rel_v=rel_v,
            per_head_tables=per_head_tables, num_buckets=num_buckets, bidirectional=bidirectional, tables=tables,
            **common)
        if self._cross_attention:
            self.multihead_attn = RelativeMultiheadAttention(d_model, nhead, position="none", **common)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        if self._cross_attention:
            self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if self._cross_attention:
            self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.batch_first = batch_first


class RelativeTransformerEncoderLayer(_TransformerLayer):
    r"""A Transformer encoder layer (self-attention + feed-forward) using :class:`RelativeMultiheadAttention`.

    Takes :class:`torch.nn.TransformerEncoderLayer`'s arguments, under the same names and with the same
    submodule names (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``, ``dropout``,
    ``dropout1``, ``dropout2``), plus the positional-scheme arguments of
    :class:`RelativeMultiheadAttention`. With ``position="none"`` and dropout 0 it computes exactly what
    ``nn.TransformerEncoderLayer`` computes with the same weights.

    Post-LN (``norm_first=False``)::

        x = norm1(alpha * x + dropout1(self_attn(x)))
        x = norm2(alpha * x + dropout2(linear2(dropout(activation(linear1(x))))))

    Pre-LN (``norm_first=True``)::

        x = x + dropout1(self_attn(norm1(x)))
        x = x + dropout2(linear2(dropout(activation(linear1(norm2(x))))))

    ``alpha`` (attribute ``residual_alpha``) is 1 unless :class:`RelativeTransformerEncoder` sets it for
    DeepNorm.

    Args:
        d_model: model width.
        nhead: attention heads.
        dim_feedforward: hidden width of the feed-forward network.
        dropout: dropout after the attention block, inside and after the feed-forward block. Unlike
            ``nn.TransformerEncoderLayer`` it does not apply to the attention weights (see
            ``attention_dropout``).
        activation: ``"relu"``, ``"gelu"`` or a callable.
        layer_norm_eps: epsilon of both layer norms.
        batch_first: ``[B, L, d_model]`` (default) rather than ``[L, B, d_model]``.
        norm_first: pre-LN instead of post-LN.
        bias: biases in the linear layers and layer norms.
        num_kv_heads: key/value heads for grouped-query attention (default ``nhead``).
        attention_dropout: dropout on the attention weights (see :class:`RelativeMultiheadAttention`).
        position, max_distance, rel_k, rel_v, per_head_tables, num_buckets, bidirectional, tables:
            the positional scheme, passed to :class:`RelativeMultiheadAttention`.
        device, dtype: factory arguments for parameters.
    """

    #: Residual scale of the post-LN sub-layers (DeepNorm's alpha); 1 for a plain layer.
    residual_alpha: float = 1.0

    @_cache_step
    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        *,
        rel_index: Optional[Tensor] = None,
        segment_ids: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """Args:
            src: ``[B, L, d_model]`` (``[L, B, d_model]`` when not ``batch_first``).
            src_mask: accepted only with ``is_causal=True`` (the causal-mask hint of
                ``nn.TransformerEncoderLayer``; not read). Arbitrary masks raise ``ValueError``.
            src_key_padding_mask: bool ``[B, L]``, ``True`` = padding.
            is_causal: causal self-attention (no ``src_mask`` needed).
            rel_index: optional integer ``[L, L]`` or ``[B, L, L]`` bucket of every (query, key) pair
                (structural positions, e.g. clipped distances in a parse tree), replacing the distance
                buckets of "shaw"/"t5"/"clip_bias"; see :class:`RelativeMultiheadAttention`.
            segment_ids: optional integer ``[B, L]``: packed sequences, each token attending only to
                tokens with its id (see :func:`relattn.attention`).
            cache: a :class:`KVCache` for incremental decoding: ``src`` holds the new tokens only, and
                ``src_key_padding_mask`` covers every cached position.

        Returns:
            a tensor shaped like ``src``.
        """
        _check_attn_mask(src_mask, is_causal, "src_mask")
        x = src
        sa = (src_key_padding_mask, is_causal, rel_index, segment_ids, cache)
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), *sa)
            x = x + self._ff_block(self.norm2(x))
        else:
            alpha = self.residual_alpha
            x = self.norm1(alpha * x + self._sa_block(x, *sa))
            x = self.norm2(alpha * x + self._ff_block(x))
        return x

    def _sa_block(self, x: Tensor, key_padding_mask: Optional[Tensor], is_causal: bool,
                  rel_index: Optional[Tensor], segment_ids: Optional[Tensor] = None,
                  cache: Optional[KVCache] = None) -> Tensor:
        x = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal, rel_index=rel_index, segment_ids=segment_ids, cache=cache)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


def _init_stack(stack: nn.Module, layer: nn.Module, num_layers: int, norm: Optional[nn.Module],
                share_relative_tables: bool, checkpoint: bool) -> None:
    """The attributes an encoder or decoder stack shares: num_layers deep copies of layer (with
    share_relative_tables all using the first one's relative tables), the final norm, checkpointing."""
    if num_layers <= 0:
        raise ValueError(f"{type(stack).__name__}: num_layers must be positive, got {num_layers}")
    stack.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
    if share_relative_tables:
        tables = stack.layers[0].self_attn.relative_tables()
        for other in stack.layers[1:]:
            other.self_attn.set_relative_tables(tables)
    if share_relative_tables:
        stack.register_load_state_dict_pre_hook(_check_shared_tables)
    stack.num_layers = num_layers
    stack.norm = norm
    stack.checkpoint = checkpoint
    stack.share_relative_tables = share_relative_tables


def _check_shared_tables(stack: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *args) -> None:
    """load_state_dict pre-hook of a stack with shared relative tables: every layer's entry of a table loads
    into the one shared tensor, so the entries must agree (weights trained without sharing cannot load)."""
    error_msgs = args[-1]
    for name in stack.layers[0].self_attn.relative_tables():
        first = state_dict.get(f"{prefix}layers.0.self_attn.{name}")
        for i in range(1, len(stack.layers)):
            key = f"{prefix}layers.{i}.self_attn.{name}"
            entry = state_dict.get(key)
            if first is None or entry is None or entry.shape != first.shape:
                continue  # missing entries and shapes: load_state_dict's own checks
            if not torch.equal(entry.to(first.device, first.dtype), first):
                error_msgs.append(f"{type(stack).__name__}: the weights' {key} differs from "
                                  f"{prefix}layers.0.self_attn.{name}, but the stack shares one table across its "
                                  "layers (share_relative_tables); these weights were trained without shared tables")


@_cache_step
def _run_stack(stack: nn.Module, x: Tensor, args: tuple, kwargs: dict, *, cache: Optional[KVCache]) -> Tensor:
    """x through every layer of an encoder or decoder stack (``layer(x, *args, **kwargs, cache=cache)``),
    each under activation checkpointing when the stack asks for it and gradients are on (never with a
    cache, which is for inference), then the final norm. With a cache, a call that raises leaves it as it
    was."""
    use_checkpoint = stack.checkpoint and torch.is_grad_enabled() and cache is None
    for layer in stack.layers:
        if use_checkpoint:
            x = torch.utils.checkpoint.checkpoint(layer, x, *args, **kwargs, use_reentrant=False)
        else:
            x = layer(x, *args, **kwargs, cache=cache)
    return x if stack.norm is None else stack.norm(x)


def _int32_ids(rel_index: Optional[Tensor]) -> Optional[Tensor]:
    """An int64 rel_index as int32 (what the kernels read), once for every layer of a stack. Clamping keeps
    an id beyond int32 out of [0, R), so that the op's range check still reports it instead of a
    wrapped-around id passing as valid. On the CPU, where reading the range costs no device sync, ids beyond
    int32 stay int64, so that the op's error names the id as given."""
    if rel_index is not None and rel_index.dtype == torch.int64:
        lo, hi = -2**31, 2**31 - 1
        if rel_index.device.type == "cpu" and rel_index.numel() and not torch.compiler.is_compiling():
            ext = torch.aminmax(rel_index)  # (then no clamp: the same two passes as clamp + convert)
            in_range = lo <= ext.min.item() and ext.max.item() <= hi
            return rel_index.to(torch.int32) if in_range else rel_index
        rel_index = rel_index.clamp(lo, hi).to(torch.int32)
    return rel_index


class RelativeTransformerEncoder(nn.Module):
    r"""A stack of ``num_layers`` copies of an encoder layer, like :class:`torch.nn.TransformerEncoder`.

    Args:
        encoder_layer: the layer to copy (a :class:`RelativeTransformerEncoderLayer`); each of the
            ``num_layers`` layers is a deep copy, so all start from its weights (as in PyTorch).
        num_layers: number of layers ``N``.
        norm: optional final module applied to the output (e.g. a ``LayerNorm`` after a pre-LN stack).
        share_relative_tables: all layers use the first layer's relative tables (``rel_k``/``rel_v``/
            ``rel_bias``), as T5 shares its bias across layers. The ``state_dict`` still lists the shared
            tensor under every layer's name; loading writes the same tensor each time.
        checkpoint: activation checkpointing: while gradients are enabled each layer runs under
            :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``), keeping only layer inputs
            and recomputing the rest in the backward pass.
        deepnorm: DeepNorm (Wang et al., 2022, "DeepNet: Scaling Transformers to 1,000 Layers") for
            post-LN layers (``norm_first=False``; pre-LN raises ``ValueError``). Each sub-layer computes
            ``x = LN(alpha * x + f(x))`` with ``alpha = (2N)^(1/4)``, and the weights of the value and
            output projections and of both feed-forward linears are re-initialised Xavier-normal with
            gain ``beta = (8N)^(-1/4)`` (query/key projections: Xavier-normal, gain 1). These are the
            encoder-only constants of the paper.
    """

    def __init__(
        self,
        encoder_layer: RelativeTransformerEncoderLayer,
        num_layers: int,
        norm: Optional[nn.Module] = None,
        *,
        share_relative_tables: bool = False,
        checkpoint: bool = False,
        deepnorm: bool = False,
    ) -> None:
        super().__init__()
        _init_stack(self, encoder_layer, num_layers, norm, share_relative_tables, checkpoint)
        self.deepnorm = deepnorm
        if deepnorm:
            self._init_deepnorm()

    def _init_deepnorm(self) -> None:
        if any(layer.norm_first for layer in self.layers):
            raise ValueError("RelativeTransformerEncoder: deepnorm=True is defined for post-LN layers "
                             "(norm_first=False)")
        alpha = (2.0 * self.num_layers) ** 0.25
        beta = (8.0 * self.num_layers) ** -0.25
        for layer in self.layers:
            layer.residual_alpha = alpha
            attn = layer.self_attn
            nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
            nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
            for linear in (attn.v_proj, attn.out_proj, layer.linear1, layer.linear2):
                nn.init.xavier_normal_(linear.weight, gain=beta)

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        *,
        rel_index: Optional[Tensor] = None,
        segment_ids: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """Args:
            src: ``[B, L, d_model]`` (``[L, B, d_model]`` when the layers are not ``batch_first``).
            mask: accepted only with ``is_causal=True`` (the causal-mask hint; not read).
            src_key_padding_mask: bool ``[B, L]``, ``True`` = padding.
            is_causal: causal self-attention in every layer.
            rel_index: optional integer ``[L, L]`` or ``[B, L, L]`` bucket of every pair (structural
                positions), used by every layer in place of its distance buckets. An int64 one is
                converted to int32 (what the kernels read) once here, not once per layer.
            segment_ids: optional integer ``[B, L]``: packed sequences (several per batch row), each
                token attending only to tokens with its id, in every layer; relative positions stay
                those within each sequence. See :func:`relattn.attention`.
            cache: a :class:`KVCache` for incremental decoding, one slot per layer: ``src`` holds the new
                tokens only (the prompt, then one token per call), ``src_key_padding_mask`` covers every
                cached position. With ``is_causal=True`` each call's output equals the rows of the new
                tokens in a causal run over the whole sequence.

        Returns:
            a tensor shaped like ``src``.
        """
        is_causal = bool(is_causal)
        _check_attn_mask(mask, is_causal, "mask")
        rel_index = _int32_ids(rel_index)
        return _run_stack(self, src, (None, src_key_padding_mask, is_causal),
                          dict(rel_index=rel_index, segment_ids=segment_ids), cache=cache)


class RelativeTransformerDecoderLayer(_TransformerLayer):
    r"""A Transformer decoder layer: relative self-attention, cross-attention to a memory (the encoder's
    output), feed-forward — the decoder of an encoder-decoder model such as T5.

    Takes :class:`torch.nn.TransformerDecoderLayer`'s arguments, under the same names and with the same
    submodule names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1``-``norm3``,
    ``dropout``, ``dropout1``-``dropout3``), plus the positional-scheme arguments of
    :class:`RelativeMultiheadAttention` for the self-attention. The cross-attention ``multihead_attn`` has
    no positions (``position="none"``, as in T5): queries and memory are different sequences. With
    ``position="none"`` and dropout 0 it computes exactly what ``nn.TransformerDecoderLayer`` computes with
    the same weights.

    Post-LN (``norm_first=False``)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(multihead_attn(x, memory)))
        x = norm3(x + dropout3(linear2(dropout(activation(linear1(x))))))

    Pre-LN (``norm_first=True``) applies each norm to the sub-layer's input instead.

    Args: as :class:`RelativeTransformerEncoderLayer` (``num_kv_heads`` and ``attention_dropout`` apply
    to both attention blocks; the positional scheme to the self-attention only).
    """

    _cross_attention = True

    @_cache_step
    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        rel_index: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """Args:
            tgt: ``[B, Lt, d_model]`` (``[Lt, B, d_model]`` when not ``batch_first``).
            memory: ``[B, Lm, d_model]``, the encoder's output.
            tgt_mask, memory_mask: accepted only with ``tgt_is_causal`` / ``memory_is_causal`` (the
                causal-mask hints of ``nn.TransformerDecoderLayer``; not read).
            tgt_key_padding_mask: bool ``[B, Lt]``, ``True`` = padding target positions.
            memory_key_padding_mask: bool ``[B, Lm]``, ``True`` = padding memory positions.
            tgt_is_causal: causal self-attention (what a decoder needs; no ``tgt_mask``).
            memory_is_causal: causal cross-attention (target ``i`` sees memory ``j <= i``).
            rel_index: optional integer ``[Lt, Lt]`` or ``[B, Lt, Lt]``: structural positions of the
                self-attention (see :class:`RelativeMultiheadAttention`).
            cache: a :class:`KVCache` for incremental decoding: ``tgt`` holds the new tokens,
                ``tgt_key_padding_mask`` covers every cached position, and the memory is projected once.

        Returns:
            a tensor shaped like ``tgt``.
        """
        _check_attn_mask(tgt_mask, tgt_is_causal, "tgt_mask")
        _check_attn_mask(memory_mask, memory_is_causal, "memory_mask")
        x = tgt

        def sa(y: Tensor) -> Tensor:
            return self.dropout1(self.self_attn(y, y, y, key_padding_mask=tgt_key_padding_mask,
                                                is_causal=tgt_is_causal, rel_index=rel_index, cache=cache)[0])

        def ca(y: Tensor) -> Tensor:
            return self.dropout2(self.multihead_attn(y, memory, memory, key_padding_mask=memory_key_padding_mask,
                                                     is_causal=memory_is_causal, cache=cache)[0])

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + sa(x))
            x = self.norm2(x + ca(x))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class RelativeTransformerDecoder(nn.Module):
    r"""A stack of ``num_layers`` copies of a decoder layer, like :class:`torch.nn.TransformerDecoder`.

    Args:
        decoder_layer: the layer to copy (a :class:`RelativeTransformerDecoderLayer`).
        num_layers: number of layers ``N``.
        norm: optional final module applied to the output.
        share_relative_tables: all layers' self-attention uses the first layer's relative tables (T5).
        checkpoint: activation checkpointing of every layer while gradients are enabled (see
            :class:`RelativeTransformerEncoder`).
    """

    def __init__(
        self,
        decoder_layer: RelativeTransformerDecoderLayer,
        num_layers: int,
        norm: Optional[nn.Module] = None,
        *,
        share_relative_tables: bool = False,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        _init_stack(self, decoder_layer, num_layers, norm, share_relative_tables, checkpoint)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        rel_index: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """The arguments of :meth:`RelativeTransformerDecoderLayer.forward`, for every layer (with a
        :class:`KVCache`, one self-attention and one cross-attention slot per layer). Returns a tensor
        shaped like ``tgt``."""
        _check_attn_mask(tgt_mask, bool(tgt_is_causal), "tgt_mask")
        _check_attn_mask(memory_mask, bool(memory_is_causal), "memory_mask")
        rel_index = _int32_ids(rel_index)
        args = (memory, None, None, tgt_key_padding_mask, memory_key_padding_mask, bool(tgt_is_causal),
                bool(memory_is_causal))
        return _run_stack(self, tgt, args, dict(rel_index=rel_index), cache=cache)


# -- absolute encodings added to the input -----------------------------------------------------------


def _check_input(x: Tensor, d_model: int, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{who}: expected input [B, L, {d_model}], got {list(x.shape)}")


def _sinusoid(position: Tensor, d_model: int, base: float) -> Tensor:
    """``[..., d_model]`` float32 for the positions ``position [...]``: sin in even features, cos in odd
    ones (Vaswani et al., 2017)."""
    inv_freq = torch.exp(torch.arange(0, d_model, 2, device=position.device, dtype=torch.float32)
                         * (-math.log(base) / d_model))
    angle = position.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., ceil(d_model / 2)]
    return torch.stack((torch.sin(angle), torch.cos(angle)), dim=-1).flatten(-2)[..., :d_model]


def _sinusoid_table(length: int, d_model: int, base: float, device, dtype) -> Tensor:
    """``[length, d_model]``: the encoding of positions ``[0, length)``."""
    return _sinusoid(torch.arange(length, device=device, dtype=torch.float32), d_model, base).to(dtype)


def _packed_positions(segment_ids: Tensor, x: Tensor, who: str) -> Tensor:
    """Positions inside each packed sequence, ``[B, L]`` int64, for ``x [B, L, d_model]``."""
    if segment_ids.dim() != 2 or tuple(segment_ids.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{who}: segment_ids must be [B, L] = {list(x.shape[:2])} like the input, got "
                         f"{list(segment_ids.shape)}")
    if segment_ids.device != x.device:
        raise ValueError(f"{who}: segment_ids must be on the input's device ({x.device}), got {segment_ids.device}")
    return segment_positions(segment_ids)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal encoding of Vaswani et al. (2017) to ``x [B, L, d_model]``.

    ``PE[p, 2i] = sin(p / base^(2i/d_model))``, ``PE[p, 2i+1] = cos(p / base^(2i/d_model))``.
    Nothing is learned; it is defined for every length. With ``segment_ids`` (packed sequences),
    ``p`` is the position inside each token's own sequence (:func:`relattn.segment_positions`).

    Args:
        d_model: feature size (odd sizes drop the last cosine).
        max_len: if given, the table for positions ``[0, max_len)`` is precomputed (a non-persistent
            float32 buffer that follows the module's device but not its dtype, so that every length is
            encoded alike); longer inputs compute theirs on the fly. ``None`` always computes on the fly.
        base: the wavelength base (10000 in the paper).
    """

    def __init__(self, d_model: int, max_len: Optional[int] = None, base: float = 10000.0) -> None:
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"SinusoidalPositionalEncoding: d_model must be positive, got {d_model}")
        self.d_model = d_model
        self.max_len = max_len
        self.base = base
        table = None if max_len is None else _sinusoid_table(max_len, d_model, base, None, torch.float32)
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor, segment_ids: Optional[Tensor] = None) -> Tensor:
        """``x [B, L, d_model]`` -> ``x + PE[:L]``; with ``segment_ids`` (integer ``[B, L]``, packed
        sequences) ``x + PE[p]``, ``p`` the position inside each token's sequence."""
        _check_input(x, self.d_model, "SinusoidalPositionalEncoding")
        if segment_ids is not None:
            p = _packed_positions(segment_ids, x, "SinusoidalPositionalEncoding")
            return x + _sinusoid(p, self.d_model, self.base).to(x.dtype)
        L = x.shape[1]
        if self.table is not None and L <= self.table.shape[0]:
            pe = self.table[:L]
        else:
            pe = _sinusoid_table(L, self.d_model, self.base, x.device, torch.float32)
        return x + pe.to(x.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.table is not None and self.table.dtype != torch.float32:  # a cast: recompute in float32
            self.table = _sinusoid_table(self.table.shape[0], self.d_model, self.base, self.table.device,
                                         torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEncoding(nn.Module):
    """Adds a learned embedding per absolute position (a ``[max_len, d_model]`` table) to ``x``.

    Args:
        max_len: number of positions the table holds; longer inputs raise ``ValueError``, since
            positions past the table have no embedding.
        d_model: feature size.
        init_std: standard deviation of the table's normal initialisation (0.02, as in BERT and GPT-2;
            match it to the scale of the token embeddings it is added to).
        device, dtype: factory arguments for the table.
    """

    def __init__(self, max_len: int, d_model: int, *, init_std: float = 0.02, device=None, dtype=None) -> None:
        super().__init__()
        if max_len <= 0 or d_model <= 0:
            raise ValueError(f"LearnedPositionalEncoding: max_len ({max_len}) and d_model ({d_model}) "
                             "must be positive")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"LearnedPositionalEncoding: init_std must be finite and >= 0, got {init_std}")
        self.max_len = max_len
        self.d_model = d_model
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(max_len, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: Tensor, segment_ids: Optional[Tensor] = None) -> Tensor:
        """``x [B, L, d_model]`` -> ``x + weight[:L]``; raises ``ValueError`` when ``L > max_len``.

        With ``segment_ids`` (integer ``[B, L]``, packed sequences): ``x + weight[p]``, ``p`` the position
        inside each token's sequence; raises ``ValueError`` when a sequence is longer than ``max_len``
        (checked on the host only when ``L > max_len``).
        """
        _check_input(x, self.d_model, "LearnedPositionalEncoding")
        L = x.shape[1]
        if segment_ids is not None:
            p = _packed_positions(segment_ids, x, "LearnedPositionalEncoding")
            if L > self.max_len and p.numel() > 0:
                longest = int(p.max()) + 1
                if longest > self.max_len:
                    raise ValueError(f"LearnedPositionalEncoding: a packed sequence of length {longest} "
                                     f"exceeds the table's max_len={self.max_len}")
            return x + self.weight[p].to(x.dtype)
        if L > self.max_len:
            raise ValueError(f"LearnedPositionalEncoding: sequence length {L} exceeds the table's "
                             f"max_len={self.max_len}")
        return x + self.weight[:L].to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"


class MLPPositionalEncoding(nn.Module):
    """Adds ``MLP(p)`` to ``x``, an MLP (``Linear(1, hidden) -> activation -> Linear(hidden, d_model)``) of
    each position's scalar coordinate ``p``.

    Args:
        d_model: feature size.
        hidden: hidden width of the MLP.
        scale: ``None`` (default) feeds the normalised position ``p = i / (L - 1)`` in ``[0, 1]``
            (0 for ``L = 1``), so every length spans the same range; a float feeds the raw index times
            it, ``p = i * scale`` (``scale=1.0``: the raw index), which grows with the length. With
            ``segment_ids`` (packed sequences), ``i`` is the position inside each token's sequence and
            ``L`` that sequence's length.
        activation: ``"relu"``, ``"gelu"`` (default) or a callable.
        device, dtype: factory arguments.
    """

    def __init__(self, d_model: int, hidden: int = 64, *, scale: Optional[float] = None,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "gelu", device=None, dtype=None) -> None:
        super().__init__()
        if d_model <= 0 or hidden <= 0:
            raise ValueError(f"MLPPositionalEncoding: d_model ({d_model}) and hidden ({hidden}) must be positive")
        self.d_model = d_model
        self.hidden = hidden
        self.scale = scale
        self.fc1 = nn.Linear(1, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, device=device, dtype=dtype)
        self.activation = _activation(activation)

    def positions(self, length: int, device=None, dtype=torch.float32) -> Tensor:
        """The scalar coordinates ``[length, 1]`` fed to the MLP."""
        index = torch.arange(length, device=device, dtype=dtype)
        if self.scale is None:
            return (index / max(length - 1, 1)).unsqueeze(1)
        return (index * self.scale).unsqueeze(1)

    def forward(self, x: Tensor, segment_ids: Optional[Tensor] = None) -> Tensor:
        """``x [B, L, d_model]`` -> ``x + MLP(p)``; with ``segment_ids`` (integer ``[B, L]``, packed
        sequences), ``p`` is taken inside each token's sequence."""
        _check_input(x, self.d_model, "MLPPositionalEncoding")
        if segment_ids is None:
            p = self.positions(x.shape[1], device=x.device, dtype=self.fc1.weight.dtype)
        else:
            index = _packed_positions(segment_ids, x, "MLPPositionalEncoding").to(self.fc1.weight.dtype)
            if self.scale is None:
                index = index / (segment_lengths(segment_ids) - 1).clamp_min(1).to(index.dtype)
            else:
                index = index * self.scale
            p = index.unsqueeze(-1)
        return x + self.fc2(self.activation(self.fc1(p))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}, scale={self.scale}"


def load_weights(path: str, map_location=None) -> Dict[str, Tensor]:
    """Reads the weights a C++ program wrote with ``relattn::nn::save_state_dict`` (a dict of tensors by
    name, in Python's ``state_dict`` layout), for ``model.load_state_dict(relattn.nn.load_weights(path))``.

    The file is loaded with ``weights_only=True``; the one global it needs beyond tensors is the type tag
    LibTorch's pickler writes for its typed dict, allowed here for this load only.
    """
    import torch.jit._pickle  # noqa: F401  (the module of the type tag)

    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"relattn.nn.load_weights: {path} does not hold a dict of tensors by name")
    return state
