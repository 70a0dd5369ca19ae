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
from typing import Any, Callable, Sequence

import numpy as np

from onnxvit.config import ExecutorConfig
from onnxvit.errors import UserError
from passes.executor import Executor, Item, Model, Result, Shared, digest, model_bytes, shard_logits, split

RAY_INSTALL = 'pip install -e ".[ray]" (or pip install "ray>=2.60")'
TASK_RETRIES = 3  # a task whose worker dies is run again this many times before the run fails
SHARDS_PER_WORKER = 4  # evaluation shards per worker: progress moves and a slow worker holds little back


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
        log(f"ray: {self.workers} workers x {self.threads} threads on a cluster of {cpus} CPUs")

    def _store(self, key: Any, value: Any, keep: Any = None) -> Any:
        """``value`` in the object store once per ``key``; ``keep`` (what the key's ids point into)
        is held so that the ids cannot be reused while the reference is kept."""
        if key not in self._stored:
            self._stored[key] = (keep if keep is not None else value, self.ray.put(value))
        return self._stored[key][1]

    def _gather(self, arguments: list[tuple[Any, ...]], advance: Callable[[Any], None]) -> list[Any]:
        """Run a task per argument tuple, at most ``workers`` at once; results in order."""
        ray = self.ray
        results: list[Any] = [None] * len(arguments)
        pending: dict[Any, int] = {}
        submitted = 0
        while submitted < len(arguments) or pending:
            while submitted < len(arguments) and len(pending) < self.workers:
                pending[self.task.remote(*arguments[submitted])] = submitted
                submitted += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    raise error.as_instanceof_cause() from None
                advance(results[index])
        return results

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
        data = model_bytes(model)
        key = digest(data)
        model_ref = self._store(("model", key), (key, data))
        pieces = split(batches, self.workers * SHARDS_PER_WORKER)
        where = tuple(b.__array_interface__["data"][0] for b in (batches[0], batches[-1]))
        shards_key = ("shards", len(batches), batches[0].shape, where, len(pieces))
        shard_refs = [
            self._store((*shards_key, index), (piece, self.threads), keep=batches) for index, piece in enumerate(pieces)
        ]
        outputs = self._gather([(shard_logits, model_ref, ref) for ref in shard_refs], lambda out: advance(len(out)))
        return np.concatenate(outputs)

    def map(
        self,
        function: Callable[[Shared, Item], Result],
        items: Sequence[Item],
        shared: Shared,
        advance: Callable[[int], None] = lambda n: None,
    ) -> list[Result]:
        shared_ref = self.ray.put(shared)
        return self._gather([(function, shared_ref, item) for item in items], lambda _: advance(1))

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


def make_executor(config: ExecutorConfig, log: Callable[[str], None] = lambda message: None) -> Executor:
    """The executor a config asks for."""
    if config.kind == "ray":
        return RayExecutor(config, log)
    return Executor()
