"""Stage mobile: the hand-off files (``.ort`` twins, checked, and the reduced-build operator config) and
the PyTorch Lite variants with their parity to ONNX Runtime."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxvit.config import EXPORT_VARIANT
from onnxvit.engine import cache_key
from onnxvit.stages.load import Run
from onnxvit.variant import Variant


def ort_artifacts(run: Run, variants: list[Variant]) -> dict[str, Any] | None:
    """report.json's ``mobile``: each chosen ONNX variant as ``.ort``, reloaded and compared to its ``.onnx``."""
    config = run.config.mobile
    if config is None:
        return None
    from onnxvit.mobile import build_artifacts

    chosen = config.variants or [v.name for v in variants]
    paths = {v.name: v.path for v in variants if v.name in chosen and v.path is not None}
    return build_artifacts(
        paths, run.config.output.dir, config, run.check_batches, run.config.benchmark.threads, run.reporter.log
    )


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
