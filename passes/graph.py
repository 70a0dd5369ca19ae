"""Small helpers for the passes that rewrite ONNX graphs by pattern: who produces and who consumes
a tensor, constant values, attributes, and swapping a matched group of nodes for new ones."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


STANDARD_DOMAINS = ("", "ai.onnx")


def model_problem(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is not a valid ONNX model, or None. The full check (with shape inference) where
    every op is a standard one; with contrib ops, which the checker cannot know, the structural check
    plus topological order."""
    try:
        if all(node.domain in STANDARD_DOMAINS for node in model.graph.node):
            onnx.checker.check_model(model, full_check=True)
            return None
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return " ".join(str(exc).split())[:300]
    ready = {"", *(i.name for i in model.graph.input), *(t.name for t in model.graph.initializer)}
    for node in model.graph.node:
        missing = [name for name in node.input if name not in ready]
        if missing:
            return f"node {node.name or node.op_type} reads {missing[0]} before any node writes it"
        ready.update(node.output)
    return None


def topological_sort(model: onnx.ModelProto) -> int:
    """Reorder the graph's nodes so that each comes after the producers of its inputs (ONNX requires it;
    ONNX Runtime tolerates disorder, other tools do not), keeping the given order where it is valid.
    Returns how many nodes moved; raises ValueError on a cycle or an input nothing produces."""
    graph = model.graph
    ready = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    nodes = list(graph.node)
    pending, order = list(range(len(nodes))), []
    while pending:
        waiting = []
        for index in pending:
            if all(name in ready for name in nodes[index].input):
                order.append(index)
                ready.update(nodes[index].output)
            else:
                waiting.append(index)
        if len(waiting) == len(pending):
            missing = sorted({n for i in waiting for n in nodes[i].input if n not in ready})[:3]
            raise ValueError(f"graph cannot be ordered: no producer for {missing}")
        pending = waiting
    moved = sum(i != j for i, j in enumerate(order))
    if moved:
        copies = [onnx.NodeProto.FromString(nodes[i].SerializeToString()) for i in order]
        del graph.node[:]
        graph.node.extend(copies)
    return moved


def model_sha256(model: onnx.ModelProto) -> str:
    """The digest of the model's deterministic serialization: what caches key a model by."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def same_computation(first: onnx.ModelProto, second: onnx.ModelProto) -> bool:
    """Whether two models compute the same outputs from the same inputs by the same ops on the same
    constants, whatever their node and tensor names or node order: each tensor is identified by a
    digest of what computes it (a constant by its values), and the graph outputs' are compared. A
    model with subgraphs is never called the same (their names are not resolved)."""

    def digest(*parts: bytes | str) -> str:
        hasher = hashlib.sha256()
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            hasher.update(len(data).to_bytes(8, "little") + data)
        return hasher.hexdigest()

    def identities(model: onnx.ModelProto) -> list[tuple[str, str]] | None:
        graph = model.graph
        known = {"": "none"}
        known.update({i.name: digest("input", i.name, i.type.SerializeToString()) for i in graph.input})
        for init in graph.initializer:
            values = numpy_helper.to_array(init)
            known[init.name] = digest("constant", values.dtype.str, str(values.shape), values.tobytes())
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return None
            if any(name not in known for name in node.input):
                return None
            attributes = [a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name)]
            computed = digest(node.domain or "ai.onnx", node.op_type, *attributes, "|", *(known[n] for n in node.input))
            for index, name in enumerate(node.output):
                known[name] = digest(computed, str(index))
        return [(o.name, known.get(o.name, "unknown")) for o in graph.output]

    ours, theirs = identities(first), identities(second)
    return ours is not None and ours == theirs


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def weight_channel_axis(node: onnx.NodeProto) -> int | None:
    """The output-channel axis of a Conv / MatMul / Gemm's weight (its second input); None for other ops."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return 0
    return -1 if node.op_type in ("MatMul", "Gemm") else None


class GraphIndex:
    """Producers, consumers and constants of one graph, as they were when the index was built."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_outputs = {out.name for out in graph.output}

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def sole_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        nodes = self.consumers.get(name, [])
        if len(nodes) == 1 and nodes[0].op_type == op_type and name not in self.graph_outputs:
            return nodes[0]
        return None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output; None for computed tensors."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def is_constant(self, name: str) -> bool:
        return self.constant(name) is not None

    def private(self, nodes: list[onnx.NodeProto], keep: onnx.NodeProto, shared: tuple[str, ...] = ()) -> bool:
        """Whether every output of ``nodes`` except ``keep``'s (and the ``shared`` tensors, which the
        replacement also produces) is used only inside ``nodes``, so the group can be replaced as a whole."""
        inside = {id(node) for node in nodes}
        for node in nodes:
            if node is keep:
                continue
            for out in node.output:
                if out in shared:
                    continue
                if out in self.graph_outputs or any(id(c) not in inside for c in self.consumers.get(out, [])):
                    return False
        return True


def rebuild(
    model: onnx.ModelProto,
    replacements: dict[int, list[onnx.NodeProto]],
    removed: set[int],
    initializers: list[onnx.TensorProto],
) -> None:
    """Put each replacement list where the node with that ``id`` was, drop ``removed`` nodes, add
    ``initializers``, then drop constants nothing reads and shape annotations of tensors that
    no longer exist or changed meaning (ONNX Runtime trusts stale ones)."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replacements:
            nodes.extend(replacements[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    used = {name for node in nodes for name in node.input} | {out.name for out in graph.output}
    nodes = [node for node in nodes if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    prune_initializers(model)
    rewritten = {out for new in replacements.values() for node in new for out in node.output}
    produced = {out for node in graph.node for out in node.output}
    annotations = [vi for vi in graph.value_info if vi.name in produced and vi.name not in rewritten]
    del graph.value_info[:]
    graph.value_info.extend(annotations)


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers that no node and no graph output reads (rewrites leave the old ones behind)."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def use_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes ONNX shape inference finds (None for symbolic dimensions)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {}
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim
            ]
    return shapes


def gemms_as_matmul(model: onnx.ModelProto) -> int:
    """Every plain ``Gemm(x, W, b)`` with constant W becomes ``MatMul`` (keeping the Gemm's name) +
    ``Add``: the form ONNX Runtime's int8 MatMul kernels fuse, and names that quantizer node lists
    can still find (ONNX Runtime's dynamic quantizer renames Gemms it converts itself)."""
    index = GraphIndex(model)
    replacements, initializers = {}, []
    for gemm in model.graph.node:
        if (
            gemm.op_type != "Gemm"
            or attribute(gemm, "transA", 0)
            or attribute(gemm, "alpha", 1.0) != 1.0
            or attribute(gemm, "beta", 1.0) != 1.0
        ):
            continue
        weight = index.constant(gemm.input[1])
        bias = index.constant(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
        if weight is None or (len(gemm.input) > 2 and gemm.input[2] and (bias is None or bias.ndim > 1)):
            continue
        name = gemm.name
        if attribute(gemm, "transB", 0):
            weight = weight.T
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(weight), f"{name}/weight"))
        new = [
            helper.make_node(
                "MatMul",
                [gemm.input[0], f"{name}/weight"],
                [gemm.output[0] if bias is None else f"{name}/matmul"],
                name=name,
            )
        ]
        if bias is not None:
            initializers.append(numpy_helper.from_array(bias.reshape(-1), f"{name}/bias"))
            new.append(
                helper.make_node("Add", [f"{name}/matmul", f"{name}/bias"], [gemm.output[0]], name=f"{name}/Add")
            )
        replacements[id(gemm)] = new
    if replacements:
        rebuild(model, replacements, set(), initializers)
    return len(replacements)


# Ops that carry integer weights or activations, standard and com.microsoft (QLinear* by prefix).
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "QGemm",
    "QAttention",
    "MatMulNBits",
}
_CONVERTERS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "MultiHeadAttention", "Attention"}


def compute_op_census(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """The heavy ops by precision: ``integer`` (quantized kernels, and QDQ-wrapped ops whose inputs
    all come from DequantizeLinear, which ONNX Runtime fuses) and ``float``. Says why an int8 model
    is not faster: what still computes in float."""
    wide = {
        init.name
        for init in model.graph.initializer
        if init.data_type in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32)
    }
    # an int16 QDQ pair has no integer kernel here: the op between runs in float
    dequantized = {
        out
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and not (len(node.input) > 2 and node.input[2] in wide)
        for out in node.output
    }
    census: dict[str, dict[str, int]] = {"integer": {}, "float": {}}
    for node in model.graph.node:
        op = node.op_type
        if op in _CONVERTERS:
            continue
        if op in QUANTIZED_OPS or op.startswith("QLinear"):
            kind = "integer"
        elif op in _COMPUTE:
            data_inputs = [name for name in node.input[:2] if name]
            kind = "integer" if data_inputs and all(name in dequantized for name in data_inputs) else "float"
        else:
            continue
        census[kind][op] = census[kind].get(op, 0) + 1
    return census


_RESHAPES = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}


def find_bridges(model: onnx.ModelProto, hops: int = 8) -> list[dict[str, Any]]:
    """Q-HyViT's bridge blocks, found from the graph: where a conv feature map (4-D, reached from a
    Conv) becomes a token sequence (3-D, reaching a MatMul / Gemm), or back. Each entry names the
    reshape, its direction, and the two weighted layers on either side of it."""
    shapes = tensor_shapes(model)
    index = GraphIndex(model)

    def weighted(node: onnx.NodeProto, ops: tuple[str, ...]) -> bool:
        return node.op_type in ops and len(node.input) > 1 and index.is_constant(node.input[1])

    def nearest(tensor: str, downstream: bool, ops: tuple[str, ...]) -> onnx.NodeProto | None:
        """The first weighted layer met walking from ``tensor``; None if another kind comes first."""
        frontier, seen = [tensor], set()
        for _ in range(hops):
            nodes = (
                [c for t in frontier for c in index.consumers.get(t, [])]
                if downstream
                else [index.producer[t] for t in frontier if t in index.producer]
            )
            following = []
            for node in nodes:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if weighted(node, ("Conv", "MatMul", "Gemm")):
                    return node if node.op_type in ops else None
                following += list(node.output) if downstream else [i for i in node.input if not index.is_constant(i)]
            frontier = following
        return None

    bridges = []
    for node in model.graph.node:
        if node.op_type not in _RESHAPES:
            continue
        before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
        if before is None or after is None or (len(before), len(after)) not in ((4, 3), (3, 4)):
            continue
        to_tokens = len(before) == 4
        conv = nearest(node.input[0] if to_tokens else node.output[0], downstream=not to_tokens, ops=("Conv",))
        linear = nearest(node.output[0] if to_tokens else node.input[0], downstream=to_tokens, ops=("MatMul", "Gemm"))
        if conv is not None and linear is not None:
            bridges.append(
                {
                    "at": node.name or node.output[0],
                    "kind": "to_tokens" if to_tokens else "to_feature_map",
                    "conv": conv.name,
                    "linear": linear.name,
                }
            )
    return bridges


def graph_suffix(model: onnx.ModelProto, start: int, dtypes: dict[str, int]) -> onnx.ModelProto:
    """The nodes from index ``start`` on (of a topologically sorted graph) as a model of its own: its
    inputs are what those nodes read from earlier nodes or the graph's inputs (``dtypes`` gives
    their element types), its outputs the graph's. A search that changes one layer reruns only this."""
    graph = model.graph
    nodes = list(graph.node[start:])
    needed = suffix_inputs(model, start)
    used = {name for node in nodes for name in node.input}
    suffix = helper.make_graph(
        nodes,
        f"{graph.name}_from_{start}",
        [helper.make_tensor_value_info(name, dtypes[name], None) for name in needed],
        list(graph.output),
        [init for init in graph.initializer if init.name in used],
    )
    cut = helper.make_model(suffix, opset_imports=list(model.opset_import))
    cut.ir_version = model.ir_version
    return cut


def suffix_inputs(model: onnx.ModelProto, start: int) -> list[str]:
    """The tensors ``graph_suffix(model, start)`` reads from before ``start``."""
    graph = model.graph
    produced = {out for node in graph.node[start:] for out in node.output}
    initializers = {init.name for init in graph.initializer}
    return list(
        dict.fromkeys(
            name
            for node in graph.node[start:]
            for name in node.input
            if name and name not in produced and name not in initializers
        )
    )


def region_inputs(graph: onnx.GraphProto, start: str, end: str) -> list[str]:
    """What the nodes between tensors ``start`` and ``end`` (those on a path from one to the other)
    read from outside them, ``start`` first, initializers left out: fed these, the nodes compute
    ``end`` without the model before them (a residual branch's other input, say)."""
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    after: set[int] = set()
    stack = [start]
    while stack:
        for index in consumers.get(stack.pop(), []):
            if index not in after:
                after.add(index)
                stack.extend(graph.node[index].output)
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    before: set[int] = set()
    stack = [end]
    while stack:
        name = stack.pop()
        source = producer.get(name)
        if name == start or source is None or source in before:
            continue
        before.add(source)
        stack.extend(graph.node[source].input)
    region = sorted(after & before)
    # what needs no feed: initializers, and Constant nodes' outputs (a piece takes those nodes along)
    known = {out for index in region for out in graph.node[index].output} | {i.name for i in graph.initializer}
    known |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    read = (name for index in region for name in graph.node[index].input)
    return list(dict.fromkeys([start, *(name for name in read if name and name not in known)]))


def constants_as_initializers(model: onnx.ModelProto, names: set[str]) -> int:
    """The Constant nodes (tensor ``value``) that produce ``names``, made initializers: ONNX Runtime's
    quantizer takes a weight's scales and zero points only for an initializer. Returns how many."""
    moved = 0
    for node in list(model.graph.node):
        if node.op_type != "Constant" or node.output[0] not in names:
            continue
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if value is None:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
        moved += 1
    return moved


def value_typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a type for every tensor, as onnx's Extractor needs: inferred where ONNX can, float
    elsewhere (outputs of rewrites and of com.microsoft ops)."""
    typed = onnx.shape_inference.infer_shapes(model)
    known = {vi.name for vi in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]}
    typed.graph.value_info.extend(
        helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
        for node in typed.graph.node
        for out in node.output
        if out and out not in known
    )
    return typed
