"""The output error of a dynamic int8 linear layer under many weight candidates, computed from the
layer's float inputs once instead of running a quantized copy per candidate.

ONNX Runtime's dynamic kernels quantize a layer's input once per call (one uint8 scale and zero
point for the call's whole tensor, as ``DynamicQuantizeLinear`` does), multiply the integers
exactly where the kernel does not saturate, and scale the sums. A candidate's output is then the
dequantized input times the dequantized weight, ``Aq Wq``, and its error against the float layer,
``E = Aq Wq - A W = Aq D + Δ W`` with ``D = Wq - W`` and ``Δ = Aq - A``, has the energy

    ||E||² = <D, G D> + 2 <D, Aq'Δ W> + ||Δ W||²,   G = Aq'Aq,

whose input products (K x K and K x N) are shared by every candidate; a candidate costs one K x K
by K x N product instead of a pass over every input row. The kernels differ from this only by
their float32 scaling of the integer sums, and the products here are summed in float32: both far
below the 0.001 dB a search reads.
"""

from __future__ import annotations

import numpy as np


def dynamic_dequantized(values: np.ndarray) -> np.ndarray:
    """``values`` quantized as ONNX Runtime's ``DynamicQuantizeLinear`` does (uint8, one scale and
    zero point for the tensor, its range widened to hold zero, float32 arithmetic, ties to even)
    and mapped back, in float64."""
    values = np.asarray(values, np.float32)
    low = min(np.float32(values.min()), np.float32(0))
    high = max(np.float32(values.max()), np.float32(0))
    scale = np.float32(1) if high == low else np.float32(high - low) / np.float32(255)
    zero_point = np.round(np.clip(np.float32(0) - low / scale, np.float32(0), np.float32(255)))
    integers = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return (integers.astype(np.float64) - np.float64(zero_point)) * np.float64(scale)


class DynamicLinearError:
    """Output SQNR of one dynamic int8 ``MatMul`` (``inputs @ weight``) for any dequantized weight.

    ``inputs`` are the layer's float inputs, one array per call (a dynamic kernel's input range is
    the call's); the error is summed over every call, like the SQNR of their concatenated outputs.
    """

    def __init__(self, inputs: list[np.ndarray], weight: np.ndarray) -> None:
        k, n = weight.shape
        # the products over every input row run in float32 (their rounding is far below what a
        # search reads); what they give is K x K or K x N, kept and combined in float64
        floats = np.concatenate([np.asarray(x, np.float32).reshape(-1, k) for x in inputs])
        dequantized = np.concatenate([dynamic_dequantized(x).astype(np.float32).reshape(-1, k) for x in inputs])
        delta = dequantized - floats
        self.weight = np.asarray(weight, np.float64)
        if k < 2 * n:  # one Gram matrix of [Aq | Δ] is cheaper than products with the weight
            stacked = np.concatenate([dequantized, delta], axis=1)
            gram = _wide(stacked.T @ stacked)
            self.gram, cross, delta_gram = gram[:k, :k], gram[:k, k:], gram[k:, k:]
            self.cross = cross @ self.weight
            self.base = _inner(self.weight, delta_gram @ self.weight)
            signal_gram = self.gram - cross - cross.T + delta_gram  # A'A, with A = Aq - Δ
            self.signal = _inner(self.weight, signal_gram @ self.weight)
        else:
            single = np.asarray(weight, np.float32)
            self.gram = _wide(dequantized.T @ dequantized)
            residual = delta @ single
            self.cross = _wide(dequantized.T @ residual)
            self.base = _inner(_wide(residual), _wide(residual))
            output = _wide(floats @ single)
            self.signal = _inner(output, output)
        self._gram_single = self.gram.astype(np.float32)

    def sqnr_db(self, dequantized_weight: np.ndarray) -> float:
        """The layer's output SQNR (dB) against float with ``dequantized_weight`` in place of its weight."""
        change = np.asarray(dequantized_weight, np.float64) - self.weight
        spread = _wide(self._gram_single @ change.astype(np.float32))  # G D, the K x K by K x N product
        noise = _inner(change, spread) + 2.0 * _inner(change, self.cross) + self.base
        if noise <= 0.0:
            return float("inf")
        return float(10.0 * np.log10(max(self.signal, 1e-30) / noise))


def _wide(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float64)


def _inner(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", a, b))
