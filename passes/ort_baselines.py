"""The two recipes a user gets from ONNX Runtime's documentation, kept as passes so a report can
always show what onnxvit's own int8 gains over them.

- ``ort_default``: ``quant_pre_process``, then ``quantize_static`` with its defaults (QDQ, int8
  activations and weights, per-tensor, min-max, every op it knows), on our calibration images.
- ``ort_dynamic``: ``quantize_dynamic`` with per-channel int8 weights; activation ranges are
  computed at run time, so it needs no calibration.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext, count_ops
from passes.ort_quant import CalibrationReader, run_ort_quantizer


class OrtDefaultConfig(PassConfig):
    preprocess: bool = Field(True, description="Run quant_pre_process first, as the documentation says.")


@register_pass
class OrtDefaultPass(Pass):
    name = "ort_default"
    Config = OrtDefaultConfig
    config: OrtDefaultConfig
    requires = frozenset({"calibration"})

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        ctx.require_calibration("ort_default")

        def quantize(source: Path, output: Path) -> None:
            if self.config.preprocess:
                prepared = source.with_name("prepared.onnx")
                try:
                    quant_pre_process(str(source), str(prepared))
                except Exception as exc:  # its symbolic shape inference gives up on some graphs (EfficientFormerV2)
                    # What a user of the documented recipe then does: skip that step, keep the rest.
                    ctx.notes["preprocess"] = f"symbolic shape inference failed ({str(exc)[:80]}); skipped it"
                    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
                source = prepared
            quantize_static(source, output, CalibrationReader(ctx.calibration_samples()))

        quantized = run_ort_quantizer(model, quantize)
        ctx.notes.update(count_ops(quantized, "QuantizeLinear"))
        return quantized


class OrtDynamicConfig(PassConfig):
    per_channel: bool = Field(True, description="One weight scale per output channel.")
    op_types: list[str] = Field(["MatMul", "Gemm"], min_length=1, description="Op types to quantize.")


@register_pass
class OrtDynamicPass(Pass):
    name = "ort_dynamic"
    Config = OrtDynamicConfig
    config: OrtDynamicConfig

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = run_ort_quantizer(
            model,
            lambda source, output: quantize_dynamic(
                source,
                output,
                per_channel=self.config.per_channel,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=self.config.op_types,
            ),
        )
        ctx.notes.update(count_ops(quantized, "DynamicQuantizeLinear"))
        return quantized
