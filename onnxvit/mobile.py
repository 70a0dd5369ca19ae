"""ONNX Runtime Mobile artifacts: `.ort` files, the reduced-build operator config, and their check.

The conversion is ONNX Runtime's own (what `python -m onnxruntime.tools.convert_onnx_models_to_ort`
does: a session that saves its optimized graph in ORT format), one model at a time so that a model
that cannot convert is one line in the report and the others go on. The operator config is what an
app's reduced ONNX Runtime build needs to run exactly these models.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxvit.config import MobileConfig
from onnxvit.fileio import atomic_write_text, atomic_write_via
from passes.graph import QUANTIZED_OPS
from passes.metrics import CHOICE_OPS, max_abs_diff, rounding_limit, top1_agreement
from passes.runtime import make_session, run_logits

OPERATORS_CONFIG = "required_operators.config"
_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def is_quantized(graph: onnx.GraphProto) -> bool:
    """Whether the model computes in integers somewhere: then its `.ort` twin is held to the same
    top-1, not to a float tolerance (ONNX Runtime may pick other integer kernels for the target)."""
    return any(n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear") for n in graph.node)


def computes_in_float16(graph: onnx.GraphProto) -> bool:
    """Whether the model holds float16 weights or casts to float16: its `.ort` twin may fuse ops
    that round differently at half precision, so it is held to the same top-1, as an integer model."""
    half = onnx.TensorProto.FLOAT16
    return any(init.data_type == half for init in graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in graph.node
    )


def to_ort_format(onnx_path: Path, ort_path: Path, config: MobileConfig) -> None:
    """Optimize ``onnx_path`` for ``config.target_platform`` and save it as ``ort_path`` (atomically)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[config.optimization]
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.add_session_config_entry("session.qdqisint8allowed", "1" if config.target_platform == "arm" else "0")
    # NCHWc layouts are x86-only: a model saved with them would not run on a phone.
    disabled = ["NchwcTransformer"] if config.target_platform == "arm" and config.optimization == "all" else None

    def write(temporary: Path) -> None:
        options.optimized_model_filepath = str(temporary)
        ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
        )

    atomic_write_via(ort_path, write, suffix=".ort")


def required_operators(ort_paths: list[Path], config_path: Path, type_reduction: bool) -> list[str]:
    """Write the reduced-build operator config for ``ort_paths``; return its operator lines."""
    import logging

    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its INFO line names a temp file
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder) / OPERATORS_CONFIG
        create_config_from_models(ort_paths, scratch, type_reduction)
        text = scratch.read_text()
    atomic_write_text(config_path, text)
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def check_ort_twin(onnx_path: Path, ort_path: Path, batches: list[np.ndarray], threads: int) -> dict[str, Any]:
    """The `.ort` model against its `.onnx` twin on the same images, and the twin's largest |logit|
    (the scale float32 rounding grows with)."""
    a = run_logits(make_session(onnx_path, threads), batches)
    b = run_logits(make_session(ort_path, threads), batches)  # ONNX Runtime reads .ort by its suffix
    return {
        "max_abs_vs_onnx": round(max_abs_diff(a, b), 8),
        "largest_logit": round(float(np.max(np.abs(a))), 4),
        "argmax_equal": top1_agreement(a, b) == 100.0,
    }


def ort_error_line(exc: Exception) -> str:
    """ONNX Runtime's message without its prefix and C++ source location, on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ .*?\) ", "", text)
    return text[:300]


def makes_choices(graph: onnx.GraphProto) -> bool:
    """Whether the model makes data-dependent choices (token merging's TopK): the `.ort` twin's fused
    kernels round differently, a near-tie may go the other way, so it is held to the same top-1."""
    return any(n.op_type in CHOICE_OPS for n in graph.node)


def within_float_rounding(check: dict[str, Any], config: MobileConfig) -> bool:
    """Whether a float32 `.ort` differs from its `.onnx` twin (``check_ort_twin``'s result) by no
    more than float32 rounding: ``fp32_atol`` plus ``fp32_rtol`` of the largest |logit|."""
    return check["max_abs_vs_onnx"] <= rounding_limit(check["largest_logit"], config.fp32_atol, config.fp32_rtol)


def build_artifacts(
    paths: dict[str, Path],
    folder: Path,
    config: MobileConfig,
    batches: list[np.ndarray],
    threads: int,
    log=lambda m: None,
    inputs: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """`.ort` for each named ONNX model, checked on ``batches`` (or its own ``inputs[name]``); then
    the operator config of those that converted."""
    artifacts, converted = [], []
    for name, onnx_path in paths.items():
        ort_path = folder / f"model.{name}.ort"
        entry: dict[str, Any] = {"variant": name, "path": ort_path.name}
        try:
            to_ort_format(onnx_path, ort_path, config)
        except Exception as exc:  # ONNX Runtime raises its own Fail / NotImplemented types
            entry.update(path=None, error=f"cannot convert to .ort: {ort_error_line(exc)}")
            log(f"mobile: {name}: {entry['error']}")
            artifacts.append(entry)
            continue
        entry["size_bytes"] = ort_path.stat().st_size
        entry.update(check_ort_twin(onnx_path, ort_path, (inputs or {}).get(name, batches), threads))
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        entry["quantized"] = is_quantized(graph)
        entry["float16"] = computes_in_float16(graph)
        entry["choices"] = makes_choices(graph)
        reduced = entry["quantized"] or entry["float16"] or entry["choices"]
        entry["ok"] = entry["argmax_equal"] if reduced else within_float_rounding(entry, config)
        artifacts.append(entry)
        converted.append(ort_path)
    operators = required_operators(converted, folder / OPERATORS_CONFIG, config.type_reduction) if converted else []
    return {
        "artifacts": artifacts,
        "operators_config": OPERATORS_CONFIG if converted else None,
        "operators": operators,
        "target_platform": config.target_platform,
        "optimization": config.optimization,
    }
