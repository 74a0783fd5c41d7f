"""`outrider bench --scale` writes the keys scripts rely on, measured for real (one
repetition: this checks the contract and the bounds that hold by construction, not
speed)."""

import json

from services.cli.main import main
from services.core.draft_q import MAX_SUPPORT
from services.rpc.channels import MAX_BLOCK_BYTES


def test_scale_bench_writes_its_contract(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert main(["bench", "--scale", "--repeat", "1", "--limit", "2", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["verify_pass_vs_bare_b8_c4096"] > 0 and result["verify_pass_vs_bare_same_attention_b8_c4096"] > 0
    assert [row["context"] for row in result["verify_pass"]] == [256, 1024, 4096]
    # the pass's forward (a lean decoder's, as served) is timed apart from its host work
    assert all(0 < row["host_s_per_pass"] < row["verify_pass_s"] for row in result["verify_pass"])
    assert result["penalized_over_plain_pass_b8_c4096"] > 0 and "penalized_pass_s" in result["verify_pass"][-1]
    assert result["coupled_over_plain_pass_b8_c4096"] > 0 and "coupled_pass_s" in result["verify_pass"][-1]
    for name in ("topk50", "t1"):
        per_round = result[f"bytes_per_round_v151936_g8_{name}"]
        assert 0 < per_round <= MAX_BLOCK_BYTES  # measured on the wire
        # Rejection sampling's drafts carry q (at least a byte per support token); coupled ones none.
        assert result[f"wire_v151936_g8_{name}"]["bytes_per_draft"] > 50
        assert result[f"wire_v151936_g8_{name}_coupled"]["bytes_per_draft"] < 50
        cost = result[f"truncation_v151936_{name}"]
        assert cost["support_tokens_max"] <= MAX_SUPPORT and 0 < cost["acceptance_sent_q"] <= 1
        assert "acceptance_full_q" in result[f"truncation_bundled_{name}"]
    assert result["bytes_per_round_v151936_g8_topk50"] < 8 * 50 * 4 + 1024  # top-k 50: at most 50 support tokens a draft
    assert "wrote" in capsys.readouterr().out
