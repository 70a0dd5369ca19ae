"""PyTorch eager's float32 linear layers on oneDNN, for scoring the PyTorch variant.

PyTorch runs an ``nn.Linear`` through MKL's GEMM, and MKL chooses its code path by CPU vendor: on
AMD CPUs it takes a path that leaves AVX-512 unused (``MKL_VERBOSE`` names a generic "Intel(R)
Architecture processors" path there, where an Intel CPU's names its vector extensions). The oneDNN
library PyTorch also ships chooses its kernels by instruction set alone. Where the BLAS is
MKL (the x86 builds), scoring runs the same float32 products through oneDNN: the logits differ in
their last bits, as another thread count makes them, and a PyTorch variant's latency stays that of
the model as a user runs it.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, TypeGuard

import torch

# what the scoring caches record of how a PyTorch variant's logits were computed
LINEAR_KERNEL = "onednn-1"


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
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


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
