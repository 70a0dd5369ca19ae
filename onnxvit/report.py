"""The only writer of report.json, report.md and the plot. The JSON schema only grows."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from onnxvit.errors import UserError
from onnxvit.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_latency.png"
TABLED = {"mixed_precision": {"points", "sensitivity"},  # step notes their kind's own section shows as tables
          "quantize_int8": {"schemes", "bridge_reconstruction"}}


def front_plot_name(step: str) -> str:
    return f"pareto_{step}.png"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch

    return {"cpu": cpu_name(), "threads": threads, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def variant_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant with its ratios to the reference (``fp32``, or ``dense-fp32`` when pruning)."""
    reference = report.get("reference", "fp32")
    base = next((v for v in report["variants"] if v["name"] == reference), None)
    rows = []
    for v in report["variants"]:
        row = {"name": v["name"], "runtime": v["runtime"], "top1": v["top1"], "top5": v["top5"],
               "agree_top1": v["agree_top1"], "sqnr_db": v["sqnr_db"],
               "median_ms": v["latency_ms"]["median"], "p90_ms": v["latency_ms"]["p90"],
               "size_mb": v["size_bytes"] / 1e6,
               "params_m": v["params"] / 1e6 if "params" in v else None,
               "gmacs": v["macs"] / 1e9 if "macs" in v else None}
        if base is not None:
            row["speedup_vs_fp32"] = base["latency_ms"]["median"] / v["latency_ms"]["median"]
            row["size_vs_fp32"] = v["size_bytes"] / base["size_bytes"]
            row["top1_delta_vs_fp32"] = v["top1"] - base["top1"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = [("name", "variant"), ("runtime", "runtime"), ("top1", "top-1 %"), ("top5", "top-5 %"),
               ("top1_delta_vs_fp32", "Δ top-1"), ("agree_top1", "agree %"), ("sqnr_db", "SQNR dB"),
               ("median_ms", "median ms"), ("p90_ms", "p90 ms"), ("speedup_vs_fp32", "speed-up"),
               ("size_mb", "size MB"), ("size_vs_fp32", "size ratio"), ("params_m", "params M"), ("gmacs", "GMACs")]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    data = report.get("data", {})
    parts = [
        f"# onnxvit report: {report['model']}",
        "",
        f"onnxvit {report['onnxvit_version']}, {machine['cpu']}, {machine['threads']} threads, "
        f"ONNX Runtime {machine['onnxruntime']}, torch {machine['torch']}.",
        f"Accuracy on the evaluation split ({data.get('evaluate_images', '?')} images of {data.get('root', '?')}); "
        f"agreement, SQNR and ratios against the `{report.get('reference', 'fp32')}` ONNX model. "
        f"Latency: batch {report.get('batch_size', 1)}, median of timed runs after warm-up.",
    ]
    prune = report.get("prune")
    if prune:
        kinds = ", ".join(f"{k} {v:.1%}" for k, v in prune["kind_ratios"].items() if v > 0)
        parts.append(
            f"\n**Pruned** with {prune['method']} importance ({kinds}; loss on {prune['loss']}, "
            f"{prune['gradient_images']} calibration images): {prune['removed']['params']:.1%} of parameters and "
            f"{prune['removed']['macs']:.1%} of MACs removed. Per block: heads {prune['widths']['heads']}, "
            f"head dim {prune['widths']['head_dim']}, MLP width {prune['widths']['mlp_hidden']}. "
            f"Checkpoint: `{prune['checkpoint']}` (rebuild with `onnxvit.prune.load_pruned`).")
        tuned = prune.get("finetune")
        parts.append(f"Fine-tuned by distillation from the dense model: {tuned['epochs']} epochs on {tuned['source']}, "
                     f"loss {tuned['losses'][0]:.3f} -> {tuned['losses'][-1]:.3f}." if tuned else
                     "No fine-tuning.")
    if report.get("weights") == "random_init":
        parts.append("\n**Random weights**: top-1 / top-5 mean nothing here; judge agreement and SQNR.")
    parts += ["", markdown_table(variant_table(report))]
    parts += _precision_section(report) + _parity_section(report) + _mobile_section(report)
    parts += ["", "## Steps", "",
              "| step | pass | input | cached | seconds | check vs input |", "|---|---|---|---|---|---|"]
    for step in report.get("steps", []):
        check = step.get("check", {})
        text = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in check.items())
        parts.append(f"| {step['name']} | {step['kind']} | {step['input'] or '-'} | {step['cached']} | "
                     f"{step['seconds']:.1f} | {text} |")
    parts += _mixed_precision_sections(report) + _weight_scheme_sections(report)
    notes = [f"- `{s['name']}`: {json.dumps(_untabled(s))}" for s in report.get("steps", []) if s.get("notes")]
    if notes:
        parts += ["", "## What each step did", "", *notes]
    parts += ["", f"![top-1 against latency]({PLOT_PNG})", ""]
    return "\n".join(parts)


def _untabled(step: dict[str, Any]) -> dict[str, Any]:
    """A step's notes less what its own section shows as tables."""
    return {k: v for k, v in step["notes"].items() if k not in TABLED.get(step["kind"], set())}


def _weight_scheme_sections(report: dict[str, Any]) -> list[str]:
    """Per int8 step, the layers whose measured weight scheme or bridge clipping differs from the default."""
    lines = []
    for step in report.get("steps", []):
        schemes, bridges = step.get("notes", {}).get("schemes"), step.get("notes", {}).get("bridge_reconstruction")
        if not schemes and not bridges:
            continue
        lines += ["", f"## Weight schemes: `{step['name']}`", ""]
        if schemes:
            changed = {layer: e for layer, e in schemes.items() if "sqnr_db" in e and e["chosen"] != e["default"]}
            lines += [f"{len(changed)} of {len(schemes)} layers measured better (output SQNR on the calibration "
                      "images, ONNX Runtime's kernels) with another scheme than the default:", "",
                      "| layer | chosen | SQNR default dB | SQNR chosen dB |", "|---|---|---|---|"]
            lines += [f"| {layer} | {e['chosen']} | {e['sqnr_db'][e['default']]:.2f} | "
                      f"{e['sqnr_db'][e['chosen']]:.2f} |" for layer, e in changed.items()]
        if bridges:
            lines += ["", "Bridge blocks (conv <-> tokens), weight clipping tuned to the block's output:", "",
                      "| layer | bridge | clip | block SQNR before dB | after dB |", "|---|---|---|---|---|"]
            lines += [f"| {layer} | {e['bridge']} | {e.get('clip', '-')} | "
                      f"{e['block_sqnr_db']['before']:.2f} | {e['block_sqnr_db']['after']:.2f} |"
                      if "block_sqnr_db" in e else f"| {layer} | {e['bridge']} | {e['why']} | | |"
                      for layer, e in bridges.items()]
    return lines


def _precision_section(report: dict[str, Any]) -> list[str]:
    """Which heavy ops each ONNX variant still computes in float: why an int8 model is or is not faster."""
    rows = [v for v in report["variants"] if v.get("compute_ops") and v["compute_ops"]["integer"]]
    if not rows:
        return []

    def ops(counts: dict[str, int]) -> str:
        return ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "-"

    lines = ["", "## Precision of the heavy ops", "", "| variant | integer | float |", "|---|---|---|"]
    lines += [f"| {v['name']} | {ops(v['compute_ops']['integer'])} | {ops(v['compute_ops']['float'])} |" for v in rows]
    return lines


def _parity_section(report: dict[str, Any]) -> list[str]:
    rows = report.get("parity") or []
    notes = report.get("lite") or {}
    if not rows and not notes:
        return []
    lines = ["", "## Parity: ONNX Runtime vs PyTorch Lite", "",
             "| ONNX variant | PyTorch variant | kind | max abs | agree % | SQNR dB | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['onnx']} | {r['torch']} | {r['kind']} | {r['max_abs']:.3g} | {r['agree_top1']:.2f} | "
                     f"{_fmt(r['sqnr_db'])} | {'ok' if r['ok'] else '**FLAGGED**'} |")
    lines += [f"\n`{n}`: {v['error']}" for n, v in notes.items() if "error" in v]
    skipped = {n for n, v in notes.items() if "error" not in v and v.get("optimize_for_mobile") is not True}
    if skipped:
        lines.append(f"\n`optimize_for_mobile` skipped for {', '.join(sorted(skipped))}: this torch build has no XNNPACK.")
    return lines


def _mobile_section(report: dict[str, Any]) -> list[str]:
    mobile = report.get("mobile")
    if not mobile:
        return []
    lines = ["", f"## ONNX Runtime Mobile ({mobile['target_platform']}, optimization {mobile['optimization']})", "",
             "| variant | .ort file | size MB | max abs vs .onnx | same top-1 | |", "|---|---|---|---|---|---|"]
    for a in mobile["artifacts"]:
        if a.get("error"):
            lines.append(f"| {a['variant']} | - | - | - | - | {a['error']} |")
            continue
        lines.append(f"| {a['variant']} | {a['path']} | {a['size_bytes'] / 1e6:.2f} | {a['max_abs_vs_onnx']:.3g} | "
                     f"{a['argmax_equal']} | {'ok' if a['ok'] else '**FLAGGED**'} |")
    if mobile.get("operators_config"):
        lines.append(f"\nReduced-build operator config: `{mobile['operators_config']}` "
                     f"({len(mobile['operators'])} lines).")
    return lines


def mixed_precision_steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in report.get("steps", []) if s["kind"] == "mixed_precision" and s.get("notes", {}).get("points")]


def _mixed_precision_sections(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for step in mixed_precision_steps(report):
        notes = step["notes"]
        lines += ["", f"## Mixed precision: `{step['name']}`", "",
                  f"One character per block ({_block_span(notes['blocks'])}): F float, 8 int8, 4 w4, W w8, "
                  f"A a16w8; other linear layers: {notes['points'][0]['rest']}. Measured on the search split "
                  f"against the float input; {notes['explored']} assignments scored by the per-block model, "
                  f"{len(notes['points'])} built and timed together. "
                  f"Chosen: `{notes['chosen']}` ({notes['select']}).", "",
                  "| assignment | front | top-1 % (search) | agree % | SQNR dB | median ms | x float | size MB | "
                  "x int8 | constraints |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(notes["points"], key=lambda p: p["latency_ms"]):
            mark = "**chosen**" if p["name"] == notes["chosen"] else ("yes" if p["on_front"] else "")
            label = p["name"] if p["reference"] else f"`{p['code']}`"
            lines.append(f"| {label} | {mark} | {_fmt(p['top1'])} | {p['agreement']:.1f} | {p['sqnr_db']:.2f} | "
                         f"{p['latency_ms']:.2f} | {p['latency_vs_float']:.2f} | {p['size_bytes'] / 1e6:.2f} | "
                         f"{p['size_vs_int8']:.2f} | {'; '.join(p['violates']) or 'ok'} |")
        lines += ["", f"![Pareto front of {step['name']}]({front_plot_name(step['name'])})"]
    return lines


def _block_span(blocks: dict[str, int]) -> str:
    names = [b for b in blocks if b != "rest"]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"


def render_front_plot(step: dict[str, Any], path: Path) -> None:
    """A mixed-precision step's measured points, logit SQNR (the search objective; 31 images' top-1
    moves in 3-point steps) against latency and against size: the two faces of a 3-D front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes = step["notes"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120, sharey=True)
    for ax, key, label, scale in ((axes[0], "latency_ms", "median latency, ms", 1.0),
                                  (axes[1], "size_bytes", "size, MB", 1e-6)):
        for p in notes["points"]:
            color = "tab:red" if p["name"] == notes["chosen"] else ("tab:blue" if p["on_front"] else "tab:gray")
            x = p[key] * scale
            ax.scatter([x], [p["sqnr_db"]], s=40, color=color, alpha=0.7, marker="s" if p["reference"] else "o")
            ax.annotate(p["name"] if p["reference"] else p["code"], (x, p["sqnr_db"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("logit SQNR vs float, dB (search split)")
    fig.suptitle(f"{step['name']}: blue on the front, red chosen, squares uniform", fontsize=9)
    save_figure(fig, path)


def render_plot(report: dict[str, Any], path: Path) -> None:
    """Top-1 (or agreement, for random weights) against median latency, one point per variant."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "agree_top1" if report.get("weights") == "random_init" else "top1"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for v in report["variants"]:
        x, y = v["latency_ms"]["median"], v[metric]
        ax.scatter([x], [y], s=30 + v["size_bytes"] / 2e5, alpha=0.7)
        ax.annotate(v["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"median latency, ms (batch {report.get('batch_size', 1)}, "
                  f"{report['machine']['threads']} threads)")
    ax.set_ylabel("top-1 agreement with fp32, %" if metric == "agree_top1" else "top-1, % (evaluation split)")
    ax.set_title(f"{report['model']}: accuracy vs latency (marker area ~ size)", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(report: dict[str, Any], folder: Path) -> None:
    report = {"schema_version": SCHEMA_VERSION, **report}
    render_plot(report, folder / PLOT_PNG)
    for step in mixed_precision_steps(report):
        render_front_plot(step, folder / front_plot_name(step["name"]))
    atomic_write_text(folder / REPORT_MD, render_markdown(report))
    atomic_write_json(folder / REPORT_JSON, report)


def read_report(folder: Path) -> dict[str, Any]:
    path = folder / REPORT_JSON if folder.is_dir() else folder
    if not path.is_file():
        raise UserError(f"{path}: no report.json here; run `onnxvit compress CONFIG` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
