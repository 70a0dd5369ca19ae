"""Knowledge distillation of the pruned model from the dense one, resumable epoch by epoch.

The teacher is the dense model itself, so no labels are needed and the student learns to give the
answers the dense model gave (what agreement and top-1 drop measure). Images come from the user's
own ImageFolder, or from the calibrate and search splits of `data.root`: never from the split the
report evaluates on. Augmentation is timm's training transform for the model.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from onnxvit.config import FinetuneConfig
from onnxvit.data import ImageFolder, load_image
from onnxvit.fileio import atomic_write_bytes


@dataclass
class TrainImages:
    """The images a fine-tune reads: a folder and which of its files."""

    folder: ImageFolder
    files: list[str]
    source: str  # for the report: which images, from where

    def __len__(self) -> int:
        return len(self.files)


def training_transform(model: torch.nn.Module, config: FinetuneConfig) -> Callable[[Any], torch.Tensor]:
    from timm.data import create_transform, resolve_model_data_config

    import onnxvit._compat  # noqa: F401  (before timm)

    data = resolve_model_data_config(model)
    if not config.augment:
        return create_transform(**data, is_training=False)
    return create_transform(**data, is_training=True, auto_augment=config.auto_augment, re_prob=config.random_erasing)


def _epoch_path(folder: Path, key: str, epoch: int) -> Path:
    return folder / f"finetune-{key[:20]}-epoch{epoch:03d}.pt"


def latest_checkpoint(folder: Path, key: str) -> tuple[int, Path] | None:
    pattern = re.compile(rf"finetune-{re.escape(key[:20])}-epoch(\d+)\.pt$")
    found = [
        (int(m.group(1)), p) for p in folder.glob(f"finetune-{key[:20]}-epoch*.pt") if (m := pattern.match(p.name))
    ]
    return max(found) if found else None


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    images: TrainImages,
    config: FinetuneConfig,
    checkpoints: Path,
    key: str,
    task: Callable[[str, int], Any],
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Train ``student`` in place toward ``teacher``'s soft outputs; a checkpoint after every epoch.

    A run interrupted after epoch k restarts from epoch k's checkpoint (same ``key``); the
    returned summary lists the loss of each epoch.
    """
    transform = training_transform(teacher, config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, -(-len(images) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos"
    )
    losses: list[float] = []
    start = 0
    resumed = latest_checkpoint(checkpoints, key)
    if resumed is not None:
        state = torch.load(resumed[1], map_location="cpu", weights_only=True)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        losses, start = list(state["losses"]), resumed[0]
        log(f"finetune: resuming after epoch {start}")
    teacher.eval()
    generator = np.random.default_rng(config.seed)
    for _ in range(start):  # the same image order as an uninterrupted run
        generator.permutation(len(images))
    torch.manual_seed(config.seed + start)  # random erasing and crops (torch)...
    random.seed(config.seed + start)  # ...and RandAugment (Python's random)
    temperature = config.temperature
    for epoch in range(start, config.epochs):
        student.train()
        order = generator.permutation(len(images))
        total, seen = 0.0, 0
        with task(f"finetune epoch {epoch + 1}/{config.epochs}", len(images)) as advance:
            for begin in range(0, len(order), config.batch_size):
                batch = torch.stack(
                    [
                        load_image(images.folder, images.files[i], transform)
                        for i in order[begin : begin + config.batch_size]
                    ]
                )
                with torch.no_grad():
                    target = F.softmax(teacher(batch) / temperature, dim=1)
                logits = student(batch)
                loss = (
                    F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean") * temperature**2
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
                advance(len(batch))
        losses.append(round(total / seen, 5))
        buffer = io.BytesIO()
        torch.save(
            {
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "losses": losses,
            },
            buffer,
        )
        atomic_write_bytes(_epoch_path(checkpoints, key, epoch + 1), buffer.getvalue())
        log(f"finetune: epoch {epoch + 1}/{config.epochs}, distillation loss {losses[-1]:.4f}")
    student.eval()
    return {
        "images": len(images),
        "source": images.source,
        "epochs": config.epochs,
        "losses": losses,
        "resumed_after_epoch": start,
    }
