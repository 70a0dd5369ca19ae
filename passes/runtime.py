"""ONNX Runtime sessions on the CPU execution provider, opened the same way everywhere, and the logits
they give: what every pass, check and evaluation measures a model with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``images`` cut into consecutive batches of ``batch_size`` (the last one may be smaller)."""
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def make_session(model: onnx.ModelProto | Path | str, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and full graph optimization."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_logits(session: ort.InferenceSession, batches: list[np.ndarray]) -> np.ndarray:
    """The first output for every batch, concatenated, as float32."""
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: batch})[0] for batch in batches]
    return np.concatenate(outputs).astype(np.float32)


def model_logits(model: onnx.ModelProto, batches: list[np.ndarray], threads: int = 2) -> np.ndarray:
    return run_logits(make_session(model, threads), batches)
