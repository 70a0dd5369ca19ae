"""ONNX Runtime's dynamic int8 linear layer, written directly: the nodes and integer weights that
``quantize_dynamic`` writes for a ``MatMul`` with a constant weight, from the same scales.

A search that measures hundreds of candidates (a weight scheme per layer, a layer kept float or
not) would otherwise run the quantizer, a file-to-file tool, once per candidate. The builder
quantizes each weight once and swaps layers in and out of a copy of the float model. Its models are
meant to be numerically identical to the quantizer's; the pass checks that on its own data (a model
the quantizer wrote against the builder's for the same layers), and a test checks it on a real model.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from passes.graph import weight_channel_axis
from passes.weight_schemes import Overrides, QuantizedWeight, WeightScheme, quantize_weight


class DynamicInt8Builder:
    """Copies of a float model with a chosen set of its linear layers in dynamic int8.

    ``overrides`` are explicit per-channel scales by weight name (``TensorQuantOverrides``); a layer
    without one gets ONNX Runtime's default for ``qtype``: per-channel (or per-tensor), symmetric
    for int8 weights, asymmetric for uint8.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[str],
        qtype: int,
        reduce_range: bool,
        per_channel: bool = True,
        overrides: Overrides | None = None,
    ) -> None:
        self.model = model
        initializers = {init.name: init for init in model.graph.initializer}
        default = WeightScheme(per_channel=per_channel, symmetric=qtype == onnx.TensorProto.INT8)
        self.nodes = {node.name: node for node in model.graph.node if node.name in set(layers)}
        self.weights: dict[str, QuantizedWeight] = {}
        for name, node in self.nodes.items():
            if node.op_type != "MatMul" or node.input[1] not in initializers:
                raise ValueError(f"{name}: the builder writes MatMul layers with a constant weight")
            weight = numpy_helper.to_array(initializers[node.input[1]])
            axis = weight_channel_axis(node)
            assert axis is not None  # a MatMul's
            entries = (overrides or {}).get(node.input[1])
            self.weights[name] = (
                quantize_weight(weight, entries, qtype)
                if entries
                else default.quantize(weight, axis % weight.ndim, qtype, reduce_range)
            )

    def build(self, layers: list[str]) -> onnx.ModelProto:
        """The float model with ``layers`` (a subset of the builder's) as the quantizer writes them."""
        chosen = set(layers) & set(self.nodes)
        graph = self.model.graph
        nodes: list[onnx.NodeProto] = []
        added: list[onnx.TensorProto] = []
        quantized_inputs: set[str] = set()
        for node in graph.node:
            if node.name not in chosen:
                nodes.append(node)
                continue
            source, weight_name, output = node.input[0], node.input[1], node.output[0]
            weight = self.weights[node.name]
            q, s, zp = f"{source}_quantized", f"{source}_scale", f"{source}_zero_point"
            if source not in quantized_inputs:
                quantized_inputs.add(source)
                nodes.append(
                    helper.make_node("DynamicQuantizeLinear", [source], [q, s, zp], f"{source}_QuantizeLinear")
                )
            names = [f"{weight_name}_quantized", f"{weight_name}_scale", f"{weight_name}_zero_point"]
            added += [
                numpy_helper.from_array(array, name)
                for array, name in zip((weight.values, weight.scale, weight.zero_point), names)
            ]
            scales, integer, cast = f"{node.name}_scales", f"{node.name}_int32", f"{node.name}_float"
            nodes += [
                helper.make_node("Mul", [s, names[1]], [scales], f"{node.name}_quant_scales_mul"),
                helper.make_node("MatMulInteger", [q, names[0], zp, names[2]], [integer], f"{node.name}_quant"),
                helper.make_node("Cast", [integer], [cast], f"{node.name}_cast", to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [cast, scales], [output], f"{node.name}_quant_output_scale_mul"),
            ]
        used = {name for node in nodes for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]
        new_graph = helper.make_graph(
            nodes,
            graph.name,
            list(graph.input),
            list(graph.output),
            kept + added,
            value_info=list(graph.value_info),
        )
        model = helper.make_model(new_graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        return model
