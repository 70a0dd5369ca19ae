"""Accuracy against labels and fidelity to the FP32 model, for every variant alike."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from onnxvit.data import batches
from onnxvit.metrics import sqnr_db, top1_agreement, topk_accuracy
from onnxvit.runtime import make_session


def onnx_eval_logits(path: Path, images: np.ndarray, batch_size: int, threads: int,
                     advance: Callable[[int], None] = lambda n: None) -> np.ndarray:
    session = make_session(path, threads)
    name = session.get_inputs()[0].name
    outputs = []
    for batch in batches(images, batch_size):
        outputs.append(session.run(None, {name: batch})[0].astype(np.float32))
        advance(len(batch))
    return np.concatenate(outputs)


def torch_eval_logits(model, images: np.ndarray, batch_size: int, threads: int,
                      advance: Callable[[int], None] = lambda n: None) -> np.ndarray:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    outputs = []
    try:
        with torch.inference_mode():
            for batch in batches(images, batch_size):
                outputs.append(model(torch.from_numpy(batch)).float().numpy())
                advance(len(batch))
    finally:
        torch.set_num_threads(previous)
    return np.concatenate(outputs)


SQNR_CEILING_DB = 200.0  # identical logits have infinite SQNR; JSON has no infinity


def score(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """top-1 / top-5 in percent against labels; agreement (percent) and SQNR (dB) against ``reference``
    (capped at ``SQNR_CEILING_DB``)."""
    return {
        "top1": round(topk_accuracy(logits, labels, 1), 4),
        "top5": round(topk_accuracy(logits, labels, 5), 4),
        "agree_top1": round(top1_agreement(reference, logits), 4),
        "sqnr_db": round(min(sqnr_db(reference, logits), SQNR_CEILING_DB), 4),
    }
