"""Where a model's time goes: ONNX Runtime's own profiler, per node of the graph ONNX Runtime runs
(after its session fusions), by category and precision, each node named by its module path.

A report that says "int8 is 1.4x" cannot say why it is not 2x; the profile can: the int8 GEMMs
may be fast and the float LayerNorms, attention and layout ops around them the rest. Nodes are
named by the module path the exporter wrote into tensor names (``blocks.3.mlp.fc1``), found from
the node's outputs downstream, since fusions rename nodes but keep the tensors after them.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from passes.module_names import node_modules
from passes.runtime import make_session, session_options
from passes.timing import benchmark_input, measure_latency, onnx_runner, runs_per_round

# Categories in the order a report shows them; an op type not listed is "elementwise".
CATEGORY_OPS: dict[str, frozenset[str]] = {
    "int8 GEMM": frozenset(
        {
            "DynamicQuantizeMatMul",
            "MatMulInteger",
            "MatMulIntegerToFloat",
            "QLinearMatMul",
            "QGemm",
            "QLinearConv",
            "ConvInteger",
        }
    ),
    "int4 GEMM": frozenset({"MatMulNBits"}),
    "float GEMM": frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv", "NhwcFusedConv"}),
    # QAttention holds an int8 qkv projection too, but most of its time is the float attention
    "attention": frozenset({"MultiHeadAttention", "Attention", "QAttention", "Softmax", "GroupQueryAttention"}),
    "LayerNorm": frozenset(
        {
            "LayerNormalization",
            "SkipLayerNormalization",
            "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization",
            "BatchNormalization",
            "GroupNorm",
            "InstanceNormalization",
        }
    ),
    "activation": frozenset(
        {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Erf", "Tanh", "Sigmoid", "Relu", "HardSwish", "HardSigmoid"}
    ),
    "quantize": frozenset({"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}),
    "token merging": frozenset({"TopK", "GatherElements", "ScatterElements", "ScatterND", "ArgMax", "ArgMin"}),
    "layout": frozenset(
        {
            "Reshape",
            "Transpose",
            "Concat",
            "Split",
            "Slice",
            "Gather",
            "Squeeze",
            "Unsqueeze",
            "Expand",
            "Shape",
            "Flatten",
            "Cast",
            "ReorderInput",
            "ReorderOutput",
            "Identity",
            "Where",
            "Equal",
            "Tile",
            "ConstantOfShape",
            "Range",
        }
    ),
}
CATEGORIES = (*CATEGORY_OPS, "elementwise")
LINEAR_OPS = frozenset({"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm"}) | {
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "FusedGemm",
    "MatMulNBits",
}


def category(op_type: str) -> str:
    return next((name for name, ops in CATEGORY_OPS.items() if op_type in ops), "elementwise")


@dataclass(frozen=True)
class NodeTime:
    """One node of the graph ONNX Runtime ran, and its mean time per model run."""

    node: str
    op_type: str
    category: str
    module: str
    linear: bool  # part of a linear layer (a GEMM with a constant weight, or its bias Add): what int8 speeds up
    ms: float


@dataclass
class Profile:
    nodes: list[NodeTime]
    runs: int
    run_ms: float  # median wall time of one profiled run, as ONNX Runtime's profiler saw it
    node_cost_ms: float = 0.0  # the profiler's own cost per node, taken off every node's time

    @property
    def total_ms(self) -> float:
        return float(sum(n.ms for n in self.nodes))

    @property
    def linear_ms(self) -> float:
        return float(sum(n.ms for n in self.nodes if n.linear))

    def less_cost(self, node_cost_ms: float) -> Profile:
        """The same profile with ``node_cost_ms`` (the profiler's own cost per node) off every node."""
        nodes = [replace(n, ms=max(n.ms - node_cost_ms, 0.0)) for n in self.nodes]
        return Profile(nodes, self.runs, self.run_ms, self.node_cost_ms + node_cost_ms)

    def by_category(self) -> dict[str, float]:
        totals = {name: 0.0 for name in CATEGORIES}
        for n in self.nodes:
            totals[n.category] += n.ms
        return {name: round(ms, 4) for name, ms in totals.items() if ms > 0}

    def slowest(self, count: int = 10) -> list[NodeTime]:
        return sorted(self.nodes, key=lambda n: -n.ms)[:count]

    def to_record(self) -> dict:
        """Every node, as ``from_record`` reads it back: what a cache keeps of a raw profile."""
        return {"nodes": [asdict(n) for n in self.nodes], "runs": self.runs, "run_ms": self.run_ms}

    @classmethod
    def from_record(cls, record: dict) -> Profile:
        return cls([NodeTime(**n) for n in record["nodes"]], record["runs"], record["run_ms"])

    def to_json(self) -> dict:
        return {
            "runs": self.runs,
            "run_ms": round(self.run_ms, 4),
            "profiler_cost_per_node_ms": round(self.node_cost_ms, 5),
            "nodes": len(self.nodes),
            "total_ms": round(self.total_ms, 4),
            "linear_ms": round(self.linear_ms, 4),
            "categories_ms": self.by_category(),
            "slowest": [{**asdict(n), "ms": round(n.ms, 4)} for n in self.slowest()],
        }


def linear_layer_nodes(graph: onnx.GraphProto, constants: set[str]) -> set[str]:
    """The nodes of the linear layers: each GEMM with a constant weight, and the Add of a constant
    onto one's output where that is a node of its own (its bias: an int8 kernel adds it in the same
    call, so a bound that left it out would leave int8 less room than it has)."""
    gemms = {n.name for n in graph.node if n.op_type in LINEAR_OPS and any(i in constants for i in n.input[1:2])}
    outputs = {out for n in graph.node if n.name in gemms for out in n.output}
    biases = {
        n.name
        for n in graph.node
        if n.op_type == "Add" and len(n.input) == 2 and {*n.input} & outputs and {*n.input} & constants
    }
    return gemms | biases


def parse_profile(
    events: list[dict],
    graph: onnx.GraphProto,
    skip_runs: int = 0,
    source: onnx.GraphProto | None = None,
    node_cost_ms: float = 0.0,
) -> Profile:
    """A profile from ONNX Runtime's trace ``events`` of runs of the optimized ``graph``; the first
    ``skip_runs`` runs (warm-up) are left out. Each node's time is its median kernel time over the
    counted runs, less ``node_cost_ms`` (the profiler's own cost per node, which its kernel-time event holds).
    Nodes that kept their name from ``source`` (the graph before ONNX Runtime's fusions, whose tensors
    still carry the exporter's names) are named from there."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    counted = runs[skip_runs:]
    if not counted:
        raise ValueError("the profile holds no run after warm-up")
    starts = [e["ts"] for e in counted]
    kernels = [
        e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[0]
    ]
    constants = {init.name for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    linear_nodes = linear_layer_nodes(graph, constants)
    modules = {**node_modules(graph), **(node_modules(source) if source is not None else {})}
    per_run: dict[str, np.ndarray] = {}  # each node's time in each counted run
    ops: dict[str, str] = {}
    for event in kernels:
        name = event["name"][: -len("_kernel_time")]
        times = per_run.setdefault(name, np.zeros(len(counted)))
        times[bisect.bisect_right(starts, event["ts"]) - 1] += event["dur"] / 1e3
        ops[name] = event["args"].get("op_name", nodes[name].op_type if name in nodes else "?")
    result = []
    for name, times in per_run.items():
        op_type = ops[name]
        linear = name in linear_nodes
        # the median run, as the timing loop reports: the first call after another model's round is slower
        ms = float(np.median(times))
        result.append(NodeTime(name, op_type, category(op_type), modules.get(name, name), linear, ms))
    profile = Profile(result, len(counted), float(np.median([e["dur"] / 1e3 for e in counted])))
    return profile.less_cost(node_cost_ms) if node_cost_ms else profile


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The collector paused while ONNX Runtime's trace is parsed and read: its many small objects
    would start collections whose passes over a pipeline's large heap cost more than the parse. They
    hold no cycles: the caller frees them by dropping them before the block ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def profile_model(
    model: onnx.ModelProto | Path, shape: tuple[int, ...], threads: int, batch_size: int, warmup: int, runs: int
) -> Profile:
    """``model`` profiled by ONNX Runtime on the benchmark input: ``warmup`` runs, then ``runs``
    counted, in a session opened as every timed session is."""
    return profile_models({"model": model}, shape, threads, batch_size, warmup, runs, rounds=1)["model"]


def profile_models(
    models: dict[str, onnx.ModelProto | Path],
    shape: tuple[int, ...],
    threads: int,
    batch_size: int,
    warmup: int,
    runs: int,
    rounds: int = 5,
    unprofiled_ms: Mapping[str, float] | None = None,
    raw: bool = False,
) -> dict[str, Profile]:
    """Each model profiled on the benchmark input: ``warmup`` runs, then ``runs`` counted, split
    over ``rounds`` interleaved as the timing loop does (a slow spell of the machine falls on every
    model, not on one), each in a session opened as every timed session is. The profiler builds
    each event's arguments inside the node's timed span, so a model of many small nodes can sum to
    more than its unprofiled run; that excess, spread evenly over the nodes, is taken off every
    node's time. The unprofiled run is ``unprofiled_ms[name]`` where the caller timed the model
    already (the benchmark stage, in the same process); otherwise the timing loop times it first.
    ``raw``: the profiles as the profiler saw them, for a caller that takes its cost off later
    (``less_profiler_cost``, against its own timing)."""
    if not raw and unprofiled_ms is None:
        runners = {name: onnx_runner(model, shape, threads, batch_size) for name, model in models.items()}
        unprofiled_ms = {name: t["median"] for name, t in measure_latency(runners, warmup, runs, rounds).items()}
    with tempfile.TemporaryDirectory(prefix="onnxvit-profile-") as tmp:
        profiled, feeds = {}, {}
        for index, (name, model) in enumerate(models.items()):
            options = session_options(threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"profile-{index}")
            options.optimized_model_filepath = str(Path(tmp) / f"optimized-{index}.onnx")
            profiled[name] = make_session(model, threads, options)
            feeds[name] = {profiled[name].get_inputs()[0].name: benchmark_input(shape, batch_size)}
            for _ in range(warmup):
                profiled[name].run(None, feeds[name])
        for count in runs_per_round(runs, rounds):
            for name in models:
                for _ in range(count):
                    profiled[name].run(None, feeds[name])
        result = {}
        for index, (name, model) in enumerate(models.items()):
            graph = onnx.load(Path(tmp) / f"optimized-{index}.onnx", load_external_data=False).graph
            original = model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
            with paused_gc():
                events = json.loads(Path(profiled[name].end_profiling()).read_text())
                profile = parse_profile(events, graph, warmup, original.graph)
                del events
            result[name] = profile if raw or unprofiled_ms is None else less_profiler_cost(profile, unprofiled_ms[name])
        return result


def less_profiler_cost(raw: Profile, unprofiled_ms: float) -> Profile:
    """``raw`` less the profiler's own cost: what its nodes' sum exceeds a whole unprofiled run
    (``unprofiled_ms``) by, spread evenly over the nodes."""
    return raw.less_cost(max(raw.total_ms - unprofiled_ms, 0.0) / max(len(raw.nodes), 1))
