"""Tests of the positional-encoding workbench (python -m relattn.workbench)."""
import csv
import json

import pytest
import torch

from relattn import workbench
from relattn.workbench import NA_TABLE_TOO_SHORT, ShiftTask, WindowTask

TINY = ["--steps", "3", "--length", "8", "--layers", "2", "--d-model", "16", "--heads", "2",
        "--eval-sequences", "16", "--no-progress"]


def test_window_task_targets():
    task = WindowTask(vocab_size=4, window=2)
    tokens = torch.tensor([[0, 1, 0, 2, 3, 2, 1, 1]])
    # 0 at 0 and 2 (distance 2); 2 at 3 and 5; 1 at 6 and 7; the 1 at 1 is 5 away from the next 1.
    assert task.targets(tokens).tolist() == [[1, 0, 1, 1, 0, 1, 1, 1]]
    assert task.targets(torch.tensor([[3]])).tolist() == [[0]]
    tokens, targets = task.sample(5, 11, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (5, 11) and int(tokens.max()) < 4
    # Labels depend only on the distance: the rule is the same at every length.
    assert torch.equal(task.targets(tokens)[:, :6], task.targets(tokens[:, :8])[:, :6])


def test_shift_task_targets():
    task = ShiftTask(vocab_size=5, shift=2)
    tokens = torch.tensor([[4, 3, 2, 1, 0]])
    assert task.targets(tokens).tolist() == [[-100, -100, 4, 3, 2]]
    assert task.targets(torch.tensor([[1, 2]])).tolist() == [[-100, -100]]


def test_evaluate_reports_na_beyond_learned_table():
    task = WindowTask()
    model = workbench.build_model("learned", task, d_model=16, nhead=2, num_layers=1, train_length=8)
    assert model.max_length() == 8
    assert workbench.evaluate(model, task, length=16, num_sequences=4) is None
    accuracy = workbench.evaluate(model, task, length=8, num_sequences=4)
    assert 0.0 <= accuracy <= 1.0
    relative = workbench.build_model("alibi", task, d_model=16, nhead=2, num_layers=1, train_length=8)
    assert relative.max_length() is None
    assert workbench.evaluate(relative, task, length=32, num_sequences=4) is not None


def test_workbench_smoke(tmp_path, capsys):
    out = tmp_path / "wb"
    results = workbench.main(TINY + ["--schemes", "learned,shaw,t5,alibi", "--out", str(out)])
    printed = capsys.readouterr().out
    assert NA_TABLE_TOO_SHORT in printed and "acc@32" in printed

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["scheme"] for r in rows] == ["learned", "shaw", "t5", "alibi"]
    learned = rows[0]
    assert learned["acc@16"] == learned["acc@32"] == NA_TABLE_TOO_SHORT
    assert 0.0 <= float(learned["acc@8"]) <= 1.0
    for row in rows[1:]:
        assert all(0.0 <= float(row[f"acc@{n}"]) <= 1.0 for n in (8, 16, 32))
    assert results[0]["accuracy"][8] == pytest.approx(float(learned["acc@8"]), abs=1e-3)
    assert results[0]["accuracy"][16] is None and results[0]["accuracy"][32] is None

    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["device"] == "cpu"


def test_workbench_is_deterministic(tmp_path):
    args = TINY + ["--schemes", "sinusoidal,clip_bias", "--task", "shift", "--factors", "1,2"]
    first = workbench.main(args + ["--out", str(tmp_path / "a")])
    second = workbench.main(args + ["--out", str(tmp_path / "b")])
    for a, b in zip(first, second):
        assert a["losses"] == b["losses"]
        assert a["accuracy"] == b["accuracy"]


def test_workbench_restores_threads(tmp_path):
    threads = torch.get_num_threads()
    workbench.main(TINY + ["--schemes", "none", "--factors", "1", "--threads", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads


def test_workbench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        workbench.parse_args(["--schemes", "rope"])
    with pytest.raises(SystemExit):
        workbench.parse_args(["--d-model", "30", "--heads", "4"])
    with pytest.raises(SystemExit):
        workbench.parse_args(["--factors", "1,0"])
    assert workbench.parse_args([]).schemes == list(workbench.DEFAULT_SCHEMES)
