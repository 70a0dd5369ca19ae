"""The PyTorch Lite arm: TorchScript trace, optional mobile optimization, the Lite interpreter.

PQV-Mobile's baseline path: a traced model saved with ``_save_for_lite_interpreter`` and run by
``_load_for_lite_interpreter``, in FP32 or with PyTorch's dynamic int8 Linear on one of its
quantized engines. ``optimize_for_mobile`` needs XNNPACK, which CPU builds may lack; then it is
skipped and the notes say so. (PyTorch marks the Lite interpreter legacy in favour of ExecuTorch.)
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.backends.xnnpack

from onnxvit.errors import UserError


def quantized_engines() -> list[str]:
    """PyTorch's quantized engines on this CPU (x86, fbgemm, qnnpack, onednn...)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


@contextlib.contextmanager
def quantized_engine(engine: str | None) -> Iterator[None]:
    """Run quantized ops on ``engine``: it is a process-wide setting, restored after."""
    if engine is None:
        yield
        return
    if engine not in quantized_engines():
        raise UserError(f"quantized engine '{engine}' is not in this torch build; "
                        f"available: {', '.join(quantized_engines())}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def dynamic_int8_linear(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    """PyTorch dynamic int8 of every nn.Linear (what PQV-Mobile shipped), on a copy."""
    with quantized_engine(engine):
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def save_lite(model: torch.nn.Module, example: torch.Tensor, path: Path,
              engine: str | None = None) -> dict[str, Any]:
    """Trace ``model`` and write a ``.ptl`` for the Lite interpreter (atomically); return notes."""
    notes: dict[str, Any] = {"xnnpack": bool(torch.backends.xnnpack.enabled)}
    with quantized_engine(engine), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        if notes["xnnpack"]:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            traced = optimize_for_mobile(traced)
            notes["optimize_for_mobile"] = True
        else:
            notes["optimize_for_mobile"] = "skipped: this torch build has no XNNPACK"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            temporary = Path(handle.name)
        try:
            traced._save_for_lite_interpreter(str(temporary))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    notes["size_bytes"] = path.stat().st_size
    return notes


def load_lite(path: Path) -> Any:
    from torch.jit.mobile import _load_for_lite_interpreter

    return _load_for_lite_interpreter(str(path))
