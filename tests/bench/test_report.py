import pytest

from services.bench.report import format_table, run_rows, summarize
from services.bench.runs import Run, leviathan_speedup
from services.core.stats import GenerationStats


def make_run(method, gamma, tokens, seconds, drafted=0, accepted=0, rounds=0, draft_s=0.0, verify_s=0.0, out=None,
             rejections=0):
    stats = GenerationStats(rounds=rounds, drafted=drafted, accepted=accepted, emitted=tokens, rejections=rejections,
                            draft_time_s=draft_s, verify_time_s=verify_s, total_time_s=seconds)
    return Run(method=method, gamma=gamma, tokens=tokens, seconds=seconds, stats=stats, outputs=out or [[1, 2]])


def test_leviathan_formula():
    # alpha = 100 accepted / (100 + 100 rejected tests) = 0.5, g = 4: E = (1 - 0.5^5) / 0.5 = 1.9375;
    # draft cost 0.1/token, verify 1.5 -> 1.9375 / 1.9
    run = make_run("outrider-draft", 4, 0, 1.0, drafted=400, accepted=100, rounds=100, rejections=100,
                   draft_s=400 * 0.1 * 0.02, verify_s=100 * 1.5 * 0.02)
    assert leviathan_speedup(run, ar_seconds_per_token=0.02) == pytest.approx(1.9375 / 1.9)


def test_summary_picks_best_and_checks_outputs():
    runs = [
        make_run("target-only", None, 100, 10.0),
        make_run("outrider-draft", 4, 100, 5.0, drafted=80, accepted=60, rounds=40, draft_s=1.0, verify_s=4.0),
        make_run("outrider-ngram", 4, 100, 8.0, drafted=80, accepted=20, rounds=80, draft_s=0.1, verify_s=7.0),
        make_run("hf-assisted", 4, 100, 6.0),
    ]
    summary = summarize(runs)
    assert summary["best_config"] == "outrider-draft gamma=4"
    assert summary["speedup_vs_ar"] == pytest.approx(2.0)
    assert summary["speedup_vs_hf"] == pytest.approx(6.0 / 5.0)
    assert summary["acceptance_rate"] == pytest.approx(0.75)
    assert summary["mean_accepted_length"] == pytest.approx(1 + 60 / 40)
    assert summary["outputs_identical"] is True
    runs[2].outputs = [[9]]
    assert summarize(runs)["outputs_identical"] is False
    assert "NO" in format_table(run_rows(runs))


def test_rows_report_the_clients_wall_clock_not_the_servers():
    runs = [make_run("target-only", None, 100, 10.0),
            make_run("outrider-draft", 4, 100, 5.0, drafted=80, accepted=60, rounds=40, draft_s=1.0, verify_s=3.0)]
    runs[1].stats.total_time_s = 4.0  # the server's own account leaves out the client's hops
    row = run_rows(runs)[1]
    assert row["tokens_per_s"] == pytest.approx(20.0) and row["speedup_vs_ar"] == pytest.approx(2.0)


def test_served_runs_get_a_pipeline_summary_and_round_breakdown():
    ar = make_run("target-only", None, 100, 10.0)
    piped = make_run("outrider-draft", 4, 100, 4.0, drafted=80, accepted=60, rounds=40, draft_s=2.0, verify_s=3.0)
    piped.stats.pipeline_rounds, piped.stats.pipeline_hits, piped.stats.exposed_draft_time_s = 39, 26, 0.5
    piped.stats.transport_time_s, piped.stats.queue_time_s = 0.2, 0.1
    serial = make_run("outrider-draft-serial", 4, 100, 5.0, drafted=80, accepted=60, rounds=40, draft_s=1.5,
                      verify_s=3.0)
    summary = summarize([ar, piped, serial])
    assert summary["pipeline_hit_rate"] == pytest.approx(26 / 39)
    assert summary["overlap"] == pytest.approx(0.75)
    assert summary["pipelining_speedup"] == pytest.approx(5.0 / 4.0)
    b = summary["round_breakdown_ms"]
    assert b["total"] == pytest.approx(100.0) and b["verify"] == pytest.approx(75.0)
    assert b["draft_exposed"] + b["transport"] + b["queue"] + b["verify"] + b["other"] == pytest.approx(b["total"])


def test_rows_compare_outputs_with_target_only_at_the_same_concurrency():
    # Each level runs its own prompts: 16 streams' outputs are not the single stream's.
    runs = [make_run("target-only x1", None, 10, 1.0, out=[[1]]), make_run("outrider-draft x1", 8, 10, 0.5, out=[[1]]),
            make_run("target-only x16", None, 20, 1.0, out=[[1], [2]]),
            make_run("outrider-draft x16", 8, 20, 0.5, out=[[1], [2]])]
    for run, n in zip(runs, (1, 1, 16, 16)):
        run.concurrency = n
    assert [row["identical_to_target_only"] for row in run_rows(runs)] == [True] * 4
    runs[3].outputs = [[1], [3]]
    assert [row["identical_to_target_only"] for row in run_rows(runs)] == [True, True, True, False]
