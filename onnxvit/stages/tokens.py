"""Stage tokens: token merging on the (pruned) model before export, its schedule searched when asked.

The search judges candidates by fidelity on the search split against the unmerged model (as the int8
budget does) and by speed as ONNX Runtime measures each candidate's fused export, never by FLOPs: at
batch 1 the merge's own ops take back part of the saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxvit.config import TokensConfig
from onnxvit.engine import cache_key
from onnxvit.errors import UserError
from onnxvit.stages.load import Run
from passes.int8_limit import cpu_model
from passes.timing import TIMING_METHOD

VERSION = 2  # of the merge as onnxvit/tokens.py builds it: part of every merged model's cache key;
# 2: tokens stored as each block splits them, rows moved by ScatterND / Gather, the partner by ArgMax
SEARCH_VERSION = 2  # of how the search measures: 2: timed in the benchmark's rounds


@dataclass
class Merged:
    """The merged model, what the report says of it (report.json's ``tokens``) and its cache key."""

    model: Any
    summary: dict[str, Any]
    key: str


def check(run: Run) -> None:
    """A model token merging cannot apply to is a one-line error before anything runs."""
    cfg = run.config.tokens
    if cfg is not None:
        from onnxvit.tokens import check_supported, resolve_schedule

        check_supported(run.created_model, run.config.model.name)
        if cfg.search is None:
            resolve_schedule(run.created_model, cfg.r, cfg.schedule, cfg.class_token_only_last_block)
        else:
            _candidates(run.created_model, cfg)


def _candidates(model: Any, cfg: TokensConfig) -> list[tuple[str, list[int]]]:
    """The search's schedules by name; an error when none fits the model."""
    from onnxvit.tokens import resolve_schedule

    assert cfg.search is not None
    found: dict[str, list[int]] = {}
    for kind in cfg.search.schedules:
        for r in cfg.search.candidates:
            try:
                schedule = resolve_schedule(model, r, kind, cfg.class_token_only_last_block)
            except UserError:
                continue  # more tokens than a block holds: not a candidate for this model
            found.setdefault(f"{kind} r={r}", schedule)
    if not found:
        raise UserError(
            f"tokens.search.candidates: none of {cfg.search.candidates} fits this model's blocks "
            f"({model.patch_embed.num_patches} patch tokens); use smaller r"
        )
    return list(found.items())


BUDGET = {"search": {"min_sqnr_db", "min_agreement"}}  # what only filters the measured candidates


def search_schedule(run: Run, model: Any, model_id: str, cfg: TokensConfig) -> dict[str, Any]:
    """The search table and the chosen schedule: the fastest candidate within the fidelity budget.
    The candidates' measurements are cached without the budget, so a new budget only re-picks."""
    assert cfg.search is not None
    key = cache_key(
        weights=model_id,
        tokens=cfg.model_dump(mode="json", exclude=BUDGET),
        search_images=run.fingerprint("search"),
        benchmark=run.config.benchmark.model_dump(mode="json"),
        export=run.config.export.model_dump(mode="json"),
        version=VERSION,
        search_version=SEARCH_VERSION,
        timing=TIMING_METHOD,
        cpu=cpu_model(),  # timed here: a cache from another CPU is not this one's
    )
    measured = run.cache.json("token-search", key, lambda: _measure(run, model, cfg))
    return _choose(measured, cfg.search.min_sqnr_db, cfg.search.min_agreement)


def _choose(measured: dict[str, Any], min_sqnr_db: float, min_agreement: float) -> dict[str, Any]:
    """The measured candidates, each marked whether it keeps the budget, and the fastest that does."""
    rows = [
        {**row, "within_budget": row["sqnr_db"] >= min_sqnr_db and row["agree_top1"] >= min_agreement}
        for row in measured["rows"]
    ]
    allowed = [row for row in rows[1:] if row["within_budget"]]
    if not allowed:
        best = max(rows[1:], key=lambda row: row["sqnr_db"])
        raise UserError(
            f"tokens.search: no candidate keeps min_sqnr_db {min_sqnr_db:g} / min_agreement "
            f"{min_agreement:g} on the search split (best: {best['candidate']} at {best['sqnr_db']:.1f} dB, "
            f"{best['agree_top1']:.1f}%); lower the budget or add smaller candidates"
        )
    chosen = min(allowed, key=lambda row: row["latency_ms"])
    return {"rows": rows, "chosen": chosen["candidate"], "schedule": chosen["schedule"], "images": measured["images"]}


def _measure(run: Run, model: Any, cfg: TokensConfig) -> dict[str, Any]:
    """Every candidate's fidelity on the search split and its latency, timed with the unmerged model."""
    from onnxvit.export import export_onnx, torch_logits
    from onnxvit.tokens import merge_tokens
    from passes.fuse_vit import FuseVitConfig, FuseVitPass
    from passes.metrics import compare_logits
    from passes.simplify import SimplifyConfig, SimplifyPass
    from passes.timing import measure_latency, onnx_runner

    assert cfg.search is not None
    search, bench = cfg.search, run.config.benchmark
    images = run.search_images
    if len(images) == 0:
        raise UserError(
            "tokens.search: the search split is empty; set data.search_images or the manifest's search split"
        )
    candidates = _candidates(model, cfg)
    batch = [images[i : i + 16] for i in range(0, len(images), 16)]
    reference = torch_logits(model, batch)
    rows: list[dict[str, Any]] = []
    runners = {}
    ctx = run.context()
    with run.reporter.task("searching token merge schedules", len(candidates) + 1) as advance:
        for name, schedule in [("unmerged", [0] * len(model.blocks))] + candidates:
            merged = merge_tokens(model, schedule, cfg.proportional_attention, cfg.class_token_only_last_block)
            fidelity = compare_logits(reference, torch_logits(merged, batch))
            proto = export_onnx(merged, images, run.config.export)
            proto = SimplifyPass(SimplifyConfig(atol=run.config.export.atol)).run(proto, ctx)
            proto = FuseVitPass(FuseVitConfig()).run(proto, ctx)  # timed as the recipes run it
            runners[name] = onnx_runner(proto, run.input_shape, bench.threads, bench.batch_size)
            rows.append(
                {
                    "candidate": name,
                    "schedule": schedule,
                    "tokens_merged": int(sum(schedule)),
                    "sqnr_db": round(fidelity["sqnr_db"], 3),
                    "agree_top1": round(fidelity["agree_top1"], 3),
                }
            )
            advance(1)
    # in the benchmark's rounds: consecutive calls of one session per round, since a session's intra-op
    # threads keep spinning a moment after its call and would slow the next session's first call
    latency = measure_latency(runners, bench.warmup, search.runs, bench.rounds)
    base = latency["unmerged"]["median"]
    for row in rows:
        row["latency_ms"] = latency[row["candidate"]]["median"]
        row["speedup"] = round(base / row["latency_ms"], 4)
    return {"rows": rows, "images": len(images)}


def merge(run: Run, model: Any, model_id: str) -> Merged:
    """``model`` with token merging as the run's ``tokens`` section says (searched when it asks)."""
    from onnxvit.tokens import merge_tokens, resolve_schedule

    cfg = run.config.tokens
    assert cfg is not None
    search = None
    if cfg.search is None:
        schedule = resolve_schedule(model, cfg.r, cfg.schedule, cfg.class_token_only_last_block)
    else:
        search = search_schedule(run, model, model_id, cfg)
        schedule = list(search["schedule"])
    merged = merge_tokens(model, schedule, cfg.proportional_attention, cfg.class_token_only_last_block)
    summary = {
        "method": cfg.method,
        "schedule": schedule,
        "tokens_per_block": merged.tokens,
        "queries_last_block": merged.merging_blocks[-1].attn.queries,
        "proportional_attention": cfg.proportional_attention,
        "search": search,
    }
    key = cache_key(weights=model_id, tokens=cfg.model_dump(mode="json"), schedule=schedule, version=VERSION)
    run.reporter.log(
        f"tokens: merging {int(np.sum(schedule))} tokens over {len(schedule)} blocks"
        + (f" ({search['chosen']}, searched)" if search else "")
    )
    return Merged(merged, summary, key)
