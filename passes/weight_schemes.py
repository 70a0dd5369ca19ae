"""Per-layer weight quantization parameters chosen by measurement: Q-HyViT's granularity / scheme
choice per layer and its bridge-block reconstruction, for what ONNX Runtime's int8 kernels run.

Q-HyViT picks per-tensor or per-channel, symmetric or asymmetric, for each layer by its
reconstruction error, and tunes the quantizer scales of the blocks where a conv feature map becomes
a token sequence (or back) to the block's output error. ONNX Runtime's int8 linear kernels
(``DynamicQuantizeMatMul``, QDQ ``MatMul`` / ``Conv``) take one weight scale and zero point per
output channel, so that is the freedom here: a ``WeightScheme`` per weight, written as explicit
scales and zero points in ``TensorQuantOverrides`` that ONNX Runtime's own quantizer applies.
Activations of dynamic kernels are quantized per call; there is nothing of theirs to choose.

Every candidate is judged the same way: by its output SQNR against float on the inputs the layer
(or bridge block) sees on the calibration images. A block is cut out of the float model, quantized
by ONNX Runtime's quantizer with the candidate's overrides and run by ONNX Runtime. A single dynamic
linear layer whose kernel multiplies exactly on this CPU has the same figure computed from its
inputs (``passes.linear_error``), without a run per candidate.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx.utils
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

from passes.executor import Executor
from passes.graph import GraphIndex, region_inputs, value_typed, weight_channel_axis
from passes.linear_error import DynamicLinearError
from passes.metrics import SqnrAgainst
from passes.ort_quant import FloatValues
from passes.runtime import make_session, run_feeds

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class WeightScheme:
    """How one weight maps to integers: one range per output channel or one for the tensor,
    centred on zero or fitted to [min, max], and shrunk by ``clip`` (the scale that trades clipped
    outliers for finer steps)."""

    per_channel: bool = True
    symmetric: bool = True
    clip: float = 1.0

    @property
    def label(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        label = f"{granularity} {'symmetric' if self.symmetric else 'asymmetric'}"
        return label if self.clip == 1.0 else f"{label}, clip {self.clip:g}"

    def overrides(self, weight: np.ndarray, axis: int, qtype: int, reduce_range: bool) -> list[dict[str, Any]]:
        """ONNX Runtime per-channel TensorQuantOverrides for ``weight``: one entry per channel, the same
        for each when per-tensor (its QDQ quantizer does not broadcast a single entry)."""
        zero_points, scales = self.channel_parameters(weight, axis, qtype, reduce_range)
        return [
            {"axis": axis, "scale": scale, "zero_point": zero_point} for scale, zero_point in zip(scales, zero_points)
        ]

    def channel_parameters(
        self, weight: np.ndarray, axis: int, qtype: int, reduce_range: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each output channel's zero point and scale (what ``overrides`` writes), as arrays."""
        qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range, self.symmetric)
        rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        lows, highs = rows.min(1), rows.max(1)
        if not self.per_channel:
            lows, highs = np.full_like(lows, lows.min()), np.full_like(highs, highs.max())
        return channel_scale_zp(
            (lows * self.clip).astype(np.float32), (highs * self.clip).astype(np.float32), qmin, qmax, self.symmetric
        )

    def quantize(self, weight: np.ndarray, axis: int, qtype: int, reduce_range: bool) -> QuantizedWeight:
        """``weight`` in integers with this scheme's parameters, as the quantizer writes it."""
        zero_point, scale = self.channel_parameters(weight, axis, qtype, reduce_range)
        return quantize_channels(weight, axis, scale, zero_point.astype(INTEGER_TYPES[qtype]), qtype)


def channel_scale_zp(
    rmin: np.ndarray, rmax: np.ndarray, qmin: np.generic, qmax: np.generic, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's ``compute_scale_zp`` for every channel at once (float32 ranges): the same
    arithmetic, vectorised, since a search computes it for every channel of every candidate."""
    rmin, rmax = np.minimum(rmin, np.float32(0)), np.maximum(rmax, np.float32(0))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    degenerate = scale < np.finfo(np.float32).tiny
    if symmetric:
        zero_point = np.full(scale.shape, np.round((qmin + qmax) / np.float64(2.0)))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.round(qmin - rmin / scale)
    zero_point = np.where(degenerate, 0, zero_point).astype(qmin.dtype)
    return zero_point, np.where(degenerate, 1.0, scale).astype(np.float32)


Trial = dict[str, WeightScheme]
Overrides = dict[str, list[dict[str, Any]]]


def scheme_overrides(index: GraphIndex, schemes: Trial, qtype: int, reduce_range: bool) -> Overrides:
    """The TensorQuantOverrides that give each named layer of ``index``'s model its scheme."""
    result = {}
    for node in index.model.graph.node:
        if node.name in schemes:
            weight = index.constant(node.input[1])
            axis = weight_channel_axis(node)
            assert weight is not None and axis is not None  # a linear layer's
            # ONNX Runtime's overrides name the axis non-negative
            result[node.input[1]] = schemes[node.name].overrides(weight, axis % weight.ndim, qtype, reduce_range)
    return result


INTEGER_TYPES: dict[int, type[np.integer]] = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8}


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight as the quantizer writes it: integers, and a scale and zero point per output channel."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def dequantized(self) -> np.ndarray:
        """The values the kernel multiplies by, in float64: (integer - zero point) x scale."""
        shape = [1] * self.values.ndim
        shape[self.axis] = -1
        zero_point = self.zero_point.astype(np.float64).reshape(shape)
        return (self.values.astype(np.float64) - zero_point) * self.scale.astype(np.float64).reshape(shape)


def quantize_weight(weight: np.ndarray, entries: list[dict], qtype: int) -> QuantizedWeight:
    """``weight`` quantized per output channel with the override ``entries`` (one per channel, or one
    for all), rounded and clipped as ONNX Runtime's ``quantize_nparray`` does."""
    axis = entries[0]["axis"] % weight.ndim
    rows = [entries[i if len(entries) > 1 else 0] for i in range(weight.shape[axis])]
    scale = np.array([np.float32(e["scale"]) for e in rows], np.float32)
    zero_point = np.array([e["zero_point"] for e in rows], INTEGER_TYPES[qtype])
    return quantize_channels(weight, axis, scale, zero_point, qtype)


def quantize_channels(
    weight: np.ndarray, axis: int, scale: np.ndarray, zero_point: np.ndarray, qtype: int
) -> QuantizedWeight:
    """``weight`` rounded and clipped to ``qtype`` with a scale and zero point per channel of ``axis``."""
    info = np.iinfo(INTEGER_TYPES[qtype])
    shape = [1] * weight.ndim
    shape[axis] = weight.shape[axis]
    scale = np.asarray(scale, np.float32)
    values = (weight.astype(np.float32) / scale.reshape(shape)).round() + zero_point.reshape(shape).astype(np.float32)
    return QuantizedWeight(np.clip(values, info.min, info.max).astype(zero_point.dtype), scale, zero_point, axis)


DEFAULT = WeightScheme()
SCHEMES = (DEFAULT, WeightScheme(True, False), WeightScheme(False, True), WeightScheme(False, False))


def _elem_type(value: onnx.ValueInfoProto | None) -> int | None:
    return value.type.tensor_type.elem_type if value is not None else None


class _NotExact(Exception):
    """A candidate's integers that the kernel would not multiply exactly (it saturates)."""


class NotSeparable(ValueError):
    """The layers between two tensors also read something else (the image, a shape)."""


class BlockProbe:
    """A piece of the float model between ``inputs`` and ``outputs``, with the float values the
    calibration images give its inputs."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
        self.data, self.feeds = model.SerializeToString(), feeds  # serialized once: every measurement sends it
        self.key = uuid.uuid4().hex  # names the float piece in every process that scores its trials

    @staticmethod
    def cut(extractor: onnx.utils.Extractor, first: str, last: str, image: str) -> onnx.ModelProto:
        """The nodes between tensors ``first`` and ``last``, fed every float tensor they read from
        outside (not the model before them); the image input joins the inputs when shapes computed
        from it are read inside (a dynamic batch size)."""
        inputs = [
            name
            for name in region_inputs(extractor.graph, first, last)
            if name != image and _elem_type(extractor.value_infos.get(name)) == onnx.TensorProto.FLOAT
        ]
        for names in (inputs, [*inputs, image]):
            try:
                piece = extractor.extract_model(names, [last])
            except ValueError as error:  # a tensor onnx cannot type
                raise NotSeparable(str(error)) from error
            known = (
                {i.name for i in piece.graph.input}
                | {i.name for i in piece.graph.initializer}
                | {out for node in piece.graph.node for out in node.output}
            )
            missing = {name for node in piece.graph.node for name in node.input if name and name not in known}
            if not missing:
                return piece
            if missing != {image}:
                break
        raise NotSeparable(f"the layers between also read {sorted(missing)}")


# (piece of the float model, layers in it to quantize, weight overrides, calibration feeds) -> quantized piece
QuantizePiece = Callable[[onnx.ModelProto, list[str], Overrides, list[dict[str, np.ndarray]]], onnx.ModelProto]


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of one measurement shares, sent to each worker once: how a piece is quantized
    (with weights of ``qtype``), and per probe its key (unique to the probe), the float piece's bytes
    and its feeds."""

    quantize: QuantizePiece
    qtype: int
    reduce_range: bool
    pieces: dict[int, tuple[str, bytes, list[dict[str, np.ndarray]]]]


_FLOAT_PIECES: OrderedDict[str, tuple[GraphIndex, SqnrAgainst]] = OrderedDict()
_FLOAT_PIECES_LOCK = threading.Lock()
KEPT_FLOAT_PIECES = 16  # a chunk of layers: a layer's clips are measured after all the chunk's schemes


def _float_piece(
    key: str, data: bytes, feeds: list[dict[str, np.ndarray]], callers: int
) -> tuple[GraphIndex, SqnrAgainst]:
    """The float piece and its outputs prepared for scoring, run once per process that scores its
    trials (here, or on each worker) and kept for its next trials."""
    with _FLOAT_PIECES_LOCK:  # trials of one piece may run at once (Executor lanes): it is run once
        if key in _FLOAT_PIECES:
            _FLOAT_PIECES.move_to_end(key)
            return _FLOAT_PIECES[key]
        outputs = run_feeds(make_session(data, 1), feeds, callers)
        piece = GraphIndex(onnx.ModelProto.FromString(data)), SqnrAgainst(_flat(outputs))
        _FLOAT_PIECES[key] = piece
        while len(_FLOAT_PIECES) > KEPT_FLOAT_PIECES:
            _FLOAT_PIECES.popitem(last=False)
        return piece


def release_float_pieces(probes: Iterable[BlockProbe]) -> None:
    """Drop this process's copies of finished probes' float pieces (workers' copies age out)."""
    with _FLOAT_PIECES_LOCK:
        for probe in probes:
            _FLOAT_PIECES.pop(probe.key, None)


def _flat(outputs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([out.ravel() for outs in outputs for out in outs])


def trial_sqnr(shared: TrialInputs, task: tuple[int, Trial, int]) -> float:
    """One trial where it runs (in process or on a worker): the probe's piece quantized with the
    trial's schemes, run on the probe's feeds by ``callers`` threads, and its output SQNR against the
    float piece's; only the schemes go out and one figure comes back."""
    index, trial, callers = task
    key, data, feeds = shared.pieces[index]
    piece, reference = _float_piece(key, data, feeds, callers)
    overrides = scheme_overrides(piece, trial, shared.qtype, shared.reduce_range)
    model = shared.quantize(piece.model, list(trial), overrides, feeds)
    return round(reference(_flat(run_feeds(make_session(model, 1), feeds, callers))), 3)


class WeightTuner:
    """Chooses a ``WeightScheme`` per layer by measured output error, on one float model."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[str],
        quantize: QuantizePiece,
        values: FloatValues,
        qtype: int,
        reduce_range: bool,
        threads: int,
        advance: Callable[[int], None] = lambda n: None,
        executor: Executor | None = None,
        exact: Callable[[QuantizedWeight], bool] | None = None,
    ) -> None:
        """``values(names)`` gives the float values of tensors ``names``, one dict per calibration batch;
        ``executor`` runs each layer's candidates. ``exact(weight)``, given where ``quantize`` writes
        dynamic int8 layers: whether this CPU's kernel multiplies ``weight``'s integers exactly. A
        single ``MatMul`` layer whose candidates all pass is scored from its inputs
        (``DynamicLinearError``); the others are run."""
        self.index = GraphIndex(model)
        self.nodes = {node.name: node for node in model.graph.node if node.name in set(layers)}
        self.layers = [name for name in layers if name in self.nodes]
        self.extractor = onnx.utils.Extractor(value_typed(model))
        self.image = model.graph.input[0].name
        self.quantize, self.values = quantize, values
        self.qtype, self.reduce_range, self.threads, self.advance = qtype, reduce_range, threads, advance
        self.executor = executor or Executor()
        self.exact = exact
        # every layer's scores from ``choose_schemes``: each the layer's own output SQNR on float inputs
        self.own_scores: dict[str, dict[WeightScheme, float]] = {}

    def overrides(self, schemes: dict[str, WeightScheme]) -> Overrides:
        return scheme_overrides(self.index, schemes, self.qtype, self.reduce_range)

    def _probes(self, ends: list[tuple[str, str]], chunk: int = 16) -> Iterator[list[BlockProbe | NotSeparable]]:
        """A probe per (input, output) pair, or why there is none, ``chunk`` at a time: their float
        inputs are captured in one pass over the calibration images."""
        for start in range(0, len(ends), chunk):
            pieces: list[onnx.ModelProto | NotSeparable] = []
            for first, last in ends[start : start + chunk]:
                try:
                    pieces.append(BlockProbe.cut(self.extractor, first, last, self.image))
                except NotSeparable as error:
                    pieces.append(error)
            names = sorted(
                {i.name for piece in pieces if isinstance(piece, onnx.ModelProto) for i in piece.graph.input}
            )
            values = self.values(names) if names else []
            probes: list[BlockProbe | NotSeparable] = []
            for piece in pieces:
                if isinstance(piece, NotSeparable):
                    probes.append(piece)
                    continue
                inputs = [i.name for i in piece.graph.input]
                probes.append(BlockProbe(piece, [{name: batch[name] for name in inputs} for batch in values]))
            yield probes

    def _measure(self, jobs: list[tuple[BlockProbe, list[Trial]]]) -> list[list[float]]:
        """For each (probe, trials), the piece's output SQNR under each trial's schemes. Every trial goes
        to the executor as one stream, each quantized and scored where it runs (``trial_sqnr``)."""
        plan = [(index, trial) for index, (_, trials) in enumerate(jobs) for trial in trials]
        callers = self.executor.task_threads(self.threads)
        shared = TrialInputs(
            self.quantize,
            self.qtype,
            self.reduce_range,
            {index: (probe.key, probe.data, probe.feeds) for index, (probe, _) in enumerate(jobs)},
        )
        tasks = ((index, trial, callers) for index, trial in plan)
        scores = dict(self.executor.stream(trial_sqnr, tasks, shared))
        result: list[list[float]] = [[] for _ in jobs]
        for position, (index, _) in enumerate(plan):
            result[index].append(scores[position])
        return result

    def choose_schemes(
        self,
        default: WeightScheme = DEFAULT,
        candidates: Iterable[WeightScheme] = SCHEMES,
        clips: Iterable[float] = CLIP_GRID,
        min_gain_db: float = 0.1,
    ) -> tuple[dict[str, WeightScheme], dict[str, dict[str, Any]]]:
        """Per layer, the candidate with the highest output SQNR, then the clip that raises it most;
        ``default`` unless another beats it by ``min_gain_db`` (less is calibration noise)."""
        candidates, clips = list(dict.fromkeys([default, *candidates])), [clip for clip in clips if clip != 1.0]
        exact = self._exact_scores([layer for layer in self.layers if self._scored_exactly(layer)], candidates, clips)
        scores: dict[str, dict[WeightScheme, float] | NotSeparable] = dict(exact)
        scores.update(self._run_scores([layer for layer in self.layers if layer not in exact], candidates, clips))
        self.own_scores = {layer: found for layer, found in scores.items() if not isinstance(found, NotSeparable)}
        chosen, table = {}, {}
        for layer in self.layers:
            layer_scores = scores[layer]
            if isinstance(layer_scores, NotSeparable):
                table[layer] = {"chosen": default.label, "why": f"not measured: {layer_scores}"}
                chosen[layer] = default
                continue
            best = max(layer_scores, key=layer_scores.__getitem__)
            if layer_scores[best] < layer_scores[default] + min_gain_db:
                best = default
            chosen[layer] = best
            table[layer] = {
                "chosen": best.label,
                "default": default.label,
                "sqnr_db": {s.label: v for s, v in layer_scores.items()},
            }
        return chosen, table

    def _scored_exactly(self, layer: str) -> bool:
        node = self.nodes[layer]
        weight = self.index.constant(node.input[1]) if node.op_type == "MatMul" else None
        return self.exact is not None and weight is not None and weight.ndim == 2

    def _exact_scores(
        self, layers: list[str], candidates: list[WeightScheme], clips: list[float]
    ) -> dict[str, dict[WeightScheme, float]]:
        """Each layer's candidates, then the best one's clips, scored from its inputs on the
        calibration images (captured for as many layers at once as the values' budget holds); a layer
        with a candidate the kernel would not multiply exactly is left out."""
        result = {}
        for indices in self.values.chunks([[self.nodes[layer].input[0]] for layer in layers]):
            part = [layers[index] for index in indices]
            captured = self.values(sorted({self.nodes[layer].input[0] for layer in part}))
            for layer in part:
                node = self.nodes[layer]
                try:
                    result[layer] = self._layer_scores(
                        node, [batch[node.input[0]] for batch in captured], candidates, clips
                    )
                except _NotExact:
                    continue
                self.advance(1)
        return result

    def _layer_scores(
        self, node: onnx.NodeProto, inputs: list[np.ndarray], candidates: list[WeightScheme], clips: list[float]
    ) -> dict[WeightScheme, float]:
        weight = self.index.constant(node.input[1])
        axis = weight_channel_axis(node)
        assert weight is not None and axis is not None and self.exact is not None  # a MatMul's constant weight
        exact = self.exact

        def quantized(scheme: WeightScheme) -> np.ndarray:
            integers = scheme.quantize(weight, axis % weight.ndim, self.qtype, self.reduce_range)
            if not exact(integers):
                raise _NotExact
            return integers.dequantized()

        for scheme in candidates:  # the tightest clip has the widest integers: fall back before computing
            quantized(dataclasses.replace(scheme, clip=min(clips, default=1.0)))
        error = DynamicLinearError(inputs, weight)
        scores = {scheme: round(error.sqnr_db(quantized(scheme)), 3) for scheme in candidates}
        best = max(scores, key=scores.__getitem__)
        for clip in clips:
            scheme = dataclasses.replace(best, clip=clip)
            scores[scheme] = round(error.sqnr_db(quantized(scheme)), 3)
        return scores

    def _run_scores(
        self, layers: list[str], candidates: list[WeightScheme], clips: list[float]
    ) -> dict[str, dict[WeightScheme, float] | NotSeparable]:
        """Each layer's candidates, then the best one's clips, each quantized and run on the
        calibration images (or why the layer could not be cut out to run alone)."""
        result: dict[str, dict[WeightScheme, float] | NotSeparable] = {}
        ends = [(self.nodes[layer].input[0], self.nodes[layer].output[0]) for layer in layers]
        remaining = iter(layers)
        for probes in self._probes(ends):  # a chunk of layers: their candidates, then their clips, measured together
            chunk = [(next(remaining), probe) for probe in probes]
            measured = [(layer, probe) for layer, probe in chunk if isinstance(probe, BlockProbe)]
            first = self._measure([(probe, [{layer: scheme} for scheme in candidates]) for layer, probe in measured])
            scores = {layer: dict(zip(candidates, values)) for (layer, _), values in zip(measured, first)}
            clipped = {
                layer: [dataclasses.replace(max(scores[layer], key=scores[layer].__getitem__), clip=c) for c in clips]
                for layer, _ in measured
            }
            second = self._measure(
                [(probe, [{layer: scheme} for scheme in clipped[layer]]) for layer, probe in measured]
            )
            for (layer, _), values in zip(measured, second):
                scores[layer].update(zip(clipped[layer], values))
            release_float_pieces(probe for _, probe in measured)
            for layer, probe in chunk:
                result[layer] = probe if isinstance(probe, NotSeparable) else scores[layer]
                self.advance(1)
        return result

    def reconstruct(
        self, bridges: list[dict[str, Any]], schemes: dict[str, WeightScheme], grid: Iterable[float] = CLIP_GRID
    ) -> tuple[dict[str, WeightScheme], dict[str, dict[str, Any]]]:
        """For each bridge block (conv <-> token reshape <-> linear), the clip of each of its quantized
        layers, one at a time, that gives the block's output the highest SQNR. Where a block's one
        quantized layer is its last (a dynamic int8 linear after a float conv), the block's output is
        that layer's: its clips are read from ``choose_schemes``'s scores where it measured them all,
        not run again on the block."""
        schemes = dict(schemes)
        table: dict[str, dict[str, Any]] = {}
        blocks = []  # (bridge, its quantized layers not tuned by an earlier bridge)
        for bridge in bridges:
            tuned = [
                name
                for name in (bridge["conv"], bridge["linear"])
                if name in self.nodes and all(name not in layers for _, layers in blocks)
            ]
            if tuned:
                blocks.append((bridge, tuned))
        self.advance(len(bridges) - len(blocks))

        def layers(bridge: dict[str, Any]) -> tuple[str, str]:
            kind = bridge["kind"]
            return (bridge["conv"], bridge["linear"]) if kind == "to_tokens" else (bridge["linear"], bridge["conv"])

        def ends(bridge: dict[str, Any]) -> tuple[str, str]:
            first, last = layers(bridge)
            return self._node(first).input[0], self._node(last).output[0]

        def own_trials(bridge: dict[str, Any], tuned: list[str]) -> dict[WeightScheme, float] | None:
            # the block's output SQNR under each clip of its one quantized layer, where that layer
            # ends the block and its own scores hold every clip
            if tuned != [layers(bridge)[1]]:
                return None
            own = self.own_scores.get(tuned[0], {})
            trials = [schemes[tuned[0]], *(dataclasses.replace(schemes[tuned[0]], clip=clip) for clip in grid)]
            return {trial: own[trial] for trial in trials} if all(trial in own for trial in trials) else None

        known = [own_trials(bridge, tuned) for bridge, tuned in blocks]
        run = [index for index, scores in enumerate(known) if scores is None]
        found = [probe for chunk in self._probes([ends(blocks[index][0]) for index in run]) for probe in chunk]
        probes = dict(zip(run, found))
        for index, (bridge, tuned) in enumerate(blocks):
            self.advance(1)
            scores = known[index]
            if scores is not None:  # the layer's own scheme first: a clip must beat it, as in a run
                (name,) = tuned
                before, schemes[name] = scores[schemes[name]], max(scores, key=scores.__getitem__)
                table[name] = {
                    "bridge": bridge["at"],
                    "clip": schemes[name].clip,
                    "block_sqnr_db": {"before": before, "after": scores[schemes[name]]},
                    "measured": "the layer's own output (the block's only quantized layer, and its last)",
                }
                continue
            probe = probes[index]
            if isinstance(probe, NotSeparable):
                table.update({name: {"bridge": bridge["at"], "why": f"not tuned: {probe}"} for name in tuned})
                continue
            block = {name: schemes[name] for name in tuned}
            ((before,),) = self._measure([(probe, [block])])
            best_score = before
            for name in tuned:  # one layer at a time; its clips are measured together
                trials = [{**block, name: dataclasses.replace(block[name], clip=clip)} for clip in grid]
                (values,) = self._measure([(probe, trials)])
                for trial, score in zip(trials, values):
                    if score > best_score:
                        best_score, block = score, trial
            release_float_pieces([probe])
            for name in tuned:
                schemes[name] = block[name]
                table[name] = {
                    "bridge": bridge["at"],
                    "clip": block[name].clip,
                    "block_sqnr_db": {"before": before, "after": best_score},
                }
        return schemes, table

    def _node(self, name: str) -> onnx.NodeProto:
        return self.nodes.get(name) or next(n for n in self.index.model.graph.node if n.name == name)
