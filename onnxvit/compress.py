"""`onnxvit compress`: config -> model -> export -> passes -> evaluation -> benchmark -> report.

Each stage's result is cached by content (see engine.py), so a repeated run only re-reads files;
images are decoded only when something that needs them has to run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxvit import __version__
from onnxvit.benchmark import measure_latency, onnx_runner, torch_runner
from onnxvit.config import DENSE_VARIANT, EXPORT_VARIANT, TORCH_VARIANT, Config, load_config
from onnxvit.data import Dataset, batches, load_dataset, load_images, timm_transform
from onnxvit.engine import Cache, StepRecord, cache_key, model_sha256, run_passes
from onnxvit.errors import UserError
from onnxvit.evaluate import onnx_eval_logits, score, torch_eval_logits
from onnxvit.export import check_export, export_onnx
from onnxvit.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from onnxvit.metrics import compare_logits
from onnxvit.models import create_model, parameter_bytes, recalibrate_batchnorm
from onnxvit.progress import Reporter
from onnxvit.report import machine_info, write_report
from onnxvit.runtime import model_logits
from passes import PassContext
from passes.graph import compute_op_census
from passes.simplify import SimplifyConfig, SimplifyPass

RUN_MARKER = ".onnxvit-run"
CACHE_DIR = "cache"


def prepare_output(folder: Path) -> None:
    """Use ``folder`` only if it is new, empty, or a previous onnxvit run: never clobber user files."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output.dir: {folder} is a file; choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / RUN_MARKER).is_file():
        raise UserError(f"output.dir: {folder} holds files that are not an onnxvit run; "
                        "choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RUN_MARKER, {"onnxvit_version": __version__})


@dataclass
class Run:
    """One compress run: the config, and what its stages share (lazily: images only when needed)."""

    config: Config
    pass_configs: list[Any]
    reporter: Reporter
    cache: Cache
    config_sha256: str
    records: list[StepRecord] = field(default_factory=list)

    @cached_property
    def created_model(self):
        """The model as timm made it (with its checkpoint); its data config sets the preprocessing."""
        return create_model(self.config.model)

    @cached_property
    def dense_model(self):
        """The created model, with BatchNorm statistics re-estimated when the config asks."""
        model = self.created_model
        if self.config.model.recalibrate_bn:
            count = recalibrate_batchnorm(model, self.calibration_images)
            self.reporter.log(f"model: re-estimated {count} BatchNorm layers on {len(self.calibration_images)} "
                              "calibration images")
        return model

    @property
    def pruning(self) -> bool:
        return self.config.prune is not None

    @cached_property
    def model(self):
        """The model that is exported: the dense one, or its pruned copy (cached as a rebuildable .pt)."""
        return self.pruned[0] if self.pruning else self.dense_model

    @cached_property
    def prune_key(self) -> str:
        import torch_pruning

        finetune = self.config.finetune
        return cache_key(weights=self.weights_id, prune=self.config.prune.model_dump(mode="json"),
                         calibration=self.fingerprint("calibrate"), torch_pruning=torch_pruning.__version__,
                         finetune=finetune.model_dump(mode="json") if finetune else None,
                         finetune_images=self.finetune_images.files if finetune else None)

    @cached_property
    def finetune_images(self):
        """The fine-tune's images: its own folder, or the calibrate + search splits, never the evaluation split."""
        from onnxvit.data import scan_image_folder
        from onnxvit.finetune import TrainImages

        root = self.config.finetune.root
        if root is None:
            files = self.dataset.splits["calibrate"] + self.dataset.splits["search"]
            return TrainImages(self.dataset.folder, files,
                               f"calibrate + search splits of data.root ({len(files)} images)")
        if root.resolve() == self.dataset.folder.root.resolve():
            raise UserError(f"finetune.root: {root} is data.root, whose evaluation split the report scores; "
                            "leave finetune.root empty to train on the calibrate and search splits only")
        folder = scan_image_folder(root)
        return TrainImages(folder, folder.files, f"{root} ({len(folder.files)} images)")

    @cached_property
    def pruned(self) -> tuple[Any, dict[str, Any], Path]:
        from onnxvit.prune import load_pruned, prune_model, serialize_pruned

        cfg, m = self.config.prune, self.config.model
        fresh: list[Any] = []

        def produce() -> bytes:
            labels = self.gradient_labels()
            images = self.calibration_images
            used = min(len(images), cfg.batches * cfg.batch_size) if cfg.method in ("taylor", "hessian") else 0
            with self.reporter.task(f"pruning ({cfg.method} importance)", used) as advance:
                pruned, summary = prune_model(self.dense_model, cfg, images, labels, m.name, advance, self.reporter.log)
            if self.config.finetune is not None:
                from onnxvit.finetune import distill

                summary["finetune"] = distill(pruned, self.dense_model, self.finetune_images, self.config.finetune,
                                              self.cache.folder, self.prune_key, self.reporter.task,
                                              self.reporter.log)
            fresh.append(pruned)
            return serialize_pruned(self.dense_model, pruned, m.name, self.model_kwargs, summary)

        path = self.cache.blob("pruned", self.prune_key, ".pt", produce)
        model, summary = load_pruned(path)
        self.reporter.log(f"prune: {cfg.method}, removed {summary['removed']['params']:.1%} of parameters, "
                          f"{summary['removed']['macs']:.1%} of MACs{'' if fresh else ' (cached)'}")
        return model, summary, path

    @property
    def model_kwargs(self) -> dict[str, Any]:
        m = self.config.model
        return {**m.kwargs, **({"num_classes": m.num_classes} if m.num_classes is not None else {})}

    def gradient_labels(self) -> np.ndarray | None:
        """Calibration labels for Taylor / Hessian, or None to use the dense model's predictions."""
        cfg = self.config.prune
        labels = self.dataset.labels("calibrate")
        classes = getattr(self.dense_model, "num_classes", 0)
        fits = len(labels) > 0 and int(np.max(labels)) < classes
        if cfg.loss == "labels" and not fits:
            raise UserError(f"prune.loss: the folder's labels go up to {int(np.max(labels))} but the model has "
                            f"{classes} classes; use loss: predictions")
        if cfg.loss == "predictions" or (cfg.loss == "auto" and (self.config.model.random_init or not fits)):
            return None
        return labels

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
        with self.reporter.task(f"reading {split} images", len(files)) as advance:
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
        return [self.calibration_images[: self.config.data.check_images]]

    def fingerprint(self, split: str) -> str:
        return cache_key(split=self.dataset.fingerprint(split), preprocessing=self.preprocessing[1])

    def context(self) -> PassContext:
        labels = None if self.config.model.random_init else self.dataset.labels("search")
        return PassContext(calibration=batches(self.calibration_images, 8), search=batches(self.search_images, 16),
                           threads=self.config.benchmark.threads, log=self.reporter.log, search_labels=labels,
                           progress=lambda description, total: self.reporter.task(description, total, live=False))

    @cached_property
    def weights_id(self) -> str:
        m = self.config.model
        return cache_key(model=m.model_dump(mode="json"),
                         checkpoint=sha256_file(m.checkpoint) if m.checkpoint else None,
                         batchnorm_images=self.fingerprint("calibrate") if m.recalibrate_bn else None)

    def check(self, before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, float]:
        threads = self.config.benchmark.threads
        return compare_logits(model_logits(before, self.check_batches, threads),
                              model_logits(after, self.check_batches, threads))

    @property
    def model_id(self) -> str:
        """What the exported model's weights came from: the checkpoint, and the pruning when there is one."""
        return self.prune_key if self.pruning else self.weights_id

    def export(self, dense: bool = False) -> tuple[onnx.ModelProto, StepRecord]:
        """The export of the model (or of the dense model, for the pruned run's baseline), simplified."""
        import torch

        cfg = self.config.export
        model = self.dense_model if dense else self.model
        name = DENSE_VARIANT if dense else EXPORT_VARIANT
        record = StepRecord(name=name, kind="export", input=None, config=cfg.model_dump(mode="json"),
                            key=cache_key(weights=self.weights_id if dense else self.model_id,
                                          export=cfg.model_dump(mode="json"),
                                          torch=torch.__version__, calibration=self.fingerprint("calibrate")))

        def produce() -> onnx.ModelProto:
            proto = export_onnx(model, self.calibration_images, cfg)
            threads = self.config.benchmark.threads
            record.check = {"max_abs_vs_torch": check_export(model, proto, self.check_batches, cfg.atol, threads)}
            if cfg.simplify:
                ctx = self.context()
                proto = SimplifyPass(SimplifyConfig(atol=cfg.atol)).run(proto, ctx)
                record.notes = dict(ctx.notes)
            return proto

        model = self.cache.step(record, produce)
        self.reporter.log(f"{name}: export{' (cached)' if record.cached else f' in {record.seconds:.1f} s'}")
        return model, record


def _variant(name: str, runtime: str, path: Path | None, size: int, latency: dict[str, float],
             scores: dict[str, float], counts: dict[str, int]) -> dict[str, Any]:
    return {"name": name, "runtime": runtime, "path": path.name if path else None, "size_bytes": size,
            "latency_ms": latency, **counts, **scores}


def parity(config: Config, run: Run, lite: dict[str, Any], logits: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Each ONNX variant beside its PyTorch counterpart: fp32 with lite-fp32, int8 steps with lite-int8-*."""
    if config.lite is None:
        return []
    from onnxvit.lite import parity_table

    int8_steps = [s.output for s in config.passes if s.report and s.pass_ in ("quantize_int8", "ort_dynamic")]
    pairs = [(EXPORT_VARIANT, "lite-fp32", "fp32")] if "lite-fp32" in lite else []
    pairs += [(step, name, "int8") for step in int8_steps for name in lite if name.startswith("lite-int8")]
    return parity_table(logits, pairs, config.lite)


def compress(config_path: Path, force: bool = False, quiet: bool = False,
             output: Path | None = None) -> dict[str, Any]:
    """Run the whole pipeline; return the report (also written to the output folder)."""
    config, pass_configs = load_config(config_path)
    if output is not None:
        config.output.dir = output.resolve()
    reporter = Reporter(quiet)
    folder = config.output.dir
    started = time.perf_counter()
    run = Run(config, pass_configs, reporter, Cache(folder / CACHE_DIR, force), config.sha256())
    run.dataset, run.created_model  # a bad image folder, manifest or checkpoint fails before anything is written
    if run.pruning:
        from onnxvit.prune import check_prune_config

        check_prune_config(run.created_model, config.prune, config.model.name)
        if config.finetune is not None:
            run.finetune_images  # noqa: B018  (a bad training folder fails here too)
    prepare_output(folder)

    dense_records = []
    models = {}
    if run.pruning:
        models[DENSE_VARIANT], dense_record = run.export(dense=True)
        dense_records.append(dense_record)
        atomic_write_bytes(folder / "model.pruned.pt", run.pruned[2].read_bytes())
    fp32, export_record = run.export()
    pass_models, records = run_passes(fp32, export_record, config.passes, pass_configs, run.cache, run.context,
                                      {split: run.fingerprint(split) for split in ("calibrate", "search")},
                                      run.check, reporter.log)
    models.update(pass_models)
    records = dense_records + records
    reported = ([DENSE_VARIANT] if run.pruning else []) + [EXPORT_VARIANT] + [s.output for s in config.passes if s.report]
    paths = {}
    for name in reported:
        paths[name] = folder / f"model.{name}.onnx"
        atomic_write_bytes(paths[name], models[name].SerializeToString())

    bench = config.benchmark
    mobile = None
    if config.mobile is not None:
        from onnxvit.mobile import build_artifacts

        chosen = config.mobile.variants or reported
        mobile = build_artifacts({n: paths[n] for n in chosen}, folder, config.mobile, run.check_batches,
                                 bench.threads, reporter.log)
    lite, lite_errors = {}, {}
    if config.lite is not None:
        import torch

        from onnxvit.lite import build_lite_variants

        lite, lite_errors = build_lite_variants(run.model, config.lite, torch.from_numpy(run.calibration_images),
                                                folder, reporter.log)
    labels = run.dataset.labels("evaluate")
    eval_key = run.fingerprint("evaluate")

    def identity(name: str) -> str:
        """What a variant's logits and latency depend on."""
        if name == TORCH_VARIANT:
            return run.model_id
        if name in lite:
            import torch

            from onnxvit.lite import LITE_BUILD

            return cache_key(model=run.model_id, lite=name, torch=torch.__version__, build=LITE_BUILD,
                             calibration=run.fingerprint("calibrate"))  # static int8 calibrates
        return model_sha256(models[name])

    def logits_for(name: str) -> np.ndarray:
        def produce() -> np.ndarray:
            images = run.evaluation_images
            with reporter.task(f"evaluating {name}", len(images)) as advance:
                if name == TORCH_VARIANT or name in lite:
                    module = lite[name] if name in lite else run.model
                    return torch_eval_logits(module, images, config.data.batch_size, bench.threads, advance)
                return onnx_eval_logits(paths[name], images, config.data.batch_size, bench.threads, advance)

        return run.cache.array(f"logits-{name}", cache_key(model=identity(name), evaluate=eval_key), produce)

    names = ([TORCH_VARIANT] if bench.torch else []) + reported + list(lite)

    def runner(name: str):
        if name == TORCH_VARIANT or name in lite:
            return torch_runner(lite[name] if name in lite else run.model, run.input_shape, bench)
        return onnx_runner(paths[name], run.input_shape, bench)

    def measure() -> dict[str, dict[str, float]]:
        runners = {name: runner(name) for name in names}
        with reporter.task(f"timing {len(names)} variants", bench.rounds, live=False) as advance:
            return measure_latency(runners, bench.warmup, bench.runs, bench.rounds, lambda: advance(1))

    latency_key = cache_key(models={name: identity(name) for name in names}, benchmark=bench.model_dump(mode="json"),
                            machine=machine_info(bench.threads), shape=run.input_shape)
    reference_name = DENSE_VARIANT if run.pruning else EXPORT_VARIANT
    reference = logits_for(reference_name)
    all_scores = {name: score(logits_for(name), labels, reference) for name in names}
    latency = run.cache.json("latency", latency_key, measure)
    from onnxvit.prune import count_params_macs

    counts = run.pruned[1]["pruned"] if run.pruning else count_params_macs(run.model, run.input_shape)
    dense_counts = run.pruned[1]["dense"] if run.pruning else counts
    variants = []
    for name in names:
        if name == TORCH_VARIANT:
            variants.append(_variant(name, "torch", None, parameter_bytes(run.model), latency[name], all_scores[name],
                                     counts))
        elif name in lite:
            variants.append(_variant(name, "torch-lite", lite[name].path, lite[name].path.stat().st_size,
                                     latency[name], all_scores[name], counts))
        else:
            variants.append(_variant(name, "onnxruntime", paths[name], paths[name].stat().st_size,
                                     latency[name], all_scores[name], dense_counts if name == DENSE_VARIANT else counts))
            variants[-1]["compute_ops"] = compute_op_census(models[name])

    report = {
        "model": config.model.name,
        "onnxvit_version": __version__,
        "config_sha256": run.config_sha256,
        "machine": machine_info(bench.threads),
        "weights": "checkpoint" if config.model.checkpoint else
                   ("pretrained" if config.model.pretrained else "random_init"),
        "batch_size": bench.batch_size,
        # Paths relative to the report's folder: a report moved with its models keeps its meaning.
        "data": {"root": os.path.relpath(config.data.root, folder),
                 "manifest": os.path.relpath(config.data.manifest, folder) if config.data.manifest else None,
                 **{f"{s}_images": len(f) for s, f in run.dataset.splits.items()}},
        "reference": reference_name,
        "prune": {**run.pruned[1], "checkpoint": "model.pruned.pt"} if run.pruning else None,
        "variants": variants,
        "mobile": mobile,
        "lite": {**{name: v.notes for name, v in lite.items()}, **{name: {"error": e} for name, e in lite_errors.items()}}
        if config.lite is not None else None,
        "parity": parity(config, run, lite, {name: logits_for(name) for name in names}),
        "steps": [r.to_json() for r in records],
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_report(report, folder)
    run.cache.record_run()
    reporter.log(f"report: {folder / 'report.md'}")
    return report
