"""onnxvit's int8 against ONNX Runtime's own recipes, in one table (issue 4).

Runs `onnxvit compress` with the recipe of examples/deit_tiny.yaml (fuse_vit -> reparam_layernorm ->
quantize_int8 with an accuracy budget and `qattention: auto`; ort-default; ort-dynamic), plus
`int8-qattention` (the int8 model through the `qattention` pass: QAttention forced, within no budget;
where int8 already shipped it, the pass finds nothing left and the row times the same model), on:
- the real DeiT-tiny, evaluated on the whole evaluation split (accuracy and fidelity);
- random-init deit_small_patch16_224 and vit_small_patch16_224, for speed (and fidelity to their own
  FP32 outputs on a few images; random weights have no accuracy to report).
Each model's variants are timed together, interleaved, in one run: compare ratios, not milliseconds
across models. Prints the table; with --json PATH writes it with the `headline` object of issue 4, and the
machine's int8 limit with onnxvit int8's efficiency against it (issue 17).

    python bench/int8_recipes.py [--output DIR] [--json PATH] [--models deit_tiny,deit_small,vit_small]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnxvit.report import markdown_table, variant_table

from _common import REPO, arguments, compress_doc, example, write_json

EXAMPLE = REPO / "examples" / "deit_tiny.yaml"
VARIANTS = ["fp32", "ort-default", "ort-dynamic", "int8", "int8-qattention"]
SPEED_ONLY = {"deit_small": "deit_small_patch16_224", "vit_small": "vit_small_patch16_224"}


def config_for(key: str) -> dict[str, Any]:
    """The example's recipe, for the real DeiT-tiny or a random-init model."""
    doc = example(EXAMPLE)
    doc["passes"] = [step for step in doc["passes"] if step.get("name", step["pass"]) != "fp16"]
    # the same int8 model with each attention block as one QAttention, timed beside it
    doc["passes"].append({"pass": "qattention", "name": "int8-qattention", "input": "int8"})
    doc["benchmark"]["torch"] = False
    if key != "deit_tiny":
        doc["model"] = {"name": SPEED_ONLY[key], "random_init": True}
        doc["data"]["max_eval_images"] = 64
    return doc


def run_model(key: str, output: Path, quiet: bool) -> dict[str, Any]:
    report = compress_doc(config_for(key), output / key, quiet=quiet)
    rows = [row for row in variant_table(report) if row["name"] in VARIANTS]
    random_init = report["weights"] == "random_init"
    for row in rows:
        row["model"] = key
        if random_init:  # no accuracy for random weights: fidelity to their own FP32 only
            row["top1"] = row["top5"] = row["top1_delta_vs_fp32"] = None
    int8_step = next(step for step in report["steps"] if step["name"] == "int8")
    by_name = {v["name"]: v for v in report["variants"]}
    for row in rows:
        for field in ("int8_float_input", "int8_speedup_vs_float_input", "int8_bound_speedup", "int8_efficiency"):
            row[field] = by_name[row["name"]].get(field)
    return {
        "rows": rows,
        "profile": report["profile"],
        "int8_notes": int8_step["notes"],
        "machine": report["machine"],
        "evaluate_images": report["data"]["evaluate_images"],
    }


def headline(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tiny = {row["name"]: row for row in results["deit_tiny"]["rows"]}
    head: dict[str, Any] = {"evaluate_images": results["deit_tiny"]["evaluate_images"]}
    for name, key in (("int8", "int8"), ("ort-default", "ort_default")):
        head[f"{key}_top1_drop"] = round(-tiny[name]["top1_delta_vs_fp32"], 3)
    for name, key in (("int8", "int8"), ("ort-default", "ort_default"), ("ort-dynamic", "ort_dynamic")):
        head[f"{key}_agree_top1"] = round(tiny[name]["agree_top1"], 3)
        head[f"{key}_sqnr_db"] = round(tiny[name]["sqnr_db"], 2)
        head[f"{key}_speedup_vs_fp32"] = round(tiny[name]["speedup_vs_fp32"], 3)
    if "deit_small" in results:
        small = {row["name"]: row for row in results["deit_small"]["rows"]}
        head["deit_small_int8_speedup_vs_fp32"] = round(small["int8"]["speedup_vs_fp32"], 3)
        head["deit_small_ort_dynamic_speedup_vs_fp32"] = round(small["ort-dynamic"]["speedup_vs_fp32"], 3)
    if "vit_small" in results:
        vit = {row["name"]: row for row in results["vit_small"]["rows"]}
        head["vit_small_int8_speedup_vs_fp32"] = round(vit["int8"]["speedup_vs_fp32"], 3)
    head["int8_qattention_speedup_vs_fp32"] = round(tiny["int8-qattention"]["speedup_vs_fp32"], 3)
    head["int8_qattention_agree_top1"] = round(tiny["int8-qattention"]["agree_top1"], 3)
    head["int8_qattention_sqnr_db"] = round(tiny["int8-qattention"]["sqnr_db"], 2)
    if "deit_small" in results:
        head["deit_small_int8_qattention_speedup_vs_fp32"] = round(small["int8-qattention"]["speedup_vs_fp32"], 3)
    head["int8_kept_float_layers"] = len(results["deit_tiny"]["int8_notes"].get("kept_float", []))
    # attention blocks int8 shipped as QAttention (qattention: auto: within the budget and timed faster here)
    for key, prefix in (("deit_tiny", ""), ("deit_small", "deit_small_"), ("vit_small", "vit_small_")):
        if key in results:
            head[f"{prefix}int8_qattention_blocks"] = results[key]["int8_notes"].get("qattention", 0)
    # what this CPU's int8 kernels allow for the model, and how much of it onnxvit's int8 reaches
    machine = results["deit_tiny"]["machine"]
    head["machine_int8_isa"] = machine.get("int8_isa")
    head["machine_int8_gemm_speedup"] = machine.get("int8_gemm_speedup")
    head["fp32_int8_bound_speedup"] = machine.get("int8_bound_speedup")
    # int8's own limit and gain: against the float model its steps started from (fused, reparametrized)
    head["int8_float_input"] = tiny["int8"]["int8_float_input"]
    head["int8_bound_speedup"] = tiny["int8"]["int8_bound_speedup"]
    head["int8_speedup_vs_float_input"] = tiny["int8"]["int8_speedup_vs_float_input"]
    head["int8_efficiency"] = tiny["int8"]["int8_efficiency"]
    head["ort_dynamic_int8_efficiency"] = tiny["ort-dynamic"]["int8_efficiency"]
    return head


def main() -> None:
    args = arguments(
        __doc__,
        "bench-int8",
        models=dict(
            default="deit_tiny,deit_small,vit_small",
            help="comma-separated: deit_tiny (real weights; always run), deit_small, vit_small",
        ),
    ).parse_args()
    keys = ["deit_tiny"] + [k for k in args.models.split(",") if k in SPEED_ONLY]
    results = {key: run_model(key, args.output.resolve(), args.quiet) for key in keys}
    rows = [row for key in keys for row in results[key]["rows"]]
    for key in keys:
        print(f"\n{key}")
        print(markdown_table([row for row in rows if row["model"] == key]))
    head = headline(results)
    print(json.dumps(head, indent=2))
    write_json(
        args.json,
        table=rows,
        headline=head,
        machine=results["deit_tiny"]["machine"],
        int8_notes={key: results[key]["int8_notes"] for key in keys},
        profile={key: results[key]["profile"] for key in keys},
    )


if __name__ == "__main__":
    main()
