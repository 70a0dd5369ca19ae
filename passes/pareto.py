"""Non-dominated sorting and a small NSGA-II, for searches over discrete per-block choices.

Objectives are always *minimized*; a caller that maximizes fidelity passes its negative. Kept
apart from any pass so that the sort can be checked on hand-made points, and reused.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

Genome = tuple[int, ...]


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one."""
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_fronts(points: np.ndarray) -> list[list[int]]:
    """Deb's fast non-dominated sort: indices of ``points`` (n x m), front by front, the first the
    Pareto front. Equal points share a front."""
    n = len(points)
    if n == 0:
        return []
    less_eq = np.all(points[:, None, :] <= points[None, :, :], axis=2)
    less = np.any(points[:, None, :] < points[None, :, :], axis=2)
    dominance = less_eq & less  # [i, j]: i dominates j
    dominated_by = dominance.sum(axis=0)
    fronts: list[list[int]] = []
    current = [i for i in range(n) if dominated_by[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in np.flatnonzero(dominance[i]):
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(int(j))
        current = sorted(following)
    return fronts


def pareto_front(points: np.ndarray) -> list[int]:
    fronts = non_dominated_fronts(points)
    return fronts[0] if fronts else []


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance within one front: boundary points are infinitely far."""
    n, m = points.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(points[:, k], kind="stable")
        span = points[order[-1], k] - points[order[0], k]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (points[order[2:], k] - points[order[:-2], k]) / span
    return distance


def spread_pick(points: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` indices of ``points`` (one front), the most spread out first."""
    chosen = list(range(len(points)))
    while len(chosen) > count:
        distance = crowding_distance(points[chosen])
        chosen.pop(int(np.argmin(distance)))
    return chosen


def nsga2(
    evaluate: Callable[[Genome], np.ndarray | None],
    choices: int,
    genes: int,
    population: int,
    generations: int,
    seed: int = 0,
    initial: list[Genome] | None = None,
    exhaustive_limit: int = 4096,
) -> dict[Genome, np.ndarray]:
    """Every feasible genome the search evaluated, with its objectives.

    ``evaluate`` returns the objective vector of a genome, or ``None`` when it breaks a constraint.
    Spaces of at most ``exhaustive_limit`` genomes are enumerated instead of searched.
    """
    seen: dict[Genome, np.ndarray | None] = {}

    def score(genome: Genome) -> np.ndarray | None:
        if genome not in seen:
            seen[genome] = evaluate(genome)
        return seen[genome]

    if choices**genes <= exhaustive_limit:
        for genome in itertools.product(range(choices), repeat=genes):
            score(genome)
        return {g: v for g, v in seen.items() if v is not None}

    rng = np.random.default_rng(seed)
    parents: list[Genome] = [g for g in (initial or []) if score(g) is not None]
    attempts = 0
    while len(parents) < population and attempts < population * 50:
        attempts += 1
        genome = tuple(int(c) for c in rng.integers(0, choices, genes))
        if genome not in parents and score(genome) is not None:
            parents.append(genome)

    def rank(pool: list[Genome]) -> list[Genome]:
        objectives = np.array([seen[g] for g in pool])
        ordered: list[Genome] = []
        for front in non_dominated_fronts(objectives):
            distance = crowding_distance(objectives[front])
            ordered += [pool[front[i]] for i in np.argsort(-distance, kind="stable")]
        return ordered

    for _ in range(generations):
        if len(parents) < 2:
            break
        position = {g: i for i, g in enumerate(rank(parents))}
        children: list[Genome] = []
        for _ in range(population * 10):
            if len(children) >= population:
                break
            a, b = (
                min(rng.choice(len(parents), 2, replace=False), key=lambda i: position[parents[i]]) for _ in range(2)
            )
            mask = rng.random(genes) < 0.5
            child = np.where(mask, parents[a], parents[b])
            mutate = rng.random(genes) < 1.0 / genes
            child[mutate] = rng.integers(0, choices, int(mutate.sum()))
            genome = tuple(int(c) for c in child)
            if genome not in children and genome not in parents and score(genome) is not None:
                children.append(genome)
        parents = rank(parents + children)[:population]
    return {g: v for g, v in seen.items() if v is not None}
