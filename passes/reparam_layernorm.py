"""RepQ-ViT-style reparameterization of post-LayerNorm activations, as an exact FP32 rewrite.

A ViT's LayerNorm outputs have a few channels whose range is tens of times the rest; one int8
scale per tensor then spends almost all its levels on them. For every LayerNorm read only by
linear layers (qkv and fc1), this pass measures each channel's range on the calibration images and
rewrites ``y = LN(x) @ W + b`` as ``y = ((LN(x) - z) / s) @ (s * W) + (b + z @ W)``: the shift ``z``
and scale ``s`` fold into LayerNorm's gamma / beta and the next weights and bias, so no op is
added and FP32 outputs are unchanged (the pass checks they are). ``alpha`` sets how much of the
range moves into the weights (1: all channel ranges become equal, as RepQ-ViT; 0.5: balanced, as
SmoothQuant); the weights stay per-channel quantized, so they take it well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import GraphIndex, attribute, copy_model, prune_initializers
from passes.ort_quant import channel_ranges


class ReparamLayerNormConfig(PassConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="Share of each channel's range moved into the weights.")
    shift: bool = Field(True, description="Also center each channel (fold its midpoint into the next bias).")
    max_scale: float = Field(100.0, gt=1, description="Largest per-channel scale ratio allowed (guards tiny ranges).")
    atol: float = Field(1e-3, gt=0, description="Largest logit change accepted, relative to the logits' range.")


@dataclass
class Site:
    """A LayerNorm and the linear layers that read its output (MatMul, optional bias Add)."""

    norm: onnx.NodeProto
    matmuls: list[onnx.NodeProto]
    adds: list[onnx.NodeProto | None]


def find_sites(model: onnx.ModelProto) -> list[Site]:
    index = GraphIndex(model)
    sites = []
    for norm in model.graph.node:
        if norm.op_type != "LayerNormalization" or len(norm.input) < 3 or attribute(norm, "axis", -1) != -1:
            continue
        if not (index.is_constant(norm.input[1]) and index.is_constant(norm.input[2])):
            continue
        out = norm.output[0]
        readers = index.consumers.get(out, [])
        if (
            not readers
            or out in index.graph_outputs
            or any(
                r.op_type != "MatMul" or r.input[0] != out or out == r.input[1] or not index.is_constant(r.input[1])
                for r in readers
            )
        ):
            continue
        adds = []
        for matmul in readers:
            add = index.sole_consumer(matmul.output[0], "Add")
            adds.append(add if add is not None and index.is_constant(add.input[1]) else None)
        sites.append(Site(norm, readers, adds))
    return sites


def channel_scales(
    low: np.ndarray, high: np.ndarray, weights: list[np.ndarray], config: ReparamLayerNormConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The shift ``z`` and scale ``s`` for one LayerNorm's output channels."""
    shift = (high + low) / 2 if config.shift else np.zeros_like(low)
    half_range = np.maximum((high - low) / 2 if config.shift else np.maximum(-low, high), 1e-6)
    weight_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-6)
    scale = half_range**config.alpha / weight_max ** (1 - config.alpha)
    scale = scale / np.exp(np.mean(np.log(scale)))  # geometric mean 1: the overall range stays put
    bound = np.sqrt(config.max_scale)
    return shift.astype(np.float32), np.clip(scale, 1 / bound, bound).astype(np.float32)


def _store(model: onnx.ModelProto, value: np.ndarray, name: str) -> str:
    """Store ``value`` under a fresh initializer (tensors other nodes share stay untouched); its name."""
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return name


@register_pass
class ReparamLayerNormPass(Pass):
    name = "reparam_layernorm"
    Config = ReparamLayerNormConfig
    config: ReparamLayerNormConfig
    requires = frozenset({"calibration"})

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from passes.metrics import rewrite_change

        ctx.require_calibration("reparam_layernorm")
        cfg = self.config
        result = copy_model(model)
        sites = find_sites(result)
        ranges = channel_ranges(result, [site.norm.output[0] for site in sites], ctx)
        index = GraphIndex(result)
        spreads = []
        for number, site in enumerate(sites):
            low, high = ranges[site.norm.output[0]]
            # sites are found only where every MatMul's weight is a constant
            weights: list[np.ndarray] = [index.constant(m.input[1]) for m in site.matmuls]  # type: ignore[misc]
            shift, scale = channel_scales(low, high, weights, cfg)
            prefix = f"reparam_{number}"
            gamma, beta = index.constant(site.norm.input[1]), index.constant(site.norm.input[2])
            site.norm.input[1] = _store(result, gamma / scale, f"{prefix}/gamma")
            site.norm.input[2] = _store(result, (beta - shift) / scale, f"{prefix}/beta")
            for k, (matmul, add, weight) in enumerate(zip(site.matmuls, site.adds, weights)):
                matmul.input[1] = _store(result, weight * scale[:, None], f"{prefix}/w{k}")
                if add is not None:
                    bias = index.constant(add.input[1]) + shift @ weight
                    add.input[1] = _store(result, bias, f"{prefix}/b{k}")
                elif np.any(shift):
                    add_name = f"{prefix}/b{k}"
                    _store(result, shift @ weight, add_name)
                    out = matmul.output[0]
                    matmul.output[0] = f"{prefix}/mm{k}"
                    position = list(result.graph.node).index(matmul) + 1
                    result.graph.node.insert(
                        position, helper.make_node("Add", [matmul.output[0], add_name], [out], name=f"{prefix}/Add{k}")
                    )
            spreads.append(float((high - low).max() / max(float(np.median(high - low)), 1e-9)))
        prune_initializers(result)
        before, after = ctx.check_logits(model), ctx.check_logits(result)
        tolerance = cfg.atol * float(np.ptp(before))
        change = rewrite_change(model, before, after)
        if not change <= tolerance:
            raise ValueError(
                f"reparam_layernorm changed FP32 logits by {change:.3g} "
                f"(> {tolerance:.3g}); the rewrite is wrong for this graph"
            )
        ctx.notes["layernorms"] = len(sites)
        ctx.notes["max_channel_range_ratio"] = round(max(spreads), 1) if spreads else None
        return result
