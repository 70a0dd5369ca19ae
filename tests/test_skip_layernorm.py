"""SkipLayerNormalization fused offline: every residual Add + LayerNorm of a pre-norm ViT, exact."""

import numpy as np
import onnx

from passes.base import PassContext
from passes.graph import model_problem
from passes.runtime import make_session, model_logits
from passes.skip_layernorm import SkipLayerNormConfig, SkipLayerNormPass


def test_every_residual_norm_is_fused_and_the_logits_stay(tiny_onnx, tiny_images):
    ctx = PassContext()
    fused = SkipLayerNormPass().run(tiny_onnx, ctx)
    # depth 2: norm2 after attention and the next norm after the MLP, in both blocks
    assert ctx.notes["fused"] == 4 and model_problem(fused) is None
    nodes = [n for n in fused.graph.node if n.op_type == "SkipLayerNormalization"]
    assert len(nodes) == 4 and all(n.domain == "com.microsoft" for n in nodes)
    # the sum goes on to the next residual through the fourth output, except the last (final norm only)
    assert [bool(n.output[3]) for n in nodes] == [True, True, True, False]
    # left: block 0's norm1, whose Add adds the position embedding (a constant)
    assert sum(n.op_type == "LayerNormalization" for n in fused.graph.node) == 1
    before, after = model_logits(tiny_onnx, [tiny_images]), model_logits(fused, [tiny_images])
    assert np.abs(before - after).max() < 1e-4 and (before.argmax(1) == after.argmax(1)).all()
    make_session(fused)  # ONNX Runtime's CPU kernel takes it as written


def test_bias_folding_is_optional_and_nothing_to_fuse_is_a_no_op(tiny_onnx, tiny_images):
    ctx = PassContext()
    kept_bias = SkipLayerNormPass(SkipLayerNormConfig(fold_bias=False)).run(tiny_onnx, ctx)
    assert ctx.notes == {"fused": 4, "biases_folded": 0}
    assert all(n.input[4] == "" for n in kept_bias.graph.node if n.op_type == "SkipLayerNormalization")
    assert np.abs(model_logits(kept_bias, [tiny_images]) - model_logits(tiny_onnx, [tiny_images])).max() < 1e-4
    again = PassContext()
    assert SkipLayerNormPass().run(kept_bias, again) is kept_bias and again.notes == {"fused": 0}
    assert isinstance(kept_bias, onnx.ModelProto)
