"""What every graph pass is: a typed config, a pure ``ModelProto -> ModelProto`` step, and a context.

A pass never reads files or the YAML. What it needs from outside (calibration images, a way to
open an ONNX Runtime session, somewhere to say what it did) comes through ``PassContext``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterator, MutableMapping

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict

from onnxvit.data import batches


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    @property
    def requires_labels(self) -> bool:
        """Whether these options judge by top-1, which random weights make meaningless (refused at load)."""
        return False


@dataclass
class PassContext:
    """What a pass may use besides its input model.

    ``calibration`` is a list of preprocessed NCHW float32 batches from the calibration split;
    ``search`` the same from the search split, for passes that choose by measured fidelity;
    ``search_labels`` their class labels when the weights are real (``None`` for random weights);
    ``notes`` collects what the pass wants in the report (what it changed, what it fell back from);
    ``memo`` keeps JSON-able results of long searches across interrupted runs (the engine backs it
    with a file keyed like the step); ``progress(description, total)`` opens a progress bar and
    yields the function that advances it.
    """

    calibration: list[np.ndarray] = field(default_factory=list)
    search: list[np.ndarray] = field(default_factory=list)
    input_name: str = "input"
    threads: int = 2
    log: Callable[[str], None] = lambda message: None
    notes: dict[str, Any] = field(default_factory=dict)
    search_labels: np.ndarray | None = None
    memo: MutableMapping[str, Any] = field(default_factory=dict)
    progress: Callable[[str, int], ContextManager[Callable[[int], None]]] = \
        lambda description, total: contextlib.nullcontext(lambda n=1: None)

    def require_calibration(self, who: str) -> None:
        if not self.calibration:
            raise ValueError(f"{who} needs calibration images")

    def calibration_batches(self, limit: int | None) -> list[np.ndarray]:
        """The calibration batches cut to their first ``limit`` images (None: all), batched as before."""
        if not limit or not self.calibration:
            return self.calibration
        return batches(np.concatenate(self.calibration)[:limit], len(self.calibration[0]))

    def calibration_samples(self) -> Iterator[dict[str, np.ndarray]]:
        """Calibration data one image at a time, as ONNX Runtime feeds."""
        for batch in self.calibration:
            for image in batch:
                yield {self.input_name: image[None]}


def count_ops(model: onnx.ModelProto, *op_types: str) -> dict[str, int]:
    """How many nodes of each op type the graph has: what a pass reports it inserted."""
    return {op: sum(node.op_type == op for node in model.graph.node) for op in op_types}


class Pass:
    """A graph pass. Subclasses set ``name``, ``Config`` and ``run``; ``uses_calibration`` and
    ``uses_search`` add those splits' images to the pass's cache key."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    uses_calibration: ClassVar[bool] = False
    uses_search: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        raise NotImplementedError
