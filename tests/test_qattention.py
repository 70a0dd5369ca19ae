"""The int8 qkv projection and its attention as one QAttention: the same integer products, the
float attention by another kernel, so the logits move by rounding only."""

import numpy as np
import onnx
import pytest

from passes.base import PassContext
from passes.fuse_vit import FuseVitPass
from passes.graph import copy_model
from passes.metrics import sqnr_db
from passes.ort_quant import tensor_values
from passes.qattention import QAttentionPass
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import batches, model_logits
from tests.test_vit_rewrites import _export


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


@pytest.fixture(scope="module")
def fused(tiny_images):
    return FuseVitPass().run(_export("deit_tiny_patch16_224", tiny_images, depth=2), PassContext())


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
@pytest.mark.parametrize("schemes", ["fixed", "search"])
def test_int8_attention_blocks_become_qattention(fused, tiny_images, weight_type, schemes):
    ctx = PassContext(calibration=[tiny_images[:8]])
    config = QuantizeInt8Config(weight_type=weight_type, reduce_range=False, schemes=schemes)
    quantized = QuantizeInt8Pass(config).run(fused, ctx)
    notes: dict = {}
    rewritten = QAttentionPass().run(quantized, PassContext(notes=notes))
    assert notes == {"fused": 2}
    assert _count(rewritten, "QAttention") == 2
    assert _count(rewritten, "MultiHeadAttention") == _count(rewritten, "Split") == 0
    assert _count(rewritten, "MatMulInteger") == _count(quantized, "MatMulInteger") - 2
    onnx.checker.check_model(rewritten, full_check=True)
    one_by_one = batches(tiny_images, 1)  # the deploy batch: one input range per image
    # the first block's attention output, from the same input: equal but for float rounding
    first = next(n for n in quantized.graph.node if n.op_type == "MultiHeadAttention").output[0]
    np.testing.assert_allclose(
        _outputs(rewritten, first, one_by_one), _outputs(quantized, first, one_by_one), rtol=1e-4, atol=1e-5
    )
    # later blocks' dynamic input ranges can move by a step with that rounding, and a few values with them
    before, after = model_logits(quantized, one_by_one), model_logits(rewritten, one_by_one)
    assert sqnr_db(before, after) > 25
    assert (before.argmax(1) == after.argmax(1)).all()


def _outputs(model: onnx.ModelProto, name: str, feeds: list[np.ndarray]) -> np.ndarray:
    """Tensor ``name`` of ``model`` for each feed."""
    values = tensor_values(model, [name], feeds, model.graph.input[0].name, threads=2)
    return np.concatenate([batch[name] for batch in values])


def test_float_attention_and_shared_tensors_are_left_alone(fused, tiny_images):
    notes: dict = {}
    assert QAttentionPass().run(fused, PassContext(notes=notes)) is fused and notes == {"fused": 0}
    quantized = QuantizeInt8Pass(QuantizeInt8Config(reduce_range=False)).run(fused, PassContext())
    shared = copy_model(quantized)
    query = next(n for n in shared.graph.node if n.op_type == "MultiHeadAttention").input[0]
    shared.graph.output.append(onnx.helper.make_tensor_value_info(query, onnx.TensorProto.FLOAT, None))
    notes = {}
    QAttentionPass().run(shared, PassContext(notes=notes))
    assert notes == {"fused": 1}  # the block whose query is also a graph output keeps its Split


def test_quantize_int8_ships_qattention_only_within_its_budget(fused, tiny_images, monkeypatch):
    from passes import quantize_int8

    search = [tiny_images[i : i + 1] for i in range(6)]
    config = QuantizeInt8Config(reduce_range=False, qattention=True, min_sqnr_db=10.0, max_float_layers=8)
    ctx = PassContext(calibration=[tiny_images[:8]], search=search)
    shipped = QuantizeInt8Pass(config).run(fused, ctx)
    assert ctx.notes["qattention"] == 2 and _count(shipped, "QAttention") == 2
    assert ctx.notes["search_fidelity"]["sqnr_db"] >= 10.0

    class Breaking(QAttentionPass):  # a rewrite whose model misses the budget
        def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
            rewritten = super().run(model, ctx)
            for node in rewritten.graph.node:
                if node.op_type == "QAttention":
                    node.input[4] = node.input[3]  # the weight's scales replaced by the input's
            return rewritten

    monkeypatch.setattr(quantize_int8, "QAttentionPass", Breaking)
    ctx = PassContext(calibration=[tiny_images[:8]], search=search)
    shipped = QuantizeInt8Pass(config).run(fused, ctx)
    assert ctx.notes["qattention"] == 0
    assert _count(shipped, "QAttention") == 0 and _count(shipped, "MultiHeadAttention") == 2


def test_qattention_auto_ships_it_only_where_every_timing_round_finds_it_faster(fused, tiny_images, monkeypatch):
    from passes import quantize_int8

    config = QuantizeInt8Config(reduce_range=False, qattention="auto")
    assert QuantizeInt8Pass.machine_key(config)["timing"]  # a cache from another CPU is not this one's
    assert "timing" not in QuantizeInt8Pass.machine_key(QuantizeInt8Config(reduce_range=False))
    ctx = PassContext(calibration=[tiny_images[:8]])
    shipped = QuantizeInt8Pass(config).run(fused, ctx)  # timed for real: the choice follows the rounds
    rounds = ctx.notes["qattention_round_ratios"]
    assert len(rounds) == 6 and ctx.notes["qattention_time_ratio"] == pytest.approx(np.median(rounds), abs=1e-4)
    used = max(rounds) < 1.0
    assert ctx.notes["qattention"] == 2 * used and _count(shipped, "QAttention") == 2 * used

    timed = []

    def measured(rounds):  # what the timing said, as given: the rule on both sides of it
        def time_ratio(baseline, candidate, shape, threads, batch_size):
            timed.append((shape, threads, batch_size, _count(candidate, "QAttention")))
            return {"time_ratio": float(np.median(rounds)), "round_ratios": rounds}

        return time_ratio

    for rounds, expected in (([0.9, 0.95, 0.99, 0.9, 0.92, 0.9], 2), ([0.9, 0.95, 1.01, 0.9, 0.92, 0.9], 0)):
        monkeypatch.setattr(quantize_int8, "time_ratio", measured(rounds))
        ctx = PassContext(calibration=[tiny_images[:8]], threads=2, batch_size=1)
        shipped = QuantizeInt8Pass(config).run(fused, ctx)
        assert ctx.notes["qattention"] == expected and _count(shipped, "QAttention") == expected
        assert _count(shipped, "MultiHeadAttention") == 2 - expected
    assert timed == [((3, 224, 224), 2, 1, 2)] * 2  # the plain model against the rewritten one, as deployed


@pytest.mark.parametrize("qattention", [True, "auto"])
def test_qattention_with_static_int8_is_a_config_error(qattention):
    with pytest.raises(ValueError, match="qattention: only with mode: dynamic"):
        QuantizeInt8Config(mode="static", qattention=qattention)
