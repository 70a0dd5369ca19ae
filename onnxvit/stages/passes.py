"""Stage passes: the YAML's graph passes over the export, through the engine's cache; the reported
models written beside the report as ONNX variants."""

from __future__ import annotations

from typing import Any

import onnx

from onnxvit.config import StepConfig
from onnxvit.engine import StepRecord, run_passes
from onnxvit.fileio import atomic_write_bytes
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.graph import model_sha256


def apply(
    run: Run,
    fp32: onnx.ModelProto,
    record: StepRecord,
    steps: list[StepConfig] | None = None,
    pass_configs: list[Any] | None = None,
) -> tuple[dict[str, onnx.ModelProto], list[StepRecord]]:
    """Every step's output model by name (the export included) and each step's record."""
    steps = run.config.passes if steps is None else steps
    pass_configs = run.pass_configs if pass_configs is None else pass_configs
    return run_passes(
        fp32,
        record,
        steps,
        pass_configs,
        run.cache,
        run.context,
        {
            **{split: run.fingerprint(split) for split in ("calibrate", "search")},
            "batch_size": run.config.benchmark.batch_size,
            "threads": run.config.benchmark.threads,
        },
        run.check,
        run.reporter.log,
    )


def write_variant(
    run: Run, name: str, proto: onnx.ModelProto, counts: dict[str, int], file_name: str | None = None
) -> Variant:
    """``proto`` written as the output folder's ``model.NAME.onnx`` (atomically), as a report variant."""
    path = run.config.output.dir / (file_name or f"model.{name}.onnx")
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    return Variant(
        name, "onnxruntime", model_sha256(proto), proto=proto, path=path, size_bytes=len(data), counts=counts
    )
