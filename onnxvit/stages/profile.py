"""Stage profile: where each ONNX variant's time goes, by ONNX Runtime's own profiler, and what
int8 can give this model on this CPU, measured in the same quiet process as the timing phase."""

from __future__ import annotations

from functools import partial
from typing import Any

import onnx

from onnxvit.engine import StepRecord, cache_key
from onnxvit.stages.benchmark import machine_info
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.int8_limit import gemm_speedup, int8_bound, linear_shapes, machine_summary
from passes.profiling import CATEGORY_OPS, Profile, less_profiler_cost, profile_models
from passes.quantize_int8 import u8s8_saturates
from passes.timing import TIMING_METHOD

# what makes a model not float: the ops the profiler counts as int8 GEMMs or as (de)quantization
QUANTIZED_OPS = CATEGORY_OPS["int8 GEMM"] | CATEGORY_OPS["quantize"]
# a profiled session's first runs (allocation, first touches) stay out of its per-node medians; the
# timing phase before has already settled the machine, so the benchmark's longer warm-up is not needed
PROFILE_WARMUP = 5


def float_inputs(records: list[StepRecord], models: dict[str, onnx.ModelProto], names: list[str]) -> dict[str, str]:
    """For each of ``names`` that runs quantized ops, the float model its chain of steps started
    from: the nearest input with no quantized op (``reparam`` for the example's ``int8``, ``fp32``
    for ``ort-dynamic``). An int8 variant's speed-up over it is int8's own, without the fusions
    the steps before int8 made."""
    parent = {r.name: r.input for r in records}
    result = {}
    for name in names:
        if name not in models or not _quantized(models[name]):
            continue
        source = parent.get(name)
        while source is not None and source in models and _quantized(models[source]):
            source = parent.get(source)
        if source is not None and source in models:
            result[name] = source
    return result


def _quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def profile(
    run: Run,
    variants: list[Variant],
    reference: Variant,
    latency: dict[str, dict[str, float]],
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``profiles`` (per ONNX variant: time per category, the slowest nodes), ``machine`` (the int8
    instruction sets, the int8-vs-float GEMM ratio at ``reference``'s linear-layer shapes and the
    best int8 speed-up of ``reference`` it allows) and ``int8`` (per variant that runs int8 GEMMs:
    the bound of its float input, ``inputs[name]`` or else ``reference``, and its measured speed-up
    over that input as a share of the bound); the measurements cached by what they measured and
    the machine. ``variants`` includes the float inputs that are not reported, timed in ``latency``."""
    inputs = inputs or {}
    bench = run.config.benchmark
    onnx_variants = [v for v in variants if v.runtime == "onnxruntime"]
    machine = machine_info(bench.threads)
    warmup = min(bench.warmup, PROFILE_WARMUP)

    settings = {"threads": bench.threads, "batch_size": bench.batch_size, "warmup": warmup}

    def raw_key(variant: Variant) -> str:
        # method 7: interleaved rounds, per-node medians, as the profiler saw them (its cost is taken
        # off against this run's timed median); a float layer's bias Add counted in its linear time
        return cache_key(
            model=variant.identity,
            settings=settings,
            runs=bench.profile_runs,
            method=7,
            machine=machine,
            shape=run.input_shape,
            timing=TIMING_METHOD,
        )

    # each model's raw profile is kept by what the model is: a run that changed one variant
    # profiles that one (in rounds with any other new ones), and reuses the others'
    missing = [v for v in onnx_variants if not run.cache.has(f"profile-{v.name}", raw_key(v))]
    measured: dict[str, Profile] = {}
    if missing:
        with run.reporter.task(f"profiling {len(missing)} variants", 1, live=False) as advance:
            measured = profile_models(
                {v.name: v.source() for v in missing},
                run.input_shape,
                bench.threads,
                bench.batch_size,
                warmup,
                bench.profile_runs,
                max(1, min(bench.rounds, bench.profile_runs // 5)),  # a round's first run is slower: 5 or more
                raw=True,
            )
            advance(1)

    def record(name: str) -> dict[str, Any]:
        return measured[name].to_record()

    raw = {
        v.name: Profile.from_record(run.cache.json(f"profile-{v.name}", raw_key(v), partial(record, v.name)))
        for v in onnx_variants
    }
    profiles = {name: less_profiler_cost(p, latency[name]["median"]).to_json() for name, p in raw.items()}

    def measure_limit() -> dict[str, Any]:
        assert reference.proto is not None
        shapes = linear_shapes(reference.proto, run.input_shape, bench.batch_size)
        return gemm_speedup(shapes, bench.threads, u8s8_saturates())

    limit = run.cache.json(
        "gemm-ratio",
        # method 2: several layers per timed call (passes.int8_limit.GEMM_COPIES)
        cache_key(
            model=reference.identity,
            settings=settings,
            machine=machine,
            shape=run.input_shape,
            method=2,
            timing=TIMING_METHOD,
        ),
        measure_limit,
    )
    speedup = limit["int8_gemm_speedup"]

    def bound_of(name: str) -> float | None:
        base = profiles[name]
        return int8_bound(base["total_ms"], base["linear_ms"], speedup) if speedup else None

    bound = bound_of(reference.name)
    int8 = {}
    for name, p in profiles.items():
        source = inputs.get(name, reference.name)
        own_bound = bound_of(source)
        if own_bound and p["categories_ms"].get("int8 GEMM"):
            gain = latency[source]["median"] / latency[name]["median"]
            int8[name] = {
                "int8_float_input": source,
                "int8_bound_speedup": round(own_bound, 4),
                "int8_speedup_vs_float_input": round(gain, 4),
                "int8_efficiency": round(gain / own_bound, 4),
            }
    machine_part = {
        **machine_summary(),
        "int8_gemm_speedup": speedup,
        "int8_bound_speedup": round(bound, 4) if bound else None,
        "int8_gemm_shapes": limit["shapes"],
    }
    return {
        "machine": machine_part,
        "reference": reference.name,
        "profiles": profiles,
        "latency_ms": {name: latency[name]["median"] for name in profiles},  # the unreported inputs' too
        "int8": int8,
    }
