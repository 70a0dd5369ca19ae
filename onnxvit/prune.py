"""Structured pruning of timm ViTs with torch-pruning: attention heads, head dims, MLP channels.

torch-pruning's dependency graph finds what else must shrink with a channel; this module decides
what may be cut (only what timm can rebuild), how much (a parameter / MAC target solved for one
common fraction), and leaves timm's attention modules consistent without touching timm's source:
``num_heads`` / ``head_dim`` / ``attn_dim`` are updated, and when head dims shrink the old softmax
scale is folded into the query weights, because SDPA derives its scale from the new head dim.
"""

from __future__ import annotations

import onnxvit._compat  # noqa: F401  (must precede timm, hence the split)

# isort: split

import copy
import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from timm.layers import Attention, Mlp

from onnxvit.config import PRUNE_KINDS, PruneConfig
from onnxvit.errors import UserError
from onnxvit.pruned_checkpoint import load_pruned, serialize_pruned, widths  # noqa: F401  (re-exported)
from onnxvit.tokens import TokenMergedViT


class HessianImportance(tp.importance.GroupHessianImportance):
    """Diagonal-Hessian (OBD) importance that really averages over samples.

    torch-pruning 1.6.1's ``accumulate_grad`` tests ``name not in`` a dict keyed by parameter, so the
    test is always true and every sample overwrites the previous one: only the last sample counts.
    """

    def accumulate_grad(self, model: torch.nn.Module) -> None:
        for param in model.parameters():
            if param.grad is None:
                continue
            squared = param.grad.detach().pow(2)
            if param in self._accu_grad:
                self._accu_grad[param] += squared
                self._counter[param] += 1
            else:
                self._accu_grad[param] = squared.clone()
                self._counter[param] = 1


def make_importance(method: str) -> tp.importance.Importance:
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,
        "hessian": HessianImportance,
        "random": tp.importance.RandomImportance,
    }[method]()


@dataclass
class Prunable:
    """The modules of one model that each pruning kind may cut."""

    attentions: list[Attention]
    mlps: list[Mlp]
    ignored: list[torch.nn.Module]
    names: dict[torch.nn.Module, str] = field(default_factory=dict)

    @classmethod
    def find(cls, model: torch.nn.Module, ignore: Iterable[str]) -> Prunable:
        modules = dict(model.named_modules())
        ignored = []
        for name in ignore:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=1)
                hint = f"did you mean '{close[0]}'?" if close else "names are model.named_modules() paths"
                raise UserError(f"prune.ignore: {type(model).__name__} has no module '{name}'; {hint}")
            ignored.append(modules[name])
        skipped = {m for top in ignored for m in top.modules()}
        # Exactly timm's classes: subclasses (window or relative-position attention) carry
        # per-head tables that torch-pruning does not cut.
        attentions = [m for m in model.modules() if type(m) is Attention and m not in skipped]
        mlps = [
            m for m in model.modules() if type(m) is Mlp and isinstance(m.fc1, torch.nn.Linear) and m not in skipped
        ]
        return cls(attentions, mlps, ignored, {m: n for n, m in modules.items()})

    def check(self, ratios: dict[str, float], model_name: str) -> None:
        wanted = {kind for kind, r in ratios.items() if r > 0}
        if "mlp" in wanted and not self.mlps:
            raise UserError(f"prune.mlp: {model_name} has no timm Mlp blocks to prune; use heads or head_dims")
        if wanted & {"heads", "head_dims"} and not self.attentions:
            raise UserError(
                f"prune.heads: {model_name} has no plain timm Attention modules "
                "(window / relative-position attention is not pruned); use mlp"
            )
        for attn in self.attentions:
            if ratios.get("heads", 0) > 0 and heads_removed(ratios["heads"], attn.num_heads) >= attn.num_heads:
                raise UserError(
                    f"prune.heads: {ratios['heads']:g} would remove every one of the {attn.num_heads} heads "
                    f"of {self.names[attn]}; use at most {(attn.num_heads - 1) / attn.num_heads:.3f}"
                )
            if ratios.get("head_dims", 0) > 0 and not isinstance(attn.q_norm, torch.nn.Identity):
                raise UserError(
                    f"prune.head_dims: {self.names[attn]} normalizes q / k per head dim (qk_norm); prune heads instead"
                )


def heads_removed(ratio: float, heads: int) -> int:
    """Heads a ratio removes: to the nearest head (torch-pruning rounds up, so 0.34 of 3 would be 2)."""
    return int(ratio * heads + 0.5)


def check_prune_config(model: torch.nn.Module, config: PruneConfig, model_name: str) -> None:
    """The config errors that need only the model's structure, found before anything runs."""
    prunable = Prunable.find(model, config.ignore)
    prunable.check(kind_ratios(config, 1e-3) if config.ratio is not None else kind_ratios(config), model_name)


def build_pruner(
    model: torch.nn.Module,
    example: torch.Tensor,
    importance: tp.importance.Importance,
    ratios: dict[str, float],
    config: PruneConfig,
    prunable: Prunable,
) -> tp.pruner.MetaPruner:
    """A MetaPruner that cuts only the kinds in ``ratios``; every other group gets ratio 0."""
    # A tuple key is one ranking scope: global pruning ranks all layers of a kind together.
    per_layer: dict[Any, float] = {}

    def scope(layers: list[torch.nn.Module], ratio: float) -> None:
        if config.global_pruning:
            per_layer[tuple(layers)] = ratio
        else:
            per_layer.update({layer: ratio for layer in layers})

    if ratios.get("mlp", 0) > 0:
        scope([m.fc1 for m in prunable.mlps], ratios["mlp"])
    heads, head_dims = ratios.get("heads", 0), ratios.get("head_dims", 0)
    # Just under n / H, so that torch-pruning's ceil (local) and floor (global) both give n heads.
    total_heads = sum(a.num_heads for a in prunable.attentions)
    head_ratio = max(0.0, heads_removed(heads, total_heads) / max(total_heads, 1) - 1e-6)
    per_head_layer = {
        a.qkv: max(0.0, heads_removed(heads, a.num_heads) / a.num_heads - 1e-6) for a in prunable.attentions
    }
    if heads > 0 or head_dims > 0:
        # torch-pruning cuts heads only inside an attention group whose own ratio is > 0; with
        # prune_head_dims off that ratio cuts nothing else.
        scope([a.qkv for a in prunable.attentions], head_dims if head_dims > 0 else heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cls_token / pos_embed "unwrapped parameters": the residual width is never cut
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            pruning_ratio=0.0,
            pruning_ratio_dict=per_layer,
            global_pruning=config.global_pruning,
            ignored_layers=prunable.ignored,
            round_to=config.round_to,
            num_heads={a.qkv: a.num_heads for a in prunable.attentions},
            prune_num_heads=heads > 0,
            prune_head_dims=head_dims > 0,
            head_pruning_ratio=head_ratio,
            head_pruning_ratio_dict=None if config.global_pruning else per_head_layer,
        )


@torch.no_grad()
def sync_attention(pruner: tp.pruner.MetaPruner, prunable: Prunable) -> None:
    """Make timm's Attention agree with its pruned qkv / proj, keeping its softmax scale."""
    for attn in prunable.attentions:
        heads = pruner.num_heads[attn.qkv]
        head_dim = attn.qkv.out_features // (3 * heads)
        if head_dim != attn.head_dim:
            factor = math.sqrt(head_dim / attn.head_dim)  # q·k / sqrt(old) == (factor q)·k / sqrt(new)
            attn.qkv.weight[: heads * head_dim] *= factor
            if attn.qkv.bias is not None:
                attn.qkv.bias[: heads * head_dim] *= factor
        attn.num_heads, attn.head_dim, attn.attn_dim = heads, head_dim, heads * head_dim
        attn.scale = head_dim**-0.5


def count_params_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Parameters and MACs at batch 1 (the attention cores of a token-merging model added)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    if isinstance(model, TokenMergedViT):
        macs += model.attention_macs()
    return {"params": int(params), "macs": int(macs)}


def kind_ratios(config: PruneConfig, fraction: float | None = None) -> dict[str, float]:
    if config.ratio is None:
        return {kind: getattr(config, kind) or 0.0 for kind in PRUNE_KINDS}
    return {kind: (fraction if kind in config.ratio_kinds else 0.0) for kind in PRUNE_KINDS}


def _apply(
    model: torch.nn.Module,
    example: torch.Tensor,
    config: PruneConfig,
    ratios: dict[str, float],
    importance: tp.importance.Importance,
) -> torch.nn.Module:
    prunable = Prunable.find(model, config.ignore)
    pruner = build_pruner(model, example, importance, ratios, config, prunable)
    pruner.step()
    sync_attention(pruner, prunable)
    return model


def solve_fraction(model: torch.nn.Module, config: PruneConfig, input_shape: tuple[int, ...]) -> tuple[float, float]:
    """The common fraction of ``ratio_kinds`` that removes ``ratio`` of the params / MACs.

    Counts depend on widths only, not on which channels go, so the search prunes copies with random
    importance (cheap; with global_pruning the split across layers, so the count, is approximate);
    a bisection over 12 steps is finer than round_to's granularity.
    """
    example = torch.zeros(1, *input_shape)
    dense = count_params_macs(model, input_shape)[config.target]
    highest = _max_fraction(model, config)

    def removed(fraction: float) -> float:
        pruned = _apply(
            copy.deepcopy(model), example, config, kind_ratios(config, fraction), tp.importance.RandomImportance()
        )
        return 1 - count_params_macs(pruned, input_shape)[config.target] / dense

    low, high = 0.0, highest
    best = (high, removed(high))
    if best[1] < config.ratio:
        raise UserError(
            f"prune.ratio: {config.ratio:g} of the {config.target} is more than pruning "
            f"{', '.join(config.ratio_kinds)} can remove ({best[1]:.3f} at most); lower it or add ratio_kinds"
        )
    for _ in range(12):
        middle = (low + high) / 2
        got = removed(middle)
        if abs(got - config.ratio) < abs(best[1] - config.ratio):
            best = (middle, got)
        low, high = (middle, high) if got < config.ratio else (low, middle)
    return best


def _max_fraction(model: torch.nn.Module, config: PruneConfig) -> float:
    """The largest common fraction that leaves at least one head and ``round_to`` channels everywhere."""
    limit = 0.95
    for attn in Prunable.find(model, config.ignore).attentions:
        if "heads" in config.ratio_kinds:
            limit = min(limit, (attn.num_heads - 1) / attn.num_heads - 1e-6)
    return limit


class _Captured(Exception):
    """Raised by a hook once it has its layer's input: the rest of the forward pass is not needed."""


def _layer_inputs(model: torch.nn.Module, layer: torch.nn.Linear, batch: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(module, inputs):
        seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def reconstruct_linears(
    dense: torch.nn.Module, pruned: torch.nn.Module, images: np.ndarray, ridge: float, batch_size: int = 8
) -> list[str]:
    """Refit each Linear whose inputs were cut (MLP fc2, attention proj), in forward order.

    Least squares from the inputs it still has, in the pruned model as refitted so far, to the dense
    layer's output, pulled toward its kept weights by ``ridge`` (relative to the mean diagonal of
    the Gram matrix) so that a few calibration images cannot overfit it.
    """
    dense_modules = dict(dense.named_modules())
    refit = [
        (name, layer)
        for name, layer in pruned.named_modules()
        if isinstance(layer, torch.nn.Linear) and layer.in_features != dense_modules[name].in_features
    ]
    chunks = [torch.from_numpy(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    for name, layer in refit:
        width = layer.in_features + (layer.bias is not None)
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, layer.out_features, dtype=torch.float64)
        reference = dense_modules[name]
        for batch in chunks:
            x_dense = _layer_inputs(dense, reference, batch)
            target = reference(x_dense).double()
            x = _layer_inputs(pruned, layer, batch).double()
            if layer.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            gram += x.T @ x
            cross += x.T @ target
        prior = layer.weight.T.double()
        if layer.bias is not None:
            prior = torch.cat([prior, layer.bias[None].double()], 0)
        strength = ridge * gram.diagonal().mean()
        theta = torch.linalg.solve(gram + strength * torch.eye(width, dtype=gram.dtype), cross + strength * prior)
        layer.weight.copy_(theta[: layer.in_features].T.float())
        if layer.bias is not None:
            layer.bias.copy_(theta[-1].float())
    return [name for name, _ in refit]


def gradient_targets(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    if labels is not None:
        return labels
    with torch.inference_mode():
        return model(torch.from_numpy(images)).argmax(1).numpy()


def accumulate_gradients(
    model: torch.nn.Module,
    importance: tp.importance.Importance,
    images: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    advance: Callable[[int], None],
) -> None:
    """Fill ``param.grad`` (Taylor) or the Hessian accumulator from cross-entropy on the given images."""
    model.zero_grad()
    hessian = isinstance(importance, HessianImportance)
    if hessian:
        importance.zero_grad()
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        y = torch.from_numpy(np.asarray(targets[start : start + batch_size], dtype=np.int64))
        logits = model(x)
        if hessian:
            losses = F.cross_entropy(logits, y, reduction="none")
            for i, loss in enumerate(losses):
                model.zero_grad()
                loss.backward(retain_graph=i < len(losses) - 1)
                importance.accumulate_grad(model)
        else:
            F.cross_entropy(logits, y, reduction="sum").backward()
        advance(len(x))


def prune_model(
    model: torch.nn.Module,
    config: PruneConfig,
    images: np.ndarray,
    labels: np.ndarray | None,
    model_name: str,
    advance: Callable[[int], None] = lambda n: None,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` and a summary of what was cut; ``model`` itself is untouched.

    ``images`` (calibration split) feed gradient-based importance; ``labels`` None means the dense
    model's own predictions are the targets.
    """
    check_prune_config(model, config, model_name)  # before the fraction search; solved fractions stay in bounds
    input_shape = tuple(images.shape[1:])
    dense_counts = count_params_macs(model, input_shape)
    fraction = None
    if config.ratio is not None:
        fraction, _ = solve_fraction(model, config, input_shape)
        log(f"prune: {config.ratio:g} of {config.target} -> {fraction:.3f} of {', '.join(config.ratio_kinds)}")
    ratios = kind_ratios(config, fraction)
    pruned = copy.deepcopy(model)
    importance = make_importance(config.method)
    if config.method in ("taylor", "hessian"):
        used = images[: config.batches * config.batch_size]
        pruned.eval()
        accumulate_gradients(
            pruned, importance, used, gradient_targets(model, used, labels), config.batch_size, advance
        )
    torch.manual_seed(0)  # random importance is reproducible
    _apply(pruned, torch.from_numpy(images[:1]), config, ratios, importance)
    pruned.zero_grad(set_to_none=True)
    pruned.eval()
    refitted = reconstruct_linears(model, pruned, images, config.ridge) if config.reconstruct else []
    counts = count_params_macs(pruned, input_shape)
    summary = {
        "method": config.method,
        "kind_ratios": {k: round(v, 4) for k, v in ratios.items()},
        "dense": dense_counts,
        "pruned": counts,
        "removed": {k: round(1 - counts[k] / dense_counts[k], 4) for k in counts},
        "widths": widths(pruned),
        "gradient_images": min(len(images), config.batches * config.batch_size)
        if config.method in ("taylor", "hessian")
        else 0,
        "loss": "labels" if labels is not None else "predictions",
        "reconstructed": len(refitted),
    }
    return pruned, summary
