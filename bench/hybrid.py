"""Every hybrid family through `onnxvit compress`, in one run (issue 6).

For each example in examples/hybrids/ (random weights, BatchNorm re-estimated on the calibration
images): `fp32`, onnxvit `int8`, `fp16` and `ort-default`, with agreement and SQNR against the
model's own FP32 outputs (never top-1: the weights are random), median latency and size. Each
family's variants are timed together. Ablation (Q-HyViT's Table IV): each row is the example's
`int8` (fold_batchnorm, then dynamic int8 with measured weight schemes and bridge reconstruction)
with one fix taken out: `int8-nofold`, `int8-noschemes` (per-channel symmetric weights for every
layer), `int8-noreconstruct` (bridge blocks not tuned); `int8-bridges-float` keeps the layers on
either side of each conv <-> token bridge in float instead, to show what the bridges cost at most.
`int8-static` is static (calibrated QDQ) int8 after fold_batchnorm and zero_point_guard, with
fixed schemes, and `int8-static-noguard` the same without the guard. Where a fix finds nothing to
change (nothing to fold, no bridge), its row and `int8` are the same model: their latency
difference is the run's noise.
With --json PATH writes the table and the `headline` object: families_total, families_ok,
families_int8_beats_ort_default, families_int8_faster_than_fp32, and ablation_sqnr_gain_db (per
fix, per family: SQNR with the fix minus without it).

    python bench/hybrid.py [--output DIR] [--json PATH] [--families mobilevit_xxs,levit_128s]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnxvit.errors import UserError
from onnxvit.report import variant_table

from _common import REPO, arguments, compress_doc, example, write_json

EXAMPLES = REPO / "examples" / "hybrids"


def ablation(int8: dict[str, Any]) -> list[dict[str, Any]]:
    """The example's int8 step (after fold_batchnorm) with one fix taken out per row."""
    options = int8.get("options", {})

    def row(name: str, source: str, **changes: Any) -> dict[str, Any]:
        return {"pass": "quantize_int8", "name": name, "input": source, "options": {**options, **changes}}

    return [
        row("int8-nofold", "fp32"),
        row("int8-noschemes", "folded", schemes="fixed"),
        row("int8-noreconstruct", "folded", reconstruct_bridges=False),
        row("int8-bridges-float", "folded", bridges="float", reconstruct_bridges=False),
        {"pass": "zero_point_guard", "name": "guarded", "input": "folded", "report": False},
        # static rows test the guard; fixed schemes keep their per-candidate calibration out of the run time
        row("int8-static", "guarded", mode="static", schemes="fixed", reconstruct_bridges=False),
        row("int8-static-noguard", "folded", mode="static", schemes="fixed", reconstruct_bridges=False),
    ]


FIXES = {  # fix: (row with it, row without it)
    "fold_batchnorm": ("int8", "int8-nofold"),
    "weight_schemes": ("int8", "int8-noschemes"),
    "bridge_reconstruction": ("int8", "int8-noreconstruct"),
    "zero_point_guard (static)": ("int8-static", "int8-static-noguard"),
}


def run_family(path: Path, output: Path, with_ablation: bool = True) -> dict[str, Any]:
    doc = example(path)
    if with_ablation:
        doc["passes"] += ablation(next(step for step in doc["passes"] if step["name"] == "int8"))
    try:
        report = compress_doc(doc, output / path.stem, quiet=True)
    except UserError as exc:
        return {"family": path.stem, "ok": False, "error": str(exc)}
    except Exception as exc:  # a family that breaks the pipeline is a result, not the end of the bench
        return {"family": path.stem, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    rows = {row["name"]: row for row in variant_table(report)}
    export = next(s for s in report["steps"] if s["name"] == "fp32")
    return {
        "family": path.stem,
        "ok": True,
        "export_max_abs": export["check"]["max_abs_vs_torch"],
        "rows": {
            name: {k: row[k] for k in ("agree_top1", "sqnr_db", "median_ms", "speedup_vs_fp32", "size_mb")}
            for name, row in rows.items()
        },
    }


def main() -> None:
    args = arguments(
        __doc__,
        "bench-hybrid",
        families=dict(help="comma-separated example names; default: all of examples/hybrids"),
        no_ablation=dict(action="store_true", help="only the examples' own steps"),
    ).parse_args()
    paths = sorted(EXAMPLES.glob("*.yaml"))
    if args.families:
        paths = [p for p in paths if p.stem in args.families.split(",")]
    results = []
    for path in paths:
        results.append(run_family(path, args.output.resolve(), not args.no_ablation))
        print(json.dumps(results[-1]), flush=True)
    print(
        "\n| family | export max abs | variant | agree % | SQNR dB | median ms | speed-up | size MB |\n|" + "---|" * 8
    )
    for r in results:
        if not r["ok"]:
            print(f"| {r['family']} | FAILED: {r['error']} |||||||")
            continue
        for name, row in r["rows"].items():
            print(
                f"| {r['family']} | {r['export_max_abs']:.1e} | {name} | {row['agree_top1']:.1f} | "
                f"{row['sqnr_db']:.1f} | {row['median_ms']:.2f} | {row['speedup_vs_fp32']:.2f} | {row['size_mb']:.2f} |"
            )
    ok = [r for r in results if r["ok"]]
    head = {
        "families_total": len(results),
        "families_ok": len(ok),
        "families_int8_beats_ort_default": int(
            sum(r["rows"]["int8"]["sqnr_db"] > r["rows"]["ort-default"]["sqnr_db"] for r in ok)
        ),
        "families_int8_faster_than_fp32": int(sum(r["rows"]["int8"]["speedup_vs_fp32"] > 1 for r in ok)),
        "export_max_abs_worst": max((r["export_max_abs"] for r in ok), default=None),
        "ablation_sqnr_gain_db": {
            fix: {
                r["family"]: round(r["rows"][with_]["sqnr_db"] - r["rows"][without]["sqnr_db"], 2)
                for r in ok
                if without in r["rows"]
            }
            for fix, (with_, without) in FIXES.items()
        },
    }
    print(json.dumps(head, indent=2))
    write_json(args.json, results=results, headline=head)


if __name__ == "__main__":
    main()
