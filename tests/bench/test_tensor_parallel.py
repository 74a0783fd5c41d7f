"""`outrider bench --tp`: a real TP=2 group on a local Ray cluster against TP=1, timed
(this checks what it reports, not speed)."""

import math

import pytest

from services.bench.tensor_parallel import run_tp_overhead
from services.cli.main import main


def test_the_tp_bench_times_a_real_group_against_tp1():
    lines = []
    summary = run_tp_overhead(passes=5, vocab=1024, on_row=lines.append)
    assert summary["vocab"] == 1024 and summary["passes"] == 5
    for key in ("tp2_pass_ms", "tp2_logits_back_pass_ms", "tp1_pass_ms", "control_path_ms"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    assert summary["tp2_over_tp1_ms"] == pytest.approx(summary["tp2_pass_ms"] - summary["tp1_pass_ms"])
    assert summary["logits_bytes"] == 8 * 9 * 1024 * 4
    # Acceptance on rank 0 commits what acceptance on the replica does, from the same logits.
    assert summary["rank0_same_as_logits_back"] is True
    assert len(lines) == 1 and "control path" in lines[0]


def test_the_tp_bench_runs_in_process_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--tp", "--server", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "--tp" in capsys.readouterr().err
