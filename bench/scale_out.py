"""Evaluation and a search on Ray against in process, on this machine, with the same cores.

Runs the example (default: the real DeiT-tiny) once through the cache, then times, with each
executor:
- the evaluation of every ONNX variant of the report on the evaluation split, at the deploy batch:
  in process (``benchmark.threads`` callers), on Ray with 1 worker of that many threads, and with
  that many workers of 1 thread; the logits must be equal bit for bit;
- the first searching ``quantize_int8`` step (weight-scheme search and accuracy-budget ranking)
  on its input model: in process, and on Ray with 1 and 2 workers of 1 thread; the notes (every
  measured candidate) must be equal.

Ray's cluster start is timed apart. The headline gives the overhead of Ray against in process at the
same cores (``eval_overhead``), the search's wall time with 2 workers over 1 (``search_2_over_1``),
and the per-image cost and per-task overhead that the README's estimate for bigger runs is made from.

    python bench/scale_out.py [--config examples/deit_tiny.yaml] [--output DIR] [--json PATH]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxvit.compress import compress
from onnxvit.config import EXPORT_VARIANT, ExecutorConfig
from onnxvit.distributed import SHARDS_PER_WORKER, RayExecutor
from onnxvit.stages import export, passes
from passes import get_pass
from passes.executor import Executor
from passes.runtime import batches

from _common import REPO, arguments, open_run, print_table, write_json

SEARCH_NOTES = ("schemes", "sensitivity", "kept_float", "search_fidelity")


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def ray_executor(workers: int, threads: int) -> tuple[Executor, float]:
    """A fresh local Ray cluster of ``workers x threads`` CPUs and the seconds it took to start."""
    return timed(lambda: RayExecutor(ExecutorConfig(kind="ray", workers=workers, threads_per_worker=threads)))


def evaluate_all(executor: Executor, models: dict[str, Path], images: np.ndarray, batch: int, threads: int) -> Any:
    """Each model's logits and evaluation seconds through ``executor``."""
    logits, seconds = {}, {}
    for name, path in models.items():
        start = time.perf_counter()
        logits[name] = executor.logits(path, batches(images, batch), threads)
        seconds[name] = time.perf_counter() - start
    return logits, seconds


def main() -> None:
    args = arguments(
        __doc__, "bench-scale-out", config=dict(type=Path, default=REPO / "examples" / "deit_tiny.yaml")
    ).parse_args()
    report = compress(args.config, quiet=args.quiet, output=args.output)  # the variants' files, cached after once
    run = open_run(args.config, args.output, quiet=args.quiet)
    threads, batch = run.config.benchmark.threads, run.config.benchmark.batch_size
    models = {
        v["name"]: args.output / v["path"] for v in report["variants"] if v["runtime"] == "onnxruntime" and v["path"]
    }
    images = run.evaluation_images

    # Evaluation: the same cores three ways.
    rows, logits_by = [], {}
    setups: list[tuple[str, Callable[[], tuple[Executor, float]]]] = [
        ("local", lambda: (Executor(), 0.0)),
        (f"ray 1x{threads}", lambda: ray_executor(1, threads)),
        (f"ray {threads}x1", lambda: ray_executor(threads, 1)),
    ]
    for label, make in setups:
        executor, start_s = make()
        try:
            logits, seconds = evaluate_all(executor, models, images, batch, threads)
        finally:
            executor.close()
        logits_by[label] = logits
        total = round(sum(seconds.values()), 2)
        row = {"work": "evaluate", "executor": label, "start_s": round(start_s, 2), "seconds": total}
        rows.append(row | {f"{name}_s": round(s, 2) for name, s in seconds.items()})
    identical = all(
        np.array_equal(logits_by["local"][name], other[name]) for other in logits_by.values() for name in models
    )

    # One search: the first quantize_int8 step that searches, on its input model, with each executor.
    fp32, record = export.export(run, run.dense_model, run.weights_id, EXPORT_VARIANT)
    outputs, _ = passes.apply(run, fp32, record)
    index, step = next(
        (i, s) for i, s in enumerate(run.config.passes) if s.pass_ == "quantize_int8" and s.options.get("schemes")
    )
    source = step.input or (run.config.passes[index - 1].output if index else EXPORT_VARIANT)
    search_notes = {}
    for label, make in [
        ("local", lambda: (Executor(threads), 0.0)),  # as a run's search runs in process: in lanes
        ("ray 1x1", lambda: ray_executor(1, 1)),
        ("ray 2x1", lambda: ray_executor(2, 1)),
    ]:
        executor, start_s = make()
        ctx = run.context()
        ctx.executor = executor
        try:
            start = time.perf_counter()
            get_pass(step.pass_)(run.pass_configs[index]).run(outputs[source], ctx)
            seconds = time.perf_counter() - start
        finally:
            executor.close()
        search_notes[label] = json.dumps({k: ctx.notes.get(k) for k in SEARCH_NOTES}, sort_keys=True)
        rows.append({"work": "search", "executor": label, "start_s": round(start_s, 2), "seconds": round(seconds, 2)})
    same_choices = len(set(search_notes.values())) == 1
    pipeline = next(s["notes"] for s in report["steps"] if s["name"] == step.output)
    as_in_pipeline = search_notes["local"] == json.dumps({k: pipeline.get(k) for k in SEARCH_NOTES}, sort_keys=True)

    print_table(rows, ["work", "executor", "start_s", "seconds", *[f"{name}_s" for name in models]])
    by = {(row["work"].split(" ")[0], row["executor"]): row["seconds"] for row in rows}
    local_eval, ray_eval = by[("evaluate", "local")], by[("evaluate", f"ray {threads}x1")]
    evaluated = len(images) * len(models)
    shards = threads * SHARDS_PER_WORKER * len(models)
    headline = {
        "model": report["model"],
        "threads": threads,
        "evaluate_images": len(images),
        "onnx_variants": sorted(models),
        "eval_local_s": local_eval,
        "eval_ray_s": ray_eval,
        "eval_ray_1_worker_s": by[("evaluate", f"ray 1x{threads}")],
        "eval_overhead": round(ray_eval / local_eval - 1, 3),
        "ray_start_s": max(row["start_s"] for row in rows),
        "logits_identical": identical,
        "search_step": step.output,
        "search_local_s": by[("search", "local")],
        "search_1_worker_s": by[("search", "ray 1x1")],
        "search_2_workers_s": by[("search", "ray 2x1")],
        "search_2_over_1": round(by[("search", "ray 2x1")] / by[("search", "ray 1x1")], 3),
        "search_choices_identical": same_choices,
        "search_choices_as_in_pipeline": as_in_pipeline,  # the compress run's step (cached, maybe older code)
        # for estimates at other scales: one image through one variant on one core, and Ray's cost per shard
        "core_s_per_image": round(local_eval * threads / evaluated, 5),
        "overhead_s_per_shard": round(max(ray_eval - local_eval, 0.0) * threads / shards, 4),
    }
    print(json.dumps(headline, indent=1))
    write_json(args.json, rows=rows, headline=headline, machine=report["machine"])


if __name__ == "__main__":
    main()
