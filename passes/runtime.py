"""ONNX Runtime sessions on the CPU execution provider, opened the same way everywhere, and the logits
they give: what every pass, check and evaluation measures a model with."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort


def batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``images`` cut into consecutive batches of ``batch_size`` (the last one may be smaller)."""
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def session_options(threads: int) -> ort.SessionOptions:
    """How every session is opened: ``threads`` intra-op threads, full graph optimization, quiet, and
    the thread pool's spinning stopped when a call returns. By default a session's threads go on
    spinning after its call, on the cores the next session then runs on: timed in interleaved
    rounds, each variant's first calls after another's were slowed by them, and they set every p90
    (docs/benchmarks.md). Stopped, a call of one session alone is no slower (its threads spin again
    for the next call), and an app that infers now and then leaves the cores idle in between."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def make_session(
    model: onnx.ModelProto | bytes | Path | str, threads: int = 2, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and full graph optimization (``options``: those
    of ``session_options`` with more set, e.g. profiling); ``model`` in memory, serialized, or a file."""
    if isinstance(model, onnx.ModelProto):
        source: bytes | str = model.SerializeToString()
    else:
        source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options or session_options(threads), providers=["CPUExecutionProvider"])


def run_feeds(
    session: ort.InferenceSession, feeds: list[dict[str, np.ndarray]], callers: int = 1
) -> list[list[np.ndarray]]:
    """Every output for each feed, in order. ``callers`` threads run feeds at once: ONNX Runtime's
    ``run`` is thread-safe and releases the GIL."""
    if callers <= 1 or len(feeds) <= 1:
        return [session.run(None, feed) for feed in feeds]
    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(lambda feed: session.run(None, feed), feeds))


def run_batches(session: ort.InferenceSession, batches: list[np.ndarray], callers: int = 1) -> list[list[np.ndarray]]:
    """Every output for each batch fed to the session's first input (``callers``: see ``run_feeds``)."""
    name = session.get_inputs()[0].name
    return run_feeds(session, [{name: batch} for batch in batches], callers)


def run_logits(
    session: ort.InferenceSession,
    batches: list[np.ndarray],
    callers: int = 1,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """The first output for every batch, concatenated, as float32 (``callers``: see ``run_feeds``)."""
    name = session.get_inputs()[0].name

    def one(batch: np.ndarray) -> np.ndarray:
        output = session.run(None, {name: batch})[0].astype(np.float32)
        advance(len(batch))
        return output

    if callers <= 1 or len(batches) <= 1:
        return np.concatenate([one(batch) for batch in batches])
    with ThreadPoolExecutor(callers) as pool:
        return np.concatenate(list(pool.map(one, batches)))


def model_logits(
    model: onnx.ModelProto | Path | str,
    batches: list[np.ndarray],
    threads: int = 2,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """``model``'s logits on ``batches`` using ``threads`` cores: a single-threaded session run by
    ``threads`` callers, which keeps every core busy at batch 1 where one call's intra-op threads
    cannot. Its logits equal one ``threads``-threaded session's bit for bit (tests/test_runtime.py)."""
    return run_logits(make_session(model, 1), batches, threads, advance)
