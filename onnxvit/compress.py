"""`onnxvit compress`: the stages in order, for one YAML config.

Each stage's result is cached by content (see engine.py), so a repeated run only re-reads files;
images are decoded only when something that needs them has to run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onnxvit import __version__
from onnxvit.config import DENSE_VARIANT, EXPORT_VARIANT, TORCH_VARIANT, ExecutorConfig, load_config
from onnxvit.engine import Cache
from onnxvit.errors import UserError
from onnxvit.fileio import atomic_write_bytes, atomic_write_json
from onnxvit.progress import Reporter
from onnxvit.report import write_report
from onnxvit.stages import benchmark, evaluate, export, mobile, passes, profile, prune, report, tokens
from onnxvit.stages.load import Run
from onnxvit.variant import Variant
from passes.graph import model_sha256

RUN_MARKER = ".onnxvit-run"
CACHE_DIR = "cache"
INT8_PASSES = ("quantize_int8", "ort_dynamic")  # their outputs are paired with the Lite int8 variants


def prepare_output(folder: Path) -> None:
    """Use ``folder`` only if it is new, empty, or a previous onnxvit run: never clobber user files."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output.dir: {folder} is a file; choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / RUN_MARKER).is_file():
        raise UserError(f"output.dir: {folder} holds files that are not an onnxvit run; choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RUN_MARKER, {"onnxvit_version": __version__})


def check_inputs(run: Run) -> None:
    """Fail on a bad image folder, manifest, checkpoint, prune or tokens section, Lite engine or missing Ray
    before writing."""
    run.dataset, run.created_model  # noqa: B018
    if run.config.executor.kind == "ray":
        from onnxvit.distributed import import_ray

        import_ray()
        if run.config.executor.address is not None:  # a cluster to join: reach it now (a local one starts on use)
            run.executor  # noqa: B018
    prune.check(run)
    tokens.check(run)
    if run.config.lite is not None:
        from onnxvit.lite import check_engines

        check_engines(run.config.lite)


def compress(
    config_path: Path,
    force: bool = False,
    quiet: bool = False,
    output: Path | None = None,
    executor: str | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline; return the report (also written to the output folder). ``executor``
    (local or ray) overrides ``executor.kind``."""
    config, pass_configs = load_config(config_path)
    if output is not None:
        config.output.dir = output.resolve()
    if executor == "ray":
        config.executor = config.executor.model_copy(update={"kind": "ray"})
    elif executor == "local":
        config.executor = ExecutorConfig()
    run = Run(config, pass_configs, Reporter(quiet), Cache(config.output.dir / CACHE_DIR, force))
    try:
        with long_lived_heap() as loaded:
            return _pipeline(run, loaded)
    finally:
        run.close()


@contextmanager
def long_lived_heap() -> Iterator[Callable[[], None]]:
    """Garbage collection paused while a run loads what it keeps to its end (torch's, timm's and
    ONNX Runtime's modules, the model): none of it is garbage, yet every full collection would walk
    it. Yields the call that ends the loading: what exists then is left out of later collections
    (``gc.freeze``) until the run ends. A caller that froze objects of its own keeps its policy."""
    enabled, ours = gc.isenabled(), gc.get_freeze_count() == 0
    if ours:
        gc.disable()

    def loaded() -> None:
        if ours:
            gc.freeze()
            if enabled:
                gc.enable()

    try:
        yield loaded
    finally:
        if ours:
            gc.unfreeze()
            if enabled:
                gc.enable()


def _pipeline(run: Run, loaded: Callable[[], None] = lambda: None) -> dict[str, Any]:
    config, folder = run.config, run.config.output.dir
    started = time.perf_counter()
    with run.timed("load"):
        check_inputs(run)
    loaded()
    prepare_output(folder)

    variants: list[Variant] = []
    sections: dict[str, Any] = {}
    dense_records = []
    with run.timed("prune"):
        pruned = prune.prune(run) if config.prune is not None else None
    from onnxvit.prune import count_params_macs

    model, model_id = run.dense_model, run.weights_id
    counts = pruned.summary["dense"] if pruned is not None else count_params_macs(model, run.input_shape)
    if pruned is not None or config.tokens is not None:  # the unpruned, unmerged model is the reference
        dense_proto, dense_record = export.export(run, run.dense_model, run.weights_id, DENSE_VARIANT)
        dense_records.append(dense_record)
        variants.append(passes.write_variant(run, DENSE_VARIANT, dense_proto, counts))
    if pruned is not None:
        atomic_write_bytes(folder / "model.pruned.pt", pruned.path.read_bytes())
        sections["prune"] = {**pruned.summary, "checkpoint": "model.pruned.pt"}
        model, model_id, counts = pruned.model, pruned.key, pruned.summary["pruned"]
    if config.tokens is not None:
        with run.timed("tokens"):
            merged = tokens.merge(run, model, model_id)
        model, model_id = merged.model, merged.key
        counts = count_params_macs(model, run.input_shape)
        sections["tokens"] = merged.summary

    with run.timed("export"):
        fp32, export_record = export.export(run, model, model_id, EXPORT_VARIANT)
    with run.timed("passes"):
        models, records = passes.apply(run, fp32, export_record)
    reported = [EXPORT_VARIANT] + [s.output for s in config.passes if s.report]
    variants += [passes.write_variant(run, name, models[name], counts) for name in reported]
    with run.timed("mobile"):
        sections["handoff"] = mobile.handoff(run)
        sections["mobile"] = mobile.ort_artifacts(run, variants)
        lite, lite_notes = mobile.lite_variants(run, model, model_id, counts)
    sections["lite"] = lite_notes if config.lite is not None else None
    if config.benchmark.torch:
        from onnxvit.models import parameter_bytes

        variants.insert(
            0, Variant(TORCH_VARIANT, "torch", model_id, module=model, size_bytes=parameter_bytes(model), counts=counts)
        )
    variants += lite

    by_name = {v.name: v for v in variants}
    reference = DENSE_VARIANT if pruned is not None or config.tokens is not None else EXPORT_VARIANT
    with run.timed("evaluate"):
        scores, logits = evaluate.evaluate(run, variants, by_name[reference])
    run.close()  # every distributed measurement is done: no worker shares the cores while latency is timed
    # int8's own gain is measured against the float model its steps started from, timed beside the variants
    inputs = profile.float_inputs(records, models, reported) if config.benchmark.profile else {}
    unreported = [
        Variant(name, "onnxruntime", model_sha256(models[name]), proto=models[name])
        for name in dict.fromkeys(inputs.values())
        if name not in by_name
    ]
    with run.timed("benchmark"):
        latency = benchmark.latency(run, variants + unreported)
    if config.benchmark.profile:
        with run.timed("profile"):
            sections["profile"] = profile.profile(run, variants + unreported, by_name[EXPORT_VARIANT], latency, inputs)
    int8_steps = [s.output for s in config.passes if s.report and s.pass_ in INT8_PASSES]
    sections["parity"] = mobile.parity(run, int8_steps, [v.name for v in lite], logits)
    sections["steps"] = [r.to_json() for r in dense_records + records]
    sections["seconds"] = round(time.perf_counter() - started, 2)
    sections["timings"] = dict(run.timings)
    document = report.document(run, variants, reference, latency, scores, sections)
    write_report(document, folder)
    run.cache.record_run()
    run.reporter.log(f"report: {folder / 'report.md'}")
    return document
