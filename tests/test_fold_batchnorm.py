"""fold_batchnorm on hand-built graphs of the shapes timm's hybrids export: LeViT's
MatMul -> Flatten -> BatchNorm -> Reshape, a Conv -> BatchNorm, and a BatchNorm after a residual Add."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.base import PassContext
from passes.fold_batchnorm import FoldBatchNormPass
from passes.runtime import model_logits

RNG = np.random.default_rng(0)


def _bn_inputs(prefix: str, channels: int) -> list[onnx.TensorProto]:
    values = {
        "scale": RNG.uniform(0.5, 2, channels),
        "bias": RNG.normal(size=channels),
        "mean": RNG.normal(size=channels),
        "var": RNG.uniform(0.1, 3, channels),
    }
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in values.items()]


def _bn(prefix: str, source: str, output: str) -> onnx.NodeProto:
    statistics = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [source, *statistics], [output], name=prefix, epsilon=1e-5)


def _model(nodes, inputs, initializers, output: str, shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)], initializer=initializers
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_levit_linear_norm_folds_across_flatten():
    tokens, width, channels = 5, 6, 4
    weight = numpy_helper.from_array(RNG.normal(size=(width, channels)).astype(np.float32), "w")
    shape_back = [
        helper.make_node("Shape", ["mm"], ["mm_shape"]),  # a shape-only reader: does not block the fold
        helper.make_node("Reshape", ["bn", "mm_shape"], ["y"]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="linear"),
        helper.make_node("Flatten", ["mm"], ["flat"], axis=2),
        _bn("norm", "flat", "bn"),
        *shape_back,
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, tokens, width])],
        [weight, *_bn_inputs("norm", channels)],
        "y",
        [2, tokens, channels],
    )
    ctx = PassContext()
    folded = FoldBatchNormPass().run(model, ctx)
    assert "BatchNormalization" not in _ops(folded) and "Add" in _ops(folded)
    assert ctx.notes["folded"] == {"norm": "linear"} and ctx.notes["kept"] == {}
    x = RNG.normal(size=(2, tokens, width)).astype(np.float32)
    np.testing.assert_allclose(model_logits(folded, [x]), model_logits(model, [x]), rtol=1e-5, atol=1e-5)


def test_conv_batchnorm_folds_into_the_bias_and_residual_batchnorm_stays():
    weight = numpy_helper.from_array(RNG.normal(size=(3, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(RNG.normal(size=3).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        _bn("bn1", "conv", "a"),
        helper.make_node("Add", ["a", "x"], ["sum"], name="residual"),
        _bn("bn2", "sum", "y"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [weight, bias, *_bn_inputs("bn1", 3), *_bn_inputs("bn2", 3)],
        "y",
        [1, 3, 8, 8],
    )
    ctx = PassContext()
    folded = FoldBatchNormPass().run(model, ctx)
    assert _ops(folded).count("BatchNormalization") == 1 and "Identity" not in _ops(folded)
    assert ctx.notes["folded"] == {"bn1": "conv"}
    assert "Add" in ctx.notes["kept"]["bn2"]  # says why, per tensor
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model_logits(folded, [x]), model_logits(model, [x]), rtol=1e-5, atol=1e-5)
