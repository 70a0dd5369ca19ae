"""A dynamic int8 qkv projection and the attention it feeds as one ONNX Runtime ``QAttention``.

After ``fuse_vit`` and ``quantize_int8`` (dynamic mode) each attention block runs
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scale) -> Add(bias) -> Split ->
MultiHeadAttention``. ``QAttention`` takes the same quantized input, integer weights, per-column
scales and zero points, and bias, computes the projection head by head straight into the layout
its attention reads, and so drops the Split and the attention kernel's own transposes of q, k and
v. The integer products are the same; the float attention after them is ONNX Runtime's
``Attention`` kernel instead of ``MultiHeadAttention``'s, which rounds differently, so the logits
move by float rounding only (a later layer's dynamic input range can then move by a step). The
step's numeric check compares them.

Only the plain case is rewritten: a ``MultiHeadAttention`` with q, k and v alone (no bias, mask or
attention bias input), the three from one ``Split`` into equal thirds of the last axis, fed by a
projection whose weight is 2-D and whose scale and zero point are one value or one per column.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import MS_DOMAIN, GraphIndex, attribute, copy_model, rebuild, topological_sort, use_domain


class QAttentionConfig(PassConfig):
    """No options: every block that matches is rewritten."""


@dataclass
class _Projection:
    """The dequantized qkv projection ``(x_q - x_zp) x_s (W_q - W_zp) W_s + b`` as the int8 pass writes it."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]  # QAttention's: input, weight, bias, input_scale, weight_scale, "", input_zp, weight_zp


def _projection(index: GraphIndex, name: str) -> _Projection | None:
    """The int8 projection that computes ``name``, or None where the graph holds something else."""
    add = index.produced_by(name, "Add")
    if add is None or len(add.input) != 2:
        return None
    bias = next((b for b in add.input if index.is_constant(b)), "")
    mul = index.produced_by(next((b for b in add.input if b != bias), ""), "Mul") if bias else None
    if mul is None:
        return None
    casts = [index.produced_by(i, "Cast") for i in mul.input]
    products = [index.produced_by(i, "Mul") for i in mul.input]
    cast = next((c for c in casts if c is not None), None)
    scales = next((m for m in products if m is not None), None)
    matmul = index.produced_by(cast.input[0], "MatMulInteger") if cast is not None else None
    if cast is None or attribute(cast, "to") != onnx.TensorProto.FLOAT:
        return None
    if scales is None or matmul is None or len(matmul.input) != 4:
        return None
    quantize = index.produced_by(matmul.input[0], "DynamicQuantizeLinear")
    computed = [s for s in scales.input if not index.is_constant(s)]  # the input's scale, per call
    constant = [s for s in scales.input if index.is_constant(s)]  # the weight's
    if quantize is None or computed != [quantize.output[1]] or len(constant) != 1:
        return None
    weight, weight_zero, weight_scale = matmul.input[1], matmul.input[3], constant[0]
    values = {n: index.constant(n) for n in (weight, weight_zero, weight_scale, bias)}
    if matmul.input[2] != quantize.output[2] or any(v is None for v in values.values()):
        return None
    shape = values[weight].shape  # type: ignore[union-attr]
    columns = {values[n].size for n in (weight_scale, weight_zero)}  # type: ignore[union-attr]
    if len(shape) != 2 or shape[1] % 3 or not columns <= {1, shape[1]} or values[bias].size != shape[1]:  # type: ignore[union-attr]
        return None
    inputs = [quantize.output[0], weight, bias, quantize.output[1], weight_scale, "", quantize.output[2], weight_zero]
    return _Projection([add, mul, cast, matmul, scales], inputs)


@register_pass
class QAttentionPass(Pass):
    name = "qattention"
    Config = QAttentionConfig
    config: QAttentionConfig

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        result = copy_model(model)
        index = GraphIndex(result)
        replacements: dict[int, list[onnx.NodeProto]] = {}
        removed: set[int] = set()
        for attention in result.graph.node:
            if attention.op_type != "MultiHeadAttention" or attention.domain != MS_DOMAIN:
                continue
            if len(attention.input) != 3 or len(attention.output) != 1:
                continue  # bias, mask, attention bias or past state: not the plain case
            if {a.name for a in attention.attribute} - {"num_heads", "scale"}:
                continue
            split = index.produced_by(attention.input[0], "Split")
            if (
                split is None
                or list(split.output) != list(attention.input)
                or attribute(split, "axis", 0) not in (-1, 2)
            ):
                continue
            sizes = index.constant(split.input[1]) if len(split.input) > 1 else None
            if sizes is None or len(set(sizes.tolist())) != 1:
                continue
            projection = _projection(index, split.input[0])
            if projection is None:
                continue
            group = [*projection.nodes, split, attention]
            if not index.private(group, attention) or any(id(n) in removed for n in group):
                continue
            fused = helper.make_node(
                "QAttention",
                projection.inputs,
                list(attention.output),
                f"{attention.name}/QAttention",
                domain=MS_DOMAIN,
                **{a.name: helper.get_attribute_value(a) for a in attention.attribute},  # num_heads, scale
            )
            removed.update(id(n) for n in group)
            removed.discard(id(attention))
            replacements[id(attention)] = [fused]
        ctx.notes["fused"] = len(replacements)
        if not replacements:
            return model
        rebuild(result, replacements, removed, [])
        use_domain(result, MS_DOMAIN)
        topological_sort(result)
        return result
