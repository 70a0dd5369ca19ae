"""What int8 can give a model on this CPU: the ratio of ONNX Runtime's float and dynamic int8 GEMM
kernels at the model's own linear-layer shapes, measured in isolation, and the model's best int8
speed-up that follows from it with everything else as profiled.

A CPU without VNNI multiplies int8 through 16-bit pairs and gains little over float; one with VNNI,
AMX or ARM's dot-product instructions gains much more. Saying "int8 is 1.2x" means little without
"and this CPU's int8 kernels allow 1.3x for this model".
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.graph import copy_model, gemms_as_matmul
from passes.int8_layers import DynamicInt8Builder
from passes.ort_quant import ensure_node_names, tensor_values
from passes.timing import Runner, benchmark_input, measure_latency, onnx_runner, timed_rounds

ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_tile",
    "asimddp",  # ARM dot product (SDOT / UDOT)
    "i8mm",  # ARM int8 matrix multiply (SMMLA)
)
NO_GAIN = 1.05  # below this bound, int8 is a size lever here, not a speed one


def cpu_int8_features() -> list[str]:
    """The instruction sets among ``ISA_FLAGS`` this CPU reports (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    return [flag for flag in ISA_FLAGS if flag in flags]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class LinearShape:
    """A linear layer's GEMM: ``rows`` = the activation's leading dims, ``k`` inputs, ``n`` outputs."""

    rows: tuple[int, ...]
    k: int
    n: int


def linear_shapes(model: onnx.ModelProto, input_shape: tuple[int, ...], batch_size: int) -> list[LinearShape]:
    """Every linear layer (MatMul / Gemm with a constant weight) of a float model, as it runs on the
    benchmark input, in graph order."""
    prepared = copy_model(model)
    ensure_node_names(prepared)
    gemms_as_matmul(prepared)
    constants = {init.name: init for init in prepared.graph.initializer}
    layers = [
        n
        for n in prepared.graph.node
        if n.op_type == "MatMul" and n.input[1] in constants and len(constants[n.input[1]].dims) == 2
    ]
    if not layers:
        return []
    image = prepared.graph.input[0].name
    names = list(dict.fromkeys(n.input[0] for n in layers))
    values = next(tensor_values(prepared, names, [benchmark_input(input_shape, batch_size)], image, 1))
    result = []
    for node in layers:
        k, n = constants[node.input[1]].dims
        result.append(LinearShape(tuple(values[node.input[0]].shape[:-1]), int(k), int(n)))
    return result


# Copies of a layer in each timed call: a kernel is timed between others, as in a model, where the
# thread pool spins from one node to the next; one layer per call would time the pool's wake-up too
# (sessions stop spinning when a call returns) or, with spinning left on, the last session's threads.
GEMM_COPIES = 8
LAYERS = [f"linear_{index}" for index in range(GEMM_COPIES)]


def _gemm_model(shape: LinearShape, seed: int) -> onnx.ModelProto:
    """``GEMM_COPIES`` float linear layers of ``shape``, each with its own weight, all reading one input."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((shape.k, shape.n)).astype(np.float32) * 0.05 for _ in LAYERS]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name) for i, name in enumerate(LAYERS)],
        "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [*shape.rows, shape.k])],
        [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in range(len(LAYERS))],
        [numpy_helper.from_array(weight, f"w{i}") for i, weight in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _dynamic_int8(qtype: int, reduce_range: bool) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    return lambda model: DynamicInt8Builder(model, LAYERS, qtype, reduce_range).build(LAYERS)


def _shape_runners(
    shapes: list[LinearShape], threads: int, kinds: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]]
) -> tuple[dict[LinearShape, int], dict[str, Runner]]:
    """How often ``shapes`` holds each distinct shape, and a runner per distinct shape and kind
    (named ``index/kind``): its float layers (``GEMM_COPIES`` in one call) made into each of ``kinds``."""
    counts: dict[LinearShape, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    runners = {}
    for index, shape in enumerate(counts):
        float_model = _gemm_model(shape, index)
        # the timing loop's own runner: the activation's leading dim is its "batch"
        activation, leading = (*shape.rows[1:], shape.k), shape.rows[0]
        for kind, make in kinds.items():
            runners[f"{index}/{kind}"] = onnx_runner(make(float_model), activation, threads, leading)
    return counts, runners


def _time_at_shapes(
    shapes: list[LinearShape],
    threads: int,
    kinds: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]],
    warmup: int,
    runs: int,
    rounds: int,
) -> list[tuple[LinearShape, int, dict[str, float]]]:
    """Each distinct shape's float layer made into each of ``kinds``, all timed interleaved: per
    shape, how often ``shapes`` holds it and each kind's median ms per layer."""
    counts, runners = _shape_runners(shapes, threads, kinds)
    times = measure_latency(runners, warmup, runs, rounds)
    return [
        (shape, count, {kind: round(times[f"{index}/{kind}"]["median"] / GEMM_COPIES, 4) for kind in kinds})
        for index, (shape, count) in enumerate(counts.items())
    ]


def gemm_speedup(
    shapes: list[LinearShape], threads: int, reduce_range: bool, warmup: int = 10, runs: int = 60, rounds: int = 5
) -> dict:
    """ONNX Runtime's dynamic int8 GEMM (DynamicQuantizeMatMul, activation quantization included)
    against its float GEMM at each distinct shape, timed interleaved; the overall ratio weights each
    shape by how often the model runs it."""
    kinds = {"float": lambda model: model, "int8": _dynamic_int8(onnx.TensorProto.INT8, reduce_range)}
    timed = _time_at_shapes(shapes, threads, kinds, warmup, runs, rounds)
    float_total = sum(count * ms["float"] for _, count, ms in timed)
    int8_total = sum(count * ms["int8"] for _, count, ms in timed)
    table = [
        {"rows": list(s.rows), "k": s.k, "n": s.n, "count": count, "float_ms": ms["float"], "int8_ms": ms["int8"]}
        for s, count, ms in timed
    ]
    return {"int8_gemm_speedup": round(float_total / int8_total, 4) if int8_total else None, "shapes": table}


def u8u8_speed(shapes: list[LinearShape], threads: int, warmup: int = 5, runs: int = 8, rounds: int = 6) -> dict:
    """ONNX Runtime's dynamic uint8 x uint8 GEMM (full-range uint8 weights) against its uint8 x int8
    GEMM with 7-bit weights, at each distinct shape, timed interleaved in ``rounds`` rounds of
    ``runs``: per round, the u8u8 time over the u8s8 time, each shape weighted by how often the model
    runs it (``round_ratios``), and their median (``u8u8_time_ratio``). On x86 without VNNI the u8s8
    kernel needs 7-bit weights not to saturate; u8u8 keeps all 8 bits."""
    kinds = {
        "u8s8": _dynamic_int8(onnx.TensorProto.INT8, True),
        "u8u8": _dynamic_int8(onnx.TensorProto.UINT8, False),
    }
    counts, runners = _shape_runners(shapes, threads, kinds)
    times = timed_rounds(runners, warmup, runs * rounds, rounds)
    ratios = []
    for round_index in range(rounds):
        total = {
            kind: sum(c * float(np.median(times[f"{i}/{kind}"][round_index])) for i, c in enumerate(counts.values()))
            for kind in kinds
        }
        if total["u8s8"]:
            ratios.append(total["u8u8"] / total["u8s8"])
    return {
        "u8u8_time_ratio": round(float(np.median(ratios)), 4) if ratios else None,
        "round_ratios": [round(ratio, 4) for ratio in ratios],
        "shapes": len(counts),
    }


def int8_bound(reference_total: float, reference_linear: float, gemm_speedup: float) -> float:
    """The best speed-up int8 linear layers can give a float model here: its linear layers' share of
    the profiled time made ``gemm_speedup`` times faster, the rest as profiled (Amdahl's law)."""
    share = reference_linear / reference_total
    return 1.0 / (1.0 - share + share / gemm_speedup)


def machine_summary() -> dict[str, object]:
    """The CPU's architecture and the int8 instruction sets it has."""
    return {"arch": platform.machine(), "int8_isa": cpu_int8_features()}
