"""The mixed-precision search (PoMQ-ViT on measured figures): each block swapped alone and measured,
an additive model of those measurements searched by NSGA-II, then the most spread-out predicted front
points built, measured whole and timed together. Every measurement is memoized in ``ctx.memo``, so an
interrupted run resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from passes.base import PassContext, PassError
from passes.blocks import REST, Assignment, Choice, assignment_code
from passes.graph import same_computation
from passes.metrics import SQNR_CEILING_DB, top1_agreement, topk_accuracy
from passes.pareto import nsga2, pareto_front, spread_pick
from passes.timing import measure_latency, onnx_runner

if TYPE_CHECKING:  # hints only: the pass imports this module
    from passes.mixed_precision import MixedPrecisionConfig, MixedPrecisionPass

NOISE_FLOOR = 10 ** (-SQNR_CEILING_DB / 10)  # identical logits: SQNR capped as the report caps it


@dataclass
class Measured:
    noise: float  # error power over signal power of the logits
    agreement: float
    top1: float | None
    size: int

    @property
    def sqnr(self) -> float:
        return float(-10 * np.log10(max(self.noise, NOISE_FLOOR)))


class Search:
    """One run of the search: its measurements, memoized in ``ctx.memo`` so a rerun resumes."""

    def __init__(self, owner: MixedPrecisionPass, model: onnx.ModelProto, ctx: PassContext) -> None:
        self.owner, self.cfg, self.ctx = owner, owner.config, ctx
        self.prepared, self.layers = owner.prepare(model)
        self.blocks = [b for b in self.layers if b != REST]
        if not self.blocks:
            raise PassError(
                "no blocks found (no linear layer's tensors carry a "
                "module path like blocks.N); use quantize_int8 instead"
            )
        self.reference = ctx.executor.logits(model, ctx.search, ctx.threads)
        self.labels = ctx.search_labels
        self.reference_top1 = topk_accuracy(self.reference, self.labels, 1) if self.labels is not None else None
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
            logits = self.ctx.executor.logits(built, self.ctx.search, self.ctx.threads)
            noise = float(np.sum((logits - self.reference) ** 2) / max(np.sum(self.reference**2), 1e-30))
            self.ctx.memo[key] = {
                "noise": noise,
                "agreement": top1_agreement(logits, self.reference),
                "top1": topk_accuracy(logits, self.labels, 1) if self.labels is not None else None,
                "size": len(built.SerializeToString()),
            }
        return Measured(**self.ctx.memo[key])

    def latencies(self, assignments: dict[str, Assignment]) -> dict[str, float]:
        """Median ms of each assignment's model, all timed together (interleaved rounds)."""
        runners = {
            name: onnx_runner(
                self.owner.build(self.prepared, self.layers, assignment), self.input_shape, self.ctx.threads
            )
            for name, assignment in assignments.items()
        }
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
        """The measured front (reused where only ``select`` changed since it was measured: a new rule
        picks from the same points), the point the rule picks, built, and the notes."""
        found = self.ctx.reuse("front", self.cfg.model_dump(mode="json", exclude={"select"}), self._front)
        points = found["points"]
        front_points = [p for p in points if p["on_front"]]
        chosen, reason = self._select([p for p in front_points if not p["violates"]] or front_points)
        output = self.owner.build(self.prepared, self.layers, chosen["assignment"], direct=False)
        # what ships is the quantizer's model; the search measured the direct builder's
        same = same_computation(output, self.owner.build(self.prepared, self.layers, chosen["assignment"]))
        if not same:
            self.ctx.log("mixed precision: the quantizer's model is not the one the search measured")
        notes = {
            **found["notes"],
            "search_model_equals_quantizer_output": same,
            "float_reference": {"top1": self.reference_top1},
            "points": points,
            "chosen": chosen["name"],
            "chosen_code": chosen["code"],
            "select": reason,
        }
        self.ctx.log(f"mixed precision: chose {chosen['name']} ({reason})")
        return output, notes

    def _front(self) -> dict[str, Any]:
        """The search's measurements, as JSON: every measured point (``on_front`` where it is on the
        measured Pareto front) and the notes that do not depend on the selection."""
        cfg = self.cfg
        uniforms = {c: self.uniform(c) for c in dict.fromkeys([*cfg.choices, "float", "int8"])}
        model = self._additive_model(uniforms)
        explored = nsga2(
            model.objectives,
            len(cfg.choices),
            len(self.blocks),
            cfg.population,
            cfg.generations,
            cfg.seed,
            initial=model.seeds(),
        )
        if not explored:
            timed = ", ".join(f"{c} {ms:.2f} ms" for c, ms in model.uniform_ms.items())
            raise PassError(
                f"no assignment meets the constraints (max_latency_vs_float, max_size_vs_int8, "
                f"allow_uniform); uniform models measured {timed}; loosen them"
            )
        genomes = list(explored)
        front = [genomes[i] for i in pareto_front(np.array([explored[g] for g in genomes]))]
        picked = [front[i] for i in spread_pick(np.array([explored[g] for g in front]), cfg.candidates)]
        named = {f"uniform-{choice}": assignment for choice, assignment in uniforms.items()}
        named.update({assignment_code(self.assignment(g), self.blocks): self.assignment(g) for g in picked})
        points = self._measure_points(named, model)
        # the uniform references stay on the front, for comparison, whatever the constraints say
        kept = [p for p in points if p["reference"] or not p["violates"]]
        front_points = [
            kept[i]
            for i in pareto_front(
                np.array([[-self.fidelity(p["measured"]), p["latency_ms"], p["size_bytes"]] for p in kept])
            )
        ]
        for p in points:
            p["on_front"] = p in front_points
        for p in points:
            del p["measured"]
        notes = {
            "blocks": {b: len(layers) for b, layers in self.layers.items()},
            "choices": list(cfg.choices),
            "base": self.base,
            "sensitivity": {
                b: {c: round(model.single[b, c].sqnr, 3) for c in cfg.choices if c != self.base} for b in self.blocks
            },
            "base_sqnr_db": round(model.base.sqnr, 3),
            "uniform_latency_ms": model.uniform_ms,
            "explored": len(explored),
            "predicted_front": len(front),
        }
        return {"points": points, "notes": notes}

    def _additive_model(self, uniforms: dict[str, Assignment]) -> AdditiveModel:
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
        return AdditiveModel(
            self, uniform_measured[self.base], single, ctx.memo["latency/uniform"], uniform_measured["int8"].size, share
        )

    def _measure_points(self, named: dict[str, Assignment], model: AdditiveModel) -> list[dict[str, Any]]:
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
            point = {
                "name": name,
                "code": assignment_code(assignment, self.blocks),
                "reference": name.startswith("uniform-"),
                "assignment": assignment,
                "rest": cfg.rest,
                "sqnr_db": round(m.sqnr, 3),
                "agreement": round(m.agreement, 3),
                "top1": None if m.top1 is None else round(m.top1, 3),
                "latency_ms": ms[name],
                "size_bytes": m.size,
                "latency_vs_float": round(ms[name] / ms["uniform-float"], 4),
                "size_vs_int8": round(m.size / measured["uniform-int8"].size, 4),
                "measured": m,
            }
            if not point["reference"]:
                sqnr, p_ms, p_size = model.predict(self.genome(assignment))
                point["predicted"] = {
                    "sqnr_db": round(sqnr, 3),
                    "latency_ms": round(p_ms, 3),
                    "size_bytes": int(p_size),
                }
            point["violates"] = violations(
                cfg, set(assignment.values()), point["latency_vs_float"], point["size_vs_int8"]
            )
            points.append(point)
        return points

    def genome(self, assignment: Assignment) -> tuple[int, ...]:
        return tuple(self.cfg.choices.index(assignment[b]) for b in self.blocks)

    def _select(self, front: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        rule = self.cfg.select

        def ok(p: dict[str, Any]) -> bool:
            return (
                (rule.min_agreement is None or p["agreement"] >= rule.min_agreement)
                and (rule.min_sqnr_db is None or p["sqnr_db"] >= rule.min_sqnr_db)
                and (rule.max_top1_drop is None or self.reference_top1 - p["top1"] <= rule.max_top1_drop)
            )

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


class AdditiveModel:
    """Any assignment's SQNR, latency and size from per-block measurements: noise powers add, each
    block's latency is its share of the linear weights times the uniform model's, sizes add."""

    def __init__(
        self,
        search: Search,
        base: Measured,
        single: dict[tuple[str, str], Measured],
        uniform_ms: dict[str, float],
        int8_size: int,
        share: dict[str, int],
    ) -> None:
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
        return (
            float(-10 * np.log10(noise)),
            float(self.share @ self.choice_ms[list(genome)]),
            float(self.base.size + self.d_size[index].sum()),
        )

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
        return [
            tuple(self.cfg.choices.index(c) if b == block else base for b in self.search.blocks)
            for block, c in self.single
        ]
