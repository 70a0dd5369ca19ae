"""Runs steps in order and caches each one's output, keyed by what it was made from.

A key is the hash of (input model, pass name, version and config, onnxvit version, and the data it
read), so changing one pass (its options or its code) redoes that pass and the ones after it, and
nothing else. Every artifact is
written atomically; a record beside each cached model keeps what the step did and its numeric
check, so a cache hit reports the same as a fresh run.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, MutableMapping

import numpy as np
import onnx

from onnxvit import __version__
from onnxvit.errors import UserError
from onnxvit.fileio import atomic_write_bytes, atomic_write_json, sha256_json
from passes import PassContext, PassError, get_pass
from passes.graph import model_problem, model_sha256


def cache_key(**parts: Any) -> str:
    return sha256_json({"onnxvit": __version__, **parts})


@dataclass
class StepRecord:
    """What one step did; goes into report.json as is."""

    name: str
    kind: str
    input: str | None
    config: dict[str, Any]
    key: str
    sha256: str = ""
    cached: bool = False
    seconds: float = 0.0
    check: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Cache:
    """Content-keyed files under one folder: ONNX models with their records, arrays, JSON."""

    LAST_RUN = "last-run.json"

    def __init__(self, folder: Path, force: bool = False) -> None:
        self.folder = folder
        self.force = force
        self._fresh: set[str] = set()  # written in this run, so valid even with --force
        self._used: set[str] = set()  # read or written in this run: what `clean` keeps

    def _path(self, name: str, key: str, suffix: str) -> Path:
        return self.folder / f"{name}-{key[:20]}{suffix}"

    def _usable(self, path: Path) -> bool:
        usable = path.is_file() and (not self.force or str(path) in self._fresh)
        if usable:
            self._used.add(path.name)
        return usable

    def _wrote(self, path: Path) -> None:
        self._fresh.add(str(path))
        self._used.add(path.name)

    def record_run(self) -> None:
        """Say which files this (completed) run used: `onnxvit clean` removes the others."""
        atomic_write_json(self.folder / self.LAST_RUN, sorted(n for n in self._used if (self.folder / n).exists()))

    def step(self, record: StepRecord, produce: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
        """The step's model from the cache, or from ``produce``; ``record`` is filled either way."""
        model_path = self._path(record.name, record.key, ".onnx")
        record_path = self._path(record.name, record.key, ".json")
        if self._usable(model_path) and self._usable(record_path):
            saved = json.loads(record_path.read_text())
            record.sha256, record.seconds = saved["sha256"], saved["seconds"]
            record.check, record.notes = saved["check"], saved["notes"]
            record.cached = True
            return onnx.load(model_path)
        start = time.perf_counter()
        model = produce()
        record.seconds = round(time.perf_counter() - start, 3)
        record.sha256 = model_sha256(model)
        atomic_write_bytes(model_path, model.SerializeToString())
        atomic_write_json(record_path, record.to_json())
        self._wrote(model_path)
        self._wrote(record_path)
        return model

    def array(self, name: str, key: str, produce: Callable[[], np.ndarray]) -> np.ndarray:
        path = self._path(name, key, ".npy")
        if self._usable(path):
            return np.load(path)
        value = produce()
        buffer = io.BytesIO()
        np.save(buffer, value)
        atomic_write_bytes(path, buffer.getvalue())
        self._wrote(path)
        return value

    def blob(self, name: str, key: str, suffix: str, produce: Callable[[], bytes]) -> Path:
        """The path of a cached file made by ``produce`` (its bytes), written once."""
        path = self._path(name, key, suffix)
        if not self._usable(path):
            atomic_write_bytes(path, produce())
            self._wrote(path)
        return path

    def memo(self, name: str, key: str) -> JsonMemo:
        """A step's resumable scratch results; with --force, earlier runs' entries are ignored."""
        path = self._path(name, key, ".memo.json")
        memo = JsonMemo(path, load=self._usable(path))
        self._wrote(path)
        return memo

    def has(self, name: str, key: str, suffix: str = ".json") -> bool:
        """Whether ``name`` at ``key`` would come from the cache: for work that makes several entries at once."""
        return self._usable(self._path(name, key, suffix))

    def json(self, name: str, key: str, produce: Callable[[], Any]) -> Any:
        path = self._path(name, key, ".json")
        if self._usable(path):
            return json.loads(path.read_text())
        value = produce()
        atomic_write_json(path, value)
        self._wrote(path)
        return value


def clean_cache(folder: Path, dry_run: bool = False) -> tuple[list[Path], int]:
    """Remove the cache files the last completed run did not use; return them and their bytes."""
    listing = folder / Cache.LAST_RUN
    if not listing.is_file():
        raise UserError(
            f"{folder}: no completed run recorded here ({Cache.LAST_RUN} missing); "
            "run `onnxvit compress` to the end first"
        )
    used = set(json.loads(listing.read_text())) | {Cache.LAST_RUN}
    stale = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in used)
    size = sum(p.stat().st_size for p in stale)
    if not dry_run:
        for path in stale:
            path.unlink()
    return stale, size


class JsonMemo(MutableMapping[str, Any]):
    """A dict saved to a JSON file (atomically) on every write: what a long search measured so far,
    so that an interrupted run resumes instead of starting over."""

    def __init__(self, path: Path, load: bool = True) -> None:
        self.path = path
        self._data: dict[str, Any] = json.loads(path.read_text()) if load and path.is_file() else {}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        atomic_write_json(self.path, self._data)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        atomic_write_json(self.path, self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def run_passes(
    start: onnx.ModelProto,
    start_record: StepRecord,
    steps: list[Any],
    pass_configs: list[Any],
    cache: Cache,
    make_context: Callable[[], PassContext],
    data_fingerprints: dict[str, Any],
    check: Callable[[onnx.ModelProto, onnx.ModelProto], dict[str, float]],
    log: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, onnx.ModelProto], list[StepRecord]]:
    """Apply ``steps`` (config.StepConfig) in order, each to its input model, through the cache.

    ``make_context`` is called only when some step really runs (it loads calibration images);
    ``data_fingerprints`` names the calibrate / search images, and the batch they are measured at, in
    the keys of passes that read them, and the threads a pass that measures this machine times with;
    ``check(before, after)`` is the numeric check recorded for every step that runs.
    """
    models = {start_record.name: start}
    records = {start_record.name: start_record}
    previous = start_record.name
    context: PassContext | None = None
    for step, pass_config in zip(steps, pass_configs):
        pass_cls = get_pass(step.pass_)
        source = step.input or previous
        record = StepRecord(
            name=step.output,
            kind=step.pass_,
            input=source,
            config=pass_config.model_dump(mode="json"),
            key="",
        )
        needs = pass_cls.requirements(pass_config)
        key_parts: dict[str, Any] = {
            "input": records[source].sha256,
            "pass": step.pass_,
            "pass_version": pass_cls.version,
            "config": record.config,
        }
        if "calibration" in needs:
            key_parts["calibration"] = data_fingerprints["calibrate"]
        if "search" in needs or "labels" in needs:
            key_parts["search"] = data_fingerprints["search"]
        if needs:
            key_parts["batch_size"] = data_fingerprints.get("batch_size", 1)
        machine = pass_cls.machine_key(pass_config)
        if machine:  # what it measured on this CPU, it measured with the benchmark's threads
            key_parts["machine"] = {**machine, "threads": data_fingerprints.get("threads")}
        record.key = cache_key(**key_parts)
        # what a step's work shares across its options (PassContext.reuse): keyed like it, less the config
        shared = {name: value for name, value in key_parts.items() if name != "config"}

        def reuse(part: str, depends_on: dict[str, Any], make: Callable[[], Any], shared=shared) -> Any:
            return cache.json(f"{shared['pass']}-{part}", cache_key(**shared, part=part, depends_on=depends_on), make)

        def produce(
            pass_cls=pass_cls, pass_config=pass_config, source=source, record=record, reuse=reuse
        ) -> onnx.ModelProto:
            nonlocal context
            context = context or make_context()
            context.notes = {}
            context.memo = cache.memo(record.name, record.key)
            context.reused_results = reuse
            try:
                output = pass_cls(pass_config).run(models[source], context)
            except (UserError, PassError) as exc:
                raise UserError(f"step '{record.name}' ({record.kind}): {exc}") from None
            problem = model_problem(output)
            if problem is not None:  # a bug in the pass, not the user's: keep the traceback
                raise RuntimeError(f"step '{record.name}' ({record.kind}) wrote an invalid ONNX model: {problem}")
            record.notes = dict(context.notes)
            record.check = check(models[source], output)
            return output

        models[record.name] = cache.step(record, produce)
        records[record.name] = record
        log(f"{record.name}: {step.pass_}{' (cached)' if record.cached else f' in {record.seconds:.1f} s'}")
        previous = record.name
    return models, list(records.values())
