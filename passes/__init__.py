"""ONNX graph passes, one module each, found by their YAML name through a lazy registry (as timm's
models): naming a pass imports its module and nothing else, and ``import passes`` imports no pass.

This package is the lower layer: it never imports ``onnxvit`` (the pipeline above it), nor torch.
"""

from __future__ import annotations

import importlib

from passes.base import Pass, PassConfig, PassContext, PassError

# YAML name -> module under passes/ that defines it. A test checks this table against the classes.
PASS_MODULES: dict[str, str] = {
    "fold_batchnorm": "fold_batchnorm",
    "fp16": "fp16",
    "fuse_vit": "fuse_vit",
    "mixed_precision": "mixed_precision",
    "ort_default": "ort_baselines",
    "ort_dynamic": "ort_baselines",
    "qattention": "qattention",
    "quantize_int8": "quantize_int8",
    "reparam_layernorm": "reparam_layernorm",
    "simplify": "simplify",
    "skip_layernorm": "skip_layernorm",
    "zero_point_guard": "zero_point_guard",
}

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under ``cls.name`` in the YAML."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    return sorted(PASS_MODULES)


def get_pass(name: str) -> type[Pass]:
    """The pass class for a YAML name (its module imported on first use); KeyError when there is none."""
    if name not in _REGISTRY:
        importlib.import_module(f"passes.{PASS_MODULES[name]}")
    return _REGISTRY[name]


__all__ = ["PASS_MODULES", "Pass", "PassConfig", "PassContext", "PassError", "get_pass", "pass_names", "register_pass"]
