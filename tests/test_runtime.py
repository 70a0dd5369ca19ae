"""Logits as every measurement takes them: many callers on a single-threaded session give exactly
what one multi-threaded session gives, batch by batch, for float and dynamic int8 models."""

from __future__ import annotations

import numpy as np

from passes.base import PassContext
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import batches, make_session, model_logits


def test_parallel_callers_give_the_logits_of_one_session(tiny_onnx, tiny_images):
    int8 = QuantizeInt8Pass(QuantizeInt8Config()).run(tiny_onnx, PassContext())
    for model in (tiny_onnx, int8):
        split = batches(tiny_images, 1)
        session = make_session(model, 2)
        name = session.get_inputs()[0].name
        expected = np.concatenate([session.run(None, {name: b})[0] for b in split])
        seen = []
        got = model_logits(model, split, threads=2, advance=seen.append)
        assert np.array_equal(got, expected)
        assert sum(seen) == len(tiny_images)


def test_the_timing_loop_interleaves_rounds_and_times_no_warmup(monkeypatch):
    """Runners are called warm-up first, then round by round (A A B B, A A B B, ...), each turn after
    one untimed call; only the timed calls are kept, per round, and the summary is over all of them."""
    from passes import timing
    from passes.timing import measure_latency, timed_rounds

    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    times = timed_rounds(runners, warmup=1, runs=5, rounds=2)
    assert calls == ["A", "B"] + ["A"] * 4 + ["B"] * 4 + ["A"] * 3 + ["B"] * 3
    assert [len(r) for r in times["A"]] == [3, 2] and all(ms >= 0 for r in times["B"] for ms in r)

    # on a clock that a call right after the other runner's moves 1 s (a switch) and any other 1 ms,
    # no switch is timed
    clock, last = [0.0], [""]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def runner(name: str) -> None:
        clock[0] += 1.0 if last[0] != name else 0.001
        last[0] = name

    switching = {name: (lambda name=name: runner(name)) for name in "AB"}
    timed = timed_rounds(switching, warmup=0, runs=4, rounds=2)
    assert {round(ms, 6) for per_round in timed.values() for r in per_round for ms in r} == {1.0}
    summary = measure_latency(runners, 0, 4, 2)
    assert set(summary) == {"A", "B"} and set(summary["A"]) == {"median", "p90", "iqr"}


def test_local_lanes_run_a_searchs_tasks_side_by_side_in_order():
    """In process, ``lanes`` tasks of a map run at once (each with its share of the threads), and the
    results come back in the items' order."""
    import threading
    import time

    from passes.executor import Executor

    lock = threading.Lock()
    running, most = [0], [0]

    def task(shared: int, item: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05 * (item % 3))  # finish out of order
        with lock:
            running[0] -= 1
        return shared + item

    assert Executor(2).map(task, iter(range(7)), 10) == list(range(10, 17))
    assert most[0] == 2
    most[0] = 0
    assert Executor().map(task, iter(range(4)), 0) == list(range(4)) and most[0] == 1
    assert Executor(2).task_threads(2) == 1 and Executor().task_threads(2) == 2


def test_the_budget_ranks_layers_the_same_in_lanes(tiny_onnx, tiny_images):
    """The ranking's network suffixes, run two at a time on one thread each, score every layer as
    one at a time on two callers does, bit for bit."""
    from passes.executor import Executor

    config = QuantizeInt8Config(min_sqnr_db=300.0, max_float_layers=1, weight_type="int8", reduce_range=True)
    rankings = []
    for lanes in (1, 2):
        measured: dict = {}  # what the pass measures, unrounded, as the engine would keep it
        ctx = PassContext(
            calibration=[tiny_images[:4]],
            search=batches(tiny_images[4:], 1),
            executor=Executor(lanes),
            reused_results=lambda name, depends_on, produce, kept=measured: kept.setdefault(name, produce()),
        )
        QuantizeInt8Pass(config).run(tiny_onnx, ctx)
        rankings.append(measured["ranking"])
    assert rankings[0] == rankings[1] and len(rankings[0]) > 2
