"""Token merging inside a timm ViT, before export: fewer tokens in every block, with no training.

Written from the paper (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), not from
its code (CC BY-NC). In each block, between attention and MLP, the patch tokens are split
alternately into sets A and B; every A token is matched to its most similar B token (cosine
similarity of the attention keys, all heads' keys as one vector: the paper averages them over heads,
which costs a reshape and a reduction per block in the graph); the ``r`` best-matched A tokens are merged
into their B partners as a size-weighted average. Sizes (how many patches a token stands for)
travel with the tokens, and proportional attention adds ``log(size)`` to the attention logits so a
merged token weighs as the patches it replaced. Prefix tokens (class, distillation, registers) are
never merged and stay first.

Everything is written so the ONNX export stays small and static and its ops few and cheap at batch
1: constant token counts per block; the tokens stored as the next block splits them (A, then B), so
the split is two contiguous slices; an ArgMax for the matching and a TopK for the ranking; whole rows
moved by one ScatterND(add) and one Gather (``scatter_reduce(mean)`` exports wrongly, so sizes are
carried and the mean updated explicitly).

With a class-token head, the last block only needs the prefix tokens' queries, projection and MLP
(keys and values still read every token): exact, and a block's worth of work saved at no cost.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import onnx
import torch
import torch.nn as nn

from onnxvit.errors import UserError


def unsupported_reason(model: nn.Module) -> str | None:
    """Why token merging cannot apply to ``model``, or None when it can."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return (
            f"a {type(model).__name__} has no single global token sequence (windowed, 2-D or convolutional "
            "attention); token merging needs a plain ViT (timm VisionTransformer: ViT, DeiT)"
        )
    if getattr(model, "dynamic_img_size", False):
        return "dynamic_img_size changes the token count per input; token merging needs a fixed image size"
    if model.global_pool not in ("token", "avg"):
        return f"global_pool {model.global_pool!r}: token merging supports 'token' and 'avg' pooling"
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not Block or type(attn) is not Attention:
            return f"blocks.{index} is a {type(block).__name__}, not timm's plain Block with Attention"
        plain = all(isinstance(getattr(attn, name, None), nn.Identity) for name in ("q_norm", "k_norm", "norm"))
        if not plain or getattr(attn, "gate", None) is not None:
            return f"blocks.{index}.attn normalizes or gates q / k / its output, which token merging does not model"
    return None


def check_supported(model: nn.Module, name: str) -> None:
    reason = unsupported_reason(model)
    if reason is not None:
        raise UserError(f"tokens: {name}: {reason}; remove the tokens section for this model")


def split_sizes(n: int, prefix: int) -> tuple[int, int]:
    """Sizes of sets A and B among ``n`` tokens of which ``prefix`` are never merged."""
    return (n - prefix + 1) // 2, (n - prefix) // 2


def stored_order(count: int, prefix: int) -> list[int]:
    """Positions of a ``count``-token sequence in the order the blocks store it: the ``prefix``
    tokens, then the patch tokens' even positions (set A), then their odd ones (set B). Attention and
    MLP do not care about token order, so storing the sequence so makes each block's split two
    contiguous slices instead of strided copies."""
    return [*range(prefix), *range(prefix, count, 2), *range(prefix + 1, count, 2)]


class _AddRows(torch.autograd.Function):
    """``rows.index_add(0, index, updates)``, exported as one ScatterND with reduction ``add``: the
    exporter writes ``index_add`` as a ScatterElements without reduction (wrong where two rows go to
    one target) and ``scatter_add`` with an index as wide as the rows (slower in ONNX Runtime)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        return rows.index_add(0, index, updates)

    @staticmethod
    def symbolic(g: Any, rows: Any, index: Any, updates: Any) -> Any:
        column = g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([1])))
        return g.op("ScatterND", rows, column, updates, reduction_s="add")


def add_rows(rows: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """``rows`` with ``updates[i]`` added to row ``index[i]`` (repeated targets add up)."""
    return cast(torch.Tensor, _AddRows.apply(rows, index, updates))


def bipartite_soft_matching(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    prefix: int,
    forced: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, N, C) and ``size`` (B, N, 1) with ``r`` patch tokens merged away, by ``metric`` (B, N, c).

    Tokens come stored as ``stored_order`` says: the first ``prefix`` tokens (kept first and
    untouched), then set A (the sequence's even patch positions), then set B (its odd ones). Each A
    token's partner is its most similar B token (cosine); the ``r`` best-matched A tokens merge into
    their partners as a size-weighted mean. The sequence after the merge is A's unmerged tokens in
    ascending order of their best similarity, then B's; it is returned stored the same way. ``forced``
    replaces the matching's two choices (partners, ranking) by given ones.
    """
    batch, n, c = x.shape
    a_count, b_count = split_sizes(n, prefix)
    if not 0 < r <= min(a_count, b_count):
        raise ValueError(f"cannot merge {r} of {n - prefix} patch tokens")
    counts = [prefix, a_count, b_count]
    _, a_metric, b_metric = metric.split(counts, dim=1)
    _, a_norm, b_norm = metric.norm(dim=-1, keepdim=True).split(counts, dim=1)
    # cosine similarity, its norms applied to the small score matrix (B's) and to the best scores (A's)
    scores = (a_metric @ b_metric.transpose(-1, -2)) / b_norm.transpose(-1, -2)
    best, partner = scores.max(dim=-1, keepdim=True)  # (B, A, 1) each
    order = (best / a_norm).topk(a_count, dim=1, largest=False).indices  # ascending: the best matches last
    if forced is not None:  # another runtime's choices (see forcing)
        partner, order = forced
    kept, merged = order.split([a_count - r, r], dim=1)
    into = partner.gather(1, merged)
    # rows move in the batch flattened to one (B * N) table: r rows added in, the kept rows picked out
    first_row = (torch.arange(batch, device=x.device) * n).reshape(-1, 1, 1)
    sources = (merged + (prefix + first_row)).reshape(-1)
    targets = (into + (prefix + a_count + first_row)).reshape(-1)
    x_rows, size_rows = x.reshape(-1, c), size.reshape(-1, 1)
    a_size = size_rows[sources]
    size_rows = add_rows(size_rows, targets, a_size)
    # x_b + (sum over the a merged into b of s_a (x_a - x_b)) / S_b is the size-weighted mean (S_b: b's new size)
    x_rows = add_rows(x_rows, targets, a_size * (x_rows[sources] - x_rows[targets]) / size_rows[targets])
    # the sequence after the merge (prefix, A's kept, B), as rows of the table, then stored
    b_rows = torch.arange(prefix + a_count, n, device=x.device).reshape(1, -1, 1) + first_row
    parts = [kept + (prefix + first_row), b_rows]
    if prefix:  # (no empty tensor in the graph of a model without prefix tokens)
        parts.insert(0, torch.arange(prefix, device=x.device).reshape(1, -1, 1) + first_row)
    sequence = torch.cat(parts, dim=1)
    picked = sequence[:, stored_order(n - r, prefix)].reshape(-1)
    return x_rows[picked].reshape(batch, n - r, c), size_rows[picked].reshape(batch, n - r, 1)


class MergingAttention(nn.Module):
    """timm's Attention with proportional attention, also returning the merge metric (the keys), and
    optionally answering only the first ``queries`` tokens."""

    def __init__(self, attn: Any, tokens: int, queries: int | None, proportional: bool) -> None:
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.scale: float = attn.scale
        self.tokens, self.queries, self.proportional = tokens, queries, proportional

    def forward(self, x: torch.Tensor, log_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, heads, dim = self.tokens, self.heads, self.head_dim
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(-1, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        metric = qkv[..., heads * dim : 2 * heads * dim]
        if self.queries is not None:
            q = q[:, :, : self.queries]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.proportional:
            attn = attn + log_size
        out = attn.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(-1, n if self.queries is None else self.queries, heads * dim)
        return self.proj(out), metric


class MergingBlock(nn.Module):
    """timm's Block (pre-norm attention and MLP, layer scale) that merges ``r`` tokens between its
    attention and its MLP."""

    def __init__(self, block: Any, tokens: int, r: int, prefix: int, queries: int | None, proportional: bool):
        super().__init__()
        self.norm1, self.ls1, self.norm2, self.mlp, self.ls2 = block.norm1, block.ls1, block.norm2, block.mlp, block.ls2
        self.attn = MergingAttention(block.attn, tokens, queries, proportional)
        self.r, self.prefix = r, prefix
        self.forced: tuple[torch.Tensor, torch.Tensor] | None = None  # set by forcing()

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_size = size.log().reshape(-1, 1, 1, self.attn.tokens) if self.attn.proportional else size
        out, metric = self.attn(self.norm1(x), log_size)
        queries = self.attn.queries
        if queries is not None:
            x, size = x[:, :queries], size[:, :queries]
        x = x + self.ls1(out)
        if self.r:
            x, size = bipartite_soft_matching(x, size, metric, self.r, self.prefix, self.forced)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, size


class TokenMergedViT(nn.Module):
    """A timm VisionTransformer whose blocks merge tokens as ``schedule`` says (tokens merged away
    per block); sizes start at one per token and weigh average pooling."""

    def __init__(
        self, vit: Any, schedule: Sequence[int], proportional_attention: bool, class_token_only_last_block: bool
    ) -> None:
        super().__init__()
        self.vit = _without_blocks(vit)
        self.schedule = list(schedule)
        self.prefix = vit.num_prefix_tokens
        self.pool = vit.global_pool
        self.tokens = token_counts(vit, schedule)
        cls_only = class_token_only_last_block and self.pool == "token"
        blocks = []
        for index, block in enumerate(vit.blocks):
            queries = self.prefix if cls_only and index == len(vit.blocks) - 1 else None
            proportional = proportional_attention and sum(schedule[:index]) > 0  # all sizes 1 before a merge
            blocks.append(MergingBlock(block, self.tokens[index], schedule[index], self.prefix, queries, proportional))
        self.blocks = nn.ModuleList(blocks)

    @property
    def merging_blocks(self) -> list[MergingBlock]:
        return [cast(MergingBlock, block) for block in self.blocks]

    @property
    def num_classes(self) -> int:
        return int(self.vit.num_classes)

    def attention_macs(self) -> int:
        """MACs of the attention cores at batch 1 (q k^T, softmax, attention @ v), which a module
        counter does not see in MergingAttention: counted as torch-pruning counts timm's Attention."""
        total = 0
        for block in self.merging_blocks:
            attn = block.attn
            queries = attn.queries or attn.tokens
            total += attn.heads * queries * attn.tokens * (2 * attn.head_dim + 1)
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        if any(self.schedule):  # stored as the merging blocks read it
            x = x[:, stored_order(self.tokens[0], self.prefix)]
        size = torch.ones_like(x[..., :1])
        for block in self.blocks:
            x, size = block(x, size)
        x = vit.norm(x)
        if self.pool == "avg":
            patches, sizes = x[:, self.prefix :], size[:, self.prefix :]
            pooled = (patches * sizes).sum(1) / sizes.sum(1)
            return vit.head(vit.head_drop(vit.fc_norm(pooled)))
        return vit.forward_head(x)


def _without_blocks(vit: Any) -> Any:
    """A shallow copy of ``vit`` sharing every part but its blocks, which the merging blocks replace:
    each module is reached once, as counters and state dicts expect."""
    stem = copy.copy(vit)
    stem._modules = dict(vit._modules)
    stem._modules["blocks"] = nn.Sequential()
    return stem


def token_counts(vit: Any, schedule: Sequence[int]) -> list[int]:
    """Tokens entering each block under ``schedule``."""
    counts, tokens = [], vit.patch_embed.num_patches + vit.num_prefix_tokens
    for r in schedule:
        counts.append(tokens)
        tokens -= r
    return counts


def resolve_schedule(vit: Any, r: int | None, schedule: Sequence[int] | str, cls_only_last: bool) -> list[int]:
    """Tokens merged away per block, from ``r`` and a schedule shape, or an explicit list; checked to
    leave every block tokens to merge. Shapes: ``constant`` (r per block), ``decreasing`` (2r down
    to 0) and ``alternate`` (2r in every other block from the second: the first block's keys match
    tokens worst, and half the blocks pay the merge's own ops for the same number of tokens)."""
    depth = len(vit.blocks)
    if isinstance(schedule, str):
        if r is None:
            raise UserError(f"tokens.r: a {schedule} schedule needs r, the tokens merged per block")
        if schedule == "constant":
            values = [r] * depth
        elif schedule == "alternate":
            values = [2 * r * (i % 2) for i in range(depth)]
        else:
            values = [round(2 * r * (1 - i / depth)) for i in range(depth)]
    else:
        values = list(schedule)
        if len(values) != depth:
            raise UserError(f"tokens.schedule: {len(values)} numbers for a model of {depth} blocks; give one per block")
    if cls_only_last and vit.global_pool == "token":
        values[-1] = 0  # the last block keeps only the prefix tokens: nothing left to merge for
    tokens = vit.patch_embed.num_patches
    for index, value in enumerate(values):
        if value < 0 or value > tokens // 2:
            raise UserError(
                f"tokens: block {index} has {tokens} patch tokens and can merge 0 to {tokens // 2}, not {value}; "
                "lower r or the schedule"
            )
        tokens -= value
    return values


def merge_tokens(
    vit: Any,
    schedule: Sequence[int],
    proportional_attention: bool = True,
    class_token_only_last_block: bool = True,
) -> TokenMergedViT:
    """``vit`` (shared, not copied) wrapped to merge tokens as ``schedule`` says."""
    return TokenMergedViT(vit, schedule, proportional_attention, class_token_only_last_block).eval()


def describe(model: TokenMergedViT) -> dict[str, Any]:
    """What the report says of the merge: the schedule and the tokens entering each block."""
    return {"schedule": model.schedule, "tokens_per_block": model.tokens}


def choice_tensors(proto: onnx.ModelProto, model: TokenMergedViT) -> list[str]:
    """The tensors of ``model``'s export that hold its merge choices: per merging block, the
    partner and ranking indices (its ArgMax and its TopK's indices, in graph order)."""
    names = [
        node.output[0] if node.op_type == "ArgMax" else node.output[1]
        for node in proto.graph.node
        if node.op_type in ("ArgMax", "TopK")
    ]
    merging = sum(1 for block in model.merging_blocks if block.r)
    if len(names) != 2 * merging:
        raise ValueError(f"expected an ArgMax and a TopK per merging block ({2 * merging}), found {len(names)}")
    return names


@contextmanager
def forcing(model: TokenMergedViT, choices: Sequence[np.ndarray]) -> Iterator[None]:
    """Within the block, ``model`` makes the merge choices given (as ``choice_tensors`` orders them)
    instead of its own: the same computation as another runtime's, so the two can be compared
    exactly although a near-tie may go the other way in each."""
    blocks = [block for block in model.merging_blocks if block.r]
    try:
        for number, block in enumerate(blocks):
            partner, order = choices[2 * number], choices[2 * number + 1]
            block.forced = (torch.from_numpy(partner).long(), torch.from_numpy(order).long())
        yield
    finally:
        for block in blocks:
            block.forced = None
