"""A NumPy model of the CUDA kernels' tile algorithm (kernels/cuda/forward_mma.cuh and, for the
backward, the two kernels of kernels/cuda/backward_mma.cuh), written
with the kernel's own index arithmetic: CTA order, query/key tiles, zero-filled padding, the causal key
limit, the per-tile bucket window, the single-bucket rows, the per-row tables in log2 units, the online
softmax with rescaled bucket sums (far rows' sums kept apart, the rest rescaled lazily) and the final (bsum / l)·aV. It runs on the CPU in float64, so that the
kernel's bookkeeping can be checked against the naive reference without a GPU:

    python kernels/cuda/tile_model.py          # every case of tests/python/test_accuracy.py, several tile shapes
    pytest tests/python/test_tile_model.py     # forward and backward models (every gradient) on chosen cases

When the CUDA kernel and this model disagree on a GPU, the kernel's lane-level code is at fault; when
this model and the reference disagree, the algorithm is.
"""
import math
import sys
from pathlib import Path

import numpy as np

LOG2E = 1.4426950408889634


def _sizes(q, k, v, rel_k, rel_v, rel_bias, buckets, scale):
    """(B, H, Lq, D, Hk, Lk, Dv, scale, R, M) of a call: the default scale, the bucket count of the tables,
    the clipping distance of the distance table."""
    B, H, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    R = 0
    for t, ax in ((rel_k, -2), (rel_v, -2), (rel_bias, -1)):
        if t is not None:
            R = t.shape[ax]
    M = (len(buckets) - 1) // 2 if buckets is not None else 0
    return B, H, Lq, D, Hk, Lk, Dv, scale, R, M


def _key_tile(k, v, key_padding_mask, b, kv, j0, n, width_k, width_v):
    """A tile of n keys from j0 as the kernels stage it: K [n, width_k] and V [n, width_v] zero-filled beyond
    Lk and the head dims, and the padding flags (True beyond Lk)."""
    cols = min(n, k.shape[2] - j0)
    K = np.zeros((n, width_k))
    V = np.zeros((n, width_v))
    K[:cols, :k.shape[3]] = k[b, kv, j0:j0 + cols]
    V[:cols, :v.shape[3]] = v[b, kv, j0:j0 + cols]
    kpm = np.ones(n, dtype=bool)
    kpm[:cols] = key_padding_mask[b, j0:j0 + cols] if key_padding_mask is not None else False
    return K, V, kpm


def _check_warp_shortcuts(far, col_lims, i0, j0, q_offset, M, BM, BN, Lk, causal, has_kpm):
    """The forward kernel decides two things per warp (BM/4 rows) from its first and last row alone
    (forward_mma.cuh): whether every row's distances in the tile lie beyond ±M on one side (then one table
    value per row, no per-element work), and whether the tile needs masks at all. Both must agree with the
    per-row bookkeeping: the far test exactly (iff, same side), the mask test never skipping a needed mask."""
    rpw = BM // 4
    for w0 in range(0, BM, rpw):
        wpos = i0 + w0 + q_offset  # position of the warp's first row
        rows = range(w0, w0 + rpw)
        if M is not None:
            warp_far = 1 if j0 + BN - 1 - wpos <= -M else (2 if j0 - (wpos + rpw - 1) >= M else 0)
            all_far = all(far[r] != 0 and far[r] == far[w0] for r in rows)
            assert (warp_far != 0) == all_far and (warp_far == 0 or warp_far == far[w0]), (i0, j0, w0)
        needs_mask = has_kpm or Lk - j0 < BN or (causal and j0 + BN - 1 > wpos)
        assert needs_mask or all(col_lims[r] == BN for r in rows), (i0, j0, w0)


def mma_forward_model(q, k, v, *, rel_k=None, rel_v=None, rel_bias=None, buckets=None, rel_index=None,
                      alibi_slopes=None, key_padding_mask=None, causal=False, scale=None, q_offset=0,
                      block_m=64, block_n=64):
    """(out, lse) as numpy float64 arrays; inputs are numpy arrays (tables [R,X] or [H,R,X])."""
    B, H, Lq, D, Hk, Lk, Dv, scale, R, M = _sizes(q, k, v, rel_k, rel_v, rel_bias, buckets, scale)
    HD = max(D, Dv)
    has_tab = rel_k is not None or rel_bias is not None
    has_bsum = rel_v is not None
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
        bscale = np.ones(BM)
        far_sum = np.zeros((BM, 2))  # bucket sums of the far tiles: [0] distances <= -M, [1] >= M
        slope2 = float(alibi_slopes[h]) * LOG2E if alibi_slopes is not None else 0.0
        row_max = np.full(BM, -np.inf)
        row_sum = np.zeros(BM)
        O = np.zeros((BM, HD))
        for t in range(n_tiles):
            j0 = t * BN
            K, V, kpm_s = _key_tile(k, v, key_padding_mask, b, kv, j0, BN, HD, HD)
            win = None
            if buckets is not None:
                d0 = j0 - (i0 + BM - 1 + q_offset)
                win = np.array([buckets[min(max(d0 + w, -M), M) + M] for w in range(BM + BN - 1)])
            S = Q @ K.T
            s2 = np.empty((BM, BN))
            betas = np.zeros((BM, BN), dtype=np.int64)
            row_bucket = np.full(BM, -1)
            far = np.zeros(BM, dtype=np.int64)  # 1: all distances <= -M, 2: all >= M
            col_lims = np.zeros(BM, dtype=np.int64)
            for row in range(BM):
                pos = i0 + row + q_offset
                dj = j0 - pos
                rb = -1
                if buckets is not None:
                    if dj + BN - 1 <= -M:
                        rb, far[row] = buckets[0], 1
                    elif dj >= M:
                        rb, far[row] = buckets[2 * M], 2
                row_bucket[row] = rb
                lim = Lk - j0
                if causal and 1 - dj < lim:
                    lim = 1 - dj
                col_lim = min(max(lim, 0), BN)
                col_lims[row] = col_lim
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
            _check_warp_shortcuts(far, col_lims, i0, j0, q_offset, M if buckets is not None else None, BM, BN,
                                  Lk, causal, key_padding_mask is not None)
            mx = np.maximum(row_max, s2.max(axis=1))
            m_use = np.where(mx == -np.inf, 0.0, mx)
            corr = np.exp2(row_max - m_use)
            row_max = mx
            P = np.exp2(s2 - m_use[:, None])
            row_sum = row_sum * corr + P.sum(axis=1)
            O *= corr[:, None]
            if has_bsum:
                # far rows: the row sum into the register of their far bucket; the bsum row in memory is
                # rescaled lazily (bscale: the corrections since its last window tile)
                bscale *= corr
                far_sum *= corr[:, None]
                for row in range(BM):
                    if row_bucket[row] >= 0:
                        far_sum[row, far[row] - 1] += P[row].sum()
                    else:
                        bsum[row] *= bscale[row]
                        bscale[row] = 1.0
                        for c in range(BN):
                            if P[row, c] != 0:
                                bsum[row, betas[row, c]] += P[row, c]
            O += P @ V
        if has_bsum:
            bsum *= bscale[:, None]
            if buckets is not None:
                for row in range(BM):
                    bsum[row, buckets[0]] += far_sum[row, 0]
                    bsum[row, buckets[2 * M]] += far_sum[row, 1]
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


def _row_tables(q, do, rel_k, rel_v, rel_bias, scale, R):
    """Natural-unit row tables of one (b, h) as kernel A computes them: tab = scale*q·aK + bias, doa = do·aV."""
    Lq = q.shape[0]
    tab = np.zeros((Lq, R))
    doa = np.zeros((Lq, R))
    if rel_k is not None:
        tab += scale * (q @ rel_k.T)
    if rel_bias is not None:
        tab += rel_bias[None, :]
    if rel_v is not None:
        doa = do @ rel_v.T
    return tab, doa


def mma_backward_model(q, k, v, grad_out, lse, grad_lse=None, *, out=None, rel_k=None, rel_v=None, rel_bias=None,
                       buckets=None, rel_index=None, alibi_slopes=None, key_padding_mask=None, causal=False,
                       scale=None, q_offset=0, block_m=64, block_n=64, block_keys=64, block_q=32):
    """Every gradient (dq, dk, dv, d rel_k, d rel_v, d rel_bias) as numpy float64 arrays, computed with
    the index arithmetic of backward_mma_query_kernel (A: block_m x block_n tiles, one sweep with dS
    centred on Δ0 = do·out - glse and corrected at the end) and
    backward_mma_key_kernel (B: block_keys x block_q tiles, causal skipping, one-bucket tiles)."""
    B, H, Lq, D, Hk, Lk, Dv, scale, R, M = _sizes(q, k, v, rel_k, rel_v, rel_bias, buckets, scale)
    group = H // Hk
    has_tab = rel_k is not None or rel_bias is not None
    has_doa = rel_v is not None

    def table(t, h):
        return None if t is None else (t if t.ndim == 2 else t[h])

    def bucket_window(d0, n):
        return np.array([buckets[min(max(d0 + w, -M), M) + M] for w in range(n)])

    def index_of(b, i, j):
        ri = rel_index if rel_index.ndim == 2 else rel_index[b]
        return ri[i, j]

    dq = np.full((B, H, Lq, D), np.nan)
    dk = np.full((B, Hk, Lk, D), np.nan)
    dv = np.full((B, Hk, Lk, Dv), np.nan)
    row_tab = np.zeros((B, H, Lq, R))
    row_doa = np.zeros((B, H, Lq, R))
    ds_sum = np.zeros((B, H, Lq, R))
    p_sum = np.zeros((B, H, Lq, R))
    delta_all = np.zeros((B, H, Lq))
    glse = np.zeros((B, H, Lq)) if grad_lse is None else grad_lse
    lse2_all = np.where(lse == -np.inf, np.inf, lse * LOG2E)

    # ---- kernel A --------------------------------------------------------------------------------------
    BM, BN = block_m, block_n
    nqb = (Lq + BM - 1) // BM
    for slot in range(nqb * B * H):
        qb = nqb - 1 - slot % nqb
        bh = slot // nqb
        b, h = bh // H, bh % H
        kv = h // group
        i0 = qb * BM
        rows = min(BM, Lq - i0)
        Q = np.zeros((BM, D))
        Do = np.zeros((BM, Dv))
        Q[:rows] = q[b, h, i0:i0 + rows]
        Do[:rows] = grad_out[b, h, i0:i0 + rows]
        tab, doa = _row_tables(Q, Do, table(rel_k, h), table(rel_v, h),
                               None if rel_bias is None else rel_bias[h], scale, R)
        row_tab[b, h, i0:i0 + rows] = tab[:rows]
        row_doa[b, h, i0:i0 + rows] = doa[:rows]
        lse2 = np.full(BM, np.inf)
        lse2[:rows] = lse2_all[b, h, i0:i0 + rows]
        slope2 = float(alibi_slopes[h]) * LOG2E if alibi_slopes is not None else 0.0
        j_end = Lk
        if causal:
            last = i0 + rows - 1 + q_offset + 1
            j_end = 0 if last < 0 else min(last, Lk)
        n_tiles = (j_end + BN - 1) // BN
        # One sweep over the keys with dS0 = P∘(dP - Δ0) centred on Δ0 = do·out - glse (0 without out);
        # Δ = Σ P∘dP - glse, then dq = Σ dS0 K - (Δ - Δ0) Σ P K and the dS bucket sums likewise. A row
        # with at most one key of P > 0 takes its exact dS = glse instead.
        gl = np.zeros(BM)
        gl[:rows] = glse[b, h, i0:i0 + rows]
        delta0 = -gl.copy()
        if out is not None:
            delta0[:rows] += np.einsum("id,id->i", Do[:rows], out[b, h, i0:i0 + rows])
        rowacc = np.zeros(BM)
        seen = np.zeros(BM)
        dsb = np.zeros((BM, R))
        psb = np.zeros((BM, R))
        acc_dq = np.zeros((BM, D))
        acc_pk = np.zeros((BM, D))
        for t in range(n_tiles):
            j0 = t * BN
            K, V, kpm_s = _key_tile(k, v, key_padding_mask, b, kv, j0, BN, D, Dv)
            win = bucket_window(j0 - (i0 + BM - 1 + q_offset), BM + BN - 1) if buckets is not None else None
            S = Q @ K.T
            dP = Do @ V.T
            dS0 = np.zeros((BM, BN))
            P = np.zeros((BM, BN))
            for row in range(BM):
                row_ok = row < rows
                dj = j0 - (i0 + row + q_offset)
                rb = -1
                if buckets is not None:
                    if dj + BN - 1 <= -M:
                        rb = buckets[0]
                    elif dj >= M:
                        rb = buckets[2 * M]
                lim = Lk - j0
                if causal and 1 - dj < lim:
                    lim = 1 - dj
                col_lim = min(max(lim, 0), BN)
                for c in range(BN):
                    beta = rb if rb >= 0 else 0
                    if rb < 0:
                        if win is not None:
                            beta = win[c - row + BM - 1]
                        elif rel_index is not None and row_ok and c < col_lim:
                            beta = index_of(b, i0 + row, j0 + c)
                    s = S[row, c] * scale * LOG2E
                    if has_tab and row_ok:
                        s += tab[row, beta] * LOG2E
                    if slope2 != 0:
                        s -= slope2 * abs(dj + c)
                    masked = c >= col_lim or kpm_s[c]
                    pv = 0.0 if masked else np.exp2(s - lse2[row])
                    dp = dP[row, c] + (doa[row, beta] if has_doa and row_ok else 0.0)
                    rowacc[row] += pv * dp
                    seen[row] = min(seen[row] + (pv != 0), 2)
                    dS0[row, c] = pv * (dp - delta0[row])
                    P[row, c] = pv
                    if pv != 0 and row_ok and (has_tab or has_doa):
                        dsb[row, beta] += dS0[row, c]
                        psb[row, beta] += pv
            acc_dq += dS0 @ K
            acc_pk += P @ K
        delta = rowacc - gl
        delta_all[b, h, i0:i0 + rows] = delta[:rows]
        several = seen > 1
        corr = np.where(several, delta - delta0, -gl)
        keep = several.astype(float)
        acc_dq = keep[:, None] * acc_dq - corr[:, None] * acc_pk
        dsb = keep[:, None] * dsb - corr[:, None] * psb
        if rel_k is not None:
            acc_dq += dsb @ table(rel_k, h)
        dq[b, h, i0:i0 + rows] = scale * acc_dq[:rows]
        ds_sum[b, h, i0:i0 + rows] = dsb[:rows]
        p_sum[b, h, i0:i0 + rows] = psb[:rows]

    # ---- kernel B --------------------------------------------------------------------------------------
    BK, BQ = block_keys, block_q
    nkb = (Lk + BK - 1) // BK
    nq = (Lq + BQ - 1) // BQ
    for slot in range(nkb * B * Hk):
        kb = slot % nkb
        bg = slot // nkb
        b, g = bg // Hk, bg % Hk
        j0 = kb * BK
        keys = min(BK, Lk - j0)
        K, V, kpm_s = _key_tile(k, v, key_padding_mask, b, g, j0, BK, D, Dv)
        i_first = max(0, j0 - q_offset) if causal else 0
        qt_first = nq if i_first >= Lq else i_first // BQ
        n_vis = nq - qt_first
        acc_dk = np.zeros((BK, D))
        acc_dv = np.zeros((BK, Dv))
        for it in range(group * n_vis):
            h = g * group + it // n_vis
            i0 = (qt_first + it % n_vis) * BQ
            rows = min(BQ, Lq - i0)
            Q = np.zeros((BQ, D))
            Do = np.zeros((BQ, Dv))
            Q[:rows] = q[b, h, i0:i0 + rows]
            Do[:rows] = grad_out[b, h, i0:i0 + rows]
            lse2 = np.full(BQ, np.inf)
            lse2[:rows] = lse2_all[b, h, i0:i0 + rows]
            dl = np.zeros(BQ)
            dl[:rows] = delta_all[b, h, i0:i0 + rows]
            win = bucket_window(j0 - i0 - q_offset - (BQ - 1), BK + BQ - 1) if buckets is not None else None
            slope2 = float(alibi_slopes[h]) * LOG2E if alibi_slopes is not None else 0.0
            tb = -1
            if buckets is not None:
                if (j0 + BK - 1) - (i0 + q_offset) <= -M:
                    tb = buckets[0]
                elif j0 - (i0 + BQ - 1 + q_offset) >= M:
                    tb = buckets[2 * M]
            St = K @ Q.T
            dPt = V @ Do.T
            P = np.zeros((BK, BQ))
            dS = np.zeros((BK, BQ))
            for kr in range(BK):
                for c in range(BQ):
                    col_ok = c < rows
                    d = (j0 + kr) - (i0 + c + q_offset)
                    beta = tb if tb >= 0 else 0
                    if tb < 0:
                        if win is not None:
                            beta = win[kr - c + BQ - 1]
                        elif rel_index is not None and col_ok and kr < keys:
                            beta = index_of(b, i0 + c, j0 + kr)
                    s = St[kr, c] * scale * LOG2E
                    if has_tab and col_ok:
                        s += row_tab[b, h, i0 + c, beta] * LOG2E
                    if slope2 != 0:
                        s -= slope2 * abs(d)
                    masked = kpm_s[kr] or not col_ok or (causal and d > 0)
                    # kernel B tests causality as c < c_vis, c_vis = clamp(d at column 0, 0, BQ)
                    d0 = (j0 + kr) - (i0 + q_offset)
                    assert (causal and d > 0) == (causal and c < min(max(d0, 0), BQ))
                    pv = 0.0 if masked else np.exp2(s - lse2[c])
                    dp = dPt[kr, c] + (row_doa[b, h, i0 + c, beta] if has_doa and col_ok else 0.0)
                    P[kr, c] = pv
                    dS[kr, c] = pv * (dp - dl[c])
            acc_dv += P @ Do
            acc_dk += dS @ Q
        dk[b, g, j0:j0 + keys] = scale * acc_dk[:keys]
        dv[b, g, j0:j0 + keys] = acc_dv[:keys]

    # ---- table gradients (the binding's GEMMs) ---------------------------------------------------------
    grads = {"q": dq, "k": dk, "v": dv}
    if rel_k is not None:
        g_ = scale * np.einsum("bhir,bhid->hrd", ds_sum, q)
        grads["rel_k"] = g_ if rel_k.ndim == 3 else g_.sum(0)
    if rel_v is not None:
        g_ = np.einsum("bhir,bhid->hrd", p_sum, grad_out)
        grads["rel_v"] = g_ if rel_v.ndim == 3 else g_.sum(0)
    if rel_bias is not None:
        grads["rel_bias"] = ds_sum.sum(axis=(0, 2))
    return grads


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
