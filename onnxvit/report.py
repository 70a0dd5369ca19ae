"""The only writer of report.json, report.md and the plot. The JSON schema only grows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from onnxvit.errors import UserError
from onnxvit.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, numpy_scalar
from passes import PASS_MODULES, Pass, get_pass

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_latency.png"
PROFILE_PNG = "profile.png"
NO_INT8_GAIN = 1.05  # an int8 bound below this: int8 is a size lever on this CPU, not a speed one


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
        row = {
            "name": v["name"],
            "runtime": v["runtime"],
            "top1": v["top1"],
            "top5": v["top5"],
            "agree_top1": v["agree_top1"],
            "sqnr_db": v["sqnr_db"],
            "median_ms": v["latency_ms"]["median"],
            "p90_ms": v["latency_ms"]["p90"],
            "size_mb": v["size_bytes"] / 1e6,
            "params_m": v["params"] / 1e6 if "params" in v else None,
            "gmacs": v["macs"] / 1e9 if "macs" in v else None,
        }
        if base is not None:
            row["speedup_vs_fp32"] = base["latency_ms"]["median"] / v["latency_ms"]["median"]
            row["size_vs_fp32"] = v["size_bytes"] / base["size_bytes"]
            row["top1_delta_vs_fp32"] = v["top1"] - base["top1"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("name", "variant"),
        ("runtime", "runtime"),
        ("top1", "top-1 %"),
        ("top5", "top-5 %"),
        ("top1_delta_vs_fp32", "Δ top-1"),
        ("agree_top1", "agree %"),
        ("sqnr_db", "SQNR dB"),
        ("median_ms", "median ms"),
        ("p90_ms", "p90 ms"),
        ("speedup_vs_fp32", "speed-up"),
        ("size_mb", "size MB"),
        ("size_vs_fp32", "size ratio"),
        ("params_m", "params M"),
        ("gmacs", "GMACs"),
    ]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
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
        _scoring_batches(report),
        _executor_line(report.get("executor")),
    ]
    prune = report.get("prune")
    if prune:
        kinds = ", ".join(f"{k} {v:.1%}" for k, v in prune["kind_ratios"].items() if v > 0)
        parts.append(
            f"\n**Pruned** with {prune['method']} importance ({kinds}; loss on {prune['loss']}, "
            f"{prune['gradient_images']} calibration images): {prune['removed']['params']:.1%} of parameters and "
            f"{prune['removed']['macs']:.1%} of MACs removed. Per block: heads {prune['widths']['heads']}, "
            f"head dim {prune['widths']['head_dim']}, MLP width {prune['widths']['mlp_hidden']}. "
            f"Checkpoint: `{prune['checkpoint']}` (rebuild with `onnxvit.prune.load_pruned`)."
        )
        tuned = prune.get("finetune")
        parts.append(
            f"Fine-tuned by distillation from the dense model: {tuned['epochs']} epochs on {tuned['source']}, "
            f"loss {tuned['losses'][0]:.3f} -> {tuned['losses'][-1]:.3f}."
            if tuned
            else "No fine-tuning."
        )
    parts += _tokens_section(report.get("tokens"))
    if report.get("weights") == "random_init":
        parts.append("\n**Random weights**: top-1 / top-5 mean nothing here; judge agreement and SQNR.")
    parts += ["", markdown_table(variant_table(report))]
    parts += _precision_section(report) + _profile_section(report) + _parity_section(report) + _mobile_section(report)
    parts += [
        "",
        "## Steps",
        "",
        "| step | pass | input | cached | seconds | check vs input |",
        "|---|---|---|---|---|---|",
    ]
    for step in report.get("steps", []):
        check = step.get("check", {})
        text = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in check.items())
        parts.append(
            f"| {step['name']} | {step['kind']} | {step['input'] or '-'} | {step['cached']} | "
            f"{step['seconds']:.1f} | {text} |"
        )
    for step in report.get("steps", []):
        parts += _pass_of(step).report_section(step)
    notes = [
        f"- `{s['name']}`: {json.dumps(_untabled(s), default=numpy_scalar)}"
        for s in report.get("steps", [])
        if s.get("notes")
    ]
    if notes:
        parts += ["", "## What each step did", "", *notes]
    parts += ["", f"![top-1 against latency]({PLOT_PNG})", ""]
    return "\n".join(parts)


def _pass_of(step: dict[str, Any]) -> type[Pass]:
    """The pass that made a step (the export, which no pass makes, renders as the base class)."""
    return get_pass(step["kind"]) if step["kind"] in PASS_MODULES else Pass


def _untabled(step: dict[str, Any]) -> dict[str, Any]:
    """A step's notes less what its pass's own section shows as tables."""
    return {k: v for k, v in step["notes"].items() if k not in _pass_of(step).tabled_notes}


def _scoring_batches(report: dict[str, Any]) -> str:
    """Which batch each variant's figures were measured at (the deploy batch unless logits are identical)."""
    deploy = report.get("batch_size", 1)
    other = {v["name"]: v["eval_batch_size"] for v in report["variants"] if v.get("eval_batch_size", deploy) != deploy}
    line = f"Every figure is measured at batch {deploy}, as the model runs in the app"
    if other:
        line += "; " + ", ".join(f"`{n}` at batch {b}" for n, b in other.items()) + " (its logits are identical there)"
    onednn = [v["name"] for v in report["variants"] if v.get("scoring_kernel", "default") != "default"]
    if onednn:  # the same float32 products, faster on CPUs where MKL's GEMM takes a generic path
        names = ", ".join(f"`{n}`" for n in onednn)
        line += (
            f". {names}: figures computed with its linear layers on oneDNN (the same float32 products, "
            "faster than MKL's GEMM on some CPUs), latency timed as PyTorch runs it"
        )
    return line + "."


def _executor_line(executor: dict[str, Any] | None) -> str:
    """Where evaluations and searches ran (latency is always timed in the driver)."""
    if not executor or executor.get("kind") != "ray":
        return "Evaluations and searches ran in this process; latency was timed here."
    if executor.get("started") is False:
        return "Executor: Ray, never started (every result came from the cache); latency was timed here."
    where = executor.get("address") or "a local cluster"
    return (
        f"Evaluations and searches ran as Ray tasks on {where} ({executor['workers']} workers of "
        f"{executor['threads_per_worker']} thread(s) each, {executor['cluster_cpus']} CPUs); latency was timed in "
        "this process with no task running."
    )


def _tokens_section(tokens: dict[str, Any] | None) -> list[str]:
    """Token merging: the schedule, the tokens entering each block and, when searched, the search table."""
    if not tokens:
        return []
    last = tokens.get("queries_last_block")
    parts = [
        f"\n**Token merging** ({tokens['method']}, proportional attention "
        f"{'on' if tokens['proportional_attention'] else 'off'}): tokens merged per block {tokens['schedule']}; "
        f"tokens entering each block {tokens['tokens_per_block']}"
        + (f"; the last block computes only the first {last} token(s)." if last else ".")
    ]
    search = tokens.get("search")
    if search:
        parts += [
            "",
            f"Schedule search (fidelity against the unmerged model on {search['images']} search images; "
            f"latency of each candidate fused, all timed together): chose `{search['chosen']}`.",
            "",
            "| candidate | tokens merged | SQNR dB | agree % | within budget | median ms | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in search["rows"]:
            parts.append(
                f"| {row['candidate']} | {row['tokens_merged']} | {row['sqnr_db']:.2f} | {row['agree_top1']:.1f} | "
                f"{'yes' if row['within_budget'] else 'no'} | {row['latency_ms']:.2f} | {row['speedup']:.2f} |"
            )
    return parts


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


def _profile_section(report: dict[str, Any]) -> list[str]:
    """Where each ONNX variant's time goes, and how close its int8 is to what this CPU allows."""
    profiled = report.get("profile")
    if not profiled:
        return []
    machine, profiles = report["machine"], profiled["profiles"]
    isa = ", ".join(machine.get("int8_isa") or []) or "none of AVX2, AVX-512, VNNI, AMX, dot-product"
    speedup = machine.get("int8_gemm_speedup")
    lines = [
        "",
        "## Where the time goes",
        "",
        f"This CPU's int8 instruction sets: {isa}. ONNX Runtime's dynamic int8 GEMM runs "
        f"{_fmt(speedup)}x its float GEMM at this model's linear-layer shapes (measured alone, in this run).",
    ]
    latency = {**profiled.get("latency_ms", {}), **{v["name"]: v["latency_ms"]["median"] for v in report["variants"]}}
    reported = {v["name"] for v in report["variants"]}
    bound, reference = machine.get("int8_bound_speedup"), profiled["reference"]
    if bound is not None and bound < NO_INT8_GAIN:
        fastest = min(latency, key=latency.__getitem__)
        where = (
            f"`{fastest}`"
            if fastest in reported
            else f"`{fastest}`, a step the config does not report (set `report: true` on it to get its file)"
        )
        lines.append(
            f"Here int8 linear layers can make `{reference}` at most {bound:.2f}x faster: on this CPU int8 is a "
            f"size lever, not a speed one. The fastest model measured is {where}."
        )
    elif bound is not None:
        lines.append(
            f"That allows int8 linear layers to make `{reference}` at most {bound:.2f}x faster (its other ops "
            "as profiled)."
        )
    for v in report["variants"]:
        if "int8_efficiency" in v:
            source = v.get("int8_float_input", reference)
            lines.append(
                f"- `{v['name']}` reached {v['int8_efficiency']:.0%} of what this CPU's int8 kernels allow for "
                f"its float input `{source}`: {latency[source] / latency[v['name']]:.2f}x `{source}`, where int8 "
                f"linear layers could give at most {v['int8_bound_speedup']:.2f}x"
                + ("" if source == reference else f" ({latency[reference] / latency[v['name']]:.2f}x `{reference}`)")
                + "."
                + (
                    f" It went past that bound: its graph also runs other ops faster than `{source}`'s (ONNX "
                    "Runtime fuses it differently), which the bound leaves as profiled."
                    if v["int8_efficiency"] > 1
                    else ""
                )
            )
    categories = list(dict.fromkeys(c for p in profiles.values() for c in p["categories_ms"]))
    lines += [
        "",
        "ONNX Runtime's profiler, ms per run by op category (after its session fusions; each node's median "
        "over the profiled runs, less the profiler's own cost per node: what the nodes' sum exceeds "
        f"the model's median latency from the timing phase by, spread over its nodes, {_node_cost_us(profiles)} "
        "us); the sum against the profiled run's wall time (the profiler's cost included) and against that "
        "median latency (above 1.00 where nodes shorter than the cost kept part of it):",
        "",
        "| variant | " + " | ".join(categories) + " | sum | profiled run | sum / median latency |",
        "|---|" + "---|" * (len(categories) + 3),
    ]
    for name, p in profiles.items():
        cells = " | ".join(_fmt(p["categories_ms"].get(c), 3) for c in categories)
        ratio = f"{p['total_ms'] / latency[name]:.2f}" if name in latency else "-"
        label = name if name in reported else f"{name} (an int8 step's float input, not reported)"
        lines.append(f"| {label} | {cells} | {p['total_ms']:.3f} | {p['run_ms']:.3f} | {ratio} |")
    lines.append(f"\n![time per op category]({PROFILE_PNG})")
    for name, p in profiles.items():
        slowest = ", ".join(f"{n['module']} ({n['op_type']}, {n['ms']:.3f})" for n in p["slowest"])
        lines.append(f"\nSlowest nodes of `{name}`, ms: {slowest}.")
    return lines


def _node_cost_us(profiles: dict[str, Any]) -> str:
    costs = [1e3 * p["profiler_cost_per_node_ms"] for p in profiles.values() if "profiler_cost_per_node_ms" in p]
    return f"{min(costs):.1f} to {max(costs):.1f}" if costs else "-"


def render_profile_plot(report: dict[str, Any], path: Path) -> None:
    """Stacked bars: each ONNX variant's profiled time per op category, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = report["profile"]["profiles"]
    categories = list(dict.fromkeys(c for p in profiles.values() for c in p["categories_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    bottoms = [0.0] * len(profiles)
    for category in categories:
        heights = [p["categories_ms"].get(category, 0.0) for p in profiles.values()]
        ax.bar(list(profiles), heights, bottom=bottoms, label=category)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel(f"ms per run (batch {report.get('batch_size', 1)}, {report['machine']['threads']} threads)")
    ax.set_title(f"{report['model']}: where the time goes (ONNX Runtime profiler)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    save_figure(fig, path)


def _parity_section(report: dict[str, Any]) -> list[str]:
    rows = report.get("parity") or []
    notes = report.get("lite") or {}
    if not rows and not notes:
        return []
    lines = [
        "",
        "## Parity: ONNX Runtime vs PyTorch Lite",
        "",
        "| ONNX variant | PyTorch variant | kind | max abs | agree % | SQNR dB | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['onnx']} | {r['torch']} | {r['kind']} | {r['max_abs']:.3g} | {r['agree_top1']:.2f} | "
            f"{_fmt(r['sqnr_db'])} | {'ok' if r['ok'] else '**FLAGGED**'} |"
        )
    lines += [f"\n`{n}`: {v['error']}" for n, v in notes.items() if "error" in v]
    skipped = {n for n, v in notes.items() if "error" not in v and v.get("optimize_for_mobile") is not True}
    if skipped:
        lines.append(
            f"\n`optimize_for_mobile` skipped for {', '.join(sorted(skipped))}: this torch build has no XNNPACK."
        )
    return lines


def _mobile_section(report: dict[str, Any]) -> list[str]:
    lines = []
    handoff = report.get("handoff")
    if handoff:
        lines += [
            "",
            f"Beside the models: `{handoff['preprocess']}` (the preprocessing every figure here was measured "
            f"with: resize, crop, mean, std, layout) and `{handoff['labels']}` ({handoff['classes']} class names).",
        ]
    mobile = report.get("mobile")
    if not mobile:
        return lines
    web = mobile.get("web")
    lines += [
        "",
        f"## ONNX Runtime Mobile ({mobile['target_platform']}, optimization {mobile['optimization']})",
        "",
        "| variant | .ort file | size MB | max abs vs .onnx | same top-1 | | onnxruntime-web: same top-1 | max abs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in mobile["artifacts"]:
        if a.get("error"):
            lines.append(f"| {a['variant']} | - | - | - | - | {a['error']} | | |")
            continue
        w = a.get("web") or {}
        web_cells = (
            f"{w['top1_equal'] or '**False**'} ({w['images'] - w['top1_differ']}/{w['images']}) | "
            f"{w['max_abs_vs_python']:.3g}"
            if w.get("loaded")
            else (f"**not loaded**: {w['error']} |" if w else "- | -")
        )
        lines.append(
            f"| {a['variant']} | {a['path']} | {a['size_bytes'] / 1e6:.2f} | {a['max_abs_vs_onnx']:.3g} | "
            f"{a['argmax_equal']} | {'ok' if a['ok'] else '**FLAGGED**'} | {web_cells} |"
        )
    if isinstance(web, str):
        lines.append(f"\nonnxruntime-web: {web}.")
    elif web:
        lines.append(
            f"\nonnxruntime-web: every `.ort` file run by {web['runtime']} on the check images, one at a time."
        )
    baked = [a for a in mobile["artifacts"] if a.get("baked_preprocessing")]
    if baked:
        lines.append(
            "Preprocessing baked in (`*-rgb8`: input `image`, the center crop as uint8 RGB NHWC), against "
            "timm's transform and the model: "
            + ", ".join(
                f"`{a['variant']}` same top-1 {a['vs_timm']['argmax_equal']}, max abs {a['vs_timm']['max_abs']:.3g}"
                for a in baked
            )
            + "."
        )
    if mobile.get("operators_config"):
        lines.append(
            f"\nReduced-build operator config: `{mobile['operators_config']}` ({len(mobile['operators'])} lines)."
        )
    return lines


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
    ax.set_xlabel(f"median latency, ms (batch {report.get('batch_size', 1)}, {report['machine']['threads']} threads)")
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
    if report.get("profile"):
        render_profile_plot(report, folder / PROFILE_PNG)
    for step in report.get("steps", []):
        for name, figure in _pass_of(step).report_figures(step).items():
            save_figure(figure, folder / name)
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
