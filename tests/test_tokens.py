"""Token merging: the matching on a case worked by hand, exactness where it must be exact, the export
and its fusion, the schedule search's budget, the pipeline end to end, and the errors."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxvit.cli import main
from onnxvit.config import ExportConfig
from onnxvit.errors import UserError
from onnxvit.export import check_export, export_onnx, forced_logits, torch_logits
from onnxvit.tokens import bipartite_soft_matching, merge_tokens, resolve_schedule
from tests.conftest import TINY_MODEL, write_config


def test_matching_merges_the_most_similar_pairs_by_size_and_keeps_the_class_token_first():
    # One class token, then patches p0..p5 in sequence order: A = p0 p2 p4, B = p1 p3 p5 (alternate
    # positions), stored as the blocks read them: cls, p0 p2 p4, p1 p3 p5.
    # By cosine similarity of the metric, p0's best partner is p1 (1.0), p2's is p3 (0.98, p5 0.979),
    # p4 points away from all of B (best: p5, -0.69). With r = 2, p0 and p2 merge; p4 stays.
    cls, p0, p1, p2, p3, p4, p5 = [0.0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0.2], [-1, -1, 0], [0, 1, 0.21]
    metric = torch.tensor([[cls, p0, p2, p4, p1, p3, p5]])
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)  # rows: cls p0 p2 p4 p1 p3 p5
    size = torch.ones(1, 7, 1)
    size[0, 4] = 3.0  # p1 already stands for three patches
    out, new_size = bipartite_soft_matching(x, size, metric, r=2, prefix=1)

    # the sequence after the merge: p4 (A's unmerged), then B: p1+p0, p3+p2, p5; stored as its even
    # positions (p4, p3+p2) then its odd ones (p1+p0, p5)
    assert out.shape == (1, 5, 2) and new_size.shape == (1, 5, 1)
    assert torch.equal(out[0, 0], x[0, 0]) and new_size[0, 0, 0] == 1  # the class token, first and untouched
    assert torch.equal(out[0, 1], x[0, 3])  # p4
    assert torch.allclose(out[0, 2], (x[0, 5] + x[0, 2]) / 2)  # p3 + p2
    assert torch.allclose(out[0, 3], (x[0, 4] * 3 + x[0, 1] * 1) / 4)  # p1 + p0, weighted by size
    assert torch.equal(out[0, 4], x[0, 6])  # p5, nothing merged into it
    assert new_size[0, :, 0].tolist() == [1.0, 1.0, 2.0, 4.0, 1.0]
    assert float(new_size.sum()) == float(size.sum())  # no patch lost or counted twice
    # batched: each image merges its own pairs, its rows moved within it. Image 2 stores p4 and p0
    # the other way round (A = p4 p2 p0): rows 3 and 2 merge, row 1 stays.
    both = torch.cat([metric, metric[:, [0, 3, 2, 1, 4, 5, 6]]])
    out2, size2 = bipartite_soft_matching(torch.cat([x, x + 100]), torch.cat([size, size]), both, r=2, prefix=1)
    assert torch.equal(out2[0], out[0]) and torch.equal(size2[0], new_size[0])
    y = x[0] + 100
    expected = torch.stack([y[0], y[1], (y[5] + y[2]) / 2, (y[4] * 3 + y[3]) / 4, y[6]])
    assert torch.allclose(out2[1], expected) and size2[1, :, 0].tolist() == [1.0, 1.0, 2.0, 4.0, 1.0]


def test_class_token_only_last_block_is_exact(tiny_model, tiny_images):
    x = torch.from_numpy(tiny_images[:3])
    with torch.inference_mode():
        reference = tiny_model(x)
        unmerged = merge_tokens(tiny_model, [0, 0], class_token_only_last_block=False)(x)
        cls_only = merge_tokens(tiny_model, [0, 0], class_token_only_last_block=True)(x)
    assert torch.allclose(unmerged, reference, atol=1e-5)
    assert torch.allclose(cls_only, reference, atol=1e-5)


def test_average_pooled_model_weighs_merged_tokens_by_size():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=2, global_pool="avg", class_token=False)
    vit.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(merge_tokens(vit, [0, 0])(x), vit(x), atol=1e-5)
        merged = merge_tokens(vit, [20, 20])
        assert merged.tokens == [196, 176] and merged(x).shape == (2, 3)
    # without prefix tokens the export holds no empty index tensor and matches PyTorch at batch 2
    proto = export_onnx(merged, x.numpy(), ExportConfig())
    assert check_export(merged, proto, [x.numpy()], 1e-4, 2) <= 1e-4


def test_schedules_and_their_limits(tiny_model):
    assert resolve_schedule(tiny_model, 8, "constant", True) == [8, 0]
    assert resolve_schedule(tiny_model, 8, "constant", False) == [8, 8]
    assert resolve_schedule(tiny_model, 8, "decreasing", False) == [16, 8]
    assert resolve_schedule(tiny_model, 8, "alternate", False) == [0, 16]
    assert resolve_schedule(tiny_model, 8, "alternate", True) == [0, 0]
    from onnxvit.errors import UserError

    with pytest.raises(UserError, match="one per block"):
        resolve_schedule(tiny_model, None, [1, 2, 3], True)
    with pytest.raises(UserError, match="can merge 0 to 98"):
        resolve_schedule(tiny_model, 99, "constant", False)


@pytest.mark.parametrize("batch", [1, 2])
def test_export_matches_pytorch_given_the_same_choices(tiny_model, tiny_images, batch):
    merged = merge_tokens(tiny_model, [40, 30], class_token_only_last_block=False)
    proto = export_onnx(merged, tiny_images, ExportConfig())
    ops = {node.op_type for node in proto.graph.node}
    assert {"ArgMax", "TopK", "ScatterND"} <= ops
    batches = [tiny_images[i : i + batch] for i in range(0, 8, batch)]
    diff = check_export(merged, proto, batches, 1e-4, 2)
    assert diff <= 1e-4
    reference, actual = forced_logits(merged, proto, batches, 2)
    assert np.abs(reference - actual).max() <= 1e-4
    # the check is not vacuous: a wrong export (the merge's sizes dropped) fails it
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    scatter = next(n for n in broken.graph.node if n.op_type == "ScatterND")
    next(a for a in scatter.attribute if a.name == "reduction").s = b"none"  # merged sizes overwrite, not add
    with pytest.raises(Exception, match="differ from PyTorch"):
        check_export(merged, broken, batches, 1e-4, 2)
    assert torch_logits(merged, batches).shape == (8, 4)


def test_fuse_vit_fuses_merged_attention_with_its_bias_and_query_slice(tiny_model, tiny_images):
    from passes import PassContext
    from passes.fuse_vit import FuseVitConfig, FuseVitPass
    from passes.metrics import rewrite_change
    from passes.runtime import model_logits
    from passes.simplify import SimplifyConfig, SimplifyPass

    merged = merge_tokens(tiny_model, [30, 0])  # block 1: proportional bias and the class token only
    ctx = PassContext(calibration=[tiny_images[:4]], search=[], batch_size=1, threads=2, log=lambda s: None)
    proto = SimplifyPass(SimplifyConfig()).run(export_onnx(merged, tiny_images, ExportConfig()), ctx)
    fused = FuseVitPass(FuseVitConfig()).run(proto, ctx)
    attention = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 2 and ctx.notes["attention_fused"] == 2
    # the size bias reaches the fused op through its keys: one more key column per head holds it
    keys = next(n for n in fused.graph.node if attention[1].input[1] in n.output)
    assert len(attention[1].input) == 3 and keys.op_type == "Add"
    widths = next(i for i in fused.graph.initializer if i.name == "attention_1/split")
    heads, hidden = tiny_model.blocks[1].attn.num_heads, tiny_model.embed_dim
    assert list(onnx.numpy_helper.to_array(widths)) == [hidden + heads, hidden + heads, hidden]
    assert any(n.op_type == "Slice" and n.name.endswith("query/Slice") for n in fused.graph.node)
    onnx.checker.check_model(fused)
    batches = [tiny_images[i : i + 1] for i in range(8)]
    assert rewrite_change(fused, model_logits(proto, batches, 2), model_logits(fused, batches, 2)) < 1e-4


def test_a_folded_block_merges_on_the_keys_the_split_already_made(tiny_model, tiny_images):
    """A block that both has the size bias and merges (block 1 with every query kept): its merge
    metric reads the Split's keys, whose extra columns are zero, instead of a second slice of the
    projection; the fused model stays within 1e-4 of the unfused one."""
    from passes import PassContext
    from passes.fuse_vit import FuseVitConfig, FuseVitPass
    from passes.metrics import rewrite_change
    from passes.runtime import model_logits
    from passes.simplify import SimplifyConfig, SimplifyPass

    merged = merge_tokens(tiny_model, [20, 10], class_token_only_last_block=False)
    ctx = PassContext(calibration=[tiny_images[:4]], search=[], batch_size=1, threads=2, log=lambda s: None)
    proto = SimplifyPass(SimplifyConfig()).run(export_onnx(merged, tiny_images, ExportConfig()), ctx)
    fused = FuseVitPass(FuseVitConfig()).run(proto, ctx)
    readers = {n.op_type for n in fused.graph.node if "attention_1/k" in n.input}
    assert readers == {"Identity", "Add"}, readers  # the metric, and the bias added for attention
    assert not any(n.op_type == "Slice" and "attention_1/qkv" in n.input for n in fused.graph.node)
    onnx.checker.check_model(fused)
    batches = [tiny_images[i : i + 1] for i in range(8)]
    assert rewrite_change(fused, model_logits(proto, batches, 2), model_logits(fused, batches, 2)) < 1e-4


def test_fuse_vit_keeps_the_attention_bias_when_the_qkv_output_has_another_reader(tiny_model, tiny_images):
    """The keys' extra column changes the qkv projection's output; when something besides the merge's
    key slice reads it, the bias goes to MultiHeadAttention's bias input instead, still exact."""
    from passes import PassContext
    from passes.fuse_vit import FuseVitConfig, FuseVitPass
    from passes.metrics import rewrite_change
    from passes.runtime import make_session, model_logits
    from passes.simplify import SimplifyConfig, SimplifyPass

    merged = merge_tokens(tiny_model, [30, 0])
    ctx = PassContext(calibration=[tiny_images[:4]], search=[], batch_size=1, threads=2, log=lambda s: None)
    proto = SimplifyPass(SimplifyConfig()).run(export_onnx(merged, tiny_images, ExportConfig()), ctx)
    # a second reader of block 1's qkv projection (the input of its 5-D Reshape), seen as (B, tokens,
    # 3 * hidden) as the merge's key slice sees it: its query section
    hidden, tokens = tiny_model.embed_dim, merged.tokens[1]
    unflatten = next(n for n in proto.graph.node if n.op_type == "Reshape" and "/blocks.1/attn/" in n.name)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array(v), f"reader/{name}")
        for name, v in (("s", [0]), ("e", [hidden]), ("a", [-1]), ("shape", [-1, tokens, 3 * hidden]))
    )
    view = onnx.helper.make_node("Reshape", [unflatten.input[0], "reader/shape"], ["qkv_seen"], name="view")
    reader = onnx.helper.make_node(
        "Slice", ["qkv_seen", "reader/s", "reader/e", "reader/a"], ["queries_seen"], name="reader"
    )
    proto.graph.node.extend([view, reader])
    seen = onnx.helper.make_tensor_value_info("queries_seen", onnx.TensorProto.FLOAT, ["batch", "tokens", hidden])
    proto.graph.output.append(seen)
    fused = FuseVitPass(FuseVitConfig()).run(proto, ctx)
    attention = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 2 and len(attention[1].input) == 6 and attention[1].input[5]
    batches = [tiny_images[i : i + 1] for i in range(8)]
    assert rewrite_change(fused, model_logits(proto, batches, 2), model_logits(fused, batches, 2)) < 1e-4
    feed = {proto.graph.input[0].name: batches[0]}
    before, after = (make_session(m, 1).run(["queries_seen"], feed)[0] for m in (proto, fused))
    np.testing.assert_allclose(after, before, atol=1e-5)  # the other reader still sees the queries


def _compress(config):
    return CliRunner().invoke(main, ["compress", str(config), "--quiet"], catch_exceptions=True)


def test_searched_merge_end_to_end(tmp_path, image_folder):
    budget = 45.0  # between the candidates' fidelities (about 63, 49 and 40 dB here): a cold search with one short
    config = write_config(
        tmp_path,
        image_folder,
        tokens={"search": {"candidates": [10, 40, 90], "min_sqnr_db": budget, "runs": 6}},
        passes=[
            {"pass": "fuse_vit", "name": "fused", "input": "fp32", "report": False},
            {"pass": "quantize_int8", "name": "int8"},
            {"pass": "fp16", "name": "fp16", "input": "fp32"},
        ],
        mobile={"variants": ["fp32", "int8"], "web_check": False, "bake_preprocessing": False},
    )
    result = _compress(config)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    tokens = report["tokens"]
    search = tokens["search"]
    rows = {row["candidate"]: row for row in search["rows"]}
    assert set(rows) == {"unmerged", "constant r=10", "constant r=40", "constant r=90"}
    allowed = [row for name, row in rows.items() if name != "unmerged" and row["sqnr_db"] >= budget]
    assert all(row["within_budget"] == (row["sqnr_db"] >= budget) for row in rows.values())
    assert not all(row["within_budget"] for row in rows.values())  # the report is written all the same
    chosen = rows[search["chosen"]]
    assert chosen in allowed and chosen["latency_ms"] == min(row["latency_ms"] for row in allowed)
    assert tokens["schedule"] == chosen["schedule"] and tokens["schedule"][-1] == 0
    assert tokens["tokens_per_block"][0] == 197
    variants = {v["name"]: v for v in report["variants"]}
    assert report["reference"] == "dense-fp32"
    assert variants["fp32"]["macs"] < variants["dense-fp32"]["macs"]
    assert variants["int8"]["macs"] == variants["fp32"]["macs"]
    merged = onnx.load(out / "model.fp32.onnx")
    assert any(n.op_type == "ScatterND" for n in merged.graph.node)
    fp16 = onnx.load(out / "model.fp16.onnx")
    scatter = [n for n in fp16.graph.node if n.op_type == "ScatterND"]
    assert scatter and all("Cast" not in n.name for n in scatter)  # kept float32: the model ran in evaluation
    artifacts = {a["variant"]: a for a in report["mobile"]["artifacts"]}
    assert all(a["ok"] and a["argmax_equal"] and a["choices"] for a in artifacts.values())
    ops_config = (out / report["mobile"]["operators_config"]).read_text()
    assert "ScatterND" in ops_config and "TopK" in ops_config
    assert "Token merging" in (out / "report.md").read_text()


def test_models_without_a_token_sequence_and_bad_sections_are_one_line_errors(tmp_path, image_folder):
    def fails(needle, **overrides):
        result = _compress(write_config(tmp_path, image_folder, **overrides))
        assert result.exit_code == 2, (result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines

    levit = {"name": "levit_128s", "random_init": True, "num_classes": 4}
    fails("levit_128s: a LevitDistilled has no single global token sequence", model=levit, tokens={"r": 4})
    fails("give either search or r", tokens={"r": 4, "search": {}})
    fails("say how many tokens to merge", tokens={})
    fails("tokens.schedule: 3 numbers for a model of 2 blocks", tokens={"schedule": [1, 2, 3]})
    fails("tokens.search.candidates: none of [500] fits", tokens={"search": {"candidates": [500]}})
    assert not (tmp_path / "out").exists()
    tight = {"search": {"candidates": [90], "min_sqnr_db": 150, "runs": 2}}
    fails("tokens.search: no candidate keeps min_sqnr_db 150", tokens=tight, model=dict(TINY_MODEL))


def test_a_cold_search_with_a_candidate_short_of_the_budget_gives_a_json_choice():
    """Rows as a search measures them (the metrics' own values, not read back from JSON), one candidate
    short of the budget: every mark is a bool and the choice writes as JSON (a numpy bool once
    stopped a cold run of the example at its report)."""
    from onnxvit.stages.tokens import _choose
    from passes.metrics import compare_logits

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 10))
    rows = []
    for name, noise in [("unmerged", 0.0), ("close", 1e-3), ("far", 1.0)]:
        fidelity = compare_logits(reference, reference + noise * rng.standard_normal(reference.shape))
        assert all(type(value) is float for value in fidelity.values())
        rows.append(
            {
                "candidate": name,
                "schedule": [0],
                "sqnr_db": round(fidelity["sqnr_db"], 3),
                "agree_top1": round(fidelity["agree_top1"], 3),
                "latency_ms": 1.0,
            }
        )
    chosen = _choose({"rows": rows, "images": 6}, min_sqnr_db=20.0, min_agreement=0.0)
    assert [row["within_budget"] for row in chosen["rows"]] == [True, True, False]
    assert all(type(row["within_budget"]) is bool for row in chosen["rows"])
    assert chosen["chosen"] == "close"
    assert json.loads(json.dumps(chosen))["rows"][2]["within_budget"] is False


def test_a_new_budget_re_picks_from_the_measured_candidates(tmp_path, image_folder, monkeypatch):
    """The search's measurements are cached without its budget: a new budget measures nothing again
    and takes the fastest candidate within it."""
    from onnxvit.config import load_config
    from onnxvit.engine import Cache
    from onnxvit.progress import Reporter
    from onnxvit.stages import tokens as stage
    from onnxvit.stages.load import Run

    search = {"candidates": [10, 40], "min_sqnr_db": 1000.0, "runs": 4}  # a budget no candidate keeps
    config, passes = load_config(write_config(tmp_path, image_folder, tokens={"search": search}))
    run = Run(config, passes, Reporter(True), Cache(tmp_path / "cache"))
    measured = []
    original = stage._measure
    monkeypatch.setattr(stage, "_measure", lambda *args: measured.append(1) or original(*args))
    with pytest.raises(UserError, match="no candidate keeps min_sqnr_db 1000"):
        stage.search_schedule(run, run.dense_model, run.weights_id, config.tokens)
    loose = config.tokens.model_copy(update={"search": config.tokens.search.model_copy(update={"min_sqnr_db": 0.0})})
    chosen = stage.search_schedule(run, run.dense_model, run.weights_id, loose)
    assert measured == [1]
    allowed = [row for row in chosen["rows"][1:] if row["sqnr_db"] >= 0.0]
    assert all(row["within_budget"] == (row in allowed) for row in chosen["rows"][1:]) and allowed
    assert chosen["chosen"] == min(allowed, key=lambda row: row["latency_ms"])["candidate"]
    # timed on this CPU: a cache made on another is measured again, not read
    monkeypatch.setattr(stage, "cpu_model", lambda: "another CPU")
    stage.search_schedule(run, run.dense_model, run.weights_id, loose)
    assert measured == [1, 1]
