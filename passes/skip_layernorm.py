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
from passes.graph import GraphIndex, attribute, copy_model, rebuild, topological_sort, use_domain

MS_DOMAIN = "com.microsoft"


class SkipLayerNormConfig(PassConfig):
    fold_bias: bool = Field(
        True,
        description="Also fold a linear layer's bias Add before the residual into the fused op's bias input.",
    )


@register_pass
class SkipLayerNormPass(Pass):
    name = "skip_layernorm"
    Config = SkipLayerNormConfig
    config: SkipLayerNormConfig

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        result = copy_model(model)
        index = GraphIndex(result)
        replacements: dict[int, list[onnx.NodeProto]] = {}
        removed: set[int] = set()
        folded = 0
        for add in result.graph.node:
            if add.op_type != "Add" or id(add) in removed or len(add.input) != 2:
                continue
            if any(index.is_constant(name) or name not in index.producer for name in add.input):
                continue  # a constant (position embedding) or a graph input: not a residual of two branches
            total = add.output[0]
            norms = [r for r in index.consumers.get(total, []) if r.op_type == "LayerNormalization"]
            if len(norms) != 1 or total in index.graph_outputs:
                continue
            norm = norms[0]
            if attribute(norm, "axis", -1) != -1 or len(norm.output) != 1 or len(norm.input) < 3 or id(norm) in removed:
                continue
            skip, branch = add.input
            bias = ""
            producer = index.producer[branch]
            constants = [name for name in producer.input if name in index.initializers]
            if (
                self.config.fold_bias
                and producer.op_type == "Add"
                and id(producer) not in removed
                and index.sole_consumer(branch, "Add") is add
                and len(constants) == 1
                and len(index.initializers[constants[0]].dims) == 1
            ):
                branch, bias = next(name for name in producer.input if name != constants[0]), constants[0]
                removed.add(id(producer))
                folded += 1
            others = [r for r in index.consumers.get(total, []) if r is not norm]
            fused = helper.make_node(
                "SkipLayerNormalization",
                [branch, skip, norm.input[1], norm.input[2], bias],
                [norm.output[0], "", "", total if others else ""],
                f"{norm.name}/SkipLayerNorm",
                domain=MS_DOMAIN,
                epsilon=attribute(norm, "epsilon", 1e-5),
            )
            removed.add(id(add))
            replacements[id(norm)] = [fused]
        ctx.notes.update(fused=len(replacements), **({"biases_folded": folded} if replacements else {}))
        if not replacements:
            return model
        rebuild(result, replacements, removed, [])
        use_domain(result, MS_DOMAIN)
        topological_sort(result)  # the fused op sits where the LayerNorm was
        return result
