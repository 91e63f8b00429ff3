"""The CUDA kernels' tile algorithm, checked on the CPU: kernels/cuda/tile_model.py repeats the index
arithmetic of the tensor-core forward and of both backward kernels (tiles, windows of bucket ids,
single-bucket rows and tiles, causal limits and skipping, padding rows, the lse/Δ bookkeeping) in float64.
When these pass and a GPU test fails, the fault is in the kernels' lane-level code, not in the algorithm.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cases import gradients, make_grad_outputs, make_inputs, run_reference
from test_accuracy import CASES

_spec = importlib.util.spec_from_file_location(
    "relattn_tile_model", Path(__file__).resolve().parents[2] / "kernels" / "cuda" / "tile_model.py")
tile_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tile_model)

# Cases that between them reach every branch of the kernels' bookkeeping, small enough for Python loops.
NAMES = ["plain_gqa_multi_tile", "shaw_kv_per_head_clip_dv", "shaw_kv_index2d_alibi", "t5_bias_rel_k_q_offset",
         "rel_bias_clip_padding_mqa", "alibi_negative_offset_lq_gt_lk", "structural_index3d_all_tables_gqa",
         "everything_clip_gqa", "fully_padded_batch", "decode_step_mqa", "long_rows_beyond_minus_M_causal"]
SELECTED = [c for c in CASES if c.name in NAMES]


def _np(t):
    if not isinstance(t, torch.Tensor):
        return t
    return (t.detach().double() if t.is_floating_point() else t.detach()).numpy()


def test_the_selection_is_complete():
    assert len(SELECTED) == len(NAMES)


# (block_m, block_n) of the forward kernel's tile shapes (kernels/cuda/forward.h)
@pytest.mark.parametrize("case", SELECTED, ids=lambda c: c.name)
@pytest.mark.parametrize("tiles", [(128, 32), (64, 64)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_forward_tile_model_matches_reference(case, tiles):
    inp = make_inputs(case, torch.float64)
    ref_out, ref_lse = run_reference(inp, torch.float64)
    kw = {n: _np(t) for n, t in inp.kwargs.items()}
    out, lse = tile_model.mma_forward_model(_np(inp.q), _np(inp.k), _np(inp.v), block_m=tiles[0],
                                            block_n=tiles[1], **kw)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse.numpy()))
    fin = np.isfinite(lse)
    np.testing.assert_allclose(lse[fin], ref_lse.numpy()[fin], rtol=0, atol=1e-9)


# (block_m, block_n, block_keys, block_q) of the backward kernels (kernels/cuda/backward.h)
@pytest.mark.parametrize("case", SELECTED, ids=lambda c: c.name)
@pytest.mark.parametrize("tiles", [(64, 64, 64, 64), (64, 32, 64, 32)], ids=lambda t: "x".join(map(str, t)))
def test_backward_tile_model_matches_reference(case, tiles):
    inp = make_inputs(case, torch.float64, requires_grad=True)
    ref_out, ref_lse = run_reference(inp, torch.float64)
    grad_out, grad_lse = make_grad_outputs(case, torch.float64)
    ref = gradients(ref_out, ref_lse, inp.leaves(), grad_out, grad_lse)
    kw = {n: _np(t) for n, t in inp.kwargs.items()}
    bm, bn, bk, bq = tiles
    got = tile_model.mma_backward_model(_np(inp.q), _np(inp.k), _np(inp.v), _np(grad_out), _np(ref_lse),
                                        _np(grad_lse), out=_np(ref_out), block_m=bm, block_n=bn, block_keys=bk,
                                        block_q=bq, **kw)
    for name, r in ref.items():
        expected = np.zeros(tuple(inp.leaves()[name].shape)) if r is None else r.double().numpy()
        # a float32 table's reference gradient was rounded to float32
        tol = 1e-9 if r is None or r.dtype == torch.float64 else 1e-5 * (1 + np.abs(expected).max())
        assert not np.isnan(got[name]).any(), f"{name}: NaN or an element no kernel wrote"
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=tol, err_msg=name)
