"""What every graph pass is: a typed config, a pure ``ModelProto -> ModelProto`` step, and a context.

A pass never reads files or the YAML. What it needs from outside (calibration images, a way to
open an ONNX Runtime session, somewhere to say what it did) comes through ``PassContext``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Literal, MutableMapping

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict

from passes.executor import Executor
from passes.runtime import batches, model_logits


class PassError(Exception):
    """A failure the user can fix (an option, the data a pass is given): the engine turns it into one
    line naming the step, with no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


Requirement = Literal["calibration", "search", "labels"]
"""What a pass may need from the run: calibration images, search images, or labels that mean something
(real weights, so that top-1 is not noise)."""


class PassConfig(BaseModel):
    """Base of every pass's options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides its input model.

    ``calibration`` is a list of preprocessed NCHW float32 batches from the calibration split;
    ``search`` the same from the search split, for passes that choose by measured fidelity, in
    batches of ``batch_size``: the batch the model runs at in the app (a dynamic int8 model's
    activation ranges, and so its logits, depend on the batch), which every search measures at;
    ``search_labels`` their class labels when the weights are real (``None`` for random weights);
    ``notes`` collects what the pass wants in the report (what it changed, what it fell back from);
    ``executor`` runs the independent measurements of a search (here, or on workers); ``memo``
    keeps JSON-able results of long searches across interrupted runs (the engine backs it with a
    file keyed like the step); ``progress(description, total)`` opens a progress bar and yields the
    function that advances it; ``check_logits`` (see the method) is the engine's own numeric check;
    ``reuse`` (see the method) keeps parts of a step's work that other options of the step share.
    """

    calibration: list[np.ndarray] = field(default_factory=list)
    search: list[np.ndarray] = field(default_factory=list)
    input_name: str = "input"
    batch_size: int = 1
    threads: int = 2
    log: Callable[[str], None] = lambda message: None
    notes: dict[str, Any] = field(default_factory=dict)
    search_labels: np.ndarray | None = None
    memo: MutableMapping[str, Any] = field(default_factory=dict)
    executor: Executor = field(default_factory=Executor)
    progress: Callable[[str, int], ContextManager[Callable[[int], None]]] = lambda description, total: (
        contextlib.nullcontext(lambda n=1: None)
    )
    logits_on_check_images: Callable[[onnx.ModelProto], np.ndarray] | None = None
    reused_results: Callable[[str, dict[str, Any], Callable[[], Any]], Any] | None = None

    def reuse(self, name: str, depends_on: dict[str, Any], produce: Callable[[], Any]) -> Any:
        """``produce()``'s JSON-able result: a part of this step's work on its input model and data
        that, of the pass's options, depends only on ``depends_on``. With the engine it comes from
        the cache when a run of the step with other options made it (a new accuracy budget reuses
        the weight schemes and the layer ranking); else it is computed."""
        if self.reused_results is None:
            return produce()
        return self.reused_results(name, depends_on, produce)

    def check_logits(self, model: onnx.ModelProto) -> np.ndarray:
        """``model``'s logits on the images a rewrite meant to be exact checks itself on: with the
        engine, its check images, on which it checks every step and runs each model once (so the
        step's input is not run again, nor its output after it); else the first calibration batch.
        ``model`` must not change afterwards."""
        if self.logits_on_check_images is not None:
            return self.logits_on_check_images(model)
        return model_logits(model, self.calibration[:1], self.threads)

    def require_calibration(self, who: str) -> None:
        if not self.calibration:
            raise PassError(f"{who} needs calibration images; set data.calibrate_images > 0")

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
    """A graph pass: ``name`` (its YAML name), ``Config``, ``run``, and

    - ``version``: part of the cache key; bump it when the pass's output for the same input changes;
    - ``requirements(config)``: what it needs from the run; the config loader refuses a run that cannot
      give it, and the splits it names are part of the cache key;
    - ``machine_key(config)``: what of this machine the output depends on (a choice made from the
      CPU's instruction sets or measured kernels), part of the cache key; empty by default;
    - ``report_section(step)`` / ``report_figures(step)``: the pass's own part of report.md (the report
      writer knows no pass's notes), and ``tabled_notes``, the note keys that section shows, so that the
      generic list of notes leaves them out.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    tabled_notes: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def requirements(cls, config: PassConfig) -> frozenset[Requirement]:
        """What the pass needs with these options (default: ``requires``)."""
        return cls.requires

    @classmethod
    def machine_key(cls, config: PassConfig) -> dict[str, Any]:
        """What of this machine the output depends on with these options (default: nothing)."""
        return {}

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        raise NotImplementedError

    @classmethod
    def report_section(cls, step: dict[str, Any]) -> list[str]:
        """Markdown lines for report.md from one step's record (``notes`` as the pass wrote them)."""
        return []

    @classmethod
    def report_figures(cls, step: dict[str, Any]) -> dict[str, Any]:
        """Figures for the report: file name -> matplotlib figure; the report writer saves them."""
        return {}
