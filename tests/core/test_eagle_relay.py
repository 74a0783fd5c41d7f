"""The verifier's part of EAGLE on a draft worker: features fused once, each row sent
once, and a window of the latest kept for a reopened stream."""

import torch

from services.core.eagle_proposer import EagleTree
from services.core.eagle_relay import EagleFeatureRelay, FeatureLog


def rows(start: int, n: int) -> torch.Tensor:
    """Rows whose value is their position: [n, 2]."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, 2).clone()


def test_each_row_is_sent_once_and_a_snapshot_is_the_latest_window():
    log = FeatureLog(window=5)
    log.add(0, rows(0, 3))
    log.add(3, rows(3, 2))
    start, sent = log.take_unsent()
    assert start == 0 and sent[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert log.take_unsent() is None
    log.add(5, rows(5, 4))
    start, kept = log.snapshot()  # a reopened stream: the last 5 positions, and nothing left unsent
    assert start == 4 and kept[:, 0].tolist() == [4, 5, 6, 7, 8]
    assert log.take_unsent() is None
    log.add(9, rows(9, 1))
    assert log.take_unsent()[1][:, 0].tolist() == [9] and log.kept <= 5 + 4  # whole pieces beyond the window go


def test_a_gap_starts_the_log_afresh():
    log = FeatureLog(window=8)
    log.add(0, rows(0, 3))
    log.add(10, rows(10, 2))  # a prefix served from cache: features only past it
    start, sent = log.take_unsent()
    assert start == 10 and sent[:, 0].tolist() == [10, 11]
    assert log.snapshot()[0] == 10


def test_the_relay_fuses_and_drafts_nothing():
    fc = torch.nn.Linear(6, 2, bias=False)
    relay = EagleFeatureRelay(fc, "layers:0,1,2", EagleTree(4, 1, 4))
    state = relay.new_state()
    hidden = torch.randn(3, 6)
    relay.observe(state, 7, hidden)
    start, sent = state.take_unsent()
    assert start == 7 and torch.allclose(sent, fc(hidden))
    assert len(relay.propose(state, list(range(11)), 4, None)) == 0
    assert relay.max_nodes == 4 and relay.tree.is_chain
