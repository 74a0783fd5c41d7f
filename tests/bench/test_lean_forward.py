"""The lean-vs-transformers A/B (services/bench/lean_forward.py) runs its arms on the
same prompts (target-only, the draft model and Medusa heads, whose hidden states the
lean decoder keeps), puts the decoders back, and reports equal tokens."""

import json
import sys

from services.bench import lean_forward


def test_one_pass_reports_every_arm_with_the_same_tokens(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def parse(text):\n    "}) + "\n")
    monkeypatch.setattr(sys, "argv", ["lean_forward", "--prompts", str(prompts), "--passes", "1",
                                      "--max-new-tokens", "8", "--gamma", "4", "--drafters", "draft,medusa"])
    lean_forward.main()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["pass"] == 1 and row["same_tokens"] is True
    for forward in ("lean", "transformers"):
        for name in ("speculative", "medusa"):
            assert row[f"{forward}_{name}_vs_target_only"] > 0 and row[f"{forward}_{name}_draft_ms_per_token"] > 0
    for name in ("target_only", "speculative", "medusa"):
        assert row[f"{name}_lean_over_transformers"] > 0
