"""Stage load: the model as timm makes it, the image folder and its splits, the model's own preprocessing.

``Run`` is what every later stage shares. Everything on it is lazy, so a cached run decodes no image
and builds no model it does not need.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import onnx

from onnxvit.config import Config
from onnxvit.data import Dataset, load_dataset, load_images, timm_transform
from onnxvit.engine import Cache, cache_key
from onnxvit.fileio import sha256_file
from onnxvit.progress import Reporter
from passes import PassContext
from passes.executor import Executor
from passes.metrics import compare_logits
from passes.runtime import batches, model_logits


@dataclass
class Run:
    """One pipeline run: the config, the reporter and the cache, and what the stages share."""

    config: Config
    pass_configs: list[Any]
    reporter: Reporter
    cache: Cache
    timings: dict[str, float] = field(default_factory=dict)
    used_executor: dict[str, Any] | None = None  # what the executor was, once it has been closed
    # each model's check logits by identity (with the model, so the id stays its own): a step's
    # input is the output of the step before or a model several steps read, and runs once
    checked: dict[int, tuple[onnx.ModelProto, np.ndarray]] = field(default_factory=dict)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[part]``: the cold-run profile in report.json."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[part] = round(self.timings.get(part, 0.0) + time.perf_counter() - start, 3)

    @cached_property
    def config_sha256(self) -> str:
        return self.config.sha256()

    @cached_property
    def created_model(self) -> Any:
        """The model as timm made it (with its checkpoint); its data config sets the preprocessing."""
        from onnxvit.models import create_model

        return create_model(self.config.model)

    @cached_property
    def executor(self) -> Executor:
        """Where evaluations and the searches' measurements run (``executor:``); started on first use.
        In process, a search's tasks run as many at a time as the benchmark has threads, one each."""
        from onnxvit.distributed import make_executor

        return make_executor(self.config.executor, self.reporter.log, self.config.benchmark.threads)

    def executor_record(self) -> dict[str, Any]:
        """Where the run's measurements ran, for the report (an executor never started says so)."""
        if "executor" in self.__dict__:
            self.used_executor = self.executor.describe()
        record = self.used_executor or {"kind": self.config.executor.kind, "started": False}
        return {**record, "latency_timed_in": "this process, with no other measurement running"}

    def close(self) -> None:
        """Stop the executor's workers, if it was started (a later use starts it again): before
        latency is timed, so that no worker process shares the cores."""
        if "executor" in self.__dict__:
            self.used_executor = self.executor.describe()
            self.executor.close()
            del self.__dict__["executor"]

    @cached_property
    def dense_model(self) -> Any:
        """The created model, with BatchNorm statistics re-estimated when the config asks."""
        model = self.created_model
        if self.config.model.recalibrate_bn:
            from onnxvit.models import recalibrate_batchnorm

            count = recalibrate_batchnorm(model, self.calibration_images)
            self.reporter.log(
                f"model: re-estimated {count} BatchNorm layers on {len(self.calibration_images)} calibration images"
            )
        return model

    @property
    def model_kwargs(self) -> dict[str, Any]:
        m = self.config.model
        return {**m.kwargs, **({"num_classes": m.num_classes} if m.num_classes is not None else {})}

    @cached_property
    def weights_id(self) -> str:
        """What the dense model's weights came from: the cache key part of everything made from them."""
        m = self.config.model
        return cache_key(
            model=m.model_dump(mode="json"),
            checkpoint=sha256_file(m.checkpoint) if m.checkpoint else None,
            batchnorm_images=self.fingerprint("calibrate") if m.recalibrate_bn else None,
        )

    @cached_property
    def dataset(self) -> Dataset:
        d = self.config.data
        return load_dataset(d.root, d.manifest, d.calibrate_images, d.search_images, d.max_eval_images)

    @cached_property
    def preprocessing(self) -> tuple[Any, dict[str, Any]]:
        return timm_transform(self.created_model)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.preprocessing[1]["input_size"])

    def _images(self, split: str) -> np.ndarray:
        files = self.dataset.splits[split]
        if not files:
            return np.zeros((0, *self.input_shape), np.float32)
        with self.timed("decode"), self.reporter.task(f"reading {split} images", len(files)) as advance:
            return load_images(self.dataset.folder, files, self.preprocessing[0], advance)

    @cached_property
    def calibration_images(self) -> np.ndarray:
        return self._images("calibrate")

    @cached_property
    def evaluation_images(self) -> np.ndarray:
        return self._images("evaluate")

    @cached_property
    def search_images(self) -> np.ndarray:
        return self._images("search")

    @property
    def check_batches(self) -> list[np.ndarray]:
        """The check images at the deploy batch: a step's numeric check measures the model as it runs."""
        return batches(self.calibration_images[: self.config.data.check_images], self.config.benchmark.batch_size)

    def fingerprint(self, split: str) -> str:
        """What a split's images are, as preprocessed: the cache key part of whatever read them."""
        return cache_key(split=self.dataset.fingerprint(split), preprocessing=self.preprocessing[1])

    def context(self) -> PassContext:
        """What the graph passes may use: the splits' images, labels when they mean something, progress."""
        labels = None if self.config.model.random_init else self.dataset.labels("search")
        return PassContext(
            calibration=batches(self.calibration_images, 8),
            search=batches(self.search_images, self.config.benchmark.batch_size),
            batch_size=self.config.benchmark.batch_size,
            threads=self.config.benchmark.threads,
            log=self.reporter.log,
            search_labels=labels,
            executor=self.executor,
            progress=lambda description, total: self.reporter.task(description, total, live=False),
            logits_on_check_images=self._check_logits,
        )

    def check(self, before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, float]:
        """The numeric check recorded after every step: ``after``'s logits against ``before``'s."""
        return compare_logits(self._check_logits(before), self._check_logits(after))

    def _check_logits(self, model: onnx.ModelProto) -> np.ndarray:
        if id(model) not in self.checked:
            logits = model_logits(model, self.check_batches, self.config.benchmark.threads)
            self.checked[id(model)] = (model, logits)
        return self.checked[id(model)][1]
