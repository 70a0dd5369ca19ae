"""BatchNorm folded into the linear layer before it, so that quantization sees one weight and no
separate float op between two quantized ones (Q-HyViT's mixed-normalization fix, BatchNorm part).

The exporter already folds ``Conv -> BatchNormalization``. What it leaves, measured on timm's
hybrids: LeViT's 46 ``MatMul -> Flatten -> BatchNormalization`` (its LinearNorm), RepViT's and
FastViT's BatchNorms after a residual ``Add`` or a ``Mul``. This pass folds a BatchNorm whose input
comes, alone or through a ``Flatten`` that keeps the channel axis last, from a Conv, MatMul or Gemm
with a constant weight and no other reader: the weight is scaled per output channel and the
BatchNorm becomes a per-channel ``Add`` (or the bias absorbs it). Every other BatchNorm is kept, and
the notes say why, per tensor. LayerNorm is ``reparam_layernorm``'s; GroupNorm stays float.
Exact in FP32 (the pipeline's check records the logit difference).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import GraphIndex, attribute, copy_model, rebuild, weight_channel_axis

LINEAR = ("Conv", "MatMul", "Gemm")


class FoldBatchNormConfig(PassConfig):
    through_flatten: bool = Field(True, description="Fold across a Flatten that keeps channels last (LeViT).")


def _channel_axis_of_weight(node: onnx.NodeProto) -> int | None:
    """Which axis of the weight holds output channels; None where a fold would not be exact (a Gemm
    that transposes or scales its input)."""
    if node.op_type == "Gemm" and (
        attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0
    ):
        return None
    return weight_channel_axis(node)


@register_pass
class FoldBatchNormPass(Pass):
    name = "fold_batchnorm"
    Config = FoldBatchNormConfig
    config: FoldBatchNormConfig

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = copy_model(model)
        index = GraphIndex(out)
        replacements: dict[int, list[onnx.NodeProto]] = {}
        initializers: list[onnx.TensorProto] = []
        aliases: dict[str, str] = {}  # a removed BatchNorm's output -> the tensor that now carries it
        folded, kept = {}, {}
        for bn in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
            name = bn.name or bn.output[0]
            why = self._why_not(bn, index)
            if why:
                kept[name] = why
                continue
            source = index.producer[bn.input[0]]
            flatten = source if source.op_type == "Flatten" else None
            linear = index.producer[flatten.input[0]] if flatten else source
            gamma, beta, mean, var = (index.constant(i) for i in bn.input[1:5])
            scale = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
            shift = beta - mean * scale
            axis = _channel_axis_of_weight(linear)
            weight = index.constant(linear.input[1])
            shape = [1] * weight.ndim
            shape[axis] = -1
            prefix = f"{name}/folded"
            initializers.append(
                numpy_helper.from_array((weight * scale.reshape(shape)).astype(weight.dtype), f"{prefix}/weight")
            )
            inputs = [linear.input[0], f"{prefix}/weight"]
            has_bias = len(linear.input) > 2 and linear.input[2] and linear.op_type != "MatMul"
            if has_bias:
                bias = index.constant(linear.input[2])
                folded_bias = (bias * scale + shift).astype(bias.dtype)
                initializers.append(numpy_helper.from_array(folded_bias, f"{prefix}/bias"))
                inputs.append(f"{prefix}/bias")
            elif linear.op_type == "Conv":
                initializers.append(numpy_helper.from_array(shift.astype(weight.dtype), f"{prefix}/bias"))
                inputs.append(f"{prefix}/bias")
                has_bias = True
            new_linear = helper.make_node(linear.op_type, inputs, list(linear.output), name=linear.name)
            new_linear.attribute.extend(linear.attribute)
            replacements[id(linear)] = [new_linear]
            if has_bias:  # the BatchNorm's output is now the linear output (through Flatten)
                carrier = flatten.output[0] if flatten else linear.output[0]
                if bn.output[0] in index.graph_outputs:  # a graph output keeps its name
                    replacements[id(bn)] = [helper.make_node("Identity", [carrier], [bn.output[0]], name=name)]
                else:
                    replacements[id(bn)] = []
                    aliases[bn.output[0]] = carrier
            else:
                # MatMul: the shift stays as an Add on the channel axis (last, or axis 1 after Flatten)
                initializers.append(numpy_helper.from_array(shift.astype(weight.dtype), f"{prefix}/shift"))
                replacements[id(bn)] = [
                    helper.make_node("Add", [bn.input[0], f"{prefix}/shift"], [bn.output[0]], name=f"{name}/Add")
                ]
            folded[name] = linear.name
        if replacements:
            rebuild(out, replacements, set(), initializers)
            for node in out.graph.node:
                node.input[:] = [aliases.get(name, name) for name in node.input]
        ctx.notes.update(folded=folded, kept=kept, batchnorms=len(folded) + len(kept))
        return out

    def _why_not(self, bn: onnx.NodeProto, index: GraphIndex) -> str | None:
        if attribute(bn, "training_mode", 0):
            return "training mode"
        if any(index.constant(i) is None for i in bn.input[1:5]):
            return "statistics are not constants"
        source = index.producer.get(bn.input[0])
        if source is None:
            return "reads a graph input"
        through_flatten = source.op_type == "Flatten" and self.config.through_flatten
        if through_flatten:
            if [c for c in index.consumers.get(source.output[0], []) if c.op_type != "Shape"] != [bn]:
                return "its Flatten has other readers"
            source = index.producer.get(source.input[0])
            if source is None or source.op_type != "MatMul":
                return "Flatten of something other than a MatMul"
        if source.op_type not in LINEAR:
            return f"follows {source.op_type}, not a linear layer"
        # readers of the shape alone (the Reshape back after LeViT's Flatten) do not see values
        value_readers = [c for c in index.consumers.get(source.output[0], []) if c.op_type != "Shape"]
        if len(value_readers) != 1 or source.output[0] in index.graph_outputs:
            return f"its {source.op_type}'s output has other readers"
        weight = index.constant(source.input[1]) if len(source.input) > 1 else None
        axis = _channel_axis_of_weight(source)
        if weight is None or axis is None:
            return f"its {source.op_type} has no constant weight in a foldable form"
        channels = index.constant(bn.input[1]).shape[0]
        if weight.shape[axis] != channels:
            return f"channel count {channels} does not match the weight's {weight.shape[axis]}"
        if source.op_type == "MatMul" and not through_flatten:
            return "a MatMul's channels are its last axis, BatchNorm's are axis 1"
        return None
