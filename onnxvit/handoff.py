"""What an app needs beside the model: its preprocessing as data (``preprocess.json``), its class
names (``labels.txt``), and optionally the normalization baked into the model itself.

An app that resizes with another filter, forgets the mean and std, or feeds NHWC where the model
wants NCHW is silently a few points worse than the report; these files say exactly what the
evaluation did, from the timm data config of the model that was exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxvit.fileio import atomic_write_json, atomic_write_text

PREPROCESS_JSON = "preprocess.json"
LABELS_TXT = "labels.txt"
BAKED_INPUT = "image"


def preprocess_document(transform: Any, data_config: dict[str, Any], input_name: str) -> dict[str, Any]:
    """The evaluation transform as an app implements it: resize the shorter side, center-crop, scale
    to [0, 1], normalize per channel, NCHW float32. Read from timm's transform itself, so it says
    what onnxvit ran, not what a default would be."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    resize = next((s for s in steps if isinstance(s, T.Resize)), None)
    crop = next((s for s in steps if isinstance(s, T.CenterCrop)), None)
    normalize = next((s for s in steps if isinstance(s, T.Normalize)), None)
    if resize is None or crop is None or normalize is None:
        raise ValueError(f"unexpected evaluation transform (want Resize, CenterCrop, Normalize): {transform}")
    size = resize.size if isinstance(resize.size, int) else list(resize.size)
    channels, height, width = data_config["input_size"]
    return {
        "input": {"name": input_name, "shape": [1, channels, height, width], "layout": "NCHW", "dtype": "float32"},
        "resize": {
            "size": size,  # an int resizes the shorter side to it, keeping the aspect ratio
            "interpolation": resize.interpolation.value,
            "antialias": bool(resize.antialias),
        },
        "crop": {"size": list(crop.size), "mode": "center"},
        "value_range": [0.0, 1.0],  # RGB 0..255 divided by 255, before normalization
        "mean": [float(v) for v in np.asarray(normalize.mean).ravel()],
        "std": [float(v) for v in np.asarray(normalize.std).ravel()],
        "channel_order": "RGB",
        "timm_data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }


def class_names(folder_classes: list[str], num_classes: int) -> list[str]:
    """One name per output index: ImageNet descriptions (timm's own table) when the folder's classes
    are ImageNet's synsets, the folder's class names when they match the output count, else
    ``class N``."""
    if num_classes == 1000 and len(folder_classes) == 1000 and folder_classes[0].startswith("n"):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        if [info.index_to_label_name(i) for i in range(1000)] == folder_classes:
            return [f"{info.index_to_label_name(i)} {info.index_to_description(i)}" for i in range(1000)]
    if len(folder_classes) == num_classes:
        return list(folder_classes)
    return [f"class {i}" for i in range(num_classes)]


def write_handoff(folder: Path, preprocess: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """``preprocess.json`` and ``labels.txt`` in ``folder``; report.json's ``handoff``."""
    atomic_write_json(folder / PREPROCESS_JSON, preprocess)
    atomic_write_text(folder / LABELS_TXT, "".join(f"{name}\n" for name in labels))
    return {"preprocess": PREPROCESS_JSON, "labels": LABELS_TXT, "classes": len(labels)}


def bake_preprocessing(model: onnx.ModelProto, preprocess: dict[str, Any]) -> onnx.ModelProto:
    """``model`` with its normalization inside: the input becomes the center crop as the app has it,
    uint8 RGB, NHWC (``image``); the graph casts, scales to [0, 1], normalizes and transposes."""
    graph = model.graph
    original = graph.input[0].name
    _, channels, height, width = preprocess["input"]["shape"]
    mean = np.array(preprocess["mean"], np.float32).reshape(1, 1, 1, channels)
    std = np.array(preprocess["std"], np.float32).reshape(1, 1, 1, channels)
    constants = [
        numpy_helper.from_array(np.array(255.0, np.float32), "preprocess/255"),
        numpy_helper.from_array(mean, "preprocess/mean"),
        numpy_helper.from_array(std, "preprocess/std"),
    ]
    nodes = [
        helper.make_node("Cast", [BAKED_INPUT], ["preprocess/float"], "preprocess/Cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Div", ["preprocess/float", "preprocess/255"], ["preprocess/unit"], "preprocess/Scale"),
        helper.make_node("Sub", ["preprocess/unit", "preprocess/mean"], ["preprocess/centred"], "preprocess/Mean"),
        helper.make_node("Div", ["preprocess/centred", "preprocess/std"], ["preprocess/nhwc"], "preprocess/Std"),
        helper.make_node("Transpose", ["preprocess/nhwc"], [original], "preprocess/ToNCHW", perm=[0, 3, 1, 2]),
    ]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "batch")
    baked = helper.make_graph(
        nodes + list(graph.node),
        graph.name,
        [helper.make_tensor_value_info(BAKED_INPUT, onnx.TensorProto.UINT8, [batch_dim, height, width, channels])],
        list(graph.output),
        constants + list(graph.initializer),
        value_info=list(graph.value_info),
    )
    result = helper.make_model(baked, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result


def crop_uint8(image: Any, preprocess: dict[str, Any]) -> np.ndarray:
    """A PIL RGB image resized and center-cropped as ``preprocess`` says (PIL's own resize, as timm's
    transform runs it), as the HWC uint8 array a baked model takes."""
    from torchvision import transforms as T

    resize = preprocess["resize"]
    steps = T.Compose(
        [
            T.Resize(
                resize["size"],
                interpolation=T.InterpolationMode(resize["interpolation"]),
                antialias=resize["antialias"],
            ),
            T.CenterCrop(preprocess["crop"]["size"]),
        ]
    )
    return np.asarray(steps(image), dtype=np.uint8)
