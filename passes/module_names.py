"""Module paths for ONNX nodes: ``blocks.3.mlp.fc1`` rather than ``Gemm_4/MatMul``.

The exporter writes each module's scope into node and tensor names (``/blocks/blocks.3/mlp/fc1/Add``);
simplifiers and fusions rename nodes but keep the tensors after them, so a node is named from its own
name or outputs, else from what reads them, else from a parameter only it reads.
"""

from __future__ import annotations

import re
from collections import deque

import onnx

_PARAMETER = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*)\.(?:weight|bias)$")


def module_path(name: str) -> str | None:
    """The module path in a name the exporter wrote: ``/blocks/blocks.3/mlp/fc1/Add_output_0`` (or a
    node ``/blocks/blocks.3/mlp/fc1/Add``, or a tensor a pass derived from one) -> ``blocks.3.mlp.fc1``:
    every segment but the last, where a scope that repeats the tail of its parent's qualified name is
    merged, not doubled. None for names the exporter did not write (``Gemm_4/matmul``, ``/Add_output_0``)."""
    segments = name.split("/")
    if len(segments) < 3 or segments[0]:
        return None
    path: list[str] = []
    for segment in segments[1:-1]:
        parts = segment.split(".")
        overlap = next((k for k in range(min(len(path), len(parts) - 1), 0, -1) if path[-k:] == parts[:k]), 0)
        path = path[: len(path) - overlap] + parts
    return ".".join(path) or None


def parameter_module(name: str) -> str | None:
    """``blocks.3.mlp.fc1`` for a parameter the exporter kept by its module name, ``blocks.3.mlp.fc1.bias``."""
    match = _PARAMETER.match(name.removeprefix("FusedBack_"))  # ONNX Runtime's fp16 Cast fusion prefix
    return match.group(1) if match else None


def node_modules(graph: onnx.GraphProto, hops: int = 6) -> dict[str, str]:
    """Each node's module path: from its own name or outputs, else its readers' (breadth first, up to
    ``hops``), else a parameter only it reads (``blocks.3.mlp.fc1.bias``), else its inputs; the node's
    name when none carries one."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    # a parameter read by one node only: a simplifier shares equal ones (zero biases) between layers
    own = {init.name for init in graph.initializer if len(readers.get(init.name, [])) == 1}
    result = {}
    for node in graph.node:
        found = None
        queue, seen = deque([(node, 0)]), {node.name}
        while found is None and queue:
            current, depth = queue.popleft()
            found = next((p for p in map(module_path, [current.name, *current.output]) if p), None)
            if depth < hops:
                for output in current.output:
                    for reader in readers.get(output, []):
                        if reader.name not in seen:
                            seen.add(reader.name)
                            queue.append((reader, depth + 1))
        found = found or next((p for p in (parameter_module(name) for name in node.input if name in own) if p), None)
        found = found or next((p for p in map(module_path, node.input) if p), None)
        result[node.name] = found or node.name
    return result
