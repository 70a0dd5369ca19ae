"""What the passes built on ``onnxruntime.quantization`` share: our calibration images as its data
reader, its file-to-file quantizers run quietly on a ModelProto, how to name the layers it may
quantize, and the activation ranges the calibration images give."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper

from passes.base import PassContext
from passes.executor import Executor
from passes.graph import copy_model


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over our calibration images."""

    def __init__(self, samples: Iterator[dict[str, np.ndarray]]) -> None:
        self._samples = samples

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._samples, None)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Node lists (exclusions, sensitivity) need every node named."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def weighted_nodes(model: onnx.ModelProto, op_types: list[str]) -> list[str]:
    """Names of the nodes of ``op_types`` that have an initializer input (a weight)."""
    initializers = {init.name for init in model.graph.initializer}
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    weights = initializers | constants
    return [
        node.name
        for node in model.graph.node
        if node.op_type in op_types and any(name in weights for name in node.input)
    ]


@contextlib.contextmanager
def quiet_onnxruntime_quantizer() -> Iterator[None]:
    """The quantizer prints calibration chatter and a pre-processing hint to stdout / the root logger;
    onnxvit's progress and report say what happened instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


# The working directory, stdout and the root logger's level that a quantizer run swaps are the
# process's: callers on several threads (a search's executor lanes) take turns, or one would restore
# what the other swapped in (its deleted folder, its captured stdout).
_QUANTIZER_TURN = threading.Lock()


def run_ort_quantizer(model: onnx.ModelProto, quantize: Callable[[Path, Path], None]) -> onnx.ModelProto:
    """Run one of ONNX Runtime's file-to-file quantizers, ``quantize(input_path, output_path)``, on
    ``model`` in a temporary folder, quietly, and return its output; one thread at a time."""
    # Inside the folder: when its symbolic shape inference fails, ONNX Runtime leaves
    # sym_shape_infer_temp.onnx and a .data file in the working directory.
    with (
        _QUANTIZER_TURN,
        tempfile.TemporaryDirectory(prefix="onnxvit-q-") as tmp,
        quiet_onnxruntime_quantizer(),
        contextlib.chdir(tmp),
    ):
        source, output = Path(tmp) / "input.onnx", Path(tmp) / "quantized.onnx"
        onnx.save(model, source)
        quantize(source, output)
        return onnx.load(output)


def tensor_values(
    model: onnx.ModelProto,
    names: list[str],
    batches: list[np.ndarray],
    input_name: str,
    threads: int,
    executor: Executor | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The float values of tensors ``names`` (any, not only outputs; the image input too) for each
    batch, computed by ``executor`` (default: here)."""
    computed = [name for name in names if name != input_name]
    probe = copy_model(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in computed)
    outputs = (executor or Executor()).outputs(probe, batches, threads) if computed else []
    for index, batch in enumerate(batches):
        values = dict(zip(computed, outputs[index])) if computed else {}
        yield {name: batch if name == input_name else values[name] for name in names}


CAPTURE_BYTES = 1 << 30  # float values a search holds at once; more layers per capture pass is faster


class FloatValues:
    """A float model's tensor values on fixed batches, for searches that measure candidates on them:
    ``values(names)`` captures ``names`` in one pass over the batches, and ``chunks`` groups the
    items a search measures so that each group's values fit ``budget`` bytes: few passes where the
    model is small, bounded memory where it is large."""

    def __init__(
        self,
        model: onnx.ModelProto,
        batches: list[np.ndarray],
        input_name: str,
        threads: int,
        executor: Executor | None = None,
        budget: int = CAPTURE_BYTES,
    ) -> None:
        self.model, self.batches, self.input_name = model, batches, input_name
        self.threads, self.executor, self.budget = threads, executor, budget

    def __call__(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        return list(tensor_values(self.model, names, self.batches, self.input_name, self.threads, self.executor))

    def subset(self, indices: list[int]) -> FloatValues:
        """These values on the batches ``indices`` only."""
        return FloatValues(
            self.model, [self.batches[i] for i in indices], self.input_name, self.threads, self.executor, self.budget
        )

    def chunks(self, needs: list[list[str]]) -> list[list[int]]:
        """Consecutive indices of ``needs`` (each item's tensor names), grouped so that the values of
        a group's names on every batch fit the budget; sizes are read from the first batch."""
        names = sorted({name for item in needs for name in item})
        if not names or not self.batches:
            return [list(range(len(needs)))] if needs else []
        first = next(tensor_values(self.model, names, self.batches[:1], self.input_name, self.threads))
        scale = sum(len(batch) for batch in self.batches) / len(self.batches[0])
        groups: list[list[int]] = [[]]
        held: set[str] = set()
        for index, item in enumerate(needs):
            grown = held | set(item)
            if groups[-1] and sum(first[name].nbytes for name in grown) * scale > self.budget:
                groups.append([])
                grown = set(item)
            groups[-1].append(index)
            held = grown
        return groups


def channel_ranges(
    model: onnx.ModelProto, names: list[str], ctx: PassContext
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of tensors ``names`` over the calibration images."""
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    for values in tensor_values(model, names, ctx.calibration, ctx.input_name, ctx.threads):
        for name, value in values.items():
            flat = value.reshape(-1, value.shape[-1])
            lows[name] = np.minimum(lows.get(name, np.inf), flat.min(0))
            highs[name] = np.maximum(highs.get(name, -np.inf), flat.max(0))
    return {name: (lows[name], highs[name]) for name in names}
