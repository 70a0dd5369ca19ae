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
