"""Tree shapes as index buffers, tree attention against plain chains, and KV compaction."""

import pytest
import torch
from tiny_models import tiny

from services.core.target import Feed, TargetRunner
from services.core.tree import choice_tree, parse_choices, tree_shape

PARENTS = (-1, -1, 0, 0, 1, 2, 2, 5, -1)  # siblings at three levels, depth 4, a lone root child


def path_to(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_shape_buffers_follow_the_parents():
    shape = tree_shape(PARENTS)
    assert shape.depth.tolist() == [1, 1, 2, 2, 2, 3, 3, 4, 1]
    assert shape.children[0].tolist()[:3] == [0, 1, 8] and shape.children[1].tolist()[:2] == [2, 3]
    assert shape.sibling_rank.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 2]
    for i in range(len(PARENTS)):
        assert shape.ancestors[i].nonzero().flatten().tolist() == sorted(path_to(PARENTS, i))
    pruned, kept = shape.prune(2)
    assert kept == (0, 1, 2, 3, 4, 8) and pruned.parents == (-1, -1, 0, 0, 1, -1)
    assert tree_shape(PARENTS) is shape  # built once per shape
    with pytest.raises(ValueError, match="precede"):
        tree_shape((-1, 2, 0))


def test_choice_trees_order_nodes_and_name_their_shape():
    tree = choice_tree(parse_choices("0.1;0;1;0.0;0.0.0"))
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert tree.shape.parents == (-1, -1, 0, 0, 2) and tree.rank.tolist() == [0, 1, 0, 1, 0]
    assert tree.label == "tree5:2-2-1" and tree.prune(1).choices == ((0,), (1,))
    with pytest.raises(ValueError, match="parent paths"):
        choice_tree(((0, 1),))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral", "mistral-window"])
def test_tree_logits_equal_each_path_run_as_a_chain(family):
    """Every node's logits equal those of its root-to-node path fed as a plain chain,
    batched next to a chain row and a second tree with a different past length."""
    model = tiny(family.split("-")[0], seed=0)
    if family == "mistral-window":
        model.config.sliding_window = 6  # shorter than prompt + tree: the window must be in the mask
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (9, 4, 13)]
    trees = [PARENTS, None, (-1, 0, -1, 1)]
    nodes = [torch.randint(3, 90, (len(t) if t else 5,), generator=g).tolist() for t in trees]
    runner = TargetRunner(model, kv_cache_bytes=2**22)
    for i, prompt in enumerate(prompts):
        runner.prefill(str(i), prompt[:-1], [])
    feeds = [Feed(str(i), len(p) - 1, p[-1:] + n, len(n) + 1, t) for i, (p, n, t) in enumerate(zip(prompts, nodes, trees))]
    got = runner.forward(feeds)
    reference = TargetRunner(model, kv_cache_bytes=2**22)
    for i, (prompt, toks, tree) in enumerate(zip(prompts, nodes, trees)):
        parents = tree or tuple(range(-1, len(toks) - 1))
        for node in [-1, *range(len(toks))]:
            path = path_to(parents, node) if node >= 0 else []
            (alone,) = reference.forward([Feed(f"{i}/{node}", 0, prompt + [toks[j] for j in path], 1)])
            torch.testing.assert_close(got[i][node + 1], alone[0], rtol=1e-5, atol=1e-5)


def test_accepted_path_is_compacted_into_place():
    """After a tree round, the next feed moves the accepted path's KV into place; the
    cache then equals one built from scratch on the committed tokens."""
    model = tiny("llama", seed=0)
    runner = TargetRunner(model, kv_cache_bytes=2**22)
    prompt = [5, 9, 14, 3, 22, 17, 40, 41, 8, 60, 2, 33, 71, 19, 4]  # the tree straddles a block boundary
    nodes = [50, 51, 52, 53, 54, 55, 56, 57, 58]
    runner.prefill("s", prompt[:-1], [])
    runner.forward([Feed("s", len(prompt) - 1, prompt[-1:] + nodes, len(nodes) + 1, PARENTS)])
    accepted = [1, 4]  # a path off the first branch: nodes 1 then 4
    base = len(prompt)
    moves = tuple((base + node, base + depth) for depth, node in enumerate(accepted))
    committed = prompt + [nodes[j] for j in accepted] + [77]
    (after,) = runner.forward([Feed("s", base + len(accepted), [77, 78], 2, None, moves)])
    assert runner.sessions["s"].tokens == committed + [78]
    fresh = TargetRunner(model, kv_cache_bytes=2**22)
    (expected,) = fresh.forward([Feed("f", 0, committed + [78], 2)])
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    for layer in range(runner.pool.num_layers):
        slots = runner.pool.seq_slots(runner.sessions["s"], 0, len(committed) + 1)
        fresh_slots = fresh.pool.seq_slots(fresh.sessions["f"], 0, len(committed) + 1)
        torch.testing.assert_close(runner.pool.keys[layer][slots], fresh.pool.keys[layer][fresh_slots], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runner.pool.values[layer][slots], fresh.pool.values[layer][fresh_slots], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="moves"):
        runner.forward([Feed("s", 3, [1], 1, None, ((40, 2),))])


def test_tree_logits_at_a_real_vocabulary_and_a_long_context():
    """Llama-3's 128k vocabulary and a 1,500-token context, a tree row next to a chain
    row of another length: each node's logits equal its path run as a chain."""
    from services.models.shapes import random_model

    model = random_model("llama3")
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, model.config.vocab_size, (1500,), generator=g).tolist()
    nodes = torch.randint(3, model.config.vocab_size, (len(PARENTS),), generator=g).tolist()
    runner = TargetRunner(model, kv_cache_bytes=2**28)
    runner.prefill("tree", ctx[:-1], [])
    runner.prefill("chain", ctx[:1200], [])
    got, _ = runner.forward([Feed("tree", len(ctx) - 1, ctx[-1:] + nodes, len(nodes) + 1, PARENTS),
                             Feed("chain", 1200, ctx[1200:1203], 1)])
    reference = TargetRunner(model, kv_cache_bytes=2**28)
    for node in (1, 4, 7):
        (alone,) = reference.forward([Feed(str(node), 0, ctx + [nodes[j] for j in path_to(PARENTS, node)], 1)])
        torch.testing.assert_close(got[node + 1], alone[0], rtol=1e-4, atol=1e-4)
