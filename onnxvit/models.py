"""timm model creation and checkpoint loading, with errors a user can act on."""

from __future__ import annotations

import onnxvit._compat  # noqa: F401  (must precede timm, hence the split)

# isort: split

import difflib
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from onnxvit.config import ModelConfig
from onnxvit.errors import UserError

RANDOM_INIT_SEED = 0
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint saved plain or as {"model": ...} / {"state_dict": ...}."""
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return unwrap_state_dict(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state_dict (names to tensors), or one under 'model' or 'state_dict'")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: torch.nn.Module, path: Path, config_field: str = "model.checkpoint") -> None:
    """Load strictly; name missing / unexpected / mis-shaped keys when it does not fit."""
    if not path.is_file():
        raise UserError(f"{config_field}: checkpoint file {path} not found")
    try:
        state = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
        raise UserError(f"{path}: not a loadable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state, strict=True)
        return

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if mismatched:
        problems.append(
            "shape mismatch: " + few([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched])
        )
    hint = "check model.name"
    head = getattr(model, "num_classes", None)
    head_key = next(
        (k for k in mismatched if k.endswith("weight") and state[k].ndim == 2 and expected[k].shape[0] == head), None
    )
    if head_key is not None:
        hint = (
            f"num_classes differs: the checkpoint has {state[head_key].shape[0]}, the model {head}; "
            "set model.num_classes"
        )
    raise UserError(f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}; {hint}")


def create_model(config: ModelConfig) -> torch.nn.Module:
    """The timm model in eval mode, with the weights the config names."""
    if not timm.is_model(config.name):
        close = difflib.get_close_matches(config.name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise UserError(f"model.name: unknown timm model '{config.name}'; {hint}")
    kwargs = dict(config.kwargs)
    if config.num_classes is not None:
        kwargs["num_classes"] = config.num_classes
    try:
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)  # random weights are part of the config: the same in every run
            model = timm.create_model(config.name, pretrained=config.pretrained, **kwargs)
    except TypeError as exc:
        raise UserError(f"model.kwargs: {config.name} does not accept these arguments ({exc})") from None
    except Exception as exc:
        if config.pretrained:
            raise UserError(
                f"model.pretrained: could not fetch pretrained weights for {config.name} "
                f"({type(exc).__name__}); offline, download them elsewhere and set model.checkpoint to the file"
            ) from None
        raise
    if config.checkpoint is not None:
        load_checkpoint(model, config.checkpoint)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: np.ndarray, batch_size: int = 8) -> int:
    """Replace every BatchNorm's running statistics by their average over ``images``; return how many.

    Random weights with BatchNorm's initial statistics (mean 0, variance 1) give activations of
    arbitrary scale; re-estimated, they have the ranges a trained hybrid has, which is what the
    quantization of conv + attention hybrids is judged on.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            model(torch.from_numpy(images[start : start + batch_size]))
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
            m.eval()
    return len(norms)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
