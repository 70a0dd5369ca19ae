"""ONNX Runtime against the PyTorch Lite interpreter on the real DeiT-tiny, in one run (issue 8).

Runs `onnxvit compress examples/deit_tiny_mobile.yaml`: the FP32 ONNX model and onnxvit's int8
on ONNX Runtime, their `.ort` twins, and the Lite interpreter in FP32 and with PyTorch's dynamic
int8 on each quantized engine, all evaluated on the whole evaluation split and timed together.
Prints one table (runtime, precision, engine, median / p90 latency, size, top-1, agreement); the
plot is the report's accuracy_vs_latency.png. With --json PATH writes the table and issue 8's
`headline` object.

    python bench/ort_vs_lite.py [--output DIR] [--json PATH]
"""

from __future__ import annotations

import json
from typing import Any

from onnxvit.report import PLOT_PNG, variant_table

from _common import REPO, arguments, compress_doc, example, print_table, write_json

EXAMPLE = REPO / "examples" / "deit_tiny_mobile.yaml"


def precision(variant: dict[str, Any]) -> str:
    """int8 when the variant computes its heavy ops in integer (ONNX: its graph; Lite: its quantized
    engine), whatever its name says."""
    if variant["runtime"] == "torch-lite":
        return "int8" if variant["name"].startswith("lite-int8") else "fp32"
    return "int8" if variant.get("compute_ops", {}).get("integer") else "fp32"


def rows_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    by_name = {v["name"]: v for v in report["variants"]}
    rows = []
    for row in variant_table(report):
        name = row["name"]
        lite = row["runtime"] == "torch-lite"
        rows.append(
            {
                "name": name,
                "runtime": "pytorch-lite" if lite else row["runtime"],
                "precision": precision(by_name[name]),
                "engine": name.removeprefix("lite-int8-") if lite and "int8" in name else "-",
                "median_ms": row["median_ms"],
                "p90_ms": row["p90_ms"],
                "size_mb": round(row["size_mb"], 3),
                "top1": row["top1"],
                "agree_top1": row["agree_top1"],
                "sqnr_db": row["sqnr_db"],
            }
        )
    return rows


def verdict(ort: dict[str, Any], lite: dict[str, Any]) -> str:
    """One honest sentence: who is faster, by how much, at what fidelity."""
    speedup = lite["median_ms"] / ort["median_ms"]
    faster = "ONNX Runtime" if speedup >= 1 else "the Lite interpreter"
    return (
        f"{faster} int8 is faster: {ort['name']} {ort['median_ms']:.2f} ms ({ort['agree_top1']:.1f}% agreement "
        f"with FP32) against {lite['name']} {lite['median_ms']:.2f} ms ({lite['agree_top1']:.1f}%), "
        f"{max(speedup, 1 / speedup):.2f}x" + ("; below the 1.5x target" if speedup < 1.5 else "")
    )


def headline(report: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    ort_int8 = [r for r in rows if r["runtime"] == "onnxruntime" and r["precision"] == "int8"]
    lite_int8 = [r for r in rows if r["runtime"] == "pytorch-lite" and r["precision"] == "int8"]
    best_ort = min(ort_int8, key=lambda r: r["median_ms"])
    best_lite = min(lite_int8, key=lambda r: r["median_ms"])
    artifacts = report["mobile"]["artifacts"]
    fp32_ort = next(a for a in artifacts if a["variant"] == "fp32")
    lite = example(EXAMPLE)["lite"]
    expected_lite = int(lite.get("fp32", True)) + len(lite["int8_engines"])  # every Lite variant asked for was built
    return {
        "ort_int8_vs_lite_int8_speedup": round(best_lite["median_ms"] / best_ort["median_ms"], 3),
        "ort_int8": best_ort["name"],
        "lite_int8": f"{best_lite['name']}",
        "ort_int8_agree_top1": best_ort["agree_top1"],
        "lite_int8_agree_top1": best_lite["agree_top1"],
        "ort_int8_at_equal_or_better_agreement": best_ort["agree_top1"] >= best_lite["agree_top1"],
        "verdict": verdict(best_ort, best_lite),
        "ort_format_max_abs_diff_fp32": fp32_ort.get("max_abs_vs_onnx"),
        # every .ort made, reloaded and equal to its .onnx; every Lite model built and FP32-equal to ONNX
        "artifacts_ok": all(a.get("ok") for a in artifacts)
        and bool(report["mobile"]["operators"])
        and expected_lite == len([r for r in rows if r["runtime"] == "pytorch-lite"])
        and all(p["ok"] for p in report["parity"] if p["kind"] == "fp32"),
        "int8_parity_flagged": [p["torch"] for p in report["parity"] if p["kind"] == "int8" and not p["ok"]],
        "parity": report["parity"],
    }


def main() -> None:
    args = arguments(__doc__, "bench-ort-vs-lite").parse_args()
    report = compress_doc(example(EXAMPLE), args.output.resolve(), quiet=args.quiet)
    rows = rows_of(report)
    print_table(
        rows,
        ["name", "runtime", "precision", "engine", "median_ms", "p90_ms", "size_mb", "top1", "agree_top1", "sqnr_db"],
    )
    head = headline(report, rows)
    print(json.dumps(head, indent=2))
    print(f"plot: {args.output.resolve() / PLOT_PNG}")
    write_json(
        args.json,
        table=rows,
        headline=head,
        mobile=report["mobile"],
        machine=report["machine"],
        plot=str(args.output.resolve() / PLOT_PNG),
    )


if __name__ == "__main__":
    main()
