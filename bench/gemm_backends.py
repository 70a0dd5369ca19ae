"""PyTorch's and ONNX Runtime's float GEMM at a ViT's linear-layer shapes, one thread each.

Why a PyTorch eager evaluation can cost far more than ONNX Runtime's on the same CPU: eager PyTorch
runs its linear layers through its BLAS (MKL in the x86 wheels), ONNX Runtime through its own MLAS
kernels, and the two need not pick the same instruction set. PyTorch's oneDNN linear operator (what
onnxvit scores a PyTorch variant with, `onnxvit/eager.py`) is timed beside them. Prints, per shape,
each backend's best time and GFLOP/s and the ratios, and the BLAS's own account of the code path it
dispatched (MKL_VERBOSE); with --json PATH writes them with a `headline` (`torch_over_onnxruntime`,
`onednn_over_onnxruntime`: the FLOP-weighted time ratios over the model's linear layers).

    python bench/gemm_backends.py [--model deit_tiny_patch16_224] [--json PATH]
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

import onnxvit._compat  # noqa: F401  (before timm)

from _common import arguments, print_table, write_json

CALLS, REPEATS = 300, 5


def model_shapes(model_name: str) -> Counter[tuple[int, int, int]]:
    """(rows, in, out) of each linear layer of the timm model (random init) as it runs at batch 1,
    with its count: the exported model's layers, found as the profile stage finds them."""
    import timm
    import torch

    from onnxvit.config import ExportConfig
    from onnxvit.export import export_onnx
    from passes.int8_limit import linear_shapes

    model = timm.create_model(model_name, pretrained=False).eval()
    shape = tuple(model.pretrained_cfg["input_size"])
    proto = export_onnx(model, torch.zeros(1, *shape).numpy(), ExportConfig())
    return Counter((math.prod(s.rows), s.k, s.n) for s in linear_shapes(proto, shape, 1))


def best_seconds(call: Callable[[], Any]) -> float:
    """The fastest mean over ``REPEATS`` rounds of ``CALLS`` calls, after a warm-up."""
    for _ in range(CALLS // 5):
        call()
    rounds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(CALLS):
            call()
        rounds.append((time.perf_counter() - start) / CALLS)
    return min(rounds)


def onnx_matmul(a: np.ndarray, w: np.ndarray) -> Callable[[], Any]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [a.shape[0], w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


def blas_dispatch() -> str | None:
    """MKL's first verbose line (its build and the code path it picked), from a child process."""
    code = "import torch; torch.nn.functional.linear(torch.ones(8, 8), torch.ones(8, 8))"
    env = {**os.environ, "MKL_VERBOSE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("MKL_VERBOSE") and "SGEMM" not in line]
    return lines[0] if lines else None


def main() -> None:
    args = arguments(__doc__, "bench-gemm", model=dict(default="deit_tiny_patch16_224")).parse_args()
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    from onnxvit.eager import onednn_available, onednn_linear

    onednn = onednn_available()
    rows, torch_total, ort_total, onednn_total = [], 0.0, 0.0, 0.0
    for (m, k, n), count in sorted(model_shapes(args.model).items()):
        a, w = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        ta, tw = torch.from_numpy(a), torch.from_numpy(np.ascontiguousarray(w.T))
        with torch.inference_mode():
            torch_s = best_seconds(lambda: torch.nn.functional.linear(ta, tw))  # noqa: B023
            onednn_s = (
                best_seconds(lambda: onednn_linear(ta, tw, None))  # noqa: B023
                if onednn
                else math.nan
            )
        ort_s = best_seconds(onnx_matmul(a, w))
        flops = 2 * m * k * n
        rows.append(
            {
                "rows": m,
                "k": k,
                "n": n,
                "count": count,
                "torch_us": round(torch_s * 1e6, 1),
                "onnxruntime_us": round(ort_s * 1e6, 1),
                "torch_gflops": round(flops / torch_s / 1e9, 1),
                "onnxruntime_gflops": round(flops / ort_s / 1e9, 1),
                "onednn_us": round(onednn_s * 1e6, 1),
                "torch_over_onnxruntime": round(torch_s / ort_s, 3),
                "onednn_over_onnxruntime": round(onednn_s / ort_s, 3),
            }
        )
        torch_total, ort_total = torch_total + count * torch_s, ort_total + count * ort_s
        onednn_total += count * onednn_s
    print_table(rows, list(rows[0]))
    config = torch.__config__.show()
    headline = {
        "model": args.model,
        "threads": 1,
        "torch_over_onnxruntime": round(torch_total / ort_total, 3),
        "onednn_over_onnxruntime": round(onednn_total / ort_total, 3),
        "torch_linear_ms": round(torch_total * 1e3, 3),
        "onednn_linear_ms": round(onednn_total * 1e3, 3),
        "onnxruntime_linear_ms": round(ort_total * 1e3, 3),
        "torch_cpu_capability": next(
            (line.split(":", 1)[1].strip() for line in config.splitlines() if "CPU capability" in line), None
        ),
        "blas_dispatch": blas_dispatch(),
    }
    print(headline)
    write_json(args.json, table=rows, headline=headline)


if __name__ == "__main__":
    main()
