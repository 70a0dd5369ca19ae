"""int8 linear layers through ONNX Runtime's own quantizers, with an optional accuracy budget.

What is fast on a CPU was measured, not assumed (DeiT-tiny, 2 threads, this project's AVX2 CPU
without VNNI):

- Only the linear layers (MatMul / Gemm with a constant weight) are quantized; quantizing every op,
  as ONNX Runtime's defaults do, is slower than FP32 and loses accuracy.
- ``mode: dynamic`` (the default) gives ``DynamicQuantizeMatMul``: activations quantized per call
  inside the kernel, with no separate ``QuantizeLinear`` op as static QDQ has, and per-input
  ranges are more faithful than calibrated ones (docs/guide.md has the measurements).
  ``mode: static`` (QDQ, calibrated) stays for targets that need fixed ranges.
- ``reduce_range``: x86 CPUs without VNNI multiply uint8 x int8 pairs with a saturating 16-bit
  instruction; 7-bit weights avoid the saturation, which costs more fidelity than the lost bit.
  ``auto`` turns it on only on such CPUs.
- ``weight_type: auto``: on such a CPU, uint8 weights run on ONNX Runtime's uint8 x uint8 kernel,
  which does not saturate and keeps all 8 bits; some CPUs run it as fast as the 7-bit uint8 x int8
  kernel, others slower. So it is measured at the model's own layer shapes, and uint8 is taken
  unless every round of the timing finds it slower by more than ``U8U8_TOLERANCE`` (a median
  alone flips between runs where the two kernels are about as fast); int8 everywhere else.
"""

from __future__ import annotations

import dataclasses
import platform
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from passes import register_pass
from passes.accuracy_budget import AloneProbe, Budget, FidelityProbe, fit_budget
from passes.base import Pass, PassConfig, PassContext, PassError, Requirement, count_ops
from passes.graph import (
    GraphIndex,
    constants_as_initializers,
    copy_model,
    find_bridges,
    gemms_as_matmul,
    model_sha256,
    same_computation,
)
from passes.int8_layers import DynamicInt8Builder
from passes.int8_limit import cpu_model, linear_shapes, u8u8_speed
from passes.module_names import node_modules
from passes.ort_quant import CalibrationReader, FloatValues, ensure_node_names, run_ort_quantizer, weighted_nodes
from passes.qattention import QAttentionPass
from passes.runtime import batches
from passes.static_layers import StaticLayerSplicer, tensor_subset
from passes.timing import TIMING_METHOD, time_ratio
from passes.weight_schemes import Overrides, QuantizedWeight, WeightScheme, WeightTuner, scheme_overrides

QuantTypeName = Literal["int8", "uint8"]


# options that decide only what the budget keeps, or what is done after it: the weight schemes and
# the layer ranking of a step are reused across them (PassContext.reuse)
BUDGET_ONLY = frozenset(
    {"min_sqnr_db", "min_agreement", "max_float_layers", "ranking_images", "kept_layers", "qattention"}
)
U8U8_TOLERANCE = 1.05  # weight_type auto: u8u8 taken unless every round times it this much slower than 7-bit u8s8
STATIC_ONLY = frozenset({"calibrate_method", "percentile", "activation_type", "quantize_outputs", "extra_options"})


class QuantizeInt8Config(PassConfig):
    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: activation ranges per call (DynamicQuantizeMatMul); static: calibrated QDQ."
    )
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    weight_type: QuantTypeName | Literal["auto"] = Field(
        "auto",
        description="Weight integer type. auto: int8; on x86 without VNNI (reduce_range: auto, dynamic mode), "
        "full-range uint8 on ONNX Runtime's u8u8 kernel instead of 7-bit int8 where that kernel measures as "
        "fast at the model's layer shapes.",
    )
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights; auto: on x86 CPUs without VNNI, where uint8 x int8 saturates."
    )
    op_types: list[str] = Field(["MatMul", "Gemm"], min_length=1, description="Op types to quantize.")
    weighted_only: bool = Field(
        True, description="Quantize only nodes with a constant (initializer) input, i.e. linear layers."
    )
    exclude_nodes: list[str] = Field([], description="Node names kept in float.")
    bridges: Literal["int8", "float"] = Field(
        "int8", description="Hybrids: the layers on either side of a conv <-> token bridge (found from the graph)."
    )
    schemes: Literal["fixed", "search"] = Field(
        "fixed",
        description="Weights: fixed: per_channel, symmetric, for every layer; search: per layer, per-channel "
        "or per-tensor, symmetric or asymmetric, then clipped, whichever gives its output the least error on "
        "calibration images (measured with ONNX Runtime's kernels).",
    )
    reconstruct_bridges: bool = Field(
        False,
        description="Hybrids: tune the weight clipping of each conv <-> token bridge block's quantized layers "
        "to the block's least output error on calibration images.",
    )
    # static mode
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "percentile", description="static: ONNX Runtime calibrator for activation ranges."
    )
    percentile: float = Field(99.999, gt=50, le=100, description="static: kept range, for the percentile calibrator.")
    activation_type: QuantTypeName = Field("uint8", description="static: activation integer type.")
    quantize_outputs: bool = Field(
        False, description="static: also quantize the outputs of the quantized ops (QDQ after Gemm / MatMul)."
    )
    calibration_images: int | None = Field(
        None, gt=0, description="Use at most this many calibration images (static ranges, schemes, reconstruction)."
    )
    extra_options: dict[str, Any] = Field({}, description="static: passed to quantize_static's extra_options as is.")
    # accuracy budget, measured on the search split against this pass's input
    min_sqnr_db: float | None = Field(None, description="Budget: logit SQNR vs the float input on the search split.")
    min_agreement: float | None = Field(
        None, ge=0, le=100, description="Budget: top-1 agreement (%) with the float input on the search split."
    )
    max_float_layers: int = Field(8, ge=0, description="Budget: at most this many layers kept in float.")
    ranking_images: int | None = Field(
        None,
        gt=0,
        description="Budget: rank the layers by harm on at most this many search images, those where the fully "
        "int8 model is farthest from float (default: all). Faster; each model the budget keeps or rejects is "
        "still measured on every search image.",
    )
    kept_layers: Literal["float", "u8u8"] = Field(
        "float",
        description="Budget: what the layers it keeps out of int8 become. float; or u8u8: full-range 8-bit "
        "uint8 weights (ONNX Runtime's uint8 x uint8 kernel, which does not saturate on x86 without VNNI), "
        "each layer moved only where the model still meets the budget on the search split.",
    )

    qattention: bool | Literal["auto"] = Field(
        False,
        description="dynamic: each attention block's int8 qkv projection and its MultiHeadAttention (from "
        "fuse_vit) as one ONNX Runtime QAttention (the qattention pass), without the Split and the transposes "
        "of q, k and v; with a budget, only where the whole model still meets it. auto: also only where it "
        "runs faster on this CPU, timed against the plain int8 model at the benchmark's threads and batch: "
        "faster in every timing round.",
    )

    @model_validator(mode="after")
    def _checks(self) -> QuantizeInt8Config:
        if self.mode == "dynamic":
            ignored = sorted(STATIC_ONLY & self.model_fields_set)
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)}: only used with mode: static (dynamic mode measures "
                    "activation ranges per call); remove them or set mode: static"
                )
        if self.qattention and self.mode == "static":
            raise ValueError("qattention: only with mode: dynamic (QAttention reads a per-call input range)")
        if self.reconstruct_bridges and self.bridges == "float":
            raise ValueError(
                "reconstruct_bridges: the bridge layers are kept float (bridges: float); set bridges: int8 to tune them"
            )
        return self


@lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Whether this CPU runs ONNX Runtime's uint8 x int8 kernels with 16-bit saturation (x86, no VNNI)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def fixed_input_shape(model: onnx.ModelProto) -> tuple[int, ...] | None:
    """The image input's shape past the batch, where every dimension is fixed: what a timing of the
    model (or of its layers' shapes) feeds; None where one is symbolic."""
    dims = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    return dims if dims and all(dims) else None


def exact_product(weight: QuantizedWeight) -> bool:
    """Whether ONNX Runtime's dynamic kernel multiplies ``weight``'s integers exactly on this CPU: always
    for uint8 weights (u8u8) and where uint8 x int8 does not saturate; there, only while every
    pair of products fits 16 bits, i.e. integers within 7 bits (a clipped 7-bit scale may pass them)."""
    if weight.values.dtype == np.uint8 or not u8s8_saturates():
        return True
    return bool(np.abs(weight.values.astype(np.int16)).max(initial=0) <= 64)


@register_pass
class QuantizeInt8Pass(Pass):
    name = "quantize_int8"
    version = 6  # 3: weight-scheme trials scored by SqnrAgainst with float64 pairwise sums, where they run;
    # 4: weight_type auto (uint8 on the u8u8 kernel where measured as fast as 7-bit u8s8);
    # 5: weight_type auto decided over timing rounds (uint8 unless every round finds u8u8 slower);
    # 6: those kernels timed as several layers per call, no other session's threads spinning
    Config = QuantizeInt8Config
    config: QuantizeInt8Config
    tabled_notes = frozenset({"schemes", "bridge_reconstruction", "modules", "sensitivity"})
    _excluded: list[str] | None = None  # exclude_nodes and, with bridges: float, the bridge layers
    _weight_type: QuantTypeName = "int8"  # weight_type as resolved for this machine

    @classmethod
    def machine_key(cls, config: PassConfig) -> dict[str, Any]:
        assert isinstance(config, QuantizeInt8Config)
        key: dict[str, Any] = {}
        if config.reduce_range == "auto" or config.weight_type == "auto":
            key.update(u8s8_saturates=u8s8_saturates(), cpu=cpu_model())
        if config.qattention == "auto":  # timed here
            key.update(cpu=cpu_model(), timing=TIMING_METHOD)
        return key

    @classmethod
    def requirements(cls, config: PassConfig) -> frozenset[Requirement]:
        assert isinstance(config, QuantizeInt8Config)
        needs: set[Requirement] = set()
        if config.mode == "static" or config.schemes == "search" or config.reconstruct_bridges:
            needs.add("calibration")
        if Budget(config.min_sqnr_db, config.min_agreement).active:
            needs.add("search")
        return frozenset(needs)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        cfg = self.config
        budget = Budget(cfg.min_sqnr_db, cfg.min_agreement)
        if cfg.mode == "static":
            ctx.require_calibration("quantize_int8 (static)")
        if budget.active and not ctx.search:
            raise PassError("an accuracy budget needs search images; set data.search_images > 0")
        prepared = copy_model(model)
        ensure_node_names(prepared)
        if cfg.mode == "dynamic":
            gemms_as_matmul(prepared)
        self._weight_type = self._resolve_weight_type(prepared, ctx)
        if cfg.reduce_range == "auto":
            reduce_range = u8s8_saturates() and self._weight_type == "int8"  # u8u8 does not saturate
        else:
            reduce_range = cfg.reduce_range
        weights = {name for node in prepared.graph.node if node.op_type in cfg.op_types for name in node.input[1:]}
        constants_as_initializers(prepared, weights)  # a Conv weight folded by the exporter is a Constant node
        bridges = find_bridges(prepared)
        bridge_layers = {b[side] for b in bridges for side in ("conv", "linear")} if cfg.bridges == "float" else set()
        excluded = set(cfg.exclude_nodes) | bridge_layers
        self._excluded = sorted(excluded) or None
        candidates = weighted_nodes(prepared, cfg.op_types)
        layers = [n for n in candidates if n not in excluded]
        modules = node_modules(prepared.graph)
        ctx.notes["modules"] = {layer: modules.get(layer, layer) for layer in candidates}
        if bridges:
            ctx.notes.update(bridges=bridges, bridges_float=sorted(bridge_layers & set(candidates)))
        calibration = ctx.calibration_batches(cfg.calibration_images)
        # what the schemes and the ranking depend on: every option but the budget's, as resolved here
        depends = {
            **self.config.model_dump(mode="json", exclude=set(BUDGET_ONLY)),
            "weight_type": self._weight_type,
            "reduce_range": reduce_range,
            "layers": layers,
        }
        overrides = self._tune_weights(prepared, layers, bridges, reduce_range, calibration, ctx, depends)

        def quantize(nodes: list[str] | None) -> onnx.ModelProto:
            return self.quantize_layers(prepared, nodes, reduce_range, calibration, overrides)

        quantized_count: int | None
        probe: FidelityProbe | None = None
        if budget.active:
            probe = FidelityProbe(model, ctx.search, ctx.threads, ctx.executor)
            builder = self.direct_builder(prepared, layers, reduce_range, overrides)
            candidate = quantize if builder is None else builder.build
            alone = None
            values = FloatValues(prepared, ctx.search, ctx.input_name, ctx.threads, ctx.executor)
            ranking = {**depends, "ranking_images": cfg.ranking_images}
            if builder is not None:
                alone = AloneProbe(prepared, builder.build, probe, values)
            elif cfg.mode == "static":  # each layer alone without a whole-model calibration each
                splicer = StaticLayerSplicer(
                    prepared,
                    layers,
                    lambda piece, nodes, feeds: self.quantize_layers(
                        piece, nodes, reduce_range, feeds, tensor_subset(overrides, piece)
                    ),
                    FloatValues(prepared, calibration, ctx.input_name, ctx.threads, ctx.executor),
                    quantize,
                )
                alone = AloneProbe(prepared, splicer.build, probe, values)
                ranking["layers_alone"] = "spliced"
            searched, notes = fit_budget(
                layers,
                candidate,
                probe,
                budget,
                cfg.max_float_layers,
                ctx.log,
                alone,
                cfg.ranking_images,
                lambda name, produce: ctx.reuse(name, ranking, produce),
            )
            for entry in notes.get("sensitivity", []):
                entry["module"] = modules.get(entry["layer"], entry["layer"])
            kept = set(notes["kept_float"])
            quantized = quantize([layer for layer in layers if layer not in kept])
            if builder is not None:  # what ships is the quantizer's model: the searched one, or else measured
                same = same_computation(quantized, searched)
                if not same:
                    shipped = probe(quantized).rounded()
                    same = shipped == notes["search_fidelity"]
                    if not same:
                        ctx.log(
                            f"int8: the quantizer's model measures {shipped}, "
                            f"the searched one {notes['search_fidelity']}"
                        )
                        notes["search_fidelity"] = shipped
                notes["search_model_equals_quantizer_output"] = same
            if cfg.kept_layers == "u8u8" and kept:
                quantized = self._kept_as_u8u8(quantized, notes, probe, budget, ctx)
            ctx.notes.update(notes)
            quantized_count = len(layers) - len(notes["kept_float"])
        else:
            quantized = quantize(layers if cfg.weighted_only else None)
            quantized_count = len(layers) if cfg.weighted_only else None
        if cfg.qattention:  # the config refuses it with mode: static
            quantized = self._as_qattention(quantized, probe, budget, ctx)
        ctx.notes.update(
            mode=cfg.mode, weight_type=self._weight_type, reduce_range=reduce_range, quantized_nodes=quantized_count
        )
        ctx.notes.update(count_ops(quantized, "QuantizeLinear", "DynamicQuantizeLinear"))
        return quantized

    def _as_qattention(
        self, model: onnx.ModelProto, probe: FidelityProbe | None, budget: Budget, ctx: PassContext
    ) -> onnx.ModelProto:
        """``model``'s attention blocks as QAttention (``passes.qattention``). Its float attention rounds
        differently, which can move a later layer's dynamic input range by a step: with a budget, the
        rewritten model ships only where it still meets it."""
        found: dict[str, Any] = {}
        rewritten = QAttentionPass().run(model, PassContext(notes=found))
        ctx.notes["qattention"] = 0
        if not found["fused"]:
            return model
        fidelity = None
        if probe is not None:
            fidelity = probe(rewritten)
            if not budget.met(fidelity):
                ctx.log(f"int8: with QAttention the model measures {fidelity.rounded()}, below the budget; not used")
                return model
        if self.config.qattention == "auto" and not self._qattention_faster(model, rewritten, ctx):
            return model
        if fidelity is not None:
            ctx.notes["search_fidelity"] = fidelity.rounded()
        ctx.notes["qattention"] = found["fused"]
        return rewritten

    def _qattention_faster(self, model: onnx.ModelProto, rewritten: onnx.ModelProto, ctx: PassContext) -> bool:
        """Whether ``rewritten`` (with QAttention) runs faster than ``model`` in every timing round here;
        timed once per pair of models and machine (a new budget that ships the same model reuses it)."""
        dims = fixed_input_shape(model)
        if dims is None:
            ctx.log("int8: the input's shape is not fixed, so QAttention cannot be timed; not used")
            return False
        measured = ctx.reuse(
            "qattention-speed",
            {"models": [model_sha256(model), model_sha256(rewritten)], "timing": TIMING_METHOD},
            lambda: time_ratio(model, rewritten, dims, ctx.threads, ctx.batch_size),
        )
        ratio, rounds = measured["time_ratio"], measured["round_ratios"]
        ctx.notes.update(qattention_time_ratio=ratio, qattention_round_ratios=rounds)
        faster = bool(rounds) and max(rounds) < 1.0
        ctx.log(f"int8: with QAttention {ratio}x the time here: {'used' if faster else 'not used'}")
        return faster

    def _resolve_weight_type(self, model: onnx.ModelProto, ctx: PassContext) -> QuantTypeName:
        """``weight_type``, with ``auto`` measured on this CPU (see the module's docstring)."""
        cfg = self.config
        if cfg.weight_type != "auto":
            return cfg.weight_type
        if cfg.mode != "dynamic" or cfg.reduce_range != "auto" or not u8s8_saturates():
            return "int8"
        dims = fixed_input_shape(model)
        if dims is None:
            return "int8"
        shapes = linear_shapes(model, dims, ctx.batch_size)
        # timed once per model and machine: a new budget keeps the kernel the first run chose
        measured = ctx.reuse(
            "u8u8-speed",
            {"shapes": [str(shape) for shape in shapes], "timing": TIMING_METHOD},
            lambda: u8u8_speed(shapes, ctx.threads),
        )
        ratio, rounds = measured["u8u8_time_ratio"], measured["round_ratios"]
        ctx.notes.update(u8u8_time_ratio=ratio, u8u8_round_ratios=rounds)
        # slower only where every round says so: a kernel as fast within noise keeps its 8 bits every run
        chosen: QuantTypeName = "uint8" if rounds and min(rounds) <= U8U8_TOLERANCE else "int8"
        ctx.log(f"int8: u8u8 GEMM {ratio}x the time of 7-bit u8s8 here: {chosen} weights")
        return chosen

    def _kept_as_u8u8(
        self, model: onnx.ModelProto, notes: dict[str, Any], probe: FidelityProbe, budget: Budget, ctx: PassContext
    ) -> onnx.ModelProto:
        """The budget's float layers moved, least harmful first, to full-range uint8 weights one at a
        time, each kept only where the whole model still meets ``budget``; ``notes`` say which moved."""
        produced = {output for node in model.graph.node for output in node.output}
        moved: list[str] = []
        for layer in reversed(notes["kept_float"]):  # ranked most harmful first
            node = next(n for n in model.graph.node if n.name == layer)
            if f"{node.input[0]}_quantized" in produced:  # its input is quantized for another layer already
                continue
            trial = DynamicInt8Builder(model, [layer], onnx.TensorProto.UINT8, reduce_range=False).build([layer])
            fidelity = probe(trial)
            ctx.log(f"int8: {layer} with uint8 weights (u8u8): {fidelity.sqnr_db:.2f} dB")
            if budget.met(fidelity):
                model, notes["search_fidelity"] = trial, fidelity.rounded()
                produced |= {output for n in trial.graph.node for output in n.output}
                moved.append(layer)
        notes["u8u8"] = moved
        notes["kept_float"] = [layer for layer in notes["kept_float"] if layer not in moved]
        return model

    @property
    def _qtype(self) -> int:
        """The ONNX element type of the weights, as ``weight_type`` resolved here."""
        return onnx.TensorProto.INT8 if self._weight_type == "int8" else onnx.TensorProto.UINT8

    def _tune_weights(
        self,
        model: onnx.ModelProto,
        layers: list[str],
        bridges: list[dict[str, Any]],
        reduce_range: bool,
        calibration: list[np.ndarray],
        ctx: PassContext,
        depends: dict[str, Any],
    ) -> Overrides:
        """Per-layer weight schemes and bridge clipping, measured (or reused: ``depends`` names what
        they depend on); the notes say what each layer got."""
        cfg = self.config
        tuned_bridges = bridges if cfg.reconstruct_bridges else []
        if cfg.schemes == "fixed" and not tuned_bridges:
            return {}
        ctx.require_calibration("quantize_int8 (schemes / reconstruct_bridges)")

        measured = ctx.reuse(
            "weight-schemes",
            depends,
            lambda: self._measure_schemes(model, layers, tuned_bridges, reduce_range, calibration, ctx),
        )
        ctx.notes.update(measured["notes"])
        schemes = {layer: WeightScheme(**scheme) for layer, scheme in measured["schemes"].items()}
        return scheme_overrides(GraphIndex(model), schemes, self._qtype, reduce_range)

    def _measure_schemes(
        self,
        model: onnx.ModelProto,
        layers: list[str],
        bridges: list[dict[str, Any]],
        reduce_range: bool,
        calibration: list[np.ndarray],
        ctx: PassContext,
    ) -> dict[str, Any]:
        """The schemes per layer as JSON, and the notes on what each layer (and each of ``bridges``) got."""
        cfg = self.config
        notes: dict[str, Any] = {}
        # each layer's inputs at the deploy batch: a dynamic layer's activation range is the batch's
        deployed = batches(np.concatenate(calibration), ctx.batch_size)
        values = FloatValues(model, deployed, ctx.input_name, ctx.threads, ctx.executor)
        exact = exact_product if cfg.mode == "dynamic" else None
        work = len(layers) * (cfg.schemes == "search") + len(bridges)
        with ctx.progress("int8: weight schemes", work) as advance:
            tuner = WeightTuner(
                model,
                layers,
                partial(self._quantize_piece, reduce_range),
                values,
                self._qtype,
                reduce_range,
                ctx.threads,
                advance,
                ctx.executor,
                exact,
            )
            default = WeightScheme(per_channel=cfg.per_channel)
            schemes = {layer: default for layer in tuner.layers}
            if cfg.schemes == "search":
                schemes, notes["schemes"] = tuner.choose_schemes(default)
            if bridges:
                schemes, notes["bridge_reconstruction"] = tuner.reconstruct(bridges, schemes)
        return {"schemes": {layer: dataclasses.asdict(scheme) for layer, scheme in schemes.items()}, "notes": notes}

    def _quantize_piece(
        self,
        reduce_range: bool,
        piece: onnx.ModelProto,
        nodes: list[str],
        overrides: Overrides,
        feeds: list[dict[str, np.ndarray]],
    ) -> onnx.ModelProto:
        """A piece of the model with ``nodes`` quantized, for the weight tuner: by the direct builder
        where it applies, else by ONNX Runtime's quantizer on ``feeds``."""
        builder = self.direct_builder(piece, nodes, reduce_range, overrides)
        if builder is not None:
            return builder.build(nodes)
        return self.quantize_layers(piece, nodes, reduce_range, feeds, overrides)

    def direct_builder(
        self, model: onnx.ModelProto, layers: list[str], reduce_range: bool, overrides: Overrides
    ) -> DynamicInt8Builder | None:
        """The direct writer of this pass's dynamic int8 layers for searches, where it applies."""
        if self.config.mode != "dynamic" or not self.config.weighted_only:
            return None
        try:
            return DynamicInt8Builder(model, layers, self._qtype, reduce_range, self.config.per_channel, overrides)
        except ValueError:  # a layer it does not write (a weight from a Constant node): the quantizer
            return None

    def quantize_layers(
        self,
        model: onnx.ModelProto,
        nodes: list[str] | None,
        reduce_range: bool,
        samples: list[np.ndarray] | list[dict[str, np.ndarray]],
        overrides: Overrides,
    ) -> onnx.ModelProto:
        """Quantize ``nodes`` (None: every op of ``op_types``) with ONNX Runtime's quantizer; ``samples`` are
        calibration batches for the model's image input or feeds for a piece of it (static mode);
        ``overrides`` are explicit per-weight scales and zero points."""
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        cfg = self.config
        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        if nodes is not None and not nodes:
            return model
        # explicit scales come as per-channel lists (the same entry repeated for a per-tensor scheme)
        per_channel = cfg.per_channel or bool(overrides)
        if cfg.mode == "dynamic":
            return run_ort_quantizer(
                model,
                lambda source, output: quantize_dynamic(
                    source,
                    output,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    weight_type=types[self._weight_type],
                    op_types_to_quantize=cfg.op_types,
                    nodes_to_quantize=nodes,
                    nodes_to_exclude=self._excluded,
                    # ONNX shape inference cannot type outputs of com.microsoft ops (fuse_vit's); they are float
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "TensorQuantOverrides": overrides},
                ),
            )
        input_name = model.graph.input[0].name
        feeds = [sample if isinstance(sample, dict) else {input_name: sample} for sample in samples]
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        extra = dict(cfg.extra_options)
        if overrides:
            extra["TensorQuantOverrides"] = {**overrides, **extra.get("TensorQuantOverrides", {})}  # the user's win
        if not cfg.quantize_outputs:
            extra.setdefault("OpTypesToExcludeOutputQuantization", list(cfg.op_types))
        if cfg.calibrate_method == "percentile":
            extra.setdefault("CalibPercentile", cfg.percentile)
        return run_ort_quantizer(
            model,
            lambda source, output: quantize_static(
                source,
                output,
                CalibrationReader(iter(feeds)),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=cfg.op_types,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=types[cfg.activation_type],
                weight_type=types[self._weight_type],
                nodes_to_quantize=nodes,
                nodes_to_exclude=self._excluded,
                calibrate_method=methods[cfg.calibrate_method],
                extra_options=extra,
            ),
        )

    @classmethod
    def report_section(cls, step: dict[str, Any]) -> list[str]:
        """The layers whose measured weight scheme or bridge clipping differs from the default."""
        notes = step.get("notes", {})
        schemes, bridges = notes.get("schemes"), notes.get("bridge_reconstruction")
        modules = notes.get("modules", {})

        def named(layer: str) -> str:
            return _named(layer, modules)

        lines = []
        if notes.get("u8u8_time_ratio") is not None:  # weight_type auto, on a CPU where u8s8 saturates
            ratio = notes["u8u8_time_ratio"]
            lines += [
                "",
                f"`{step['name']}` has {'full-range uint8' if notes.get('weight_type') == 'uint8' else '7-bit int8'} "
                f"weights: on this CPU, whose uint8 x int8 kernel needs 7-bit weights not to saturate, the uint8 x "
                f"uint8 kernel timed {ratio:.3f}x its time at this model's layer shapes (median of "
                f"{len(notes.get('u8u8_round_ratios') or [ratio])} rounds; taken unless every round is over "
                f"{U8U8_TOLERANCE:.2f}x).",
            ]
        if notes.get("kept_float"):
            lines += [
                "",
                f"`{step['name']}` keeps in float, for its accuracy budget: "
                + ", ".join(named(layer) for layer in notes["kept_float"])
                + ".",
            ]
        lines += _ranking_section(step)
        if notes.get("u8u8"):
            lines += [
                "",
                f"`{step['name']}` runs with full-range uint8 weights (ONNX Runtime's u8u8 kernel) instead of "
                "float, within its accuracy budget: " + ", ".join(named(layer) for layer in notes["u8u8"]) + ".",
            ]
        if not schemes and not bridges:
            return lines
        lines += ["", f"## Weight schemes: `{step['name']}`", ""]
        if schemes:
            changed = {layer: e for layer, e in schemes.items() if "sqnr_db" in e and e["chosen"] != e["default"]}
            lines += [
                f"{len(changed)} of {len(schemes)} layers measured better (output SQNR on the calibration "
                "images, ONNX Runtime's kernels) with another scheme than the default:",
                "",
                "| layer | chosen | SQNR default dB | SQNR chosen dB |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {named(layer)} | {e['chosen']} | {e['sqnr_db'][e['default']]:.2f} | "
                f"{e['sqnr_db'][e['chosen']]:.2f} |"
                for layer, e in changed.items()
            ]
        if bridges:
            lines += [
                "",
                "Bridge blocks (conv <-> tokens), weight clipping tuned to the block's output:",
                "",
                "| layer | bridge | clip | block SQNR before dB | after dB |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {named(layer)} | {e['bridge']} | {e.get('clip', '-')} | "
                f"{e['block_sqnr_db']['before']:.2f} | {e['block_sqnr_db']['after']:.2f} |"
                if "block_sqnr_db" in e
                else f"| {named(layer)} | {e['bridge']} | {e['why']} | | |"
                for layer, e in bridges.items()
            ]
        return lines


RANKED_SHOWN = 10  # the report's ranking table: the most harmful layers, the full list in report.json


def _named(layer: str, modules: dict[str, str]) -> str:
    """A layer as the report names it: its module path, then its node name (``modules``: the notes')."""
    return f"{modules[layer]} (`{layer}`)" if layer in modules else layer


def _ranking_section(step: dict[str, Any]) -> list[str]:
    """The accuracy budget's layer ranking, most harmful first: what each layer alone in int8 does to
    the model on the search split, and which the budget kept in float."""
    notes, config = step.get("notes", {}), step.get("config", {})
    ranked = notes.get("sensitivity")
    if not ranked:
        return []
    kept, fidelity = set(notes.get("kept_float", [])), notes.get("search_fidelity", {})
    modules = notes.get("modules", {})
    wanted = [
        f"{config[k]}{unit}"
        for k, unit in (("min_sqnr_db", " dB"), ("min_agreement", "% agreement"))
        if config.get(k) is not None
    ]
    images = f"{notes['ranking_images']} of the search images" if notes.get("ranking_images") else "the search split"
    outcome = "held" if notes.get("budget_met") else "was not met"
    lines = [
        "",
        f"## Accuracy budget: `{step['name']}`",
        "",
        f"With every layer in int8 the model missed the budget ({', '.join(wanted)} on the search split), so each "
        f"layer was measured alone in int8, on {images}, and the most harmful kept in float until the budget "
        f"held or `max_float_layers` was reached. The budget {outcome}: {fidelity.get('sqnr_db')} dB, "
        f"{fidelity.get('agreement')}% agreement with float on the search split.",
        "",
        "| rank | layer | SQNR dB (this layer alone in int8) | agreement % | kept float |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {rank} | {_named(entry['layer'], modules)} | {entry['sqnr_db']:.2f} | "
        f"{entry['agreement']:.1f} | {'yes' if entry['layer'] in kept else ''} |"
        for rank, entry in enumerate(ranked[:RANKED_SHOWN], start=1)
    ]
    if len(ranked) > RANKED_SHOWN:
        lines += ["", f"{len(ranked) - RANKED_SHOWN} more layers ranked: report.json, this step's `sensitivity`."]
    return lines
