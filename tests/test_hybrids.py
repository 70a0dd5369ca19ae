"""Hybrid CNN + attention models through the pipeline, and BatchNorm re-estimation for random weights."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from onnxvit.cli import main
from onnxvit.config import load_config
from onnxvit.models import recalibrate_batchnorm
from tests.conftest import REPO, write_config

EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO / "examples")))
def test_every_example_config_is_valid(path):
    config, _ = load_config(path)
    if not config.data.root.is_dir():
        pytest.skip(f"{config.data.root} is absent (../shared beside the checkout)")
    # relative paths are read against the example's folder: they name the shared data and the weights
    assert (config.data.root / "n01440764").is_dir() or any(config.data.root.iterdir())
    assert config.model.checkpoint is None or config.model.checkpoint.is_file()
    assert config.data.manifest is None or config.data.manifest.is_file()


def test_recalibrated_batchnorm_holds_the_statistics_of_its_input(tiny_images):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("repvit_m0_9", num_classes=4).eval()
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    count = recalibrate_batchnorm(model, tiny_images[:8], batch_size=4)
    handle.remove()
    inputs = torch.cat(seen)
    assert count > 10 and not norm.training and norm.momentum == 0.1
    assert torch.allclose(norm.running_mean, inputs.mean((0, 2, 3)), atol=1e-4)
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


@pytest.mark.parametrize("name", ["mobilevit_xxs", "levit_128s", "efficientformerv2_s0"])
def test_hybrid_compresses_end_to_end(name, tmp_path, image_folder):
    model = {"name": name, "random_init": True, "recalibrate_bn": True, "num_classes": 4}
    steps = [
        {"pass": "fold_batchnorm", "name": "folded", "input": "fp32", "report": False},
        {"pass": "quantize_int8", "name": "int8", "input": "folded"},
        {"pass": "ort_default", "name": "ort-default", "input": "fp32"},
    ]
    if name == "mobilevit_xxs":  # three MobileViT blocks: conv -> tokens -> conv, six bridges
        steps.append(
            {
                "pass": "quantize_int8",
                "name": "int8-bridges",
                "input": "folded",
                "report": False,
                "options": {"bridges": "float"},
            }
        )
        steps.append(
            {
                "pass": "quantize_int8",
                "name": "int8-tuned",
                "input": "folded",
                "report": False,
                "options": {"schemes": "search", "reconstruct_bridges": True, "calibration_images": 4},
            }
        )
    config = write_config(
        tmp_path,
        image_folder,
        model=model,
        passes=steps,
        benchmark={"warmup": 1, "runs": 2, "rounds": 1, "torch": False},
    )
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    export = next(s for s in report["steps"] if s["name"] == "fp32")
    assert export["check"]["max_abs_vs_torch"] <= 1e-4
    variants = {v["name"]: v for v in report["variants"]}
    assert set(variants) == {"fp32", "int8", "ort-default"}
    steps_by_name = {s["name"]: s for s in report["steps"]}
    if name == "mobilevit_xxs":
        bridges = steps_by_name["int8"]["notes"]["bridges"]
        assert len(bridges) == 6 and {b["kind"] for b in bridges} == {"to_tokens", "to_feature_map"}
        assert all("conv_1x1" in b["conv"] for b in bridges if b["kind"] == "to_tokens")
        kept = steps_by_name["int8-bridges"]["notes"]
        assert kept["bridges_float"] and kept["quantized_nodes"] == (
            steps_by_name["int8"]["notes"]["quantized_nodes"] - len(kept["bridges_float"])
        )
        tuned = steps_by_name["int8-tuned"]["notes"]
        assert len(tuned["schemes"]) == tuned["quantized_nodes"]
        assert set(tuned["bridge_reconstruction"]) == {b["linear"] for b in bridges}  # the conv stays float
        assert "## Weight schemes: `int8-tuned`" in (tmp_path / "out" / "report.md").read_text()
    if name == "efficientformerv2_s0":  # attention on 4-D maps: no token sequence, no bridge
        assert "bridges" not in steps_by_name["int8"]["notes"]
    assert variants["int8"]["sqnr_db"] > 15
    # why int8 is not faster on conv-heavy hybrids: the report says which heavy ops stay float
    census = variants["int8"]["compute_ops"]
    assert census["float"].get("Conv", 0) > 0 and "Conv" not in census["integer"]
    assert sum(census["integer"].values()) > 0 and variants["fp32"]["compute_ops"]["integer"] == {}
    assert "## Precision of the heavy ops" in (tmp_path / "out" / "report.md").read_text()
    folded = next(s for s in report["steps"] if s["name"] == "folded")
    assert folded["check"]["sqnr_db"] > 80  # exact up to float rounding
    if name == "levit_128s":  # its LinearNorm: MatMul -> Flatten -> BatchNorm, 46 times
        assert len(folded["notes"]["folded"]) == 46
        assert list(folded["notes"]["kept"].values()) == ["follows ReduceMean, not a linear layer"]
    if name == "efficientformerv2_s0":  # ONNX Runtime's symbolic shape inference gives up on it
        ort_default = next(s for s in report["steps"] if s["name"] == "ort-default")
        assert "symbolic shape inference failed" in ort_default["notes"]["preprocess"]


def test_ort_quantizers_leave_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """ONNX Runtime's failed symbolic shape inference writes temp files to the working directory."""
    import numpy as np
    import timm

    from onnxvit.config import ExportConfig
    from onnxvit.export import export_onnx
    from passes import get_pass
    from passes.base import PassContext

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    model = timm.create_model("efficientformerv2_s0", num_classes=4).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ctx = PassContext(calibration=[x])
    get_pass("ort_default")(get_pass("ort_default").Config()).run(export_onnx(model, x, ExportConfig()), ctx)
    assert "symbolic shape inference failed" in ctx.notes["preprocess"]
    assert list(work.iterdir()) == []
