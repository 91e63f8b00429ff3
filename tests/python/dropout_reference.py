"""An independent model of relattn's dropout mask (kernels/dropout.h), in NumPy: Philox4x32-10 as
Random123 defines it (checked against its published known-answer vectors) and the documented map from a
(batch, head, query, key) pair to a Philox counter and one of its eight 16-bit numbers.
"""
import numpy as np
import torch

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """ctr: 4 arrays (broadcastable) of uint32 values; key: (k0, k1) ints. Returns 4 uint64 arrays < 2^32."""
    x0, x1, x2, x3 = (np.asarray(c, dtype=np.uint64) & MASK32 for c in ctr)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0 = M0 * x0  # < 2^64: exact in uint64
        p1 = M1 * x2
        x0, x1, x2, x3 = ((p1 >> np.uint64(32)) ^ x1 ^ np.uint64(k0), p1 & MASK32,
                          (p0 >> np.uint64(32)) ^ x3 ^ np.uint64(k1), p0 & MASK32)
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return x0, x1, x2, x3


def threshold(p):
    return int(round(p * 65536.0))


def keep_factors(seed, p, B, H, Lq, Lk, dtype=torch.float64):
    """[B, H, Lq, Lk] tensor of each pair's dropout factor: 1 / (1 - p') where kept, 0 where dropped."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    key = (seed & 0xFFFFFFFF, seed >> 32)
    b, h, i, j = np.meshgrid(np.arange(B, dtype=np.uint64), np.arange(H, dtype=np.uint64),
                             np.arange(Lq, dtype=np.uint64), np.arange(Lk, dtype=np.uint64), indexing="ij")
    one, three, seven = np.uint64(1), np.uint64(3), np.uint64(7)
    ctr = (((j >> np.uint64(4)) << np.uint64(2)) | ((j >> one) & three),
           ((i >> np.uint64(4)) << three) | (i & seven), h, b)
    words = np.stack(philox4x32_10(ctr, key))  # [4, B, H, Lq, Lk]
    slot = (((i >> three) & one) << np.uint64(2)) | (((j >> three) & one) << one) | (j & one)
    word = np.take_along_axis(words, (slot >> one).astype(np.int64)[None], axis=0)[0]
    r = (word >> ((slot & one) * np.uint64(16))) & np.uint64(0xFFFF)
    t = threshold(p)
    scale = 0.0 if t >= 65536 else 65536.0 / (65536 - t)
    return torch.from_numpy(np.where(r >= t, scale, 0.0)).to(dtype)
