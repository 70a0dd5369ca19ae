"""Stage evaluate: every variant's logits on the evaluation split (cached by what the variant is),
scored against the labels and against the reference variant's logits."""

from __future__ import annotations

from typing import Any

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


def scoring_batch(run: Run, variant: Variant) -> tuple[int, np.ndarray | None]:
    """The batch ``variant`` is scored at: the deploy batch (``benchmark.batch_size``), where a dynamic
    int8 model's activation ranges, and so its logits, are what the app computes; or the larger
    ``data.batch_size`` for a PyTorch variant whose logits on the first such batch of evaluation
    images are identical there (bit for bit), since PyTorch runs batches faster. ONNX Runtime runs
    batch 1 fastest with parallel callers, so its variants always use the deploy batch. Second: when
    the check ran now, the deploy-batch logits of the images it ran, the first of the evaluation."""
    deploy, large = run.config.benchmark.batch_size, run.config.data.batch_size
    if variant.runtime == "onnxruntime" or large <= deploy:
        return deploy, None
    measured: list[np.ndarray] = []

    def check() -> dict[str, int]:
        sample, threads = run.evaluation_images[:large], run.config.benchmark.threads
        measured.append(variant.logits(sample, deploy, threads))
        # first at twice the deploy batch, on as few images: a kernel that changes past the deploy
        # batch (a classifier's matrix-vector product at batch 1) shows there, and the large batch's
        # run is spared; a batch it would wrongly turn down costs speed, never a figure
        same = all(
            np.array_equal(measured[0][:batch], variant.logits(sample[:batch], batch, threads))
            for batch in dict.fromkeys([min(2 * deploy, large), large])
        )
        return {"batch_size": large if same else deploy}

    key = cache_key(
        model=variant.identity,
        evaluate=run.fingerprint("evaluate"),
        batches=[deploy, large],
        kernel=variant.scoring_kernel,
    )
    batch = int(run.cache.json(f"scoring-batch-{variant.name}", key, check)["batch_size"])
    return batch, (measured[0] if measured else None)


def logits(run: Run, variant: Variant) -> tuple[np.ndarray, int]:
    """``variant``'s logits on the evaluation split and the batch they were computed at, from the
    cache when this variant was scored before. The batch check's logits are not computed again:
    they are the first batches' at either batch (equal where the larger one is taken)."""
    batch, head = scoring_batch(run, variant)
    if head is not None and len(head) % batch:  # its images would not start a batch of the rest
        head = None

    def produce() -> np.ndarray:
        images = run.evaluation_images
        done = 0 if head is None else len(head)
        with (
            run.timed(f"evaluate/{variant.name}"),
            run.reporter.task(f"evaluating {variant.name}", len(images)) as advance,
        ):
            if head is not None:
                advance(done)
                if done == len(images):
                    return head
            rest = variant.logits(images[done:], batch, run.config.benchmark.threads, advance, run.executor)
            return rest if head is None else np.concatenate([head, rest])

    key = cache_key(
        model=variant.identity, evaluate=run.fingerprint("evaluate"), batch_size=batch, kernel=variant.scoring_kernel
    )
    return run.cache.array(f"logits-{variant.name}", key, produce), batch


def evaluate(
    run: Run, variants: list[Variant], reference: Variant
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Each variant's scores (by name) against the labels and ``reference``, and its logits."""
    scored = {v.name: logits(run, v) for v in [reference, *variants]}
    outputs = {name: value for name, (value, _) in scored.items()}
    labels = run.dataset.labels("evaluate")
    scores = {
        v.name: {
            **score(outputs[v.name], labels, outputs[reference.name]),
            "eval_batch_size": scored[v.name][1],
            "scoring_kernel": v.scoring_kernel,
        }
        for v in variants
    }
    return scores, outputs
