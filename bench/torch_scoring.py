"""What scoring a PyTorch variant costs, run eagerly and as the trace onnxvit scores it with.

The evaluation scores a PyTorch variant at batch 1 with two callers of one thread each (as ONNX
Runtime's variants are scored). Per timm model (random init, fixed seed) this times, in interleaved
rounds on the same images, the model as a user runs it, its oneDNN scoring copy run eagerly, and the
copy as `onnxvit.eager.scoring_model` runs it (a TorchScript trace where that gives eager's logits
bit for bit), and checks that the last gives the copy's logits bit for bit on every image. Prints ms
per image; with --json PATH writes them with a `headline` (per model `traced_over_eager`, the trace's
time over the eager copy's, and `identical`).

    python bench/torch_scoring.py [--models deit_tiny_patch16_224,mobilevit_xxs] [--images 64] [--json PATH]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import onnxvit._compat  # noqa: F401  (before timm)

from _common import arguments, print_table, write_json

MODELS = "deit_tiny_patch16_224,deit_small_patch16_224,mobilevit_xxs,levit_128s,efficientvit_b0,efficientformer_l1"
ROUNDS = 5


def measure(name: str, count: int) -> dict[str, Any]:
    """One model's row: ms per image of each way of running it (the best of ``ROUNDS`` interleaved
    rounds), and whether the scoring model's logits are the eager copy's bit for bit."""
    import timm
    import torch

    from onnxvit.eager import TracedModel, onednn_linears, scoring_model
    from onnxvit.variant import _torch_logits

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    images = np.random.default_rng(0).standard_normal((count, *model.pretrained_cfg["input_size"]), np.float32)
    copy, kernel = onednn_linears(model)
    scoring, _ = scoring_model(copy, images, 1)
    runs = {"user_model": model, "eager_copy": copy, "scoring": scoring}
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    logits: dict[str, np.ndarray] = {}
    for round_index in range(ROUNDS):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for key in order:
            start = time.perf_counter()
            logits[key] = _torch_logits(runs[key], images, 1, 2, 2, lambda n: None)
            seconds[key].append(time.perf_counter() - start)
    ms = {key: 1e3 * min(values) / count for key, values in seconds.items()}
    return {
        "model": name,
        "linear_kernel": kernel,
        "traced": isinstance(scoring, TracedModel),
        "user_model_ms": ms["user_model"],
        "eager_copy_ms": ms["eager_copy"],
        "scoring_ms": ms["scoring"],
        "traced_over_eager": ms["scoring"] / ms["eager_copy"],
        "identical": bool(np.array_equal(logits["scoring"], logits["eager_copy"])),
    }


def main() -> None:
    args = arguments(
        __doc__,
        "bench-torch-scoring",
        models=dict(default=MODELS, help="comma-separated timm model names"),
        images=dict(type=int, default=64, help="images per run"),
    ).parse_args()
    rows = [measure(name, args.images) for name in args.models.split(",")]
    print_table(
        rows,
        [
            "model",
            "linear_kernel",
            "traced",
            "user_model_ms",
            "eager_copy_ms",
            "scoring_ms",
            "traced_over_eager",
            "identical",
        ],
    )
    headline = {
        row["model"]: {"traced_over_eager": round(row["traced_over_eager"], 3), "identical": row["identical"]}
        for row in rows
    }
    write_json(args.json, table=rows, headline=headline, images=args.images, rounds=ROUNDS)


if __name__ == "__main__":
    main()
