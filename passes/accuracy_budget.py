"""An accuracy budget for quantizing passes, in the manner of NNCF's accuracy control: if the fully
quantized model is not faithful enough to its float input on the search split, rank layers by how
much quantizing each one alone hurts, and keep the most harmful in float, fewest first, until the
budget holds. Fidelity is logit SQNR and top-1 agreement with the float model: the search split is
small (31 images by default), and SQNR resolves differences that top-1 counts on it cannot.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper

from passes.executor import Executor
from passes.graph import graph_suffix, suffix_inputs
from passes.metrics import SQNR_CEILING_DB, sqnr_db, top1_agreement
from passes.ort_quant import FloatValues
from passes.runtime import make_session, run_feeds

Quantize = Callable[[list[str]], onnx.ModelProto]


@dataclass
class Fidelity:
    sqnr_db: float
    agreement: float  # percent

    def rounded(self) -> dict[str, float]:
        return {key: round(value, 2) for key, value in asdict(self).items()}


@dataclass
class Budget:
    min_sqnr_db: float | None = None
    min_agreement: float | None = None

    @property
    def active(self) -> bool:
        return self.min_sqnr_db is not None or self.min_agreement is not None

    def met(self, fidelity: Fidelity) -> bool:
        return (self.min_sqnr_db is None or fidelity.sqnr_db >= self.min_sqnr_db) and (
            self.min_agreement is None or fidelity.agreement >= self.min_agreement
        )


class FidelityProbe:
    """Logits of candidate models on the search images, against the float model's; ``executor`` runs
    them (sharded by images)."""

    def __init__(
        self, reference: onnx.ModelProto, batches: list[np.ndarray], threads: int, executor: Executor | None = None
    ) -> None:
        self.batches, self.threads, self.executor = batches, threads, executor or Executor()
        self.reference = self.executor.logits(reference, batches, threads)

    def __call__(self, model: onnx.ModelProto) -> Fidelity:
        return self.score(self.logits(model))

    def logits(self, model: onnx.ModelProto) -> np.ndarray:
        return self.executor.logits(model, self.batches, self.threads)

    def subset(self, indices: list[int]) -> FidelityProbe:
        """This probe on the search batches ``indices`` only, their float logits taken from its own."""
        rows = self._rows()
        probe = copy.copy(self)
        probe.batches = [self.batches[i] for i in indices]
        probe.reference = np.concatenate([self.reference[rows[i]] for i in indices])
        return probe

    def farthest(self, logits: np.ndarray, images: int) -> list[int]:
        """The search batches where ``logits`` are farthest from float (most squared error), fewest
        that hold ``images`` images, in their order: a model's error energy is mostly theirs."""
        error = np.square(logits.astype(np.float64) - self.reference)
        noise = [float(error[rows].sum()) for rows in self._rows()]
        chosen: list[int] = []
        held = 0
        for index in sorted(range(len(noise)), key=lambda i: -noise[i]):
            if held >= images:
                break
            chosen.append(index)
            held += len(self.batches[index])
        return sorted(chosen)

    def _rows(self) -> list[slice]:
        """Each search batch's rows in the logits."""
        starts = np.cumsum([0, *(len(batch) for batch in self.batches)])
        return [slice(int(start), int(end)) for start, end in zip(starts[:-1], starts[1:])]

    def score(self, logits: np.ndarray) -> Fidelity:
        return Fidelity(
            min(float(sqnr_db(self.reference, logits)), SQNR_CEILING_DB), top1_agreement(logits, self.reference)
        )


class AloneProbe:
    """The fidelity of the model with one layer quantized, rerunning only the network from that layer
    on: the float values entering it are captured for as many layers at once as ``values``' memory
    budget holds (one dict per search batch), and the float prefix, identical for every candidate,
    is not rerun."""

    def __init__(self, model: onnx.ModelProto, build: Quantize, probe: FidelityProbe, values: FloatValues) -> None:
        self.model, self.build, self.probe, self.values = model, build, probe, values
        self.position = {node.name: index for index, node in enumerate(model.graph.node)}

    def subset(self, indices: list[int]) -> AloneProbe:
        """This probe on the search batches ``indices`` only."""
        return AloneProbe(self.model, self.build, self.probe.subset(indices), self.values.subset(indices))

    def rank(self, layers: list[str]) -> dict[str, Fidelity]:
        """Each layer's fidelity when it alone is quantized; a chunk's suffixes run as one ``map`` of
        the probe's executor."""
        result: dict[str, Fidelity] = {}
        executor = self.probe.executor
        callers = executor.task_threads(self.probe.threads)
        needs = [suffix_inputs(self.model, self.position[layer]) for layer in layers]
        for indices in self.values.chunks(needs):
            chunk = [layers[index] for index in indices]
            captured = self.values(sorted({name for index in indices for name in needs[index]}))
            types = {name: helper.np_dtype_to_tensor_dtype(value.dtype) for name, value in captured[0].items()}
            suffixes = (  # built as workers free up
                (graph_suffix(self.build([layer]), self.position[layer], types).SerializeToString(), callers)
                for layer in chunk
            )
            logits = executor.map(suffix_logits, suffixes, captured)
            result.update({layer: self.probe.score(value) for layer, value in zip(chunk, logits)})
        return result


def suffix_logits(captured: list[dict[str, np.ndarray]], task: tuple[bytes, int]) -> np.ndarray:
    """The logits of a network suffix (``task``: its bytes and the callers) fed the captured float
    values it reads, one feed per search batch."""
    data, callers = task
    session = make_session(data, 1)  # from the bytes: no parse and re-serialization of the suffix here
    inputs = [i.name for i in session.get_inputs()]
    feeds = [{name: batch[name] for name in inputs} for batch in captured]
    outputs = run_feeds(session, feeds, callers)
    return np.concatenate([out[0] for out in outputs]).astype(np.float32)


def fit_budget(
    layers: list[str],
    quantize: Quantize,
    probe: FidelityProbe,
    budget: Budget,
    max_float: int,
    log: Callable[[str], None],
    alone: AloneProbe | None = None,
    ranking_images: int | None = None,
    remember: Callable[[str, Callable[[], Any]], Any] = lambda name, produce: produce(),
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize ``layers`` except the fewest most harmful ones, so that ``budget`` holds on the search
    split; returns the model and what was measured (per layer, when the ranking ran). ``alone``
    measures the layers one at a time faster than a whole model each. ``ranking_images``: rank on
    that many search images, those where the fully quantized model is farthest from float (as
    OpenVINO's accuracy-aware quantization ranks on its mismatches). Every model kept or rejected is
    measured whole, on every search image: a coarser ranking may keep a layer more, never miss the budget.
    ``remember(name, produce)`` gives the ranking (JSON) from an earlier run where the caller kept it."""
    model = quantize(layers)
    logits = probe.logits(model)
    fidelity = probe.score(logits)
    notes: dict[str, Any] = {"search_fidelity": fidelity.rounded(), "kept_float": [], "budget_met": True}
    if budget.met(fidelity):
        return model, notes
    log(
        f"budget not met with every layer in int8 ({fidelity.sqnr_db:.1f} dB, {fidelity.agreement:.1f}% "
        f"agreement); ranking {len(layers)} layers"
    )
    ranker = probe
    if ranking_images is not None and ranking_images < sum(len(batch) for batch in probe.batches):
        indices = probe.farthest(logits, ranking_images)
        ranker, alone = probe.subset(indices), alone.subset(indices) if alone is not None else None
        notes["ranking_images"] = sum(len(batch) for batch in ranker.batches)

    def rank() -> dict[str, list[float]]:
        alone_fidelity = (
            alone.rank(layers) if alone is not None else {layer: ranker(quantize([layer])) for layer in layers}
        )
        return {layer: [value.sqnr_db, value.agreement] for layer, value in alone_fidelity.items()}

    single = {layer: Fidelity(*value) for layer, value in remember("ranking", rank).items()}
    ranked = sorted(layers, key=lambda layer: (single[layer].sqnr_db, single[layer].agreement))
    notes["sensitivity"] = [{"layer": layer, **single[layer].rounded()} for layer in ranked]
    best = (model, fidelity, [])
    for count in range(1, min(max_float, len(layers)) + 1):
        kept = ranked[:count]
        model = quantize([layer for layer in layers if layer not in kept])
        fidelity = probe(model)
        if fidelity.sqnr_db > best[1].sqnr_db:
            best = (model, fidelity, kept)
        if budget.met(fidelity):
            best = (model, fidelity, kept)
            break
    model, fidelity, kept = best
    notes.update(search_fidelity=fidelity.rounded(), kept_float=list(kept), budget_met=budget.met(fidelity))
    if not notes["budget_met"]:
        log(
            f"budget not met even with {max_float} layers in float; kept the most faithful model "
            f"({fidelity.sqnr_db:.1f} dB, {len(kept)} float layers)"
        )
    return model, notes
