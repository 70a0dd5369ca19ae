"""Rewrites a timm ViT export into the ops ONNX Runtime's CPU kernels run fastest, before quantization.

ONNX Runtime's own transformer optimizer finds no attention in a timm export (its patterns are
BERT's), so this pass matches timm's shapes itself:

- ``attention``: the ~15 nodes of timm attention (qkv projection, 5-D reshape, transpose, split,
  squeezes, the scaled ``q @ k^T``, softmax, ``@ v``, transpose back) become one qkv ``MatMul`` +
  ``Add``, a ``Split`` and ONNX Runtime's ``com.microsoft.MultiHeadAttention``. The qkv MatMul
  stays a plain MatMul, so int8 quantization still reaches it.
- ``matmul_3d``: ``Reshape(x, [-1, K]) -> Gemm -> Reshape(back)`` around every linear layer
  becomes ``MatMul(x, W) + Add(b)`` on the 3-D tensor, dropping two Reshapes per layer and letting
  the int8 kernels absorb the bias.

The fused attention core is faster than the exported ops and int8 gains more with it
(docs/guide.md has the measurements). ONNX Runtime's generic fusions (Gelu, LayerNorm) still run at session
start. The numeric check of every step compares logits before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import (
    MS_DOMAIN,
    GraphIndex,
    attribute,
    copy_model,
    rebuild,
    tensor_shapes,
    topological_sort,
    use_domain,
)


class FuseVitConfig(PassConfig):
    attention: bool = Field(True, description="Fuse timm attention into com.microsoft.MultiHeadAttention.")
    matmul_3d: bool = Field(True, description="Reshape -> Gemm -> Reshape becomes MatMul + Add on the 3-D tensor.")
    gelu: Literal["exact", "tanh"] = Field(
        "exact",
        description="tanh: the erf GELU becomes com.microsoft.FastGelu (tanh approximation; faster, not exact).",
    )


@dataclass
class Linear:
    """A linear layer ``x @ weight + bias`` found in the graph, and the nodes that compute it."""

    x: str
    weight: np.ndarray
    bias: np.ndarray | None
    nodes: list[onnx.NodeProto]


def _linear_before(index: GraphIndex, name: str) -> Linear | None:
    """The linear layer producing ``name`` from a 3-D input: ``Reshape(x,[-1,K]) -> Gemm`` or
    ``MatMul(x, W) [-> Add(b)]``."""
    gemm = index.produced_by(name, "Gemm")
    if gemm is not None:
        if attribute(gemm, "transA", 0) or attribute(gemm, "alpha", 1.0) != 1.0 or attribute(gemm, "beta", 1.0) != 1.0:
            return None
        flatten = index.produced_by(gemm.input[0], "Reshape")
        weight = index.constant(gemm.input[1])
        bias = index.constant(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
        if flatten is None or weight is None or weight.ndim != 2:
            return None
        if attribute(gemm, "transB", 0):
            weight = weight.T
        return Linear(flatten.input[0], weight, bias, [flatten, gemm])
    add = index.produced_by(name, "Add")
    matmul = index.produced_by(add.input[0], "MatMul") if add is not None else index.produced_by(name, "MatMul")
    if matmul is None:
        return None
    bias = index.constant(add.input[1]) if add is not None else None
    weight = index.constant(matmul.input[1])
    if weight is None or weight.ndim != 2 or (add is not None and bias is None):
        return None
    return Linear(matmul.input[0], weight, bias, [matmul] + ([add] if add is not None else []))


def _scaled(index: GraphIndex, name: str) -> tuple[str, float, list[onnx.NodeProto]]:
    """``(x, c, [mul])`` when ``name`` is ``Mul(x, c)`` with a scalar constant c, else ``(name, 1.0, [])``."""
    mul = index.produced_by(name, "Mul")
    if mul is not None:
        value = index.constant(mul.input[1])
        if value is not None and value.size == 1:
            return mul.input[0], float(value.reshape(())), [mul]
    return name, 1.0, []


@dataclass
class AttentionMatch:
    qkv: Linear
    heads: int
    head_dim: int
    tokens: int
    scale: float
    nodes: list[onnx.NodeProto]
    output: onnx.NodeProto  # the last node of the group; its output tensor is kept
    bias: str | None = None  # an additive attention bias (B, 1, 1, tokens), e.g. token merging's log(size)
    queries: int | None = None  # only the first tokens ask (a class-token-only block); None: all of them
    qkv_output: str | None = None  # the (B, tokens, 3 * hidden) qkv tensor, when other nodes also read it
    readers: list[onnx.NodeProto] | None = None  # the other readers of qkv_output (Slices), when any


def _query_slice(index: GraphIndex, name: str) -> tuple[str, int | None, list[onnx.NodeProto]]:
    """``(x, n, [slice])`` when ``name`` is ``x[:, :, :n]`` of a 4-D tensor, else ``(name, None, [])``."""
    node = index.produced_by(name, "Slice")
    bounds = _one_axis_slice(index, node) if node is not None else None
    if node is None or bounds is None:
        return name, None, []
    start, end, axis, step = bounds
    if start != 0 or axis not in (2, -2) or step != 1 or end <= 0:
        return name, None, []
    return node.input[0], end, [node]


def _one_axis_slice(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of a Slice along one axis with constant bounds, else None."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (index.constant(node.input[i]) for i in (1, 2, 3))
    steps = index.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
        return None
    assert starts is not None and ends is not None and axes is not None and steps is not None
    return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), int(axes.reshape(-1)[0]), int(steps.reshape(-1)[0])


def _qkv_views(index: GraphIndex, name: str, shape: list[int], unflatten: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The readers of the qkv projection ``name`` besides ``unflatten``, when all only view it as
    ``shape`` (B, tokens, 3 * hidden); empty when one needs it otherwise."""
    views = []
    for node in index.consumers.get(name, []):
        if node is unflatten:
            continue
        target = index.constant(node.input[1]) if node.op_type == "Reshape" else None
        if target is None or list(target) != shape:
            return []
        views.append(node)
    return views


def match_timm_attention(index: GraphIndex, softmax: onnx.NodeProto) -> AttentionMatch | None:
    """timm's ``Attention.forward`` as exported (fused SDPA or explicit), found from its Softmax; also
    with an additive bias before the Softmax, a query slice, and other readers of the qkv projection
    (onnxvit's token merging)."""
    if attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    logits, bias, nodes = softmax.input[0], None, [softmax]
    add = index.produced_by(logits, "Add")
    if add is not None and not index.is_constant(add.input[1]):
        logits, bias = add.input[0], add.input[1]
        nodes.append(add)
    scores_name, post_scale, scaled = _scaled(index, logits)
    scores = index.produced_by(scores_name, "MatMul")
    if scores is None:
        return None
    q_name, q_scale, q_mul = _scaled(index, scores.input[0])
    q_name, queries, q_slice = _query_slice(index, q_name)
    kt_name, k_scale, k_mul = _scaled(index, scores.input[1])
    nodes += [*scaled, scores, *q_mul, *q_slice, *k_mul]
    k_transpose = index.produced_by(kt_name, "Transpose")
    q_squeeze = index.produced_by(q_name, "Squeeze")
    if k_transpose is None or attribute(k_transpose, "perm") != [0, 1, 3, 2] or q_squeeze is None:
        return None
    k_squeeze = index.produced_by(k_transpose.input[0], "Squeeze")
    weighted = index.sole_consumer(softmax.output[0], "MatMul")
    if k_squeeze is None or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    v_squeeze = index.produced_by(weighted.input[1], "Squeeze")
    split = index.produced_by(q_squeeze.input[0], "Split")
    if v_squeeze is None or split is None or attribute(split, "axis", 0) != 0 or len(split.output) != 3:
        return None
    if [q_squeeze.input[0], k_squeeze.input[0], v_squeeze.input[0]] != list(split.output):
        return None
    permute = index.produced_by(split.input[0], "Transpose")
    if permute is None or attribute(permute, "perm") != [2, 0, 3, 1, 4]:
        return None
    unflatten = index.produced_by(permute.input[0], "Reshape")
    shape = index.constant(unflatten.input[1]) if unflatten is not None else None
    if unflatten is None or shape is None or shape.shape != (5,) or shape[2] != 3 or min(shape[1:]) <= 0:
        return None
    merge = index.sole_consumer(weighted.output[0], "Transpose")
    if merge is None or attribute(merge, "perm") != [0, 2, 1, 3]:
        return None
    qkv = _linear_before(index, unflatten.input[0])
    heads, head_dim, tokens = int(shape[3]), int(shape[4]), int(shape[1])
    if qkv is None or qkv.weight.shape[1] != 3 * heads * head_dim or (queries is not None and queries >= tokens):
        return None
    nodes += [k_transpose, q_squeeze, k_squeeze, v_squeeze, weighted, split, permute, unflatten, merge]
    nodes += qkv.nodes
    qkv_output = None
    if len(index.consumers.get(unflatten.input[0], [])) > 1:
        views = _qkv_views(index, unflatten.input[0], [-1, tokens, 3 * heads * head_dim], unflatten)
        if len(views) == 1:  # a 2-D Gemm output viewed as 3-D: the fused projection makes the view's tensor
            nodes.append(views[0])
            qkv_output = views[0].output[0]
        elif qkv.nodes[-1].op_type != "Gemm":  # already the 3-D tensor: the fused projection makes it
            qkv_output = unflatten.input[0]
    if not index.private(nodes, keep=merge, shared=(qkv_output,) if qkv_output else ()):
        return None
    scale = q_scale * k_scale * post_scale
    readers = [n for n in index.consumers.get(qkv_output, []) if n is not unflatten] if qkv_output else None
    return AttentionMatch(qkv, heads, head_dim, tokens, scale, nodes, merge, bias, queries, qkv_output, readers)


def _key_section_slice(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> bool:
    """Whether ``node`` is ``qkv[..., hidden : 2 * hidden]``: all heads' keys (token merging's metric)."""
    bounds = _one_axis_slice(index, node)
    return bounds is not None and bounds[:2] == (hidden, 2 * hidden) and bounds[2] in (-1, 2) and bounds[3] == 1


def _fold_bias_into_keys(index: GraphIndex, found: AttentionMatch) -> bool:
    """Whether ``found``'s additive bias (B, 1, 1, tokens), constant over queries and heads, can be
    folded into the keys: each head gets one more query column holding ``1 / scale`` and one more
    key column holding the bias, so ``q' k'^T scale = q k^T scale + bias`` and MultiHeadAttention
    runs without its (slower) attention-bias input. The projection then writes those columns
    (zero weights), so any other reader of its output must be the keys' slice, which is remapped."""
    if found.bias is None:
        return False
    hidden = found.heads * found.head_dim
    return all(_key_section_slice(index, node, hidden) for node in found.readers or [])


def _with_extra_column(weight: np.ndarray, bias: np.ndarray, heads: int, value: float) -> tuple[np.ndarray, ...]:
    """A projection's (in, heads * dim) weight and bias with one more output column per head: zero
    weights and bias ``value``."""
    rows = weight.shape[0]
    weight = np.concatenate([weight.reshape(rows, heads, -1), np.zeros((rows, heads, 1), np.float32)], -1)
    bias = np.concatenate([bias.reshape(heads, -1), np.full((heads, 1), value, np.float32)], -1)
    return weight.reshape(rows, -1), bias.reshape(-1)


def _attention_nodes(
    found: AttentionMatch, prefix: str, fold: bool
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The fused replacement of one match: qkv MatMul + Add, Split, [query Slice], [the bias folded
    into the keys (``fold``) or Expanded], MultiHeadAttention; and the constants it reads."""
    hidden = found.heads * found.head_dim
    weight = np.ascontiguousarray(found.qkv.weight, np.float32)
    bias = (found.qkv.bias if found.qkv.bias is not None else np.zeros(3 * hidden, np.float32)).astype(np.float32)
    bias = bias.reshape(-1)
    widths = [hidden] * 3
    if fold:
        wq, wk, wv = np.split(weight, 3, axis=1)
        bq, bk, bv = np.split(bias, 3)
        wq, bq = _with_extra_column(wq, bq, found.heads, 1.0 / found.scale)
        wk, bk = _with_extra_column(wk, bk, found.heads, 0.0)
        weight, bias = np.concatenate([wq, wk, wv], 1), np.concatenate([bq, bk, bv])
        widths = [wq.shape[1], wk.shape[1], hidden]
    qkv = found.qkv_output or f"{prefix}/qkv"
    constants = {
        "qkv/weight": weight,
        "qkv/bias": bias,
        "split": np.array(widths, np.int64),
    }
    nodes = [
        helper.make_node(
            "MatMul", [found.qkv.x, f"{prefix}/qkv/weight"], [f"{prefix}/qkv/matmul"], name=f"{prefix}/qkv/MatMul"
        ),
        helper.make_node("Add", [f"{prefix}/qkv/matmul", f"{prefix}/qkv/bias"], [qkv], name=f"{prefix}/qkv/Add"),
        helper.make_node(
            "Split", [qkv, f"{prefix}/split"], [f"{prefix}/{t}" for t in "qkv"], name=f"{prefix}/Split", axis=-1
        ),
    ]
    inputs = [f"{prefix}/q", f"{prefix}/k", f"{prefix}/v"]
    if found.queries is not None:
        constants.update(
            {"query/start": np.array([0]), "query/end": np.array([found.queries]), "query/axis": np.array([1])}
        )
        slice_inputs = [f"{prefix}/q"] + [f"{prefix}/query/{part}" for part in ("start", "end", "axis")]
        nodes.append(helper.make_node("Slice", slice_inputs, [f"{prefix}/query"], name=f"{prefix}/query/Slice"))
        inputs[0] = f"{prefix}/query"
    if found.bias is not None and fold:  # the keys' extra columns get the bias, per token
        extra = np.zeros((1, 1, widths[1]), np.float32)
        extra[..., found.head_dim :: found.head_dim + 1] = 1.0
        constants.update({"bias/tokens": np.array([-1, found.tokens, 1]), "bias/columns": extra})
        nodes += [
            helper.make_node(
                "Reshape", [found.bias, f"{prefix}/bias/tokens"], [f"{prefix}/bias/t"], name=f"{prefix}/bias/Reshape"
            ),
            helper.make_node(
                "Mul", [f"{prefix}/bias/t", f"{prefix}/bias/columns"], [f"{prefix}/bias/k"], name=f"{prefix}/bias/Mul"
            ),
            helper.make_node("Add", [f"{prefix}/k", f"{prefix}/bias/k"], [f"{prefix}/keys"], name=f"{prefix}/bias/Add"),
        ]
        inputs[1] = f"{prefix}/keys"
    elif found.bias is not None:  # MultiHeadAttention broadcasts over batch and heads only: spread over the queries
        constants["bias/shape"] = np.array([1, 1, found.queries or found.tokens, found.tokens])
        nodes.append(
            helper.make_node(
                "Expand", [found.bias, f"{prefix}/bias/shape"], [f"{prefix}/bias"], name=f"{prefix}/bias/Expand"
            )
        )
        inputs += ["", "", f"{prefix}/bias"]
    nodes.append(
        helper.make_node(
            "MultiHeadAttention",
            inputs,
            [found.output.output[0]],
            name=f"{prefix}/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=found.heads,
            scale=found.scale,
        )
    )
    initializers = [numpy_helper.from_array(value, f"{prefix}/{name}") for name, value in constants.items()]
    return nodes, initializers


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace every matched timm attention in place; returns how many."""
    index = GraphIndex(model)
    shapes = tensor_shapes(model)
    matches = []
    for node in model.graph.node:
        if node.op_type == "Softmax":
            found = match_timm_attention(index, node)
            if found is not None and len(shapes.get(found.qkv.x, [])) == 3:
                matches.append(found)
    replacements, removed, initializers, remapped = {}, set(), [], []
    for number, found in enumerate(matches):
        prefix = f"attention_{number}"
        fold = _fold_bias_into_keys(index, found)
        replacements[id(found.output)], constants = _attention_nodes(found, prefix, fold)
        initializers += constants
        removed.update(id(node) for node in found.nodes)
        if fold:
            # the keys' slice reads the Split's keys instead (no copy): the widened keys before the bias,
            # whose extra columns are exact zeros, so the merge's similarity is unchanged
            for node in found.readers or []:
                node.op_type = "Identity"
                del node.input[:], node.attribute[:]
                node.input.append(f"{prefix}/k")
                remapped.append(node)
    if matches:
        _forget_shapes_from(model, index, remapped)
        rebuild(model, replacements, removed, initializers)
        topological_sort(model)  # a qkv tensor other nodes read is now made where the attention was
        use_domain(model, MS_DOMAIN)
        for found in matches:  # so shape inference reaches the layers after the fused op
            batch = shapes[found.qkv.x][0]
            model.graph.value_info.append(
                helper.make_tensor_value_info(
                    found.output.output[0],
                    onnx.TensorProto.FLOAT,
                    [
                        batch if batch is not None else "batch",
                        found.queries or found.tokens,
                        found.heads * found.head_dim,
                    ],
                )
            )
    return len(matches)


def _forget_shapes_from(model: onnx.ModelProto, index: GraphIndex, nodes: list[onnx.NodeProto]) -> None:
    """Drop the shape annotations of ``nodes``' outputs and of what is computed from them up to the
    next contraction (MatMul): their last dimension widened (ONNX Runtime trusts annotations)."""
    stale, frontier = set(), [out for node in nodes for out in node.output]
    while frontier:
        name = frontier.pop()
        if name in stale:
            continue
        stale.add(name)
        frontier += [out for c in index.consumers.get(name, []) if c.op_type != "MatMul" for out in c.output]
    kept = [vi for vi in model.graph.value_info if vi.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def matmul_3d(model: onnx.ModelProto) -> int:
    """``Reshape(x, [-1, K]) -> Gemm -> Reshape(y, [-1, N, M])`` on a 3-D ``x`` becomes
    ``MatMul(x, W) + Add(b)``; returns how many layers were rewritten."""
    index = GraphIndex(model)
    shapes = tensor_shapes(model)
    replacements, removed, initializers = {}, set(), []
    for gemm in [node for node in model.graph.node if node.op_type == "Gemm"]:
        layer = _linear_before(index, gemm.output[0])
        if layer is None or layer.nodes[-1] is not gemm or not index.private(layer.nodes, keep=gemm):
            continue
        x_shape = shapes.get(layer.x, [])
        unflatten = index.sole_consumer(gemm.output[0], "Reshape")
        target = index.constant(unflatten.input[1]) if unflatten is not None else None
        if len(x_shape) != 3 or x_shape[-1] != layer.weight.shape[0] or target is None:
            continue
        wanted = [x_shape[1], layer.weight.shape[1]]
        if target.shape != (3,) or target[0] not in (-1, x_shape[0]) or list(target[1:]) != wanted:
            continue
        prefix = gemm.name or f"linear_{len(replacements)}"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(layer.weight, np.float32), f"{prefix}/weight"))
        out = unflatten.output[0]
        new = [
            helper.make_node(
                "MatMul",
                [layer.x, f"{prefix}/weight"],
                [out if layer.bias is None else f"{prefix}/matmul"],
                name=f"{prefix}/MatMul",
            )
        ]
        if layer.bias is not None:
            initializers.append(numpy_helper.from_array(layer.bias.astype(np.float32).reshape(-1), f"{prefix}/bias"))
            new.append(helper.make_node("Add", [f"{prefix}/matmul", f"{prefix}/bias"], [out], name=f"{prefix}/Add"))
        replacements[id(gemm)] = new
        removed.update({id(layer.nodes[0]), id(unflatten)})
    if replacements:
        rebuild(model, replacements, removed, initializers)
    return len(replacements)


def _near(value: np.ndarray | None, target: float) -> bool:
    return value is not None and value.size == 1 and abs(float(value.reshape(())) - target) < 1e-3 * abs(target)


def tanh_gelu(model: onnx.ModelProto) -> int:
    """``x * 0.5 * (1 + erf(x / sqrt 2))`` as torch exports it becomes ``FastGelu(x)``; returns how many."""
    index = GraphIndex(model)
    replacements, removed = {}, set()
    for erf in [node for node in model.graph.node if node.op_type == "Erf"]:
        div = index.produced_by(erf.input[0], "Div")
        add = index.sole_consumer(erf.output[0], "Add")
        mul = index.sole_consumer(add.output[0], "Mul") if add is not None else None
        half = index.sole_consumer(mul.output[0], "Mul") if mul is not None else None
        if div is None or half is None or not _near(index.constant(div.input[1]), 2**0.5):
            continue
        x = div.input[0]
        if not (
            _near(index.constant(add.input[1]), 1.0)
            and set(mul.input) == {x, add.output[0]}
            and _near(index.constant(half.input[1]), 0.5)
        ):
            continue
        group = [div, erf, add, mul, half]
        if not index.private(group, keep=half):
            continue
        replacements[id(half)] = [
            helper.make_node("FastGelu", [x], [half.output[0]], name=f"{erf.name}/FastGelu", domain=MS_DOMAIN)
        ]
        removed.update(id(node) for node in group[:-1])
    if replacements:
        rebuild(model, replacements, removed, [])
        use_domain(model, MS_DOMAIN)
    return len(replacements)


@register_pass
class FuseVitPass(Pass):
    name = "fuse_vit"
    Config = FuseVitConfig
    config: FuseVitConfig
    version = 4  # 2: also attention with a bias before the softmax and a query slice (token merging);
    # 3: such a bias folded into the keys; 4: the merge's metric read from the Split's keys, not sliced again

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        model = copy_model(model)
        if self.config.attention:
            ctx.notes["attention_fused"] = fuse_attention(model)
        if self.config.matmul_3d:
            ctx.notes["linear_3d"] = matmul_3d(model)
        if self.config.gelu == "tanh":
            ctx.notes["gelu_tanh"] = tanh_gelu(model)
        onnx.checker.check_model(model)
        return model
