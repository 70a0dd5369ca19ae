"""The FP32 graph rewrites before quantization: each must change the graph as it says and leave the
logits as they were."""

import numpy as np
import onnx
import pytest

from passes.base import PassContext
from passes.fuse_vit import FuseVitConfig, FuseVitPass
from passes.ort_quant import channel_ranges
from passes.reparam_layernorm import ReparamLayerNormConfig, ReparamLayerNormPass, find_sites
from passes.runtime import model_logits


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


def _export(name: str, images: np.ndarray, fused_attn: bool = True, **kwargs) -> onnx.ModelProto:
    import torch

    from onnxvit.config import ExportConfig, ModelConfig
    from onnxvit.export import export_onnx
    from onnxvit.models import create_model
    from passes.simplify import SimplifyPass

    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, random_init=True, num_classes=4, kwargs=kwargs))
    with torch.no_grad():  # timm initialises biases to zero, and the simplifier would drop those Adds
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.02)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn  # False: timm's explicit q * scale @ k^T instead of SDPA
    exported = export_onnx(model, images, ExportConfig())
    return SimplifyPass().run(exported, PassContext(calibration=[images[:4]]))


@pytest.fixture(scope="module")
def exported(tiny_images):
    return _export("deit_tiny_patch16_224", tiny_images, depth=2)


@pytest.fixture(scope="module")
def fused(exported, tiny_images):
    ctx = PassContext(calibration=[tiny_images[:4]])
    return FuseVitPass().run(exported, ctx), ctx.notes


def test_fuse_vit_turns_timm_attention_into_multihead_attention(exported, tiny_images, fused):
    tiny_onnx = exported
    model, notes = fused
    assert notes == {"attention_fused": 2, "linear_3d": 6}  # depth 2: proj, fc1, fc2 per block
    assert _count(model, "MultiHeadAttention") == 2 and _count(model, "Softmax") == 0
    assert _count(model, "Gemm") == 1  # the classifier, on the 2-D class token
    assert _count(model, "Reshape") < _count(tiny_onnx, "Reshape") - 10
    np.testing.assert_allclose(
        model_logits(model, [tiny_images]), model_logits(tiny_onnx, [tiny_images]), atol=1e-4, rtol=1e-4
    )


def test_fuse_vit_options_switch_each_rewrite(exported):
    tiny_onnx = exported
    ctx = PassContext()
    model = FuseVitPass(FuseVitConfig(attention=False)).run(tiny_onnx, ctx)
    # Unfused, qkv feeds a 5-D reshape and proj reads a 4-D tensor: only fc1 and fc2 qualify.
    assert ctx.notes == {"linear_3d": 4} and _count(model, "MultiHeadAttention") == 0
    ctx = PassContext()
    model = FuseVitPass(FuseVitConfig(matmul_3d=False)).run(tiny_onnx, ctx)
    assert ctx.notes == {"attention_fused": 2} and _count(model, "Gemm") == 7


def test_fuse_vit_tanh_gelu_is_opt_in_and_close(exported, tiny_images):
    ctx = PassContext()
    model = FuseVitPass(FuseVitConfig(gelu="tanh")).run(exported, ctx)
    assert ctx.notes["gelu_tanh"] == 2 and _count(model, "FastGelu") == 2 and _count(model, "Erf") == 0
    reference = model_logits(exported, [tiny_images])
    approximate = model_logits(model, [tiny_images])
    assert 0 < np.abs(approximate - reference).max() < 1e-2  # an approximation: close, not exact


def test_fuse_vit_on_another_width_and_head_count(tiny_images):
    wide = _export("vit_small_patch16_224", tiny_images, depth=1)  # 6 heads of 64, not DeiT-tiny's 3
    ctx = PassContext()
    model = FuseVitPass().run(wide, ctx)
    assert ctx.notes["attention_fused"] == 1
    heads = [
        a.i for n in model.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute if a.name == "num_heads"
    ]
    assert heads == [6]
    np.testing.assert_allclose(
        model_logits(model, [tiny_images]), model_logits(wide, [tiny_images]), atol=1e-4, rtol=1e-4
    )


def test_fuse_vit_matches_timm_explicit_attention_too(tiny_images):
    explicit = _export("deit_tiny_patch16_224", tiny_images, fused_attn=False, depth=1)
    ctx = PassContext()
    model = FuseVitPass().run(explicit, ctx)
    assert ctx.notes["attention_fused"] == 1 and _count(model, "Softmax") == 0
    np.testing.assert_allclose(
        model_logits(model, [tiny_images]), model_logits(explicit, [tiny_images]), atol=1e-4, rtol=1e-4
    )


def test_fuse_vit_leaves_attention_it_does_not_recognise(tiny_images):
    # qk_norm adds a LayerNorm on q and k: not plain timm attention, so it must stay as exported.
    normed = _export("deit_tiny_patch16_224", tiny_images, depth=1, qk_norm=True)
    ctx = PassContext()
    model = FuseVitPass().run(normed, ctx)
    assert ctx.notes["attention_fused"] == 0 and _count(model, "Softmax") == 1
    np.testing.assert_allclose(
        model_logits(model, [tiny_images]), model_logits(normed, [tiny_images]), atol=1e-4, rtol=1e-4
    )


def test_reparam_layernorm_evens_channel_ranges_and_keeps_fp32_logits(fused, tiny_images):
    model, _ = fused
    ctx = PassContext(calibration=[tiny_images[:8]])
    rewritten = ReparamLayerNormPass(ReparamLayerNormConfig(alpha=1.0)).run(model, ctx)
    assert ctx.notes["layernorms"] == 4  # norm1 -> qkv and norm2 -> fc1, in both blocks
    np.testing.assert_allclose(
        model_logits(rewritten, [tiny_images]), model_logits(model, [tiny_images]), atol=1e-3, rtol=1e-3
    )

    def spread(m: onnx.ModelProto) -> float:
        names = [site.norm.output[0] for site in find_sites(m)]
        ranges = channel_ranges(m, names, ctx)
        return max(float((hi - lo).max() / np.median(hi - lo)) for lo, hi in ranges.values())

    # alpha 1 moves every channel's range into the weights: on the calibration images all become equal.
    assert spread(model) > 1.3 and spread(rewritten) < 1.01
