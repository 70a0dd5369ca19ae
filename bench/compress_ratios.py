"""The spine's acceptance figures in one run: every variant's ratios to fp32, and the cache's speed.

Runs `onnxvit compress` on a config (default: the real DeiT-tiny example) from scratch (--force),
then again served from the cache, in process and as a new process (`cached_cli_s`: what a user
waits for when nothing changed, imports included). Prints the variant table; with --json PATH also
writes it with a `headline` object, which profiles the cold run (cold_run_s, eval_s, search_s,
fp32_eval_s and their ratios, seconds per stage; own_steps_over_fp32_eval: the pass steps less
ONNX Runtime's two recipes; rest_over_fp32_eval: what is neither an evaluation pass, a pass step,
nor the benchmark and profile stages; config_floor_over_fp32_eval: the evaluations plus the timing
phase's calls, warm-up and timed, at each model's median).

    python bench/compress_ratios.py [--config examples/deit_tiny.yaml] [--output DIR] [--json PATH]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from onnxvit.compress import compress
from onnxvit.config import load_config
from onnxvit.report import markdown_table, variant_table

from _common import REPO, arguments, write_json

BASELINE_PASSES = frozenset({"ort_default", "ort_dynamic"})


def cold_run_profile(report: dict[str, Any], seconds: float, warmup: int, runs: int) -> dict[str, Any]:
    """Where a cold run's time went: every evaluation pass, every pass step, fp32's evaluation, and
    their ratios to the fp32 evaluation (the unit a cold run is judged in). ``warmup`` and ``runs``
    are the config's benchmark settings: with each timed model's median they give the timing
    phase's own calls, which no change to onnxvit's code shortens."""
    timings = report["timings"]
    medians = {v["name"]: v["latency_ms"]["median"] for v in report["variants"] if v.get("latency_ms")}
    medians |= (report.get("profile") or {}).get("latency_ms", {})  # the unreported float inputs, timed too
    timed_calls_s = sum(medians.values()) * (warmup + runs) / 1e3
    eval_s = sum(v for k, v in timings.items() if k.startswith("evaluate/"))
    search_s = sum(step["seconds"] for step in report["steps"] if not step["cached"] and step["kind"] != "export")
    fp32_eval_s = timings["evaluate/fp32"]
    # ONNX Runtime's own recipes run as comparison rows; the rest of the steps are onnxvit's
    baseline_s = sum(
        step["seconds"] for step in report["steps"] if not step["cached"] and step["kind"] in BASELINE_PASSES
    )
    timing_s = timings.get("benchmark", 0.0) + timings.get("profile", 0.0)  # sized by the config's benchmark
    return {
        "cold_run_s": round(seconds, 1),
        "eval_s": round(eval_s, 1),
        "search_s": round(search_s, 1),
        "fp32_eval_s": round(fp32_eval_s, 1),
        "search_over_fp32_eval": round(search_s / fp32_eval_s, 2),
        "cold_run_over_fp32_eval": round(seconds / fp32_eval_s, 2),
        "own_steps_over_fp32_eval": round((search_s - baseline_s) / fp32_eval_s, 2),
        "rest_over_fp32_eval": round((seconds - eval_s - timing_s - search_s) / fp32_eval_s, 2),
        "timed_calls_s": round(timed_calls_s, 1),
        # the evaluations and the timing phase's calls: what the config asks for before any step runs
        "config_floor_over_fp32_eval": round((eval_s + timed_calls_s) / fp32_eval_s, 2),
        "stages_s": {k: v for k, v in timings.items() if not k.startswith("evaluate/")},
        "evaluate_s": {k.removeprefix("evaluate/"): v for k, v in timings.items() if k.startswith("evaluate/")},
        "steps_s": {step["name"]: step["seconds"] for step in report["steps"] if not step["cached"]},
    }


def main() -> None:
    args = arguments(
        __doc__, "bench-compress", config=dict(type=Path, default=REPO / "examples" / "deit_tiny.yaml")
    ).parse_args()

    config, _ = load_config(args.config)
    start = time.perf_counter()
    cold = compress(args.config, force=True, quiet=args.quiet, output=args.output)
    first = time.perf_counter() - start
    start = time.perf_counter()
    report = compress(args.config, quiet=True, output=args.output)
    second = time.perf_counter() - start
    # what a user waits for when nothing changed: a new process, its imports included
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "onnxvit.cli",
        "compress",
        str(args.config),
        "--quiet",
        "--output",
        str(args.output),
    ]
    subprocess.run(command, check=True, cwd=REPO)
    cached_cli = time.perf_counter() - start

    rows = variant_table(report)
    by_name = {row["name"]: row for row in rows}
    print(markdown_table(rows))
    headline = {
        "model": report["model"],
        "evaluate_images": report["data"]["evaluate_images"],
        "fp32_top1": by_name["fp32"]["top1"],
        "fp32_minus_torch_top1": by_name["fp32"]["top1"] - by_name["torch-fp32"]["top1"]
        if "torch-fp32" in by_name
        else None,
        "int8_top1_drop": -by_name["int8"]["top1_delta_vs_fp32"],
        "int8_agree_top1": by_name["int8"]["agree_top1"],
        "int8_sqnr_db": by_name["int8"]["sqnr_db"],
        "int8_speedup_vs_fp32": by_name["int8"]["speedup_vs_fp32"],
        "int8_size_ratio": by_name["int8"]["size_vs_fp32"],
        "fp16_speedup_vs_fp32": by_name["fp16"]["speedup_vs_fp32"],
        "fp16_size_ratio": by_name["fp16"]["size_vs_fp32"],
        **cold_run_profile(cold, first, config.benchmark.warmup, config.benchmark.runs),
        "first_run_seconds": round(first, 1),
        "cached_run_seconds": round(second, 1),
        "cached_over_first": round(second / first, 3),
        "cached_cli_s": round(cached_cli, 2),
    }
    print(json.dumps(headline, indent=2))
    write_json(args.json, table=rows, headline=headline, machine=report["machine"])


if __name__ == "__main__":
    main()
