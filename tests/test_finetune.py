"""Distillation after pruning: it learns, it resumes exactly, it never reads the evaluation split."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from click.testing import CliRunner

from onnxvit.cli import main
from onnxvit.config import FinetuneConfig, PruneConfig
from onnxvit.data import scan_image_folder
from onnxvit.finetune import TrainImages, distill
from onnxvit.prune import prune_model
from tests.conftest import write_config


def _quiet_task(description: str, total: int):
    return contextlib.nullcontext(lambda n=1: None)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def student_and_images(tiny_model, tiny_images, image_folder):
    pruned, _ = prune_model(
        tiny_model, PruneConfig(method="l1", mlp=0.6, reconstruct=False), tiny_images[:4], None, "deit"
    )
    folder = scan_image_folder(image_folder)
    return pruned, TrainImages(folder, folder.files[:12], "test images")


def test_distillation_lowers_the_loss_and_resumes_exactly(student_and_images, tiny_model, tmp_path):
    pruned, images = student_and_images
    config = FinetuneConfig(epochs=3, lr=1e-3, batch_size=4, augment=False)

    straight = copy.deepcopy(pruned)
    summary = distill(straight, tiny_model, images, config, tmp_path / "a", "key", _quiet_task)
    assert len(summary["losses"]) == 3 and summary["losses"][-1] < summary["losses"][0]

    interrupted = copy.deepcopy(pruned)
    calls = {"n": 0}

    def stop_in_epoch_two(description: str, total: int):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Stop
        return _quiet_task(description, total)

    with pytest.raises(_Stop):
        distill(interrupted, tiny_model, images, config, tmp_path / "b", "key", stop_in_epoch_two)
    resumed = copy.deepcopy(pruned)  # a new process: starts from the pruned weights, finds epoch 1
    summary_resumed = distill(resumed, tiny_model, images, config, tmp_path / "b", "key", _quiet_task)
    assert summary_resumed["resumed_after_epoch"] == 1
    assert summary_resumed["losses"] == summary["losses"]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_finetune_config_errors(tmp_path, image_folder):
    lone = write_config(tmp_path, image_folder, finetune={"epochs": 1})
    result = CliRunner().invoke(main, ["compress", str(lone), "--quiet"])
    assert result.exit_code == 2 and "finetune: fine-tuning follows pruning" in result.stderr

    (tmp_path / "eval").mkdir()
    on_eval = write_config(
        tmp_path / "eval", image_folder, prune={"method": "l1", "mlp": 0.25}, finetune={"root": str(image_folder)}
    )
    result = CliRunner().invoke(main, ["compress", str(on_eval), "--quiet"])
    assert result.exit_code == 2 and "finetune.root" in result.stderr and "evaluation split" in result.stderr
    assert not (tmp_path / "eval" / "out").exists()  # nothing written


def test_compress_prunes_then_finetunes(tmp_path, image_folder):
    config = write_config(
        tmp_path,
        image_folder,
        prune={"method": "l1", "mlp": 0.5},
        finetune={"epochs": 1, "batch_size": 6},
        passes=[],
        benchmark={"warmup": 1, "runs": 2, "rounds": 1, "torch": False},
    )
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    tuned = report["prune"]["finetune"]
    assert tuned["images"] == 12 and "calibrate + search" in tuned["source"] and len(tuned["losses"]) == 1
    assert "Fine-tuned by distillation" in (tmp_path / "out" / "report.md").read_text()
