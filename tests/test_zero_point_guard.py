"""The zero-point guard on a tensor built to overflow: all-positive and narrow, read by a linear
layer and by an activation x activation MatMul (softmax @ V's shape)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import PassError
from passes.base import PassContext
from passes.metrics import sqnr_db
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import model_logits
from passes.zero_point_guard import ZeroPointGuardConfig, ZeroPointGuardPass

RNG = np.random.default_rng(0)


def _offset_model(mix: bool = True) -> onnx.ModelProto:
    """x ~ N(0,1); y = 10 + 0.1 x and z = 5 + 0.05 x: all-positive and narrow. y @ W (a weight) and
    z @ V (V computed, as softmax @ V), summed."""
    init = [
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.float32(10.0), "o"),
        numpy_helper.from_array(np.float32(0.05), "s2"),
        numpy_helper.from_array(np.float32(5.0), "o2"),
        numpy_helper.from_array(RNG.normal(size=(16, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(RNG.normal(size=(16, 8)).astype(np.float32), "wv"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("Add", ["xs", "o"], ["y"], name="offset"),
        helper.make_node("Mul", ["x", "s2"], ["xs2"]),
        helper.make_node("Add", ["xs2", "o2"], ["z"]),
        helper.make_node("MatMul", ["y", "w"], ["lin"], name="linear"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="values"),
        helper.make_node("MatMul", ["z", "v"], ["mix"], name="mix"),
        helper.make_node("Add", ["lin", "mix"], ["out"]),
    ]
    if not mix:  # the linear branch alone: z @ V's int8 error (V's scale times z's mean) would hide y's
        nodes = nodes[:2] + [nodes[4], helper.make_node("Identity", ["lin"], ["out"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_guard_removes_the_offset_exactly_and_int8_gains():
    model = _offset_model()
    calibration = [RNG.normal(size=(8, 16, 16)).astype(np.float32)]
    test = [RNG.normal(size=(8, 16, 16)).astype(np.float32)]
    ctx = PassContext(calibration=calibration, input_name="x")
    guarded = ZeroPointGuardPass().run(model, ctx)
    notes = ctx.notes["tensors"]
    assert notes["y"]["fix"].startswith("shift") and notes["y"]["lost"] > 0.9
    assert notes["y"]["zero_point_without_zero"] < 0  # what Q-HyViT calls overflow
    assert notes["z"]["fix"].startswith("shift")  # read by an activation x activation MatMul
    reference = model_logits(model, test)
    np.testing.assert_allclose(model_logits(guarded, test), reference, rtol=1e-4, atol=1e-3)
    # static int8 of every MatMul, calibrated: the shifted tensors use all 256 codes. Error against
    # the part of the output that varies with the input (the offset's constant share carries nothing)
    quantize = QuantizeInt8Pass(QuantizeInt8Config(mode="static", weighted_only=False, calibrate_method="minmax"))
    linear = _offset_model(mix=False)
    exact = model_logits(linear, test)
    mean = exact.mean(axis=0)

    def varying_sqnr(candidate: onnx.ModelProto) -> float:
        quantized = quantize.run(candidate, PassContext(calibration=calibration, input_name="x"))
        return sqnr_db(exact - mean, model_logits(quantized, test) - mean)

    plain, fixed = varying_sqnr(linear), varying_sqnr(ZeroPointGuardPass().run(linear, ctx))
    assert fixed > plain + 10, (plain, fixed)


def test_guard_leaves_tensors_that_cross_zero_or_waste_little():
    model = _offset_model()
    ctx = PassContext(calibration=[RNG.normal(size=(8, 16, 16)).astype(np.float32)], input_name="x")
    guarded = ZeroPointGuardPass(ZeroPointGuardConfig(min_lost=0.99)).run(model, ctx)
    assert ctx.notes["shifted"] == 0 and "kept" in ctx.notes["tensors"]["y"]["fix"]
    assert "x" not in ctx.notes["tensors"]  # crosses zero
    assert [n.op_type for n in guarded.graph.node] == [n.op_type for n in model.graph.node]


def test_guard_needs_calibration_images():
    with pytest.raises(PassError, match="calibration"):
        ZeroPointGuardPass().run(_offset_model(), PassContext())
