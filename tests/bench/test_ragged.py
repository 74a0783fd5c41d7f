"""The padded-vs-packed pass bench (services/bench/ragged.py) times both layouts on the
same feeds and checks that they give the same logits."""

import sys

from services.bench import ragged


def test_it_reports_every_draft_count_and_equal_logits(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ragged", "--sessions", "4", "--context", "20", "--drafts", "0,3",
                                      "--repeats", "1"])
    ragged.main()
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[2:4]]
    assert [int(r[0]) for r in rows] == [0, 3] and [int(r[2]) for r in rows] == [4, 16]  # padded rows: 4 x (d + 1)
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert lines[-1] == "same logits, packed and padded: yes"


def test_with_a_tree_the_drafting_sessions_verify_its_pruned_shape(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ragged", "--sessions", "4", "--context", "20", "--drafts", "1,2",
                                      "--tree", "0;1;0.0;0.1;1.0", "--repeats", "1"])
    ragged.main()
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[2:4]]
    # one session drafts: depth 1, 2 nodes (4 + 2 real rows, 4 x 3 padded); depth 2, all 5 (4 + 5, 4 x 6)
    assert [(int(r[1]), int(r[2])) for r in rows] == [(6, 12), (9, 24)]
    assert lines[-1] == "same logits, packed and padded: yes"
