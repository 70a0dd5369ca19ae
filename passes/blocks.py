"""Blocks of a model, found from its graph, and per-block assignments of a choice.

A block is the first ``name.N`` module path a linear layer's tensors carry (``blocks.3`` in a ViT,
``stages.2`` in a hybrid); the exporter writes those paths into tensor names and fusions keep them.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Literal

import onnx

Choice = Literal["float", "int8", "w4", "w8", "a16w8"]
SYMBOL = {"float": "F", "int8": "8", "w4": "4", "w8": "W", "a16w8": "A"}
REST = "rest"
Assignment = dict[str, Choice]
_MODULE_INDEX = re.compile(r"(?:^|/)([A-Za-z_][A-Za-z0-9_]*\.\d+)(?=/|$)")


def _module_block(text: str) -> str | None:
    match = _MODULE_INDEX.search(text)
    return match.group(1) if match else None


def find_blocks(model: onnx.ModelProto, layers: list[str], hops: int = 4, min_layers: int = 2) -> dict[str, list[str]]:
    """Linear layers by block, in graph order; layers in no block, or in a group of fewer than
    ``min_layers`` (a classifier's ``classifier.0``), go under ``rest``.

    Fusions rename nodes, but the tensors downstream keep the exporter's module paths, so each
    layer takes the first ``name.N`` found in its own name, then its outputs' consumers (breadth
    first, up to ``hops``), then its inputs.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {node.name: node for node in model.graph.node}
    blocks: dict[str, list[str]] = {}
    for layer in layers:
        node = by_name[layer]
        found = _module_block(node.name)
        queue, seen = deque([(node, 0)]), {node.name}
        while found is None and queue:
            current, depth = queue.popleft()
            for output in current.output:
                found = found or _module_block(output)
                if depth < hops:
                    for nxt in consumers.get(output, []):
                        if nxt.name not in seen:
                            seen.add(nxt.name)
                            queue.append((nxt, depth + 1))
        if found is None:
            found = next((b for b in map(_module_block, node.input) if b), None)
        blocks.setdefault(found or REST, []).append(layer)
    rest = blocks.pop(REST, [])
    for name in [b for b, members in blocks.items() if len(members) < min_layers]:
        rest += blocks.pop(name)
    rest.sort(key=layers.index)
    return {**blocks, **({REST: rest} if rest else {})}


def assignment_code(assignment: Assignment, blocks: list[str]) -> str:
    """One character per block: ``F`` float, ``8`` int8, ``4`` w4, ``W`` w8, ``A`` a16w8."""
    return "".join(SYMBOL[assignment[b]] for b in blocks)
