"""The EAGLE tree is chosen by measuring: every candidate decodes the same prompts, and
the fastest over target-only is kept."""

from tiny_models import random_eagle, tiny

from services.core.eagle_proposer import EagleTree
from services.models.build.eagle import tune_tree


def test_the_fastest_measured_tree_is_chosen():
    target = tiny("llama", seed=0, layers=4)
    trees = (EagleTree(2, 1, 2), EagleTree(3, 2, 5))
    best, table = tune_tree(random_eagle(target, 1), target, [[5, 6, 7, 8], list(range(20, 40))], 12, repeats=2,
                            trees=trees)
    assert best in trees and set(table) == {"eagle2:d2k1", "eagle5:d3k2"}
    assert table[best.label][0] == max(speedup for speedup, _ in table.values()) > 0
    assert all(1 <= accepted <= 4 for _, accepted in table.values())
