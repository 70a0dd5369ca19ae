"""Stage report: what the stages measured, as report.json's document (written by ``onnxvit.report``)."""

from __future__ import annotations

from typing import Any

from onnxvit import __version__
from onnxvit.fileio import path_from
from onnxvit.stages.benchmark import machine_info
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.graph import compute_op_census


def variant_entry(
    variant: Variant, latency: dict[str, float], scores: dict[str, Any], int8: dict[str, float] | None = None
) -> dict[str, Any]:
    """One element of report.json's ``variants`` (``int8``: its bound speed-up and efficiency, if profiled)."""
    entry: dict[str, Any] = {
        "name": variant.name,
        "runtime": variant.runtime,
        "path": variant.path.name if variant.path else None,
        "size_bytes": variant.size_bytes,
        "latency_ms": latency,
        **variant.counts,
        **scores,
        **(int8 or {}),
    }
    if variant.proto is not None:
        entry["compute_ops"] = compute_op_census(variant.proto)
    return entry


def document(
    run: Run,
    variants: list[Variant],
    reference: str,
    latency: dict[str, dict[str, float]],
    scores: dict[str, dict[str, Any]],
    sections: dict[str, Any],
) -> dict[str, Any]:
    """report.json's content (less ``schema_version``, which the writer adds). ``sections`` holds the
    stage results named by their report key: prune, tokens, handoff, mobile, lite, parity, profile, steps,
    seconds, timings."""
    config, folder = run.config, run.config.output.dir
    bench = config.benchmark
    profiled = sections.get("profile") or {}
    int8 = profiled.get("int8", {})
    return {
        "model": config.model.name,
        "onnxvit_version": __version__,
        "config_sha256": run.config_sha256,
        "machine": {**machine_info(bench.threads), **profiled.get("machine", {})},
        "weights": "checkpoint"
        if config.model.checkpoint
        else ("pretrained" if config.model.pretrained else "random_init"),
        "batch_size": bench.batch_size,
        "data": {
            "root": path_from(folder, config.data.root),
            "manifest": path_from(folder, config.data.manifest) if config.data.manifest else None,
            **{f"{s}_images": len(f) for s, f in run.dataset.splits.items()},
        },
        "reference": reference,
        "prune": sections.get("prune"),
        "tokens": sections.get("tokens"),
        "variants": [variant_entry(v, latency[v.name], scores[v.name], int8.get(v.name)) for v in variants],
        "profile": {k: profiled[k] for k in ("reference", "profiles", "latency_ms")} if profiled else None,
        "handoff": sections.get("handoff"),
        "mobile": sections.get("mobile"),
        "lite": sections.get("lite"),
        "parity": sections.get("parity", []),
        "steps": sections.get("steps", []),
        "executor": run.executor_record(),
        "seconds": sections.get("seconds"),
        "timings": sections.get("timings", {}),
    }
