"""Fidelity and accuracy measures, one definition each, used by checks, evaluation and reports."""

from __future__ import annotations

import numpy as np
import onnx

SQNR_CEILING_DB = 200.0  # identical logits have infinite SQNR; JSON has no infinity


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB (inf when equal)."""
    reference = reference.astype(np.float64).ravel()
    error = reference - test.astype(np.float64).ravel()
    noise, signal = float(error @ error), float(reference @ reference)
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


class SqnrAgainst:
    """``sqnr_db`` against one fixed reference, prepared once: a search scores many candidates
    against the same float output. Squares in float32, summed in float64 by numpy's pairwise sum,
    never by BLAS: a BLAS dot product's last bits depend on its thread count, and a search scores
    wherever its candidates run (a single-threaded worker or this process)."""

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = np.ascontiguousarray(reference, np.float32).ravel()
        self.signal = _sum_of_squares(self.reference)

    def __call__(self, test: np.ndarray) -> float:
        noise = _sum_of_squares(self.reference - np.asarray(test, np.float32).ravel())
        return float("inf") if noise == 0.0 else float(10.0 * np.log10(max(self.signal, 1e-30) / noise))


def _sum_of_squares(values: np.ndarray) -> float:
    return float(np.sum(np.square(values), dtype=np.float64))


def capped_sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """``sqnr_db`` capped at ``SQNR_CEILING_DB``: the figure reports and searches store."""
    return min(sqnr_db(reference, test), SQNR_CEILING_DB)


def mean_cosine(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over rows of the cosine similarity between logit vectors."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    tst = test.reshape(len(test), -1).astype(np.float64)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(tst, axis=1)
    return float(np.mean(np.sum(ref * tst, axis=1) / np.maximum(denom, 1e-30)))


def max_abs_diff(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(reference.astype(np.float64) - test.astype(np.float64))))


def rounding_limit(reference: np.ndarray | float, atol: float, rtol: float) -> float:
    """The largest logit difference float32 rounding accounts for: ``atol`` plus ``rtol`` times the
    largest |logit| of ``reference`` (or that largest |logit| itself), since rounding grows with
    the values it rounds."""
    return atol + rtol * float(np.max(np.abs(reference)))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the ``k`` highest logits."""
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float(100.0 * np.mean(np.any(topk == labels[:, None], axis=1)))


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Percent of rows whose argmax matches the reference's."""
    return float(100.0 * np.mean(reference.argmax(axis=1) == test.argmax(axis=1)))


def compare_logits(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """The numeric check recorded after every step."""
    return {
        "cosine": mean_cosine(reference, test),
        "sqnr_db": sqnr_db(reference, test),
        "max_abs": max_abs_diff(reference, test),
        "agree_top1": top1_agreement(reference, test),
    }


CHOICE_OPS = ("TopK", "ArgMax", "ArgMin")


def rewrite_change(model: onnx.ModelProto, before: np.ndarray, after: np.ndarray) -> float:
    """How far a rewrite meant to be exact moved the logits: the largest change over the images.

    In a graph that makes data-dependent choices (token merging's TopK), an exact rewrite's
    last-bit differences may flip a near-tie on a few images and move those logits far; a wrong
    rewrite moves every image. There it is the median image's largest change.
    """
    per_image = np.abs(before - after).reshape(len(before), -1).max(axis=1)
    choices = any(node.op_type in CHOICE_OPS for node in model.graph.node)
    return float(np.median(per_image) if choices else per_image.max())
