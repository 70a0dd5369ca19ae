"""Mixed precision per block (PoMQ-ViT), chosen by a Pareto search over *measured* fidelity, latency
and size on ONNX Runtime's CPU kernels, never over bit counts.

Choices are what ONNX Runtime executes for a linear layer:

- ``float``: left as is;
- ``int8``: W8A8 through ``quantize_dynamic`` (``DynamicQuantizeMatMul``), the int8 pass's kernel;
- ``w4`` / ``w8``: weight-only ``MatMulNBits`` (block-wise 4 / 8-bit weights, float activations);
- ``a16w8``: int8 weights and int16 activations, static QDQ calibrated on the calibration split
  (ONNX Runtime has no int16 kernel here: the MatMul runs in float between Q/DQ pairs).

Measured on the real DeiT-tiny here (2 threads, AVX2 without VNNI): all-int8 12.5 ms, fp32 17.5 ms,
all-w4 18.4 ms (4.4 MB against int8's 6.6 MB), all-w8 23.1 ms; in another run all-a16w8 1.8x fp32's
time at 30 dB SQNR and int8's size. So on this CPU a 4-bit block buys size, not speed, and costs
fidelity; only a search on measured figures finds where it pays. (a16w8 is not a default choice.)

The search: blocks are found from the graph (the first ``name.N`` module path a linear layer's
tensors carry: ``blocks.3`` in a ViT, ``stages.2`` in a hybrid). Each block is swapped alone from the
base choice to every other choice and measured on the search split (noise power, size), and the
uniform models are timed together once. An additive model of those figures scores any assignment in
microseconds, so NSGA-II (or enumeration, for small spaces) finds its Pareto front under the
constraints; the most spread-out points of that front, and the uniform references, are then built
and measured whole, and the measured front is what the report shows and what ``select`` picks from.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field, model_validator

from onnxvit.benchmark import measure_latency, onnx_runner
from onnxvit.config import BenchmarkConfig
from onnxvit.errors import UserError
from onnxvit.evaluate import SQNR_CEILING_DB
from onnxvit.metrics import top1_agreement, topk_accuracy
from onnxvit.runtime import model_logits
from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import copy_model, gemms_as_matmul
from passes.ort_quant import CalibrationReader, ensure_node_names, run_ort_quantizer, weighted_nodes
from passes.pareto import nsga2, pareto_front, spread_pick
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass, u8s8_saturates

Choice = Literal["float", "int8", "w4", "w8", "a16w8"]
SYMBOL = {"float": "F", "int8": "8", "w4": "4", "w8": "W", "a16w8": "A"}
REST = "rest"
NOISE_FLOOR = 10 ** (-SQNR_CEILING_DB / 10)  # identical logits: SQNR capped as the report caps it
_MODULE_INDEX = re.compile(r"(?:^|/)([A-Za-z_][A-Za-z0-9_]*\.\d+)(?=/|$)")


class SelectConfig(PassConfig):
    """Which measured front point becomes the pass's output: the best by ``minimize`` among those
    within the limits (all on the search split, against the pass's float input)."""

    max_top1_drop: float | None = Field(None, ge=0, description="Top-1 points below the float input (needs labels).")
    min_agreement: float | None = Field(96.0, ge=0, le=100, description="Top-1 agreement with the float input, %.")
    min_sqnr_db: float | None = Field(None, description="Logit SQNR against the float input.")
    minimize: Literal["latency", "size"] = "latency"


class MixedPrecisionConfig(PassConfig):
    choices: list[Choice] = Field(["float", "int8", "w4"], min_length=2, description="Per-block options.")
    rest: Choice = Field("int8", description="Linear layers outside any block (e.g. the classifier).")
    min_block_layers: int = Field(2, ge=1, description="Smaller groups (a classifier's layers) join `rest`.")
    block_size: int = Field(32, ge=16, description="MatMulNBits: weights per scale (a power of two).")
    accuracy_level: int = Field(
        0, ge=0, le=4, description="MatMulNBits compute type: 0 float (4 = int8 ran 16% slower here).")
    symmetric: bool = Field(True, description="MatMulNBits: symmetric weights (no zero points).")
    reduce_range: bool | Literal["auto"] = Field("auto", description="int8: 7-bit weights, as quantize_int8.")
    objective: Literal["sqnr", "agreement", "top1"] = Field(
        "sqnr", description="Fidelity objective on the search split; sqnr resolves what 31 images' top-1 cannot.")
    # PoMQ-ViT's constraints
    allow_uniform: bool = Field(False, description="Admit searched assignments with one choice everywhere.")
    max_latency_vs_float: float | None = Field(
        1.0, gt=0, description="Candidates must run at most this fraction of the float model's latency.")
    max_size_vs_int8: float | None = Field(None, gt=0, description="Candidates at most this fraction of int8's size.")
    # search
    population: int = Field(32, ge=4)
    generations: int = Field(40, ge=0)
    seed: int = 0
    candidates: int = Field(8, ge=1, description="Predicted front points built and measured whole.")
    latency_runs: int = Field(60, ge=5)
    latency_warmup: int = Field(10, ge=0)
    select: SelectConfig = Field(default_factory=SelectConfig)

    @property
    def requires_labels(self) -> bool:
        return self.objective == "top1" or self.select.max_top1_drop is not None

    @model_validator(mode="after")
    def _checks(self) -> "MixedPrecisionConfig":
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices: {self.choices} repeats an entry")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size} is not a power of two")
        return self


Assignment = dict[str, Choice]


def _module_block(text: str) -> str | None:
    match = _MODULE_INDEX.search(text)
    return match.group(1) if match else None


def find_blocks(model: onnx.ModelProto, layers: list[str], hops: int = 4,
                min_layers: int = 2) -> dict[str, list[str]]:
    """Linear layers by block, in graph order; layers in no block, or in a group of fewer than
    ``min_layers`` (a classifier's ``classifier.0``), go under ``rest``.

    Fusions rename nodes, but the tensors downstream keep the exporter's module paths, so each
    layer takes the first ``name.N`` found in its own name, then its outputs' consumers (breadth
    first, up to ``hops``), then its inputs.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {node.name: node for node in model.graph.node}
    blocks: dict[str, list[str]] = {}
    for layer in layers:
        node = by_name[layer]
        found = _module_block(node.name)
        queue, seen = deque([(node, 0)]), {node.name}
        while found is None and queue:
            current, depth = queue.popleft()
            for output in current.output:
                found = found or _module_block(output)
                if depth < hops:
                    for nxt in consumers.get(output, []):
                        if nxt.name not in seen:
                            seen.add(nxt.name)
                            queue.append((nxt, depth + 1))
        if found is None:
            found = next((b for b in map(_module_block, node.input) if b), None)
        blocks.setdefault(found or REST, []).append(layer)
    rest = blocks.pop(REST, [])
    for name in [b for b, members in blocks.items() if len(members) < min_layers]:
        rest += blocks.pop(name)
    rest.sort(key=layers.index)
    return {**blocks, **({REST: rest} if rest else {})}


def assignment_code(assignment: Assignment, blocks: list[str]) -> str:
    """One character per block: ``F`` float, ``8`` int8, ``4`` w4, ``W`` w8, ``A`` a16w8."""
    return "".join(SYMBOL[assignment[b]] for b in blocks)


@dataclass
class Measured:
    noise: float  # error power over signal power of the logits
    agreement: float
    top1: float | None
    size: int

    @property
    def sqnr(self) -> float:
        return float(-10 * np.log10(max(self.noise, NOISE_FLOOR)))


@register_pass
class MixedPrecisionPass(Pass):
    name = "mixed_precision"
    Config = MixedPrecisionConfig
    uses_search = True
    uses_calibration = True  # a16w8's activation ranges

    def __init__(self, config: PassConfig | None = None) -> None:
        super().__init__(config)
        self.calibration: list[np.ndarray] = []

    # ---- building one assignment -------------------------------------------------------------
    def prepare(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
        prepared = copy_model(model)
        ensure_node_names(prepared)
        gemms_as_matmul(prepared)
        layers = weighted_nodes(prepared, ["MatMul"])
        return prepared, find_blocks(prepared, layers, min_layers=self.config.min_block_layers)

    def build(self, prepared: onnx.ModelProto, blocks: dict[str, list[str]], assignment: Assignment) -> onnx.ModelProto:
        """The model with each block's linear layers as ``assignment`` says (``rest`` from the config)."""
        cfg = self.config
        choice_of = {layer: assignment.get(block, cfg.rest) if block != REST else cfg.rest
                     for block, layers in blocks.items() for layer in layers}
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
            model = self._int8(model, int8)
        return model

    def apply(self, model: onnx.ModelProto, assignment: Assignment,
              calibration: list[np.ndarray] | None = None) -> onnx.ModelProto:
        """``model`` (the pass's input) with ``assignment`` (block -> choice, as a report's front point
        gives it), built as the search built it (a16w8 needs the same ``calibration`` batches)."""
        self.calibration = calibration or self.calibration
        prepared, blocks = self.prepare(model)
        unknown = set(assignment) - set(blocks)
        if unknown:
            raise ValueError(f"mixed_precision: blocks {sorted(unknown)} are not in this model ({sorted(blocks)})")
        return self.build(prepared, blocks, assignment)

    def _nbits(self, model: onnx.ModelProto, layers: list[str], bits: int) -> onnx.ModelProto:
        import logging

        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        keep = set(layers)
        # nodes_to_include only adds to op_types_to_quantize; exclusion is what restricts
        others = [n for n in weighted_nodes(model, ["MatMul"]) if n not in keep]
        quantizer = MatMulNBitsQuantizer(copy_model(model), bits=bits, block_size=self.config.block_size,
                                         is_symmetric=self.config.symmetric,
                                         accuracy_level=self.config.accuracy_level,
                                         nodes_to_exclude=others, op_types_to_quantize=("MatMul",))
        quantizer.process()
        return quantizer.model.model

    def _a16w8(self, model: onnx.ModelProto, layers: list[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not self.calibration:
            raise UserError("a16w8 needs calibration images (data.calibrate_images > 0)")
        name = model.graph.input[0].name
        samples = ({name: image[None]} for batch in self.calibration for image in batch)
        return run_ort_quantizer(model, lambda source, output: quantize_static(
            source, output, CalibrationReader(samples), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QInt16,
            weight_type=QuantType.QInt8, nodes_to_quantize=layers, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"],
                           "DefaultTensorType": onnx.TensorProto.FLOAT}))

    def _int8(self, model: onnx.ModelProto, layers: list[str]) -> onnx.ModelProto:
        reduce_range = u8s8_saturates() if self.config.reduce_range == "auto" else self.config.reduce_range
        return QuantizeInt8Pass(QuantizeInt8Config(op_types=["MatMul"])).quantize_layers(
            model, layers, reduce_range, [], {})

    # ---- the pass ------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        cfg = self.config
        if not ctx.search:
            raise UserError("needs search images; set data.search_images > 0")
        if cfg.requires_labels and ctx.search_labels is None:
            raise UserError("top-1 needs labelled search images with real weights; "
                            "use objective: sqnr and select.min_agreement")
        if "a16w8" in (*cfg.choices, cfg.rest):
            ctx.require_calibration("mixed_precision (a16w8)")
        self.calibration = ctx.calibration
        started = time.perf_counter()
        search = _Search(self, model, ctx)
        output, notes = search.run()
        notes["search_seconds"] = round(time.perf_counter() - started, 1)
        ctx.notes.update(notes)
        return output


class _Search:
    """One run of the search: its measurements, memoized in ``ctx.memo`` so a rerun resumes."""

    def __init__(self, owner: MixedPrecisionPass, model: onnx.ModelProto, ctx: PassContext) -> None:
        self.owner, self.cfg, self.ctx = owner, owner.config, ctx
        self.prepared, self.layers = owner.prepare(model)
        self.blocks = [b for b in self.layers if b != REST]
        if not self.blocks:
            raise UserError("no blocks found (no linear layer's tensors carry a "
                            "module path like blocks.N); use quantize_int8 instead")
        self.reference = model_logits(model, ctx.search, ctx.threads)
        self.labels = ctx.search_labels
        self.reference_top1 = (topk_accuracy(self.reference, self.labels, 1)
                               if self.labels is not None else None)
        self.base: Choice = "int8" if "int8" in self.cfg.choices else self.cfg.choices[0]
        self.input_shape = tuple(ctx.search[0].shape[1:])

    def assignment(self, genome: tuple[int, ...]) -> Assignment:
        return {b: self.cfg.choices[g] for b, g in zip(self.blocks, genome)}

    def uniform(self, choice: Choice) -> Assignment:
        return {b: choice for b in self.blocks}

    def measure(self, assignment: Assignment) -> Measured:
        key = "fidelity/" + assignment_code(assignment, self.blocks)
        if key not in self.ctx.memo:
            built = self.owner.build(self.prepared, self.layers, assignment)
            logits = model_logits(built, self.ctx.search, self.ctx.threads)
            noise = float(np.sum((logits - self.reference) ** 2) / max(np.sum(self.reference ** 2), 1e-30))
            self.ctx.memo[key] = {
                "noise": noise, "agreement": top1_agreement(logits, self.reference),
                "top1": topk_accuracy(logits, self.labels, 1) if self.labels is not None else None,
                "size": len(built.SerializeToString())}
        return Measured(**self.ctx.memo[key])

    def latencies(self, assignments: dict[str, Assignment]) -> dict[str, float]:
        """Median ms of each assignment's model, all timed together (interleaved rounds)."""
        config = BenchmarkConfig(threads=self.ctx.threads, batch_size=1)
        runners = {name: onnx_runner(self.owner.build(self.prepared, self.layers, assignment), self.input_shape, config)
                   for name, assignment in assignments.items()}
        timed = measure_latency(runners, self.cfg.latency_warmup, self.cfg.latency_runs, rounds=5)
        return {name: t["median"] for name, t in timed.items()}

    def fidelity(self, m: Measured) -> float:
        """The objective, larger is better."""
        if self.cfg.objective == "agreement":
            return m.agreement
        if self.cfg.objective == "top1":
            return float(m.top1)
        return m.sqnr

    def run(self) -> tuple[onnx.ModelProto, dict[str, Any]]:
        cfg, ctx = self.cfg, self.ctx
        uniforms = {c: self.uniform(c) for c in dict.fromkeys([*cfg.choices, "float", "int8"])}
        model = self._additive_model(uniforms)
        explored = nsga2(model.objectives, len(cfg.choices), len(self.blocks), cfg.population, cfg.generations,
                         cfg.seed, initial=model.seeds())
        if not explored:
            timed = ", ".join(f"{c} {ms:.2f} ms" for c, ms in model.uniform_ms.items())
            raise UserError(f"no assignment meets the constraints (max_latency_vs_float, max_size_vs_int8, "
                            f"allow_uniform); uniform models measured {timed}; loosen them")
        genomes = list(explored)
        front = [genomes[i] for i in pareto_front(np.array([explored[g] for g in genomes]))]
        picked = [front[i] for i in spread_pick(np.array([explored[g] for g in front]), cfg.candidates)]
        named = {f"uniform-{choice}": assignment for choice, assignment in uniforms.items()}
        named.update({assignment_code(self.assignment(g), self.blocks): self.assignment(g) for g in picked})
        points = self._measure_points(named, model)
        # the uniform references stay on the front, for comparison, whatever the constraints say
        kept = [p for p in points if p["reference"] or not p["violates"]]
        front_points = [kept[i] for i in pareto_front(np.array(
            [[-self.fidelity(p["measured"]), p["latency_ms"], p["size_bytes"]] for p in kept]))]
        for p in points:
            p["on_front"] = p in front_points
        for p in points:
            del p["measured"]
        chosen, reason = self._select([p for p in front_points if not p["violates"]] or front_points)
        output = self.owner.build(self.prepared, self.layers, chosen["assignment"])
        notes = {
            "blocks": {b: len(layers) for b, layers in self.layers.items()},
            "choices": list(cfg.choices), "base": self.base,
            "float_reference": {"top1": self.reference_top1},
            "sensitivity": {b: {c: round(model.single[b, c].sqnr, 3) for c in cfg.choices if c != self.base}
                            for b in self.blocks},
            "base_sqnr_db": round(model.base.sqnr, 3),
            "uniform_latency_ms": model.uniform_ms,
            "explored": len(explored), "predicted_front": len(front),
            "points": points, "chosen": chosen["name"], "chosen_code": chosen["code"], "select": reason,
        }
        ctx.log(f"mixed precision: chose {chosen['name']} ({reason})")
        return output, notes

    def _additive_model(self, uniforms: dict[str, Assignment]) -> "_AdditiveModel":
        """Each block swapped alone from the base to every other choice, and the uniform models timed
        together: what the additive model predicts any assignment from."""
        cfg, ctx = self.cfg, self.ctx
        swaps = [(b, c) for b in self.blocks for c in cfg.choices if c != self.base]
        with ctx.progress("mixed precision: per-block sensitivity", len(swaps) + len(uniforms)) as advance:
            single = {}
            for block, choice in swaps:
                single[block, choice] = self.measure({**uniforms[self.base], block: choice})
                advance(1)
            uniform_measured = {c: self.measure(a) for c, a in uniforms.items()}
            advance(len(uniforms))
        if "latency/uniform" not in ctx.memo:
            ctx.log(f"mixed precision: timing {len(uniforms)} uniform models")
            ctx.memo["latency/uniform"] = self.latencies(uniforms)
        weights = _weight_elements(self.prepared)
        share = {b: sum(weights[layer] for layer in self.layers[b]) for b in self.blocks}
        return _AdditiveModel(self, uniform_measured[self.base], single, ctx.memo["latency/uniform"],
                              uniform_measured["int8"].size, share)

    def _measure_points(self, named: dict[str, Assignment], model: "_AdditiveModel") -> list[dict[str, Any]]:
        """Each assignment built and measured whole; all timed together."""
        cfg, ctx = self.cfg, self.ctx
        with ctx.progress("mixed precision: candidates", len(named)) as advance:
            measured = {}
            for name, assignment in named.items():
                measured[name] = self.measure(assignment)
                advance(1)
        ctx.log(f"mixed precision: timing {len(named)} models together")
        ms = self.latencies(named)
        points = []
        for name, assignment in named.items():
            m = measured[name]
            point = {"name": name, "code": assignment_code(assignment, self.blocks),
                     "reference": name.startswith("uniform-"), "assignment": assignment, "rest": cfg.rest,
                     "sqnr_db": round(m.sqnr, 3), "agreement": round(m.agreement, 3),
                     "top1": None if m.top1 is None else round(m.top1, 3),
                     "latency_ms": ms[name], "size_bytes": m.size,
                     "latency_vs_float": round(ms[name] / ms["uniform-float"], 4),
                     "size_vs_int8": round(m.size / measured["uniform-int8"].size, 4), "measured": m}
            if not point["reference"]:
                sqnr, p_ms, p_size = model.predict(self.genome(assignment))
                point["predicted"] = {"sqnr_db": round(sqnr, 3), "latency_ms": round(p_ms, 3),
                                      "size_bytes": int(p_size)}
            point["violates"] = violations(cfg, set(assignment.values()), point["latency_vs_float"],
                                           point["size_vs_int8"])
            points.append(point)
        return points

    def genome(self, assignment: Assignment) -> tuple[int, ...]:
        return tuple(self.cfg.choices.index(assignment[b]) for b in self.blocks)

    def _select(self, front: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        rule = self.cfg.select

        def ok(p: dict[str, Any]) -> bool:
            return ((rule.min_agreement is None or p["agreement"] >= rule.min_agreement)
                    and (rule.min_sqnr_db is None or p["sqnr_db"] >= rule.min_sqnr_db)
                    and (rule.max_top1_drop is None or self.reference_top1 - p["top1"] <= rule.max_top1_drop))

        key = "latency_ms" if rule.minimize == "latency" else "size_bytes"
        within = [p for p in front if ok(p)]
        if within:
            best = min(within, key=lambda p: (p[key], -p["sqnr_db"]))
            return best, f"least {rule.minimize} of {len(within)} front points within the select limits"
        best = max(front, key=lambda p: p["sqnr_db"])
        return best, "no front point within the select limits: the most faithful one"


def _weight_elements(model: onnx.ModelProto) -> dict[str, int]:
    """Elements of each node's constant inputs: a linear layer's share of the work (latency scales with it)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    return {node.name: sum(sizes.get(i, 0) for i in node.input) for node in model.graph.node}


def violations(cfg: MixedPrecisionConfig, used: set[str], latency_vs_float: float, size_vs_int8: float) -> list[str]:
    """PoMQ-ViT's constraints that an assignment (predicted or measured) breaks."""
    out = []
    if not cfg.allow_uniform and len(used) == 1:
        out.append("uniform")
    if cfg.max_latency_vs_float is not None and latency_vs_float > cfg.max_latency_vs_float:
        out.append(f"latency {latency_vs_float:.2f}x float > {cfg.max_latency_vs_float}")
    if cfg.max_size_vs_int8 is not None and size_vs_int8 > cfg.max_size_vs_int8:
        out.append(f"size {size_vs_int8:.2f}x int8 > {cfg.max_size_vs_int8}")
    return out


class _AdditiveModel:
    """Any assignment's SQNR, latency and size from per-block measurements: noise powers add, each
    block's latency is its share of the linear weights times the uniform model's, sizes add."""

    def __init__(self, search: _Search, base: Measured, single: dict[tuple[str, str], Measured],
                 uniform_ms: dict[str, float], int8_size: int, share: dict[str, int]) -> None:
        self.search, self.cfg = search, search.cfg
        self.base, self.single, self.uniform_ms, self.int8_size = base, single, uniform_ms, int8_size
        blocks, choices = search.blocks, self.cfg.choices
        total = sum(share.values())
        self.share = np.array([share[b] / total for b in blocks])
        self.d_noise = np.zeros((len(blocks), len(choices)))
        self.d_size = np.zeros((len(blocks), len(choices)))
        for i, block in enumerate(blocks):
            for j, choice in enumerate(choices):
                if choice != search.base:
                    self.d_noise[i, j] = single[block, choice].noise - base.noise
                    self.d_size[i, j] = single[block, choice].size - base.size
        self.choice_ms = np.array([uniform_ms[c] for c in choices])

    def predict(self, genome: tuple[int, ...]) -> tuple[float, float, float]:
        """SQNR (dB), median latency (ms), size (bytes)."""
        index = np.arange(len(genome)), np.array(genome)
        noise = max(self.base.noise + self.d_noise[index].sum(), NOISE_FLOOR)
        return (float(-10 * np.log10(noise)), float(self.share @ self.choice_ms[list(genome)]),
                float(self.base.size + self.d_size[index].sum()))

    def objectives(self, genome: tuple[int, ...]) -> np.ndarray | None:
        """What NSGA-II minimizes, or None when the prediction breaks a constraint."""
        sqnr, ms, size = self.predict(genome)
        used = {self.cfg.choices[g] for g in genome}
        if violations(self.cfg, used, ms / self.uniform_ms["float"], size / self.int8_size):
            return None
        return np.array([-sqnr, ms, size])

    def seeds(self) -> list[tuple[int, ...]]:
        """The single-block swaps: a first population that already spans every choice."""
        base = self.cfg.choices.index(self.search.base)
        return [tuple(self.cfg.choices.index(c) if b == block else base for b in self.search.blocks)
                for block, c in self.single]
