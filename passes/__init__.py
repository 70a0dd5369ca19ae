"""ONNX graph passes, one module each, found by their YAML name through a registry (as timm's models)."""

from __future__ import annotations

from passes.base import Pass, PassConfig, PassContext

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under ``cls.name`` in the YAML."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    return sorted(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    """The pass class for a YAML name; KeyError when there is none."""
    return _REGISTRY[name]


# Importing the modules registers their passes.
from passes import (  # noqa: E402,F401
    fold_batchnorm,
    fp16,
    fuse_vit,
    mixed_precision,
    ort_baselines,
    quantize_int8,
    reparam_layernorm,
    simplify,
    zero_point_guard,
)

__all__ = ["Pass", "PassConfig", "PassContext", "get_pass", "pass_names", "register_pass"]
