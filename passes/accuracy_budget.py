"""An accuracy budget for quantizing passes, in the manner of NNCF's accuracy control: if the fully
quantized model is not faithful enough to its float input on the search split, rank layers by how
much quantizing each one alone hurts, and keep the most harmful in float, fewest first, until the
budget holds. Fidelity is logit SQNR and top-1 agreement with the float model: the search split is
small (31 images by default), and SQNR resolves differences that top-1 counts on it cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import onnx

from passes.metrics import SQNR_CEILING_DB, sqnr_db, top1_agreement
from passes.runtime import model_logits

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
    """Logits of candidate models on the search images, against the float model's."""

    def __init__(self, reference: onnx.ModelProto, batches: list[np.ndarray], threads: int) -> None:
        self.batches, self.threads = batches, threads
        self.reference = model_logits(reference, batches, threads)

    def __call__(self, model: onnx.ModelProto) -> Fidelity:
        logits = model_logits(model, self.batches, self.threads)
        return Fidelity(
            min(float(sqnr_db(self.reference, logits)), SQNR_CEILING_DB), top1_agreement(logits, self.reference)
        )


def fit_budget(
    layers: list[str],
    quantize: Quantize,
    probe: FidelityProbe,
    budget: Budget,
    max_float: int,
    log: Callable[[str], None],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize ``layers`` except the fewest most harmful ones, so that ``budget`` holds on the search
    split; returns the model and what was measured (per layer, when the ranking ran)."""
    model = quantize(layers)
    fidelity = probe(model)
    notes: dict[str, Any] = {"search_fidelity": fidelity.rounded(), "kept_float": [], "budget_met": True}
    if budget.met(fidelity):
        return model, notes
    log(
        f"budget not met with every layer in int8 ({fidelity.sqnr_db:.1f} dB, {fidelity.agreement:.1f}% "
        f"agreement); ranking {len(layers)} layers"
    )
    alone = {layer: probe(quantize([layer])) for layer in layers}
    ranked = sorted(layers, key=lambda layer: (alone[layer].sqnr_db, alone[layer].agreement))
    notes["sensitivity"] = [{"layer": layer, **alone[layer].rounded()} for layer in ranked]
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
