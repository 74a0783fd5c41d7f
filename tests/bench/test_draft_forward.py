"""The lean-vs-transformers draft A/B (services/bench/draft_forward.py) runs both arms
on the same prompts, puts the decoder back, and reports equal tokens."""

import json
import sys

from services.bench import draft_forward


def test_one_pass_reports_both_arms_with_the_same_tokens(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def parse(text):\n    "}) + "\n")
    monkeypatch.setattr(sys, "argv", ["draft_forward", "--prompts", str(prompts), "--passes", "1",
                                      "--max-new-tokens", "8", "--gamma", "4"])
    draft_forward.main()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["pass"] == 1 and row["same_tokens"] is True
    for arm in ("lean", "transformers"):
        assert row[f"{arm}_vs_target_only"] > 0 and row[f"{arm}_draft_ms_per_token"] > 0
