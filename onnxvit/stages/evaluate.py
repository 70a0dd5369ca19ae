"""Stage evaluate: every variant's logits on the evaluation split (cached by what the variant is),
scored against the labels and against the reference variant's logits."""

from __future__ import annotations

import numpy as np

from onnxvit.engine import cache_key
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.metrics import capped_sqnr_db, top1_agreement, topk_accuracy


def score(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """top-1 / top-5 in percent against labels; agreement (percent) and SQNR (dB, capped) against
    ``reference``."""
    return {
        "top1": round(topk_accuracy(logits, labels, 1), 4),
        "top5": round(topk_accuracy(logits, labels, 5), 4),
        "agree_top1": round(top1_agreement(reference, logits), 4),
        "sqnr_db": round(capped_sqnr_db(reference, logits), 4),
    }


def logits(run: Run, variant: Variant) -> np.ndarray:
    """``variant``'s logits on the evaluation split, from the cache when this variant was scored before."""

    def produce() -> np.ndarray:
        images = run.evaluation_images
        with (
            run.timed(f"evaluate/{variant.name}"),
            run.reporter.task(f"evaluating {variant.name}", len(images)) as advance,
        ):
            return variant.logits(images, run.config.data.batch_size, run.config.benchmark.threads, advance)

    key = cache_key(model=variant.identity, evaluate=run.fingerprint("evaluate"))
    return run.cache.array(f"logits-{variant.name}", key, produce)


def evaluate(
    run: Run, variants: list[Variant], reference: Variant
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Each variant's scores (by name) against the labels and ``reference``, and its logits."""
    outputs = {v.name: logits(run, v) for v in [reference, *variants]}
    labels = run.dataset.labels("evaluate")
    return {v.name: score(outputs[v.name], labels, outputs[reference.name]) for v in variants}, outputs
