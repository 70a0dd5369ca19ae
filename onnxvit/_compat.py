"""Make timm importable beside the CPU build of torch.

PyPI's torchvision wheels are compiled against the CUDA build of torch. Beside the CPU build their
C++ extension (``torchvision/_C.so``) fails to load, and ``import torchvision`` then dies in
``_meta_registrations.py`` with ``operator torchvision::nms does not exist``, because it registers
fake kernels for ops whose schemas only that extension defines. timm imports torchvision, so
timm dies too.

onnxvit never calls torchvision's detection ops. When, and only when, the extension fails to load,
this module defines the missing op schemas (no kernels) so the import succeeds; calling the ops
still fails loudly. Import it before timm: ``import onnxvit._compat  # noqa: F401``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# The schemas torchvision registers fake kernels for at import time (torchvision/_meta_registrations.py).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: dropping it would drop the schemas


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to patch
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for candidate in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(candidate))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def _has_schema(name: str) -> bool:
    return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))


def ensure_torchvision_importable() -> list[str]:
    """Define the torchvision op schemas that are missing; return their names (empty when none were)."""
    global _library
    if _extension_loads():
        return []
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if missing:
        _library = _library or torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(_SCHEMAS[name])
    return missing


ensure_torchvision_importable()
