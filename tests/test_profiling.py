"""The per-op profile and the int8 limit: ONNX Runtime's profiler on real models, the limit from given figures."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from passes.base import PassContext
from passes.int8_limit import LinearShape, gemm_speedup, int8_bound, linear_shapes
from passes.module_names import module_path, node_modules, parameter_module
from passes.profiling import CATEGORIES, category, less_profiler_cost, parse_profile, profile_model, profile_models
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass


@pytest.fixture(scope="module")
def tiny_int8(tiny_onnx, tiny_images):
    return QuantizeInt8Pass(QuantizeInt8Config()).run(tiny_onnx, PassContext(calibration=[tiny_images[:4]]))


def test_module_paths_come_from_exporter_names_and_parameters():
    assert module_path("/blocks/blocks.3/mlp/fc1/Add_output_0") == "blocks.3.mlp.fc1"
    assert module_path("/blocks/blocks.0/attn/Softmax") == "blocks.0.attn"
    assert module_path("/stages/stages.2/blocks/stages.2.blocks.1/Mul_output_0") == "stages.2.blocks.1"
    assert module_path("/Add_output_0") is None and module_path("Gemm_4/matmul") is None
    assert parameter_module("blocks.0.attn.qkv.bias") == "blocks.0.attn.qkv"
    assert parameter_module("FusedBack_head.weight") == "head" and parameter_module("onnx::MatMul_12") is None
    assert category("DynamicQuantizeMatMul") == "int8 GEMM" and category("MatMul") == "float GEMM"
    assert category("Add") == "elementwise" and category("FastGelu") == "activation"


def test_every_node_of_a_real_model_is_attributed(tiny_onnx, tiny_int8):
    """Profiled on the tiny DeiT, float and int8: every node ONNX Runtime ran has a category and a
    time, their sum is the run's, and the linear layers are named by module path."""
    for model, gemm in ((tiny_onnx, "float GEMM"), (tiny_int8, "int8 GEMM")):
        profile = profile_model(model, (3, 224, 224), 1, 1, warmup=2, runs=5)
        assert profile.runs == 5 and len(profile.nodes) > 20
        assert all(n.category in CATEGORIES and n.ms >= 0 for n in profile.nodes)
        assert sum(profile.by_category().values()) == pytest.approx(profile.total_ms, rel=1e-3)
        # kernel times sit inside the run: never more than it, and most of it
        assert 0.5 * profile.run_ms < profile.total_ms <= 1.05 * profile.run_ms
        linear = [n for n in profile.nodes if n.linear]
        # GEMMs with a constant weight, and a float layer's bias where it is an Add of its own
        assert linear and {n.category for n in linear if n.op_type != "Add"} == {gemm}
        # named by module path, not by ONNX node name, and every block's layers found
        assert all(n.module.startswith(("blocks.0.", "blocks.1.", "head")) for n in linear), linear
        assert {n.module for n in linear} >= {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head"}
        assert 0 < profile.linear_ms < profile.total_ms
        assert profile.to_json()["slowest"][0]["ms"] == pytest.approx(max(n.ms for n in profile.nodes), abs=1e-4)


def test_a_linear_layer_is_its_gemm_and_its_bias_add():
    from onnx import helper

    from passes.profiling import linear_layer_nodes

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], "mm"),
            helper.make_node("Add", ["b", "y"], ["z"], "bias"),
            helper.make_node("Add", ["z", "x"], ["r"], "residual"),  # no constant: not a bias
            helper.make_node("MatMul", ["r", "r"], ["s"], "scores"),  # no constant weight: not a layer
            helper.make_node("Add", ["s", "b"], ["t"], "mask"),
        ],
        "g",
        [],
        [],
    )
    assert linear_layer_nodes(graph, {"w", "b"}) == {"mm", "bias"}


def test_a_node_time_is_its_median_run_less_the_profiler_cost():
    """Synthetic trace of 1 warm-up and 3 counted runs of two nodes: the first counted run is slow
    (the first call after another model's round); each node's time is its median over the counted
    runs, less the given per-node cost, and never below zero."""
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm"), helper.make_node("Relu", ["y"], ["z"], "relu")],
        "g",
        [],
        [],
    )
    events = []
    for run, (mm, relu) in enumerate([(9.0, 9.0), (8.0, 0.003), (2.0, 0.004), (3.0, 0.5)]):
        ts = run * 100_000
        events.append({"cat": "Session", "name": "model_run", "ts": ts, "dur": int((mm + relu) * 1e3) + 10})
        events.append({"cat": "Node", "name": "mm_kernel_time", "ts": ts + 1, "dur": mm * 1e3, "args": {}})
        events.append({"cat": "Node", "name": "relu_kernel_time", "ts": ts + 2, "dur": relu * 1e3, "args": {}})
    profile = parse_profile(events, graph, skip_runs=1, node_cost_ms=0.005)
    times = {n.node: n.ms for n in profile.nodes}
    assert times["mm"] == pytest.approx(3.0 - 0.005) and times["relu"] == 0.0
    assert profile.runs == 3 and profile.to_json()["profiler_cost_per_node_ms"] == 0.005


def test_interleaved_profiles_take_off_the_profilers_own_cost(tiny_onnx, tiny_int8):
    profiles = profile_models({"fp32": tiny_onnx, "int8": tiny_int8}, (3, 224, 224), 1, 1, 2, 10, rounds=2)
    assert set(profiles) == {"fp32", "int8"}
    for profile in profiles.values():
        # microseconds per node, not a kernel's time; zero when the nodes' sum does not exceed an unprofiled run
        assert profile.runs == 10 and 0 <= profile.node_cost_ms < 0.2
        assert 0.5 * profile.run_ms < profile.total_ms < profile.run_ms  # the profiler's cost is out of the nodes


def test_a_given_unprofiled_time_sets_the_profilers_cost(tiny_onnx):
    """The benchmark stage timed the model already: the nodes are brought down to that time, not
    below. (One raw profile, brought down to two times: two profiles of a model this small differ by
    more than the test could tell apart.)"""
    raw = profile_models({"m": tiny_onnx}, (3, 224, 224), 1, 1, 1, 4, rounds=1, raw=True)["m"]
    assert raw.node_cost_ms == 0.0 and raw.total_ms > 0
    assert less_profiler_cost(raw, raw.total_ms * 2).total_ms == raw.total_ms  # under the time: nothing off
    target = raw.total_ms / 2
    halved = less_profiler_cost(raw, target)
    # what the nodes sum to above the given time is taken off each of them alike, none below zero
    assert halved.node_cost_ms * len(halved.nodes) == pytest.approx(raw.total_ms - target)
    assert target <= halved.total_ms < raw.total_ms
    expected = {n.node: max(n.ms - halved.node_cost_ms, 0.0) for n in raw.nodes}
    assert {n.node: n.ms for n in halved.nodes} == pytest.approx(expected)
    # given a time, profile_models takes the cost off as the stage does
    given = profile_models({"m": tiny_onnx}, (3, 224, 224), 1, 1, 1, 4, rounds=1, unprofiled_ms={"m": 1e6})["m"]
    assert given.node_cost_ms == 0.0


def test_node_modules_name_fused_nodes_from_what_follows(tiny_int8):
    modules = node_modules(tiny_int8.graph)
    quantized = [n.name for n in tiny_int8.graph.node if n.op_type == "MatMulInteger"]
    assert quantized and all(modules[name].startswith(("blocks.", "head")) for name in quantized)


def test_the_int8_limit_follows_from_given_figures():
    # linear layers 60 of 100 ms, int8 GEMM 2x: 40 + 30 = 70 ms at best
    assert int8_bound(100.0, 60.0, 2.0) == pytest.approx(100 / 70)
    assert int8_bound(100.0, 60.0, 1.0) == pytest.approx(1.0)  # no faster kernel, no gain
    assert int8_bound(100.0, 0.0, 4.0) == pytest.approx(1.0)  # nothing to quantize
    assert int8_bound(100.0, 100.0, 3.0) == pytest.approx(3.0)


def test_the_gemm_ratio_is_measured_at_the_model_shapes(tiny_onnx):
    shapes = linear_shapes(tiny_onnx, (3, 224, 224), 1)
    dims = {(s.k, s.n) for s in shapes}
    assert len(shapes) == sum(
        1
        for n in tiny_onnx.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in {i.name for i in tiny_onnx.graph.initializer}
    )
    # 197 tokens through every block's layers, the class token alone through the head
    assert all(s.rows[-1] == 197 for s in shapes[:-1]) and shapes[-1].rows[-1] == 1 and shapes[-1].n == 4
    measured = gemm_speedup([LinearShape((197,), 64, 64)] * 3 + [LinearShape((197,), 64, 256)], 1, True, 2, 6, 2)
    assert [row["count"] for row in measured["shapes"]] == [3, 1] and measured["int8_gemm_speedup"] > 0
    assert dims


def test_kernels_are_timed_as_several_layers_in_one_call():
    # in one call the pool spins from layer to layer, as in a model; every copy has its own weight
    from passes.int8_limit import GEMM_COPIES, _dynamic_int8, _gemm_model

    shape = LinearShape((197,), 64, 32)
    float_model = _gemm_model(shape, 0)
    int8_model = _dynamic_int8(onnx.TensorProto.INT8, True)(float_model)
    weights = [numpy_helper.to_array(w) for w in float_model.graph.initializer]
    assert GEMM_COPIES > 1 and len(weights) == GEMM_COPIES and not np.array_equal(weights[0], weights[1])
    assert [n.op_type for n in float_model.graph.node] == ["MatMul"] * GEMM_COPIES
    assert sum(n.op_type == "MatMulInteger" for n in int8_model.graph.node) == GEMM_COPIES


def test_a_cpu_without_int8_gain_is_told_so():
    from onnxvit.report import _profile_section

    def report(bound: float, efficiency: float = 0.93) -> dict:
        profile = {
            "runs": 1,
            "run_ms": 10.0,
            "total_ms": 10.0,
            "linear_ms": 5.0,
            "categories_ms": {"float GEMM": 5.0},
            "slowest": [],
        }
        return {
            "machine": {"int8_isa": ["avx2"], "int8_gemm_speedup": 1.02, "int8_bound_speedup": bound},
            "profile": {"reference": "fp32", "profiles": {"fp32": profile, "int8": profile}},
            "variants": [
                {"name": "fp32", "latency_ms": {"median": 10.0}},
                {
                    "name": "int8",
                    "latency_ms": {"median": 10.5},
                    "int8_float_input": "fp32",
                    "int8_bound_speedup": bound,
                    "int8_efficiency": efficiency,
                },
            ],
        }

    slow = "\n".join(_profile_section(report(1.01)))
    assert "size lever" in slow and "fastest model measured is `fp32`." in slow
    fast = "\n".join(_profile_section(report(1.4)))
    assert "size lever" not in fast and "`int8` reached 93%" in fast and "went past" not in fast
    past = "\n".join(_profile_section(report(1.4, efficiency=1.1)))
    assert "`int8` reached 110%" in past and "It went past that bound" in past
    # an unreported float input that is faster than every variant is the one recommended, with how to get it
    hidden = report(1.01)
    hidden["profile"]["profiles"]["fused"] = hidden["profile"]["profiles"]["fp32"]
    hidden["profile"]["latency_ms"] = {"fused": 9.0}
    text = "\n".join(_profile_section(hidden))
    assert "fastest model measured is `fused`, a step the config does not report (set `report: true`" in text


def test_compress_reports_the_profile_and_the_limit(tmp_path, image_folder):
    import json

    from onnxvit.compress import compress
    from tests.conftest import write_config

    passes = [
        {"pass": "fuse_vit", "name": "fused", "input": "fp32", "report": False},
        {"pass": "quantize_int8", "name": "int8"},
        {"pass": "fp16", "name": "fp16", "input": "fp32"},
        {"pass": "ort_dynamic", "name": "ort-dynamic", "input": "fp32"},
    ]
    bench = {"warmup": 1, "runs": 4, "rounds": 2, "torch": False}
    config = write_config(tmp_path, image_folder, passes=passes, benchmark=bench)
    report = compress(config, quiet=True)
    assert report["machine"]["int8_gemm_speedup"] > 0 and "int8_isa" in report["machine"]
    # the unreported float input of int8 is profiled and timed beside the variants, and has no file
    assert set(report["profile"]["profiles"]) == {"fp32", "fused", "int8", "fp16", "ort-dynamic"}
    assert set(report["profile"]["latency_ms"]) == set(report["profile"]["profiles"])
    variants = {v["name"]: v for v in report["variants"]}
    assert "fused" not in variants and not (tmp_path / "out" / "model.fused.onnx").exists()
    assert "int8_efficiency" in variants["int8"] and "int8_efficiency" not in variants["fp16"]
    # each int8 variant against the float model its steps started from, not the unfused export
    assert variants["int8"]["int8_float_input"] == "fused" and variants["ort-dynamic"]["int8_float_input"] == "fp32"
    assert variants["ort-dynamic"]["int8_bound_speedup"] == report["machine"]["int8_bound_speedup"]
    latency = report["profile"]["latency_ms"]
    int8 = variants["int8"]
    assert int8["int8_speedup_vs_float_input"] == pytest.approx(latency["fused"] / latency["int8"], rel=1e-3)
    assert int8["int8_efficiency"] == pytest.approx(
        int8["int8_speedup_vs_float_input"] / int8["int8_bound_speedup"], rel=1e-3
    )
    out = tmp_path / "out"
    text = (out / "report.md").read_text()
    assert (out / "profile.png").stat().st_size > 0 and "## Where the time goes" in text
    assert "its float input `fused`" in text and "fused (an int8 step's float input, not reported)" in text
    assert json.loads((out / "report.json").read_text())["profile"] == report["profile"]


def test_a_run_that_changes_one_variant_profiles_only_that_one(tmp_path, image_folder, monkeypatch):
    """Raw profiles are kept by model: a new int8 model is profiled, the unchanged models' profiles
    are reused (their profiler's cost taken off against this run's timing)."""
    from onnxvit.compress import compress
    from onnxvit.stages import profile as stage
    from tests.conftest import write_config

    profiled: list[set[str]] = []
    original = stage.profile_models

    def counted(models, *args, **kwargs):
        profiled.append(set(models))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(stage, "profile_models", counted)
    bench = {"warmup": 1, "runs": 4, "rounds": 2, "torch": False}

    def run(int8_options):
        passes = [{"pass": "quantize_int8", "name": "int8", "options": int8_options}, {"pass": "fp16", "name": "fp16"}]
        for step in passes:
            step["input"] = "fp32"
        return compress(write_config(tmp_path, image_folder, passes=passes, benchmark=bench), quiet=True)

    first = run({})
    second = run({"per_channel": False})  # another int8 model; fp32 and fp16 are the same
    assert profiled == [{"fp32", "int8", "fp16"}, {"int8"}]
    assert set(second["profile"]["profiles"]) == {"fp32", "int8", "fp16"}
    assert second["profile"]["profiles"]["int8"] != first["profile"]["profiles"]["int8"]
    for name in ("fp32", "fp16"):  # the same nodes, as first profiled
        nodes = [n["node"] for n in second["profile"]["profiles"][name]["slowest"]]
        assert nodes == [n["node"] for n in first["profile"]["profiles"][name]["slowest"]]


def test_quantize_int8_names_its_layers_by_module(tiny_onnx, tiny_images):
    ctx = PassContext(calibration=[tiny_images[:4]])
    QuantizeInt8Pass(QuantizeInt8Config()).run(tiny_onnx, ctx)
    modules = ctx.notes["modules"]
    assert len(modules) == 9 and set(modules.values()) >= {"blocks.0.mlp.fc1", "blocks.1.mlp.fc2", "head"}
    step = {"name": "int8", "notes": {**ctx.notes, "kept_float": list(modules)[:1]}}
    assert f"{modules[list(modules)[0]]} (`{list(modules)[0]}`)" in "\n".join(QuantizeInt8Pass.report_section(step))
