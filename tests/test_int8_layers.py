"""The direct dynamic-int8 builder writes what ONNX Runtime's quantizer writes: the same integer
weights and, run by ONNX Runtime, bit-identical outputs, so a search over its models measures the
model the pass ships."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from passes.graph import gemms_as_matmul, same_computation
from passes.int8_layers import DynamicInt8Builder
from passes.ort_quant import ensure_node_names, weighted_nodes
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import model_logits
from passes.weight_schemes import WeightScheme

K, N = 96, 24


def _layers_model(rng: np.random.Generator) -> onnx.ModelProto:
    skewed = rng.uniform(0.5, 1.5, (K, N))
    loud = rng.standard_normal((K, N))
    loud[:, 0] *= 50
    weights = {"a": skewed, "b": loud, "c": rng.laplace(0, 1, (K, N))}
    nodes = [helper.make_node("MatMul", ["x", f"{name}/w"], [name], name=name) for name in weights]
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n", N]) for name in weights],
        [numpy_helper.from_array(w.astype(np.float32), f"{name}/w") for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    from passes.runtime import make_session

    return make_session(model, 1).run(None, {"x": x})


@pytest.mark.parametrize("reduce_range", [True, False])
@pytest.mark.parametrize(
    "scheme",
    [WeightScheme(), WeightScheme(True, False), WeightScheme(False, True), WeightScheme(False, False, 0.8)],
    ids=lambda s: s.label,
)
def test_builder_matches_the_quantizer_under_overrides(scheme, reduce_range):
    rng = np.random.default_rng(1)
    model = _layers_model(rng)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    overrides = {name: scheme.overrides(w, 1, onnx.TensorProto.INT8, reduce_range) for name, w in weights.items()}
    quantizer = QuantizeInt8Pass(QuantizeInt8Config(reduce_range=reduce_range))
    x = rng.standard_normal((5, K)).astype(np.float32)
    for layers in (["b"], ["a", "c"], ["a", "b", "c"]):
        expected = quantizer.quantize_layers(model, layers, reduce_range, [], overrides)
        built = DynamicInt8Builder(model, ["a", "b", "c"], onnx.TensorProto.INT8, reduce_range, overrides=overrides)
        ours = built.build(layers)
        for mine, theirs in zip(_outputs(ours, x), _outputs(expected, x)):
            assert np.array_equal(mine, theirs)
        written = {
            i.name: numpy_helper.to_array(i) for i in expected.graph.initializer if i.name.endswith("_quantized")
        }
        mine_w = {i.name: numpy_helper.to_array(i) for i in ours.graph.initializer if i.name.endswith("_quantized")}
        assert written.keys() == mine_w.keys() == {f"{name}/w_quantized" for name in layers}
        for name in written:
            assert np.array_equal(written[name], mine_w[name])
        # layers left float stay the float MatMul
        assert sum(n.op_type == "MatMul" for n in ours.graph.node) == 3 - len(layers)


def test_builder_matches_the_quantizer_on_a_vit(tiny_onnx, tiny_images):
    """A real (small) DeiT, ONNX Runtime's default scales (no overrides): every subset measured alike."""
    model = onnx.ModelProto.FromString(tiny_onnx.SerializeToString())
    ensure_node_names(model)
    gemms_as_matmul(model)
    layers = weighted_nodes(model, ["MatMul"])
    assert len(layers) >= 8
    quantizer = QuantizeInt8Pass(QuantizeInt8Config(reduce_range=False))
    builder = DynamicInt8Builder(model, layers, onnx.TensorProto.INT8, reduce_range=False)
    batches = [tiny_images[:1], tiny_images[1:3]]
    for chosen in (layers, layers[::3], [layers[-1]]):
        theirs, built = quantizer.quantize_layers(model, chosen, False, [], {}), builder.build(chosen)
        ours = model_logits(built, batches, 1)
        assert np.array_equal(ours, model_logits(theirs, batches, 1))
        assert same_computation(built, theirs)  # the same graph, whatever its names
    float_logits = model_logits(model, batches, 1)
    assert not np.array_equal(ours, float_logits)  # the check above compares quantized models


@pytest.mark.parametrize("budget", [1 << 30, 1])
def test_alone_probe_measures_what_a_whole_model_measures(tiny_onnx, tiny_images, budget):
    """Rerunning only the network from a layer on gives that layer's whole-model fidelity, whether the
    float values entering every layer are captured in one pass or (a budget of one byte) a pass per layer."""
    from passes.accuracy_budget import AloneProbe, FidelityProbe
    from passes.ort_quant import FloatValues
    from passes.runtime import batches

    model = onnx.ModelProto.FromString(tiny_onnx.SerializeToString())
    ensure_node_names(model)
    gemms_as_matmul(model)
    layers = weighted_nodes(model, ["MatMul"])
    builder = DynamicInt8Builder(model, layers, onnx.TensorProto.INT8, reduce_range=False)
    search = batches(tiny_images[:6], 1)
    probe = FidelityProbe(model, search, 2)
    values = FloatValues(model, search, "input", 2, budget=budget)
    needs = [[node.input[0]] for node in model.graph.node if node.name in layers]
    assert len(values.chunks(needs)) == (1 if budget > 1 else len(layers))
    measured = AloneProbe(model, builder.build, probe, values).rank(layers)
    assert measured.keys() == set(layers)
    for layer in layers:
        whole = probe(builder.build([layer]))
        assert measured[layer].sqnr_db == pytest.approx(whole.sqnr_db, abs=0.01)
        assert measured[layer].agreement == whole.agreement
    assert len({round(f.sqnr_db, 2) for f in measured.values()}) > 1  # layers differ: the ranking has content
