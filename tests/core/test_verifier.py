import pytest
import torch
from tiny_models import tiny

from services.core.kv import KVState
from services.core.proposals import Proposal
from services.core.sampling import SamplingParams
from services.core.verifier import TargetVerifier, VerifyRequest


def test_verifier_refuses_tree_proposals_without_touching_state():
    model = tiny("llama", seed=0)
    kv = KVState.empty(model)
    tree = Proposal(tokens=torch.tensor([1, 2]), parents=torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="tree"):
        TargetVerifier(model).verify([VerifyRequest(kv, [3, 4], tree, SamplingParams(), None)])
    assert kv.tokens == []


def test_verify_batch_handles_each_sequence_independently():
    model = tiny("llama", seed=0)
    verifier = TargetVerifier(model)
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5]]
    kvs = [verifier.new_state() for _ in prompts]
    greedy_next = [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    proposals = [Proposal(tokens=torch.tensor([greedy_next[0], 2])), Proposal(tokens=torch.tensor([(greedy_next[1] + 1) % 96]))]
    outcomes = verifier.verify([VerifyRequest(kv, p, prop, SamplingParams(), None)
                                for kv, p, prop in zip(kvs, prompts, proposals)])
    assert outcomes[0].num_accepted >= 1 and outcomes[0].tokens[0] == greedy_next[0]
    assert outcomes[1].num_accepted == 0 and outcomes[1].tokens == [greedy_next[1]]
    # Each cache holds its committed prefix plus its accepted drafts.
    assert kvs[0].tokens == prompts[0] + outcomes[0].tokens[: outcomes[0].num_accepted]
    assert kvs[1].tokens == prompts[1]
