"""A pruned model as a file: its state_dict plus the attribute changes that rebuild it from timm.

``load_pruned`` (also ``onnxvit.prune.load_pruned``) returns the model a report's ``model.pruned.pt``
describes, with no onnxvit run needed.
"""

from __future__ import annotations

import onnxvit._compat  # noqa: F401  (must precede timm, hence the split)

# isort: split

import io
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Attention, Mlp

from onnxvit.errors import UserError

PRUNED_FORMAT = "onnxvit-pruned/1"


def widths(model: torch.nn.Module) -> dict[str, list[int]]:
    """Per block: heads, head dim, MLP hidden width (what the report shows of the cut)."""
    attns = [m for m in model.modules() if type(m) is Attention]
    mlps = [m for m in model.modules() if type(m) is Mlp]
    return {
        "heads": [a.num_heads for a in attns],
        "head_dim": [a.head_dim for a in attns],
        "mlp_hidden": [m.fc1.out_features for m in mlps],
    }


# ---- saving: a state_dict plus the attribute changes that rebuild the architecture from timm ----

_SIMPLE = (int, float, bool, str)


def _simple_attributes(module: torch.nn.Module) -> dict[str, Any]:
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
            out[key] = value
    return out


def architecture_changes(dense: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per module, the plain attributes (in_features, num_heads, normalized_shape...) pruning changed."""
    before = {name: _simple_attributes(m) for name, m in dense.named_modules()}
    changes = {}
    for name, module in pruned.named_modules():
        after = _simple_attributes(module)
        diff = {k: v for k, v in after.items() if before.get(name, {}).get(k) != v}
        if diff:
            changes[name] = diff
    return changes


def serialize_pruned(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    summary: dict[str, Any],
) -> bytes:
    """The bytes of a ``.pt`` file that ``load_pruned`` rebuilds from timm: no pickled modules."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": PRUNED_FORMAT,
            "timm_model": model_name,
            "kwargs": model_kwargs,
            "architecture": architecture_changes(dense, pruned),
            "summary": summary,
            "state_dict": pruned.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


def is_pruned_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == PRUNED_FORMAT


def rebuild_pruned(saved: dict[str, Any]) -> torch.nn.Module:
    """The pruned model from ``save_pruned``'s payload: timm's model, resized, then loaded strictly."""
    model = timm.create_model(saved["timm_model"], pretrained=False, **saved["kwargs"])
    modules = dict(model.named_modules())
    for name, attributes in saved["architecture"].items():
        for key, value in attributes.items():
            setattr(modules[name], key, value)
    state = saved["state_dict"]
    for name, module in modules.items():
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                full = f"{name}.{key}" if name else key
                if tensor is not None and full in state and state[full].shape != tensor.shape:
                    fresh = torch.empty(state[full].shape, dtype=tensor.dtype)
                    getattr(module, kind)[key] = torch.nn.Parameter(fresh) if kind == "_parameters" else fresh
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_pruned(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not is_pruned_checkpoint(saved):
        raise UserError(f"{path}: not an onnxvit pruned checkpoint (format {PRUNED_FORMAT})")
    return rebuild_pruned(saved), saved["summary"]
