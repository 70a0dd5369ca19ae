"""PyTorch to ONNX, with a dynamic batch axis, checked against PyTorch's own logits.

The TorchScript exporter is the default: on timm ViTs it takes under a second and gives standard
ops; the dynamo exporter is much slower and is kept as an option.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from onnxvit.config import ExportConfig
from onnxvit.errors import UserError
from onnxvit.tokens import TokenMergedViT, choice_tensors, forcing
from passes.graph import copy_model
from passes.metrics import max_abs_diff, rounding_limit
from passes.runtime import make_session, model_logits

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def torch_logits(model: torch.nn.Module, batches: list[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(b)).float().numpy() for b in batches])


def export_onnx(model: torch.nn.Module, example: np.ndarray, config: ExportConfig) -> onnx.ModelProto:
    """Export ``model`` for inputs shaped like ``example`` (batch dimension dynamic)."""
    sample = torch.from_numpy(example[:1])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if config.exporter == "torchscript":
                torch.onnx.export(
                    model,
                    (sample,),
                    buffer,
                    opset_version=config.opset,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
                return onnx.load_from_string(buffer.getvalue())
            program = torch.onnx.export(
                model,
                (sample,),
                opset_version=config.opset,
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            return program.model_proto
        except Exception as exc:
            raise UserError(
                f"export: torch.onnx ({config.exporter}) cannot export {type(model).__name__}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}; try export.exporter: "
                f"{'dynamo' if config.exporter == 'torchscript' else 'torchscript'}"
            ) from None


def check_export(
    model: torch.nn.Module,
    proto: onnx.ModelProto,
    batches: list[np.ndarray],
    atol: float,
    threads: int,
    rtol: float = 0.0,
) -> float:
    """Largest logit difference between PyTorch and ONNX Runtime; an error beyond ``atol`` plus
    ``rtol`` times the largest |logit| (float32 rounding grows with the values it rounds).

    A token-merging model is compared given ONNX Runtime's merge choices: a near-tie in the
    matching may go either way in two runtimes, and one flipped merge moves the logits far more
    than any export error would, so free-running logits cannot tell a wrong export from a tie."""
    if isinstance(model, TokenMergedViT):
        reference, actual = forced_logits(model, proto, batches, threads)
    else:
        reference, actual = torch_logits(model, batches), model_logits(proto, batches, threads)
    diff = max_abs_diff(reference, actual)
    limit = rounding_limit(reference, atol, rtol)
    if not diff <= limit:
        raise UserError(
            f"export: ONNX logits differ from PyTorch by {diff:.3g} (> {limit:.3g}: export.atol {atol:g} + "
            f"export.rtol {rtol:g} x the largest logit); try another export.opset or export.exporter"
        )
    return diff


def forced_logits(
    model: TokenMergedViT, proto: onnx.ModelProto, batches: list[np.ndarray], threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's logits made with ONNX Runtime's merge choices, and ONNX Runtime's logits."""
    names = choice_tensors(proto, model)
    probe = copy_model(proto)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = make_session(probe, threads)
    reference, actual = [], []
    for batch in batches:
        logits, *choices = session.run([OUTPUT_NAME, *names], {INPUT_NAME: batch})
        actual.append(logits)
        with forcing(model, choices):
            reference.append(torch_logits(model, [batch]))
    return np.concatenate(reference), np.concatenate(actual)
