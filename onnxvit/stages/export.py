"""Stage export: a PyTorch model to ONNX, checked against PyTorch, then simplified (checked again)."""

from __future__ import annotations

from typing import Any

import onnx

from onnxvit.engine import StepRecord, cache_key
from onnxvit.stages.load import Run
from passes.graph import model_problem
from passes.simplify import SimplifyConfig, SimplifyPass


def export(run: Run, model: Any, model_id: str, name: str) -> tuple[onnx.ModelProto, StepRecord]:
    """``model`` (whose weights ``model_id`` names) as the ONNX variant ``name``, through the cache."""
    import torch

    from onnxvit.export import check_export, export_onnx

    cfg = run.config.export
    record = StepRecord(
        name=name,
        kind="export",
        input=None,
        config=cfg.model_dump(mode="json"),
        key=cache_key(
            weights=model_id,
            export=cfg.model_dump(mode="json"),
            torch=torch.__version__,
            simplify_version=SimplifyPass.version,
            calibration=run.fingerprint("calibrate"),
        ),
    )

    def produce() -> onnx.ModelProto:
        proto = export_onnx(model, run.calibration_images, cfg)
        threads = run.config.benchmark.threads
        record.check = {"max_abs_vs_torch": check_export(model, proto, run.check_batches, cfg.atol, threads, cfg.rtol)}
        if cfg.simplify:
            ctx = run.context()
            proto = SimplifyPass(SimplifyConfig(atol=cfg.atol)).run(proto, ctx)
            record.notes = dict(ctx.notes)
        problem = model_problem(proto)
        if problem is not None:
            raise RuntimeError(f"{name}: the export is not a valid ONNX model: {problem}")
        return proto

    proto = run.cache.step(record, produce)
    run.reporter.log(f"{name}: export{' (cached)' if record.cached else f' in {record.seconds:.1f} s'}")
    return proto, record
