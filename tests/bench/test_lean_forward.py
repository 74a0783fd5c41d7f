"""The lean-vs-transformers A/B (services/bench/lean_forward.py) runs its four arms on
the same prompts, puts the decoders back, and reports equal tokens."""

import json
import sys

from services.bench import lean_forward


def test_one_pass_reports_every_arm_with_the_same_tokens(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def parse(text):\n    "}) + "\n")
    monkeypatch.setattr(sys, "argv", ["lean_forward", "--prompts", str(prompts), "--passes", "1",
                                      "--max-new-tokens", "8", "--gamma", "4"])
    lean_forward.main()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["pass"] == 1 and row["same_tokens"] is True
    for forward in ("lean", "transformers"):
        assert row[f"{forward}_speculative_vs_target_only"] > 0 and row[f"{forward}_draft_ms_per_token"] > 0
    assert row["target_only_lean_over_transformers"] > 0 and row["speculative_lean_over_transformers"] > 0
