"""relattn: fused attention with relative positions (Shaw, T5, ALiBi, structural) for PyTorch.

>>> import torch, relattn
>>> q = k = v = torch.randn(2, 4, 128, 64)
>>> out = relattn.attention(q, k, v, rel_k=torch.randn(33, 64), rel_v=torch.randn(33, 64),
...                         buckets=relattn.clip_buckets(16))
"""
from ._library import LIBRARY_PATH, cmake_prefix_path
from .functional import (alibi_slopes, attention, clip_buckets, cuda_kernels_built, draw_dropout_seed, segment_lengths,
                         segment_positions, t5_buckets)
from . import nn

__version__ = "0.1.0"

__all__ = ["attention", "nn", "clip_buckets", "t5_buckets", "alibi_slopes", "cuda_kernels_built", "draw_dropout_seed",
           "segment_positions", "segment_lengths", "cmake_prefix_path", "LIBRARY_PATH", "__version__"]
