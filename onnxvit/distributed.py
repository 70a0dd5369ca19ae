"""The ``executor:`` section made real: measurements in this process, or as Ray tasks.

Ray is optional (``pip install -e ".[ray]"``) and imported only when a config asks for it. The Ray
executor hands out the same two kinds of work as the local one (``passes.executor``): evaluation
shards, whose workers open a single-threaded session from the model's bytes in Ray's object store
and return logits, and the candidates of a search. Tasks are retried by Ray when their worker dies;
results come back to this process, which alone writes the cache and the output files, so a run on
Ray leaves the same files as a local one.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from onnxvit.config import ExecutorConfig
from onnxvit.errors import UserError
from onnxvit.fileio import sha256_bytes
from passes.executor import (
    Executor,
    Item,
    Model,
    Result,
    Shared,
    model_bytes,
    shard_logits,
    shard_outputs,
    split,
)

RAY_INSTALL = 'pip install -e ".[ray]" (or pip install "ray>=2.60")'
TASK_RETRIES = 3  # a task whose worker dies is run again this many times before the run fails
SHARDS_PER_WORKER = 4  # evaluation shards per worker: progress moves and a slow worker holds little back
KEPT_MODELS = 4  # models kept in the object store for their next shards (a search measures hundreds)


def import_ray() -> Any:
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            f"executor.kind: ray needs Ray, which is not installed; install it with {RAY_INSTALL}"
        ) from None
    return ray


def _call(function: Callable[[Shared, Item], Result], shared: Shared, item: Item) -> Result:
    """The one Ray task: ``function(shared, item)`` on a worker (Ray resolves ``shared`` from its
    object store)."""
    return function(shared, item)


class RayExecutor(Executor):
    """Work as Ray tasks of ``threads_per_worker`` CPUs each, at most ``workers`` at a time.

    With no ``address`` a local cluster of ``workers x threads_per_worker`` CPUs is started (and
    stopped on ``close``); ``auto`` or ``ray://host:port`` joins a running cluster, whose nodes need
    this package installed at the same version.
    """

    kind = "ray"

    def __init__(self, config: ExecutorConfig, log: Callable[[str], None] = lambda message: None) -> None:
        ray = self.ray = import_ray()
        self.address, self.threads = config.address, config.threads_per_worker
        self.started = not ray.is_initialized()
        if self.started:
            local = config.address is None
            workers = config.workers or max(1, (os.cpu_count() or 1) // self.threads)
            try:
                ray.init(
                    address=config.address,
                    num_cpus=workers * self.threads if local else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                )
            except ConnectionError as error:
                raise UserError(f"executor.address: no Ray cluster at {config.address!r} ({error})") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = config.workers or max(1, cpus // self.threads)
        self.cluster_cpus = cpus
        self.task = ray.remote(_call).options(num_cpus=self.threads, max_retries=TASK_RETRIES)
        self._stored: dict[Any, tuple[Any, Any]] = {}  # key -> (the object kept alive, its reference)
        log(f"ray: {self.workers} workers of {self.threads} thread(s) each, on a cluster of {cpus} CPUs")

    def _store(self, key: Any, value: Any, keep: Any = None) -> Any:
        """``value`` in the object store once per ``key``; ``keep`` (what the key's ids point into)
        is held so that the ids cannot be reused while the reference is kept."""
        if key not in self._stored:
            self._stored[key] = (keep if keep is not None else value, self.ray.put(value))
        return self._stored[key][1]

    def _stream(self, arguments: Iterable[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        """Run a task per argument tuple, at most ``workers`` running and as many queued behind them
        (so a worker that frees up starts at once), taking the next tuple only then; (index, result)
        as each is done."""
        ray = self.ray
        pending: dict[Any, int] = {}
        upcoming = enumerate(arguments)
        exhausted = False
        while not exhausted or pending:
            while not exhausted and len(pending) < 2 * self.workers:
                try:
                    index, argument = next(upcoming)
                except StopIteration:
                    exhausted = True
                    break
                pending[self.task.remote(*argument)] = index
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    raise error.as_instanceof_cause() from None
                yield index, result

    def _gather(self, arguments: Iterable[tuple[Any, ...]], advance: Callable[[Any], None]) -> list[Any]:
        """The results of ``_stream`` in order, ``advance`` called with each as it comes."""
        results = {}
        for index, result in self._stream(arguments):
            results[index] = result
            advance(result)
        return [results[index] for index in range(len(results))]

    def _model(self, model: Model) -> Any:
        """(sha256, bytes) of ``model`` in the object store; the last few are kept for their next shards."""
        data = model_bytes(model)
        key = ("model", sha256_bytes(data))
        if key not in self._stored:
            kept = [k for k in self._stored if k[0] == "model"]
            for old in kept[: max(0, len(kept) - KEPT_MODELS + 1)]:
                del self._stored[old]
        return self._store(key, (key[1], data))

    def _shards(self, batches: list[np.ndarray]) -> list[Any]:
        """``batches`` cut into shards of (batches, callers) in the object store, once per list of batches."""
        pieces = split(batches, self.workers * SHARDS_PER_WORKER)
        where = tuple(b.__array_interface__["data"][0] for b in (batches[0], batches[-1]))
        key = ("shards", len(batches), batches[0].shape, where, len(pieces))
        return [self._store((*key, i), (piece, self.threads), keep=batches) for i, piece in enumerate(pieces)]

    def logits(
        self,
        model: Model,
        batches: list[np.ndarray],
        threads: int,
        advance: Callable[[int], None] = lambda n: None,
    ) -> np.ndarray:
        """Shards of ``batches`` on the workers (``threads`` is the driver's; each task runs its
        shard with ``threads_per_worker`` callers); each batch's logits equal the local ones."""
        if not batches:
            return np.zeros((0, 0), np.float32)
        model_ref = self._model(model)
        shards = self._shards(batches)
        return np.concatenate(self._gather([(shard_logits, model_ref, s) for s in shards], lambda o: advance(len(o))))

    def outputs(self, model: Model, batches: list[np.ndarray], threads: int) -> list[list[np.ndarray]]:
        if not batches:
            return []
        model_ref = self._model(model)
        shards = self._shards(batches)
        pieces = self._gather([(shard_outputs, model_ref, shard) for shard in shards], lambda _: None)
        return [out for piece in pieces for out in piece]

    def stream(
        self, function: Callable[[Shared, Item], Result], items: Iterable[Item], shared: Shared
    ) -> Iterator[tuple[int, Result]]:
        shared_ref = self.ray.put(shared)
        yield from self._stream((function, shared_ref, item) for item in items)

    def task_threads(self, threads: int) -> int:
        return self.threads

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "address": self.address,
            "workers": self.workers,
            "threads_per_worker": self.threads,
            "cluster_cpus": self.cluster_cpus,
        }

    def close(self) -> None:
        self._stored.clear()
        if self.started:
            self.ray.shutdown()


def make_executor(
    config: ExecutorConfig, log: Callable[[str], None] = lambda message: None, lanes: int = 1
) -> Executor:
    """The executor a config asks for; in process, running ``lanes`` tasks of a search at a time."""
    if config.kind == "ray":
        return RayExecutor(config, log)
    return Executor(lanes)
