"""Token merging on the real DeiT-tiny, stacked with int8 and pruning, in one run (issue 16).

Rows, evaluated on the whole evaluation split at batch 1 and timed together in interleaved rounds:
- `fp32` / `int8`: the unmerged export and the example's int8 recipe (examples/deit_tiny_tokens.yaml's
  passes: fuse_vit, reparam_layernorm, quantize_int8 with its accuracy budget and scheme search);
- `tome-rR` / `tome-rR-int8`: merged at a constant r per block (class-token-only last block,
  proportional attention), as exported and fused, and with the same int8 recipe;
- `tome-alt-rR` / `tome-alt-rR-int8`: the same with the `alternate` shape (2r in every other block
  from the second);
- `tome-search-int8`: the schedule the tokens search picks (example's budget), then int8;
- `taylor-tome-int8`: Taylor-pruned (10% of the parameters, MLP channels), merged at the searched
  schedule, then int8;
- `pqv-recipe`: PQV-Mobile's recipe as bench/pqv_mobile.py runs it (Lite interpreter, x86 int8);
- `small-*`: random-init DeiT-small, unmerged and merged (alternate, r = 12: the schedule of
  `tome-alt-r12`) with int8 everywhere (no budget): speed and fidelity to its own FP32 only.
Also the machine's int8 GEMM speed-up at DeiT-tiny's shapes. With --json PATH writes the table and
issue 16's `headline`; the plot is top-1 against latency.

    python bench/token_merging.py [--output DIR] [--json PATH] [--rs 4,8,10,12,16] [--alternate-rs 12,13,14,16]
                                  [--eval-images N]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from onnxvit.config import EXPORT_VARIANT, PruneConfig, TokensConfig
from onnxvit.engine import cache_key
from onnxvit.lite import dynamic_int8_linear, load_lite, quantized_engine, save_lite
from onnxvit.prune import count_params_macs
from onnxvit.stages import evaluate, export, passes, prune, tokens
from onnxvit.stages.evaluate import score
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.int8_limit import gemm_speedup, linear_shapes, machine_summary

from _common import REPO, arguments, finish, finish_latency_plot, latency_axes, mark, open_run, print_table
from pqv_mobile import ENGINE, PQV_RATIO, PQV_TOP1_DROP, Bench, pqv_recipe_prune

EXAMPLE = REPO / "examples" / "deit_tiny_tokens.yaml"
PRUNE = PruneConfig(method="taylor", ratio=0.1, ratio_kinds=["mlp"], round_to=8, batches=4)
SMALL = TokensConfig(r=12, schedule="alternate")
SMALL_NAME = f"small-tome-alt-r{SMALL.r}"  # named as the DeiT-tiny row with the same schedule


class TokenBench:
    """The rows: each a model through the pipeline's own stages, evaluated and later timed together."""

    def __init__(self, output: Path, quiet: bool, eval_images: int | None) -> None:
        self.output = output
        self.run = self._open(output, quiet, eval_images)
        self.labels = self.run.dataset.labels("evaluate")
        self.rows: dict[str, dict[str, Any]] = {}
        self.variants: dict[str, Variant] = {}
        self.export_diffs: list[float] = []
        self.small: Run | None = None

    @staticmethod
    def _open(output: Path, quiet: bool, eval_images: int | None, **model: Any) -> Run:
        run = open_run(EXAMPLE, output, quiet=quiet)
        run.config.data.max_eval_images = eval_images
        if model:
            run.config.model = run.config.model.model_copy(update=model)
        run.dense_model, run.dataset  # noqa: B018  (fail early on missing data)
        return run

    def _add(self, run: Run, variant: Variant, group: str, **columns: Any) -> None:
        self.variants[variant.name] = variant
        self.rows[variant.name] = {
            "name": variant.name,
            "group": group,
            "size_mb": variant.size_bytes / 1e6,
            **variant.counts,
            **columns,
            "logits": evaluate.logits(run, variant)[0],
        }

    @staticmethod
    def _int8_chain(run: Run, budget: bool) -> tuple[list[Any], list[Any]]:
        """The example's steps up to ``int8`` and their configs; without ``budget``, int8 everywhere."""
        steps, configs = [], []
        for step, config in zip(run.config.passes, run.pass_configs):
            if not budget and step.pass_ == "quantize_int8":  # no sensitivity ranking
                dump = config.model_dump(exclude_unset=True)
                config = type(config).model_validate(
                    {k: v for k, v in dump.items() if k not in ("min_sqnr_db", "min_agreement", "max_float_layers")}
                )
            steps.append(step)
            configs.append(config)
            if step.output == "int8":
                return steps, configs
        raise ValueError(f"{EXAMPLE} has no step named int8")

    def onnx_arm(
        self,
        name: str,
        tokens_config: TokensConfig | None,
        prune_config: PruneConfig | None = None,
        fp32_row: bool = True,
        run: Run | None = None,
        group: str = "deit_tiny",
        budget: bool = True,
        int8_name: str | None = None,
    ) -> dict[str, Any] | None:
        """Prune / merge as given, export, the example's passes; rows ``name`` (float) and ``name-int8``."""
        run = run or self.run
        model, model_id = run.dense_model, run.weights_id
        if prune_config is not None:
            pruned = prune.prune(run, prune_config)
            model, model_id = pruned.model, pruned.key
        summary = None
        if tokens_config is not None:
            run.config.tokens = tokens_config
            merged = tokens.merge(run, model, model_id)
            model, model_id, summary = merged.model, merged.key, merged.summary
        counts = count_params_macs(model, run.input_shape)
        fp32, record = export.export(run, model, model_id, EXPORT_VARIANT)
        if tokens_config is not None:
            self.export_diffs.append(record.check["max_abs_vs_torch"])
        models, _ = passes.apply(run, fp32, record, *self._int8_chain(run, budget))
        wanted = {int8_name or f"{name}-int8": models["int8"]}
        if fp32_row:
            wanted = {name: models["fused"], **wanted}  # the float row as the recipes run it: fused
        for row_name, proto in wanted.items():
            variant = passes.write_variant(run, row_name, proto, counts, file_name=f"{row_name}.onnx")
            self._add(
                run,
                variant,
                group,
                runtime="onnxruntime",
                int8=row_name.endswith("int8"),
                schedule=summary["schedule"] if summary else None,
                pruned=prune_config is not None,
            )
        return summary

    def lite_pqv(self) -> None:
        """PQV-Mobile's recipe, as bench/pqv_mobile.py runs it."""
        run = self.run
        model = pqv_recipe_prune(run.dense_model, run.calibration_images, run.dataset.labels("calibrate"))
        path = self.output / "pqv-recipe.ptl"
        with quantized_engine(ENGINE):
            save_lite(dynamic_int8_linear(model, ENGINE), torch.from_numpy(run.calibration_images[:1]), path, ENGINE)
            key = cache_key(pqv=run.weights_id, ratio=PQV_RATIO, calibration=run.fingerprint("calibrate"))
            counts = count_params_macs(model, run.input_shape)
            variant = Variant(
                "pqv-recipe",
                "torch-lite",
                cache_key(lite=key, int8=True, engine=ENGINE, torch=torch.__version__),
                module=load_lite(path),
                path=path,
                size_bytes=path.stat().st_size,
                counts=counts,
            )
            self._add(
                run, variant, "deit_tiny", runtime=f"torch-lite ({ENGINE})", int8=True, schedule=None, pruned=True
            )

    time_all = Bench.time_all  # every row timed together, the Lite one under its x86 int8 engine


def table(bench: TokenBench) -> list[dict[str, Any]]:
    references = {"deit_tiny": bench.rows["fp32"], "deit_small": bench.rows.get("small")}
    rows = []
    for row in bench.rows.values():
        reference = references[row["group"]]
        assert reference is not None
        scores = score(row["logits"], bench.labels, reference["logits"])
        base = score(reference["logits"], bench.labels, reference["logits"])["top1"]
        median = row["latency_ms"]["median"]
        int8_name = "int8" if row["group"] == "deit_tiny" else "small-int8"
        rows.append(
            {
                **{k: v for k, v in row.items() if k != "logits"},
                **scores,
                "top1_drop": round(base - scores["top1"], 3),
                "median_ms": median,
                "p90_ms": row["latency_ms"]["p90"],
                "speedup_vs_fp32": round(reference["latency_ms"]["median"] / median, 3),
                "speedup_vs_int8": round(bench.rows[int8_name]["latency_ms"]["median"] / median, 3),
            }
        )
    return rows


def _fastest(rows: list[dict[str, Any]], drop: float, **match: Any) -> dict[str, Any] | None:
    chosen = [r for r in rows if r["top1_drop"] <= drop and all(r.get(k) == v for k, v in match.items())]
    return min(chosen, key=lambda r: r["median_ms"]) if chosen else None


def headline(rows: list[dict[str, Any]], bench: TokenBench, gemm: float | None) -> dict[str, Any]:
    by_name = {r["name"]: r for r in rows}
    tiny = [r for r in rows if r["group"] == "deit_tiny" and r["runtime"] == "onnxruntime"]
    merged = [r for r in tiny if r["schedule"]]
    fp32_best = _fastest(merged, 0.5, int8=False)
    int8_best = _fastest(merged, 1.0, int8=True)
    within2 = _fastest(tiny, 2.0)
    pqv = by_name["pqv-recipe"]
    beats_pqv = _fastest(tiny, min(PQV_TOP1_DROP, pqv["top1_drop"]) - 1e-9)
    small = by_name.get(f"{SMALL_NAME}-int8")

    def field(row: dict[str, Any] | None, key: str) -> Any:
        return row[key] if row else None

    return {
        "tokens_fp32_speedup_vs_fp32": field(fp32_best, "speedup_vs_fp32"),
        "tokens_fp32_top1_drop": field(fp32_best, "top1_drop"),
        "tokens_fp32_model": field(fp32_best, "name"),
        "tokens_int8_speedup_vs_fp32": field(int8_best, "speedup_vs_fp32"),
        "tokens_int8_speedup_vs_int8": field(int8_best, "speedup_vs_int8"),
        "tokens_int8_top1_drop": field(int8_best, "top1_drop"),
        "tokens_int8_model": field(int8_best, "name"),
        "fastest_within_2pt_speedup_vs_fp32": field(within2, "speedup_vs_fp32"),
        "fastest_within_2pt_top1_drop": field(within2, "top1_drop"),
        "fastest_within_2pt_model": field(within2, "name"),
        "speedup_vs_pqv_recipe": round(pqv["median_ms"] / beats_pqv["median_ms"], 3) if beats_pqv else None,
        "top1_drop": field(beats_pqv, "top1_drop"),
        "pqv_recipe_model": field(beats_pqv, "name"),
        "pqv_recipe_top1_drop": pqv["top1_drop"],
        "int8_speedup_vs_fp32": by_name["int8"]["speedup_vs_fp32"],
        "deit_small_tokens_int8_speedup_vs_int8": field(small, "speedup_vs_int8"),
        "export_max_abs_diff": max(bench.export_diffs) if bench.export_diffs else None,
        "machine_int8_gemm_speedup": gemm,
        "evaluate_images": len(bench.labels),
    }


FAMILIES = {"tome-r": "constant r", "tome-alt-r": "alternate r"}  # row-name prefix -> schedule shape


def _family(row: dict[str, Any]) -> str | None:
    """The row-name prefix of a constant-r or alternate-r row (drawn as a line), else None (a point)."""
    name = row["name"]
    return next((p for p in FAMILIES if name.startswith(p) and name[len(p) :][:1].isdigit()), None)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = latency_axes()
    tiny = [r for r in rows if r["group"] == "deit_tiny"]
    for prefix, shape in FAMILIES.items():
        for int8, marker, label in ((False, "o", "fp32 (fused)"), (True, "s", "+ int8")):
            points = sorted((r["median_ms"], r["top1"]) for r in tiny if _family(r) == prefix and r["int8"] == int8)
            if points:
                ax.plot(*zip(*points), marker=marker, lw=0.8, label=f"merged, {shape}, {label}")
    for r in tiny:
        if _family(r) is None:
            mark(ax, r)
    finish_latency_plot(fig, ax, "DeiT-tiny: token merging, int8, pruning (ONNX Runtime) vs PQV-Mobile (Lite)", path)


def main() -> None:
    args = arguments(
        __doc__,
        "bench-tokens",
        rs=dict(default="4,8,10,12,16", help="constant r values"),
        alternate_rs=dict(default="12,13,14,16", help="r values of the alternate shape (2r in every other block)"),
        eval_images=dict(type=int, default=None, help="evaluate on the first N evaluation images (a dry run)"),
    ).parse_args()
    bench = TokenBench(args.output.resolve(), args.quiet, args.eval_images)
    example_tokens = bench.run.config.tokens
    assert example_tokens is not None
    bench.onnx_arm("fp32", None, int8_name="int8")
    for r in (int(v) for v in args.rs.split(",") if v):
        bench.onnx_arm(f"tome-r{r}", TokensConfig(r=r))
    for r in (int(v) for v in args.alternate_rs.split(",") if v):
        bench.onnx_arm(f"tome-alt-r{r}", TokensConfig(r=r, schedule="alternate"))
    bench.onnx_arm("tome-search", example_tokens, fp32_row=False)
    bench.onnx_arm("taylor-tome", example_tokens, PRUNE, fp32_row=False)
    bench.lite_pqv()

    small = TokenBench._open(
        bench.output / "small",
        args.quiet,
        args.eval_images,
        name="deit_small_patch16_224",
        checkpoint=None,
        random_init=True,
    )
    bench.onnx_arm("small", None, run=small, group="deit_small", budget=False)
    bench.onnx_arm(SMALL_NAME, SMALL, run=small, group="deit_small", budget=False)

    bench.time_all()
    fp32 = bench.variants["fp32"].proto
    assert fp32 is not None
    threads = bench.run.config.benchmark.threads
    gemm = gemm_speedup(linear_shapes(fp32, bench.run.input_shape, 1), threads, reduce_range=False)["int8_gemm_speedup"]
    rows = table(bench)
    print_table(
        rows,
        [
            "name",
            "group",
            "int8",
            "top1",
            "top1_drop",
            "agree_top1",
            "sqnr_db",
            "macs",
            "median_ms",
            "speedup_vs_fp32",
            "speedup_vs_int8",
            "size_mb",
        ],
    )
    head = headline(rows, bench, gemm)
    finish(args.json, rows, head, plot, bench.output / "token_merging.png", machine=machine_summary())


if __name__ == "__main__":
    main()
