"""Shared fixtures: a small generated ImageFolder, a depth-2 DeiT, the shared real data when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
DEIT_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.pth"

needs_shared = pytest.mark.skipif(
    not (SAMPLE.is_dir() and DEIT_WEIGHTS.is_file()),
    reason=f"real data absent: needs {SAMPLE} and {DEIT_WEIGHTS} beside the checkout",
)

TINY_MODEL = {"name": "deit_tiny_patch16_224", "random_init": True, "num_classes": 4, "kwargs": {"depth": 2}}


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """4 classes x 6 small photos-like JPEGs (smooth random fields), an ImageFolder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir()
        for i in range(6):
            small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(root / f"class{c}" / f"img{i}.jpg")
    return root


def write_config(folder: Path, image_root: Path, **overrides) -> Path:
    """A YAML config for the tiny model; ``overrides`` replace whole top-level sections."""
    config = {
        "model": dict(TINY_MODEL),
        "data": {
            "root": str(image_root),
            "calibrate_images": 8,
            "search_images": 4,
            "batch_size": 8,
            "check_images": 4,
        },
        "passes": [
            {"pass": "quantize_int8", "name": "int8", "input": "fp32"},
            {"pass": "fp16", "name": "fp16", "input": "fp32"},
        ],
        "benchmark": {"warmup": 1, "runs": 4, "rounds": 2},
        "output": {"dir": str(folder / "out")},
    }
    config.update(overrides)
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_state(config_path: Path, out: Path):
    """The pipeline's shared state for a finished run of ``config_path`` into ``out``, as a later
    stage sees it: its config, decoded images and cache."""
    from onnxvit.compress import CACHE_DIR
    from onnxvit.config import load_config
    from onnxvit.engine import Cache
    from onnxvit.progress import Reporter
    from onnxvit.stages.load import Run

    config, pass_configs = load_config(config_path)
    config.output.dir = out
    return Run(config, pass_configs, Reporter(True), Cache(out / CACHE_DIR))


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from onnxvit.config import ModelConfig
    from onnxvit.models import create_model

    torch.manual_seed(0)  # the same random weights whichever test builds it first
    return create_model(ModelConfig(**TINY_MODEL))


@pytest.fixture(scope="session")
def tiny_images(image_folder, tiny_model) -> np.ndarray:
    from onnxvit.data import load_images, scan_image_folder, timm_transform

    folder = scan_image_folder(image_folder)
    return load_images(folder, folder.files[:12], timm_transform(tiny_model)[0])


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tiny_images):
    """The tiny model exported and simplified, as the pipeline's fp32 step makes it."""
    from onnxvit.config import ExportConfig
    from onnxvit.export import export_onnx
    from passes.base import PassContext
    from passes.simplify import SimplifyPass

    exported = export_onnx(tiny_model, tiny_images, ExportConfig())
    return SimplifyPass().run(exported, PassContext(calibration=[tiny_images[:4]]))


def minimal_report(**sections):
    """The fewest report.json fields ``render_markdown`` reads, with ``sections`` added: for tests of
    one section's rendering."""
    return {
        "model": "m",
        "onnxvit_version": "0",
        "variants": [],
        "parity": [],
        "machine": {"cpu": "c", "threads": 2, "onnxruntime": "o", "torch": "t"},
        **sections,
    }
