"""Float16 weights and activations: half the size on disk. On CPUs without native fp16 math it is a
size win, not a speed win (ONNX Runtime upcasts), so the report shows both. LayerNorm, ReduceMean,
Softmax and Pow overflow or lose too much in fp16 and stay float32 by default."""

from __future__ import annotations

import onnx
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import topological_sort


class Fp16Config(PassConfig):
    keep_io_types: bool = Field(True, description="Keep float32 model inputs and outputs.")
    op_block_list: list[str] = Field(
        ["LayerNormalization", "ReduceMean", "Softmax", "Pow"], description="Op types kept in float32."
    )
    node_block_list: list[str] = Field([], description="Node names kept in float32.")


# Token merging's choices and merge stay float32: in float16 a near-tie flips far more often, and
# ONNX Runtime's CPU scatters have no float16 kernel for reduction 'add'.
MERGE_OPS = ("ReduceMax", "ArgMax", "TopK", "GatherElements", "ScatterElements", "ScatterND")


def drop_repeated_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes that repeat an earlier node exactly (same op, inputs, outputs, attributes).

    The converter emits one float32 Cast per (blocked node, float16 initializer) pair, named after the
    initializer; when onnxsim has merged equal initializers (random-init LayerNorms all share ones and
    zeros), the same Cast comes out twice and ONNX Runtime rejects the graph.
    """
    seen: set[bytes] = set()
    kept = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    dropped = len(model.graph.node) - len(kept)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return dropped


def _qdq_kept_float(model: onnx.ModelProto) -> set[str]:
    """Q/DQ ops before opset 19 take only float32 scales: converting them writes an invalid model."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"QuantizeLinear", "DequantizeLinear"} if opset < 19 else set()


@register_pass
class Fp16Pass(Pass):
    name = "fp16"
    Config = Fp16Config
    config: Fp16Config
    version = 4  # 2: nodes in topological order (version 1 wrote an invalid graph); 3: MERGE_OPS kept float32;
    # 4: the merge's ArgMax, ReduceMax and ScatterND too

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        cfg = self.config
        converted = convert_float_to_float16(
            onnx.ModelProto.FromString(model.SerializeToString()),
            keep_io_types=cfg.keep_io_types,
            op_block_list=sorted(
                set(DEFAULT_OP_BLOCK_LIST) | set(cfg.op_block_list) | set(MERGE_OPS) | _qdq_kept_float(model)
            ),
            node_block_list=cfg.node_block_list or None,
        )
        drop_repeated_nodes(converted)
        # the converter appends the input Cast after the nodes that read it
        ctx.notes["reordered_nodes"] = topological_sort(converted)
        ctx.notes["kept_float32_ops"] = sorted(
            {n.op_type for n in converted.graph.node if n.op_type in {*cfg.op_block_list, *MERGE_OPS}}
        )
        return converted
