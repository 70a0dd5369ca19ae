"""Non-dominated sorting and NSGA-II on hand-made points, where the answer is known."""

from __future__ import annotations

import itertools

import numpy as np

from passes.pareto import crowding_distance, non_dominated_fronts, nsga2, pareto_front, spread_pick


def test_non_dominated_fronts_on_hand_made_points():
    points = np.array([(1, 5), (2, 3), (3, 1), (2, 4), (4, 4), (3, 3), (1, 5), (5, 0)], dtype=float)
    fronts = non_dominated_fronts(points)
    # (1,5) twice, (2,3), (3,1), (5,0): nothing beats them; equal points share a front
    assert sorted(fronts[0]) == [0, 1, 2, 6, 7]
    assert sorted(fronts[1]) == [3, 5]  # (2,4) and (3,3): beaten only by (2,3)
    assert fronts[2] == [4]  # (4,4)
    assert sorted(i for f in fronts for i in f) == list(range(len(points)))


def test_pareto_front_in_three_objectives_keeps_trade_offs():
    points = np.array([(0, 9, 9), (9, 0, 9), (9, 9, 0), (5, 5, 5), (6, 6, 6), (0, 9, 10)], dtype=float)
    assert sorted(pareto_front(points)) == [0, 1, 2, 3]


def test_crowding_distance_and_spread_pick_keep_the_ends():
    front = np.array([(0.0, 10.0), (1.0, 9.0), (1.1, 8.9), (5.0, 5.0), (10.0, 0.0)])
    distance = crowding_distance(front)
    assert np.isinf(distance[0]) and np.isinf(distance[4])
    assert distance[1] < distance[3]  # crowded next to (1.1, 8.9)
    picked = spread_pick(front, 3)
    assert sorted(picked) == [0, 3, 4]


def _additive_problem(genes: int, choices: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    cost = rng.random((genes, choices, 3))

    def evaluate(genome):
        if len(set(genome)) == 1:
            return None  # a constraint: not uniform
        return cost[np.arange(genes), list(genome)].sum(axis=0)

    return evaluate


def test_nsga2_enumerates_small_spaces_and_honours_constraints():
    evaluate = _additive_problem(3, 3)
    explored = nsga2(evaluate, 3, 3, population=4, generations=2)
    assert len(explored) == 3**3 - 3  # every genome but the three uniform ones
    assert all(len(set(g)) > 1 for g in explored)


def test_nsga2_finds_most_of_the_true_front():
    genes, choices = 7, 3
    evaluate = _additive_problem(genes, choices)
    every = [g for g in itertools.product(range(choices), repeat=genes) if evaluate(g) is not None]
    truth = {every[i] for i in pareto_front(np.array([evaluate(g) for g in every]))}
    explored = nsga2(evaluate, choices, genes, population=24, generations=30, exhaustive_limit=0)
    assert all(len(set(g)) > 1 for g in explored)
    assert len(explored) < len(every) / 2  # it searched, it did not enumerate
    found = list(explored)
    front = {found[i] for i in pareto_front(np.array([explored[g] for g in found]))}
    assert len(front & truth) >= 0.5 * len(truth)
    # and the best genome for each objective alone is among those found
    for k in range(3):
        best = min(every, key=lambda g: evaluate(g)[k])
        assert min(explored[g][k] for g in found) <= evaluate(best)[k] + 1e-9
