"""PQV-Mobile's experiment on the real DeiT-tiny, in one run (issue 5).

Rows, all evaluated on the whole evaluation split and timed together in interleaved rounds:
- `lite-fp32`: the dense FP32 model in the PyTorch Lite interpreter (PQV-Mobile's baseline);
- `lite-int8`: the dense model with PyTorch dynamic int8 Linear (x86 engine), Lite;
- `pqv-recipe`: PQV-Mobile's recipe as its code does it: torch-pruning MetaPruner with Taylor
  importance at 9.375% of every group's channels (the residual width included, classifier kept),
  then PyTorch dynamic int8 Linear on x86, Lite interpreter; no fine-tuning;
- `fp32` / `int8`: the dense model as ONNX, and onnxvit's int8 recipe on it (ONNX Runtime);
- `{l1,taylor,hessian}-int8`: onnxvit pruned to 9.375% of the parameters (MLP channels, refit
  on), then the same int8 recipe;
- sweep `{method}-{ratio}`: more pruning (20, 30, 50% of the parameters), int8 without the
  accuracy budget, for the top-1 against latency plot.
No fine-tuning anywhere: pruning reads only the 32 calibration images, the int8 budget the 31
search images. With --json PATH writes the table and issue 5's `headline` object.

    python bench/pqv_mobile.py [--output DIR] [--json PATH] [--ratios 0.2,0.3,0.5] [--methods l1,taylor,hessian]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_pruning as tp  # noqa: E402

from onnxvit.benchmark import measure_latency, onnx_runner  # noqa: E402
from onnxvit.compress import Run  # noqa: E402
from onnxvit.config import PruneConfig, load_config  # noqa: E402
from onnxvit.engine import Cache, cache_key, model_sha256, run_passes  # noqa: E402
from onnxvit.evaluate import onnx_eval_logits, score, torch_eval_logits  # noqa: E402
from onnxvit.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from onnxvit.lite import dynamic_int8_linear, load_lite, quantized_engine, save_lite  # noqa: E402
from onnxvit.progress import Reporter  # noqa: E402
from onnxvit.report import save_figure  # noqa: E402
from onnxvit.prune import Prunable, count_params_macs, sync_attention  # noqa: E402
from passes import get_pass  # noqa: E402

EXAMPLE = REPO / "examples" / "deit_tiny_pruned.yaml"
PQV_RATIO = 0.09375
PQV_TOP1_DROP = 2.24  # PQV-Mobile's accuracy loss, the bar for the headline
ENGINE = "x86"        # PQV-Mobile's x86 run


def pqv_recipe_prune(dense: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> torch.nn.Module:
    """PQV-Mobile's pruning: MetaPruner, Taylor, 9.375% of every group (embedding width too).

    Its code hand-edits timm so that attention reshapes to the pruned width and keeps the dense
    softmax scale; sync_attention gives the same model without touching timm.
    """
    model = copy.deepcopy(dense).eval()
    importance = tp.importance.GroupTaylorImportance()
    prunable = Prunable.find(model, ["head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, torch.from_numpy(images[:1]), importance=importance,
                                      pruning_ratio=PQV_RATIO, ignored_layers=prunable.ignored,
                                      num_heads={a.qkv: a.num_heads for a in prunable.attentions})
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels.astype(np.int64))).backward()
    pruner.step()
    sync_attention(pruner, prunable)
    model.zero_grad(set_to_none=True)
    return model.eval()


class Bench:
    def __init__(self, output: Path, quiet: bool) -> None:
        self.output = output
        self.reporter = Reporter(quiet)
        self.cache = Cache(output / "cache")
        config, self.pass_configs = load_config(EXAMPLE)
        config.output.dir = output
        self.config = config
        self.base = self._run(None)
        self.base.dense_model, self.base.dataset  # noqa: B018  (fail early on missing data)
        self.labels = self.base.dataset.labels("evaluate")
        self.rows: dict[str, dict[str, Any]] = {}
        self.runners: dict[str, Any] = {}
        self.lite_paths: dict[str, Path] = {}

    def _run(self, prune: PruneConfig | None) -> Run:
        config = self.config.model_copy(update={"prune": prune})
        run = Run(config, self.pass_configs, self.reporter, self.cache, config.sha256())
        if hasattr(self, "base"):  # share the model and the decoded images
            for name in ("dense_model", "dataset", "preprocessing", "calibration_images", "search_images",
                         "evaluation_images"):
                setattr(run, name, getattr(self.base, name))
        return run

    @property
    def threads(self) -> int:
        return self.config.benchmark.threads

    def _eval_onnx(self, name: str, path: Path, model_sha: str) -> np.ndarray:
        key = cache_key(model=model_sha, evaluate=self.base.fingerprint("evaluate"))
        images = self.base.evaluation_images

        def produce() -> np.ndarray:
            with self.reporter.task(f"evaluating {name}", len(images)) as advance:
                return onnx_eval_logits(path, images, 32, self.threads, advance)

        return self.cache.array(f"logits-{name}", key, produce)

    def onnx_arm(self, name: str, prune: PruneConfig | None, budget: bool) -> None:
        """Export (pruned or not), the example's int8 recipe; rows for the int8 model (and fp32 when dense)."""
        run = self._run(prune)
        fp32, record = run.export()
        steps = list(self.config.passes)
        configs = list(self.pass_configs)
        if not budget:  # the sweep: int8 everywhere, no sensitivity ranking
            configs[-1] = get_pass("quantize_int8").Config.model_validate(
                {k: v for k, v in configs[-1].model_dump().items()
                 if k not in ("min_sqnr_db", "min_agreement", "max_float_layers")})
        models, records = run_passes(fp32, record, steps, configs, self.cache, run.context,
                                     {s: run.fingerprint(s) for s in ("calibrate", "search")}, run.check,
                                     self.reporter.log)
        counts = run.pruned[1]["pruned"] if prune else count_params_macs(run.dense_model, run.input_shape)
        wanted = {name: models["int8"]} if prune else {"fp32": fp32, name: models["int8"]}
        notes = records[-1].notes
        for row_name, proto in wanted.items():
            path = self.output / f"{row_name}.onnx"
            atomic_write_bytes(path, proto.SerializeToString())
            logits = self._eval_onnx(row_name, path, model_sha256(proto))
            self.rows[row_name] = {"name": row_name, "runtime": "onnxruntime", "method": prune.method if prune else "none",
                                   "prune_ratio": prune.ratio if prune else 0.0, "budget": budget and row_name != "fp32",
                                   "kept_float": len(notes.get("kept_float", [])) if row_name != "fp32" else 0,
                                   "size_mb": path.stat().st_size / 1e6, **counts, "logits": logits,
                                   "removed_params": run.pruned[1]["removed"]["params"] if prune else 0.0}
            self.runners[row_name] = onnx_runner(path, run.input_shape, self.config.benchmark)

    def lite_arm(self, name: str, model: torch.nn.Module, int8: bool, key: str) -> None:
        path = self.output / f"{name}.ptl"
        example = torch.from_numpy(self.base.calibration_images[:1])
        with quantized_engine(ENGINE):
            body = dynamic_int8_linear(model, ENGINE) if int8 else model
            save_lite(body, example, path, ENGINE)
            lite = load_lite(path)
            images = self.base.evaluation_images

            def produce() -> np.ndarray:
                with self.reporter.task(f"evaluating {name}", len(images)) as advance:
                    return torch_eval_logits(lite, images, 32, self.threads, advance)

            logits = self.cache.array(f"logits-{name}", cache_key(lite=key, int8=int8, engine=ENGINE,
                                                                  torch=torch.__version__,
                                                                  evaluate=self.base.fingerprint("evaluate")), produce)
        counts = count_params_macs(model, self.base.input_shape)
        self.rows[name] = {"name": name, "runtime": f"torch-lite ({ENGINE})" if int8 else "torch-lite",
                           "method": "pqv-taylor" if "pqv" in name else "none",
                           "prune_ratio": PQV_RATIO if "pqv" in name else 0.0, "budget": False, "kept_float": 0,
                           "size_mb": path.stat().st_size / 1e6, **counts, "logits": logits,
                           "removed_params": 1 - counts["params"] / count_params_macs(
                               self.base.dense_model, self.base.input_shape)["params"]}
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, *self.base.input_shape)).astype(np.float32))

        def run_lite() -> object:
            with torch.inference_mode():
                return lite(x)

        self.runners[name] = run_lite

    def time_all(self) -> None:
        bench = self.config.benchmark
        torch.set_num_threads(self.threads)
        with quantized_engine(ENGINE), self.reporter.task(f"timing {len(self.runners)} models",
                                                          bench.rounds, live=False) as advance:
            latency = measure_latency(self.runners, bench.warmup, bench.runs, bench.rounds, lambda: advance(1))
        for name, value in latency.items():
            self.rows[name]["latency_ms"] = value


def table(bench: Bench) -> list[dict[str, Any]]:
    reference = bench.rows["fp32"]["logits"]
    lite_fp32 = bench.rows["lite-fp32"]["latency_ms"]["median"]
    pqv = bench.rows["pqv-recipe"]["latency_ms"]["median"]
    dense_top1 = score(reference, bench.labels, reference)["top1"]
    rows = []
    for row in bench.rows.values():
        scores = score(row["logits"], bench.labels, reference)
        median = row["latency_ms"]["median"]
        rows.append({**{k: v for k, v in row.items() if k != "logits"}, **scores,
                     "top1_drop": round(dense_top1 - scores["top1"], 3),
                     "median_ms": median, "p90_ms": row["latency_ms"]["p90"],
                     "speedup_vs_dense_fp32_lite": round(lite_fp32 / median, 3),
                     "speedup_vs_pqv_recipe": round(pqv / median, 3)})
    return rows


def headline(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    by_name = {r["name"]: r for r in rows}
    ours = [r for r in rows if r["runtime"] == "onnxruntime" and r["name"] != "fp32"
            and r["top1_drop"] < PQV_TOP1_DROP]
    best = min(ours, key=lambda r: r["median_ms"]) if ours else None
    same_size = {m: by_name[f"{m}-int8"]["top1"] for m in methods if f"{m}-int8" in by_name}
    return {
        "speedup_vs_pqv_recipe": best["speedup_vs_pqv_recipe"] if best else None,
        "speedup_vs_dense_fp32_lite": best["speedup_vs_dense_fp32_lite"] if best else None,
        "top1_drop": best["top1_drop"] if best else None,
        "pqv_recipe_top1_drop": by_name["pqv-recipe"]["top1_drop"],
        "best_method": best["method"] if best else None,
        "best_model": best["name"] if best else None,
        "best_removed_params": round(best["removed_params"], 4) if best else None,
        "same_size_top1_by_method": same_size,
        "same_size_winner": max(same_size, key=same_size.get) if same_size else None,
        "fine_tuning": "none (pruning reads the 32 calibration images; the int8 budget the 31 search images)",
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, marker in (("l1", "o"), ("taylor", "s"), ("hessian", "^")):
        points = sorted((r["median_ms"], r["top1"]) for r in rows if r["method"] == method)
        if points:
            ax.plot(*zip(*points), marker=marker, label=f"onnxvit {method} + int8 (ORT)")
    for r in rows:
        if r["method"] in ("none", "pqv-taylor"):
            ax.scatter([r["median_ms"]], [r["top1"]], marker="x", color="black")
            ax.annotate(r["name"], (r["median_ms"], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    dense = next(r["top1"] for r in rows if r["name"] == "fp32")
    ax.axhline(dense - PQV_TOP1_DROP, ls="--", lw=0.8, color="grey")
    ax.annotate(f"dense - {PQV_TOP1_DROP} (PQV-Mobile's loss)", (ax.get_xlim()[0], dense - PQV_TOP1_DROP),
                textcoords="offset points", xytext=(4, -10), fontsize=7, color="grey")
    ax.set_xlabel("median latency, ms (batch 1, 2 threads)")
    ax.set_ylabel("top-1, % (evaluation split)")
    ax.set_title("DeiT-tiny: pruning + int8, onnxvit (ONNX Runtime) vs PQV-Mobile (Lite)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "out" / "bench-pqv")
    parser.add_argument("--json", type=Path, help="write the table and headline here")
    parser.add_argument("--methods", default="l1,taylor,hessian")
    parser.add_argument("--ratios", default="0.2,0.3,0.5", help="sweep: fractions of the parameters")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    methods = args.methods.split(",")
    bench = Bench(args.output.resolve(), args.quiet)
    dense = bench.base.dense_model

    bench.lite_arm("lite-fp32", dense, int8=False, key=bench.base.weights_id)
    bench.lite_arm("lite-int8", dense, int8=True, key=bench.base.weights_id)
    calibration = bench.base.calibration_images
    pqv = pqv_recipe_prune(dense, calibration, bench.base.dataset.labels("calibrate"))
    bench.lite_arm("pqv-recipe", pqv, int8=True, key=cache_key(pqv=bench.base.weights_id, ratio=PQV_RATIO,
                                                                 calibration=bench.base.fingerprint("calibrate")))
    bench.onnx_arm("int8", None, budget=True)
    prune = bench.config.prune
    for method in methods:
        bench.onnx_arm(f"{method}-int8", prune.model_copy(update={"method": method, "ratio": PQV_RATIO}), budget=True)
        for ratio in (float(r) for r in args.ratios.split(",") if r):
            bench.onnx_arm(f"{method}-{ratio:g}", prune.model_copy(update={"method": method, "ratio": ratio}),
                           budget=False)
    bench.time_all()
    rows = table(bench)
    columns = ["name", "runtime", "method", "removed_params", "top1", "top1_drop", "agree_top1", "median_ms",
               "speedup_vs_dense_fp32_lite", "speedup_vs_pqv_recipe", "size_mb", "kept_float"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    head = headline(rows, methods)
    print(json.dumps(head, indent=2))
    plot(rows, bench.output / "pqv_mobile.png")
    print(f"plot: {bench.output / 'pqv_mobile.png'}")
    if args.json:
        atomic_write_json(args.json, {"table": rows, "headline": head, "plot": str(bench.output / "pqv_mobile.png"),
                                      "evaluate_images": len(bench.labels)})


if __name__ == "__main__":
    main()
