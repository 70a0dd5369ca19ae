"""One model of a report, whatever runs it: the type every stage after export passes along.

ONNX Runtime, PyTorch eager and the PyTorch Lite interpreter differ in how a model is run and timed;
a ``Variant`` hides that behind ``logits`` and ``runner``, so no stage decides by runtime again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import onnx

from passes.executor import Executor
from passes.runtime import batches
from passes.timing import Runner, onnx_runner

Runtime = Literal["onnxruntime", "torch", "torch-lite"]


@dataclass
class Variant:
    """A report variant: its name, runtime, the model, the file a user ships, and what it came from.

    ``identity`` is what its logits and latency depend on (a model hash, or the weights and build of a
    PyTorch model): the evaluation and latency caches are keyed by it, the evaluation's also by
    ``scoring_kernel``. ``counts`` holds its parameters and MACs as counted on the PyTorch model it
    came from.
    """

    name: str
    runtime: Runtime
    identity: str
    proto: onnx.ModelProto | None = None
    module: Any = None
    path: Path | None = None
    size_bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # a PyTorch variant's scoring model per batch size, once decided (see _scoring_model)
    _scoring_models: dict[int, Callable[[Any], Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def logits(
        self,
        images: np.ndarray,
        batch_size: int,
        threads: int,
        advance: Callable[[int], None] = lambda n: None,
        executor: Executor | None = None,
    ) -> np.ndarray:
        """The first output for every image, in batches of ``batch_size``, as float32; an ONNX model's
        run by ``executor`` (default: here)."""
        if self.runtime == "onnxruntime":
            return (executor or Executor()).logits(self.source(), batches(images, batch_size), threads, advance)
        if self.runtime == "torch":
            return _torch_logits(self._scoring_model(images, batch_size), images, batch_size, threads, threads, advance)
        return _torch_logits(self.module, images, batch_size, threads, 1, advance)  # Lite: one call at a time

    @property
    def scoring_kernel(self) -> str:
        """How ``logits`` computes linear layers: ``onnxvit.eager.LINEAR_KERNEL`` for a PyTorch eager
        model scored on oneDNN, else ``"default"`` (the runtime's own, as the latency is timed)."""
        if self.runtime != "torch":
            return "default"
        from onnxvit.eager import linear_kernel

        return linear_kernel(self.module)

    @cached_property
    def _scored_module(self) -> Any:
        """The model ``logits`` runs: built on first use, so a run served from the cache builds none."""
        from onnxvit.eager import onednn_linears

        return onednn_linears(self.module)[0]

    def _scoring_model(self, images: np.ndarray, batch_size: int) -> Callable[[Any], Any]:
        """The scoring copy as ``onnxvit.eager.scoring_model`` runs it at ``batch_size``, decided once
        per batch size (on the first call with images enough to decide)."""
        from onnxvit.eager import scoring_model

        if batch_size not in self._scoring_models:
            model, final = scoring_model(self._scored_module, images, batch_size)
            if not final:
                return model
            self._scoring_models[batch_size] = model
        return self._scoring_models[batch_size]

    def runner(self, shape: tuple[int, ...], threads: int, batch_size: int) -> Runner:
        """One call on the benchmark input, for the timing loop."""
        if self.runtime == "onnxruntime":
            return onnx_runner(self.source(), shape, threads, batch_size)
        from onnxvit.benchmark import torch_runner

        return torch_runner(self.module, shape, threads, batch_size)

    def source(self) -> Path | onnx.ModelProto:
        """What ONNX Runtime opens: the written file (what ships), else the model in memory."""
        if self.path is not None:
            return self.path
        if self.proto is None:
            raise ValueError(f"variant {self.name}: no ONNX model")
        return self.proto


def _torch_logits(
    model: Any, images: np.ndarray, batch_size: int, threads: int, callers: int, advance: Callable[[int], None]
) -> np.ndarray:
    """PyTorch's logits batch by batch on ``threads`` threads: ``callers`` batches at a time, each on
    ``threads // callers`` intra-op threads. At a small batch eager PyTorch's per-op overhead leaves
    a second thread of one call idle, so parallel callers finish sooner (as ONNX Runtime's do)."""
    import torch

    def one(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # per thread
            output = model(torch.from_numpy(batch)).float().numpy()
        advance(len(batch))
        return output

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // callers))
    try:
        with ThreadPoolExecutor(callers) as pool:
            return np.concatenate(list(pool.map(one, batches(images, batch_size))))
    finally:
        torch.set_num_threads(previous)
