"""One layer of a float model in static int8, as ONNX Runtime's quantizer writes that layer alone,
without a whole-model calibration per layer: what ranking the layers for an accuracy budget needs.

``quantize_static`` on the whole model with ``nodes_to_quantize=[layer]`` runs the calibration over
the whole model each time. Here the layer is cut out, quantized by the same quantizer on the float
values the calibration batches give its input (captured for many layers in one pass), and its nodes
put back in the layer's place. Its activation range comes from the same values, so the model equals
the whole-model quantizer's up to the float rounding of those captured values. Models that ship,
and every model an accuracy budget keeps or rejects, still come from the whole-model quantizer.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import onnx.utils

from passes.graph import copy_model, value_typed
from passes.ort_quant import FloatValues

# (a piece of the model, its one layer, the piece's calibration feeds) -> the piece in static int8
QuantizeOneLayer = Callable[[onnx.ModelProto, list[str], list[dict[str, np.ndarray]]], onnx.ModelProto]


class StaticLayerSplicer:
    """Builds ``model`` with one of ``layers`` in static int8 (``build([layer])``). The layers' inputs
    are captured in order, as many at once as ``values``' memory budget holds: a ranking that builds
    the layers in graph order captures each group once."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[str],
        quantize: QuantizeOneLayer,
        values: FloatValues,
        whole: Callable[[list[str]], onnx.ModelProto],
    ) -> None:
        """``whole(layers)``: the whole-model quantizer, for a layer that reads more than its input and
        its constants (nothing to cut out alone)."""
        self.model, self.quantize, self.values, self.whole = model, quantize, values, whole
        self.index = {node.name: index for index, node in enumerate(model.graph.node)}
        self.layers = [layer for layer in layers if layer in self.index]
        self.extractor = onnx.utils.Extractor(value_typed(model))
        self._captured: dict[str, list[dict[str, np.ndarray]]] = {}

    def build(self, layers: list[str]) -> onnx.ModelProto:
        (layer,) = layers  # one layer at a time: what the ranking asks
        node = self.model.graph.node[self.index[layer]]
        try:
            piece = self.extractor.extract_model([node.input[0]], [node.output[0]])
        except ValueError:  # a tensor onnx cannot type
            return self.whole(layers)
        if [i.name for i in piece.graph.input] != [node.input[0]] or len(piece.graph.node) != 1:
            return self.whole(layers)
        quantized = self.quantize(piece, [layer], self._feeds(layer))
        return splice(self.model, self.index[layer], quantized)

    def _feeds(self, layer: str) -> list[dict[str, np.ndarray]]:
        if layer not in self._captured:
            rest = self.layers[self.layers.index(layer) :] if layer in self.layers else [layer]
            inputs = {name: self.model.graph.node[self.index[name]].input[0] for name in rest}
            group = [rest[i] for i in self.values.chunks([[inputs[name]] for name in rest])[0]]  # what fits
            captured = self.values(sorted({inputs[name] for name in group}))
            self._captured = {name: [{inputs[name]: batch[inputs[name]]} for batch in captured] for name in group}
        return self._captured[layer]


def tensor_subset(overrides: dict[str, Any], piece: onnx.ModelProto) -> dict[str, Any]:
    """The entries of ``overrides`` (by tensor name) for the tensors ``piece`` holds: ONNX Runtime's
    quantizer refuses overrides of tensors its model lacks."""
    names = {init.name for init in piece.graph.initializer}
    return {name: entry for name, entry in overrides.items() if name in names}


def splice(model: onnx.ModelProto, position: int, piece: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its node at ``position`` replaced by ``piece``'s nodes and initializers (a piece
    cut from that node and rewritten: it reads the node's inputs and writes its outputs)."""
    result = copy_model(model)
    replaced = set(result.graph.node[position].input)
    del result.graph.node[position]
    for offset, node in enumerate(piece.graph.node):
        result.graph.node.insert(position + offset, node)
    # what the piece computes from a float initializer (a bias it dequantizes) takes the float's name;
    # the float weight only the replaced node read goes
    produced = {out for node in piece.graph.node for out in node.output}
    read = {name for node in result.graph.node for name in node.input}
    kept = [
        init
        for init in result.graph.initializer
        if init.name not in produced and (init.name in read or init.name not in replaced)
    ]
    names = {init.name for init in kept}
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept + [init for init in piece.graph.initializer if init.name not in names])
    return result
