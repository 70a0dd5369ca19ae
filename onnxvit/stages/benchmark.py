"""Stage benchmark: every variant timed together, in one quiet process, with the one timing loop."""

from __future__ import annotations

from typing import Any

from onnxvit.engine import cache_key
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.int8_limit import cpu_model
from passes.timing import TIMING_METHOD, measure_latency


def machine_info(threads: int) -> dict[str, Any]:
    """The machine and runtime versions a latency belongs to: part of its cache key and of the report."""
    import onnxruntime
    import torch

    return {"cpu": cpu_model(), "threads": threads, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def latency(run: Run, variants: list[Variant]) -> dict[str, dict[str, float]]:
    """Median, p90 and IQR (ms) per variant name, timed in interleaved rounds; cached by what the
    variants are, the benchmark settings and the machine."""
    bench = run.config.benchmark

    def measure() -> dict[str, dict[str, float]]:
        runners = {v.name: v.runner(run.input_shape, bench.threads, bench.batch_size) for v in variants}
        with run.reporter.task(f"timing {len(variants)} variants", bench.rounds, live=False) as advance:
            return measure_latency(runners, bench.warmup, bench.runs, bench.rounds, lambda: advance(1))

    key = cache_key(
        models={v.name: v.identity for v in variants},
        benchmark=bench.model_dump(mode="json"),
        machine=machine_info(bench.threads),
        shape=run.input_shape,
        timing=TIMING_METHOD,
    )
    return run.cache.json("latency", key, measure)
