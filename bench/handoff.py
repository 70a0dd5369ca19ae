"""The hand-off on the real DeiT-tiny: what each way of feeding the model costs and how exact it is.

Runs the example's int8 recipe with the mobile hand-off (`.ort` files, preprocessing baked in,
onnxruntime-web), then on the whole evaluation split:
- the baked models (`*-rgb8`: uint8 RGB crop in) against timm's transform and the model;
- every `.ort` file in onnxruntime-web (WebAssembly, Node.js) against ONNX Runtime's Python run;
- the latency of each baked model against its source, timed together.
Prints the table; with --json PATH writes it with a `headline` object.

    python bench/handoff.py [--output DIR] [--json PATH] [--web-images N]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from onnxvit.compress import compress
from onnxvit.stages.mobile import BAKED_SUFFIX, uint8_crops
from onnxvit.web_check import WebModel, not_checked, run_in_node
from passes.metrics import max_abs_diff
from passes.runtime import batches, make_session, model_logits
from passes.timing import Runner, measure_latency, onnx_runner

from _common import REPO, arguments, example, open_run, print_table, write_json

EXAMPLE = REPO / "examples" / "deit_tiny.yaml"


def config() -> dict[str, Any]:
    """The example's int8 recipe and fp32, with the mobile hand-off (preprocessing baked in)."""
    doc = example(EXAMPLE)
    doc["passes"] = [s for s in doc["passes"] if s.get("name") in ("fused", "reparam", "int8")]
    doc["mobile"] = {"bake_preprocessing": True}
    doc["benchmark"].update(torch=False, profile=False)
    return doc


def main() -> None:
    args = arguments(
        __doc__,
        "bench-handoff",
        web_images=dict(type=int, default=937, help="evaluation images run in onnxruntime-web (slow: one thread)"),
    ).parse_args()
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    doc_path = output / "bench.yaml"  # one config for the run and for the stages called after it
    doc_path.write_text(yaml.safe_dump({**config(), "output": {"dir": str(output)}}))
    report = compress(doc_path, quiet=args.quiet)
    run = open_run(doc_path, output, quiet=True)
    threads = run.config.benchmark.threads
    images, crops = run.evaluation_images, uint8_crops(run, run.dataset.splits["evaluate"])
    labels = run.dataset.labels("evaluate")
    rows, headline = [], {"evaluate_images": len(images), "machine": report["machine"]["cpu"]}
    artifacts = {a["variant"]: a for a in report["mobile"]["artifacts"] if a.get("path")}
    for name in ("fp32", "int8"):
        source, baked = output / f"model.{name}.onnx", output / f"model.{name}{BAKED_SUFFIX}.onnx"
        timm_way = model_logits(source, batches(images, 1), threads)
        ours = model_logits(baked, batches(crops, 1), threads)
        differ = int((timm_way.argmax(1) != ours.argmax(1)).sum())
        times = measure_latency(
            {
                "source": onnx_runner(source, run.input_shape, threads),
                "baked": _uint8_runner(baked, crops[:1], threads),
            },
            20,
            100,
            10,
        )
        row = {
            "model": name,
            "baked_top1_differ": differ,
            "baked_max_abs": round(max_abs_diff(ours, timm_way), 6),
            "top1": round(float((timm_way.argmax(1) == labels).mean() * 100), 2),
            "baked_top1": round(float((ours.argmax(1) == labels).mean() * 100), 2),
            "baked_latency_ratio": round(times["baked"]["median"] / times["source"]["median"], 4),
        }
        rows.append(row)
        headline[f"{name}_baked_top1_differ"] = differ
        headline[f"{name}_baked_latency_ratio"] = row["baked_latency_ratio"]
    reason = not_checked()
    if reason is None:
        count = min(args.web_images, len(images))
        models = []
        for name in ("fp32", "int8"):
            path = output / artifacts[name]["path"]
            reference = model_logits(path, batches(images[:count], 1), threads)
            models.append(WebModel(name, path, images[:count], reference))
        web = run_in_node(models, timeout=3600)
        for row in rows:
            entry = web[row["model"]]
            row.update(web_images=entry.get("images"), web_top1_differ=entry.get("top1_differ"))
            row["web_max_abs"] = entry.get("max_abs_vs_python")
            headline[f"{row['model']}_web_top1_differ"] = entry.get("top1_differ")
            headline[f"{row['model']}_web_max_abs"] = entry.get("max_abs_vs_python")
        headline["web_images"] = count
    else:
        headline["web"] = reason
    columns = ["model", "top1", "baked_top1", "baked_top1_differ", "baked_max_abs", "baked_latency_ratio"]
    print_table(rows, columns + ["web_images", "web_top1_differ", "web_max_abs"])
    print(json.dumps(headline, indent=2))
    write_json(args.json, table=rows, headline=headline, mobile=report["mobile"], machine=report["machine"])


def _uint8_runner(path: Path, crop: np.ndarray, threads: int) -> Runner:
    session = make_session(path, threads)
    return lambda: session.run(None, {session.get_inputs()[0].name: crop})


if __name__ == "__main__":
    main()
