"""Merging several drafters' proposals into one token tree (core/multi_draft.py): the
merge rule, and a statistical proof that the merged tree, accepted by the tree sampler,
emits the target's adjusted distribution at every depth.

As in test_tree_accept.py, every row of one big batch is an independent trial whose
targets depend only on depth; each drafter's q depends only on depth too. Each row
draws its own drafts, so rows merge to different trees: duplicates merged, sampled
duplicates kept as ghosts, other drafters' subtrees joined under a shared node.
"""

import numpy as np
import pytest
import torch
from distribution import ALPHA, chi2_pvalue, has_power
from tiny_models import QWEN2_VOCAB, hf_greedy, noisy_copy, qwen2_real_shape, random_heads, tiny

from services.core.draft_q import compact
from services.core.engine import SpeculativeEngine
from services.core.errors import InvalidRequest
from services.core.gamma import GammaSchedule
from services.core.head_proposers import MedusaProposer
from services.core.multi_draft import (TreeProposer, lookup_budget, merge_proposals, merge_trees, one_hot, point_masses,
                                       tree_members, with_branches)
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.suffix import SuffixProposer
from services.core.target import FINAL, TargetRunner
from services.core.tree import choice_tree, parse_choices, tree_shape
from services.core.verifier import TargetVerifier
from services.core.proposals import DraftAlternatives, Proposal
from services.core.rejection import DraftBatch, Randomness
from services.core.sampling import SamplingParams, SamplingRows, adjusted_probs
from services.core.tree_accept import TreeBatch, accept_tree_batch

V = 8
ROWS = 70_000  # per sampled config
CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9),
]


def test_point_mass_duplicates_merge_and_their_children_join():
    # Input 0: chain 5 -> 6; input 1 (point masses): chain 5 -> 7 -> 8.
    kept, parents = merge_trees([5, 6, 5, 7, 8], [-1, 0, -1, 2, 3], [False, False, True, True, True])
    assert kept == [0, 1, 3, 4] and parents == [-1, 0, 0, 2]


def test_a_sampled_duplicate_stays_as_a_ghost_leaf_and_its_subtree_goes():
    kept, parents = merge_trees([5, 6, 5, 7], [-1, 0, -1, 2], [True, True, False, False])
    assert kept == [0, 1, 2] and parents == [-1, 0, -1]  # node 2 (a ghost 5) has no children


def test_merge_keeps_the_first_inputs_children_first_and_q_rows_with_their_nodes():
    q = compact(torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1))
    sampled = Proposal(tokens=torch.tensor([3]), draft_q=q)
    lookup = Proposal(tokens=torch.tensor([4, 3, 1]))  # a point-mass chain
    merged = merge_proposals([sampled, lookup])
    assert merged.tokens.tolist() == [3, 4, 3, 1] and merged.tree.parents == (-1, -1, 1, 2)
    assert point_masses(merged.draft_q, 4) == [False, True, True, True]
    assert torch.equal(merged.draft_q.dense()[0], q.dense()[0])
    assert torch.equal(merged.draft_q.dense()[1], one_hot(4, V).dense()[0])


def test_a_single_chain_is_left_as_it_is():
    chain = Proposal(tokens=torch.tensor([1, 2, 3]))
    assert merge_proposals([chain, Proposal.empty()]) is chain


def test_branches_add_the_runner_up_at_every_depth():
    chain = Proposal(tokens=torch.tensor([5, 6, 7]),
                     alternatives=DraftAlternatives(torch.tensor([[5, 9, 1], [6, 5, 2], [3, 7, 4]]), torch.rand(3, 3)))
    tree = with_branches(chain, 2)
    # Depth 3's top candidate 3 differs from the sampled 7, so both its top two join.
    assert tree.tokens.tolist() == [5, 6, 7, 9, 5, 3]
    assert tree.tree.parents == (-1, 0, 1, -1, 0, 1)
    assert with_branches(chain, 1) is chain


def _drafts(kind: str, depth: int, gen: torch.Generator, q: list[torch.Tensor], n: int) -> tuple[np.ndarray, bool]:
    """n rows of one drafter's chain of ``depth`` tokens: sampled from q[d] at depth d,
    or a fixed candidate (a point mass)."""
    if kind == "sampled":
        return torch.stack([torch.multinomial(q[d], n, replacement=True, generator=gen) for d in range(depth)], 1).numpy(), False
    rank = int(kind[-1])  # "fixed0": each depth's likeliest draft token; "fixed1": its runner-up
    return np.tile(np.array([int(q[d].argsort(descending=True)[rank]) for d in range(depth)]), (n, 1)), True


def _multi_draft_round(drafters: list[str], depth: int, cfg: SamplingParams, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(depth + 1, V, generator=g)  # p_d after any node at depth d
    qs = {}
    for k, kind in enumerate(drafters):  # each drafter its own q per depth
        logits = target_logits[:depth] + 0.9 * torch.randn(depth, V, generator=g)
        qs[k] = [adjusted_probs(logits[d], cfg) for d in range(depth)]
    drafts = [_drafts(kind, depth, g, qs[k], ROWS) for k, kind in enumerate(drafters)]
    chain_parents = list(range(-1, depth - 1))
    trees, N = [], 0
    for b in range(ROWS):
        tokens, parents, point, q_rows = [], [], [], []
        for k, (rows, fixed) in enumerate(drafts):
            start = len(tokens)
            tokens += rows[b].tolist()
            parents += [-1 if p < 0 else start + p for p in chain_parents]
            point += [fixed] * depth
            q_rows += [(k, d) for d in range(depth)]
        kept, merged = merge_trees(tokens, parents, point)
        trees.append(([tokens[i] for i in kept], merged, [None if point[i] else q_rows[i] for i in kept]))
        N = max(N, len(kept))
    tok = torch.zeros(ROWS, N, dtype=torch.long)
    q_probs = torch.zeros(ROWS, N, V)
    shapes, sizes = [], []
    for b, (tokens, parents, q_rows) in enumerate(trees):
        tok[b, : len(tokens)] = torch.tensor(tokens)
        for i, (token, row) in enumerate(zip(tokens, q_rows)):
            q_probs[b, i] = qs[row[0]][row[1]] if row is not None else torch.nn.functional.one_hot(torch.tensor(token), V)
        shapes.append(tree_shape(tuple(parents)))
        sizes.append(len(tokens))
    batch = DraftBatch(tok, torch.tensor(sizes), torch.arange(V).expand(ROWS, N, V), q_probs, torch.zeros(ROWS, N))
    node_depth = torch.zeros(ROWS, N + 1, dtype=torch.long)
    for b, shape in enumerate(shapes):
        node_depth[b, 1 : len(shape) + 1] = shape.depth
    logits = target_logits[node_depth]  # [B, N+1, V]
    rand = Randomness(uniforms=torch.rand(ROWS, N, generator=g), final=torch.rand(ROWS, generator=g))
    out = accept_tree_batch(logits, batch, TreeBatch.of(shapes, sizes, "cpu"), SamplingRows.of([cfg] * ROWS, V, "cpu"), rand)
    return out.numpy(), tok.numpy(), adjusted_probs(target_logits, cfg).numpy()


@pytest.mark.parametrize("drafters,depth,cfg", [
    (["sampled", "sampled"], 2, CONFIGS[0]),
    (["sampled", "fixed0", "fixed1"], 3, CONFIGS[1]),
    (["sampled", "sampled", "fixed0"], 2, CONFIGS[2]),
    (["sampled", "sampled", "sampled", "fixed0"], 1, CONFIGS[3]),
    (["fixed0", "sampled", "sampled"], 2, CONFIGS[0]),  # a point mass first: still lossless, if less often accepted
])
def test_merged_trees_emit_the_target_distribution_at_every_depth(drafters, depth, cfg):
    out, tokens, p = _multi_draft_round(drafters, depth, cfg)
    n, final, path = out[:, 0], out[:, 1], out[:, 2:]
    rng = np.random.default_rng(0)
    tested = []
    for j in range(depth + 1):
        reached = n >= j
        if not has_power(int(reached.sum()), p[j], rng):
            continue
        on_path = path[reached, min(j, depth - 1)]
        emitted = np.where(n[reached] > j, tokens[reached, np.maximum(on_path, 0)], final[reached])
        assert chi2_pvalue(emitted, p[j]) > ALPHA, f"depth {j}"
        tested.append(j)
    assert tested[:2] == [0, 1], f"tested depths {tested}"


# -- the tree drafter in the engine -------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [3], [11, 12, 11, 12, 11, 12, 40, 41]]


@pytest.fixture(scope="module")
def models():
    target = tiny("llama", seed=0)
    return target, noisy_copy(target, 1, 0.6)


def _engine(target, proposer, gamma, max_context=256):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target)), proposer, None, max_context, GammaSchedule(gamma))


@pytest.mark.parametrize("members", [("draft", "suffix"), ("draft", "suffix", "ngram"), ("suffix", "ngram")])
@pytest.mark.parametrize("gamma", [2, 5])
def test_greedy_tree_decoding_is_transformers_greedy(models, members, gamma):
    target, draft = models
    make = {"draft": lambda: DraftModelProposer(draft), "suffix": SuffixProposer, "ngram": NgramProposer}
    eng = _engine(target, TreeProposer([make[m]() for m in members]), gamma)
    branched = 0
    for prompt in PROMPTS:
        result = eng.generate(prompt, 40)
        assert result.token_ids == hf_greedy(target, prompt, 40, eos=None)
        branched += sum(result.stats.accepted_per_rank[1:])
    if members[0] == "draft":
        assert branched > 0  # paths through another drafter's node or a runner-up leaf


def test_a_tree_with_heads_on_the_verifier_passes_them_the_hidden_states(models):
    """draft + Medusa heads + suffix: the tree reads the target's hidden states as its
    head member does, and greedy output is unchanged."""
    target, draft = models
    heads = MedusaProposer(random_heads(target, seed=1, num_heads=3), choice_tree(parse_choices("0;1;0.0;0.0.0")))
    tree = TreeProposer([DraftModelProposer(draft), heads, SuffixProposer()])
    assert tree.uses_target_hidden and tree.target_hidden == FINAL
    eng = _engine(target, tree, 4)
    for prompt in PROMPTS:
        assert eng.generate(prompt, 40).token_ids == hf_greedy(target, prompt, 40, eos=None)
    with pytest.raises(ValueError, match="one kind of heads"):
        TreeProposer([heads, heads])


def test_lookups_reach_past_the_chain_within_the_budget(models):
    target, _ = models
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16] * 3  # the target continues it; a lookup matches far
    seq_tree = TreeProposer([DraftModelProposer(tiny("llama", seed=5, layers=1)), SuffixProposer()])
    eng = _engine(target, seq_tree, gamma=2)
    result = eng.generate(prompt, 30)
    assert result.token_ids == hf_greedy(target, prompt, 30, eos=None)
    assert 2 < len(result.stats.acceptance_per_position) <= lookup_budget(2, 30) == 4  # deeper than the chain


def test_sampled_tree_decoding_runs_with_draft_q_and_point_masses(models):
    """Sampled draft model first, lookups' and runner-ups' point masses after it: the
    merged proposal carries q' for every node (the statistical tests above prove it exact)."""
    target, draft = models
    fresh = lambda: _engine(target, TreeProposer([DraftModelProposer(draft), SuffixProposer(), NgramProposer()]), 4)  # noqa: E731
    eng = fresh()
    seen = []
    for seed in range(3):
        result = eng.generate(PROMPTS[0] * 2, 30, SamplingParams(temperature=0.8, top_k=20, seed=seed))
        assert len(result.token_ids) == 30 and result.stats.drafted > 0
        seen.append(result.token_ids)
    assert len({tuple(s) for s in seen}) > 1
    # A seed reproduces given the same drafts: a fresh suffix index (the used one has
    # learned the outputs since, so it proposes other trees, equally exact).
    assert fresh().generate(PROMPTS[0] * 2, 30, SamplingParams(temperature=0.8, top_k=20, seed=0)).token_ids == seen[0]


def test_a_tree_names_distinct_drafters_with_the_draft_model_first():
    assert tree_members(None) == ["draft", "suffix"] and tree_members("draft, ngram,suffix") == ["draft", "ngram", "suffix"]
    assert tree_members("draft,mtp,suffix") == ["draft", "mtp", "suffix"]
    for bad in ("suffix,draft", "draft,draft", "draft,medusa,eagle", "draft,beam", ","):
        with pytest.raises(InvalidRequest, match="draft model first"):
            tree_members(bad)


def test_real_shapes_greedy_and_sampled():
    """A Qwen2-shaped target with 151,936 tokens (GQA) and a 3,000-token prompt in its
    4k context, drafted by a noisy copy and suffix lookups: greedy is target-only
    decoding; sampled (the draft's q' beside the lookups' point masses), a seed
    reproduces with the same drafts."""
    target = qwen2_real_shape()
    draft = noisy_copy(target, 1, 0.3)
    block = torch.randint(0, QWEN2_VOCAB, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    prompt = block * 10  # lookups find the continuation
    make = lambda: _engine(target, TreeProposer([DraftModelProposer(draft), SuffixProposer()]), 4, 4096)  # noqa: E731
    eng = make()
    greedy = eng.generate(prompt, 24)
    assert greedy.token_ids == hf_greedy(target, prompt, 24, eos=None)
    assert len(greedy.stats.acceptance_per_position) > 4  # a lookup reached past the chain
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5)
    seen = []
    for _ in range(2):
        eng = make()
        result = eng.generate(prompt, 24, params)
        assert len(result.token_ids) == 24 and result.stats.drafted > result.stats.rounds
        seen.append(result.token_ids)
    assert seen[0] == seen[1]
