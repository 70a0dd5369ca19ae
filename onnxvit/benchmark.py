"""Latency: the one timing loop every figure in a report comes from.

All variants of a run are timed together, in interleaved rounds (A B C, A B C, ...), so slow drift
of the machine (frequency, other load) spreads over all of them instead of favouring whichever
ran first; their ratios are what the report compares. Nothing else may run meanwhile: a live
progress bar's refresh thread alone made int8 look 40% slower on 2 cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from onnxvit.config import BenchmarkConfig
from onnxvit.runtime import make_session

Runner = Callable[[], object]


def summarize(times_ms: np.ndarray) -> dict[str, float]:
    q25, median, q75, p90 = np.percentile(times_ms, [25, 50, 75, 90])
    return {"median": round(float(median), 4), "p90": round(float(p90), 4), "iqr": round(float(q75 - q25), 4)}


def measure_latency(runners: dict[str, Runner], warmup: int, runs: int, rounds: int = 5,
                    after_round: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Median, p90 and IQR in ms of ``runs`` timed calls per runner, after ``warmup`` calls each,
    interleaved over ``rounds`` rounds."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    per_round = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    for count in per_round:
        for name, run in runners.items():
            for _ in range(count):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
        after_round()
    return {name: summarize(np.array(values)) for name, values in times.items()}


def benchmark_input(shape: tuple[int, ...], batch_size: int) -> np.ndarray:
    """A fixed input: latency of these models does not depend on pixel values."""
    return np.random.default_rng(0).standard_normal((batch_size, *shape)).astype(np.float32)


def onnx_runner(model: Path | onnx.ModelProto, shape: tuple[int, ...], config: BenchmarkConfig) -> Runner:
    session = make_session(model, config.threads)
    feed = {session.get_inputs()[0].name: benchmark_input(shape, config.batch_size)}
    return lambda: session.run(None, feed)


def torch_runner(model: torch.nn.Module, shape: tuple[int, ...], config: BenchmarkConfig) -> Runner:
    torch.set_num_threads(config.threads)
    x = torch.from_numpy(benchmark_input(shape, config.batch_size))

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run
