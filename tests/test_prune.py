"""Structured pruning: every method on a real (small) timm ViT, exactness where it must be exact, bad configs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch_pruning as tp
from click.testing import CliRunner

from onnxvit.cli import main
from onnxvit.config import ExportConfig, PruneConfig, load_config
from onnxvit.errors import UserError
from onnxvit.export import check_export, export_onnx
from onnxvit.prune import HessianImportance, count_params_macs, load_pruned, prune_model, serialize_pruned, widths
from tests.conftest import write_config


def _logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(images))


@pytest.mark.parametrize(
    "importance_cls",
    [
        HessianImportance,
        pytest.param(
            tp.importance.GroupHessianImportance,
            marks=pytest.mark.xfail(
                strict=True, reason="torch-pruning 1.6.1 keeps only the last sample; drop our subclass when this passes"
            ),
        ),
    ],
)
def test_hessian_importance_accumulates_every_sample(importance_cls):
    layer = torch.nn.Linear(3, 2)
    importance = importance_cls()
    grads = [torch.tensor([[1.0, 2, 3], [0, 1, 0]]), torch.tensor([[3.0, 0, 1], [2, 2, 2]])]
    for g in grads:
        layer.weight.grad = g.clone()
        importance.accumulate_grad(layer)
    total = sum(g.pow(2) for g in grads)
    assert torch.equal(importance._accu_grad[layer.weight], total)
    assert importance._counter[layer.weight] == 2


@pytest.mark.parametrize("method", ["l1", "l2", "taylor", "hessian", "random"])
def test_each_method_prunes_heads_and_mlp_and_exports(method, tiny_model, tiny_images):
    """A depth-2 DeiT pruned by each method runs, shrinks as asked, and its ONNX export matches it."""
    config = PruneConfig(method=method, mlp=0.25, heads=0.34, batches=1, batch_size=4)
    pruned, summary = prune_model(tiny_model, config, tiny_images[:4], None, "deit")
    assert widths(pruned) == {"heads": [2, 2], "head_dim": [64, 64], "mlp_hidden": [576, 576]}
    assert summary["removed"]["params"] > 0.2 and summary["pruned"]["params"] < summary["dense"]["params"]
    assert widths(tiny_model)["heads"] == [3, 3]  # the dense model is left as it was
    proto = export_onnx(pruned, tiny_images, ExportConfig())
    assert check_export(pruned, proto, [tiny_images[:4]], 1e-4, 2) <= 1e-4


def test_gradient_methods_rank_by_the_data(tiny_model, tiny_images):
    """Taylor and Hessian see gradients: different targets give different cuts than magnitude."""
    cuts = {}
    for method in ("l1", "taylor", "hessian"):
        pruned, _ = prune_model(
            tiny_model, PruneConfig(method=method, mlp=0.5, batches=2, batch_size=4), tiny_images[:8], None, "deit"
        )
        cuts[method] = pruned.blocks[0].mlp.fc1.weight.detach().clone()
    assert not torch.equal(cuts["l1"], cuts["taylor"])
    assert not torch.equal(cuts["taylor"], cuts["hessian"])


@pytest.fixture(scope="module")
def model_with_dead_channels():
    """A depth-2 DeiT whose last 8 dims of every head and last 16 MLP channels contribute nothing."""
    import timm

    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=4).eval()
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            heads, head_dim, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
            attn.qkv.weight.view(3, heads, head_dim, dim)[:, :, -8:] = 0
            attn.qkv.bias.view(3, heads, head_dim)[:, :, -8:] = 0
            attn.proj.weight.view(dim, heads, head_dim)[:, :, -8:] = 0
            block.mlp.fc1.weight[-16:] = 0
            block.mlp.fc2.weight[:, -16:] = 0
    return model


def test_pruning_dead_head_dims_is_exact(model_with_dead_channels, tiny_images):
    """Only right if the softmax scale of the old head dim is kept (SDPA would use the new one)."""
    dense = model_with_dead_channels
    pruned, _ = prune_model(dense, PruneConfig(method="l1", head_dims=0.125), tiny_images[:2], None, "deit")
    assert widths(pruned)["head_dim"] == [56, 56]
    assert torch.allclose(_logits(pruned, tiny_images[:4]), _logits(dense, tiny_images[:4]), atol=1e-5)
    for attn in (b.attn for b in pruned.blocks):
        attn.fused_attn = False  # timm's explicit path uses attn.scale: the same answer
    assert torch.allclose(_logits(pruned, tiny_images[:4]), _logits(dense, tiny_images[:4]), atol=1e-5)


def test_pruning_dead_mlp_channels_is_exact(model_with_dead_channels, tiny_images):
    dense = model_with_dead_channels
    pruned, _ = prune_model(dense, PruneConfig(method="l1", mlp=16 / 768, round_to=8), tiny_images[:2], None, "deit")
    assert widths(pruned)["mlp_hidden"] == [752, 752]
    assert torch.allclose(_logits(pruned, tiny_images[:4]), _logits(dense, tiny_images[:4]), atol=1e-5)


def test_global_pruning_ranks_across_blocks(model_with_dead_channels, tiny_images):
    """Block 1 made nearly dead: global ranking takes all its channels from there, local takes half each."""
    import copy

    dense = copy.deepcopy(model_with_dead_channels)
    with torch.no_grad():
        dense.blocks[1].mlp.fc1.weight.mul_(1e-3)
    config = {"method": "l1", "mlp": 0.25}
    local, _ = prune_model(dense, PruneConfig(**config), tiny_images[:2], None, "deit")
    ranked, _ = prune_model(dense, PruneConfig(**config, global_pruning=True), tiny_images[:2], None, "deit")
    assert widths(local)["mlp_hidden"] == [576, 576]
    assert widths(ranked)["mlp_hidden"][0] > widths(ranked)["mlp_hidden"][1]
    assert sum(widths(ranked)["mlp_hidden"]) == pytest.approx(2 * 576, abs=16)


def test_ratio_target_is_met(tiny_model, tiny_images):
    for target in ("params", "macs"):
        config = PruneConfig(method="l1", ratio=0.2, target=target)
        _, summary = prune_model(tiny_model, config, tiny_images[:2], None, "deit")
        assert summary["removed"][target] == pytest.approx(0.2, abs=0.02), summary


def test_checkpoint_rebuilds_from_timm(tiny_model, tiny_images, tmp_path):
    pruned, summary = prune_model(
        tiny_model, PruneConfig(method="l1", mlp=0.25, heads=0.34, head_dims=0.25), tiny_images[:2], None, "deit"
    )
    path = tmp_path / "pruned.pt"
    path.write_bytes(
        serialize_pruned(tiny_model, pruned, "deit_tiny_patch16_224", {"depth": 2, "num_classes": 4}, summary)
    )
    rebuilt, saved_summary = load_pruned(path)
    assert saved_summary == summary and widths(rebuilt) == widths(pruned)
    assert torch.equal(_logits(rebuilt, tiny_images[:2]), _logits(pruned, tiny_images[:2]))
    torch.save(tiny_model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not an onnxvit pruned checkpoint"):
        load_pruned(tmp_path / "plain.pt")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratio": 1.5}, "prune.ratio: Input should be less than 1"),
        ({"ratio": 0}, "prune.ratio: Input should be greater than 0"),
        (
            {"method": "fisher", "ratio": 0.1},
            "prune.method: Input should be 'l1', 'l2', 'taylor', 'hessian' or 'random'",
        ),
        ({}, "prune: say how much to prune"),
        ({"ratio": 0.1, "mlp": 0.2}, "prune: give either ratio or explicit mlp, not both"),
        ({"ratio": 0.1, "ration_kinds": ["mlp"]}, "prune.ration_kinds: unknown key; did you mean 'ratio_kinds'"),
    ],
)
def test_bad_prune_config_is_rejected(options, message, tmp_path, image_folder):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(write_config(tmp_path, image_folder, prune=options))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"heads": 0.9}, "would remove every one of the 3 heads"),
        (
            {"mlp": 0.2, "ignore": ["blocks.0.mlp.fcx"]},
            "prune.ignore: VisionTransformer has no module 'blocks.0.mlp.fcx'; did you mean",
        ),
        ({"ratio": 0.9}, "more than pruning mlp, head_dims can remove"),
    ],
)
def test_impossible_prune_is_a_user_error(options, message, tiny_model, tiny_images):
    with pytest.raises(UserError, match=message):
        prune_model(tiny_model, PruneConfig(method="l1", **options), tiny_images[:2], None, "deit")


def test_compress_with_prune_reports_each_stage(tmp_path, image_folder):
    prune = {"method": "taylor", "ratio": 0.15, "batches": 1, "batch_size": 4}
    config = write_config(tmp_path, image_folder, prune=prune, passes=[{"pass": "quantize_int8", "name": "int8"}])
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"], catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["torch-fp32", "dense-fp32", "fp32", "int8"]
    assert report["reference"] == "dense-fp32" and variants["dense-fp32"]["agree_top1"] == 100.0
    assert variants["fp32"]["params"] < variants["dense-fp32"]["params"]
    assert variants["int8"]["macs"] == variants["fp32"]["macs"] < variants["dense-fp32"]["macs"]
    assert report["prune"]["removed"]["params"] == pytest.approx(0.15, abs=0.02)
    assert variants["torch-fp32"]["sqnr_db"] == pytest.approx(variants["fp32"]["sqnr_db"], abs=0.5)
    rebuilt, _ = load_pruned(out / "model.pruned.pt")
    assert count_params_macs(rebuilt, (3, 224, 224))["params"] == variants["fp32"]["params"]
    assert "Pruned" in (out / "report.md").read_text()

    (tmp_path / "bad").mkdir()
    bad = write_config(tmp_path / "bad", image_folder, prune={"method": "taylor", "heads": 0.9})
    result = CliRunner().invoke(main, ["compress", str(bad), "--quiet"], catch_exceptions=True)
    assert result.exit_code == 2 and "prune.heads" in result.stderr and "Traceback" not in result.output


def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one(tiny_model, tiny_images):
    """Refit on 8 images, judged on 4 others: the refit must generalize, not only fit."""
    from passes.metrics import sqnr_db

    held_out = tiny_images[8:12]
    reference = _logits(tiny_model, held_out).numpy()
    fidelity = {}
    for reconstruct in (False, True):
        pruned, summary = prune_model(
            tiny_model, PruneConfig(method="l1", mlp=0.5, reconstruct=reconstruct), tiny_images[:8], None, "deit"
        )
        assert summary["reconstructed"] == (2 if reconstruct else 0)  # the two fc2 layers
        fidelity[reconstruct] = sqnr_db(reference, _logits(pruned, held_out).numpy())
    assert fidelity[True] > fidelity[False] + 1, fidelity
