"""Residual Add + LayerNormalization as ONNX Runtime's SkipLayerNormalization, fused offline.

In a pre-norm ViT every residual sum feeds the next LayerNorm and the next residual Add. ONNX
Runtime's own session fusion requires the Add to have a single reader, so it never fires there and
the model runs an Add and a LayerNorm per sub-block. SkipLayerNormalization computes both in one
kernel and hands the sum on through its optional fourth output, which the next residual Add reads.
"""

from __future__ import annotations

import onnx
from onnx import helper
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import topological_sort

MS_DOMAIN = "com.microsoft"


class SkipLayerNormConfig(PassConfig):
    fold_bias: bool = Field(
        True,
        description="Also fold a linear layer's bias Add before the residual into the fused op's bias input.",
    )


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


@register_pass
class SkipLayerNormPass(Pass):
    name = "skip_layernorm"
    Config = SkipLayerNormConfig
    config: SkipLayerNormConfig

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        graph = model.graph
        readers = _readers(graph)
        constants = {init.name: init for init in graph.initializer}
        producers = {out: node for node in graph.node for out in node.output}
        outputs = {o.name for o in graph.output}
        replaced: dict[str, onnx.NodeProto | None] = {}  # node name -> its replacement (None: removed)
        fused = folded = 0
        for add in graph.node:
            if add.op_type != "Add" or add.name in replaced or len(add.input) != 2:
                continue
            if any(name in constants or name not in producers for name in add.input):
                continue  # a constant (position embedding) or a graph input: not a residual of two branches
            total = add.output[0]
            norms = [r for r in readers.get(total, []) if r.op_type == "LayerNormalization"]
            if len(norms) != 1 or total in outputs:
                continue
            norm = norms[0]
            axis = next((a.i for a in norm.attribute if a.name == "axis"), -1)
            if axis != -1 or len(norm.output) != 1 or len(norm.input) < 3 or norm.name in replaced:
                continue
            epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
            skip, branch = add.input
            bias = ""
            producer = producers[branch]
            if (
                self.config.fold_bias
                and producer.op_type == "Add"
                and producer.name not in replaced
                and len(readers.get(branch, [])) == 1
                and sum(name in constants for name in producer.input) == 1
            ):
                bias_name = next(name for name in producer.input if name in constants)
                if len(constants[bias_name].dims) == 1:
                    branch, bias = next(name for name in producer.input if name != bias_name), bias_name
                    replaced[producer.name] = None
                    folded += 1
            others = [r for r in readers.get(total, []) if r is not norm]
            fused_node = helper.make_node(
                "SkipLayerNormalization",
                [branch, skip, norm.input[1], norm.input[2], bias],
                [norm.output[0], "", "", total if others else ""],
                f"{norm.name}/SkipLayerNorm",
                domain=MS_DOMAIN,
                epsilon=epsilon,
            )
            replaced[add.name] = None
            replaced[norm.name] = fused_node
            fused += 1
        if not fused:
            ctx.notes.update(fused=0)
            return model
        nodes = []
        for node in graph.node:
            if node.name not in replaced:
                nodes.append(node)
            elif replaced[node.name] is not None:
                nodes.append(replaced[node.name])
        result = onnx.ModelProto()
        result.CopyFrom(model)
        del result.graph.node[:]
        result.graph.node.extend(nodes)
        if not any(o.domain == MS_DOMAIN for o in result.opset_import):
            result.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        topological_sort(result)  # the fused op sits where the LayerNorm was
        ctx.notes.update(fused=fused, biases_folded=folded)
        return result
