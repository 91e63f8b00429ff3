"""bench/gpu_bench.py's logic on the CPU: the benchmark has not run on a GPU yet, and its first run is a few
minutes of a lent H100, so what can be checked here is checked here. Above all the independent check of
every run: its float32 reference must agree with the relattn op (and the eager baselines) on every scheme,
mode and masking, and a wrong result must come out as a MISMATCH that counts for no target."""
import importlib.util
from pathlib import Path

import pytest
import torch

import relattn

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu_bench.py"
_spec = importlib.util.spec_from_file_location("gpu_bench", _PATH)
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)


def _bench():
    return gb.Bench(gb.parse_args([]), device="cpu")


def _run(bench, x, scheme, impl, causal, mode):
    xm = bench.for_mode(x, mode)
    fn = bench.fn(scheme, impl, xm, causal) if mode == "fwd" else bench.train_fn(scheme, impl, xm, causal)
    return fn()


def _check(bench, x, scheme, impl, causal, mode):
    """What gpu_bench's run_one computes for the check: the relative error of the run against the reference."""
    kept = gb.summarize(_run(bench, x, scheme, impl, causal, mode), mode)
    ref = bench.reference(scheme, bench.for_mode(bench.check_slice(x), mode), causal, mode)
    slice_grads = {}
    if mode == "fwdbwd" and gb.TRAINED_TABLES[scheme]:
        grads = _run(bench, bench.check_slice(x), scheme, impl, causal, mode)[1]
        slice_grads = {n: grads[n] for n in gb.TRAINED_TABLES[scheme]}
    return kept, slice_grads, ref


@pytest.mark.parametrize("mode", gb.MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scheme", gb.SCHEMES)
def test_reference_agrees_with_relattn(scheme, causal, mode):
    """The float32 reference of the check's slice (batch 0, heads 0-1) against relattn's bf16 CPU op on the
    whole input (3 heads, 2 batch rows; L = 150 > the clipping distance 64, so far buckets are used): well
    inside CHECK_TOL. A planted error (the value term or dq off by 20%) is a MISMATCH."""
    torch.manual_seed(0)
    bench = _bench()
    x = bench.inputs(2, 3, 150, 32)
    kept, slice_grads, ref = _check(bench, x, scheme, "relattn", causal, mode)
    err = gb.check_error(kept, slice_grads, ref)
    assert err < gb.CHECK_TOL / 3, err
    assert set(ref) == {"out"} | ({"q", "k", "v", *gb.TRAINED_TABLES[scheme]} if mode == "fwdbwd" else set())
    wrong = dict(kept, out=kept["out"] * 1.2)
    assert gb.check_error(wrong, slice_grads, ref) > gb.CHECK_TOL
    if mode == "fwdbwd":
        assert gb.check_error(dict(kept, q=kept["q"] * 1.2), slice_grads, ref) > gb.CHECK_TOL
        for name, g in slice_grads.items():
            assert gb.check_error(kept, dict(slice_grads, **{name: g * 1.2}), ref) > gb.CHECK_TOL


@pytest.mark.parametrize("mode", gb.MODES)
@pytest.mark.parametrize("impl", ["naive", "sdpa_bias", "sdpa_default"])
def test_eager_baselines_pass_the_check(impl, mode):
    """The baselines that run on the CPU compute what relattn computes (T5 bias; plain for SDPA)."""
    if impl == "sdpa_default" and mode == "fwdbwd":
        pytest.skip("sdpa_default runs in fwd mode only")
    scheme = "plain" if impl == "sdpa_default" else "t5"
    bench = _bench()
    x = bench.inputs(1, 2, 100, 32)
    for causal in (False, True):
        kept, slice_grads, ref = _check(bench, x, scheme, impl, causal, mode)
        assert gb.check_error(kept, slice_grads, ref) < gb.CHECK_TOL / 3
        mine = gb.summarize(_run(bench, x, scheme, "relattn", causal, mode), mode)
        err, table_err = gb.compare(kept, mine)
        assert float(err) < 0.05 and (table_err == "" or float(table_err) < 0.02)


def _row(mode, scheme, impl, ms, status="ok", causal=False):
    return dict(mode=mode, shape=gb.TARGET_SHAPE, causal=causal, scheme=scheme, impl=impl, ms=f"{ms}",
                status=status)


def test_targets_count_no_mismatched_run():
    rows = [_row("fwd", "plain", "sdpa_flash", 1.0), _row("fwd", "shaw_kv", "relattn", 1.2),
            _row("fwd", "plain", "relattn", 1.0, status="MISMATCH (check 0.2 > 0.05)")]
    results = {t[0][0]: t for t in gb.target_results(rows, [gb.TARGET_SHAPE])}
    assert results["shaw_kv_fwd_vs_sdpa_flash"][6] is True  # 1 / 1.2 = 0.83 >= 0.7
    assert results["plain_fwd_vs_sdpa_flash"][5:] == (None, None, True)
    text = "\n".join(gb.target_lines(rows, [gb.TARGET_SHAPE]))
    assert "not measured (a MISMATCH: see check)" in text and "| MISMATCH |" in text


def test_plan_puts_the_targets_first_and_flex_last():
    args = gb.parse_args([])
    runs = gb.plan(args)
    first = {(m, s, i) for m, _, _, s, i in runs[:2 * len(gb.TARGET_RUNS)]}
    assert first == set(gb.TARGET_RUNS)
    impls = [r[4] for r in runs[2 * len(gb.TARGET_RUNS):]]  # after the targets: the tiers, FlexAttention last
    assert impls.index("flex") > max(i for i, impl in enumerate(impls) if impl in gb.DROPOUT_IMPLS)
    assert all(impl == "flex" for impl in impls[impls.index("flex"):])
    assert len(runs) == len(set(runs))
    B, H, L, D = gb.SHAPES[gb.TARGET_SHAPE]
    assert gb.flops(B, H, L, D, False) == 4 * B * H * L * L * D
    assert gb.flops(B, H, L, D, True, "fwdbwd") == 3.5 * 4 * B * H * L * L * D / 2


def test_dry_run_needs_no_gpu(capsys):
    assert gb.main(["--dry-run", "--quick"]) == 0
    assert "targets:" in capsys.readouterr().out


def test_reference_uses_relattns_own_buckets():
    """The reference builds the per-pair buckets from the same tables the op gets (a shared helper would hide
    a bug in both): a T5 table of its own makes the check fail."""
    bench = _bench()
    x = bench.inputs(1, 2, 100, 32)
    kept, _, ref = _check(bench, x, "t5", "relattn", False, "fwd")
    other = dict(x, t5_buckets=relattn.t5_buckets(32, 16, True))
    ref_other = bench.reference("t5", bench.for_mode(bench.check_slice(other), "fwd"), False, "fwd")
    assert gb.check_error(kept, {}, ref) < gb.CHECK_TOL / 3 < gb.check_error(kept, {}, ref_other)


_FAKE_PYTHON = r"""#!/bin/bash
# python3 for bench/gpu_check.sh without a GPU: canned answers to its queries, fakes for the steps
case "$1" in
  -c) case "$2" in
        *cmake_prefix_path*) echo /nonexistent/torch/share/cmake;;
        *get_device_capability*) echo 90;;
        *) echo "2.0.0+fake cuda 13.0";;
      esac;;
  -) cat > /dev/null; echo "fake smoke";;
  -m) echo "tests/python/test_cuda.py::test_one PASSED [100%]"; sleep "${FAKE_PYTEST_S:-0}"; echo "1 passed";;
  bench/gpu_sanitize_case.py) echo "gpu_sanitize_case: call 1: fake"; echo "gpu_sanitize_case: all calls finished";;
  bench/gpu_bench.py)
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    printf 'commit\n' > "$out/bench.csv"; printf '# bench\n## All runs\n' > "$out/bench.md"; : > "$out/bench.png";;
esac
"""


def _fake_check(tmp_path, **env):
    """bench/gpu_check.sh run in a copy of bench/ with fake cmake, nvidia-smi, compute-sanitizer and python:
    its own logic (steps, time limits, reserves, the summary, the files in $OUT) without a GPU."""
    import os
    import shutil
    import subprocess

    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    shutil.copy(_PATH.parent / "gpu_check.sh", root / "bench")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"cmake": 'echo "fake cmake $*"', "nvidia-smi": 'echo "NVIDIA H100 80GB HBM3"',
             "compute-sanitizer": 'shift 6; "$@"; echo "========= ERROR SUMMARY: 0 errors"',
             "python3": _FAKE_PYTHON}
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(body if body.startswith("#!") else "#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    out = tmp_path / "out"
    run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), RELATTN_COMMIT="test",
                   PYTHON="python3", **env)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, env=run_env, capture_output=True, text=True,
                          timeout=300)
    return proc, out


def test_gpu_check_script_runs_every_step_and_writes_its_files(tmp_path):
    proc, out = _fake_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for step in ("build", "smoke", "pytest-cuda", "sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-synccheck",
                 "sanitizer-initcheck", "bench"):
        assert f"| {step} | ok (rc=0" in summary, (step, summary)
    assert "memcheck: last call started 1:" in summary and "tests passed (per-test lines): 1" in summary
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["gpu_check.log", "summary.md", "build.log", "pytest.log", "sanitizer.log", "bench.csv",
                            "bench.md", "bench.png"])  # the device tool brings back at most 8 files


def test_gpu_check_script_keeps_time_for_the_later_steps(tmp_path):
    """A pytest run that would take the whole budget is cut at its share: the sanitizers and the benchmark
    still run (scaled-down budget and reserves)."""
    proc, out = _fake_check(tmp_path, RELATTN_CHECK_BUDGET_S="70", RELATTN_CHECK_BENCH_RESERVE_S="40",
                            RELATTN_CHECK_SANITIZER_RESERVE_S="8", FAKE_PYTEST_S="100")
    summary = (out / "summary.md").read_text()
    assert "| pytest-cuda | TIMEOUT (rc=124" in summary, summary
    assert "| sanitizer-memcheck | ok (rc=0" in summary and "| bench | ok (rc=0" in summary, summary
    assert "test_cuda.py::test_one PASSED" in (out / "pytest.log").read_text()  # what ran before the cut
