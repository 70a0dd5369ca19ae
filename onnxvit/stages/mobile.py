"""Stage mobile: the hand-off files (``.ort`` twins, checked, and the reduced-build operator config) and
the PyTorch Lite variants with their parity to ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onnxvit.config import EXPORT_VARIANT
from onnxvit.engine import cache_key
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.runtime import batches, model_logits

BAKED_SUFFIX = "-rgb8"  # model.NAME-rgb8.onnx / .ort: the preprocessing baked in


def handoff(run: Run) -> dict[str, Any]:
    """``preprocess.json`` and ``labels.txt`` beside the models; report.json's ``handoff``."""
    from onnxvit.handoff import class_names, write_handoff

    classes = int(getattr(run.created_model, "num_classes", 0) or len(run.dataset.folder.classes))
    return write_handoff(run.config.output.dir, preprocess(run), class_names(run.dataset.folder.classes, classes))


def ort_artifacts(run: Run, variants: list[Variant]) -> dict[str, Any] | None:
    """report.json's ``mobile``: each chosen ONNX variant as ``.ort`` (and, when asked, its twin with
    the preprocessing baked in), reloaded and compared to its ``.onnx``, then run by onnxruntime-web."""
    config = run.config.mobile
    if config is None:
        return None
    from onnxvit.mobile import build_artifacts

    chosen = config.variants or [v.name for v in variants]
    paths = {v.name: v.path for v in variants if v.name in chosen and v.path is not None}
    inputs: dict[str, list[np.ndarray]] = {}
    baked_sources: dict[str, str] = {}
    crops = _check_crops(run) if config.bake_preprocessing else np.zeros(0, np.uint8)
    if config.bake_preprocessing:
        for name, path in list(paths.items()):
            baked_name = f"{name}{BAKED_SUFFIX}"
            paths[baked_name] = _write_baked(run, path, baked_name)
            inputs[baked_name] = batches(crops, run.config.benchmark.batch_size)
            baked_sources[baked_name] = name
    section = build_artifacts(
        paths,
        run.config.output.dir,
        config,
        run.check_batches,
        run.config.benchmark.threads,
        run.reporter.log,
        inputs,
    )
    for entry in section["artifacts"]:
        if entry["variant"] in baked_sources and entry.get("path"):
            entry["baked_preprocessing"] = True
            source = paths[baked_sources[entry["variant"]]]
            entry["vs_timm"] = _baked_against_timm(run, paths[entry["variant"]], source, crops)
    section["web"] = _web_check(run, section, inputs) if config.web_check else "not checked: mobile.web_check is off"
    return section


def uint8_crops(run: Run, files: list[str]) -> np.ndarray:
    """Images of the folder as a baked model takes them: resized and center-cropped, uint8 HWC."""
    from onnxvit.data import load_image
    from onnxvit.handoff import crop_uint8

    spec = preprocess(run)
    return np.stack([load_image(run.dataset.folder, f, lambda image: crop_uint8(image, spec)) for f in files])


def _check_crops(run: Run) -> np.ndarray:
    return uint8_crops(run, run.dataset.splits["calibrate"][: run.config.data.check_images])


def preprocess(run: Run) -> dict[str, Any]:
    """``preprocess.json``'s content for this run's model."""
    from onnxvit.export import INPUT_NAME
    from onnxvit.handoff import preprocess_document

    transform, data_config = run.preprocessing
    return preprocess_document(transform, data_config, INPUT_NAME)


def _write_baked(run: Run, source: Path, name: str) -> Path:
    """``source`` with the preprocessing baked in, written beside it as ``model.NAME.onnx``."""
    import onnx

    from onnxvit.fileio import atomic_write_bytes
    from onnxvit.handoff import bake_preprocessing

    path = run.config.output.dir / f"model.{name}.onnx"
    atomic_write_bytes(path, bake_preprocessing(onnx.load(source), preprocess(run)).SerializeToString())
    return path


def _baked_against_timm(run: Run, baked: Path, source: Path, crops: np.ndarray) -> dict[str, Any]:
    """The baked model on the check images' uint8 ``crops`` against its source model on timm's
    transform of the same images."""
    from passes.metrics import max_abs_diff, top1_agreement

    threads, size = run.config.benchmark.threads, run.config.benchmark.batch_size
    ours = model_logits(baked, batches(crops, size), threads)
    timm_way = model_logits(source, run.check_batches, threads)
    return {"max_abs": round(max_abs_diff(ours, timm_way), 6), "argmax_equal": top1_agreement(ours, timm_way) == 100.0}


def _web_check(run: Run, section: dict[str, Any], inputs: dict[str, list[np.ndarray]]) -> dict[str, Any] | str:
    """Every converted `.ort` run by onnxruntime-web in Node.js against Python's run of the same file."""
    from onnxvit.web_check import WebModel, not_checked, run_in_node

    folder = run.config.mobile.ort_web if run.config.mobile else None
    reason = not_checked(folder)
    if reason is not None:
        run.reporter.log(f"mobile: {reason}")
        return reason
    threads, out = run.config.benchmark.threads, run.config.output.dir
    models = []
    for entry in section["artifacts"]:
        if not entry.get("path"):
            continue
        images = np.concatenate(inputs.get(entry["variant"], run.check_batches))
        reference = model_logits(out / entry["path"], batches(images, 1), threads)
        models.append(WebModel(entry["variant"], out / entry["path"], images, reference))
    results = run_in_node(models, folder)
    for entry in section["artifacts"]:
        if entry["variant"] in results:
            entry["web"] = results[entry["variant"]]
    return {"runtime": "onnxruntime-web (WebAssembly) under Node.js", "checked": len(results)}


def lite_variants(run: Run, model: Any, model_id: str, counts: dict[str, int]) -> tuple[list[Variant], dict[str, Any]]:
    """The Lite interpreter variants of ``model`` and report.json's ``lite`` (notes, or why one failed)."""
    config = run.config.lite
    if config is None:
        return [], {}
    import torch

    from onnxvit.lite import LITE_BUILD, build_lite_variants

    built, errors = build_lite_variants(
        model, config, torch.from_numpy(run.calibration_images), run.config.output.dir, run.reporter.log
    )
    variants = [
        Variant(
            name,
            "torch-lite",
            cache_key(
                model=model_id,
                lite=name,
                torch=torch.__version__,
                build=LITE_BUILD,
                calibration=run.fingerprint("calibrate"),
            ),
            module=lite,
            path=lite.path,
            size_bytes=lite.path.stat().st_size,
            counts=counts,
        )
        for name, lite in built.items()
    ]
    notes = {**{name: lite.notes for name, lite in built.items()}, **{name: {"error": e} for name, e in errors.items()}}
    return variants, notes


def parity(
    run: Run, int8_steps: list[str], lite_names: list[str], logits: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Each ONNX variant beside its PyTorch counterpart: fp32 with lite-fp32, int8 steps with lite-int8-*."""
    if run.config.lite is None:
        return []
    from onnxvit.lite import parity_table

    pairs = [(EXPORT_VARIANT, "lite-fp32", "fp32")] if "lite-fp32" in lite_names else []
    pairs += [(step, name, "int8") for step in int8_steps for name in lite_names if name.startswith("lite-int8")]
    return parity_table(logits, pairs, run.config.lite)
