"""Mixed precision per block on the real DeiT-tiny (issue 7): the searched front, evaluated.

Runs examples/deit_tiny_mixed.yaml's steps (fuse_vit -> reparam_layernorm -> mixed_precision). The
search chooses on the *search* split only; this bench then rebuilds every point it measured (the
uniform float / int8 / w4 references and the searched assignments), evaluates each on the whole
*evaluation* split, and times them all with the fp32 export, interleaved, in one run. PoMQ-ViT's own
DeiT-tiny trade-off, relative to its uniform 8-bit model (-1.17 top-1 points, 0.73x time, 0.91x
size; fake-quantized on a GPU), is placed on the plot relative to our uniform int8.
Prints the table; with --json PATH writes it with the `headline` object of issue 7.

    python bench/mixed_precision.py [--output DIR] [--json PATH] [--force]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnxvit.config import EXPORT_VARIANT
from onnxvit.report import save_figure
from onnxvit.stages import benchmark, evaluate, export, passes
from onnxvit.stages.evaluate import score
from onnxvit.stages.load import Run
from passes.mixed_precision import MixedPrecisionPass

from _common import REPO, arguments, open_run, print_table, write_json

EXAMPLE = REPO / "examples" / "deit_tiny_mixed.yaml"
STEP = "mixed"
POMQ = {"top1_delta": -1.17, "time_ratio": 0.73, "size_ratio": 0.91}  # DeiT-tiny vs its own 8-bit model
WITHIN = 1.0  # top-1 points below uniform int8


def run_search(output: Path, force: bool, quiet: bool) -> tuple[Run, dict[str, Any], dict[str, Any]]:
    run = open_run(EXAMPLE, output, force=force, quiet=quiet)
    fp32, record = export.export(run, run.dense_model, run.weights_id, EXPORT_VARIANT)
    models, records = passes.apply(run, fp32, record)
    step = next(r for r in records if r.name == STEP)
    steps = run.config.passes
    index = [s.output for s in steps].index(STEP)
    source = steps[index].input or steps[index - 1].output
    return run, {"fp32": fp32, "source": models[source], "config": run.pass_configs[index]}, step.to_json()


def main() -> None:
    args = arguments(
        __doc__, "bench-mixed", force=dict(action="store_true", help="redo the search (its time is a headline field)")
    )
    args = args.parse_args()
    run, models, step = run_search(args.output.resolve(), args.force, args.quiet)
    notes = step["notes"]
    labels = run.dataset.labels("evaluate")
    builder = MixedPrecisionPass(models["config"])
    built = {"fp32": models["fp32"]}
    built.update({p["name"]: builder.apply(models["source"], p["assignment"]) for p in notes["points"]})
    counts: dict[str, int] = {}
    variants = [
        passes.write_variant(
            run, name, model, counts, file_name="fp32.onnx" if name == "fp32" else f"point-{name}.onnx"
        )
        for name, model in built.items()
    ]
    logits = {v.name: evaluate.logits(run, v)[0] for v in variants}
    timed = benchmark.latency(run, variants)

    fp32_scores = score(logits["fp32"], labels, logits["fp32"])
    by_name = {p["name"]: p for p in notes["points"]}
    int8 = "uniform-int8"
    int8_top1 = score(logits[int8], labels, logits["fp32"])["top1"]
    rows = []
    for variant in variants:
        name = variant.name
        s = score(logits[name], labels, logits["fp32"])
        point = by_name.get(name, {})
        rows.append(
            {
                "name": name,
                "code": point.get("code", "fp32"),
                "reference": point.get("reference", True),
                "on_front": point.get("on_front", False),
                "chosen": name == notes["chosen"],
                "search_sqnr_db": point.get("sqnr_db"),
                "top1": s["top1"],
                "top5": s["top5"],
                "top1_vs_fp32": round(s["top1"] - fp32_scores["top1"], 3),
                "top1_vs_int8": round(s["top1"] - int8_top1, 3),
                "agree_top1": s["agree_top1"],
                "sqnr_db": s["sqnr_db"],
                "median_ms": timed[name]["median"],
                "p90_ms": timed[name]["p90"],
                "size_bytes": variant.size_bytes,
            }
        )
    int8_row = next(r for r in rows if r["name"] == int8)
    for r in rows:
        r["speedup_vs_int8"] = round(int8_row["median_ms"] / r["median_ms"], 4)
        r["size_vs_int8"] = round(r["size_bytes"] / int8_row["size_bytes"], 4)

    front = [r for r in rows if r["on_front"]]
    within = [r for r in front if r["name"] != int8 and r["top1_vs_int8"] >= -WITHIN]
    head = {
        "front_size": len(front),
        "front_includes_uniform_int8": int8_row["on_front"],
        "best_speedup_vs_int8_within_1pt": max((r["speedup_vs_int8"] for r in within), default=None),
        "best_size_ratio_vs_int8_within_1pt": min((r["size_vs_int8"] for r in within), default=None),
        "search_minutes": round(notes["search_seconds"] / 60, 2),
        "search_cached": step["cached"],
        "evaluate_images": len(labels),
        "fp32_top1": fp32_scores["top1"],
        "int8_top1": int8_top1,
        "chosen": notes["chosen"],
        "pomq_vit_relative_to_8bit": POMQ,
    }
    smaller = [r for r in within if r["size_vs_int8"] < 1.0]
    if smaller:
        best = min(smaller, key=lambda r: r["size_vs_int8"])
        head["smallest_within_1pt"] = {k: best[k] for k in ("name", "top1_vs_int8", "speedup_vs_int8", "size_vs_int8")}

    print_table(
        sorted(rows, key=lambda r: r["median_ms"]),
        [
            "name",
            "on_front",
            "chosen",
            "search_sqnr_db",
            "top1",
            "top1_vs_int8",
            "agree_top1",
            "sqnr_db",
            "median_ms",
            "speedup_vs_int8",
            "size_vs_int8",
        ],
    )
    print(json.dumps(head, indent=2))
    plot_path = run.config.output.dir / "mixed_precision.png"
    plot(rows, int8_row, plot_path)
    print(f"plot: {plot_path}")
    write_json(
        args.json,
        table=rows,
        headline=head,
        plot=str(plot_path),
        search_notes={k: v for k, v in notes.items() if k != "points"},
    )


def plot(rows: list[dict[str, Any]], int8: dict[str, Any], path: Path) -> None:
    """Top-1 on the evaluation split against latency, marker area ~ size; PoMQ-ViT's point placed
    relative to our uniform int8 as its paper places it relative to its 8-bit model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        color = "tab:red" if r["chosen"] else ("tab:blue" if r["on_front"] else "tab:gray")
        ax.scatter([r["median_ms"]], [r["top1"]], s=r["size_bytes"] / 5e4, color=color, alpha=0.6)
        label = r["name"] if r["reference"] else r["code"]
        ax.annotate(label, (r["median_ms"], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=6)
    x, y = int8["median_ms"] * POMQ["time_ratio"], int8["top1"] + POMQ["top1_delta"]
    ax.scatter([x], [y], marker="*", s=int8["size_bytes"] * POMQ["size_ratio"] / 5e4, color="tab:green", alpha=0.7)
    ax.annotate(
        "PoMQ-ViT's trade-off\n(relative to its 8-bit)",
        (x, y),
        textcoords="offset points",
        xytext=(4, -18),
        fontsize=7,
        color="tab:green",
    )
    ax.axhline(int8["top1"] - WITHIN, ls="--", lw=0.8, color="grey")
    ax.set_xlabel("median latency, ms (batch 1, 2 threads, ONNX Runtime CPU)")
    ax.set_ylabel("top-1, % (evaluation split)")
    ax.set_title("DeiT-tiny mixed precision: blue on the search front, red chosen; area ~ size", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
