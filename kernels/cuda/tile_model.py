"""A NumPy model of the CUDA forward kernels' tile algorithm (kernels/cuda/forward_mma.cuh), written
with the kernel's own index arithmetic: CTA order, query/key tiles, zero-filled padding, the causal key
limit, the per-tile bucket window, the single-bucket rows, the per-row tables in log2 units, the online
softmax with rescaled bucket sums and the final (bsum / l)·aV. It runs on the CPU in float64, so that the
kernel's bookkeeping can be checked against the naive reference without a GPU:

    python kernels/cuda/tile_model.py          # every case of tests/python/test_accuracy.py, several tile shapes

When the CUDA kernel and this model disagree on a GPU, the kernel's lane-level code is at fault; when
this model and the reference disagree, the algorithm is.
"""
import math
import sys
from pathlib import Path

import numpy as np

LOG2E = 1.4426950408889634


def mma_forward_model(q, k, v, *, rel_k=None, rel_v=None, rel_bias=None, buckets=None, rel_index=None,
                      alibi_slopes=None, key_padding_mask=None, causal=False, scale=None, q_offset=0,
                      block_m=64, block_n=64):
    """(out, lse) as numpy float64 arrays; inputs are numpy arrays (tables [R,X] or [H,R,X])."""
    B, H, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    HD = max(D, Dv)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    R = 0
    for t, ax in ((rel_k, -2), (rel_v, -2), (rel_bias, -1)):
        if t is not None:
            R = t.shape[ax]
    has_tab = rel_k is not None or rel_bias is not None
    has_bsum = rel_v is not None
    M = (len(buckets) - 1) // 2 if buckets is not None else 0
    BM, BN = block_m, block_n
    out = np.full((B, H, Lq, Dv), np.nan)
    lse = np.full((B, H, Lq), np.nan)
    nqb = (Lq + BM - 1) // BM
    for slot in range(nqb * B * H):
        qb = nqb - 1 - slot % nqb
        bh = slot // nqb
        b, h = bh // H, bh % H
        kv = h // (H // Hk)
        i0 = qb * BM
        rows = min(BM, Lq - i0)
        Q = np.zeros((BM, HD))
        Q[:rows, :D] = q[b, h, i0:i0 + rows]
        j_end = Lk
        if causal:
            last = i0 + rows - 1 + q_offset + 1
            j_end = 0 if last < 0 else min(last, Lk)
        n_tiles = (j_end + BN - 1) // BN

        tab = np.zeros((BM, R))
        if has_tab:
            rk = None if rel_k is None else (rel_k if rel_k.ndim == 2 else rel_k[h])
            for r0 in range(0, R, BN):
                S = np.zeros((BM, BN))
                if rk is not None:
                    chunk = np.zeros((BN, HD))
                    n = min(BN, R - r0)
                    chunk[:n, :D] = rk[r0:r0 + n]
                    S = Q @ chunk.T
                for c in range(BN):
                    r = r0 + c
                    if r < R:
                        val = S[:, c] * scale if rk is not None else np.zeros(BM)
                        if rel_bias is not None:
                            val = val + rel_bias[h, r]
                        tab[:, r] = val * LOG2E
        bsum = np.zeros((BM, R))
        slope2 = float(alibi_slopes[h]) * LOG2E if alibi_slopes is not None else 0.0
        row_max = np.full(BM, -np.inf)
        row_sum = np.zeros(BM)
        O = np.zeros((BM, HD))
        for t in range(n_tiles):
            j0 = t * BN
            cols = min(BN, Lk - j0)
            K = np.zeros((BN, HD))
            V = np.zeros((BN, HD))
            K[:cols, :D] = k[b, kv, j0:j0 + cols]
            V[:cols, :Dv] = v[b, kv, j0:j0 + cols]
            kpm_s = np.ones(BN, dtype=bool)
            if key_padding_mask is not None:
                kpm_s[:cols] = key_padding_mask[b, j0:j0 + cols]
            win = None
            if buckets is not None:
                d0 = j0 - (i0 + BM - 1 + q_offset)
                win = np.array([buckets[min(max(d0 + w, -M), M) + M] for w in range(BM + BN - 1)])
            S = Q @ K.T
            s2 = np.empty((BM, BN))
            betas = np.zeros((BM, BN), dtype=np.int64)
            row_bucket = np.full(BM, -1)
            for row in range(BM):
                pos = i0 + row + q_offset
                dj = j0 - pos
                rb = -1
                if buckets is not None:
                    if dj + BN - 1 <= -M:
                        rb = buckets[0]
                    elif dj >= M:
                        rb = buckets[2 * M]
                row_bucket[row] = rb
                lim = Lk - j0
                if causal and 1 - dj < lim:
                    lim = 1 - dj
                col_lim = min(max(lim, 0), BN)
                for c in range(BN):
                    s = S[row, c] * scale * LOG2E
                    beta = 0
                    if rb >= 0:
                        beta = rb
                    elif win is not None:
                        beta = win[c - row + BM - 1]
                    elif rel_index is not None and row < rows and c < col_lim:
                        ri = rel_index if rel_index.ndim == 2 else rel_index[b]
                        beta = ri[i0 + row, j0 + c]
                    betas[row, c] = beta
                    if has_tab:
                        s += tab[row, beta]
                    if slope2 != 0:
                        s -= slope2 * abs(dj + c)
                    masked = c >= col_lim or (key_padding_mask is not None and kpm_s[c])
                    s2[row, c] = -np.inf if masked else s
            mx = np.maximum(row_max, s2.max(axis=1))
            m_use = np.where(mx == -np.inf, 0.0, mx)
            corr = np.exp2(row_max - m_use)
            row_max = mx
            P = np.exp2(s2 - m_use[:, None])
            row_sum = row_sum * corr + P.sum(axis=1)
            O *= corr[:, None]
            if has_bsum:
                bsum *= corr[:, None]
                for row in range(BM):
                    if row_bucket[row] >= 0:
                        bsum[row, row_bucket[row]] += P[row].sum()
                    else:
                        for c in range(BN):
                            if P[row, c] != 0:
                                bsum[row, betas[row, c]] += P[row, c]
            O += P @ V
        inv = np.where(row_sum > 0, 1.0 / np.where(row_sum > 0, row_sum, 1.0), 0.0)
        lse_t = np.where(row_sum > 0, (row_max + np.log2(np.where(row_sum > 0, row_sum, 1.0))) / LOG2E, -np.inf)
        O *= inv[:, None]
        if has_bsum:
            rv = rel_v if rel_v.ndim == 2 else rel_v[h]
            for r0 in range(0, R, BN):
                chunk = np.zeros((BN, HD))
                n = min(BN, R - r0)
                chunk[:n, :Dv] = rv[r0:r0 + n]
                A = np.zeros((BM, BN))
                A[:, :n] = bsum[:, r0:r0 + n] * inv[:, None]
                O += A @ chunk
        out[b, h, i0:i0 + rows] = O[:rows, :Dv]
        lse[b, h, i0:i0 + rows] = lse_t[:rows]
    return out, lse


def _main():
    import torch
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "tests" / "python"))
    from cases import make_inputs, run_reference  # noqa: E402
    import test_accuracy  # noqa: E402

    def np_(t):
        return None if t is None else (t.detach().numpy() if isinstance(t, torch.Tensor) else t)

    worst = 0.0
    for case in test_accuracy.CASES:
        inp = make_inputs(case, torch.float64)
        ref_out, ref_lse = run_reference(inp, torch.float64)
        kw = {n: (np_(t) if isinstance(t, torch.Tensor) else t) for n, t in inp.kwargs.items()}
        for bm, bn in ((128, 64), (128, 32), (64, 64), (64, 32)):
            out, lse = mma_forward_model(np_(inp.q), np_(inp.k), np_(inp.v), block_m=bm, block_n=bn, **kw)
            err_o = np.abs(out - ref_out.numpy()).max() if out.size else 0.0
            fin = np.isfinite(ref_lse.numpy())
            assert np.array_equal(np.isfinite(lse), fin), (case.name, bm, bn, "lse -inf pattern")
            err_l = np.abs(lse[fin] - ref_lse.numpy()[fin]).max() if fin.any() else 0.0
            assert not np.isnan(out).any(), (case.name, bm, bn, "NaN")
            worst = max(worst, err_o, err_l)
            status = "ok" if max(err_o, err_l) < 1e-9 else "MISMATCH"
            print(f"{case.name:45s} BM={bm:3d} BN={bn:3d} out {err_o:.2e} lse {err_l:.2e} {status}")
            assert status == "ok"
    print(f"all cases agree with the reference (worst {worst:.2e})")


if __name__ == "__main__":
    _main()
