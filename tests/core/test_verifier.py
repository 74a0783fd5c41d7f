import pytest
import torch
from tiny_models import tiny

from services.core.proposals import Proposal
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier, VerifyRequest


def test_verifier_refuses_tree_proposals_without_touching_state():
    model = tiny("llama", seed=0)
    verifier = TargetVerifier(TargetRunner(model))
    kv = verifier.new_state()
    tree = Proposal(tokens=torch.tensor([1, 2]), parents=torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="tree"):
        verifier.verify([VerifyRequest(kv, [3, 4], tree, SamplingParams(), None)])
    assert kv.tokens == [] and verifier.runner.sessions == {}


def test_verify_batch_handles_each_sequence_independently():
    model = tiny("llama", seed=0)
    verifier = TargetVerifier(TargetRunner(model))
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5]]
    kvs = [verifier.new_state() for _ in prompts]
    greedy_next = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    proposals = [Proposal(tokens=torch.tensor([greedy_next[0], 2])), Proposal(tokens=torch.tensor([(greedy_next[1] + 1) % 96]))]
    outcomes = verifier.verify([VerifyRequest(kv, p, prop, SamplingParams(), None)
                                for kv, p, prop in zip(kvs, prompts, proposals)])
    assert outcomes[0].num_accepted >= 1 and outcomes[0].tokens[0] == greedy_next[0]
    assert outcomes[1].num_accepted == 0 and outcomes[1].tokens == [greedy_next[1]]
    # The runner caches each prompt plus all its drafts until the next feed says what to keep.
    for kv, prompt, proposal in zip(kvs, prompts, proposals):
        assert kv.tokens == prompt + proposal.tokens.tolist()
        assert verifier.runner.sessions[kv.session].tokens == kv.tokens
    verifier.release(kvs)
    assert verifier.runner.sessions == {}


def test_rows_of_one_batched_output_are_viewed_not_copied():
    from services.core.verifier import as_batch

    out = torch.randn(3, 5, 7)  # [B, window, V]
    rows = [out[i, 1:5] for i in range(3)]
    batch = as_batch(rows)
    assert batch.data_ptr() == rows[0].data_ptr() and torch.equal(batch, out[:, 1:5])
    uneven = [out[0, 1:5], out[1, 3:5], out[2, 1:5]]  # a row that drafted less: padded copy
    padded = as_batch(uneven)
    assert torch.equal(padded[1, :2], out[1, 3:5]) and torch.equal(padded[2], out[2, 1:5])
