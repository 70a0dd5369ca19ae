"""The hand-off an app takes as is: preprocess.json and labels.txt, the preprocessing baked into the
model, and every `.ort` file run by ONNX Runtime's JavaScript package (onnxruntime-web in Node.js)."""

import json

import numpy as np
import onnx
import pytest

from onnxvit.handoff import bake_preprocessing, class_names, crop_uint8, preprocess_document
from onnxvit.web_check import WebModel, not_checked, run_in_node
from passes.runtime import model_logits
from tests.conftest import write_config

WEB_MISSING = not_checked()


def test_preprocess_json_is_timms_own_transform(tiny_model):
    from onnxvit.data import timm_transform

    transform, data_config = timm_transform(tiny_model)
    doc = preprocess_document(transform, data_config, "input")
    # DeiT: bicubic to 248 on the shorter side, a 224 center crop, ImageNet mean and std, NCHW float
    assert doc["resize"] == {"size": 248, "interpolation": "bicubic", "antialias": True}
    assert doc["crop"] == {"size": [224, 224], "mode": "center"} and doc["input"]["shape"] == [1, 3, 224, 224]
    assert doc["mean"] == pytest.approx([0.485, 0.456, 0.406]) and doc["std"] == pytest.approx([0.229, 0.224, 0.225])
    json.dumps(doc)  # plain JSON


def test_labels_name_imagenet_classes_and_fall_back_honestly():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(1000)]
    names = class_names(synsets, 1000)
    assert names[0] == "n01440764 tench, Tinca tinca" and len(names) == 1000
    assert class_names(["cat", "dog"], 2) == ["cat", "dog"]
    assert class_names(["cat", "dog"], 3) == ["class 0", "class 1", "class 2"]
    assert class_names(list(reversed(synsets)), 1000)[0] == "n15075141"  # not ImageNet's order: the folders'


def test_the_baked_model_equals_timms_transform_and_the_model(tiny_model, tiny_onnx, image_folder):
    from PIL import Image

    from onnxvit.data import scan_image_folder, timm_transform

    transform, data_config = timm_transform(tiny_model)
    doc = preprocess_document(transform, data_config, tiny_onnx.graph.input[0].name)
    baked = bake_preprocessing(tiny_onnx, doc)
    onnx.checker.check_model(baked, full_check=True)
    folder = scan_image_folder(image_folder)
    crops, timm_inputs = [], []
    for relative in folder.files[:4]:
        with Image.open(folder.root / relative) as image:
            crops.append(crop_uint8(image.convert("RGB"), doc))
            timm_inputs.append(transform(image.convert("RGB")).numpy())
    ours = model_logits(baked, [np.stack(crops)])
    theirs = model_logits(tiny_onnx, [np.stack(timm_inputs)])
    assert np.stack(crops).dtype == np.uint8 and np.stack(crops).shape == (4, 224, 224, 3)
    assert np.abs(ours - theirs).max() < 1e-4 and (ours.argmax(1) == theirs.argmax(1)).all()
    # a swapped mean and std is not the same model
    wrong = bake_preprocessing(tiny_onnx, {**doc, "mean": doc["std"], "std": doc["mean"]})
    assert np.abs(model_logits(wrong, [np.stack(crops)]) - theirs).max() > 1e-2


@pytest.mark.skipif(WEB_MISSING is not None, reason=WEB_MISSING or "")
def test_onnxruntime_web_runs_the_models_and_the_check_can_fail(tiny_onnx, tiny_images, tmp_path):
    from onnxvit.config import MobileConfig
    from onnxvit.mobile import to_ort_format

    source, ort_path = tmp_path / "m.onnx", tmp_path / "m.ort"
    onnx.save(tiny_onnx, source)
    to_ort_format(source, ort_path, MobileConfig())
    images = tiny_images[:3]
    reference = model_logits(ort_path, [images[i : i + 1] for i in range(3)])
    wrong = reference[:, ::-1].copy()  # a Python run that disagrees: the check must say so
    results = run_in_node([WebModel("right", ort_path, images, reference), WebModel("wrong", ort_path, images, wrong)])
    assert results["right"]["loaded"] and results["right"]["top1_equal"] and results["right"]["images"] == 3
    assert results["right"]["max_abs_vs_python"] < 1e-4
    assert results["wrong"]["loaded"] and not results["wrong"]["top1_equal"]
    broken = tmp_path / "broken.ort"
    broken.write_bytes(b"not a model")
    assert run_in_node([WebModel("broken", broken, images, reference)])["broken"]["loaded"] is False


def test_compress_writes_the_handoff_and_checks_every_ort_file(tmp_path, image_folder):
    from onnxvit.compress import compress

    mobile = {"bake_preprocessing": True}
    bench = {"warmup": 1, "runs": 4, "rounds": 2, "torch": False, "profile": False}
    report = compress(write_config(tmp_path, image_folder, mobile=mobile, benchmark=bench), quiet=True)
    out = tmp_path / "out"
    assert report["handoff"] == {"preprocess": "preprocess.json", "labels": "labels.txt", "classes": 4}
    assert json.loads((out / "preprocess.json").read_text())["crop"]["size"] == [224, 224]
    assert (out / "labels.txt").read_text().splitlines() == ["class0", "class1", "class2", "class3"]
    artifacts = {a["variant"]: a for a in report["mobile"]["artifacts"]}
    assert {"fp32", "int8", "fp32-rgb8", "int8-rgb8"} <= set(artifacts)
    for name in ("fp32-rgb8", "int8-rgb8"):
        assert artifacts[name]["baked_preprocessing"] and artifacts[name]["vs_timm"]["argmax_equal"]
        assert onnx.load(out / f"model.{name}.onnx").graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    if WEB_MISSING is not None:
        assert report["mobile"]["web"] == WEB_MISSING
        pytest.skip(WEB_MISSING)
    for name, artifact in artifacts.items():
        assert artifact["web"]["loaded"] and artifact["web"]["top1_equal"], (name, artifact["web"])
    assert "onnxruntime-web: same top-1" in (out / "report.md").read_text()


def test_without_node_the_report_says_not_checked(monkeypatch):
    import onnxvit.web_check as web_check

    monkeypatch.setattr(web_check.shutil, "which", lambda name: None)
    assert web_check.not_checked() == "not checked: no Node.js"


def test_a_web_mismatch_is_flagged_in_the_report():
    from onnxvit.report import _mobile_section

    def artifact(equal: bool) -> dict:
        web = {"loaded": True, "top1_equal": equal, "top1_differ": 0 if equal else 2, "images": 8}
        return {"variant": "int8", "path": "model.int8.ort", "size_bytes": 1, "max_abs_vs_onnx": 0.0,
                "argmax_equal": True, "ok": True, "web": {**web, "max_abs_vs_python": 0.1}}  # fmt: skip

    def section(equal: bool) -> str:
        mobile = {"target_platform": "arm", "optimization": "all", "artifacts": [artifact(equal)], "web": {}}
        return "\n".join(_mobile_section({"mobile": mobile}))

    assert "| True (8/8) |" in section(True) and "**False** (6/8)" in section(False)
