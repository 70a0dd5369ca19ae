"""Zero-point overflow guard (Q-HyViT's second fix), for the inputs of linear layers.

An asymmetric 8-bit quantizer maps [min, max] onto 0..255 with zero point -min / scale. When a
tensor never crosses zero (all-positive or all-negative: a narrow softmax, a channel-mixing input
after a shifted norm), that zero point falls outside 0..255: Q-HyViT's overflow. ONNX Runtime's
calibrators avoid it by stretching the range to include zero, which wastes the codes between zero
and the nearest value (most of them for a narrow softmax range far from zero).

This pass finds those tensors on the calibration images and removes the offset exactly: a tensor
``A`` read only as the first input of MatMul / Gemm becomes ``A - c`` (c its nearest bound), and each
reader adds back ``c * colsum(B)`` (a constant when B is a weight, a ReduceSum when B is computed,
as for softmax @ V). FP32 logits are unchanged; the quantizer then sees a range that starts at
zero. Other tensors are listed with the reason they were kept, per tensor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.graph import GraphIndex, attribute, copy_model, rebuild
from passes.ort_quant import channel_ranges

QMAX = 255  # uint8, the activation type ONNX Runtime's static quantizer defaults to


class ZeroPointGuardConfig(PassConfig):
    min_lost: float = Field(0.25, gt=0, lt=1, description="Act when at least this share of the 8-bit codes is wasted.")
    calibration_images: int | None = Field(None, gt=0, description="Use at most this many calibration images.")


@register_pass
class ZeroPointGuardPass(Pass):
    name = "zero_point_guard"
    Config = ZeroPointGuardConfig
    config: ZeroPointGuardConfig
    requires = frozenset({"calibration"})

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        ctx.require_calibration("zero_point_guard")
        out = copy_model(model)
        index = GraphIndex(out)
        linear_inputs = sorted(
            {
                n.input[0]
                for n in out.graph.node
                if n.op_type in ("MatMul", "Gemm", "Conv") and index.constant(n.input[0]) is None
            }
        )
        calibration = ctx.calibration_batches(self.config.calibration_images)
        per_channel = channel_ranges(out, linear_inputs, dataclasses.replace(ctx, calibration=calibration))
        ranges = {name: (float(low.min()), float(high.max())) for name, (low, high) in per_channel.items()}
        initializers: list[onnx.TensorProto] = []
        shifted_readers: list[tuple[onnx.NodeProto, str, float]] = []
        subs: dict[int, list[onnx.NodeProto]] = {}  # Sub nodes to put after a tensor's producer
        nodes = {id(n): n for n in out.graph.node}
        report: dict[str, dict] = {}
        for name in linear_inputs:
            low, high = ranges[name]
            if low <= 0 <= high:
                continue
            near, far = (low, high) if low > 0 else (high, low)
            lost = abs(near) / abs(far)
            scale = (high - low) / QMAX
            entry = {
                "range": [round(low, 6), round(high, 6)],
                "lost": round(lost, 4),
                "zero_point_without_zero": int(round(-low / scale)) if scale > 0 else None,
            }
            report[name] = entry
            if lost < self.config.min_lost:
                entry["fix"] = f"kept: wastes under {self.config.min_lost:.0%} of the codes"
                continue
            readers = index.consumers.get(name, [])
            why = self._why_not(name, readers, index)
            if why:
                entry["fix"] = f"kept: {why}"
                continue
            shift = f"{name}/zp_guard"
            initializers.append(numpy_helper.from_array(np.array(near, np.float32), f"{shift}/c"))
            producer = index.producer[name]
            subs.setdefault(id(producer), []).append(
                helper.make_node("Sub", [name, f"{shift}/c"], [shift], name=f"{shift}/Sub")
            )
            for reader in readers:
                shifted_readers.append((reader, shift, near))
            entry["fix"] = f"shift by {near:.6g}"
        restored = {
            id(reader): self._restore(reader, shift, near, index, initializers)
            for reader, shift, near in shifted_readers
        }
        replacements = {key: restored.get(key, [nodes[key]]) + subs.get(key, []) for key in {*restored, *subs}}
        if replacements:
            rebuild(out, replacements, set(), initializers)
        ctx.notes.update(tensors=report, shifted=sum(e["fix"].startswith("shift") for e in report.values()))
        return out

    def _why_not(self, name: str, readers: list[onnx.NodeProto], index: GraphIndex) -> str | None:
        if name in index.graph_outputs or index.producer.get(name) is None:
            return "a graph input or output"
        for reader in readers:
            if reader.op_type not in ("MatMul", "Gemm") or reader.input[0] != name or name in reader.input[1:]:
                return (
                    f"read by {reader.op_type} {reader.name}".strip()
                    + " (only a MatMul / Gemm's first input can take the shift back)"
                )
            if reader.op_type == "Gemm" and (
                attribute(reader, "transA", 0)
                or index.constant(reader.input[1]) is None
                or attribute(reader, "alpha", 1.0) != 1.0
            ):
                return "read by a Gemm that is not x @ constant"
        return None

    def _restore(
        self, reader: onnx.NodeProto, shift: str, near: float, index: GraphIndex, initializers: list[onnx.TensorProto]
    ) -> list[onnx.NodeProto]:
        """``reader`` on the shifted input, plus ``near * colsum(B)`` added back to its output."""
        prefix = f"{reader.name or reader.output[0]}/zp_guard"
        inputs = [shift, *reader.input[1:]]
        shifted = helper.make_node(reader.op_type, inputs, [f"{prefix}/out"], name=reader.name)
        shifted.attribute.extend(reader.attribute)
        weight = index.constant(reader.input[1])
        if weight is not None:
            if reader.op_type == "Gemm":
                weight = weight.T if attribute(reader, "transB", 0) else weight
                correction = near * weight.sum(axis=0) * attribute(reader, "alpha", 1.0)
            else:
                correction = near * weight.sum(axis=-2, keepdims=weight.ndim > 2)
            initializers.append(numpy_helper.from_array(correction.astype(np.float32), f"{prefix}/correction"))
            return [
                shifted,
                helper.make_node(
                    "Add", [f"{prefix}/out", f"{prefix}/correction"], list(reader.output), name=f"{prefix}/Add"
                ),
            ]
        # computed B (softmax @ V): near * sum over the contraction axis, at run time
        initializers.append(numpy_helper.from_array(np.array([-2], np.int64), f"{prefix}/axes"))
        return [
            shifted,
            helper.make_node(
                "ReduceSum",
                [reader.input[1], f"{prefix}/axes"],
                [f"{prefix}/colsum"],
                keepdims=1,
                name=f"{prefix}/ReduceSum",
            ),
            helper.make_node("Mul", [f"{prefix}/colsum", f"{shift}/c"], [f"{prefix}/correction"], name=f"{prefix}/Mul"),
            helper.make_node(
                "Add", [f"{prefix}/out", f"{prefix}/correction"], list(reader.output), name=f"{prefix}/Add"
            ),
        ]
