"""Latency runners for what ONNX Runtime cannot run: PyTorch eager and the Lite interpreter.

The timing loop itself is ``passes.timing``, shared with the searches, so every latency in a report
comes from one loop.
"""

from __future__ import annotations

from typing import Any

from passes.timing import Runner, benchmark_input


def torch_runner(model: Any, shape: tuple[int, ...], threads: int, batch_size: int = 1) -> Runner:
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(benchmark_input(shape, batch_size))

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run
