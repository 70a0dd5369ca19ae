"""The mixed_precision pass on the depth-2 DeiT: blocks from the graph, constraints on every
candidate, a resumable search, and a front point rebuilt from report.json."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml

from onnxvit.engine import JsonMemo
from onnxvit.errors import UserError
from passes import PassError
from passes.base import PassContext
from passes.blocks import find_blocks
from passes.fuse_vit import FuseVitPass
from passes.metrics import SQNR_CEILING_DB, sqnr_db, top1_agreement
from passes.mixed_precision import MixedPrecisionConfig, MixedPrecisionPass
from passes.ort_quant import weighted_nodes
from passes.runtime import model_logits
from tests.conftest import write_config

# on a model this small nothing runs faster than float, so the latency limit is off
FAST = {"latency_runs": 5, "latency_warmup": 1, "max_latency_vs_float": None}


@pytest.fixture()
def search_ctx(tiny_images):
    return PassContext(search=[tiny_images[:6]], threads=2)


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_blocks_come_from_module_paths_even_after_fusion(tiny_onnx, tiny_images):
    fused = FuseVitPass().run(tiny_onnx, PassContext(calibration=[tiny_images[:4]]))
    for model in (tiny_onnx, fused):
        prepared, blocks = MixedPrecisionPass().prepare(model)
        assert list(blocks) == ["blocks.0", "blocks.1", "rest"]
        assert [len(v) for v in blocks.values()] == [4, 4, 1]  # qkv, proj, fc1, fc2; the head
    # groups smaller than min_block_layers join rest (EfficientViT-B0's classifier.0 / classifier.4)
    _, merged = MixedPrecisionPass(MixedPrecisionConfig(min_block_layers=5)).prepare(tiny_onnx)
    assert list(merged) == ["rest"] and len(merged["rest"]) == 9
    # fuse_vit names its nodes attention_N / Gemm_N: the block is read from the tensors around them
    assert any(
        name.startswith("attention_0")
        for name in find_blocks(
            fused, [n for n in weighted_nodes(fused, ["MatMul"]) if n.startswith("attention_")], min_layers=1
        )["blocks.0"]
    )


def test_build_puts_each_choice_where_the_assignment_says(tiny_onnx):
    mp = MixedPrecisionPass()
    built = mp.apply(tiny_onnx, {"blocks.0": "w4", "blocks.1": "float"})
    ops = _ops(built)
    assert ops.get("MatMulNBits") == 4  # blocks.0; the head follows `rest: int8`
    assert ops.get("MatMulInteger") == 1
    assert len(weighted_nodes(built, ["MatMul"])) == 4  # blocks.1 stays float
    with pytest.raises(ValueError, match="blocks.7"):
        mp.apply(tiny_onnx, {"blocks.7": "int8"})


def test_search_candidates_are_the_quantizers_models_written_directly(tiny_onnx, monkeypatch):
    """The search builds its int8 layers with ``DynamicInt8Builder``, without ONNX Runtime's
    quantizer: the same computation as the quantizer writes, beside w4 and float blocks, and with
    ``reduce_range`` as well."""
    from passes.graph import same_computation
    from passes.quantize_int8 import QuantizeInt8Pass

    quantizer_calls = []
    original = QuantizeInt8Pass.quantize_layers
    monkeypatch.setattr(QuantizeInt8Pass, "quantize_layers", lambda *args: quantizer_calls.append(1) or original(*args))
    for reduce_range in (False, True):
        mp = MixedPrecisionPass(MixedPrecisionConfig(reduce_range=reduce_range))
        prepared, blocks = mp.prepare(tiny_onnx)
        for assignment in ({"blocks.0": "int8", "blocks.1": "w4"}, {"blocks.0": "float", "blocks.1": "int8"}):
            direct = mp.build(prepared, blocks, assignment)
            assert not quantizer_calls
            quantizer = mp.build(prepared, blocks, assignment, direct=False)
            assert quantizer_calls and _ops(direct) == _ops(quantizer)
            assert same_computation(direct, quantizer), assignment
            quantizer_calls.clear()


def test_every_candidate_meets_the_constraints(tiny_onnx, search_ctx):
    config = MixedPrecisionConfig(max_size_vs_int8=1.0, **FAST)
    out = MixedPrecisionPass(config).run(tiny_onnx, search_ctx)
    notes = search_ctx.notes
    searched = [p for p in notes["points"] if not p["reference"]]
    assert searched, "the search measured no candidate"
    for p in searched:
        assert len(set(p["assignment"].values())) > 1  # PoMQ-ViT: not uniform
        # a float block is larger than int8: the size limit leaves only int8 and w4 mixes
        assert "F" not in p["code"]
        assert p["violates"] == []
        assert p["size_vs_int8"] <= 1.0
    assert {"uniform-float", "uniform-int8", "uniform-w4"} <= {p["name"] for p in notes["points"]}
    chosen = next(p for p in notes["points"] if p["name"] == notes["chosen"])
    assert chosen["violates"] == [] and chosen["on_front"]
    assert notes["search_model_equals_quantizer_output"] is True
    # the output is the chosen assignment
    again = MixedPrecisionPass(config).apply(tiny_onnx, chosen["assignment"])
    np.testing.assert_allclose(model_logits(out, search_ctx.search), model_logits(again, search_ctx.search), atol=1e-5)


def test_the_search_resumes_from_its_memo(tiny_onnx, tiny_images, tmp_path, monkeypatch):
    builds = []
    original = MixedPrecisionPass.build
    monkeypatch.setattr(
        MixedPrecisionPass, "build", lambda self, *args, **kwargs: builds.append(1) or original(self, *args, **kwargs)
    )
    config = MixedPrecisionConfig(**FAST)
    path = tmp_path / "step.memo.json"
    first = PassContext(search=[tiny_images[:6]], memo=JsonMemo(path))
    MixedPrecisionPass(config).run(tiny_onnx, first)
    first_builds = len(builds)
    builds.clear()
    second = PassContext(search=[tiny_images[:6]], memo=JsonMemo(path))  # read back from the file
    MixedPrecisionPass(config).run(tiny_onnx, second)
    # only the final timing (one build per point) and the output (the quantizer's, and the search's
    # builder's to compare) are rebuilt
    assert len(builds) == len(second.notes["points"]) + 2 < first_builds
    assert [p["sqnr_db"] for p in first.notes["points"]] == [p["sqnr_db"] for p in second.notes["points"]]
    assert first.notes["uniform_latency_ms"] == second.notes["uniform_latency_ms"]


def test_a_new_selection_rule_picks_from_the_measured_front(tiny_onnx, tiny_images, tmp_path, monkeypatch):
    """Only ``select`` changes: the step reruns without measuring or timing a model again, and its
    rule picks from the points the first run measured. (A run from scratch would time the
    candidates again, and with them its front.)"""
    from onnxvit.config import StepConfig
    from onnxvit.engine import Cache, StepRecord, run_passes
    from passes.graph import model_sha256

    builds = []
    original = MixedPrecisionPass.build
    monkeypatch.setattr(
        MixedPrecisionPass, "build", lambda self, *args, **kwargs: builds.append(1) or original(self, *args, **kwargs)
    )

    def run(folder, minimize):
        options = {**FAST, "select": {"min_agreement": None, "minimize": minimize}}
        steps = [StepConfig(**{"pass": "mixed_precision", "name": "mixed", "options": options})]
        start = StepRecord(name="fp32", kind="export", input=None, config={}, key="k", sha256=model_sha256(tiny_onnx))
        models, records = run_passes(
            tiny_onnx,
            start,
            steps,
            [MixedPrecisionConfig.model_validate(options)],
            Cache(folder, False),
            lambda: PassContext(search=[tiny_images[:6]], threads=2),
            {"calibrate": "c", "search": "s", "threads": 2},
            lambda a, b: {},
        )
        return records[1]

    by_latency = run(tmp_path, "latency")
    builds.clear()
    by_size = run(tmp_path, "size")
    # the chosen point, built (the quantizer's, and the builder's to compare); nothing measured
    assert not by_size.cached and len(builds) == 2
    assert by_size.notes["points"] == by_latency.notes["points"]
    allowed = [p for p in by_size.notes["points"] if p["on_front"] and not p["violates"]]
    smallest = min(allowed, key=lambda p: p["size_bytes"])
    assert by_size.notes["chosen"] == smallest["name"]


def test_a_front_point_round_trips_through_the_report(tmp_path, image_folder):
    from onnxvit.compress import compress
    from onnxvit.config import load_config
    from onnxvit.engine import Cache
    from onnxvit.progress import Reporter
    from onnxvit.stages.load import Run

    step = {"pass": "mixed_precision", "name": "mixed", "input": "fp32", "options": {**FAST, "candidates": 4}}
    path = write_config(tmp_path, image_folder, passes=[step])
    report = compress(path, quiet=True)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["variants"] == report["variants"]
    record = next(s for s in saved["steps"] if s["name"] == "mixed")
    assert (tmp_path / "out" / "pareto_mixed.png").stat().st_size > 0
    assert "## Mixed precision: `mixed`" in (tmp_path / "out" / "report.md").read_text()

    config, pass_configs = load_config(path)
    run = Run(config, pass_configs, Reporter(quiet=True), Cache(tmp_path / "scratch"))
    search = run.context().search  # what the pass measured: the search split at the deploy batch
    fp32 = onnx.load(tmp_path / "out" / "model.fp32.onnx")
    reference = model_logits(fp32, search)
    rebuilt_pass = MixedPrecisionPass(MixedPrecisionConfig.model_validate(record["config"]))
    for point in record["notes"]["points"]:
        logits = model_logits(rebuilt_pass.apply(fp32, point["assignment"]), search)
        assert top1_agreement(logits, reference) == pytest.approx(point["agreement"], abs=1e-3)
        assert min(sqnr_db(reference, logits), SQNR_CEILING_DB) == pytest.approx(point["sqnr_db"], abs=1e-2)


def test_bad_mixed_precision_options_are_one_line_errors(tmp_path, image_folder):
    for options, words in (
        ({"block_size": 48}, "power of two"),
        ({"choices": ["int8"]}, "choices"),
        ({"choices": ["int8", "int4"]}, "choices"),
        ({"objective": "top1"}, "real weights"),
    ):
        step = {"pass": "mixed_precision", "name": "mixed", "input": "fp32", "options": options}
        path = write_config(tmp_path, image_folder, passes=[step])
        from onnxvit.config import load_config

        with pytest.raises(UserError, match=words) as info:
            load_config(path)
        assert "\n" not in str(info.value)
        assert yaml.safe_load(path.read_text())  # the user's file is untouched


def test_memo_is_a_file_backed_dict(tmp_path):
    path = tmp_path / "m.json"
    memo = JsonMemo(path)
    memo["a"] = {"x": 1}
    assert json.loads(path.read_text()) == {"a": {"x": 1}}
    assert dict(JsonMemo(path)) == {"a": {"x": 1}}
    assert dict(JsonMemo(path, load=False)) == {}


def test_a16w8_blocks_are_qdq_with_int16_activations(tiny_onnx, tiny_images):
    mp = MixedPrecisionPass(MixedPrecisionConfig(choices=["int8", "a16w8"]))
    with pytest.raises(PassError, match="calibration"):
        mp.apply(tiny_onnx, {"blocks.0": "a16w8", "blocks.1": "int8"})
    built = mp.apply(tiny_onnx, {"blocks.0": "a16w8", "blocks.1": "int8"}, calibration=[tiny_images[:4]])
    quantizers = [n for n in built.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers, "no QDQ for the a16w8 block"
    initializers = {i.name: i for i in built.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in quantizers if len(n.input) > 2 and n.input[2] in initializers]
    assert zero_points and all(z.data_type == onnx.TensorProto.INT16 for z in zero_points)
    assert _ops(built).get("MatMulInteger") == 5  # blocks.1 and the head
    reference = model_logits(tiny_onnx, [tiny_images])
    assert sqnr_db(reference, model_logits(built, [tiny_images])) > 20
    # no int16 kernel here: the report's census counts those MatMuls as float
    from passes.graph import compute_op_census

    all_int8 = mp.apply(tiny_onnx, {"blocks.0": "int8", "blocks.1": "int8"})
    assert compute_op_census(built)["float"]["MatMul"] == compute_op_census(all_int8)["float"]["MatMul"] + 4
