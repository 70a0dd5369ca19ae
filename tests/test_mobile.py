"""The mobile hand-off: .ort files and their operator config, .ptl files, and parity between the two runtimes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxvit.cli import main
from onnxvit.config import LiteConfig, MobileConfig
from onnxvit.lite import build_lite_variants, load_lite, parity_table, quantized_engine, save_lite, static_int8
from onnxvit.mobile import OPERATORS_CONFIG, build_artifacts
from passes.runtime import model_logits
from tests.conftest import minimal_report, write_config


def test_ort_format_round_trip_and_operator_config(tiny_onnx, tiny_images, tmp_path):
    source = tmp_path / "model.fp32.onnx"
    onnx.save(tiny_onnx, source)
    result = build_artifacts({"fp32": source}, tmp_path, MobileConfig(), [tiny_images[:4]], 2)
    (entry,) = result["artifacts"]
    assert entry["ok"] and entry["max_abs_vs_onnx"] < 1e-5 and entry["argmax_equal"]
    assert (tmp_path / "model.fp32.ort").read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier
    text = (tmp_path / OPERATORS_CONFIG).read_text()
    assert "MatMul" in text and result["operators"] and all(line in text for line in result["operators"])


def test_ort_twins_are_judged_by_what_the_model_computes_not_its_name(tiny_onnx, tiny_images, tmp_path):
    from passes import get_pass
    from passes.base import PassContext

    quantize, half = get_pass("quantize_int8"), get_pass("fp16")
    int8 = quantize(quantize.Config()).run(tiny_onnx, PassContext(calibration=[tiny_images[:2]]))
    fp16 = half(half.Config()).run(tiny_onnx, PassContext())
    paths = {"plain": tmp_path / "plain.onnx", "q8": tmp_path / "q8.onnx", "h": tmp_path / "h.onnx"}  # say nothing
    for name, model in (("plain", tiny_onnx), ("q8", int8), ("h", fp16)):
        onnx.save(model, paths[name])
    # a tolerance no float16 twin meets: the half-precision model is held to its top-1 instead
    result = build_artifacts(paths, tmp_path, MobileConfig(fp32_atol=1e-12, fp32_rtol=0), [tiny_images[:2]], 2)
    kinds = {a["variant"]: (a["quantized"], a["float16"]) for a in result["artifacts"]}
    assert kinds == {"plain": (False, False), "q8": (True, False), "h": (False, True)}
    ok = {a["variant"]: a["ok"] for a in result["artifacts"]}
    assert ok["q8"] and ok["h"] and ok["plain"] == (result["artifacts"][0]["max_abs_vs_onnx"] <= 1e-12)


def test_a_float32_twin_may_differ_by_rounding_that_grows_with_the_logits():
    from onnxvit.mobile import within_float_rounding

    config = MobileConfig(fp32_atol=1e-5, fp32_rtol=1e-5)
    assert within_float_rounding({"max_abs_vs_onnx": 1.2e-5, "largest_logit": 20.0}, config)  # 2.1e-4 allowed
    assert not within_float_rounding({"max_abs_vs_onnx": 1.2e-5, "largest_logit": 0.1}, config)  # 1.1e-5
    assert not within_float_rounding({"max_abs_vs_onnx": 1e-3, "largest_logit": 20.0}, config)


def test_a_model_that_cannot_convert_is_one_line_and_the_rest_goes_on(tiny_onnx, tiny_images, tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(tiny_onnx, good)
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    bad = tmp_path / "bad.onnx"
    onnx.save(
        helper.make_model(
            graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
        ),
        bad,
    )
    messages = []
    result = build_artifacts(
        {"bad": bad, "good": good}, tmp_path, MobileConfig(), [tiny_images[:2]], 2, messages.append
    )
    bad_entry, good_entry = result["artifacts"]
    assert bad_entry["path"] is None and "NoSuchOp" in bad_entry["error"] and "\n" not in bad_entry["error"]
    assert len(messages) == 1 and good_entry["ok"] and result["operators_config"] == OPERATORS_CONFIG


def test_lite_round_trip(tiny_model, tiny_images, tmp_path):
    x = torch.from_numpy(tiny_images[:4])
    notes = save_lite(tiny_model, x[:1], tmp_path / "m.ptl")
    assert notes["size_bytes"] == (tmp_path / "m.ptl").stat().st_size
    # mobile optimization ran exactly when this torch build has XNNPACK, and the notes say which
    assert (notes["optimize_for_mobile"] is True) == bool(torch.backends.xnnpack.enabled)
    lite = load_lite(tmp_path / "m.ptl")
    with torch.no_grad():
        assert torch.allclose(lite(x), tiny_model(x), atol=1e-5)  # traced at batch 1, run at batch 4


def test_parity_flags_a_corrupted_weight(tiny_model, tiny_onnx, tiny_images, tmp_path):
    variants, _ = build_lite_variants(
        tiny_model, LiteConfig(int8_engines=[]), torch.from_numpy(tiny_images[:1]), tmp_path
    )
    with torch.no_grad():
        lite_logits = variants["lite-fp32"](torch.from_numpy(tiny_images)).numpy()
    corrupted = onnx.ModelProto()
    corrupted.CopyFrom(tiny_onnx)
    weight = max(corrupted.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0  # one weight off by 1
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    logits = {
        "lite-fp32": lite_logits,
        "fp32": model_logits(tiny_onnx, [tiny_images]),
        "broken": model_logits(corrupted, [tiny_images]),
    }
    rows = parity_table(logits, [("fp32", "lite-fp32", "fp32"), ("broken", "lite-fp32", "fp32")], LiteConfig())
    assert rows[0]["ok"] and rows[0]["max_abs"] <= 1e-4
    assert not rows[1]["ok"] and rows[1]["max_abs"] > 1e-4


def test_compress_with_mobile_and_lite(tmp_path, image_folder):
    config = write_config(
        tmp_path,
        image_folder,
        passes=[{"pass": "quantize_int8", "name": "int8"}],
        mobile={"variants": ["int8"]},
        lite={"int8_engines": ["x86"]},
        benchmark={"warmup": 1, "runs": 2, "rounds": 1, "torch": False},
    )
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert [a["variant"] for a in report["mobile"]["artifacts"]] == ["int8"] and (out / "model.int8.ort").is_file()
    variants = {v["name"]: v for v in report["variants"]}
    assert variants["lite-int8-x86"]["runtime"] == "torch-lite" and variants["lite-fp32"]["latency_ms"]["median"] > 0
    assert [(p["onnx"], p["torch"]) for p in report["parity"]] == [("fp32", "lite-fp32"), ("int8", "lite-int8-x86")]
    fp32_pair, int8_pair = report["parity"]
    assert fp32_pair["ok"] and fp32_pair["max_abs"] <= 1e-4
    # two different quantizers: close (a real comparison of the two models' logits), never identical
    assert int8_pair["sqnr_db"] > 10 and int8_pair["max_abs"] > 0
    assert "## Parity" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"mobile": {"variants": ["int9"]}}, "mobile.variants: 'int9' is not a reported ONNX variant"),
        ({"lite": {"int8_engines": ["arm64"]}}, "lite.int8_engines: 'arm64' is not a quantized engine"),
    ],
)
def test_bad_mobile_sections(section, message, tmp_path, image_folder):
    result = CliRunner().invoke(main, ["compress", str(write_config(tmp_path, image_folder, **section)), "--quiet"])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_each_int8_engine_runs_its_own_kernels(tiny_model, tiny_images, tmp_path):
    """The engine is process-wide and int8 weights are re-packed when a .ptl loads: each variant must
    load and run under its own engine (qnnpack ignores reduce_range, so its numbers differ)."""
    variants, _ = build_lite_variants(
        tiny_model, LiteConfig(fp32=False, int8_engines=["x86", "qnnpack"]), torch.from_numpy(tiny_images[:1]), tmp_path
    )
    x = torch.from_numpy(tiny_images[:4])
    with torch.no_grad():
        x86, qnnpack = variants["lite-int8-x86"](x), variants["lite-int8-qnnpack"](x)
        reference = tiny_model(x)
    assert not torch.equal(x86, qnnpack)
    for out in (x86, qnnpack):
        assert torch.nn.functional.cosine_similarity(out, reference).min() > 0.99


# PyTorch's own notice when the converted model runs here: FX quantizes timm's class token and the
# patch embeddings with their own parameters before their cat. It is the baseline PyTorch gives.
@pytest.mark.filterwarnings("ignore:All inputs of this cat operator must share")
def test_static_int8_lite_variant(tiny_model, tiny_images, tmp_path):
    """FX static int8 really quantizes the linear layers, and the .ptl runs it exactly as eager PyTorch does.

    (Its fidelity to FP32 is not tested here: static int8 of every op on random weights is poor,
    for PyTorch as for ONNX Runtime's static recipe; the real DeiT-tiny bench measures it.)"""
    calibration = torch.from_numpy(tiny_images[:8])
    quantized = static_int8(tiny_model, "x86", calibration)
    assert any(isinstance(m, torch.ao.nn.quantized.Linear) for m in quantized.modules())
    variants, _ = build_lite_variants(
        tiny_model, LiteConfig(fp32=False, int8_engines=[], static_engines=["x86"]), calibration, tmp_path
    )
    x = torch.from_numpy(tiny_images[8:12])
    with torch.no_grad(), quantized_engine("x86"):
        assert torch.allclose(variants["lite-int8-static-x86"](x), quantized(x), atol=1e-5)


def test_a_model_that_cannot_be_traced_is_one_line_and_the_rest_goes_on(tiny_images, tmp_path):
    class DictOutput(torch.nn.Module):  # the tracer refuses dict outputs in strict mode
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(224, 4)

        def forward(self, x):
            return {"logits": self.linear(x).mean((1, 2))}

    messages = []
    variants, errors = build_lite_variants(
        DictOutput().eval(),
        LiteConfig(int8_engines=["x86"]),
        torch.from_numpy(tiny_images[:2]),
        tmp_path,
        messages.append,
    )
    assert set(errors) == {"lite-fp32", "lite-int8-x86"} and not variants
    assert all("\n" not in e and e.startswith("cannot build a Lite model") for e in errors.values())
    assert len(messages) == 2


def test_report_shows_a_lite_model_that_could_not_be_built():
    from onnxvit.report import render_markdown

    report = minimal_report(lite={"lite-fp32": {"error": "cannot build a Lite model: RuntimeError: dict output"}})
    assert "`lite-fp32`: cannot build a Lite model: RuntimeError: dict output" in render_markdown(report)
