"""The config and pass reference (docs/reference.md), generated from the pydantic models so that it
cannot drift from the code: `onnxvit reference > docs/reference.md`, and a test fails when the
committed file differs."""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from onnxvit.config import Config, model_class
from passes import get_pass, pass_names

PIPE = "\\|"  # a "|" inside a Markdown table cell
HEADER = """# Reference: the YAML config and every pass's options

Generated from the code by `onnxvit reference` (do not edit: a test compares this file with the code).
Relative paths are read against the YAML file's folder. For what the options are for, see
[guide.md](guide.md); for the passes' design, [passes.md](passes.md).
"""


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "pathlib.", "passes.quantize_int8.", "passes.mixed_precision.", "onnxvit.config."):
        text = text.replace(noise, "")
    return text.replace("PosixPath", "Path").replace("NoneType", "None")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, default=str)}`"


def fields_table(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One row per option: key, type, default, description; nested models follow as dotted keys."""
    rows, nested = [], []
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        description = (info.description or "").replace("|", PIPE)
        type_name = _type_name(info.annotation).replace("|", PIPE)
        rows.append(f"| `{key}` | {type_name} | {_default(info)} | {description} |")
        inner = model_class(info.annotation)
        if inner is not None and name != "options":
            nested.append((key, inner))
    lines = ["| key | type | default | description |", "|---|---|---|---|", *rows]
    for key, inner in nested:
        lines += ["", f"`{key}`:", "", *fields_table(inner, f"{key}.")]
    return lines


def summary(cls: type) -> str:
    """A pass's first sentence: its class docstring, or its module's."""
    doc = " ".join((cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").split())
    return doc.split(". ")[0].rstrip(".") + "."


def reference() -> str:
    """docs/reference.md's text."""
    parts = [HEADER, "", "## The config", ""]
    for name, info in Config.model_fields.items():
        inner = model_class(info.annotation)
        parts += [f"### `{name}`", "", info.description or "", ""]
        if inner is not None:
            if inner.__doc__ and inner.__doc__ != BaseModel.__doc__ and "StrictModel" not in inner.__doc__:
                parts += [" ".join(inner.__doc__.split()), ""]
            parts += [*fields_table(inner, f"{name}."), ""]
    parts += ["## Passes", "", "A step's `options` are its pass's options, below.", ""]
    for name in pass_names():
        cls = get_pass(name)
        needs: list[str] = sorted(cls.requirements(cls.Config())) or ["nothing"]
        parts += [
            f"### `{name}`",
            "",
            summary(cls),
            "",
            f"Version {cls.version}. Needs, with the default options: {', '.join(needs)}.",
            "",
            *fields_table(cls.Config),
            "",
        ]
    return "\n".join(line.rstrip() for line in parts).rstrip() + "\n"
