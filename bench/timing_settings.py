"""What a config's timing settings buy: every variant's speed-up over fp32 timed with the config's
`benchmark` settings and with others (default: the defaults), alternated, several times over.

Runs the config's pipeline first (from its cache when it ran before), then times its reported
variants (and PyTorch eager, when the config times it) with each setting in turn. Prints, per
variant and setting, the mean speed-up and its spread over the repeats, and the worst p90 over
the median; with --json also writes them with a `headline` (seconds per timing, the largest
difference of means, the largest standard deviation and the worst p90 over the median).

    python bench/timing_settings.py [--config examples/deit_tiny.yaml] [--repeats 4] [--against 20,100,10]
                                    [--json PATH]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxvit.benchmark import torch_runner
from onnxvit.compress import compress
from onnxvit.config import BenchmarkConfig, load_config
from onnxvit.models import create_model
from passes.timing import Runner, measure_latency, onnx_runner

from _common import REPO, arguments, print_table, write_json


def settings_of(bench: BenchmarkConfig) -> tuple[int, int, int]:
    return bench.warmup, bench.runs, bench.rounds


def main() -> None:
    args = arguments(
        __doc__,
        "bench-timing-settings",
        config=dict(type=Path, default=REPO / "examples" / "deit_tiny.yaml"),
        repeats=dict(type=int, default=4, help="timings per setting, alternated"),
        against=dict(default=None, help="WARMUP,RUNS,ROUNDS to compare with (default: the defaults)"),
    ).parse_args()
    config, _ = load_config(args.config)
    report = compress(args.config, quiet=args.quiet, output=args.output)
    bench = config.benchmark
    preprocess = json.loads((args.output / "preprocess.json").read_text())  # what the app feeds, as written
    shape = tuple(preprocess["input"]["shape"][1:])
    runners: dict[str, Runner] = {}
    if bench.torch:
        runners["torch-fp32"] = torch_runner(create_model(config.model), shape, bench.threads, bench.batch_size)
    for variant in report["variants"]:
        path = args.output.resolve() / f"model.{variant['name']}.onnx"
        if path.is_file():
            runners[variant["name"]] = onnx_runner(path, shape, bench.threads, bench.batch_size)
    against = tuple(int(n) for n in args.against.split(",")) if args.against else settings_of(BenchmarkConfig())
    settings = {"config": settings_of(bench), "against": against}
    measured: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
    for repeat in range(args.repeats):
        for label, (warmup, runs, rounds) in settings.items():
            start = time.perf_counter()
            latency = measure_latency(runners, warmup, runs, rounds)
            seconds = time.perf_counter() - start
            base = latency["fp32"]["median"]
            measured[label].append(
                {
                    "seconds": seconds,
                    "speedup": {k: base / v["median"] for k, v in latency.items() if k != "fp32"},
                    "p90_over_median": {k: v["p90"] / v["median"] for k, v in latency.items()},
                }
            )
            print(f"{label} {repeat + 1}/{args.repeats}: {seconds:.1f} s, fp32 {base:.2f} ms", flush=True)

    rows = []
    for name in [n for n in runners if n != "fp32"]:
        row: dict[str, Any] = {"variant": name}
        for label in settings:
            values = [m["speedup"][name] for m in measured[label]]
            row[f"{label}_mean"] = float(np.mean(values))
            row[f"{label}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        row["mean_difference"] = row["against_mean"] - row["config_mean"]
        rows.append(row)
    print_table(rows, ["variant", "config_mean", "config_sd", "against_mean", "against_sd", "mean_difference"])
    # the tail each setting reports: p90 over the median, in its worst repeat
    tails = [
        {"variant": name, **{label: max(m["p90_over_median"][name] for m in measured[label]) for label in settings}}
        for name in runners
    ]
    print_table(tails, ["variant", *settings])
    headline = {
        "settings": {label: dict(zip(("warmup", "runs", "rounds"), s)) for label, s in settings.items()},
        "repeats": args.repeats,
        "seconds": {label: round(float(np.mean([m["seconds"] for m in measured[label]])), 2) for label in settings},
        "largest_mean_difference": round(max(abs(r["mean_difference"]) for r in rows), 4),
        "largest_relative_difference": round(max(abs(r["mean_difference"]) / r["config_mean"] for r in rows), 4),
        "largest_sd": {label: round(max(r[f"{label}_sd"] for r in rows), 4) for label in settings},
        "worst_p90_over_median": {
            label: round(max(max(m["p90_over_median"].values()) for m in measured[label]), 4) for label in settings
        },
    }
    print(headline)
    write_json(args.json, table=rows, tails=tails, headline=headline, machine=report["machine"], runs=measured)


if __name__ == "__main__":
    main()
