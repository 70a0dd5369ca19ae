"""How the PyTorch variant is scored: its float32 linear layers on oneDNN, its ops run as a trace.

PyTorch runs an ``nn.Linear`` through MKL's GEMM, and MKL chooses its code path by CPU vendor: on
AMD CPUs it takes a path that leaves AVX-512 unused (``MKL_VERBOSE`` names a generic "Intel(R)
Architecture processors" path there, where an Intel CPU's names its vector extensions). The oneDNN
library PyTorch also ships chooses its kernels by instruction set alone. Where the BLAS is
MKL (the x86 builds), scoring runs the same float32 products through oneDNN: the logits differ in
their last bits, as another thread count makes them, and a PyTorch variant's latency stays that of
the model as a user runs it.

The scoring copy is then run as a TorchScript trace where that gives the same logits: the ops eager
PyTorch calls, in its order and on its kernels, without the Python of every module call between
them (which two parallel callers also contend for). The trace runs unoptimized, and is used only
where its logits equal eager's bit for bit on the first batches; otherwise eager runs.
"""

from __future__ import annotations

import copy
import functools
import itertools
import warnings
from collections.abc import Callable
from typing import Any, TypeGuard

import numpy as np
import torch

# what the scoring caches record of how a PyTorch variant's logits were computed
LINEAR_KERNEL = "onednn-1"
# a trace is built and checked for a call of this many batches or more; fewer run eagerly
TRACE_MIN_BATCHES = 8
# the first batches of a call whose trace and eager logits must be equal for the trace to be used
TRACE_CHECK_BATCHES = 2


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear operator (CPU builds for x86 and Arm do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_scoring() -> bool:
    """Whether the PyTorch variant is scored on oneDNN: where its BLAS is MKL (the x86 builds), whose
    GEMM is what vendor dispatch slows. Elsewhere the BLAS (Apple's Accelerate, OpenBLAS) chooses by
    the CPU itself and is kept."""
    return onednn_available() and torch.backends.mkl.is_available()


class OneDNNLinear(torch.nn.Module):
    """An ``nn.Linear``'s float32 weights run by oneDNN's linear operator, with no fused activation."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scripted_linear()(x, self.weight, self.bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's linear operator, with no fused activation."""
    # the empty list typed as the operator's Scalar?[]: untyped, a trace cannot record it
    scalars = torch.jit.annotate(list[int | float | complex | None], [])
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", scalars, "")


@functools.cache
def _scripted_linear() -> Callable[..., torch.Tensor]:
    """oneDNN's linear as a TorchScript function, which a trace can record (called eagerly, it runs
    as fast as the operator); the plain function where TorchScript is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(onednn_linear)  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - eager calls still work; a trace of the model then fails and eager scores
        return onednn_linear


def _swappable(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear]:
    return type(module) is torch.nn.Linear and module.weight.dtype == torch.float32


def linear_kernel(model: Any) -> str:
    """The kernel name the scoring caches record for ``model``: ``LINEAR_KERNEL`` where
    ``onednn_linears`` swaps its layers (``onednn_scoring`` says yes and a float32 ``nn.Linear`` is
    there), else ``"default"``; read without building the copy, as a cached run needs only this."""
    if isinstance(model, torch.nn.Module) and onednn_scoring() and any(map(_swappable, model.modules())):
        return LINEAR_KERNEL
    return "default"


def onednn_linears(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """A copy of ``model`` whose float32 ``nn.Linear`` layers run on oneDNN, and its ``linear_kernel``;
    ``model`` itself and ``"default"`` where that kernel is the default. ``model`` is left as it is."""
    kernel = linear_kernel(model)
    if kernel == "default":
        return model, kernel
    # the copy's modules are new, its tensors the model's own: no second copy of the weights
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    copied = copy.deepcopy(model, shared)
    for parent in copied.modules():
        for name, child in parent.named_children():
            if _swappable(child):
                setattr(parent, name, OneDNNLinear(child))
    return copied, kernel


class TracedModel:
    """A model's trace for inputs of the shape it was traced at, the model itself for any other (a
    call's last, smaller batch). The trace runs unoptimized: the recorded ops as they are."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], trace: Any, shape: tuple[int, ...]) -> None:
        self.model, self.trace, self.shape = model, trace, shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            return self.model(x)
        with torch.jit.optimized_execution(False):  # per thread
            return self.trace(x)  # type: ignore[no-any-return]


def traced(model: torch.nn.Module, checks: list[torch.Tensor]) -> TracedModel | None:
    """``model`` traced at the shape of ``checks`` (batches of one shape), or None where tracing fails
    or the trace's outputs on any of them differ from ``model``'s in a bit (a branch on values, a
    constant the trace kept): then the caller runs ``model`` itself."""
    shape = tuple(checks[0].shape)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values; the check below decides
            trace = torch.jit.trace(model, checks[0], check_trace=False)
    except Exception:  # noqa: BLE001 - any model tracing cannot handle is scored eagerly
        return None
    candidate = TracedModel(model, trace, shape)
    with torch.inference_mode():
        same = all(torch.equal(candidate(batch), model(batch)) for batch in checks)
    return candidate if same else None


def scoring_model(
    model: torch.nn.Module, images: np.ndarray, batch_size: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    """What scores ``images`` in batches of ``batch_size``: ``traced`` checked on the first batches,
    where there are ``TRACE_MIN_BATCHES`` or more, else ``model``; and whether the answer holds for
    any later call at that batch (it does unless the images were too few to decide)."""
    if len(images) < TRACE_MIN_BATCHES * batch_size:
        return model, False
    checks = [torch.from_numpy(images[i * batch_size : (i + 1) * batch_size]) for i in range(TRACE_CHECK_BATCHES)]
    return traced(model, checks) or model, True
