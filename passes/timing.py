"""Latency: the one timing loop every figure in a report and every search comes from.

All models of a measurement are timed together, in interleaved rounds (A B C, A B C, ...), so slow
drift of the machine (frequency, other load) spreads over all of them instead of favouring whichever
ran first; their ratios are what a report compares. Nothing else may run meanwhile: a live progress
bar's refresh thread competes for the cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from passes.runtime import make_session

Runner = Callable[[], object]
# How calls are timed: part of the cache key of every timed result, so that a cache from before a
# change is not read as this one's. 2: sessions stop spinning when a call returns, and each runner's
# turn in a round opens with one untimed call.
TIMING_METHOD = 2


def summarize(times_ms: np.ndarray) -> dict[str, float]:
    q25, median, q75, p90 = np.percentile(times_ms, [25, 50, 75, 90])
    return {"median": round(float(median), 4), "p90": round(float(p90), 4), "iqr": round(float(q75 - q25), 4)}


def runs_per_round(runs: int, rounds: int) -> list[int]:
    """``runs`` split over ``rounds`` as evenly as can be, the larger shares first."""
    return [runs // rounds + (index < runs % rounds) for index in range(rounds)]


def timed_rounds(
    runners: dict[str, Runner], warmup: int, runs: int, rounds: int = 5, after_round: Callable[[], None] = lambda: None
) -> dict[str, list[list[float]]]:
    """Per runner, the ms of each of its timed calls, round by round: ``runs`` calls after ``warmup``
    calls each, interleaved over ``rounds`` rounds. Each runner's turn in a round starts with one
    untimed call: the first call after another runner's pays for the switch (the other's threads
    still winding down, caches holding its weights), which no app running one model pays."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    for count in runs_per_round(runs, rounds):
        for name, run in runners.items():
            run()
            calls = []
            for _ in range(count):
                start = time.perf_counter()
                run()
                calls.append((time.perf_counter() - start) * 1e3)
            times[name].append(calls)
        after_round()
    return times


def measure_latency(
    runners: dict[str, Runner], warmup: int, runs: int, rounds: int = 5, after_round: Callable[[], None] = lambda: None
) -> dict[str, dict[str, float]]:
    """Median, p90 and IQR in ms of ``runs`` timed calls per runner, after ``warmup`` calls each,
    interleaved over ``rounds`` rounds."""
    times = timed_rounds(runners, warmup, runs, rounds, after_round)
    return {name: summarize(np.concatenate(per_round)) for name, per_round in times.items()}


def time_ratio(
    baseline: Path | onnx.ModelProto,
    candidate: Path | onnx.ModelProto,
    shape: tuple[int, ...],
    threads: int,
    batch_size: int = 1,
    warmup: int = 5,
    runs: int = 60,
    rounds: int = 6,
) -> dict[str, object]:
    """``candidate``'s time over ``baseline``'s, the two timed interleaved in ``rounds`` rounds: each
    round's ratio of medians (``round_ratios``) and their median (``time_ratio``). A choice between two
    models that compute the same thing reads the rounds: a gain within the machine's noise moves them
    both ways."""
    runners = {
        "baseline": onnx_runner(baseline, shape, threads, batch_size),
        "candidate": onnx_runner(candidate, shape, threads, batch_size),
    }
    times = timed_rounds(runners, warmup, runs, rounds)
    ratios = [
        float(np.median(candidate_ms) / np.median(baseline_ms))
        for baseline_ms, candidate_ms in zip(times["baseline"], times["candidate"])
    ]
    return {"time_ratio": round(float(np.median(ratios)), 4), "round_ratios": [round(r, 4) for r in ratios]}


def benchmark_input(shape: tuple[int, ...], batch_size: int) -> np.ndarray:
    """A fixed input: latency of these models does not depend on pixel values."""
    return np.random.default_rng(0).standard_normal((batch_size, *shape)).astype(np.float32)


def onnx_runner(model: Path | onnx.ModelProto, shape: tuple[int, ...], threads: int, batch_size: int = 1) -> Runner:
    """One call of ``model`` on the benchmark input, in a session opened as every session is."""
    session = make_session(model, threads)
    feed = {session.get_inputs()[0].name: benchmark_input(shape, batch_size)}
    return lambda: session.run(None, feed)
