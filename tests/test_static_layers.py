"""One layer in static int8 without a whole-model calibration per layer: the model equals the
whole-model quantizer's, and a budget's ranking in static mode ranks as that quantizer's models do."""

from __future__ import annotations

import numpy as np
import pytest

from passes.base import PassContext
from passes.graph import copy_model
from passes.metrics import sqnr_db
from passes.ort_quant import FloatValues, ensure_node_names, weighted_nodes
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import make_session
from passes.static_layers import StaticLayerSplicer


class CountedValues(FloatValues):
    """Float values that count their capture passes."""

    captures = 0

    def __call__(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        self.captures += 1
        return super().__call__(names)


def _logits(model, images: np.ndarray) -> np.ndarray:
    return make_session(model, 1).run(None, {model.graph.input[0].name: images})[0]


def test_a_spliced_layer_is_the_whole_model_quantizers(tiny_onnx, tiny_images):
    model = copy_model(tiny_onnx)
    ensure_node_names(model)
    step = QuantizeInt8Pass(QuantizeInt8Config(mode="static"))
    step._weight_type, step._excluded = "int8", None
    calibration = [tiny_images[:4], tiny_images[4:8]]
    layers = weighted_nodes(model, ["MatMul", "Gemm"])
    values = CountedValues(model, calibration, model.graph.input[0].name, 1)
    whole = []
    splicer = StaticLayerSplicer(
        model,
        layers,
        lambda piece, nodes, feeds: step.quantize_layers(piece, nodes, False, feeds, {}),
        values,
        lambda nodes: whole.append(nodes) or step.quantize_layers(model, nodes, False, calibration, {}),
    )
    fresh = tiny_images[8:12]
    float_logits = _logits(model, fresh)
    for layer in layers:
        ours = _logits(splicer.build([layer]), fresh)
        theirs = _logits(step.quantize_layers(model, [layer], False, calibration, {}), fresh)
        assert np.abs(ours - float_logits).max() > 0  # the layer is quantized
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    assert values.captures < len(layers)  # the layers' inputs are captured several at a time
    assert not whole  # every layer was cut out alone


def test_a_static_budget_ranks_as_the_whole_model_quantizer(tiny_onnx, tiny_images):
    calibration, search = [tiny_images[:8]], [tiny_images[8:12]]
    ctx = PassContext(calibration=calibration, search=search, threads=2)
    step = QuantizeInt8Pass(QuantizeInt8Config(mode="static", min_sqnr_db=60.0, max_float_layers=2))
    step.run(tiny_onnx, ctx)
    ranked = {entry["layer"]: entry["sqnr_db"] for entry in ctx.notes["sensitivity"]}
    assert len(ranked) == 9

    prepared = copy_model(tiny_onnx)
    ensure_node_names(prepared)
    reference = _logits(tiny_onnx, search[0])
    whole = {
        layer: sqnr_db(
            reference,
            _logits(step.quantize_layers(prepared, [layer], ctx.notes["reduce_range"], calibration, {}), search[0]),
        )
        for layer in ranked
    }
    assert list(ranked) == sorted(whole, key=whole.__getitem__)
    assert all(ranked[layer] == pytest.approx(whole[layer], abs=0.05) for layer in ranked)
