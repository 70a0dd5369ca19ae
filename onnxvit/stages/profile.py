"""Stage profile: where each ONNX variant's time goes, by ONNX Runtime's own profiler, and what
int8 can give this model on this CPU, measured in the same quiet process as the timing phase."""

from __future__ import annotations

from typing import Any

from onnxvit.engine import cache_key
from onnxvit.stages.benchmark import machine_info
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.int8_limit import gemm_speedup, int8_bound, linear_shapes, machine_summary
from passes.profiling import profile_model
from passes.quantize_int8 import u8s8_saturates


def profile(
    run: Run, variants: list[Variant], reference: Variant, latency: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """``profiles`` (per ONNX variant: time per category, the slowest nodes), ``machine`` (the int8
    instruction sets, the int8-vs-float GEMM ratio at ``reference``'s linear-layer shapes and the
    best int8 speed-up of ``reference`` it allows) and ``int8`` (per variant that runs int8 GEMMs:
    that bound and the variant's measured speed-up over ``reference`` as a share of it); the
    measurements cached by what they measured and the machine."""
    bench = run.config.benchmark
    onnx_variants = [v for v in variants if v.runtime == "onnxruntime"]
    machine = machine_info(bench.threads)

    def measure_profiles() -> dict[str, Any]:
        with run.reporter.task(f"profiling {len(onnx_variants)} variants", len(onnx_variants), live=False) as advance:
            result = {}
            for v in onnx_variants:
                result[v.name] = profile_model(
                    v.source(), run.input_shape, bench.threads, bench.batch_size, bench.warmup, bench.profile_runs
                ).to_json()
                advance(1)
            return result

    def measure_limit() -> dict[str, Any]:
        assert reference.proto is not None
        shapes = linear_shapes(reference.proto, run.input_shape, bench.batch_size)
        return gemm_speedup(shapes, bench.threads, u8s8_saturates())

    settings = {"threads": bench.threads, "batch_size": bench.batch_size, "warmup": bench.warmup}
    profiles = run.cache.json(
        "profile",
        cache_key(
            models={v.name: v.identity for v in onnx_variants},
            settings=settings,
            runs=bench.profile_runs,
            machine=machine,
            shape=run.input_shape,
        ),
        measure_profiles,
    )
    limit = run.cache.json(
        "gemm-ratio",
        cache_key(model=reference.identity, settings=settings, machine=machine, shape=run.input_shape),
        measure_limit,
    )
    speedup = limit["int8_gemm_speedup"]
    base = profiles[reference.name]
    bound = int8_bound(base["total_ms"], base["linear_ms"], speedup) if speedup else None
    reference_ms = latency[reference.name]["median"]
    int8 = {
        name: {
            "int8_bound_speedup": round(bound, 4),
            "int8_efficiency": round(reference_ms / latency[name]["median"] / bound, 4),
        }
        for name, p in profiles.items()
        if bound and p["categories_ms"].get("int8 GEMM")
    }
    machine_part = {
        **machine_summary(),
        "int8_gemm_speedup": speedup,
        "int8_bound_speedup": round(bound, 4) if bound else None,
        "int8_gemm_shapes": limit["shapes"],
    }
    return {"machine": machine_part, "reference": reference.name, "profiles": profiles, "int8": int8}
