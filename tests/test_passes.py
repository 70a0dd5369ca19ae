import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from passes import PassError
from passes.base import PassContext
from passes.fp16 import Fp16Config, Fp16Pass
from passes.metrics import sqnr_db
from passes.ort_quant import weighted_nodes
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import model_logits
from passes.simplify import SimplifyPass


@pytest.fixture()
def ctx(tiny_images):
    return PassContext(calibration=[tiny_images[:8]])


def _ops(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def test_simplify_shrinks_the_graph_without_changing_logits(tiny_model, tiny_images, ctx):
    from onnxvit.config import ExportConfig
    from onnxvit.export import export_onnx

    exported = export_onnx(tiny_model, tiny_images, ExportConfig())
    simplified = SimplifyPass().run(exported, ctx)
    assert ctx.notes["simplified"] and len(simplified.graph.node) < len(exported.graph.node)
    np.testing.assert_allclose(
        model_logits(simplified, [tiny_images]), model_logits(exported, [tiny_images]), atol=1e-4
    )


def test_simplify_falls_back_when_onnxsim_fails_or_miscompiles(tiny_onnx, ctx, monkeypatch):
    import onnxsim

    def broken(model, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    assert SimplifyPass().run(tiny_onnx, ctx) is tiny_onnx
    assert "onnxsim failed" in ctx.notes["fallback_reason"]

    def miscompiles(model, **kwargs):
        wrong = onnx.ModelProto.FromString(model.SerializeToString())
        head = max(wrong.graph.initializer, key=lambda t: t.name.startswith("head"))
        head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 2 + 1, head.name))
        return wrong, True

    monkeypatch.setattr(onnxsim, "simplify", miscompiles)
    assert SimplifyPass().run(tiny_onnx, ctx) is tiny_onnx
    assert "differ" in ctx.notes["fallback_reason"]


def test_a_rewrite_checks_itself_on_the_engines_check_logits(tiny_onnx, tiny_images):
    # the engine runs each model once on its check images; a rewrite's own check asks it for them
    asked = []

    def check_logits(model):
        asked.append(model)
        return model_logits(model, [tiny_images[:2]])

    ctx = PassContext(calibration=[tiny_images[:4]], logits_on_check_images=check_logits)
    simplified = SimplifyPass().run(tiny_onnx, ctx)
    assert ctx.notes["simplified"] and [id(m) for m in asked] == [id(tiny_onnx), id(simplified)]

    def moved(model):  # the engine's logits say the simplified graph changed them
        return model_logits(model, [tiny_images[:2]]) + (0.0 if model is tiny_onnx else 1.0)

    ctx = PassContext(calibration=[tiny_images[:4]], logits_on_check_images=moved)
    assert SimplifyPass().run(tiny_onnx, ctx) is tiny_onnx and "differ" in ctx.notes["fallback_reason"]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_quantize_int8_stores_int8_weights_and_stays_close(tiny_onnx, tiny_images, ctx, method):
    quantized = QuantizeInt8Pass(QuantizeInt8Config(mode="static", calibrate_method=method)).run(tiny_onnx, ctx)
    int8_weights = [t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    linear_count = len(_ops(tiny_onnx, "Gemm")) + len(_ops(tiny_onnx, "MatMul"))
    assert len(int8_weights) == ctx.notes["quantized_nodes"] > 0
    assert ctx.notes["quantized_nodes"] < linear_count  # attention's activation x activation MatMuls stay float
    # Default: inputs quantized, outputs not: one QuantizeLinear per quantized node.
    assert ctx.notes["QuantizeLinear"] == ctx.notes["quantized_nodes"]
    size = sum(len(t.raw_data) for t in quantized.graph.initializer)
    assert size < 0.5 * sum(len(t.raw_data) for t in tiny_onnx.graph.initializer)
    ref, test = model_logits(tiny_onnx, [tiny_images]), model_logits(quantized, [tiny_images])
    assert sqnr_db(ref, test) > 15.0


def test_quantize_int8_static_options_change_the_graph(tiny_onnx, ctx):
    default = QuantizeInt8Pass(QuantizeInt8Config(mode="static")).run(tiny_onnx, ctx)
    per_channel_scales = [t for t in default.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1]
    assert per_channel_scales, "per_channel=True should give vector weight scales"
    QuantizeInt8Pass(QuantizeInt8Config(mode="static", quantize_outputs=True)).run(tiny_onnx, ctx)
    assert ctx.notes["QuantizeLinear"] > ctx.notes["quantized_nodes"]
    QuantizeInt8Pass(QuantizeInt8Config(mode="static", weighted_only=False)).run(tiny_onnx, ctx)
    assert ctx.notes["quantized_nodes"] is None
    assert ctx.notes["QuantizeLinear"] > len(_ops(default, "QuantizeLinear"))


def _int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """The 8-bit weight matrices: int8, or uint8 where weight_type auto chose the u8u8 kernel."""
    return [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) == 2
    ]


def test_quantize_int8_dynamic_quantizes_every_linear_layer(tiny_onnx, tiny_images, ctx):
    quantized = QuantizeInt8Pass(QuantizeInt8Config(reduce_range=False)).run(tiny_onnx, ctx)
    weights = _int8_weights(quantized)
    # Every Gemm / MatMul with a weight, the classifier Gemm included; activation x activation MatMuls stay float.
    linear = weighted_nodes(tiny_onnx, ["Gemm", "MatMul"])
    assert len(weights) == ctx.notes["quantized_nodes"] == ctx.notes["DynamicQuantizeLinear"] == len(linear) > 0
    assert not _ops(quantized, "Gemm") and max(int(np.abs(w).max()) for w in weights) == 127
    assert sqnr_db(model_logits(tiny_onnx, [tiny_images]), model_logits(quantized, [tiny_images])) > 15.0
    seven_bit = QuantizeInt8Pass(QuantizeInt8Config(reduce_range=True)).run(tiny_onnx, ctx)
    assert max(int(np.abs(w).max()) for w in _int8_weights(seven_bit)) <= 64 and ctx.notes["reduce_range"] is True


def test_accuracy_budget_keeps_the_most_harmful_layers_in_float(tiny_onnx, tiny_images):
    ctx = PassContext(calibration=[tiny_images[:8]], search=[tiny_images[8:]])
    loose = QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=0.0)).run(tiny_onnx, ctx)
    assert ctx.notes["kept_float"] == [] and ctx.notes["budget_met"] and "sensitivity" not in ctx.notes
    all_int8 = ctx.notes["search_fidelity"]["sqnr_db"]
    strict = QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=all_int8 + 3, max_float_layers=9)).run(tiny_onnx, ctx)
    notes = ctx.notes
    assert len(notes["sensitivity"]) == 9  # every linear layer ranked, most harmful first
    ranked = [entry["sqnr_db"] for entry in notes["sensitivity"]]
    assert ranked == sorted(ranked)
    kept = notes["kept_float"]
    assert notes["budget_met"] and 1 <= len(kept) <= 9
    assert kept == [entry["layer"] for entry in notes["sensitivity"][: len(kept)]]
    assert notes["search_fidelity"]["sqnr_db"] >= all_int8 + 3
    assert len(_int8_weights(strict)) == len(_int8_weights(loose)) - len(kept)
    # the report shows the ranking as a table, most harmful first, the kept layers marked
    step = {"name": "int8", "config": {"min_sqnr_db": all_int8 + 3}, "notes": notes}
    rows = [line for line in QuantizeInt8Pass.report_section(step) if line.startswith("| ") and "rank" not in line]
    assert [row.split(" | ")[0] for row in rows] == [f"| {rank}" for rank in range(1, 10)]
    assert [row.split("`")[1] for row in rows] == [entry["layer"] for entry in notes["sensitivity"]]
    assert [row.split("`")[1] for row in rows if row.endswith("| yes |")] == kept
    assert "sensitivity" in QuantizeInt8Pass.tabled_notes  # not repeated in the notes' JSON
    QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=300.0, max_float_layers=2)).run(tiny_onnx, ctx)
    assert not ctx.notes["budget_met"] and len(ctx.notes["kept_float"]) <= 2


def test_budget_layers_move_to_u8u8_only_where_the_model_keeps_its_budget(tiny_onnx, tiny_images):
    """kept_layers: u8u8 turns the budget's float layers into full-range uint8 weights (ONNX Runtime's
    u8u8 kernel) one at a time, each only where the whole model still meets the budget; the written
    model, measured again here, meets it."""
    ctx = PassContext(calibration=[tiny_images[:8]], search=[tiny_images[8:]])
    seven_bit = {"reduce_range": True, "max_float_layers": 9}
    QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=0.0, **seven_bit)).run(tiny_onnx, ctx)
    budget = ctx.notes["search_fidelity"]["sqnr_db"] + 0.3  # just above every layer in 7-bit int8
    QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=budget, **seven_bit)).run(tiny_onnx, ctx)
    kept = ctx.notes["kept_float"]
    assert kept
    moved_model = QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=budget, kept_layers="u8u8", **seven_bit)).run(
        tiny_onnx, ctx
    )
    notes = ctx.notes
    assert notes["u8u8"], "a 7-bit layer's float twin, with 8-bit weights, meets a budget 0.3 dB above all-int8"
    assert sorted(notes["u8u8"] + notes["kept_float"]) == sorted(kept) and notes["budget_met"]
    search = np.concatenate(ctx.search)
    measured = sqnr_db(model_logits(tiny_onnx, [search]), model_logits(moved_model, [search]))
    assert measured >= budget and measured == pytest.approx(notes["search_fidelity"]["sqnr_db"], abs=0.01)
    initializers = {i.name: i for i in moved_model.graph.initializer}
    for layer in notes["u8u8"]:
        matmul = next(n for n in moved_model.graph.node if n.op_type == "MatMulInteger" and n.name == f"{layer}_quant")
        weights = numpy_helper.to_array(initializers[matmul.input[1]])
        assert weights.dtype == np.uint8 and weights.max() == 255  # full range: no 7-bit reduction
    # a budget no model meets moves nothing
    QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=300.0, kept_layers="u8u8", **seven_bit)).run(tiny_onnx, ctx)
    assert ctx.notes["u8u8"] == [] and ctx.notes["kept_float"] and not ctx.notes["budget_met"]


@pytest.mark.parametrize(
    ("saturates", "rounds", "expected"),
    [
        (True, [1.02, 1.04], ("uint8", False)),
        (True, [1.3, 1.2], ("int8", True)),
        (True, [1.3, 1.01, 1.2], ("uint8", False)),  # one round as fast: noise, not a slower kernel
        (False, None, ("int8", False)),
    ],
)
def test_weight_type_auto_takes_u8u8_where_this_cpu_runs_it_as_fast(
    tiny_onnx, tiny_images, monkeypatch, saturates, rounds, expected
):
    """weight_type auto: on a CPU whose u8s8 kernel saturates, full-range uint8 weights (u8u8) unless
    every timing round finds the u8u8 GEMM over 5% slower than 7-bit u8s8, else 7-bit int8;
    elsewhere int8."""
    import passes.quantize_int8 as module

    measured = []
    ratio = float(np.median(rounds)) if rounds else None

    def speed(shapes, threads):
        measured.append(shapes)
        return {"u8u8_time_ratio": ratio, "round_ratios": rounds, "shapes": len(set(shapes))}

    monkeypatch.setattr(module, "u8s8_saturates", lambda: saturates)
    monkeypatch.setattr(module, "u8u8_speed", speed)
    ctx = PassContext(calibration=[tiny_images[:4]])
    model = QuantizeInt8Pass(QuantizeInt8Config()).run(tiny_onnx, ctx)
    assert (ctx.notes["weight_type"], ctx.notes["reduce_range"]) == expected
    assert bool(measured) == saturates  # measured only where the choice exists, at the model's shapes
    if measured:
        assert ctx.notes["u8u8_time_ratio"] == ratio and len(measured[0]) == len(
            weighted_nodes(tiny_onnx, ["Gemm", "MatMul"])
        )
    said = "\n".join(QuantizeInt8Pass.report_section({"name": "int8", "notes": ctx.notes}))
    assert ("full-range uint8" in said) == (expected[0] == "uint8") and ("timed" in said) == saturates
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_quantized")]
    assert weights and {w.dtype for w in weights} == {np.dtype(expected[0])}
    widest = max(int(np.abs(w.astype(np.int32) - (128 if expected[0] == "uint8" else 0)).max()) for w in weights)
    assert widest >= 127 if not expected[1] else widest <= 64  # 8 bits, or 7 where the kernel would saturate


def test_the_u8u8_kernel_is_timed_against_7_bit_u8s8_at_given_shapes():
    from passes.int8_limit import LinearShape, u8u8_speed

    measured = u8u8_speed([LinearShape((197,), 64, 64)] * 2 + [LinearShape((197,), 64, 128)], 1, 2, 3, 3)
    assert measured["shapes"] == 2 and len(measured["round_ratios"]) == 3 and min(measured["round_ratios"]) > 0
    assert measured["u8u8_time_ratio"] == round(float(np.median(measured["round_ratios"])), 4)


def test_only_a_machine_dependent_int8_choice_keys_the_cache_by_machine():
    auto = QuantizeInt8Pass.machine_key(QuantizeInt8Config())
    assert set(auto) == {"u8s8_saturates", "cpu"} and auto["cpu"]
    assert QuantizeInt8Pass.machine_key(QuantizeInt8Config(weight_type="int8", reduce_range=False)) == {}


def test_mixed_precision_keys_the_cache_by_machine_and_timing_method():
    from passes.mixed_precision import MixedPrecisionConfig, MixedPrecisionPass
    from passes.timing import TIMING_METHOD

    key = MixedPrecisionPass.machine_key(MixedPrecisionConfig())
    assert key["cpu"] and key["timing"] == TIMING_METHOD and isinstance(key["u8s8_saturates"], bool)


def test_accuracy_budget_without_search_images_is_a_clear_error(tiny_onnx, ctx):
    with pytest.raises(PassError, match="search_images"):
        QuantizeInt8Pass(QuantizeInt8Config(min_agreement=99.0)).run(tiny_onnx, ctx)


def test_fp16_halves_weights_keeps_blocked_ops_and_io(tiny_onnx, tiny_images, ctx):
    converted = Fp16Pass().run(tiny_onnx, ctx)
    kinds = {t.data_type for t in converted.graph.initializer if len(t.dims) >= 2}
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert converted.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "LayerNormalization" in ctx.notes["kept_float32_ops"]
    ref, test = model_logits(tiny_onnx, [tiny_images]), model_logits(converted, [tiny_images])
    assert sqnr_db(ref, test) > 30.0
    no_block = Fp16Pass(Fp16Config(op_block_list=[])).run(tiny_onnx, ctx)
    assert ctx.notes["kept_float32_ops"] == [] and len(no_block.graph.node) < len(converted.graph.node)


def test_ort_baselines_quantize_as_onnxruntime_documents(tiny_onnx, tiny_images, ctx):
    from passes.ort_baselines import OrtDefaultPass, OrtDynamicPass

    ref = model_logits(tiny_onnx, [tiny_images])
    default = OrtDefaultPass().run(tiny_onnx, ctx)
    ours = QuantizeInt8Pass(QuantizeInt8Config(mode="static")).run(tiny_onnx, ctx)
    # The documented default quantizes far more than the linear layers (every op it knows).
    assert len(_ops(default, "QuantizeLinear")) > 2 * len(_ops(ours, "QuantizeLinear"))
    dynamic = OrtDynamicPass().run(tiny_onnx, ctx)
    assert ctx.notes["DynamicQuantizeLinear"] > 0 and not _ops(dynamic, "QuantizeLinear")
    # Their fidelity is ONNX Runtime's, not ours (ort_default scores ~1 dB on these random weights):
    # assert only that each runs, gives finite logits, and changed them.
    for quantized in (default, dynamic):
        logits = model_logits(quantized, [tiny_images])
        assert np.isfinite(logits).all() and sqnr_db(ref, logits) < 200


def test_compute_op_census_says_what_still_runs_in_float(tiny_onnx, tiny_images, ctx):
    from passes.graph import compute_op_census

    fp32 = compute_op_census(tiny_onnx)
    assert fp32["integer"] == {} and fp32["float"]["Conv"] == 1 and fp32["float"]["MatMul"] >= 8
    dynamic = compute_op_census(QuantizeInt8Pass().run(tiny_onnx, ctx))
    assert dynamic["integer"].get("MatMulInteger", 0) + dynamic["integer"].get("DynamicQuantizeMatMul", 0) == 9
    assert dynamic["float"]["Conv"] == 1  # the patch embedding: MatMul / Gemm only by default
    static = compute_op_census(
        QuantizeInt8Pass(QuantizeInt8Config(mode="static", op_types=["Conv", "MatMul", "Gemm"])).run(tiny_onnx, ctx)
    )
    assert static["integer"].get("Conv") == 1 and "Conv" not in static["float"]  # QDQ-wrapped: fused by ORT


def test_fp16_output_is_a_valid_onnx_model(tiny_onnx, ctx):
    """The converter appends the input Cast after its readers: ONNX Runtime runs that, onnx's checker
    (and other tools) refuse it."""
    converted = Fp16Pass().run(tiny_onnx, ctx)
    onnx.checker.check_model(converted, full_check=True)
    assert ctx.notes["reordered_nodes"] > 0  # the pass did reorder: without it the check above fails


def test_topological_sort_orders_a_shuffled_graph_and_refuses_a_missing_producer(tiny_onnx):
    from passes.graph import copy_model, topological_sort

    shuffled = copy_model(tiny_onnx)
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes[::-1])
    assert topological_sort(shuffled) > 0
    onnx.checker.check_model(shuffled, full_check=True)
    assert topological_sort(shuffled) == 0
    del shuffled.graph.node[0]
    with pytest.raises(ValueError, match="no producer"):
        topological_sort(shuffled)


def test_same_computation_sees_past_names_and_order_not_past_a_changed_constant(tiny_onnx):
    from passes.graph import copy_model, same_computation, topological_sort

    renamed = copy_model(tiny_onnx)
    nodes = list(renamed.graph.node)
    mapping = {out: f"t{i}.{j}" for i, node in enumerate(nodes) for j, out in enumerate(node.output)}
    mapping.update({out.name: out.name for out in renamed.graph.output})  # outputs keep their names
    for index, node in enumerate(nodes):
        node.name = f"n{index}"
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping[name] for name in node.output]
    del renamed.graph.node[:]
    renamed.graph.node.extend(nodes[::-1])
    assert topological_sort(renamed) > 0  # another valid order than the original's
    assert same_computation(tiny_onnx, renamed)

    changed = copy_model(tiny_onnx)
    weight = max(changed.graph.initializer, key=lambda init: len(init.raw_data))
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 1e-3
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    assert not same_computation(tiny_onnx, changed)


def test_fidelity_probe_narrows_to_the_images_farthest_from_float(tiny_onnx, tiny_images):
    """A probe's subset holds the batches where a model's logits are farthest from float, fewest that
    hold the images asked for, and scores against their own float logits."""
    from passes.accuracy_budget import FidelityProbe
    from passes.metrics import SQNR_CEILING_DB
    from passes.runtime import batches

    probe = FidelityProbe(tiny_onnx, batches(tiny_images[:6], 1), 2)
    logits = probe.reference.copy()
    logits[4] += 5.0
    logits[1] += 2.0
    logits[2] += 0.5
    assert probe.farthest(logits, 2) == [1, 4] and probe.farthest(logits, 10) == list(range(6))
    narrow = probe.subset([1, 4])
    assert np.array_equal(narrow.reference, probe.reference[[1, 4]])
    assert narrow.score(logits[[1, 4]]).sqnr_db == pytest.approx(sqnr_db(probe.reference[[1, 4]], logits[[1, 4]]))
    assert narrow(tiny_onnx).sqnr_db == SQNR_CEILING_DB  # it runs those images only, against their float logits
    pairs = FidelityProbe(tiny_onnx, batches(tiny_images[:6], 2), 2)
    assert pairs.farthest(logits, 1) == [2]  # image 4 is in the third batch of two


def test_accuracy_budget_ranks_on_fewer_images_and_still_holds_on_all(tiny_onnx, tiny_images):
    """ranking_images: the layers are ranked on that many search images, and the budget is still
    measured (and met) on every one."""
    from passes.runtime import batches

    ctx = PassContext(calibration=[tiny_images[:4]], search=batches(tiny_images[4:], 1), batch_size=1)
    QuantizeInt8Pass(QuantizeInt8Config(min_sqnr_db=0.0)).run(tiny_onnx, ctx)
    all_int8 = ctx.notes["search_fidelity"]["sqnr_db"]
    config = QuantizeInt8Config(min_sqnr_db=all_int8 + 3, max_float_layers=9, ranking_images=3)
    QuantizeInt8Pass(config).run(tiny_onnx, ctx)
    notes = ctx.notes
    assert notes["ranking_images"] == 3 and len(notes["sensitivity"]) == 9
    assert notes["budget_met"] and notes["search_fidelity"]["sqnr_db"] >= all_int8 + 3
