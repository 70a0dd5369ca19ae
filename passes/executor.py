"""Where the independent measurements of an evaluation or a search run: in this process, or spread
over workers (``onnxvit.distributed`` runs them on Ray).

Two kinds of work are handed out. ``logits`` and ``outputs`` run one model on many batches (an
evaluation, a search's whole-model probe, an activation capture): the batches are split into shards,
and each shard is run by a single-threaded session with parallel callers, exactly as
``model_logits`` runs it in process, so the results are the same bit for bit wherever they are
computed. ``map`` and ``stream`` run one module-level function over many items with one shared
argument (the candidates of a search, each judged on the same inputs). Every result comes back to
the caller, which scores it and alone writes caches and files: an executor never changes a figure,
only where it is computed.

Latency is never measured through an executor: timing stays in the calling process.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from passes.runtime import make_session, model_logits, run_batches, run_logits

Shared = TypeVar("Shared")
Item = TypeVar("Item")
Result = TypeVar("Result")
Model = onnx.ModelProto | Path | str


class Executor:
    """In process (the default): the measurements run here. ``logits`` and ``outputs`` use
    ``threads`` cores as callers of one session; ``map`` and ``stream`` run ``lanes`` items at a
    time on threads of this process (ONNX Runtime releases the GIL), each item's feeds on
    ``task_threads`` callers, so that one item's single-threaded parts (building, opening its
    session) overlap another's runs."""

    kind = "local"
    workers = 1

    def __init__(self, lanes: int = 1) -> None:
        self.lanes = max(1, lanes)

    def logits(
        self,
        model: Model,
        batches: list[np.ndarray],
        threads: int,
        advance: Callable[[int], None] = lambda n: None,
    ) -> np.ndarray:
        """``model``'s first output on every batch, concatenated, as float32."""
        return model_logits(model, batches, threads, advance)

    def outputs(self, model: Model, batches: list[np.ndarray], threads: int) -> list[list[np.ndarray]]:
        """Every output of ``model`` for each batch (fed to its first input), as ONNX Runtime gives them."""
        return run_batches(make_session(model, 1), batches, threads)

    def map(
        self,
        function: Callable[[Shared, Item], Result],
        items: Iterable[Item],
        shared: Shared,
        advance: Callable[[int], None] = lambda n: None,
    ) -> list[Result]:
        """``function(shared, item)`` for every item, in order (see ``stream``)."""
        results = {}
        for index, result in self.stream(function, items, shared):
            results[index] = result
            advance(1)
        return [results[index] for index in range(len(results))]

    def stream(
        self, function: Callable[[Shared, Item], Result], items: Iterable[Item], shared: Shared
    ) -> Iterator[tuple[int, Result]]:
        """(index, ``function(shared, item)``) for every item as each is done, in any order, so that
        large results can be reduced and dropped as they come. ``function`` must be a module-level
        function (it is sent to workers by reference) and ``shared`` picklable; ``items`` may be a
        generator, consumed as workers free up, so that building the next item overlaps the work."""
        source = enumerate(items)
        if self.lanes == 1:
            for index, item in source:
                yield index, function(shared, item)
            return
        with ThreadPoolExecutor(self.lanes) as pool:
            pending = {pool.submit(function, shared, item): index for index, item in islice(source, self.lanes)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    for following, item in islice(source, 1):  # the next item, built while the others run
                        pending[pool.submit(function, shared, item)] = following
                    yield index, future.result()

    def task_threads(self, threads: int) -> int:
        """The callers a task of ``map`` runs its feeds with: its share of ``threads`` here (all of
        them with one lane), a worker's own elsewhere."""
        return max(1, threads // self.lanes)

    def describe(self) -> dict[str, Any]:
        """What the report says of where the work ran."""
        return {"kind": self.kind}

    def close(self) -> None:
        """Release workers, if any."""


def model_bytes(model: Model) -> bytes:
    """The serialized model, whatever form it is given in: what a worker opens its session from."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return Path(model).read_bytes()


_SESSIONS: OrderedDict[str, ort.InferenceSession] = OrderedDict()
_KEPT_SESSIONS = 2


def cached_session(key: str, data: bytes) -> ort.InferenceSession:
    """A single-threaded session for the model ``data`` (named ``key``), kept for the next shards of
    the same model that reach this worker process; the least recently used is dropped."""
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    session = make_session(data, 1)
    _SESSIONS[key] = session
    while len(_SESSIONS) > _KEPT_SESSIONS:
        _SESSIONS.popitem(last=False)
    return session


def shard_logits(model: tuple[str, bytes], shard: tuple[list[np.ndarray], int]) -> np.ndarray:
    """One shard of ``Executor.logits`` on a worker: ``model`` is (sha256, bytes), ``shard`` the
    batches and the callers that run them (as ``model_logits`` does)."""
    key, data = model
    batches, callers = shard
    return run_logits(cached_session(key, data), batches, callers)


def shard_outputs(model: tuple[str, bytes], shard: tuple[list[np.ndarray], int]) -> list[list[np.ndarray]]:
    """One shard of ``Executor.outputs`` on a worker (see ``shard_logits``)."""
    key, data = model
    batches, callers = shard
    return run_batches(cached_session(key, data), batches, callers)


def split(values: Sequence[Item], parts: int) -> list[list[Item]]:
    """``values`` cut into at most ``parts`` consecutive, near-equal, non-empty pieces."""
    parts = max(1, min(parts, len(values)))
    size, extra = divmod(len(values), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        pieces.append(list(values[start:end]))
        start = end
    return pieces
