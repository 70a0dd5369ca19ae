"""The image folder, its calibrate / search / evaluate splits, and the model's own preprocessing.

One place for all three, so calibration, search and evaluation see images prepared the same way,
and the splits never overlap. A split manifest (format in calib_data/README.md) fixes which image
goes where; without one the split is a fixed hash order of the file paths, so it is the same on
every machine.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from onnxvit.errors import UserError
from onnxvit.fileio import sha256_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
SPLITS = ("calibrate", "search", "evaluate")
MANIFEST_FORMAT = "onnxvit-split/1"


@dataclass(frozen=True)
class ImageFolder:
    """Files as paths relative to ``root``; the label of a file is the index of its sorted class folder."""

    root: Path
    classes: list[str]
    files: list[str]

    def label(self, relative: str) -> int:
        return self.classes.index(relative.split("/", 1)[0])


def scan_image_folder(root: Path) -> ImageFolder:
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found; set data.root to an ImageFolder (one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: not an ImageFolder: it has no class sub-folders (expected ROOT/CLASS/IMAGE.jpg)")
    files = sorted(
        f"{cls}/{f.name}"
        for cls in classes
        for f in (root / cls).iterdir()
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserError(f"{root}: the image folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFolder(root, classes, files)


def hash_split(files: Iterable[str], calibrate: int, search: int) -> dict[str, list[str]]:
    """The default split: files ordered by the SHA-256 of their relative path, then cut in three."""
    ordered = sorted(files, key=lambda f: hashlib.sha256(f.encode("utf-8")).hexdigest())
    if calibrate + search >= len(ordered):
        raise UserError(
            f"data: {len(ordered)} images cannot give {calibrate} calibration + {search} search images "
            "and still leave some to evaluate; lower data.calibrate_images / data.search_images"
        )
    return {
        "calibrate": sorted(ordered[:calibrate]),
        "search": sorted(ordered[calibrate : calibrate + search]),
        "evaluate": sorted(ordered[calibrate + search :]),
    }


def manifest_document(splits: dict[str, list[str]], description: str) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "description": description, "splits": splits}


def read_manifest(path: Path, folder: ImageFolder) -> dict[str, list[str]]:
    """Load and check a manifest: known format, the three splits, disjoint, every file present."""
    if not path.is_file():
        raise UserError(f"{path}: split manifest not found; write one with `onnxvit split {folder.root} -o {path}`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise UserError(f'{path}: not a split manifest (expected "format": "{MANIFEST_FORMAT}")')
    splits = doc.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), list) for s in SPLITS):
        raise UserError(f'{path}: "splits" must hold the lists {", ".join(SPLITS)}')
    present = set(folder.files)
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in splits[split]:
            if name not in present:
                raise UserError(
                    f"{path}: {split} names '{name}', which is not an image in {folder.root}; "
                    "regenerate the manifest with `onnxvit split`"
                )
            if name in seen:
                raise UserError(f"{path}: '{name}' is in both {seen[name]} and {split}; the splits must be disjoint")
            seen[name] = split
    if not splits["calibrate"] or not splits["evaluate"]:
        raise UserError(f"{path}: the calibrate and evaluate splits must not be empty")
    return {split: list(splits[split]) for split in SPLITS}


@dataclass
class Dataset:
    """The image folder with its splits; the split fingerprint keys every cached result that used images."""

    folder: ImageFolder
    splits: dict[str, list[str]]

    def labels(self, split: str) -> np.ndarray:
        return np.array([self.folder.label(f) for f in self.splits[split]], dtype=np.int64)

    def fingerprint(self, split: str) -> str:
        return sha256_json({"root": str(self.folder.root), "files": self.splits[split]})


def load_dataset(
    root: Path, manifest: Path | None, calibrate: int, search: int, max_eval_images: int | None = None
) -> Dataset:
    folder = scan_image_folder(root)
    splits = read_manifest(manifest, folder) if manifest else hash_split(folder.files, calibrate, search)
    if max_eval_images:
        splits["evaluate"] = splits["evaluate"][:max_eval_images]
    return Dataset(folder, splits)


def timm_transform(model: Any) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """The model's own evaluation preprocessing, from its timm data config."""
    from timm.data import create_transform, resolve_model_data_config

    import onnxvit._compat  # noqa: F401  (before timm)

    data_config = resolve_model_data_config(model)
    return create_transform(**data_config, is_training=False), data_config


def load_image(folder: ImageFolder, relative: str, transform: Callable[[Any], Any]) -> Any:
    """One image of ``folder``, as RGB, through ``transform``; an unreadable file is a one-line error."""
    from PIL import Image

    try:
        with Image.open(folder.root / relative) as image:
            return transform(image.convert("RGB"))
    except OSError as exc:
        raise UserError(f"{folder.root / relative}: cannot read image ({exc})") from None


def load_images(
    folder: ImageFolder,
    files: list[str],
    transform: Callable[[Any], Any],
    advance: Callable[[int], None] = lambda n: None,
    workers: int = 2,
) -> np.ndarray:
    """Decode and preprocess ``files`` into one NCHW float32 array, each image written in place (no
    stacking copy of the whole split)."""
    if not files:
        raise ValueError("no files to load")
    first = np.asarray(load_image(folder, files[0], transform).numpy(), np.float32)
    out = np.empty((len(files), *first.shape), np.float32)
    out[0] = first
    advance(1)

    def one(index: int) -> None:
        out[index] = load_image(folder, files[index], transform).numpy()
        advance(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(1, len(files))))
    return out
