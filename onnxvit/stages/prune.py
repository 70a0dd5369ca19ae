"""Stage prune: structured pruning (and distillation) of the dense model, cached as a rebuildable .pt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxvit.config import PruneConfig
from onnxvit.engine import cache_key
from onnxvit.errors import UserError
from onnxvit.stages.load import Run


@dataclass
class Pruned:
    """The pruned model, what pruning did (report.json's ``prune``), its checkpoint and cache key."""

    model: Any
    summary: dict[str, Any]
    path: Path
    key: str


def check(run: Run) -> None:
    """The prune and fine-tune mistakes found before anything runs: the structure, the training folder."""
    from onnxvit.prune import check_prune_config

    config = run.config
    if config.prune is not None:
        check_prune_config(run.created_model, config.prune, config.model.name)
        if config.finetune is not None:
            finetune_images(run)


def finetune_images(run: Run) -> Any:
    """The fine-tune's images: its own folder, or the calibrate + search splits, never the evaluation split."""
    from onnxvit.data import scan_image_folder
    from onnxvit.finetune import TrainImages

    assert run.config.finetune is not None
    root = run.config.finetune.root
    if root is None:
        files = run.dataset.splits["calibrate"] + run.dataset.splits["search"]
        return TrainImages(run.dataset.folder, files, f"calibrate + search splits of data.root ({len(files)} images)")
    if root.resolve() == run.dataset.folder.root.resolve():
        raise UserError(
            f"finetune.root: {root} is data.root, whose evaluation split the report scores; "
            "leave finetune.root empty to train on the calibrate and search splits only"
        )
    folder = scan_image_folder(root)
    return TrainImages(folder, folder.files, f"{root} ({len(folder.files)} images)")


def gradient_labels(run: Run, config: PruneConfig) -> np.ndarray | None:
    """Calibration labels for Taylor / Hessian, or None to use the dense model's predictions."""
    labels = run.dataset.labels("calibrate")
    classes = getattr(run.dense_model, "num_classes", 0)
    fits = len(labels) > 0 and int(np.max(labels)) < classes
    if config.loss == "labels" and not fits:
        raise UserError(
            f"prune.loss: the folder's labels go up to {int(np.max(labels))} but the model has "
            f"{classes} classes; use loss: predictions"
        )
    if config.loss == "predictions" or (config.loss == "auto" and (run.config.model.random_init or not fits)):
        return None
    return labels


def prune(run: Run, config: PruneConfig | None = None) -> Pruned:
    """The dense model pruned as ``config`` (default: the run's) says, fine-tuned when the run asks."""
    import torch_pruning

    from onnxvit.prune import load_pruned, prune_model, serialize_pruned

    cfg = config or run.config.prune
    assert cfg is not None
    finetune = run.config.finetune
    train = finetune_images(run) if finetune else None
    key = cache_key(
        weights=run.weights_id,
        prune=cfg.model_dump(mode="json"),
        calibration=run.fingerprint("calibrate"),
        torch_pruning=torch_pruning.__version__,
        finetune=finetune.model_dump(mode="json") if finetune else None,
        finetune_images=train.files if train else None,
    )
    fresh: list[Any] = []

    def produce() -> bytes:
        images = run.calibration_images
        used = min(len(images), cfg.batches * cfg.batch_size) if cfg.method in ("taylor", "hessian") else 0
        with run.reporter.task(f"pruning ({cfg.method} importance)", used) as advance:
            pruned, summary = prune_model(
                run.dense_model,
                cfg,
                images,
                gradient_labels(run, cfg),
                run.config.model.name,
                advance,
                run.reporter.log,
            )
        if finetune is not None and train is not None:
            from onnxvit.finetune import distill

            summary["finetune"] = distill(
                pruned, run.dense_model, train, finetune, run.cache.folder, key, run.reporter.task, run.reporter.log
            )
        fresh.append(pruned)
        return serialize_pruned(run.dense_model, pruned, run.config.model.name, run.model_kwargs, summary)

    path = run.cache.blob("pruned", key, ".pt", produce)
    model, summary = load_pruned(path)
    run.reporter.log(
        f"prune: {cfg.method}, removed {summary['removed']['params']:.1%} of parameters, "
        f"{summary['removed']['macs']:.1%} of MACs{'' if fresh else ' (cached)'}"
    )
    return Pruned(model, summary, path, key)
