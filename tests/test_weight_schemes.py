"""Per-layer weight schemes: the measured choice is right for weights built to need it, and the model
ONNX Runtime's quantizer writes carries the chosen scales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from passes.base import PassContext
from passes.metrics import sqnr_db
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import make_session
from passes.weight_schemes import SCHEMES, WeightScheme

K = 256


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    loud = rng.standard_normal((K, 16))
    loud[:, 0] *= 50
    return {
        "skewed": rng.uniform(0.5, 1.5, (K, 16)),  # never crosses zero: a symmetric range wastes half
        "loud": loud,  # one output channel 50x the others
        "laplace": rng.laplace(0, 1, (K, 16)),  # long tails: clipping them buys finer steps
    }


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", f"{name}/w"], [name], name=name) for name in weights]
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n", 16]) for name in weights],
        [numpy_helper.from_array(w.astype(np.float32), f"{name}/w") for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = make_session(model, 1)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


@pytest.fixture(scope="module")
def searched():
    rng = np.random.default_rng(0)
    model = _model(_weights(rng))
    calibration = [rng.standard_normal((64, K)).astype(np.float32) for _ in range(2)]
    results = {}
    for schemes in ("fixed", "search"):
        ctx = PassContext(calibration=calibration, input_name="x")
        results[schemes] = (
            QuantizeInt8Pass(QuantizeInt8Config(schemes=schemes, reduce_range=True)).run(model, ctx),
            ctx.notes,
        )
    fresh = rng.standard_normal((128, K)).astype(np.float32)  # not the calibration inputs
    return model, results, fresh


def test_each_layer_gets_the_scheme_its_weights_need(searched):
    _, results, _ = searched
    chosen = {layer: entry["chosen"] for layer, entry in results["search"][1]["schemes"].items()}
    assert "asymmetric" in chosen["skewed"]
    assert chosen["loud"].startswith("per-channel")
    assert "clip" in chosen["laplace"]
    assert "schemes" not in results["fixed"][1]


def test_chosen_schemes_measure_better_on_new_inputs(searched):
    model, results, fresh = searched
    reference = _outputs(model, fresh)
    fixed, search = (_outputs(results[key][0], fresh) for key in ("fixed", "search"))
    gain = {name: sqnr_db(reference[name], search[name]) - sqnr_db(reference[name], fixed[name]) for name in reference}
    assert gain["skewed"] > 0.5 and gain["laplace"] > 1.5 and gain["loud"] > -0.2, gain


def test_onnx_runtime_writes_the_chosen_scales(searched):
    model, results, _ = searched
    quantized, notes = results["search"]
    written = {init.name: numpy_helper.to_array(init) for init in quantized.graph.initializer}
    by_label = {
        scheme.label: scheme
        for scheme in (
            WeightScheme(pc, sym, clip)
            for pc in (True, False)
            for sym in (True, False)
            for clip in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
        )
    }
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for layer, entry in notes["schemes"].items():
        scheme = by_label[entry["chosen"]]
        expected = scheme.overrides(weights[f"{layer}/w"], 1, onnx.TensorProto.INT8, reduce_range=True)
        scales = [e["scale"] for e in expected]
        np.testing.assert_allclose(written[f"{layer}/w_scale"], scales, rtol=1e-6)


def _bridge_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv feature map -> token sequence -> a linear layer with long-tailed weights: one bridge."""
    initializers = [
        numpy_helper.from_array(rng.standard_normal((64, 8, 1, 1)).astype(np.float32), "conv/w"),
        numpy_helper.from_array(np.array([0, 64, 16], np.int64), "tokens/shape"),
        numpy_helper.from_array(rng.laplace(0, 1, (64, 32)).astype(np.float32), "linear/w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv/w"], ["map"], name="conv"),
        helper.make_node("Reshape", ["map", "tokens/shape"], ["flat"], name="tokens"),
        helper.make_node("Transpose", ["flat"], ["seq"], perm=[0, 2, 1], name="to_seq"),
        helper.make_node("MatMul", ["seq", "linear/w"], ["y"], name="linear"),
    ]
    return _feature_map_model(nodes, initializers, "y")


def _feature_map_model(nodes: list, initializers: list, output: str) -> onnx.ModelProto:
    """``nodes`` as a model reading an 8-channel 4 x 4 feature map ``x`` and giving ``output``."""
    graph = helper.make_graph(
        nodes,
        "bridges",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8, 4, 4])],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_bridge_reconstruction_tunes_the_block_and_the_model_keeps_it():
    rng = np.random.default_rng(1)
    model = _bridge_model(rng)
    calibration = [rng.standard_normal((16, 8, 4, 4)).astype(np.float32) for _ in range(2)]
    fresh = rng.standard_normal((64, 8, 4, 4)).astype(np.float32)
    reference = make_session(model, 1).run(None, {"x": fresh})[0]
    sqnr = {}
    for reconstruct in (False, True):
        ctx = PassContext(calibration=calibration, input_name="x")
        quantized = QuantizeInt8Pass(QuantizeInt8Config(reconstruct_bridges=reconstruct, reduce_range=True)).run(
            model, ctx
        )
        sqnr[reconstruct] = sqnr_db(reference, make_session(quantized, 1).run(None, {"x": fresh})[0])
    assert ctx.notes["bridges"] == [{"at": "tokens", "kind": "to_tokens", "conv": "conv", "linear": "linear"}]
    entry = ctx.notes["bridge_reconstruction"]["linear"]
    assert entry["clip"] < 1 and entry["block_sqnr_db"]["after"] > entry["block_sqnr_db"]["before"] + 1
    assert sqnr[True] > sqnr[False] + 1, sqnr  # on inputs the tuning never saw


def _two_bridge_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A stem conv, then conv -> tokens -> linear (a bridge to tokens), then attention's output
    projection with a residual back onto a feature map -> conv (a bridge to a feature map)."""
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "stem/w"),
        numpy_helper.from_array(rng.standard_normal((64, 8, 1, 1)).astype(np.float32), "conv/w"),
        numpy_helper.from_array(np.array([0, 64, 16], np.int64), "tokens/shape"),
        numpy_helper.from_array(rng.laplace(0, 1, (64, 32)).astype(np.float32), "linear/w"),
        numpy_helper.from_array(rng.laplace(0, 1, (32, 32)).astype(np.float32), "proj/w"),
        numpy_helper.from_array(np.array([0, 32, 4, 4], np.int64), "map/shape"),
        numpy_helper.from_array(rng.standard_normal((8, 32, 1, 1)).astype(np.float32), "conv2/w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "stem/w"], ["s"], name="stem"),
        helper.make_node("Conv", ["s", "conv/w"], ["map"], name="conv"),
        helper.make_node("Reshape", ["map", "tokens/shape"], ["flat"], name="tokens"),
        helper.make_node("Transpose", ["flat"], ["seq"], perm=[0, 2, 1], name="to_seq"),
        helper.make_node("MatMul", ["seq", "linear/w"], ["y"], name="linear"),
        helper.make_node("Relu", ["y"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "proj/w"], ["p"], name="proj"),
        helper.make_node("Add", ["p", "y"], ["r"], name="residual"),
        helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1], name="to_map"),
        helper.make_node("Reshape", ["rt", "map/shape"], ["m2"], name="map2"),
        helper.make_node("Conv", ["m2", "conv2/w"], ["out"], name="conv2"),
    ]
    return _feature_map_model(nodes, initializers, "out")


def test_region_inputs_are_what_the_nodes_between_read_from_outside():
    from passes.graph import region_inputs

    graph = _two_bridge_model(np.random.default_rng(0)).graph
    assert region_inputs(graph, "a", "out") == ["a", "y"]  # the residual's other input, not the stem
    assert region_inputs(graph, "map", "y") == ["map"]  # shapes and weights are initializers
    assert region_inputs(graph, "x", "out") == ["x"]


def _reconstructed(model, calibration, monkeypatch, own_scores: bool):
    """The int8 pass's notes with schemes searched and bridges reconstructed, and the float pieces
    each reconstruction trial ran (node names); ``own_scores`` False: every block is run."""
    from passes.weight_schemes import WeightTuner

    pieces: list[set[str]] = []
    measure, reconstruct = WeightTuner._measure, WeightTuner.reconstruct

    def measured(self, jobs):
        pieces.extend({n.name for n in onnx.load_from_string(probe.data).graph.node} for probe, _ in jobs)
        return measure(self, jobs)

    def reconstructing(self, *args, **kwargs):
        if not own_scores:
            self.own_scores = {}
        monkeypatch.setattr(WeightTuner, "_measure", measured)
        return reconstruct(self, *args, **kwargs)

    monkeypatch.setattr(WeightTuner, "reconstruct", reconstructing)
    ctx = PassContext(calibration=calibration, input_name="x")
    config = QuantizeInt8Config(schemes="search", reconstruct_bridges=True, reduce_range=True)
    QuantizeInt8Pass(config).run(model, ctx)
    monkeypatch.setattr(WeightTuner, "_measure", measure)
    monkeypatch.setattr(WeightTuner, "reconstruct", reconstruct)
    return ctx.notes, pieces


def test_a_bridge_block_runs_alone_and_a_last_layer_block_reads_the_layers_own_scores(monkeypatch):
    """A block is cut at everything it reads (the residual too), so its trials never rerun the model
    before it; a block whose one quantized layer is its last (the linear after a float conv) is
    that layer's own output, so its clips come from the scheme search, with the same result."""
    rng = np.random.default_rng(4)
    model = _two_bridge_model(rng)
    calibration = [rng.standard_normal((8, 8, 4, 4)).astype(np.float32) for _ in range(2)]
    notes, pieces = _reconstructed(model, calibration, monkeypatch, own_scores=True)
    table = notes["bridge_reconstruction"]
    linear, proj = table["linear"], table["proj"]
    assert "measured" in linear and "measured" not in proj
    chosen = notes["schemes"]["linear"]["chosen"]
    assert linear["block_sqnr_db"]["before"] == notes["schemes"]["linear"]["sqnr_db"][chosen]
    assert pieces and all(piece == {"proj", "residual", "to_map", "map2", "conv2"} for piece in pieces)

    ran, ran_pieces = _reconstructed(model, calibration, monkeypatch, own_scores=False)
    assert {"conv", "tokens", "to_seq", "linear"} in ran_pieces  # the linear's block, run
    for name, entry in ran["bridge_reconstruction"].items():
        assert entry["clip"] == table[name]["clip"]
        for side in ("before", "after"):
            assert entry["block_sqnr_db"][side] == pytest.approx(table[name]["block_sqnr_db"][side], abs=0.01)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_static_gemm_weights_take_their_channel_axis(trans_b):
    """QDQ per-channel overrides must name the axis ONNX Runtime uses for a Gemm's weight, or it refuses them."""
    rng = np.random.default_rng(2)
    weight = rng.laplace(0, 1, (16, K) if trans_b else (K, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=trans_b)],
        "gemm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(16, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    calibration = [rng.standard_normal((64, K)).astype(np.float32)]
    fresh = rng.standard_normal((64, K)).astype(np.float32)
    reference = _outputs(model, fresh)["y"]
    sqnr = {}
    for schemes in ("fixed", "search"):
        ctx = PassContext(calibration=calibration, input_name="x")
        quantized = QuantizeInt8Pass(QuantizeInt8Config(mode="static", schemes=schemes, reduce_range=True)).run(
            model, ctx
        )
        sqnr[schemes] = sqnr_db(reference, _outputs(quantized, fresh)["y"])
    assert "clip" in ctx.notes["schemes"]["gemm"]["chosen"] and sqnr["search"] > sqnr["fixed"] + 1, sqnr


@pytest.mark.parametrize("qtype", [onnx.TensorProto.INT8, onnx.TensorProto.UINT8])
@pytest.mark.parametrize("reduce_range", [True, False])
@pytest.mark.parametrize("scheme", [*SCHEMES, WeightScheme(False, False, 0.7), WeightScheme(True, False, 0.85)])
def test_vectorised_scales_are_onnx_runtimes(scheme, reduce_range, qtype):
    """Every channel's scale and zero point equal ONNX Runtime's own compute_scale_zp, bit for bit,
    also for an all-zero channel and one that never crosses zero."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((32, 12)).astype(np.float32)
    weight[:, 3] = 0.0
    weight[:, 5] = np.abs(weight[:, 5]) + 0.5
    entries = scheme.overrides(weight, 1, qtype, reduce_range)
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range, scheme.symmetric)
    lows, highs = weight.min(0), weight.max(0)
    if not scheme.per_channel:
        lows, highs = np.full_like(lows, lows.min()), np.full_like(highs, highs.max())
    for entry, low, high in zip(entries, lows * scheme.clip, highs * scheme.clip):
        zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax, scheme.symmetric)
        assert entry["scale"] == np.float32(scale) and entry["scale"].dtype == np.float32
        assert entry["zero_point"] == zero_point and entry["zero_point"].dtype == zero_point.dtype


def test_a_trial_is_scored_where_it_runs_the_same_at_any_thread_count(searched):
    """A trial's SQNR is computed by whoever runs it (this process or a 1-thread worker): the same
    figure at 1 and 2 callers, equal to an independent float64 SQNR of the quantized layer, and the
    search leaves no float piece held in this process."""
    from passes import weight_schemes
    from passes.graph import GraphIndex
    from passes.int8_layers import DynamicInt8Builder

    assert not weight_schemes._FLOAT_PIECES
    rng = np.random.default_rng(1)
    piece = _model({"laplace": rng.laplace(0, 1, (K, 16))})
    feeds = [{"x": rng.standard_normal((64, K)).astype(np.float32)} for _ in range(3)]

    def quantize(model, layers, overrides, _feeds):
        return DynamicInt8Builder(model, layers, onnx.TensorProto.INT8, True, True, overrides).build(layers)

    shared = weight_schemes.TrialInputs(
        quantize, onnx.TensorProto.INT8, True, {0: ("t", piece.SerializeToString(), feeds)}
    )
    trial = {"laplace": WeightScheme(clip=0.8)}
    scores = []
    for callers in (1, 2):
        weight_schemes._FLOAT_PIECES.clear()
        scores.append(weight_schemes.trial_sqnr(shared, (0, trial, callers)))
    overrides = weight_schemes.scheme_overrides(GraphIndex(piece), trial, onnx.TensorProto.INT8, True)
    quantized = quantize(piece, ["laplace"], overrides, feeds)
    # feed by feed, as the trial ran them: a dynamic layer quantizes its input per call
    expected = sqnr_db(
        np.concatenate([_outputs(piece, f["x"])["laplace"] for f in feeds]),
        np.concatenate([_outputs(quantized, f["x"])["laplace"] for f in feeds]),
    )
    weight_schemes._FLOAT_PIECES.clear()
    assert scores[0] == scores[1]
    assert abs(scores[0] - expected) < 2e-3, (scores, expected)


def test_dynamic_dequantized_is_onnx_runtimes_dynamic_quantize_linear():
    """The exact scorer's view of a dynamic layer's input is, bit for bit, what ONNX Runtime's
    DynamicQuantizeLinear makes of it: wide and narrow ranges, all-positive and all-negative
    tensors, heavy tails, ties."""
    from passes.linear_error import dynamic_dequantized

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "dql",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [
            helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, None),
            helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info("z", onnx.TensorProto.UINT8, None),
        ],
    )
    session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), 1)
    rng = np.random.default_rng(3)
    tensors = [rng.standard_normal((1, 50, 64)).astype(np.float32) * rng.uniform(0.01, 30) for _ in range(20)]
    tensors += [np.abs(tensors[0]), -np.abs(tensors[1]), tensors[2] ** 3, np.round(tensors[3] * 4) / 4]
    for x in tensors:
        q, s, z = session.run(None, {"x": x})
        assert np.array_equal(dynamic_dequantized(x), (q.astype(np.float64) - float(z)) * float(s))


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_exact_scores_are_the_scores_of_runs_on_a_vit(tiny_onnx, tiny_images, weight_type, monkeypatch):
    """On a ViT's linear layers, the scheme search scores each candidate from the layer's inputs
    (exact) as it scores it by quantizing the layer and running it with ONNX Runtime: every figure
    equal to the 0.001 dB a search reads, give or take one rounding step, and the same choices."""
    from passes import weight_schemes
    from passes.quantize_int8 import u8s8_saturates

    computed: list[int] = []
    error, init = weight_schemes.DynamicLinearError, weight_schemes.WeightTuner.__init__
    monkeypatch.setattr(weight_schemes, "DynamicLinearError", lambda *args: computed.append(1) or error(*args))
    tables = {}
    for exact in (True, False):

        def tuner(self, *args, exact=exact, **kwargs):
            init(self, *args, **kwargs)
            assert self.exact is not None  # the pass asks for the exact scorer in dynamic mode
            self.exact = self.exact if exact else None

        monkeypatch.setattr(weight_schemes.WeightTuner, "__init__", tuner)
        ctx = PassContext(calibration=[tiny_images[:6]], input_name="input", batch_size=1)
        config = QuantizeInt8Config(schemes="search", weight_type=weight_type, reduce_range=True)
        QuantizeInt8Pass(config).run(tiny_onnx, ctx)
        tables[exact] = ctx.notes["schemes"]
    assert tables[True].keys() == tables[False].keys() and len(tables[True]) >= 8
    # 8-bit int8 weights (a clip widens 7-bit ones) saturate there: every layer falls back to runs
    saturating = weight_type == "int8" and u8s8_saturates()
    assert len(computed) == (0 if saturating else len(tables[True]))
    for layer, exact in tables[True].items():
        ran = tables[False][layer]
        assert exact["chosen"] == ran["chosen"], layer
        assert exact["sqnr_db"].keys() == ran["sqnr_db"].keys()
        for label, value in exact["sqnr_db"].items():
            assert abs(value - ran["sqnr_db"][label]) <= 1.5e-3, (layer, label, value, ran["sqnr_db"][label])


def test_saturating_kernels_are_run_not_computed(searched, monkeypatch):
    """Where ONNX Runtime's uint8 x int8 kernel saturates (8-bit int8 weights on x86 without VNNI),
    its output is not the exact product: the search runs those candidates instead of computing them."""
    from passes import linear_error, quantize_int8

    monkeypatch.setattr(quantize_int8, "u8s8_saturates", lambda: True)

    def refuse(*args, **kwargs):
        raise AssertionError("computed a saturating kernel's error")

    monkeypatch.setattr(linear_error.DynamicLinearError, "__init__", refuse)
    model, _, _ = searched
    calibration = [np.random.default_rng(2).standard_normal((64, K)).astype(np.float32)]
    ctx = PassContext(calibration=calibration, input_name="x")
    config = QuantizeInt8Config(schemes="search", weight_type="int8", reduce_range=False)
    QuantizeInt8Pass(config).run(model, ctx)
    assert len(ctx.notes["schemes"]) == 3


@pytest.mark.parametrize("qtype", [onnx.TensorProto.INT8, onnx.TensorProto.UINT8])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_a_scheme_quantizes_as_its_overrides_do(qtype, reduce_range):
    """The search's direct quantization of a candidate is the one its TensorQuantOverrides give."""
    from passes.weight_schemes import quantize_weight

    weight = np.random.default_rng(4).laplace(0, 1, (K, 16)).astype(np.float32)
    for scheme in [*SCHEMES, WeightScheme(False, False, 0.6), WeightScheme(True, True, 0.5)]:
        direct = scheme.quantize(weight, 1, qtype, reduce_range)
        entries = quantize_weight(weight, scheme.overrides(weight, 1, qtype, reduce_range), qtype)
        assert direct.values.dtype == entries.values.dtype and np.array_equal(direct.values, entries.values)
        assert np.array_equal(direct.scale, entries.scale) and np.array_equal(direct.zero_point, entries.zero_point)


def test_quantizer_runs_on_parallel_threads_take_turns():
    """A quantizer run swaps the process's working directory and stdout: two threads' runs must not
    interleave, or the later one restores the earlier one's deleted folder (a static scheme search
    on two executor lanes failed so) and its captured stdout."""
    import os
    import shutil
    import sys
    import threading
    import time

    from passes.ort_quant import run_ort_quantizer

    model = _bridge_model(np.random.default_rng(0))
    both_inside = threading.Barrier(2)
    errors: list[BaseException] = []

    def copy(first: bool):
        def quantize(source, output):
            try:
                both_inside.wait(timeout=0.5)  # only reached together where runs interleave
            except threading.BrokenBarrierError:
                pass
            time.sleep(0 if first else 0.2)  # the first to enter leaves first
            shutil.copy(source, output)

        return quantize

    def run(first: bool):
        try:
            run_ort_quantizer(model, copy(first))
        except BaseException as error:  # whatever a thread raised, reported below
            errors.append(error)

    cwd, stdout = os.getcwd(), sys.stdout
    threads = [threading.Thread(target=run, args=(True,))]
    threads[0].start()
    time.sleep(0.05)
    threads.append(threading.Thread(target=run, args=(False,)))
    threads[1].start()
    for thread in threads:
        thread.join()
    assert not errors and os.getcwd() == cwd and sys.stdout is stdout, errors


def test_static_schemes_are_searched_on_parallel_lanes():
    """Static int8 of the Conv and the linear layer, schemes searched and the bridge tuned, each
    trial quantized by ONNX Runtime's quantizer on one of two lanes; the Conv's weight a Constant
    node, as TinyViT's export leaves some (the quantizer takes overrides only for initializers)."""
    rng = np.random.default_rng(5)
    model = _bridge_model(rng)
    weight = next(init for init in model.graph.initializer if init.name == "conv/w")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["conv/w"], value=weight))
    model.graph.initializer.remove(weight)
    calibration = [rng.standard_normal((16, 8, 4, 4)).astype(np.float32) for _ in range(2)]
    ctx = PassContext(calibration=calibration, input_name="x", threads=2)
    config = QuantizeInt8Config(
        mode="static", op_types=["Conv", "MatMul"], schemes="search", reconstruct_bridges=True, reduce_range=True
    )
    QuantizeInt8Pass(config).run(model, ctx)
    assert set(ctx.notes["schemes"]) == {"conv", "linear"}
    assert set(ctx.notes["bridge_reconstruction"]) == {"conv", "linear"}
    assert all("measured" not in entry for entry in ctx.notes["bridge_reconstruction"].values())
