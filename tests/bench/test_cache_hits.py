"""services/bench/cache_hits.py on the bundled pair, briefly: it measures real sessions
(this checks what it reports, not the rates)."""

import json

from services.bench.cache_hits import main


def test_the_cache_hit_bench_reports_every_config(tmp_path):
    out = tmp_path / "hits.json"
    assert main([str(out), "--temperatures", "1.0", "--fanouts", "4", "--prompts", "1", "--max-new-tokens", "12",
                 "--threads", "1"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["fanout"], r["coupled"]) for r in rows] == [(4, True), (4, False)]
    for row in rows:
        assert row["tokens"] == 12 and 0 < row["pipeline_rounds"] <= row["rounds"]
        assert row["cache_hits"] == row["cache_hits_full"] + row["cache_hits_partial"] <= row["pipeline_rounds"]
        assert row["hit_rate"] == row["cache_hits"] / row["pipeline_rounds"]
