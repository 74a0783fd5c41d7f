import torch
from tiny_models import hf_greedy, tiny

from services.core.proposals import Proposal
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.tree import tree_shape
from services.core.verifier import TargetVerifier, VerifyRequest


def test_a_tree_round_keeps_its_accepted_path_for_the_next_feed():
    """The accepted path (here the second root child, then its first child) is what the
    verifier's handle lists, with the moves that put its KV in place; the next round
    goes on exactly as transformers' greedy decoding."""
    model = tiny("llama", seed=0)
    verifier = TargetVerifier(TargetRunner(model))
    prompt = [3, 4, 5, 6]
    want = hf_greedy(model, prompt, 4, eos=None)
    kv = verifier.new_state()
    verifier.prefill(kv, prompt[:-1])
    wrong = (want[0] + 1) % 96
    tree = Proposal(tokens=torch.tensor([wrong, want[0], 7, want[1], 9]), tree=tree_shape((-1, -1, 0, 1, 1)))
    (outcome,) = verifier.verify([VerifyRequest(kv, prompt, tree, SamplingParams(), None)])
    assert outcome.path == (1, 3) and outcome.tokens == want[:3] and outcome.num_accepted == 2
    base = len(prompt)
    assert kv.tokens == prompt + want[:2] and kv.moves == ((base + 1, base), (base + 3, base + 1))
    (after,) = verifier.verify([VerifyRequest(kv, prompt + want[:3], Proposal.empty(), SamplingParams(), None)])
    assert after.tokens == [want[3]] and kv.moves == ()
    assert verifier.runner.sessions[kv.session].tokens == prompt + want[:3]  # the last token is fed next round


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
