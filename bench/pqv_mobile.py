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

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp

from onnxvit.config import EXPORT_VARIANT, PruneConfig
from onnxvit.engine import cache_key
from onnxvit.lite import dynamic_int8_linear, load_lite, quantized_engine, save_lite
from onnxvit.prune import Prunable, count_params_macs, sync_attention
from onnxvit.stages import benchmark, evaluate, export, passes, prune
from onnxvit.stages.evaluate import score
from onnxvit.variant import Variant
from passes import get_pass

from _common import REPO, arguments, finish, finish_latency_plot, latency_axes, mark, open_run, print_table

EXAMPLE = REPO / "examples" / "deit_tiny_pruned.yaml"
PQV_RATIO = 0.09375
PQV_TOP1_DROP = 2.24  # PQV-Mobile's accuracy loss, the bar for the headline
ENGINE = "x86"  # PQV-Mobile's x86 run


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
        pruner = tp.pruner.MetaPruner(
            model,
            torch.from_numpy(images[:1]),
            importance=importance,
            pruning_ratio=PQV_RATIO,
            ignored_layers=prunable.ignored,
            num_heads={a.qkv: a.num_heads for a in prunable.attentions},
        )
    model.zero_grad()
    F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels.astype(np.int64))).backward()
    pruner.step()
    sync_attention(pruner, prunable)
    model.zero_grad(set_to_none=True)
    return model.eval()


class Bench:
    """The rows of the experiment: each a variant of the pipeline's stages, with the bench's own columns."""

    def __init__(self, output: Path, quiet: bool) -> None:
        self.output = output
        self.run = open_run(EXAMPLE, output, quiet=quiet)
        self.run.dense_model, self.run.dataset  # noqa: B018  (fail early on missing data)
        self.labels = self.run.dataset.labels("evaluate")
        self.rows: dict[str, dict[str, Any]] = {}
        self.variants: dict[str, Variant] = {}
        self.dense_params = count_params_macs(self.run.dense_model, self.run.input_shape)["params"]

    def _add(self, variant: Variant, **columns: Any) -> None:
        self.variants[variant.name] = variant
        self.rows[variant.name] = {
            "name": variant.name,
            "size_mb": variant.size_bytes / 1e6,
            **variant.counts,
            **columns,
            "logits": evaluate.logits(self.run, variant)[0],
        }

    def onnx_arm(self, name: str, prune_config: PruneConfig | None, budget: bool) -> None:
        """Export (pruned or not), the example's int8 recipe; rows for the int8 model (and fp32 when dense)."""
        run = self.run
        if prune_config is not None:
            pruned = prune.prune(run, prune_config)
            model, model_id, counts = pruned.model, pruned.key, pruned.summary["pruned"]
            removed = pruned.summary["removed"]["params"]
        else:
            model, model_id = run.dense_model, run.weights_id
            counts, removed = count_params_macs(model, run.input_shape), 0.0
        fp32, record = export.export(run, model, model_id, EXPORT_VARIANT)
        configs = list(run.pass_configs)
        if not budget:  # the sweep: int8 everywhere, no sensitivity ranking
            configs[-1] = get_pass("quantize_int8").Config.model_validate(
                {
                    k: v
                    for k, v in configs[-1].model_dump(exclude_unset=True).items()
                    if k not in ("min_sqnr_db", "min_agreement", "max_float_layers")
                }
            )
        models, records = passes.apply(run, fp32, record, run.config.passes, configs)
        kept_float = len(records[-1].notes.get("kept_float", []))
        wanted = {name: models["int8"]} if prune_config else {"fp32": fp32, name: models["int8"]}
        for row_name, proto in wanted.items():
            variant = passes.write_variant(run, row_name, proto, counts, file_name=f"{row_name}.onnx")
            self._add(
                variant,
                runtime="onnxruntime",
                method=prune_config.method if prune_config else "none",
                prune_ratio=prune_config.ratio if prune_config else 0.0,
                budget=budget and row_name != "fp32",
                kept_float=kept_float if row_name != "fp32" else 0,
                removed_params=removed,
            )

    def lite_arm(self, name: str, model: torch.nn.Module, int8: bool, key: str) -> None:
        path = self.output / f"{name}.ptl"
        example = torch.from_numpy(self.run.calibration_images[:1])
        counts = count_params_macs(model, self.run.input_shape)
        with quantized_engine(ENGINE):
            save_lite(dynamic_int8_linear(model, ENGINE) if int8 else model, example, path, ENGINE)
            identity = cache_key(lite=key, int8=int8, engine=ENGINE, torch=torch.__version__)
            variant = Variant(
                name,
                "torch-lite",
                identity,
                module=load_lite(path),
                path=path,
                size_bytes=path.stat().st_size,
                counts=counts,
            )
            self._add(
                variant,
                runtime=f"torch-lite ({ENGINE})" if int8 else "torch-lite",
                method="pqv-taylor" if "pqv" in name else "none",
                prune_ratio=PQV_RATIO if "pqv" in name else 0.0,
                budget=False,
                kept_float=0,
                removed_params=1 - counts["params"] / self.dense_params,
            )

    def time_all(self) -> None:
        with quantized_engine(ENGINE):
            latency = benchmark.latency(self.run, list(self.variants.values()))
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
        rows.append(
            {
                **{k: v for k, v in row.items() if k != "logits"},
                **scores,
                "top1_drop": round(dense_top1 - scores["top1"], 3),
                "median_ms": median,
                "p90_ms": row["latency_ms"]["p90"],
                "speedup_vs_dense_fp32_lite": round(lite_fp32 / median, 3),
                "speedup_vs_pqv_recipe": round(pqv / median, 3),
            }
        )
    return rows


def headline(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    by_name = {r["name"]: r for r in rows}
    ours = [r for r in rows if r["runtime"] == "onnxruntime" and r["name"] != "fp32" and r["top1_drop"] < PQV_TOP1_DROP]
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
    fig, ax = latency_axes()
    for method, marker in (("l1", "o"), ("taylor", "s"), ("hessian", "^")):
        points = sorted((r["median_ms"], r["top1"]) for r in rows if r["method"] == method)
        if points:
            ax.plot(*zip(*points), marker=marker, label=f"onnxvit {method} + int8 (ORT)")
    for r in rows:
        if r["method"] in ("none", "pqv-taylor"):
            mark(ax, r)
    dense = next(r["top1"] for r in rows if r["name"] == "fp32")
    ax.axhline(dense - PQV_TOP1_DROP, ls="--", lw=0.8, color="grey")
    ax.annotate(
        f"dense - {PQV_TOP1_DROP} (PQV-Mobile's loss)",
        (ax.get_xlim()[0], dense - PQV_TOP1_DROP),
        textcoords="offset points",
        xytext=(4, -10),
        fontsize=7,
        color="grey",
    )
    title = "DeiT-tiny: pruning + int8, onnxvit (ONNX Runtime) vs PQV-Mobile (Lite)"
    finish_latency_plot(fig, ax, title, path, "median latency, ms (batch 1, 2 threads)")


def main() -> None:
    args = arguments(
        __doc__,
        "bench-pqv",
        methods=dict(default="l1,taylor,hessian"),
        ratios=dict(default="0.2,0.3,0.5", help="sweep: fractions of the parameters"),
    ).parse_args()
    methods = args.methods.split(",")
    bench = Bench(args.output.resolve(), args.quiet)
    base = bench.run
    dense = base.dense_model

    bench.lite_arm("lite-fp32", dense, int8=False, key=base.weights_id)
    bench.lite_arm("lite-int8", dense, int8=True, key=base.weights_id)
    pqv = pqv_recipe_prune(dense, base.calibration_images, base.dataset.labels("calibrate"))
    bench.lite_arm(
        "pqv-recipe",
        pqv,
        int8=True,
        key=cache_key(pqv=base.weights_id, ratio=PQV_RATIO, calibration=base.fingerprint("calibrate")),
    )
    bench.onnx_arm("int8", None, budget=True)
    example = base.config.prune
    assert example is not None
    for method in methods:
        bench.onnx_arm(f"{method}-int8", example.model_copy(update={"method": method, "ratio": PQV_RATIO}), budget=True)
        for ratio in (float(r) for r in args.ratios.split(",") if r):
            bench.onnx_arm(
                f"{method}-{ratio:g}", example.model_copy(update={"method": method, "ratio": ratio}), budget=False
            )
    bench.time_all()
    rows = table(bench)
    print_table(
        rows,
        [
            "name",
            "runtime",
            "method",
            "removed_params",
            "top1",
            "top1_drop",
            "agree_top1",
            "median_ms",
            "speedup_vs_dense_fp32_lite",
            "speedup_vs_pqv_recipe",
            "size_mb",
            "kept_float",
        ],
    )
    head = headline(rows, methods)
    finish(args.json, rows, head, plot, bench.output / "pqv_mobile.png", evaluate_images=len(bench.labels))


if __name__ == "__main__":
    main()
