"""The PyTorch Lite arm: TorchScript trace, optional mobile optimization, the Lite interpreter.

PQV-Mobile's baseline path: a traced model saved with ``_save_for_lite_interpreter`` and run by
``_load_for_lite_interpreter``, in FP32 or with PyTorch's dynamic int8 Linear on one of its
quantized engines. ``optimize_for_mobile`` needs XNNPACK, which CPU builds may lack; then it is
skipped and the notes say so. (PyTorch marks the Lite interpreter legacy in favour of ExecuTorch.)
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.backends.xnnpack

from onnxvit.config import LiteConfig
from onnxvit.errors import UserError
from onnxvit.fileio import atomic_write_via

LITE_BUILD = 2  # in cache keys: version 1 loaded every int8 model with the default engine


def quantized_engines() -> list[str]:
    """PyTorch's quantized engines on this CPU (x86, fbgemm, qnnpack, onednn...)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_engines(config: LiteConfig) -> None:
    """Refuse, before anything runs, a Lite section naming an engine this torch build does not have."""
    for field_name in ("int8_engines", "static_engines"):
        for engine in getattr(config, field_name):
            if engine not in quantized_engines():
                raise UserError(
                    f"lite.{field_name}: '{engine}' is not a quantized engine of this torch build; "
                    f"available: {', '.join(quantized_engines())}"
                )


@contextlib.contextmanager
def quantized_engine(engine: str | None) -> Iterator[None]:
    """Run quantized ops on ``engine``: it is a process-wide setting, restored after."""
    if engine is None:
        yield
        return
    if engine not in quantized_engines():
        raise UserError(
            f"quantized engine '{engine}' is not in this torch build; available: {', '.join(quantized_engines())}"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def dynamic_int8_linear(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    """PyTorch dynamic int8 of every nn.Linear (what PQV-Mobile shipped), on a copy."""
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices: it is PQV-Mobile's path
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def static_int8(model: torch.nn.Module, engine: str, calibration: torch.Tensor) -> torch.nn.Module:
    """PyTorch static int8 through FX graph mode, calibrated on ``calibration``, on a copy."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quantized_engine(engine), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(
            copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), example_inputs=(calibration[:1],)
        )
        for start in range(0, len(calibration), 8):
            prepared(calibration[start : start + 8])
        return convert_fx(prepared)


def save_lite(model: torch.nn.Module, example: torch.Tensor, path: Path, engine: str | None = None) -> dict[str, Any]:
    """Trace ``model`` and write a ``.ptl`` for the Lite interpreter (atomically); return notes."""
    notes: dict[str, Any] = {"xnnpack": bool(torch.backends.xnnpack.enabled)}
    with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on timm's shape asserts: shapes are fixed here
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        if notes["xnnpack"]:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            traced = optimize_for_mobile(traced)
            notes["optimize_for_mobile"] = True
        else:
            notes["optimize_for_mobile"] = "skipped: this torch build has no XNNPACK"
        atomic_write_via(path, lambda temporary: traced._save_for_lite_interpreter(str(temporary)))
    notes["size_bytes"] = path.stat().st_size
    return notes


def load_lite(path: Path) -> Any:
    from torch.jit.mobile import _load_for_lite_interpreter

    return _load_for_lite_interpreter(str(path))


@dataclass
class LiteVariant:
    """One Lite-interpreter report variant: its file, its engine (None for FP32), the loaded module."""

    name: str
    path: Path
    engine: str | None
    module: Any
    notes: dict[str, Any]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with quantized_engine(self.engine):
            return self.module(x)


def build_lite_variants(
    model: torch.nn.Module,
    config: LiteConfig,
    calibration: torch.Tensor,
    folder: Path,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[dict[str, LiteVariant], dict[str, str]]:
    """`lite-fp32`, `lite-int8-ENGINE` (dynamic) and `lite-int8-static-ENGINE`, saved as .ptl, loaded back.

    A model that cannot be quantized or traced is one line (returned per variant, and logged); the
    run goes on without it.
    """
    wanted: list[tuple[str, str | None, bool]] = (
        ([("lite-fp32", None, False)] if config.fp32 else [])
        + [(f"lite-int8-{engine}", engine, False) for engine in config.int8_engines]
        + [(f"lite-int8-static-{engine}", engine, True) for engine in config.static_engines]
    )
    variants, errors = {}, {}
    for name, engine, static in wanted:
        path = folder / f"model.{name}.ptl"
        try:
            if engine is None:
                body = model
            else:
                body = static_int8(model, engine, calibration) if static else dynamic_int8_linear(model, engine)
            notes = save_lite(body, calibration[:1], path, engine)
            with quantized_engine(engine):  # packed int8 weights are re-packed at load, for the engine then set
                module = load_lite(path)
            variants[name] = LiteVariant(name, path, engine, module, notes)
        except UserError:
            raise
        except Exception as exc:  # tracing and the Lite exporter raise many kinds
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            errors[name] = f"cannot build a Lite model: {type(exc).__name__}: {first}"
            log(f"{name}: {errors[name]}")
    return variants, errors


def parity_table(
    logits: dict[str, np.ndarray], pairs: list[tuple[str, str, str]], config: LiteConfig
) -> list[dict[str, Any]]:
    """Each (ONNX variant, PyTorch counterpart, kind) pair compared on the evaluation images.

    FP32 pairs must agree to ``parity_atol`` on every logit; int8 pairs, whose two quantizers
    differ by design, to ``parity_min_agreement`` percent of top-1 classes.
    """
    from passes.metrics import capped_sqnr_db, max_abs_diff, top1_agreement

    rows = []
    for onnx_name, torch_name, kind in pairs:
        a, b = logits[onnx_name], logits[torch_name]
        row = {
            "onnx": onnx_name,
            "torch": torch_name,
            "kind": kind,
            "max_abs": round(max_abs_diff(a, b), 6),
            "agree_top1": round(top1_agreement(a, b), 4),
            "sqnr_db": round(capped_sqnr_db(a, b), 3),
        }
        row["ok"] = (
            row["max_abs"] <= config.parity_atol if kind == "fp32" else row["agree_top1"] >= config.parity_min_agreement
        )
        rows.append(row)
    return rows
