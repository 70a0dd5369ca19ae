"""onnxsim constant-folds shape arithmetic that the TorchScript exporter leaves behind (the DeiT
export halves in node count), which later passes and ONNX Runtime's fusions need to match
patterns. onnxsim sometimes fails or miscompiles; the graph it returns is kept only when its
logits on the calibration images match the input graph's."""

from __future__ import annotations

import onnx
from pydantic import Field

from passes import register_pass
from passes.base import Pass, PassConfig, PassContext
from passes.metrics import rewrite_change, rounding_limit


class SimplifyConfig(PassConfig):
    atol: float = Field(1e-4, gt=0, description="Largest absolute logit difference accepted.")
    rtol: float = Field(1e-4, ge=0, description="Plus this fraction of the largest reference logit.")


@register_pass
class SimplifyPass(Pass):
    name = "simplify"
    Config = SimplifyConfig
    config: SimplifyConfig
    requires = frozenset({"calibration"})

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        import onnxsim

        try:
            simplified, ok = onnxsim.simplify(model, check_n=0)
        except Exception as exc:  # onnxsim raises many types; any failure means "keep the input"
            return self._fall_back(model, ctx, f"onnxsim failed: {type(exc).__name__}: {exc}")
        if not ok:
            return self._fall_back(model, ctx, "onnxsim reported its result invalid")
        if ctx.calibration:
            reference, test = ctx.check_logits(model), ctx.check_logits(simplified)
            diff = rewrite_change(model, reference, test)
            limit = rounding_limit(reference, self.config.atol, self.config.rtol)
            if not diff <= limit:
                return self._fall_back(model, ctx, f"simplified logits differ by {diff:.3g} > {limit:.3g}")
        ctx.notes["simplified"] = True
        ctx.notes["nodes_before"] = len(model.graph.node)
        ctx.notes["nodes_after"] = len(simplified.graph.node)
        return simplified

    @staticmethod
    def _fall_back(model: onnx.ModelProto, ctx: PassContext, reason: str) -> onnx.ModelProto:
        ctx.log(f"simplify: keeping the unsimplified graph ({reason})")
        ctx.notes["simplified"] = False
        ctx.notes["fallback_reason"] = reason
        return model
