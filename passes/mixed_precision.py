"""Mixed precision per block (PoMQ-ViT), chosen by a Pareto search over *measured* fidelity, latency
and size on ONNX Runtime's CPU kernels, never over bit counts.

Choices are what ONNX Runtime executes for a linear layer:

- ``float``: left as is;
- ``int8``: W8A8 through ``quantize_dynamic`` (``DynamicQuantizeMatMul``), the int8 pass's kernel;
- ``w4`` / ``w8``: weight-only ``MatMulNBits`` (block-wise 4 / 8-bit weights, float activations);
- ``a16w8``: int8 weights and int16 activations, static QDQ calibrated on the calibration split
  (ONNX Runtime has no int16 kernel here: the MatMul runs in float between Q/DQ pairs).

Which choice pays depends on the CPU's kernels: where only int8 has a kernel faster than float, a
4-bit block buys size, not speed, and costs fidelity; only a search on measured figures finds where it
pays (docs/benchmarks.md has the measurements). a16w8 is not a default choice.

The search: blocks are found from the graph (the first ``name.N`` module path a linear layer's
tensors carry: ``blocks.3`` in a ViT, ``stages.2`` in a hybrid). Each block is swapped alone from the
base choice to every other choice and measured on the search split (noise power, size), and the
uniform models are timed together once. An additive model of those figures scores any assignment in
microseconds, so NSGA-II (or enumeration, for small spaces) finds its Pareto front under the
constraints; the most spread-out points of that front, and the uniform references, are then built
and measured whole, and the measured front is what the report shows and what ``select`` picks from.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext, PassError, Requirement
from passes.blocks import REST, Assignment, Choice, find_blocks
from passes.graph import copy_model, gemms_as_matmul
from passes.int8_limit import cpu_model
from passes.mixed_precision_search import Search
from passes.ort_quant import CalibrationReader, ensure_node_names, run_ort_quantizer, weighted_nodes
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass, u8s8_saturates
from passes.timing import TIMING_METHOD

NBITS_ONLY = frozenset({"block_size", "accuracy_level", "symmetric"})


class SelectConfig(PassConfig):
    """Which measured front point becomes the pass's output: the best by ``minimize`` among those
    within the limits (all on the search split, against the pass's float input)."""

    max_top1_drop: float | None = Field(None, ge=0, description="Top-1 points below the float input (needs labels).")
    min_agreement: float | None = Field(96.0, ge=0, le=100, description="Top-1 agreement with the float input, %.")
    min_sqnr_db: float | None = Field(None, description="Logit SQNR against the float input.")
    minimize: Literal["latency", "size"] = Field("latency", description="Among the points within the limits.")


class MixedPrecisionConfig(PassConfig):
    choices: list[Choice] = Field(["float", "int8", "w4"], min_length=2, description="Per-block options.")
    rest: Choice = Field("int8", description="Linear layers outside any block (e.g. the classifier).")
    min_block_layers: int = Field(2, ge=1, description="Smaller groups (a classifier's layers) join `rest`.")
    block_size: int = Field(32, ge=16, description="MatMulNBits: weights per scale (a power of two).")
    accuracy_level: int = Field(
        0, ge=0, le=4, description="MatMulNBits compute type: 0 float, 4 int8 (measure it: it can be slower)."
    )
    symmetric: bool = Field(True, description="MatMulNBits: symmetric weights (no zero points).")
    reduce_range: bool | Literal["auto"] = Field("auto", description="int8: 7-bit weights, as quantize_int8.")
    objective: Literal["sqnr", "agreement", "top1"] = Field(
        "sqnr", description="Fidelity objective on the search split; sqnr resolves what 31 images' top-1 cannot."
    )
    # PoMQ-ViT's constraints
    allow_uniform: bool = Field(False, description="Admit searched assignments with one choice everywhere.")
    max_latency_vs_float: float | None = Field(
        1.0, gt=0, description="Candidates must run at most this fraction of the float model's latency."
    )
    max_size_vs_int8: float | None = Field(None, gt=0, description="Candidates at most this fraction of int8's size.")
    # search
    population: int = Field(32, ge=4, description="NSGA-II population per generation.")
    generations: int = Field(40, ge=0, description="NSGA-II generations (the space is enumerated when small).")
    seed: int = Field(0, description="NSGA-II random seed.")
    candidates: int = Field(8, ge=1, description="Predicted front points built and measured whole.")
    latency_runs: int = Field(60, ge=5, description="Timed runs per model when timing uniform and front models.")
    latency_warmup: int = Field(10, ge=0, description="Untimed runs per model first.")
    select: SelectConfig = Field(
        default_factory=SelectConfig, description="Which measured front point becomes the output (see below)."
    )

    @property
    def requires_labels(self) -> bool:
        return self.objective == "top1" or self.select.max_top1_drop is not None

    @model_validator(mode="after")
    def _checks(self) -> MixedPrecisionConfig:
        if not {"w4", "w8"} & {*self.choices, self.rest}:
            ignored = sorted(NBITS_ONLY & self.model_fields_set)
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)}: only used by the w4 / w8 choices, which choices and rest "
                    "do not name; remove them or add w4 / w8"
                )
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices: {self.choices} repeats an entry")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size} is not a power of two")
        return self


@register_pass
class MixedPrecisionPass(Pass):
    name = "mixed_precision"
    # 2: candidates timed as passes.timing.TIMING_METHOD 2 times them; 3: candidates' int8 layers written
    # by DynamicInt8Builder (a candidate's size is its file's, without the tensor shapes and metadata
    # ONNX Runtime's quantizer adds)
    version = 3
    Config = MixedPrecisionConfig
    config: MixedPrecisionConfig

    tabled_notes = frozenset({"points", "sensitivity"})

    def __init__(self, config: PassConfig | None = None) -> None:
        super().__init__(config)
        self.calibration: list[np.ndarray] = []

    @classmethod
    def machine_key(cls, config: PassConfig) -> dict[str, Any]:
        """The search keeps what this CPU's kernels run fastest (timed, with int8's 7-bit weights
        where u8s8 saturates): a cache from another machine or timing method is not this one's."""
        return {"cpu": cpu_model(), "u8s8_saturates": u8s8_saturates(), "timing": TIMING_METHOD}

    @classmethod
    def requirements(cls, config: PassConfig) -> frozenset[Requirement]:
        assert isinstance(config, MixedPrecisionConfig)
        needs: set[Requirement] = {"search"}
        if "a16w8" in (*config.choices, config.rest):
            needs.add("calibration")  # a16w8's activation ranges
        if config.requires_labels:
            needs.add("labels")
        return frozenset(needs)

    # ---- building one assignment -------------------------------------------------------------
    def prepare(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
        prepared = copy_model(model)
        ensure_node_names(prepared)
        gemms_as_matmul(prepared)
        layers = weighted_nodes(prepared, ["MatMul"])
        return prepared, find_blocks(prepared, layers, min_layers=self.config.min_block_layers)

    def build(
        self, prepared: onnx.ModelProto, blocks: dict[str, list[str]], assignment: Assignment, direct: bool = True
    ) -> onnx.ModelProto:
        """The model with each block's linear layers as ``assignment`` says (``rest`` from the config).
        ``direct``: int8 layers written by ``DynamicInt8Builder`` (a search builds hundreds of
        candidates); else by ONNX Runtime's quantizer, as the shipped model is."""
        cfg = self.config
        choice_of = {
            layer: assignment.get(block, cfg.rest) if block != REST else cfg.rest
            for block, layers in blocks.items()
            for layer in layers
        }
        model = prepared
        a16 = [layer for layer, c in choice_of.items() if c == "a16w8"]
        if a16:
            model = self._a16w8(model, a16)
        for bits, choice in ((4, "w4"), (8, "w8")):
            chosen = [layer for layer, c in choice_of.items() if c == choice]
            if chosen:
                model = self._nbits(model, chosen, bits)
        int8 = [layer for layer, c in choice_of.items() if c == "int8"]
        if int8:
            model = self._int8(model, int8, direct)
        return model

    def apply(
        self, model: onnx.ModelProto, assignment: Assignment, calibration: list[np.ndarray] | None = None
    ) -> onnx.ModelProto:
        """``model`` (the pass's input) with ``assignment`` (block -> choice, as a report's front point
        gives it), built as the pass ships it (a16w8 needs the same ``calibration`` batches)."""
        self.calibration = calibration or self.calibration
        prepared, blocks = self.prepare(model)
        unknown = set(assignment) - set(blocks)
        if unknown:
            raise ValueError(f"mixed_precision: blocks {sorted(unknown)} are not in this model ({sorted(blocks)})")
        return self.build(prepared, blocks, assignment, direct=False)

    def _nbits(self, model: onnx.ModelProto, layers: list[str], bits: int) -> onnx.ModelProto:
        import logging

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        keep = set(layers)
        # nodes_to_include only adds to op_types_to_quantize; exclusion is what restricts
        others = [n for n in weighted_nodes(model, ["MatMul"]) if n not in keep]
        quantizer = MatMulNBitsQuantizer(
            copy_model(model),
            bits=bits,
            block_size=self.config.block_size,
            is_symmetric=self.config.symmetric,
            accuracy_level=self.config.accuracy_level,
            nodes_to_exclude=others,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        return quantizer.model.model

    def _a16w8(self, model: onnx.ModelProto, layers: list[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not self.calibration:
            raise PassError("a16w8 needs calibration images (data.calibrate_images > 0)")
        name = model.graph.input[0].name
        samples = ({name: image[None]} for batch in self.calibration for image in batch)
        return run_ort_quantizer(
            model,
            lambda source, output: quantize_static(
                source,
                output,
                CalibrationReader(samples),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                activation_type=QuantType.QInt16,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=layers,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                },
            ),
        )

    def _int8(self, model: onnx.ModelProto, layers: list[str], direct: bool) -> onnx.ModelProto:
        reduce_range = u8s8_saturates() if self.config.reduce_range == "auto" else self.config.reduce_range
        int8 = QuantizeInt8Pass(QuantizeInt8Config(op_types=["MatMul"]))
        builder = int8.direct_builder(model, layers, reduce_range, {}) if direct else None
        if builder is not None:
            return builder.build(layers)
        return int8.quantize_layers(model, layers, reduce_range, [], {})

    # ---- the pass ------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        cfg = self.config
        if not ctx.search:
            raise PassError("needs search images; set data.search_images > 0")
        if cfg.requires_labels and ctx.search_labels is None:
            raise PassError(
                "top-1 needs labelled search images with real weights; use objective: sqnr and select.min_agreement"
            )
        if "a16w8" in (*cfg.choices, cfg.rest):
            ctx.require_calibration("mixed_precision (a16w8)")
        self.calibration = ctx.calibration
        started = time.perf_counter()
        search = Search(self, model, ctx)
        output, notes = search.run()
        notes["search_seconds"] = round(time.perf_counter() - started, 1)
        ctx.notes.update(notes)
        return output

    # ---- its report section ---------------------------------------------------------------------
    @classmethod
    def report_section(cls, step: dict[str, Any]) -> list[str]:
        notes = step.get("notes", {})
        if not notes.get("points"):
            return []
        lines = [
            "",
            f"## Mixed precision: `{step['name']}`",
            "",
            f"One character per block ({_block_span(notes['blocks'])}): F float, 8 int8, 4 w4, W w8, "
            f"A a16w8; other linear layers: {notes['points'][0]['rest']}. Measured on the search split "
            f"against the float input; {notes['explored']} assignments scored by the per-block model, "
            f"{len(notes['points'])} built and timed together. "
            f"Chosen: `{notes['chosen']}` ({notes['select']}).",
            "",
            "| assignment | front | top-1 % (search) | agree % | SQNR dB | median ms | x float | size MB | "
            "x int8 | constraints |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(notes["points"], key=lambda p: p["latency_ms"]):
            mark = "**chosen**" if p["name"] == notes["chosen"] else ("yes" if p["on_front"] else "")
            label = p["name"] if p["reference"] else f"`{p['code']}`"
            top1 = "-" if p["top1"] is None else f"{p['top1']:.2f}"
            lines.append(
                f"| {label} | {mark} | {top1} | {p['agreement']:.1f} | {p['sqnr_db']:.2f} | "
                f"{p['latency_ms']:.2f} | {p['latency_vs_float']:.2f} | {p['size_bytes'] / 1e6:.2f} | "
                f"{p['size_vs_int8']:.2f} | {'; '.join(p['violates']) or 'ok'} |"
            )
        return lines + ["", f"![Pareto front of {step['name']}]({front_plot_name(step['name'])})"]

    @classmethod
    def report_figures(cls, step: dict[str, Any]) -> dict[str, Any]:
        """The measured points, logit SQNR (the search objective: a few dozen images' top-1 moves in steps
        of several points) against latency and against size: the two faces of a 3-D front."""
        notes = step.get("notes", {})
        if not notes.get("points"):
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120, sharey=True)
        for ax, key, label, scale in (
            (axes[0], "latency_ms", "median latency, ms", 1.0),
            (axes[1], "size_bytes", "size, MB", 1e-6),
        ):
            for p in notes["points"]:
                color = "tab:red" if p["name"] == notes["chosen"] else ("tab:blue" if p["on_front"] else "tab:gray")
                x = p[key] * scale
                ax.scatter([x], [p["sqnr_db"]], s=40, color=color, alpha=0.7, marker="s" if p["reference"] else "o")
                ax.annotate(
                    p["name"] if p["reference"] else p["code"],
                    (x, p["sqnr_db"]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=6,
                )
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("logit SQNR vs float, dB (search split)")
        fig.suptitle(f"{step['name']}: blue on the front, red chosen, squares uniform", fontsize=9)
        return {front_plot_name(step["name"]): fig}


def front_plot_name(step: str) -> str:
    return f"pareto_{step}.png"


def _block_span(blocks: dict[str, int]) -> str:
    names = [b for b in blocks if b != REST]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
